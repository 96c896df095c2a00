"""Runtime tests of the scheduler's Trio shell (SPEC §5), on the autojump clock.

The lane is driven directly, as ``app._exchange`` / ``app._upstream`` drive
it: a ticket per attempt, ``wait_turn`` to be admitted, ``on_response`` /
``on_failure`` for the outcome, ``release`` when the exchange is over.  The
dispatchers run in a nursery opened by the test.  No sockets, and no sleeping
against the wall clock: ``time.time()`` only interprets reset stamps, every
wait is trio time, so minutes of rate-limit windows take milliseconds.
"""

from __future__ import annotations

import math
import random
import time
from contextlib import asynccontextmanager
from datetime import datetime, timezone

import attrs
import pytest
import trio
import trio.testing

from hivemind_trio.config import Config, SchedulerConfig
from hivemind_trio.core.breaker import BreakerState
from hivemind_trio.core.queue import CRITICAL, HIGH, LOW, NORMAL
from hivemind_trio.core.retry import OutcomeKind
from hivemind_trio.profiles import load_profiles
from hivemind_trio.runtime.scheduler import QueueTimeout, RequestInfo, Scheduler

PROFILES = load_profiles()
ANTHROPIC = PROFILES["anthropic"]
ROUTE = "anthropic"


def with_window(profile, lo: int, initial: int, hi: int):
    return attrs.evolve(
        profile, limits=attrs.evolve(profile.limits, window_min=lo, window_initial=initial, window_max=hi)
    )


ONE_SLOT = with_window(ANTHROPIC, 1, 1, 1)

ALL_OFF = dict(admission=False, ratelimit=False, aimd=False, breaker=False, budgets=False, priority=False, retry=False)


@asynccontextmanager
async def running(seed: int = 1, **scheduler):
    """A scheduler whose lane dispatchers run in a nursery of the test."""
    sched = Scheduler(Config(scheduler=SchedulerConfig(**scheduler)), seed=seed)
    async with trio.open_nursery() as nursery:
        sched.attach(nursery)
        yield sched
        nursery.cancel_scope.cancel()


def info(agent: str = "agent-a", priority: int = NORMAL, *, deadline: float | None = None,
         input_estimate: int = 1000, max_tokens: int | None = 1024) -> RequestInfo:
    return RequestInfo(
        agent=agent,
        priority=priority,
        input_estimate=input_estimate,
        max_tokens=max_tokens,
        model="claude-test",
        deadline=trio.current_time() + 3600 if deadline is None else deadline,
        client_deadline=None,
        client_retry_count=0,
    )


async def admit(sched: Scheduler, lane, request: RequestInfo | None = None, **kw):
    """Queue one attempt and wait for its admission; returns the ticket."""
    t = sched.new_ticket(request or info(**kw), lane)
    await lane.wait_turn(t)
    assert t.granted and t.granted_at == trio.current_time()
    return t


def rfc3339_in(seconds: float) -> bytes:
    """An RFC 3339 stamp ``seconds`` of wall time from now, as Anthropic sends resets."""
    stamp = datetime.fromtimestamp(time.time() + seconds, tz=timezone.utc)
    return stamp.isoformat(timespec="microseconds").replace("+00:00", "Z").encode()


def request_limit_headers(limit: int, remaining: int, reset_in: float) -> list[tuple[bytes, bytes]]:
    return [
        (b"anthropic-ratelimit-requests-limit", str(limit).encode()),
        (b"anthropic-ratelimit-requests-remaining", str(remaining).encode()),
        (b"anthropic-ratelimit-requests-reset", rfc3339_in(reset_in)),
    ]


def max_in_window(times: list[float], width: float) -> int:
    """Most events in any half-open window [t, t + width)."""
    ts = sorted(times)
    best = 0
    j = 0
    for i, start in enumerate(ts):
        while j < len(ts) and ts[j] < start + width:
            j += 1
        best = max(best, j - i)
    return best


# ---------------------------------------------------------------- 1. rate windows


