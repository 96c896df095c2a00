"""The Trio shell around the sans-io scheduling core: lanes, admission, outcomes.

Theory of operation
-------------------
A *lane* is what shares one rate limit: (upstream, credential fingerprint).
Each lane owns one of each core object (rate-limit tracker, AIMD window,
circuit breaker, retry budget, fair queue) and one *dispatcher* task.

A request that wants to go upstream takes a :class:`Ticket` and calls
:meth:`Lane.wait_turn`: the ticket is pushed into the lane's fair queue and the
request's task parks on the ticket's event, inside a cancel scope whose
deadline is the request's (queue timeout or the client's own).

The dispatcher is the only place that grants.  ``_dispatch(now)`` is a plain
synchronous step (nowait-first, like Trio's own ``*_nowait`` methods): it
takes the next ticket in queue order and admits it only if every gate is
open — a free slot in the window (a ``trio.CapacityLimiter`` whose
``total_tokens`` follows the AIMD window; the ticket itself is the borrower),
the breaker allows, and the rate-limit pacer has room before the next reset.
It returns the time at which a gate that is closed *by time* opens; gates
closed by events (a slot, a breaker probe) are reopened by :meth:`Lane.kick`.
The dispatcher task sleeps until the earlier of the two and steps again.  The
gates that do not depend on the ticket (window, breaker, pause, rpm, requests
bucket) are looked at before a ticket is chosen, so a request arriving while
the lane is closed still competes on priority.  A ticket chosen but held back
by pacing of its own size stays chosen (``_next``), so pacing cannot reorder
the queue.

An admitted ticket holds its slot until its upstream exchange ends (for a
stream: its last byte), then :meth:`Lane.release` frees it and feeds the
AIMD window.  Every upstream answer goes through :meth:`Lane.on_response` /
:meth:`Lane.on_failure`, which update the tracker (headers, retry-after
pauses, back-off), the window (overload signals) and the breaker.  When the
breaker trips, the cancel scopes of attempts still waiting for response
headers are cancelled; their requests go back into the queue as retries, so
nothing is duplicated downstream (no byte was relayed yet).

Everything here reads time from ``trio.current_time()``, so the autojump
clock runs minute-long windows in milliseconds in the tests.

Shared state (SPEC §7.5, :mod:`hivemind_trio.state.shared`) adds one gate
and changes none: when every local gate is open, ``_dispatch`` hands the
ticket to :meth:`Lane.run` (``_want_shared``) instead of granting it, and the
dispatcher task awaits the Redis ``acquire`` (fleet-wide window of leases,
rpm/tpm log, pause, breaker).  Granted: the next ``_dispatch`` grants the
ticket with its lease, or hands the lease back if a local gate closed
meanwhile.  "Wait": the dispatcher sleeps that long or until kicked.  Redis
unreachable: the ticket goes on with the local gates alone.  So ``_dispatch``
stays synchronous and does no I/O; outcomes, releases and breaker trips are
published as fire-and-forget writes.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import random
import time
from collections import Counter as _Counter
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

import attrs
import trio

from ..config import AgentRule, Config, SchedulerConfig
from ..core import errors
from ..core import ratelimit as rl
from ..core.aimd import AimdWindow
from ..core.breaker import BreakerState, CircuitBreaker
from ..core.budget import Budget, BudgetLimit, Price, Refusal, Reservation
from ..core.identity import Identity, Priority
from ..core.queue import FairQueue
from ..core.retry import (
    DEFAULT_QUOTA_MARKERS,
    Action,
    Outcome,
    OutcomeKind,
    RetryBudget,
    RetryPolicy,
    is_breaker_failure,
    is_overload,
    parse_retry_count,
)
from ..core.usage import Usage
from ..profiles import Profile
from ..state.ledger import Ledger, default_ledger_path
from ..state.redis import parse_redis_url
from ..state.shared import SharedState, SharedUnavailable, lane_id
from .headers import get as _header

log = logging.getLogger("hivemind_trio.scheduler")

# Output tokens assumed for pacing before a lane has seen any real usage.
_DEFAULT_OUTPUT_GUESS = 256
# Seconds after its admission by which a request has surely reached the
# provider (which counts it against its window from then on).
_ARRIVAL_BOUND = 0.5
# A request body larger than this is not parsed for max_tokens / model.
_PEEK_LIMIT = 4 * 1024 * 1024


class QueueTimeout(Exception):
    """A request's deadline passed while it waited for admission (or the
    proxy is shutting down and will not admit it)."""

    def __init__(self, waited: float, retry_after: float, *, shutting_down: bool = False) -> None:
        super().__init__("the proxy is shutting down" if shutting_down else f"waited {waited:.1f} s for admission")
        self.waited = waited
        self.retry_after = retry_after
        self.shutting_down = shutting_down


class BreakerCancelled(Exception):
    """An attempt still waiting for headers was cancelled by a breaker trip."""


@attrs.define(eq=False)
class Ticket:
    """One request's place in its lane (one per attempt)."""

    id: int
    agent: str
    priority: int
    tokens: int  # estimate used for pacing and fair-queue cost
    deadline: float
    retry: bool = False
    event: trio.Event = attrs.field(factory=trio.Event)
    granted: bool = False
    done: bool = False
    # Set when the proxy shuts down: the waiter is woken and told to retry.
    refused: bool = False
    queued_at: float = 0.0
    granted_at: float | None = None
    # What the pacer charged, so a refused attempt can be refunded.
    charged: int = 0
    # The lane's *settled* counters when this ticket was admitted: the
    # attempts that had already had their answer, so the provider surely
    # counted them before this one.  Every other attempt of the lane (admitted
    # later, or admitted earlier but still on its way: parallel requests reach
    # the provider in any order) may be missing from this one's headers.
    mark_requests: int = 0
    mark_tokens: int = 0
    settled: bool = False
    # AIMD had no room left to shrink the window when this attempt went out
    # (or AIMD is off): an overload answer to it is then the breaker's business.
    at_floor: bool = True
    # Shared state (SPEC §7.5): None = the shared gate was not asked yet;
    # "" = go on locally (no shared state, or it is unreachable); else the
    # lease this ticket holds in Redis, granted at server time ``shared_at``.
    lease: str | None = None
    shared_at: float = 0.0


