"""Circuit breaker (SPEC §5.4), sans-io.

Theory of operation
-------------------
Three states, and the only legal moves between them are the rows of
:data:`TRANSITIONS` (the same idea as h11's ``_state.py``: the machine is data,
and a move that is not in the table is a bug that raises
:class:`BreakerStateError` instead of silently corrupting state)::

    CLOSED    --trip-------------> OPEN
    OPEN      --cooldown_elapsed-> HALF_OPEN
    HALF_OPEN --probe_succeeded--> CLOSED
    HALF_OPEN --probe_failed-----> OPEN

*Closed*: outcomes are counted in one-second buckets over the last
``window`` seconds.  The breaker trips when ``consecutive_failures`` failures
arrive in a row, or when the window holds at least ``min_volume`` outcomes of
which at least ``failure_ratio`` failed.

*Open*: nothing is admitted until ``open_until``.  The cool-down is
``base_cooldown × 2^(streak-1)`` capped at ``max_cooldown``, and never shorter
than the ``retry-after`` the failure carried.  ``streak`` counts trips that
follow each other closely: it grows on every trip and is forgotten once the
breaker has stayed closed for ``max_cooldown`` seconds.  Late failures from
attempts admitted before the trip may extend ``open_until`` with their own
``retry-after`` but change nothing else.

*Half-open*: the first :meth:`CircuitBreaker.allow` after the cool-down moves
to half-open and admits exactly one probe; every other caller is refused until
the probe reports.  Its success closes the breaker (counters cleared), its
failure reopens it with the next, longer cool-down.  An attempt that ends
with no verdict (cancelled, client gone) must call
:meth:`CircuitBreaker.record_cancelled` so the probe slot is not lost.

In half-open the first outcome reported is taken as the probe's: attempts
still waiting for headers when the breaker opened are cancelled by the runtime
(SPEC §5.4), so a straggler reporting in half-open is rare and harmless.
"""

from __future__ import annotations

import enum
import math
from typing import Any

import attrs

__all__ = [
    "BreakerState",
    "BreakerEvent",
    "TRANSITIONS",
    "BreakerStateError",
    "BreakerData",
    "BreakerStatistics",
    "CircuitBreaker",
]