async def test_learned_request_limit_paces_the_lane_in_trio_time(autojump_clock):
    wall = time.monotonic()
    async with running() as sched:
        lane = sched.lane_for(ROUTE, ANTHROPIC, "key-1")
        first = await admit(sched, lane)
        t0 = trio.current_time()
        # The provider says: 10 requests a minute, none left, full again in 60 s.
        lane.on_response(first, 200, request_limit_headers(10, 0, 60.0))
        lane.release(first, ok=True)
        assert lane.statistics().rate_limit["requests"]["remaining"] == 0
        assert lane.statistics().rate_limit["requests"]["reset_in"] == pytest.approx(60.0, abs=0.01)

        # Anthropic documents a continuously replenished bucket whose reset is
        # the time it is full again: one request's worth comes back every
        # 60 / 10 = 6 s.  So the next request waits 6 s of trio time (not 0,
        # and not the whole minute), and ten more take the minute.
        grants = []
        for _ in range(10):
            t = await admit(sched, lane)
            grants.append(trio.current_time() - t0)
            lane.release(t, ok=True)
        assert grants[0] == pytest.approx(6.0, abs=0.01)
        assert all(b - a == pytest.approx(6.0, abs=0.01) for a, b in zip(grants, grants[1:]))
        assert grants[-1] == pytest.approx(60.0, abs=0.05)
        assert max_in_window(grants, 60.0) <= 10
    # A minute of rate window, in (much) less than a second of real time.
    assert time.monotonic() - wall < 5


# ---------------------------------------------------------------- 2. limits


async def test_configured_rpm_is_never_exceeded_and_nobody_starves(autojump_clock):
    n_requests, rpm = 35, 10
    async with running() as sched:
        lane = sched.lane_for(ROUTE, ANTHROPIC, "key-1", rpm=rpm)
        t0 = trio.current_time()
        grants: list[float] = []

        async def one(i: int) -> None:
            t = await admit(sched, lane, agent=f"agent-{i % 3}")
            grants.append(t.granted_at - t0)
            await trio.sleep(1 + i % 4)
            lane.on_response(t, 200, [])
            lane.release(t, ok=True, latency=1.0 + i % 4)

        async with trio.open_nursery() as nursery:
            # A burst, then a steady stream at twice the allowed rate: the
            # dispatcher is woken at all sorts of times, not only at window edges.
            for i in range(n_requests):
                nursery.start_soon(one, i)
                if i >= 12:
                    await trio.sleep(3)

        assert len(grants) == n_requests  # every one got through
        assert max_in_window(grants, 60.0) <= rpm
        # ...and the lane used its allowance: 35 at 10 a minute end in the fourth minute.
        assert max(grants) < 3 * 60 + 5
        assert lane.statistics().in_flight == 0


class BucketProvider:
    """A provider with Anthropic's documented model: a bucket of ``limit``
    requests refilled continuously over ``per`` seconds; over the limit it
    answers 429 with retry-after."""

    def __init__(self, limit: int, per: float) -> None:
        self.limit = limit
        self.rate = limit / per
        self.level = float(limit)
        self.at = trio.current_time()
        self.refused = 0
        self.served = 0

    def answer(self) -> tuple[int, list[tuple[bytes, bytes]]]:
        now = trio.current_time()
        self.level = min(self.limit, self.level + (now - self.at) * self.rate)
        self.at = now
        # A millionth of a request of tolerance for float and wall-clock jitter.
        if self.level >= 1 - 1e-6:
            self.level = max(0.0, self.level - 1)
            self.served += 1
            status = 200
        else:
            self.refused += 1
            status = 429
        headers = request_limit_headers(self.limit, math.floor(self.level + 1e-6), (self.limit - self.level) / self.rate)
        if status == 429:
            headers.append((b"retry-after", str(math.ceil((1 - self.level) / self.rate)).encode()))
        return status, headers