@attrs.frozen
class RequestInfo:
    """What the scheduler needs to know about a request before it goes out."""

    agent: str
    priority: int
    input_estimate: int
    max_tokens: int | None
    model: str | None
    deadline: float  # absolute, trio clock
    client_deadline: float | None
    client_retry_count: int


def peek_request(body: bytes) -> tuple[int | None, str | None]:
    """``(max_tokens, model)`` from a JSON body, or Nones.  Never raises.

    The body itself is never modified: this reads a copy.
    """
    if not body or len(body) > _PEEK_LIMIT or body.lstrip()[:1] != b"{":
        return None, None
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        return None, None
    if not isinstance(doc, dict):
        return None, None
    mt: Any = None
    for key in ("max_tokens", "max_completion_tokens", "max_output_tokens"):
        if key in doc:
            mt = doc[key]
            break
    else:
        opts = doc.get("options")
        if isinstance(opts, dict):
            mt = opts.get("num_predict")
    max_tokens = mt if isinstance(mt, int) and not isinstance(mt, bool) and mt > 0 else None
    model = doc.get("model")
    return max_tokens, model if isinstance(model, str) else None


# -------------------------------------------------------------------- statistics


@attrs.frozen
class LaneStatistics:
    key: str
    route: str
    profile: str
    window: int
    in_flight: int
    queued: int
    queue_by_priority: dict[str, int]
    breaker: str
    breaker_trips: int
    paused_for: float
    rate_limit: dict[str, dict[str, Any]]
    retries: int
    retry_budget: float
    upstream_429: int
    upstream_5xx: int
    resets: int
    admitted: int
    shared_waits: int


@attrs.define
class AgentStats:
    requests: int = 0
    in_flight: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    estimated_requests: int = 0
    retries: int = 0
    failures: int = 0
    queue_timeouts: int = 0
    budget_refusals: int = 0
    priority: str = "normal"
    by_status: _Counter = attrs.field(factory=_Counter)


_PRIORITY_NAMES = {0: "low", 1: "normal", 2: "high", 3: "critical"}


# -------------------------------------------------------------------- the lane