class BreakerState(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class BreakerEvent(enum.Enum):
    TRIP = "trip"
    COOLDOWN_ELAPSED = "cooldown_elapsed"
    PROBE_SUCCEEDED = "probe_succeeded"
    PROBE_FAILED = "probe_failed"


TRANSITIONS: dict[tuple[BreakerState, BreakerEvent], BreakerState] = {
    (BreakerState.CLOSED, BreakerEvent.TRIP): BreakerState.OPEN,
    (BreakerState.OPEN, BreakerEvent.COOLDOWN_ELAPSED): BreakerState.HALF_OPEN,
    (BreakerState.HALF_OPEN, BreakerEvent.PROBE_SUCCEEDED): BreakerState.CLOSED,
    (BreakerState.HALF_OPEN, BreakerEvent.PROBE_FAILED): BreakerState.OPEN,
}


class BreakerStateError(RuntimeError):
    """An illegal transition was attempted: a bug in the breaker, never user input."""


def _positive(_inst: Any, attribute: attrs.Attribute[Any], value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{attribute.name} must be a positive number, got {value!r}")


def _count(_inst: Any, attribute: attrs.Attribute[Any], value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{attribute.name} must be an integer >= 1, got {value!r}")


def _ratio(_inst: Any, attribute: attrs.Attribute[Any], value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise ValueError(f"{attribute.name} must be in (0, 1], got {value!r}")


@attrs.define
class BreakerData:
    """Plain, serialisable state of one breaker."""

    state: BreakerState = BreakerState.CLOSED
    # [bucket second, successes, failures], oldest first.
    buckets: list[list[int]] = attrs.field(factory=list)
    consecutive_failures: int = 0
    open_until: float = -math.inf
    cooldown: float = 0.0
    streak: int = 0
    closed_at: float = -math.inf
    probe_in_flight: bool = False
    trips: int = 0
    transitions: list[tuple[str, str, str, float]] = attrs.field(factory=list)
    refused: int = 0


@attrs.frozen
class BreakerStatistics:
    state: BreakerState
    consecutive_failures: int
    window_successes: int
    window_failures: int
    open_until: float | None
    cooldown: float
    trips: int
    probe_in_flight: bool
    refused: int


# Transition history kept for status/debugging; bounded so state stays small.
_HISTORY = 32


@attrs.define
class CircuitBreaker:
    """Closed / open / half-open breaker of one lane."""

    consecutive_failures: int = attrs.field(default=5, validator=_count)
    failure_ratio: float = attrs.field(default=0.5, validator=_ratio)
    min_volume: int = attrs.field(default=10, validator=_count)
    window: float = attrs.field(default=30.0, validator=_positive)
    base_cooldown: float = attrs.field(default=5.0, validator=_positive)
    max_cooldown: float = attrs.field(default=120.0, validator=_positive)
    data: BreakerData = attrs.field(factory=BreakerData)

    def __attrs_post_init__(self) -> None:
        if self.base_cooldown > self.max_cooldown:
            raise ValueError(
                f"base_cooldown must be <= max_cooldown, got base_cooldown={self.base_cooldown!r} "
                f"max_cooldown={self.max_cooldown!r}"
            )

    @property
    def state(self) -> BreakerState:
        return self.data.state

    # -- the machine ---------------------------------------------------------

    def _transition(self, event: BreakerEvent, now: float) -> None:
        d = self.data
        try:
            new = TRANSITIONS[(d.state, event)]
        except KeyError:
            raise BreakerStateError(f"can't handle event {event.value} in state {d.state.value}") from None
        d.transitions.append((d.state.value, event.value, new.value, now))
        del d.transitions[:-_HISTORY]
        d.state = new

    def _open(self, now: float, retry_after: float | None, event: BreakerEvent) -> None:
        d = self.data
        d.streak += 1
        d.trips += 1
        cooldown = min(self.max_cooldown, self.base_cooldown * 2.0 ** min(d.streak - 1, 60))
        if retry_after is not None and math.isfinite(retry_after) and retry_after > cooldown:
            cooldown = retry_after
        d.cooldown = cooldown
        d.open_until = now + cooldown
        d.probe_in_flight = False
        self._transition(event, now)

    def _close(self, now: float) -> None:
        d = self.data
        self._transition(BreakerEvent.PROBE_SUCCEEDED, now)
        d.buckets.clear()
        d.consecutive_failures = 0
        d.probe_in_flight = False
        d.closed_at = now
        d.open_until = -math.inf

    # -- the window ------------------------------------------------------------

    def _prune(self, now: float) -> None:
        horizon = math.floor(now) - math.ceil(self.window)
        b = self.data.buckets
        cut = 0
        while cut < len(b) and b[cut][0] <= horizon:
            cut += 1
        if cut:
            del b[:cut]

    def _count(self, now: float, ok: bool) -> None:
        sec = math.floor(now)
        b = self.data.buckets
        if b and b[-1][0] >= sec:
            # Out-of-order timestamps land in the newest bucket; close enough.
            bucket = b[-1]
        else:
            bucket = [sec, 0, 0]
            b.append(bucket)
        bucket[1 if ok else 2] += 1
        self._prune(now)

    def _window_counts(self) -> tuple[int, int]:
        ok = sum(x[1] for x in self.data.buckets)
        bad = sum(x[2] for x in self.data.buckets)
        return ok, bad

    # -- admission -------------------------------------------------------------

    def allow(self, now: float) -> bool:
        """May an attempt start now?  In half-open, True exactly once per probe."""
        d = self.data
        if d.state is BreakerState.CLOSED:
            return True
        if d.state is BreakerState.OPEN:
            if now < d.open_until:
                d.refused += 1
                return False
            self._transition(BreakerEvent.COOLDOWN_ELAPSED, now)
        # Half-open.
        if d.probe_in_flight:
            d.refused += 1
            return False
        d.probe_in_flight = True
        return True

    def next_allowed_at(self, now: float) -> float | None:
        """When ``allow`` could next say yes: ``now``, a time, or None (waiting for a probe)."""
        d = self.data
        if d.state is BreakerState.CLOSED:
            return now
        if d.state is BreakerState.OPEN:
            return max(now, d.open_until)
        return None if d.probe_in_flight else now

    # -- outcomes --------------------------------------------------------------

    def record_success(self, now: float) -> None:
        d = self.data
        if d.state is BreakerState.HALF_OPEN:
            self._close(now)
            return
        if d.state is BreakerState.OPEN:
            # A straggler admitted before the trip: the cool-down stands.
            return
        d.consecutive_failures = 0
        if d.streak and now - d.closed_at >= self.max_cooldown:
            d.streak = 0
        self._count(now, True)

    def record_failure(self, now: float, retry_after: float | None = None) -> None:
        d = self.data
        if d.state is BreakerState.HALF_OPEN:
            self._open(now, retry_after, BreakerEvent.PROBE_FAILED)
            return
        if d.state is BreakerState.OPEN:
            if retry_after is not None and math.isfinite(retry_after) and retry_after > 0:
                d.open_until = max(d.open_until, now + retry_after)
            return
        d.consecutive_failures += 1
        self._count(now, False)
        ok, bad = self._window_counts()
        total = ok + bad
        if d.consecutive_failures >= self.consecutive_failures or (
            total >= self.min_volume and bad >= self.failure_ratio * total
        ):
            if d.streak and now - d.closed_at >= self.max_cooldown:
                d.streak = 0
            self._open(now, retry_after, BreakerEvent.TRIP)

    def record_cancelled(self, now: float) -> None:
        """An admitted attempt ended with no verdict: free the probe slot if it held it."""
        d = self.data
        if d.state is BreakerState.HALF_OPEN:
            d.probe_in_flight = False

    def statistics(self, now: float | None = None) -> BreakerStatistics:
        d = self.data
        if now is not None:
            self._prune(now)
        ok, bad = self._window_counts()
        return BreakerStatistics(
            state=d.state,
            consecutive_failures=d.consecutive_failures,
            window_successes=ok,
            window_failures=bad,
            open_until=d.open_until if d.state is BreakerState.OPEN else None,
            cooldown=d.cooldown,
            trips=d.trips,
            probe_in_flight=d.probe_in_flight,
            refused=d.refused,
        )