async def test_learned_limit_is_never_exceeded_and_nobody_starves(autojump_clock):
    """Parallel requests reach the provider, and their headers come back, in
    any order: whatever the order, the lane must not spend slots it learned
    are gone.  Repeated with different network delays, since an overshoot
    shows only for some orders."""
    n_requests = 35
    rng = random.Random(2024)
    for _ in range(20):
        async with running() as sched:
            lane = sched.lane_for(ROUTE, ANTHROPIC, "key-1")
            provider = BucketProvider(limit=10, per=60.0)
            t0 = trio.current_time()
            grants: list[float] = []

            async def one(i: int) -> None:
                t = await admit(sched, lane, agent=f"agent-{i % 3}")
                grants.append(t.granted_at - t0)
                await trio.sleep(rng.uniform(0.0, 0.2))  # on its way to the provider
                status, headers = provider.answer()  # charged on arrival
                await trio.sleep(rng.uniform(0.5, 1.5))  # headers come back
                lane.on_response(t, status, headers)
                await trio.sleep(1)
                lane.release(t, ok=status == 200, latency=2.0)

            async with trio.open_nursery() as nursery:
                for i in range(n_requests):
                    nursery.start_soon(one, i)

            assert len(grants) == n_requests
            assert provider.refused == 0  # the lane never went over what it learned
            assert provider.served == n_requests
            # Not by being timid: 10 at once, then one per 6 s for the other 25 is 150 s.
            assert max(grants) < 150 + 15


# ---------------------------------------------------------------- 3./4. 429s


async def test_retry_after_pauses_only_its_own_lane(autojump_clock):
    async with running() as sched:
        lane_a = sched.lane_for(ROUTE, ANTHROPIC, "key-a")
        lane_b = sched.lane_for(ROUTE, ANTHROPIC, "key-b")
        assert lane_a is not lane_b
        t = await admit(sched, lane_a)
        t0 = trio.current_time()
        lane_a.on_response(t, 429, [(b"retry-after", b"30")], b'{"type":"error","error":{"type":"rate_limit_error"}}')
        lane_a.release(t, ok=False)

        a_granted: list[float] = []

        async def next_on_a() -> None:
            t = await admit(sched, lane_a)
            a_granted.append(trio.current_time() - t0)
            lane_a.release(t, ok=True)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(next_on_a)
            await trio.testing.wait_all_tasks_blocked()
            assert lane_a.statistics().paused_for == pytest.approx(30.0)
            assert lane_b.statistics().paused_for == 0
            for _ in range(3):
                tb = await admit(sched, lane_b)
                assert trio.current_time() == t0  # lane B did not wait at all
                lane_b.release(tb, ok=True)
            assert a_granted == []
        assert a_granted[0] >= 30.0
        assert a_granted[0] == pytest.approx(30.0, abs=1e-6)


async def test_429_without_retry_after_backs_off_exponentially_and_only_that_lane(autojump_clock):
    async with running(seed=7) as sched:
        lane_a = sched.lane_for(ROUTE, ANTHROPIC, "key-a")
        lane_b = sched.lane_for(ROUTE, ANTHROPIC, "key-b")
        pauses = []
        t = await admit(sched, lane_a)
        for _ in range(4):
            lane_a.on_response(t, 429, [], b'{"type":"error","error":{"type":"rate_limit_error"}}')
            lane_a.release(t, ok=False)
            at_429 = trio.current_time()
            tb = await admit(sched, lane_b)
            assert trio.current_time() == at_429  # the other lane never stalls
            lane_b.release(tb, ok=True)
            t = await admit(sched, lane_a)
            pauses.append(trio.current_time() - at_429)
        assert 0 < pauses[0] <= 1.0  # from the back-off base, not an invented minute
        assert all(later > earlier for earlier, later in zip(pauses, pauses[1:])), pauses
        assert pauses[-1] > 2 * pauses[0]

        # A success forgets the streak: the next bare 429 starts from the base again.
        lane_a.on_response(t, 200, [])
        lane_a.release(t, ok=True)
        t = await admit(sched, lane_a)
        lane_a.on_response(t, 429, [])
        lane_a.release(t, ok=False)
        at_429 = trio.current_time()
        t = await admit(sched, lane_a)
        assert 0 < trio.current_time() - at_429 <= 1.0
        lane_a.release(t, ok=True)


# ---------------------------------------------------------------- 5./6. priority and fairness


