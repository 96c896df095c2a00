"""The dispatcher's shared gate (SPEC §7.5) on the autojump clock.

Two schedulers (two "instances") share one in-memory stand-in for the Redis
backend that keeps the same books as the Lua scripts (leases with expiry,
a sliding log of admissions) in trio time.  This checks the Trio side, the
part Redis cannot run under a mock clock: the dispatcher asks the shared gate
only after every local gate is open, waits when told to, gives a lease back
when a local gate closed meanwhile, and goes on locally when the backend is
unreachable.  The scripts themselves are tested against a real redis-server
in tests/state/test_shared.py.
"""

from __future__ import annotations

import math

import pytest
import trio

from hivemind_trio.config import Config, SchedulerConfig
from hivemind_trio.state.shared import SharedUnavailable
from hivemind_trio.runtime.scheduler import QueueTimeout, Scheduler

from .test_scheduler import ANTHROPIC, ROUTE, info, max_in_window, with_window


class FakeShared:
    """The backend's contract, in trio time."""

    def __init__(self, *, lease_ttl: float = 30.0) -> None:
        self.instance = "fake"
        self.up = True
        self.lease_ttl = lease_ttl
        self.leases: dict[str, float] = {}
        self.log: list[tuple[float, str]] = []
        self.asked = 0
        self.released: list[str] = []
        self.uncounted: list[str] = []

    async def acquire(self, lane, lease, *, window, rpm, tpm, tokens, rate_window, check_rate, check_breaker):
        self.asked += 1
        await trio.sleep(0.001)  # a round trip
        if not self.up:
            raise SharedUnavailable("down")
        now = trio.current_time()
        self.leases = {k: v for k, v in self.leases.items() if v > now}
        self.log = [(t, m) for t, m in self.log if t > now - rate_window]
        wait = 0.0
        if window and len(self.leases) >= window:
            wait = max(wait, min(0.05, min(self.leases.values()) - now))
        if check_rate and rpm and len(self.log) + 1 > rpm:
            wait = max(wait, self.log[len(self.log) - int(rpm)][0] + rate_window - now)
        if wait > 0:
            return wait, math.nan
        self.leases[lease] = now + self.lease_ttl
        self.log.append((now, f"{lease}|{tokens}"))
        return 0.0, now

    def release(self, lane, lease, *, member=None):
        self.leases.pop(lease, None)
        self.released.append(lease)
        if member is not None:
            self.uncounted.append(member)
            self.log = [(t, m) for t, m in self.log if m != member]

    def settle(self, *a, **kw):
        pass

    def pause(self, *a):
        pass

    def learned(self, *a):
        pass

    def trip(self, *a):
        pass

    def close_breaker(self, *a):
        pass


def instance(fake: FakeShared, name: str, **scheduler) -> Scheduler:
    sched = Scheduler(Config(scheduler=SchedulerConfig(**scheduler)), seed=1)
    fake_for_instance = FakeSharedView(fake, name)
    sched.shared = fake_for_instance  # type: ignore[assignment]
    return sched


class FakeSharedView:
    """One instance's handle on the shared fake (its own instance name)."""

    def __init__(self, fake: FakeShared, name: str) -> None:
        self._fake = fake
        self.instance = name

    def __getattr__(self, name):
        return getattr(self._fake, name)


async def test_two_instances_share_one_rpm_in_trio_time(autojump_clock) -> None:
    fake = FakeShared()
    rpm = 10
    admitted: list[float] = []
    async with trio.open_nursery() as nursery:
        lanes = []
        for name in ("a", "b"):
            sched = instance(fake, name)
            sched.attach(nursery)
            lanes.append((sched, sched.lane_for(ROUTE, ANTHROPIC, "cred", rpm=rpm)))

        async def one(sched, lane) -> None:
            t = sched.new_ticket(info(), lane)
            await lane.wait_turn(t)
            admitted.append(trio.current_time())
            lane.on_response(t, 200, [])
            lane.release(t, ok=True)

        async with trio.open_nursery() as agents:
            for sched, lane in lanes:
                for _ in range(15):
                    agents.start_soon(one, sched, lane)
        nursery.cancel_scope.cancel()
    assert len(admitted) == 30
    # Each instance alone would allow 10 a minute; together they do too.
    assert max_in_window(admitted, 60.0) <= rpm
    assert sum(lane.shared_waits for _, lane in lanes) > 0