class Lane:
    """One (upstream, credential) pair: its limits, window, breaker and queue."""

    def __init__(self, key: str, route: str, profile: Profile, config: SchedulerConfig, *, rpm: int = 0, tpm: int = 0, rng: random.Random, emit: Callable[..., None] | None = None, shared: SharedState | None = None) -> None:
        self.key = key
        # The shared gate (SPEC §7.5), when instances share state.
        self.shared = shared
        self.shared_id = lane_id(key)
        self._want_shared: Ticket | None = None
        # Scheduler events (trips, pauses) for the log, status and dashboard.
        self.emit = emit or (lambda kind, **detail: None)
        self.route = route
        self.profile = profile
        self.config = config
        self.rng = rng
        lim = profile.limits
        rpm = rpm or lim.rpm
        tpm = tpm or lim.tpm
        self.tracker = rl.RateLimitTracker(rpm=rpm or None, tpm=tpm or None)
        self.window = AimdWindow(min=lim.window_min, initial=lim.window_initial, max=lim.window_max)
        self.limiter = trio.CapacityLimiter(self.window.limit)
        self.breaker = CircuitBreaker()
        self.retry_budget = RetryBudget(ratio=config.retry_budget)
        self.queue = FairQueue(aging_interval=config.aging_interval if config.priority else math.inf)
        self.policy = RetryPolicy(
            max_attempts=config.max_attempts,
            quota_markers=DEFAULT_QUOTA_MARKERS + tuple(profile.retry.quota_markers),
        )
        self.spec = _core_spec(profile)
        self._tickets: dict[int, Ticket] = {}
        # Admitted and not yet released (for the shared state's resync).
        self._granted: set[Ticket] = set()
        self._next: Ticket | None = None
        self._kick = trio.Event()
        self._waiting_headers: set[trio.CancelScope] = set()
        self.closing = False
        self.in_flight = 0
        self.output_guess = float(_DEFAULT_OUTPUT_GUESS)
        # Counters for status.
        self.admitted = 0
        self.admitted_tokens = 0
        # Admitted attempts that got an answer (or ended): see Ticket.mark_requests.
        self.settled = 0
        self.settled_tokens = 0
        self.retries = 0
        self.upstream_429 = 0
        self.upstream_5xx = 0
        self.resets = 0
        # Times the shared gate (SPEC §7.5) said "wait" although every local gate was open,
        # and until when it last said so (for the Retry-After of a request that gives up).
        self.shared_waits = 0
        self._shared_until = 0.0

    # -- waiting ------------------------------------------------------------

    def kick(self) -> None:
        """Something changed that may open a gate: let the dispatcher look again."""
        self._kick.set()

    async def run(self) -> None:
        """The dispatcher: grant tickets as gates open, sleep otherwise.

        With shared state, a ticket that passed every local gate is held by
        ``_dispatch`` (``_want_shared``) while this task asks Redis; the next
        ``_dispatch`` grants it with the lease, or, if a local gate closed
        meanwhile, the lease goes back.
        """
        while True:
            self._kick = trio.Event()
            wake_at = self._dispatch(trio.current_time())
            held = self._next
            if held is not None and held.lease and not held.granted:
                self._drop_lease(held)
            t = self._want_shared
            if t is not None:
                self._want_shared = None
                wait = await self._shared_acquire(t)
                if t.done and t.lease:
                    self._drop_lease(t)
                if wait > 0:
                    with trio.move_on_after(wait):
                        await self._kick.wait()
                continue
            with trio.move_on_at(wake_at):
                await self._kick.wait()

    async def _shared_acquire(self, t: Ticket) -> float:
        """Ask the shared gate for ``t``: 0 (``t.lease`` set) or seconds to wait."""
        assert self.shared is not None
        cfg = self.config
        try:
            wait, at = await self.shared.acquire(
                self.shared_id,
                f"{self.shared.instance}:{t.id}",
                window=self.limiter.total_tokens if cfg.admission else 0,
                rpm=(self.tracker.rpm or 0) if cfg.ratelimit else 0,
                tpm=(self.tracker.tpm or 0) if cfg.ratelimit else 0,
                tokens=t.tokens,
                rate_window=rl.WINDOW,
                check_rate=cfg.ratelimit,
                check_breaker=cfg.breaker,
            )
        except SharedUnavailable:
            t.lease = ""  # degraded: local gates only
            return 0.0
        if wait > 0:
            self.shared_waits += 1
            self._shared_until = trio.current_time() + wait
            return wait
        t.lease = f"{self.shared.instance}:{t.id}"
        t.shared_at = at
        return 0.0

    def unshared_in_flight(self) -> list[tuple[str, int, Callable[[float], None]]]:
        """Requests in flight that went out on local state (Redis was away):
        each gets a lease id now, and learns its shared admission time later."""
        assert self.shared is not None
        out = []
        for t in self._granted:
            if t.lease == "" and not t.done:
                t.lease = f"{self.shared.instance}:{t.id}"

                def adopted(at: float, t: Ticket = t) -> None:
                    t.shared_at = at

                out.append((t.lease, max(0, int(t.tokens)), adopted))
        return out

    def _member(self, t: Ticket) -> str:
        return f"{t.lease}|{max(0, int(t.tokens))}"

    def _drop_lease(self, t: Ticket) -> None:
        """A lease taken but not used: it and its log entry go back."""
        if self.shared is not None and t.lease:
            self.shared.release(self.shared_id, t.lease, member=self._member(t))
        t.lease = None

    def _pop(self, now: float) -> Ticket | None:
        while True:
            tid = self.queue.pop(now)
            if tid is None:
                return None
            t = self._tickets.pop(tid, None)
            if t is not None and not t.done:
                return t

    def _dispatch(self, now: float) -> float:
        cfg = self.config
        while True:
            # Gates that do not depend on the ticket are looked at before one
            # is chosen: a ticket chosen while the lane cannot admit anyway
            # would be fixed in front of more urgent requests that arrive
            # meanwhile.  Only pacing by the ticket's own size keeps it chosen.
            if cfg.admission and self.limiter.borrowed_tokens >= self.limiter.total_tokens:
                return math.inf
            if cfg.breaker:
                nxt = self.breaker.next_allowed_at(now)
                if nxt is None:
                    return math.inf  # a half-open probe is out; its outcome kicks
                if nxt > now:
                    return nxt
            t = self._next
            if t is None or t.done:
                self._next = None
                if not self.queue:
                    return math.inf
                if cfg.ratelimit:
                    # A pause, the rpm window, the requests bucket: the same for any ticket.
                    wait = self.tracker.wait_time(now, 0)
                    if wait > 0:
                        return now + wait
                t = self._next = self._pop(now)
                if t is None:
                    return math.inf
            if cfg.ratelimit:
                wait = self.tracker.wait_time(now, t.tokens)
                if wait > 0:
                    self.tracker.state.delayed += 1
                    return now + wait
            if t.lease is None:
                if self.shared is not None and self.shared.up:
                    # Every local gate is open: now the shared one (run() asks it).
                    self._want_shared = t
                    return now
                t.lease = ""
            if cfg.ratelimit:
                self.tracker.reserve(now, t.tokens)
                t.charged = t.tokens
            if cfg.breaker and not self.breaker.allow(now):
                if cfg.ratelimit:
                    self.tracker.refund(now, t.charged)
                    t.charged = 0
                return math.inf
            if cfg.admission:
                self.limiter.acquire_on_behalf_of_nowait(t)
            self._next = None
            t.granted = True
            t.granted_at = now
            self._granted.add(t)
            t.at_floor = not cfg.aimd or self.window.limit <= self.window.min
            self.in_flight += 1
            self.admitted += 1
            self.admitted_tokens += t.charged
            t.mark_requests = self.settled
            t.mark_tokens = self.settled_tokens
            t.event.set()

    async def wait_turn(self, t: Ticket) -> None:
        """Queue ``t`` and wait until it is admitted; raises :class:`QueueTimeout`."""
        now = trio.current_time()
        t.queued_at = now
        if self.closing:
            raise QueueTimeout(0.0, 1.0, shutting_down=True)
        self._tickets[t.id] = t
        self.queue.push(t.id, t.agent if self.config.priority else "", t.priority if self.config.priority else 1, t.tokens, now, retry=t.retry)
        self.kick()
        try:
            with trio.move_on_at(t.deadline):
                await t.event.wait()
        except BaseException:
            if t.granted:
                # Admitted and cancelled in the same breath: give the slot back.
                self.release(t, ok=None)
            raise
        finally:
            if not t.granted:
                t.done = True
                self._tickets.pop(t.id, None)
                self.queue.remove(t.id)
                if self._next is t:
                    self._next = None
                self.kick()
        if not t.granted:
            now = trio.current_time()
            raise QueueTimeout(now - t.queued_at, 1.0 if t.refused else self.suggested_retry_after(now), shutting_down=t.refused)

    def shut(self) -> None:
        """Admit nothing more: every queued request is woken and told to retry."""
        self.closing = True
        for t in list(self._tickets.values()):
            if not t.granted:
                t.refused = True
                t.event.set()
        if self._next is not None and not self._next.granted:
            self._next.refused = True
            self._next.event.set()

    def suggested_retry_after(self, now: float) -> float:
        """What to tell a client that could not be served: when trying again makes sense."""
        wait = self.tracker.wait_time(now, 0) if self.config.ratelimit else 0.0
        if self.config.breaker:
            nxt = self.breaker.next_allowed_at(now)
            if nxt is not None:
                wait = max(wait, nxt - now)
        # The fleet's gate (another instance's breaker trip, the shared rpm log).
        wait = max(wait, self._shared_until - now)
        return max(1.0, math.ceil(wait))

    # -- outcomes -----------------------------------------------------------

    def watch_headers(self, scope: trio.CancelScope) -> None:
        self._waiting_headers.add(scope)

    def unwatch_headers(self, scope: trio.CancelScope) -> None:
        self._waiting_headers.discard(scope)

    def on_response(self, t: Ticket, status: int, headers: Iterable[tuple[bytes, bytes]], body: bytes = b"") -> Outcome:
        """Headers (and, for errors, the body) of an attempt arrived."""
        now = trio.current_time()
        headers = list(headers)
        snapshot = self._snapshot(headers, now)
        should = _header(headers, b"x-should-retry")
        should_retry = None if should is None else should.strip().lower() == b"true"
        outcome = Outcome.http(status, retry_after=snapshot.retry_after, body=body, should_retry=should_retry)
        if self.config.ratelimit:
            paused_before = self.tracker.state.paused_until
            learned_before = self.tracker.state.learned_rpm
            # Unseen: every other attempt not settled when this one went out.
            # Counting only those admitted after it assumed the provider sees
            # requests in admission order; a burst admitted together races,
            # and the first to arrive upstream (the highest remaining) could
            # be read last and hand back slots the others had used.
            if status == 429:
                self.tracker.limit_hit()
            self.tracker.observe(
                snapshot,
                unseen_requests=self.admitted - 1 - t.mark_requests,
                unseen_tokens=self.admitted_tokens - t.charged - t.mark_tokens,
                sent_at=t.granted_at,
            )
            if t.granted_at is not None:
                if status in (429, 529):
                    # Refused, not served: providers do not count it against
                    # the window, so neither does the lane's own log.
                    self.tracker.uncount(t.granted_at, t.charged)
                else:
                    # Counted on arrival: by the time the headers came back,
                    # and within a network delay of the admission (a long
                    # time to first byte is generation, not transit).
                    self.tracker.recount(t.granted_at, min(now, t.granted_at + _ARRIVAL_BOUND), t.charged)
            if status == 429:
                if snapshot.retry_after is None:
                    delay = self.tracker.backoff_429(now, self.rng)
                    self.emit("backoff", lane=self.key, seconds=round(delay, 3), status=status)
                elif self.tracker.state.paused_until > paused_before:
                    self.emit("pause", lane=self.key, seconds=round(self.tracker.state.paused_until - now, 3), status=status)
            elif status < 400:
                self.tracker.record_success()
            if self.shared is not None and t.lease:
                if t.granted_at is not None and not t.settled:
                    self.shared.settle(self.shared_id, self._member(t), counted=status not in (429, 529),
                                       admitted_at=t.shared_at, bound=_ARRIVAL_BOUND)
                if self.tracker.state.paused_until > paused_before:
                    self.shared.pause(self.shared_id, self.tracker.state.paused_until - now)
                learned = self.tracker.state.learned_rpm
                if learned is not None and learned != learned_before:
                    self.shared.learned(self.shared_id, learned)
        if status == 429:
            self.upstream_429 += 1
        elif status >= 500:
            self.upstream_5xx += 1
        self._settle(t)
        ttfb = None if t.granted_at is None else now - t.granted_at
        self._account(t, outcome, now, ttfb=ttfb)
        return outcome

    def on_failure(self, t: Ticket, kind: OutcomeKind) -> Outcome:
        """An attempt failed at the transport level (or its stream broke)."""
        now = trio.current_time()
        if kind in (OutcomeKind.RESET, OutcomeKind.PROTOCOL_ERROR, OutcomeKind.STREAM_BROKEN_AFTER_BYTES):
            self.resets += 1
        outcome = Outcome.transport(kind)
        self._recount(t, now)
        self._settle(t)
        self._account(t, outcome, now)
        return outcome

    def _recount(self, t: Ticket, now: float) -> None:
        # An attempt that got no status (reset, cancelled) may still have been
        # counted upstream on arrival, which is later than its admission:
        # keep its slot on the books until then, never shorter.
        if self.config.ratelimit and t.granted_at is not None and not t.settled:
            self.tracker.recount(t.granted_at, min(now, t.granted_at + _ARRIVAL_BOUND), t.charged)
            if self.shared is not None and t.lease:
                self.shared.settle(self.shared_id, self._member(t), counted=True, admitted_at=t.shared_at, bound=_ARRIVAL_BOUND)

    def _settle(self, t: Ticket) -> None:
        if t.granted and not t.settled:
            t.settled = True
            self.settled += 1
            self.settled_tokens += t.charged

    def _account(self, t: Ticket, outcome: Outcome, now: float, *, ttfb: float | None = None) -> None:
        cfg = self.config
        if cfg.aimd:
            if is_overload(outcome):
                if self.window.on_overload(now, outcome.kind.value, started_at=t.granted_at):
                    self._resize()
            elif ttfb is not None and outcome.kind is OutcomeKind.OK:
                if self.window.observe_ttfb(now, ttfb, t.granted_at):
                    self._resize()
        if cfg.breaker:
            before = self.breaker.state
            if (outcome.status == 529 and not t.at_floor and before is BreakerState.CLOSED):
                # Overloaded while AIMD can still shrink the window: the
                # window's signal, not an outage.  A burst sent before the
                # capacity was known (the first moments of a lane) would
                # otherwise trip the breaker and stall every agent for its
                # cool-down.  Once the window is at its floor, 529s count.
                pass
            elif is_breaker_failure(outcome):
                self.breaker.record_failure(now, outcome.retry_after)
            elif outcome.kind is OutcomeKind.OK:
                self.breaker.record_success(now)
            else:
                # A 4xx or a 429: the upstream is up.  In half-open that
                # settles the probe as a success.
                self.breaker.record_success(now)
            after = self.breaker.state
            if after is BreakerState.OPEN and before is not BreakerState.OPEN:
                log.warning("breaker of lane %s opened after %s", self.key, _describe(outcome))
                self.emit("breaker_open", lane=self.key, after=_describe(outcome),
                          cooldown=round(self.breaker.statistics(now).cooldown, 3))
                for scope in list(self._waiting_headers):
                    scope.cancel()
                if self.shared is not None:
                    nxt = self.breaker.next_allowed_at(now)
                    self.shared.trip(self.shared_id, (nxt - now) if nxt is not None else self.breaker.statistics(now).cooldown)
            if after is not before:
                if after is BreakerState.CLOSED:
                    self.emit("breaker_closed", lane=self.key)
                    if self.shared is not None:
                        self.shared.close_breaker(self.shared_id)
                self.kick()

    def on_cancelled(self, t: Ticket) -> None:
        """The attempt ended with no verdict (client gone, breaker cancel)."""
        self._recount(t, trio.current_time())
        if self.config.breaker:
            self.breaker.record_cancelled(trio.current_time())
            self.kick()

    def release(self, t: Ticket, *, ok: bool | None, latency: float | None = None, output_tokens: int | None = None) -> None:
        """The attempt's upstream exchange is over: free its slot."""
        if not t.granted or t.done:
            return
        t.done = True
        self._granted.discard(t)
        self._settle(t)
        now = trio.current_time()
        in_flight = self.in_flight
        self.in_flight -= 1
        if self.config.admission:
            self.limiter.release_on_behalf_of(t)
        if self.shared is not None and t.lease:
            self.shared.release(self.shared_id, t.lease)
        if ok and self.config.aimd:
            before = self.window.limit
            self.window.on_success(now, in_flight, latency=latency, started_at=t.granted_at)
            if self.window.limit != before:
                self._resize()
        if output_tokens is not None and output_tokens >= 0:
            self.output_guess += 0.2 * (output_tokens - self.output_guess)
        self.kick()

    def _resize(self) -> None:
        if self.config.admission:
            self.limiter.total_tokens = self.window.limit

    def _snapshot(self, headers: list[tuple[bytes, bytes]], now: float) -> rl.RateLimitSnapshot:
        wall = time.time()
        if self.spec is not None:
            return rl.parse_headers(self.spec, headers, now, wall)
        retry_after = None
        for name in self.profile.ratelimit.retry_after:
            raw = _header(headers, name.encode())
            if raw is not None:
                retry_after = rl.parse_retry_after(name, raw.decode("latin-1"), wall)
                if retry_after is not None:
                    break
        return rl.RateLimitSnapshot(at=now, resources={}, retry_after=retry_after)

    # -- reading ------------------------------------------------------------

    def pacing_cost(self, input_estimate: int, max_tokens: int | None) -> int:
        out = self.output_guess if max_tokens is None else min(max_tokens, self.output_guess)
        return max(1, int(input_estimate + out))

    def statistics(self) -> LaneStatistics:
        now = trio.current_time()
        rs = self.tracker.statistics(now)
        rate: dict[str, dict[str, Any]] = {}
        if rs.rpm is not None:
            rate["configured_rpm"] = {"limit": rs.rpm, "remaining": max(0, int(rs.rpm) - rs.requests_in_window), "reset_in": None}
        if rs.tpm is not None:
            rate["configured_tpm"] = {"limit": rs.tpm, "remaining": max(0, int(rs.tpm) - rs.tokens_in_window), "reset_in": None}
        for name, res in rs.resources.items():
            rate[name] = {
                "limit": res.limit,
                "remaining": None if res.remaining is None else int(res.remaining),
                "reset_in": None if res.reset_at is None else round(max(0.0, res.reset_at - now), 3),
            }
        depth = dict(self.queue.depth_by_priority())
        held = self._next
        if held is not None and not held.done and not held.granted:
            # Chosen by the dispatcher, waiting for a gate: still queued.
            p = held.priority if self.config.priority else 1
            depth[p] = depth.get(p, 0) + 1
        return LaneStatistics(
            key=self.key,
            route=self.route,
            profile=self.profile.name,
            window=self.window.limit,
            in_flight=self.in_flight,
            queued=sum(depth.values()),
            queue_by_priority={_PRIORITY_NAMES[p]: n for p, n in sorted(depth.items(), reverse=True)},
            breaker=self.breaker.state.value,
            breaker_trips=self.breaker.statistics(now).trips,
            paused_for=round(max(0.0, rs.paused_until - now), 3),
            rate_limit=rate,
            retries=self.retries,
            retry_budget=round(self.retry_budget.statistics().balance, 3),
            upstream_429=self.upstream_429,
            upstream_5xx=self.upstream_5xx,
            resets=self.resets,
            admitted=self.admitted,
            shared_waits=self.shared_waits,
        )