async def test_priority_classes_are_served_highest_first(autojump_clock):
    async with running() as sched:
        lane = sched.lane_for(ROUTE, ONE_SLOT, "key-1")
        holder = await admit(sched, lane)
        order: list[int] = []

        async def one(agent: str, prio: int) -> None:
            t = await admit(sched, lane, agent=agent, priority=prio)
            order.append(prio)
            lane.release(t, ok=True)

        async with trio.open_nursery() as nursery:
            # Lowest first, so that arrival order would get it wrong.
            for i, prio in enumerate((LOW, NORMAL, HIGH, CRITICAL, LOW, NORMAL, HIGH, CRITICAL)):
                nursery.start_soon(one, f"agent-{i}", prio)
                await trio.testing.wait_all_tasks_blocked()
            stats = lane.statistics()
            assert stats.queued == 8
            assert stats.queue_by_priority == {"critical": 2, "high": 2, "normal": 2, "low": 2}
            lane.release(holder, ok=True)
        assert order == [CRITICAL, CRITICAL, HIGH, HIGH, NORMAL, NORMAL, LOW, LOW]


@pytest.mark.parametrize("aging", [5.0, 1e9], ids=["aging", "strict-control"])
async def test_low_is_served_while_high_keeps_arriving(autojump_clock, aging):
    """Highs arrive every second and each holds the only slot for 1.5 s, so a
    high is always waiting.  With aging the low one is promoted and served
    within a few aging intervals; the strict control shows the same load
    would otherwise keep it waiting until the highs stop."""
    async with running(aging_interval=aging) as sched:
        lane = sched.lane_for(ROUTE, ONE_SLOT, "key-1")
        t0 = trio.current_time()
        low_served: dict[str, float] = {}

        async def request(agent: str, prio: int) -> None:
            t = await admit(sched, lane, agent=agent, priority=prio)
            if prio == LOW:
                low_served["at"] = trio.current_time() - t0
                low_served["highs_waiting"] = lane.statistics().queue_by_priority["high"]
            await trio.sleep(1.5)
            lane.release(t, ok=True)

        async def producer(nursery: trio.Nursery) -> None:
            for _ in range(40):
                nursery.start_soon(request, "interactive", HIGH)
                await trio.sleep(1)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(producer, nursery)
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(request, "batch", LOW)
        if aging < 100:
            assert low_served["at"] <= 3 * aging + 1.5
            assert low_served["highs_waiting"] > 0  # it overtook waiting highs
        else:
            assert low_served["highs_waiting"] == 0
            assert low_served["at"] >= 40 * 1.5


async def test_chatty_agent_does_not_starve_a_quiet_one(autojump_clock):
    async with running() as sched:
        lane = sched.lane_for(ROUTE, ONE_SLOT, "key-1")
        holder = await admit(sched, lane)
        order: list[str] = []

        async def one(agent: str) -> None:
            t = await admit(sched, lane, agent=agent)
            order.append(agent)
            await trio.sleep(1)
            lane.release(t, ok=True)

        async with trio.open_nursery() as nursery:
            for _ in range(20):
                nursery.start_soon(one, "chatty")
            await trio.testing.wait_all_tasks_blocked()
            for _ in range(2):
                nursery.start_soon(one, "quiet")
            await trio.testing.wait_all_tasks_blocked()
            lane.release(holder, ok=True)
        assert len(order) == 22
        quiet_at = [i for i, agent in enumerate(order) if agent == "quiet"]
        assert quiet_at[-1] <= 3, order  # both within the first four grants, not after 20


# ---------------------------------------------------------------- 7. deadlines


