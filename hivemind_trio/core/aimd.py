"""AIMD concurrency window (SPEC §5.3), sans-io.

Theory of operation
-------------------
The window is the number of requests a lane may have in flight upstream.  It is
kept as a float ``cwnd`` (as TCP does) and exposed as the integer
:attr:`AimdWindow.limit` = ``floor(cwnd)`` clamped to ``[min, max]``.

*Additive increase*: every success adds ``step / limit``, so a full window's
worth of successes adds ``step`` (default 1).  Only successes that happened
while the window was actually used count (``in_flight`` at completion at
least ``utilization`` of the limit): a lane running 3 requests under a window
of 50 has learnt nothing about whether 51 would be fine, and growing anyway
would leave a huge window to collapse the day demand arrives.

*Multiplicative decrease*: an overload signal (429, 529, 503, 502, connection
reset, or a time-to-first-byte far above its baseline) multiplies ``cwnd`` by
``decrease_factor``.  A burst of failures produced by one overfull window is
one congestion event, not many: a signal is ignored when the request started
before the last decrease (it was admitted under the old, already-punished
window) or, when the start time is unknown, when it arrives within one
RTT-ish interval (``max(min_decrease_interval, latency EWMA)``) of the last
decrease.  So the window halves once per round trip at most and never
collapses to ``min`` from one burst.

*TTFB baseline*: an exponentially weighted moving average of time to first
byte.  A sample above ``ttfb_factor × baseline`` (and by at least
``ttfb_min_excess`` seconds, so noise on a tiny baseline does not count) is an
overload signal.  Outliers are folded in clipped to the threshold so the
baseline can follow a genuine shift (longer prompts) without one slow response
dragging it up.
"""

from __future__ import annotations

import math
from typing import Any

import attrs

__all__ = ["OVERLOAD_REASONS", "AimdState", "AimdStatistics", "AimdWindow"]

# Reasons accepted by AimdWindow.on_overload, for statistics and logs.
OVERLOAD_REASONS = ("429", "529", "503", "502", "reset", "ttfb", "other")


def _positive(_inst: Any, attribute: attrs.Attribute[Any], value: float) -> None:
    if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{attribute.name} must be a positive number, got {value!r}")


def _non_negative(_inst: Any, attribute: attrs.Attribute[Any], value: float) -> None:
    if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{attribute.name} must be a non-negative number, got {value!r}")


def _fraction(_inst: Any, attribute: attrs.Attribute[Any], value: float) -> None:
    if not isinstance(value, (int, float)) or not 0 < value < 1:
        raise ValueError(f"{attribute.name} must be strictly between 0 and 1, got {value!r}")


def _unit_interval(_inst: Any, attribute: attrs.Attribute[Any], value: float) -> None:
    if not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise ValueError(f"{attribute.name} must be between 0 and 1, got {value!r}")