# -------------------------------------------------------------------- the scheduler


class Scheduler:
    """All lanes and budgets of one proxy (or one :class:`SchedulingTransport`)."""

    def __init__(self, config: Config, *, seed: int | None = None) -> None:
        self.config = config
        self.sched = config.scheduler
        self.rng = random.Random(seed)
        self.lanes: dict[str, Lane] = {}
        self.agents: dict[str, AgentStats] = {}
        self.budget = Budget(
            limits=_budget_limits(config),
            prices={m: Price(p.input_per_mtok, p.output_per_mtok) for m, p in config.budget.prices.items()},
            warn_ratio=0.85,
        )
        self.ledger: Ledger | None = None
        if self.sched.budgets and self.budget.limits and config.budget.ledger != "off":
            self.ledger = Ledger(config.budget.ledger or default_ledger_path())
            loaded = self.ledger.load_into(self.budget)
            log.info("budget ledger %s: %d counters read", self.ledger.path, loaded)
        self._ids = itertools.count(1)
        self._nursery: trio.Nursery | None = None
        self._pending: list[Lane] = []
        self.closing = False
        self.closed = trio.Event()
        # Recent scheduler events, newest last (status, dashboard feed).
        self.events: deque[dict[str, Any]] = deque(maxlen=200)
        self._event_seq = itertools.count(1)
        # Shared state (SPEC §7.5); started by start_shared().
        self.shared: SharedState | None = SharedState(parse_redis_url(config.state), emit=self.emit) if config.state else None
        # Budget reservations the shared backend holds: id -> its member there.
        self._shared_reservations: dict[int, str] = {}
        if self.shared is not None:
            self.shared.in_flight_hook = lambda: [(lane.shared_id, lane.unshared_in_flight()) for lane in self.lanes.values()]

    # -- lifecycle ------------------------------------------------------------

    def attach(self, nursery: trio.Nursery) -> None:
        """Run lane dispatchers in ``nursery`` (the lifespan's or the embedder's)."""
        self._nursery = nursery
        for lane in self._pending:
            nursery.start_soon(lane.run)
        self._pending.clear()
        if self.ledger is not None:
            nursery.start_soon(self._flush_ledger)
        for lane in self._pending:
            nursery.start_soon(lane.run)
        self._pending.clear()

    async def start_shared(self, nursery: trio.Nursery) -> None:
        """Connect the shared state (if configured) and keep it connected in
        ``nursery``; returns once the first attempt is over, so the proxy
        starts in a known mode (shared, or local with a warning logged)."""
        if self.shared is not None and not self.shared.started:
            await nursery.start(self.shared.run)

    async def _flush_ledger(self) -> None:
        assert self.ledger is not None
        while True:
            await trio.sleep(1.0)
            if self.ledger.dirty:
                self.ledger.flush(self.budget)

    async def pause(self, delay: float) -> None:
        """A retry's back-off: cut short when the proxy shuts down (the retry
        then meets a closed queue and the client is told to come back)."""
        with trio.move_on_after(delay):
            await self.closed.wait()

    def shut(self) -> None:
        """Graceful shutdown (SPEC §8.4): queued requests get 503/529 + Retry-After
        at once; requests already upstream finish."""
        self.closing = True
        self.closed.set()
        for lane in self.lanes.values():
            lane.shut()

    def close(self) -> None:
        """Write what the ledger has not written yet (at shutdown)."""
        if self.ledger is not None:
            self.ledger.close(self.budget)
            self.ledger = None

    @property
    def attached(self) -> bool:
        return self._nursery is not None

    def _spawn(self, lane: Lane) -> None:
        if self._nursery is not None:
            self._nursery.start_soon(lane.run)
        else:
            # No nursery yet (a server that skipped the lifespan, or a
            # transport used outside ``async with``): a system task, which
            # ends with the Trio run and crashes it if it ever fails.
            trio.lowlevel.spawn_system_task(lane.run, name=f"hivemind lane {lane.key}")

    def lane_for(self, route: str, profile: Profile, credential: str, *, rpm: int = 0, tpm: int = 0) -> Lane:
        key = f"{route}:{credential or '-'}"
        lane = self.lanes.get(key)
        if lane is None:
            lane = Lane(key, route, profile, self.sched, rpm=rpm, tpm=tpm, rng=self.rng, emit=self.emit, shared=self.shared)
            lane.closing = self.closing
            self.lanes[key] = lane
            self._spawn(lane)
        return lane

    def emit(self, kind: str, **detail: Any) -> None:
        """Record a scheduler event (breaker trips, pauses, budget warnings...)."""
        event = {"seq": next(self._event_seq), "t": round(time.time(), 3), "kind": kind, **detail}
        self.events.append(event)
        log.info("event %s %s", kind, " ".join(f"{k}={v}" for k, v in detail.items()))

    def new_ticket(self, info: RequestInfo, lane: Lane, *, retry: bool = False) -> Ticket:
        return Ticket(
            id=next(self._ids),
            agent=info.agent,
            priority=info.priority,
            tokens=lane.pacing_cost(info.input_estimate, info.max_tokens),
            deadline=info.deadline,
            retry=retry,
        )

    def agent(self, name: str) -> AgentStats:
        stats = self.agents.get(name)
        if stats is None:
            stats = self.agents[name] = AgentStats()
        return stats

    # -- budgets ----------------------------------------------------------------

    async def reserve_or_refuse(self, info: RequestInfo, agent: AgentStats, lane: Lane) -> Reservation | None:
        """The budget step of every edge: a reservation (None: budgets are off),
        or :class:`errors.BudgetExhausted` (a 429 the client must not retry)."""
        # Without a budget limit there is nothing to share (usage totals stay per instance).
        fleet = self.shared is not None and self.shared.up and bool(self.budget.limits)
        res = await self.reserve_shared(info) if fleet else self.reserve(info)
        if isinstance(res, Refusal):
            agent.budget_refusals += 1
            log.warning("budget refused agent=%s: %s", info.agent, res.message)
            self.emit("budget_refused", agent=info.agent, lane=lane.key, period=res.period)
            raise errors.BudgetExhausted(res.message, headers=(("x-should-retry", "false"),))
        return res

    def reserve(self, info: RequestInfo) -> Reservation | Refusal | None:
        """Take the budget reservation for a request (None: budgets are off)."""
        if not self.sched.budgets:
            return None
        est_out = info.max_tokens if info.max_tokens is not None else _DEFAULT_OUTPUT_GUESS
        return self.budget.reserve(
            info.agent,
            info.input_estimate + est_out,
            time.time(),
            model=info.model,
            est_input=info.input_estimate,
            est_output=est_out,
        )

    async def reserve_shared(self, info: RequestInfo) -> Reservation | Refusal | None:
        """:meth:`reserve`, decided by the shared backend for the whole fleet;
        the local budget books the same reservation and mirrors the fleet's
        counters (what it goes on from if Redis goes away)."""
        assert self.shared is not None
        if not self.sched.budgets:
            return None
        est_out = info.max_tokens if info.max_tokens is not None else _DEFAULT_OUTPUT_GUESS
        est = info.input_estimate + est_out
        wall = time.time()
        keys, checks, usd = self.budget.plan(info.agent, est, wall, model=info.model, est_input=info.input_estimate, est_output=est_out)
        try:
            ok, rows, member = await self.shared.budget_reserve(list(keys), checks, est, usd, [_budget_ttl(k) for k in keys])
        except SharedUnavailable:
            return self.reserve(info)
        if not ok:
            idx, unit, used, reserved = rows
            limit = next(lim for i, u, lim in checks if i == idx and u == unit)
            # Mirror what the fleet spent, so status shows it here too.
            c = self.budget.state.counters.get(keys[idx])
            tokens = (used, reserved) if unit == "tokens" else ((c.used_tokens, c.reserved_tokens) if c else (0, 0))
            usd_ = (used, reserved) if unit == "usd" else ((c.used_usd, c.reserved_usd) if c else (0.0, 0.0))
            self.budget.adopt(keys[idx], int(tokens[0]), int(tokens[1]), usd_[0], usd_[1], c.requests if c else 0)
            return self.budget.refusal(info.agent, keys[idx], unit, limit, used, reserved, usd if unit == "usd" else est)
        for key, (u_t, r_t, u_u, r_u, req) in zip(keys, rows):
            self.budget.adopt(key, u_t, r_t - est, u_u, r_u - usd, req - 1)
        res = self.budget.reserve(info.agent, est, wall, model=info.model, est_input=info.input_estimate, est_output=est_out, check=False)
        assert isinstance(res, Reservation)
        self._shared_reservations[res.id] = member
        return res

    def settle(self, reservation: Reservation | None, usage: Usage | None) -> bool:
        """Replace a reservation by what was used; True if a budget is at its warning level."""
        if reservation is None:
            return False
        member = self._shared_reservations.pop(reservation.id, None)
        if usage is None:
            if self.budget.release(reservation) and member is not None and self.shared is not None:
                self.shared.budget_settle(list(reservation.keys), member, used_tokens=0, used_usd=0.0, requests=-1,
                                          ttls=[_budget_ttl(k) for k in reservation.keys])
            return False
        charge = self.budget.reconcile(reservation, usage.all_input_tokens, usage.output_tokens)
        if charge is not None and self.shared is not None and self.budget.limits:
            # A reservation made while Redis was away was never counted
            # there: its request and usage are added (now, or on recovery).
            self.shared.budget_settle(
                list(reservation.keys), member or "",
                used_tokens=charge.tokens, used_usd=charge.usd, requests=0 if member is not None else 1,
                ttls=[_budget_ttl(k) for k in reservation.keys],
            )
        if self.ledger is not None:
            self.ledger.mark(reservation.keys)
        return bool(charge is not None and charge.warning)

    def budget_left(self, agent: str) -> int | None:
        return self.budget.remaining_tokens(agent, time.time())

    # -- reading ----------------------------------------------------------------

    def state_statistics(self) -> dict[str, Any]:
        """The state backend: "memory" (this process only) or Redis and whether it is connected."""
        if self.shared is None:
            return {"backend": "memory", "connected": None}
        return attrs.asdict(self.shared.statistics())

    def statistics(self) -> dict[str, Any]:
        lanes = [attrs.asdict(lane.statistics()) for lane in self.lanes.values()]
        agents = {}
        for name, a in sorted(self.agents.items()):
            d = attrs.asdict(a)
            d["by_status"] = {str(k): v for k, v in sorted(a.by_status.items())}
            d["budget_left"] = self.budget_left(name) if self.sched.budgets else None
            agents[name] = d
        return {"lanes": lanes, "agents": agents}