async def test_client_deadline_is_never_outlived(autojump_clock):
    async with running() as sched:
        lane = sched.lane_for(ROUTE, ANTHROPIC, "key-1")
        t = await admit(sched, lane)
        lane.on_response(t, 429, [(b"retry-after", b"30")])
        lane.release(t, ok=False)
        t0 = trio.current_time()
        results: dict[str, tuple[float, QueueTimeout | None]] = {}

        async def waiter(agent: str, deadline_in: float) -> None:
            tk = sched.new_ticket(info(agent=agent, deadline=t0 + deadline_in), lane)
            try:
                await lane.wait_turn(tk)
            except QueueTimeout as exc:
                results[agent] = (trio.current_time() - t0, exc)
            else:  # pragma: no cover - the failure being tested for
                results[agent] = (trio.current_time() - t0, None)
                lane.release(tk, ok=True)

        async with trio.open_nursery() as nursery:
            # The first is next in line (held by the pause), the second behind it.
            nursery.start_soon(waiter, "patient", 10.0)
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(waiter, "hasty", 5.0)
            await trio.testing.wait_all_tasks_blocked()
            assert lane.statistics().queued == 2

            await trio.sleep_until(t0 + 5)
            await trio.testing.wait_all_tasks_blocked()
            assert "hasty" in results
            assert lane.statistics().queued == 1

            await trio.sleep_until(t0 + 10)
            await trio.testing.wait_all_tasks_blocked()
            assert lane.statistics().queued == 0

        for agent, deadline_in in (("hasty", 5.0), ("patient", 10.0)):
            at, exc = results[agent]
            assert isinstance(exc, QueueTimeout)
            assert at == deadline_in  # at the deadline, not after it
            assert exc.waited == pytest.approx(deadline_in)
            # The client is told when the lane reopens (at t0 + 30).
            assert exc.retry_after == 30 - deadline_in
        stats = lane.statistics()
        assert (stats.queued, stats.in_flight) == (0, 0)
        assert lane.limiter.borrowed_tokens == 0
        # No slot leaked: when the pause ends the window is whole again.
        window = lane.limiter.total_tokens
        held = [await admit(sched, lane, agent=f"later-{i}") for i in range(window)]
        assert trio.current_time() == pytest.approx(t0 + 30)
        assert lane.limiter.borrowed_tokens == window
        for t in held:
            lane.release(t, ok=None)
        assert lane.limiter.borrowed_tokens == 0


# ---------------------------------------------------------------- 8. breaker


async def test_breaker_trips_cancels_waiting_attempts_holds_the_queue_and_recovers(autojump_clock):
    async with running() as sched:
        lane = sched.lane_for(ROUTE, ANTHROPIC, "key-1")
        cancelled: list[bool] = []

        async def waiting_for_headers() -> None:
            # What app._upstream does around the upstream request.
            t = await admit(sched, lane, agent="streamer")
            with trio.CancelScope() as scope:
                lane.watch_headers(scope)
                await trio.sleep(3600)  # headers never come; only the trip ends this
            lane.unwatch_headers(scope)
            cancelled.append(scope.cancelled_caught)
            lane.on_cancelled(t)
            lane.release(t, ok=None)

        failing = [await admit(sched, lane, agent=f"f-{i}") for i in range(5)]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(waiting_for_headers)
            await trio.testing.wait_all_tasks_blocked()
            for t in failing:
                assert lane.breaker.state is BreakerState.CLOSED
                assert cancelled == []
                lane.on_response(t, 500, [], b'{"type":"error","error":{"type":"api_error"}}')
                lane.release(t, ok=False)
        assert lane.breaker.state is BreakerState.OPEN
        assert cancelled == [True]
        t_trip = trio.current_time()
        assert lane.statistics().in_flight == 0
        assert lane.statistics().breaker_trips == 1

        grants: list[float] = []

        async def queued(agent: str) -> None:
            t = await admit(sched, lane, agent=agent, deadline=t_trip + 60)
            grants.append(trio.current_time() - t_trip)
            await trio.sleep(1)
            lane.on_response(t, 200, [])
            lane.release(t, ok=True, latency=1.0)

        async with trio.open_nursery() as nursery:
            for i in range(3):
                nursery.start_soon(queued, f"q-{i}")
            # Open: the queue waits (nobody fails, nobody is admitted).
            await trio.sleep(4.9)
            assert grants == []
            assert lane.statistics().queued == 3
            assert lane.breaker.state is BreakerState.OPEN
            # After the 5 s cool-down exactly one probe goes out...
            await trio.sleep(0.5)
            assert grants == [pytest.approx(5.0)]
            assert lane.breaker.state is BreakerState.HALF_OPEN
            assert lane.statistics().in_flight == 1
            assert lane.statistics().queued == 2
        # ...and its success closes the breaker and lets the others in.
        assert lane.breaker.state is BreakerState.CLOSED
        assert grants == [pytest.approx(5.0), pytest.approx(6.0), pytest.approx(6.0)]
        assert lane.limiter.borrowed_tokens == 0