def _window_size(_inst: Any, attribute: attrs.Attribute[Any], value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{attribute.name} must be an integer >= 1, got {value!r}")


@attrs.define
class AimdState:
    """Plain, serialisable state of one window."""

    cwnd: float
    last_decrease_at: float = -math.inf
    ttfb_baseline: float | None = None
    ttfb_samples: int = 0
    latency_ewma: float | None = None
    increases: int = 0
    decreases: int = 0
    ignored_signals: int = 0
    successes: int = 0
    unused_successes: int = 0


@attrs.frozen
class AimdStatistics:
    limit: int
    cwnd: float
    min: int
    max: int
    increases: int
    decreases: int
    ignored_signals: int
    successes: int
    ttfb_baseline: float | None
    latency_ewma: float | None
    last_decrease_at: float


@attrs.define
class AimdWindow:
    """Additive-increase / multiplicative-decrease concurrency window of one lane."""

    min: int = attrs.field(default=1, validator=_window_size)
    initial: int = attrs.field(default=4, validator=_window_size)
    max: int = attrs.field(default=64, validator=_window_size)
    # Window growth per window's worth of successes.
    step: float = attrs.field(default=1.0, validator=_positive)
    decrease_factor: float = attrs.field(default=0.5, validator=_fraction)
    # A success counts for growth only with at least this share of the window in flight.
    utilization: float = attrs.field(default=0.75, validator=_unit_interval)
    # Floor of the "one decrease per round trip" interval (seconds).
    min_decrease_interval: float = attrs.field(default=1.0, validator=_non_negative)
    ttfb_factor: float = attrs.field(default=3.0, validator=_positive)
    ttfb_min_excess: float = attrs.field(default=1.0, validator=_non_negative)
    # TTFB samples needed before the baseline is trusted.
    ttfb_warmup: int = attrs.field(default=5, validator=_non_negative)
    ewma_alpha: float = attrs.field(default=0.2, validator=_fraction)
    state: AimdState = attrs.field(default=None)

    def __attrs_post_init__(self) -> None:
        if not self.min <= self.max:
            raise ValueError(f"min must be <= max, got min={self.min!r} max={self.max!r}")
        if not self.min <= self.initial <= self.max:
            raise ValueError(
                f"initial must be within [min, max] = [{self.min}, {self.max}], got {self.initial!r}"
            )
        if self.state is None:
            self.state = AimdState(cwnd=float(self.initial))

    # -- reading -------------------------------------------------------------

    @property
    def limit(self) -> int:
        """The window as an integer in [min, max]: what the CapacityLimiter is set to."""
        return max(self.min, min(self.max, math.floor(self.state.cwnd + 1e-9)))

    def decrease_interval(self) -> float:
        lat = self.state.latency_ewma
        return max(self.min_decrease_interval, lat if lat is not None else 0.0)

    def is_slow_ttfb(self, ttfb: float) -> bool:
        """Would this time to first byte count as an overload signal?"""
        st = self.state
        base = st.ttfb_baseline
        if base is None or st.ttfb_samples < self.ttfb_warmup:
            return False
        return ttfb > base * self.ttfb_factor and ttfb - base > self.ttfb_min_excess

    # -- events --------------------------------------------------------------

    def _clamp(self) -> None:
        st = self.state
        st.cwnd = max(float(self.min), min(float(self.max), st.cwnd))

    def _ewma(self, old: float | None, sample: float) -> float:
        return sample if old is None else old + self.ewma_alpha * (sample - old)

    def observe_ttfb(self, now: float, ttfb: float, started_at: float | None = None) -> bool:
        """Fold a time-to-first-byte sample into the baseline; a far outlier is a decrease signal.

        Returns True when the window was decreased.
        """
        if not math.isfinite(ttfb) or ttfb < 0:
            return False
        st = self.state
        slow = self.is_slow_ttfb(ttfb)
        base = st.ttfb_baseline
        sample = ttfb if base is None else min(ttfb, base * self.ttfb_factor)
        st.ttfb_baseline = self._ewma(base, sample)
        st.ttfb_samples += 1
        if slow:
            return self.on_overload(now, "ttfb", started_at=started_at)
        return False

    def on_success(
        self,
        now: float,
        in_flight: int,
        *,
        ttfb: float | None = None,
        latency: float | None = None,
        started_at: float | None = None,
    ) -> int:
        """A request completed fine.  ``in_flight`` counts this one too.  Returns the new limit.

        ``ttfb`` feeds the baseline (a far outlier still counts as overload even
        though the request itself succeeded); ``latency`` (whole request)
        feeds the RTT estimate used to space decreases.
        """
        st = self.state
        st.successes += 1
        if latency is not None and math.isfinite(latency) and latency >= 0:
            st.latency_ewma = self._ewma(st.latency_ewma, latency)
        if ttfb is not None and self.observe_ttfb(now, ttfb, started_at):
            return self.limit
        if in_flight >= max(1, math.ceil(self.limit * self.utilization)):
            before = self.limit
            # step / limit: exactly one window of successes adds one step.
            st.cwnd += self.step / before
            self._clamp()
            if self.limit > before:
                st.increases += 1
        else:
            st.unused_successes += 1
        return self.limit

    def on_overload(self, now: float, reason: str = "other", *, started_at: float | None = None) -> bool:
        """An overload signal.  Returns True if the window was decreased, False if
        the signal belonged to a congestion event already answered."""
        st = self.state
        if started_at is not None:
            if started_at <= st.last_decrease_at:
                st.ignored_signals += 1
                return False
        elif now - st.last_decrease_at < self.decrease_interval():
            st.ignored_signals += 1
            return False
        st.cwnd *= self.decrease_factor
        self._clamp()
        st.last_decrease_at = now
        st.decreases += 1
        return True

    def statistics(self) -> AimdStatistics:
        st = self.state
        return AimdStatistics(
            limit=self.limit,
            cwnd=st.cwnd,
            min=self.min,
            max=self.max,
            increases=st.increases,
            decreases=st.decreases,
            ignored_signals=st.ignored_signals,
            successes=st.successes,
            ttfb_baseline=st.ttfb_baseline,
            latency_ewma=st.latency_ewma,
            last_decrease_at=st.last_decrease_at,
        )