# -------------------------------------------------------------------- shared by the edges
#
# The ASGI app and SchedulingTransport put requests through the same steps;
# these are the steps that do not depend on how bytes reach the client.


def priority_of(rules: Iterable[AgentRule], identity: Identity, own: dict[bytes, bytes], headers: list[tuple[bytes, bytes]]) -> Priority:
    """x-hivemind-priority, else the first matching agent rule, else normal (SPEC §4.3)."""
    explicit = Priority.parse(own.get(b"x-hivemind-priority"))
    if explicit is not None:
        return explicit
    ua = (_header(headers, b"user-agent") or b"").decode("latin-1")
    for rule in rules:
        if rule.matches(identity.agent, ua):
            return Priority.parse(rule.priority) or Priority.NORMAL
    return Priority.NORMAL


def request_info(config: SchedulerConfig, identity: Identity, priority: Priority, body: bytes, headers: list[tuple[bytes, bytes]]) -> RequestInfo:
    """What the scheduler needs to know about a request: estimates, deadlines, the client's retry count."""
    now = trio.current_time()
    max_tokens, model = peek_request(body)
    client_deadline = None
    for name in (b"x-stainless-timeout", b"x-stainless-read-timeout"):
        raw = _header(headers, name)
        if raw is None:
            continue
        try:
            secs = float(raw.decode("latin-1").strip())
        except ValueError:
            continue
        if math.isfinite(secs) and secs > 0:
            client_deadline = now + secs
            break
    queue_deadline = now + config.queue_timeout
    return RequestInfo(
        agent=identity.agent,
        priority=int(priority),
        input_estimate=max(1, len(body) // 4),
        max_tokens=max_tokens,
        model=model,
        deadline=queue_deadline if client_deadline is None else min(queue_deadline, client_deadline),
        client_deadline=client_deadline,
        client_retry_count=parse_retry_count(_header(headers, b"x-stainless-retry-count")),
    )


async def should_retry(scheduler: Scheduler, lane: Lane, info: RequestInfo, outcome: Outcome, attempts: int, agent: AgentStats) -> bool:
    """Decide on a failed attempt; sleeps the back-off when the answer is yes
    (cut short by a shutdown, see :meth:`Scheduler.pause`).

    ``attempts`` counts the failures that use up a request's allowance: a
    429 does not, since the lane itself already waits out its retry-after
    (the deadline and the lane's retry budget still bound those retries).
    """
    if not scheduler.sched.retry:
        return False
    now = trio.current_time()
    deadline = info.deadline if info.client_deadline is None else min(info.deadline, info.client_deadline)
    decision = lane.policy.decide(
        outcome, attempts, now, lane.rng,
        deadline=deadline, client_retry_count=info.client_retry_count, budget=lane.retry_budget,
    )
    if decision.action is not Action.RETRY:
        if decision.action is Action.GIVE_UP:
            log.warning("not retrying on lane %s: %s (%s)", lane.key, decision.reason, outcome.status or outcome.kind.value)
        return False
    lane.retries += 1
    agent.retries += 1
    await scheduler.pause(decision.delay)
    return True


def no_retry(headers: list[tuple[bytes, bytes]], attempts: int) -> list[tuple[bytes, bytes]]:
    """The final failure after retries: tell the SDK not to multiply attempts (SPEC §5.7)."""
    if attempts <= 1:
        return headers
    return [(k, v) for k, v in headers if k.lower() != b"x-should-retry"] + [(b"x-should-retry", b"false")]


def info_headers(enabled: bool, agent: str, queued: float, attempts: int, warn: bool = False) -> list[tuple[bytes, bytes]]:
    """The proxy's informational response headers (SPEC §3.8) and the budget warning."""
    out = []
    if enabled:
        out += [
            (b"x-hivemind-agent", agent.encode("utf-8", "replace")),
            (b"x-hivemind-queue-ms", str(round(queued * 1000)).encode()),
            (b"x-hivemind-attempts", str(attempts).encode()),
        ]
    if warn:
        out.append((b"x-hivemind-budget-warning", b"over 85% of a token budget is used"))
    return out


# -------------------------------------------------------------------- helpers


def _core_spec(profile: Profile) -> rl.RateLimitSpec | None:
    p = profile.ratelimit
    if not p.resources:
        return None
    return rl.RateLimitSpec(
        limit=p.limit,
        remaining=p.remaining,
        reset=p.reset,
        resources=p.resources,
        reset_format=p.reset_format,
        retry_after=p.retry_after,
    )


def _describe(outcome: Outcome) -> str:
    return str(outcome.status) if outcome.status is not None else outcome.kind.value


def _budget_ttl(key: str) -> int:
    """How long a shared budget counter outlives its period (renewed on use)."""
    pkey = key.split("|", 2)[1]
    if pkey == "run":
        return 7 * 86400  # the fleet's run: until it has been idle for a week
    return 2 * 3600 + 600 if "T" in pkey else 2 * 86400 + 600


def _budget_limits(config: Config) -> tuple[BudgetLimit, ...]:
    b = config.budget
    out = []
    if b.agent_tokens:
        out.append(BudgetLimit(period=b.period, tokens=b.agent_tokens, scope="agent"))
    if b.global_tokens:
        out.append(BudgetLimit(period=b.period, tokens=b.global_tokens, scope="global"))
    if b.agent_usd:
        out.append(BudgetLimit(period=b.period, usd=b.agent_usd, scope="agent"))
    if b.global_usd:
        out.append(BudgetLimit(period=b.period, usd=b.global_usd, scope="global"))
    return tuple(out)


__all__ = [
    "BreakerCancelled",
    "Lane",
    "QueueTimeout",
    "RequestInfo",
    "Scheduler",
    "Ticket",
    "info_headers",
    "no_retry",
    "peek_request",
    "priority_of",
    "request_info",
    "should_retry",
]