async def test_transport_failures_trip_the_breaker_too(autojump_clock):
    async with running() as sched:
        lane = sched.lane_for(ROUTE, ANTHROPIC, "key-1")
        for kind in (OutcomeKind.CONNECT_ERROR, OutcomeKind.RESET, OutcomeKind.TIMEOUT_BEFORE_HEADERS,
                     OutcomeKind.PROTOCOL_ERROR, OutcomeKind.CONNECT_ERROR):
            assert lane.breaker.state is BreakerState.CLOSED
            t = await admit(sched, lane)
            lane.on_failure(t, kind)
            lane.release(t, ok=False)
        assert lane.breaker.state is BreakerState.OPEN
        t_trip = trio.current_time()
        t = await admit(sched, lane)
        assert trio.current_time() - t_trip == pytest.approx(5.0)
        lane.on_cancelled(t)  # no verdict: the probe slot is given back
        lane.release(t, ok=None)
        t = await admit(sched, lane)
        assert trio.current_time() - t_trip == pytest.approx(5.0)
        lane.on_response(t, 200, [])
        lane.release(t, ok=True)
        assert lane.breaker.state is BreakerState.CLOSED


OVERLOADED = b'{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}'


async def test_overload_burst_shrinks_the_window_without_tripping_the_breaker(autojump_clock):
    """529s are AIMD's signal while the window can still shrink; once it is at
    its floor and the upstream still says overloaded, they trip the breaker."""
    profile = with_window(ANTHROPIC, 1, 8, 16)
    async with running() as sched:
        lane = sched.lane_for(ROUTE, profile, "key-1")
        # A first burst larger than the upstream's capacity: every answer a 529.
        burst = [await admit(sched, lane, agent=f"b-{i}") for i in range(8)]
        for t in burst:
            lane.on_response(t, 529, [], OVERLOADED)
            lane.release(t, ok=False)
        assert lane.breaker.state is BreakerState.CLOSED
        assert lane.window.limit < 8
        # Still overloaded, one round trip after another: the window halves
        # down to its floor, and 529s sent from there count as failures.
        trips_at = None
        for _ in range(20):
            await trio.sleep(1)
            at_floor = lane.window.limit == 1
            t = await admit(sched, lane)
            lane.on_response(t, 529, [], OVERLOADED)
            lane.release(t, ok=False)
            if lane.breaker.state is BreakerState.OPEN:
                assert at_floor
                trips_at = trio.current_time()
                break
        assert trips_at is not None, "a floor-level 529 storm must open the breaker"


async def test_overload_counts_for_the_breaker_when_aimd_is_off(autojump_clock):
    async with running(aimd=False) as sched:
        lane = sched.lane_for(ROUTE, ANTHROPIC, "key-1")
        for _ in range(5):
            assert lane.breaker.state is BreakerState.CLOSED
            t = await admit(sched, lane)
            lane.on_response(t, 529, [], OVERLOADED)
            lane.release(t, ok=False)
        assert lane.breaker.state is BreakerState.OPEN


@pytest.mark.parametrize("ending", ["reset", "cancelled"])
async def test_attempt_without_status_keeps_its_slot_until_it_arrived(autojump_clock, ending):
    """A reset (or cancelled) attempt was counted upstream on arrival, after its
    admission: the lane's window log keeps it until then, so pacing at the
    window's edge does not free its slot early (the 429s at 60 s in replay-11)."""
    async with running() as sched:
        lane = sched.lane_for(ROUTE, ANTHROPIC, "key-1")
        t = await admit(sched, lane)
        granted = t.granted_at
        assert [e[0] for e in lane.tracker.state.log] == [granted]
        await trio.sleep(0.2)
        if ending == "reset":
            lane.on_failure(t, OutcomeKind.RESET)
        else:
            lane.on_cancelled(t)
        lane.release(t, ok=None if ending == "cancelled" else False)
        assert [e[0] for e in lane.tracker.state.log] == [pytest.approx(granted + 0.2)]
        # Capped by the arrival bound: a slow failure is not kept longer than that.
        t = await admit(sched, lane)
        await trio.sleep(30)
        lane.on_failure(t, OutcomeKind.TIMEOUT_BEFORE_HEADERS)
        lane.release(t, ok=False)
        assert lane.tracker.state.log[-1][0] == pytest.approx(t.granted_at + 0.5)