async def test_a_full_local_window_never_asks_the_shared_gate(autojump_clock) -> None:
    fake = FakeShared()
    async with trio.open_nursery() as nursery:
        sched = instance(fake, "a")
        sched.attach(nursery)
        lane = sched.lane_for(ROUTE, with_window(ANTHROPIC, 1, 1, 1), "cred")
        t = sched.new_ticket(info(), lane)
        waiter = sched.new_ticket(info(deadline=trio.current_time() + 5), lane)
        await lane.wait_turn(t)
        assert t.lease and list(fake.leases) == [t.lease]

        async def wait_and_give_up() -> None:
            with pytest.raises(QueueTimeout):
                await lane.wait_turn(waiter)

        nursery.start_soon(wait_and_give_up)
        await trio.sleep(10)  # the waiter's 5 s deadline passes; the local window is full all along
        assert not waiter.granted
        assert fake.asked == 1  # a full local window never reaches the shared gate
        lane.release(t, ok=True)
        assert fake.leases == {}
        nursery.cancel_scope.cancel()


async def test_a_lease_granted_after_its_ticket_gave_up_goes_back(autojump_clock) -> None:
    fake = FakeShared()
    granted = fake.acquire

    async def slow(*a, **kw):
        await trio.sleep(1.0)  # a slow round trip: the request's deadline passes meanwhile
        return await granted(*a, **kw)

    fake.acquire = slow  # type: ignore[method-assign]
    async with trio.open_nursery() as nursery:
        sched = instance(fake, "a")
        sched.attach(nursery)
        lane = sched.lane_for(ROUTE, ANTHROPIC, "cred")
        t = sched.new_ticket(info(deadline=trio.current_time() + 0.5), lane)
        with pytest.raises(QueueTimeout):
            await lane.wait_turn(t)
        assert not t.granted
        await trio.sleep(2.0)
        assert fake.leases == {}  # granted to nobody: given back with its log entry
        assert len(fake.released) == 1 and len(fake.uncounted) == 1 and fake.log == []
        nursery.cancel_scope.cancel()


async def test_unreachable_backend_means_local_gates_only(autojump_clock) -> None:
    fake = FakeShared()
    fake.up = False  # a call already in flight fails; new ones are not even tried
    async with trio.open_nursery() as nursery:
        sched = instance(fake, "a")
        sched.attach(nursery)
        lane = sched.lane_for(ROUTE, ANTHROPIC, "cred")
        for _ in range(3):
            t = sched.new_ticket(info(), lane)
            await lane.wait_turn(t)
            assert t.granted and t.lease == ""  # admitted on local state
            lane.release(t, ok=True)
        assert fake.asked == 0
        nursery.cancel_scope.cancel()


async def test_a_backend_failing_mid_call_admits_locally(autojump_clock) -> None:
    fake = FakeShared()

    async def failing(*a, **kw):
        fake.asked += 1
        await trio.sleep(0.001)
        raise SharedUnavailable("reset")

    fake.acquire = failing  # type: ignore[method-assign]
    async with trio.open_nursery() as nursery:
        sched = instance(fake, "a")
        sched.attach(nursery)
        lane = sched.lane_for(ROUTE, ANTHROPIC, "cred")
        t = sched.new_ticket(info(), lane)
        await lane.wait_turn(t)
        assert t.granted and t.lease == "" and fake.asked == 1
        nursery.cancel_scope.cancel()