# ---------------------------------------------------------------- 9. AIMD


async def test_aimd_moves_the_capacity_limiter_within_bounds(autojump_clock):
    profile = with_window(ANTHROPIC, 2, 8, 12)
    async with running() as sched:
        lane = sched.lane_for(ROUTE, profile, "key-1")
        assert lane.limiter.total_tokens == lane.window.limit == 8

        held = [await admit(sched, lane, agent=f"h-{i}") for i in range(8)]
        lane.on_response(held[0], 529, [], b'{"type":"error","error":{"type":"overloaded_error"}}')
        assert lane.window.limit == lane.limiter.total_tokens == 4
        # The rest of the same overfull window is one congestion event, not eight.
        for t in held[1:4]:
            lane.on_response(t, 529, [], b"")
        assert lane.limiter.total_tokens == 4
        # Lowering the window pre-empts nobody; a newcomer waits until fewer
        # than four are in flight.
        assert lane.limiter.borrowed_tokens == 8
        newcomer: list = []

        async def wait_for_slot() -> None:
            newcomer.append(await admit(sched, lane, agent="new"))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(wait_for_slot)
            for i, t in enumerate(held):
                await trio.testing.wait_all_tasks_blocked()
                assert bool(newcomer) == (i >= 5), i  # 8 - 5 = 3 < 4
                lane.release(t, ok=False)
        assert lane.limiter.borrowed_tokens == 1
        lane.release(newcomer[0], ok=None)

        # Further decreases, one per round trip, stop at window_min.
        for expected in (2, 2, 2):
            await trio.sleep(1)
            t = await admit(sched, lane)
            lane.on_response(t, 529, [], b"")
            lane.release(t, ok=False)
            assert lane.window.limit == lane.limiter.total_tokens == expected

        # Successes while the window is barely used teach nothing.
        for _ in range(20):
            t = await admit(sched, lane)
            await trio.sleep(1)
            lane.on_response(t, 200, [])
            lane.release(t, ok=True, latency=1.0)
        assert lane.limiter.total_tokens == 2
        # Successes with the window full grow it, up to window_max and no further.
        seen = []
        for _ in range(60):
            limit = lane.limiter.total_tokens
            batch = [await admit(sched, lane) for _ in range(limit)]
            assert lane.limiter.borrowed_tokens == limit
            await trio.sleep(1)
            for t in batch:
                lane.on_response(t, 200, [])
                lane.release(t, ok=True, latency=1.0)
                assert lane.limiter.total_tokens == lane.window.limit
                seen.append(lane.limiter.total_tokens)
        assert seen == sorted(seen)
        assert max(seen) == 12 and seen[-1] == 12
        assert lane.limiter.borrowed_tokens == 0


# ---------------------------------------------------------------- 10. cancellation


async def test_cancelled_waiter_is_removed_and_takes_no_slot(autojump_clock):
    async with running() as sched:
        lane = sched.lane_for(ROUTE, ONE_SLOT, "key-1")
        holder = await admit(sched, lane)
        assert lane.limiter.borrowed_tokens == 1
        scopes: list[trio.CancelScope] = []

        async def doomed() -> None:
            with trio.CancelScope() as scope:
                scopes.append(scope)
                await admit(sched, lane, agent="doomed")
                raise AssertionError("a cancelled waiter was admitted")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(doomed)
            await trio.testing.wait_all_tasks_blocked()
            assert lane.statistics().queued == 1
            scopes[0].cancel()
        stats = lane.statistics()
        assert (stats.queued, stats.in_flight) == (0, 1)
        assert lane.limiter.borrowed_tokens == 1
        lane.release(holder, ok=True)
        assert lane.limiter.borrowed_tokens == 0
        t0 = trio.current_time()
        t = await admit(sched, lane, agent="next")
        assert trio.current_time() == t0
        assert lane.limiter.borrowed_tokens == 1
        lane.release(t, ok=True)
        assert lane.limiter.borrowed_tokens == 0
        assert lane.statistics().in_flight == 0
        assert lane.statistics().admitted == 2


async def test_waiter_cancelled_as_it_is_admitted_gives_the_slot_back(autojump_clock):
    # The slot frees and the waiter is cancelled in the same step: whichever
    # of the dispatcher and the waiter runs first, no slot may stay taken.
    async with running() as sched:
        lane = sched.lane_for(ROUTE, ONE_SLOT, "key-1")
        for round_ in range(30):
            holder = await admit(sched, lane, agent="holder")
            scopes: list[trio.CancelScope] = []

            async def doomed() -> None:
                with trio.CancelScope() as scope:
                    scopes.append(scope)
                    t = await admit(sched, lane, agent="doomed")
                    # Admitted before the cancel landed: a caller releases.
                    lane.release(t, ok=None)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(doomed)
                await trio.testing.wait_all_tasks_blocked()
                lane.release(holder, ok=True)
                scopes[0].cancel()
            await trio.testing.wait_all_tasks_blocked()
            stats = lane.statistics()
            assert (stats.queued, stats.in_flight, lane.limiter.borrowed_tokens) == (0, 0, 0), round_


async def test_cancelled_waiter_held_by_pacing_does_not_use_the_rate(autojump_clock):
    # With a token limit the next ticket is chosen and held until its tokens
    # fit (so big requests are not overtaken forever); cancelled while held,
    # it must neither be admitted later nor spend the lane's tokens.
    async with running() as sched:
        lane = sched.lane_for(ROUTE, ANTHROPIC, "key-1", tpm=2000)
        t0 = trio.current_time()
        t = await admit(sched, lane)  # 1000 in + 256 out guessed: 1256 of 2000
        lane.release(t, ok=True)
        scopes: list[trio.CancelScope] = []

        async def doomed() -> None:
            with trio.CancelScope() as scope:
                scopes.append(scope)
                await admit(sched, lane, agent="doomed")
                raise AssertionError("a cancelled waiter was admitted")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(doomed)
            await trio.sleep(10)
            assert lane.statistics().queued == 1
            scopes[0].cancel()
        assert lane.statistics().queued == 0
        t = await admit(sched, lane, agent="next")
        # The tokens of the next minute are this one's: admitted at 60 s, not 120 s.
        assert trio.current_time() - t0 == pytest.approx(60.0)
        assert lane.limiter.borrowed_tokens == 1
        lane.release(t, ok=True)
        assert lane.limiter.borrowed_tokens == 0
        assert lane.statistics().in_flight == 0


# ---------------------------------------------------------------- 11. switches


async def test_every_switch_off_admits_immediately(autojump_clock):
    async with running(**ALL_OFF) as sched:
        lane = sched.lane_for(ROUTE, ANTHROPIC, "key-1", rpm=1, tpm=100)
        assert sched.reserve(info()) is None  # budgets off: nothing reserved
        t0 = trio.current_time()
        # Tell the lane everything that would otherwise hold it back.
        t = await admit(sched, lane)
        lane.on_response(t, 429, [(b"retry-after", b"300"), *request_limit_headers(10, 0, 60.0)])
        lane.release(t, ok=False)
        for i in range(10):
            t = await admit(sched, lane, agent=f"f-{i}")
            lane.on_response(t, 529 if i % 2 else 500, [], b"")
            lane.release(t, ok=False)
        held = [await admit(sched, lane, agent=f"a-{i % 4}", priority=i % 4) for i in range(50)]
        assert trio.current_time() == t0  # nothing ever waited
        assert lane.statistics().in_flight == 50
        assert lane.breaker.state is BreakerState.CLOSED
        assert lane.window.limit == 8  # the 529s moved nothing
        assert lane.limiter.total_tokens == 8
        for t in held:
            lane.release(t, ok=True)
        assert lane.statistics().in_flight == 0
