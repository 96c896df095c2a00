"""Rate-limit header parsing and proactive pacing (SPEC §5.2), sans-io.

Theory of operation
-------------------
Providers publish their limits as buckets: for each *resource* (requests,
tokens, input-tokens, output-tokens) a ``limit``, the ``remaining`` amount and
a ``reset`` time at which the bucket is full again.  :func:`parse_headers`
turns one response's headers into a :class:`RateLimitSnapshot` (monotonic
times, never an exception: a header that is missing or nonsense is simply not
known).

:class:`RateLimitTracker` keeps, per resource, a *level*: the amount we believe
is still available.  A fresh snapshot overwrites it (the provider knows best).
Between snapshots the level is

* decremented locally by every admission (:meth:`RateLimitTracker.reserve`),
  so a burst of parallel requests does not all see the same stale
  ``remaining``;
* refilled.  Both Anthropic and OpenAI document a continuously replenished
  bucket whose ``reset`` is the time at which it is *full*, so by default the
  deficit observed in a snapshot (``limit - remaining``) is refilled linearly
  until ``reset`` (``refill="linear"``).  ``refill="reset"`` is the cautious
  model for fixed-window providers: nothing comes back until ``reset``, then
  the bucket is full.

A request needing ``n`` units of a resource is admitted when the level is at
least ``min(n, limit)`` (a request larger than the whole bucket is admitted
once the bucket is full rather than never).  Otherwise ``reserve`` returns how
long to wait for enough refill; nothing is charged, the caller waits and asks
again.

Configured limits (``rpm``/``tpm``) are enforced with a sliding-window log of
the last 60 s of admissions, which guarantees that *no* 60 s window holds more
than the limit (a token bucket of capacity ``rpm`` would allow up to twice that
across a window boundary).

Pauses: ``retry-after`` pauses this tracker (one lane) until a time; a 429
without ``retry-after`` backs off exponentially from ``backoff_base`` to
``backoff_max`` (never an invented fixed 60 s), and the streak is forgotten on
the next success.

The tracker's state is plain attrs data (:class:`RateLimitState`) so that a
shared backend can store it; all decisions are methods over that state.
"""

from __future__ import annotations

import bisect
import email.utils
import math
import re
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any, Protocol

import attrs

__all__ = [
    "ANTHROPIC_SPEC",
    "OPENAI_SPEC",
    "RESET_FORMATS",
    "MAX_HORIZON",
    "RateLimitSpec",
    "ResourceLimit",
    "RateLimitSnapshot",
    "ResourceState",
    "RateLimitState",
    "ResourceStatistics",
    "RateLimitStatistics",
    "RateLimitTracker",
    "parse_headers",
    "parse_go_duration",
    "parse_retry_after",
]

RESET_FORMATS = ("rfc3339", "duration", "seconds", "epoch")

# Any reset or retry-after further away than this is treated as nonsense: a
# rogue header must not park a lane for years.  Two days leaves room for daily
# request limits.
MAX_HORIZON = 2 * 86400.0

# Length of the window that configured rpm/tpm refer to.
WINDOW = 60.0

# When a snapshot gives remaining but no reset, assume the usual one-minute
# window rather than trusting a stale number forever.
_DEFAULT_RESET = WINDOW


def _is_template(_inst: Any, attribute: attrs.Attribute[Any], value: str) -> None:
    if not isinstance(value, str) or "{resource}" not in value:
        raise ValueError(f"{attribute.name} must be a header name template containing '{{resource}}', got {value!r}")


def _reset_format(_inst: Any, attribute: attrs.Attribute[Any], value: str) -> None:
    if value not in RESET_FORMATS:
        raise ValueError(f"{attribute.name} must be one of {RESET_FORMATS}, got {value!r}")


def _lower_tuple(value: Iterable[str]) -> tuple[str, ...]:
    return tuple(str(v).lower() for v in value)


def _non_empty(_inst: Any, attribute: attrs.Attribute[Any], value: tuple[str, ...]) -> None:
    if not value or any(not v for v in value):
        raise ValueError(f"{attribute.name} must be a non-empty tuple of non-empty names, got {value!r}")


@attrs.frozen
class RateLimitSpec:
    """Where a provider puts its rate-limit facts (from a profile)."""

    limit: str = attrs.field(converter=str.lower, validator=_is_template)
    remaining: str = attrs.field(converter=str.lower, validator=_is_template)
    reset: str = attrs.field(converter=str.lower, validator=_is_template)
    resources: tuple[str, ...] = attrs.field(converter=_lower_tuple, validator=_non_empty)
    reset_format: str = attrs.field(validator=_reset_format)
    # Checked in order; the first header that parses wins.
    retry_after: tuple[str, ...] = attrs.field(
        default=("retry-after-ms", "retry-after"), converter=_lower_tuple
    )


ANTHROPIC_SPEC = RateLimitSpec(
    limit="anthropic-ratelimit-{resource}-limit",
    remaining="anthropic-ratelimit-{resource}-remaining",
    reset="anthropic-ratelimit-{resource}-reset",
    resources=("requests", "tokens", "input-tokens", "output-tokens"),
    reset_format="rfc3339",
)

OPENAI_SPEC = RateLimitSpec(
    limit="x-ratelimit-limit-{resource}",
    remaining="x-ratelimit-remaining-{resource}",
    reset="x-ratelimit-reset-{resource}",
    resources=("requests", "tokens"),
    reset_format="duration",
)


@attrs.frozen
class ResourceLimit:
    """What one response said about one resource; ``None`` = not said (or nonsense)."""

    limit: int | None = None
    remaining: int | None = None
    # Monotonic time at which the bucket is full again.
    reset_at: float | None = None


@attrs.frozen
class RateLimitSnapshot:
    """Everything one response's headers said, in monotonic time."""

    at: float
    resources: Mapping[str, ResourceLimit] = attrs.field(factory=dict)
    # Seconds the provider asked us to wait, if it did.
    retry_after: float | None = None

    def get(self, resource: str) -> ResourceLimit | None:
        return self.resources.get(resource)

    @property
    def empty(self) -> bool:
        return not self.resources and self.retry_after is None


# --------------------------------------------------------------------------
# Header value parsers.  Each returns None for anything it does not understand.

_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
_DURATION_UNITS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,  # U+00B5 MICRO SIGN, what Go prints
    "μs": 1e-6,  # U+03BC GREEK SMALL LETTER MU, also accepted by Go
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}


def parse_go_duration(text: str) -> float | None:
    """Parse a Go ``time.Duration`` string (``1h2m3.5s``, ``6m0s``, ``12ms``) to seconds.

    A bare number is taken as seconds (some gateways drop the unit).  Negative
    durations are refused: a reset in the past carries no information.
    """
    s = text.strip()
    if not s:
        return None
    if s == "0":
        return 0.0
    try:
        bare = float(s)
    except ValueError:
        pass
    else:
        return bare if math.isfinite(bare) and bare >= 0 else None
    if s[0] == "+":
        s = s[1:]
    pos = 0
    total = 0.0
    while pos < len(s):
        m = _DURATION_PART.match(s, pos)
        if m is None:
            return None
        total += float(m.group(1)) * _DURATION_UNITS[m.group(2)]
        pos = m.end()
    if pos == 0 or not math.isfinite(total):
        return None
    return total


def _parse_number(text: str) -> float | None:
    try:
        value = float(text.strip())
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _parse_count(text: str) -> int | None:
    value = _parse_number(text)
    if value is None or value < 0:
        return None
    return int(value)


def _parse_rfc3339(text: str) -> float | None:
    s = text.strip()
    if not s:
        return None
    # fromisoformat in 3.11 handles 'Z' and fractional seconds of any length.
    try:
        dt = datetime.fromisoformat(s)
    except ValueError:
        return None
    if dt.tzinfo is None:
        # RFC 3339 requires an offset; a naive stamp is ambiguous, so ignore it.
        return None
    try:
        return dt.timestamp()
    except (OverflowError, OSError, ValueError):
        return None


def _parse_http_date(text: str) -> float | None:
    try:
        dt = email.utils.parsedate_to_datetime(text.strip())
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if dt is None:
        return None
    try:
        return dt.timestamp()
    except (OverflowError, OSError, ValueError):
        return None


def _reset_delay(fmt: str, text: str, wall_now: float) -> float | None:
    """Seconds from now until the bucket is full, or None if unknown."""
    if fmt == "duration":
        delay = parse_go_duration(text)
    elif fmt == "seconds":
        delay = _parse_number(text)
    elif fmt == "epoch":
        stamp = _parse_number(text)
        delay = None if stamp is None else stamp - wall_now
    else:
        stamp = _parse_rfc3339(text)
        delay = None if stamp is None else stamp - wall_now
    if delay is None or not math.isfinite(delay):
        return None
    if delay > MAX_HORIZON:
        return None
    # A reset slightly in the past (clock skew) means "already full".
    return max(0.0, delay)


def parse_retry_after(name: str, text: str, wall_now: float) -> float | None:
    """Seconds to wait from a ``retry-after-ms`` or ``retry-after`` value, or None."""
    if name.endswith("-ms"):
        ms = _parse_number(text)
        delay = None if ms is None else ms / 1000.0
    else:
        delay = _parse_number(text)
        if delay is None:
            stamp = _parse_http_date(text)
            delay = None if stamp is None else max(0.0, stamp - wall_now)
    if delay is None or delay < 0 or delay > MAX_HORIZON:
        return None
    return delay


class _HasItems(Protocol):
    def items(self) -> Iterable[tuple[Any, Any]]: ...


def _normalise(headers: _HasItems | Iterable[tuple[Any, Any]]) -> dict[str, str]:
    pairs = headers.items() if hasattr(headers, "items") else headers
    out: dict[str, str] = {}
    for key, value in pairs:  # type: ignore[union-attr]
        try:
            k = key.decode("latin-1") if isinstance(key, (bytes, bytearray)) else str(key)
            v = value.decode("latin-1") if isinstance(value, (bytes, bytearray)) else str(value)
        except Exception:  # pragma: no cover - str() of odd objects
            continue
        # First occurrence wins: a duplicated header is suspicious either way.
        out.setdefault(k.strip().lower(), v)
    return out


def parse_headers(
    spec: RateLimitSpec,
    headers: _HasItems | Iterable[tuple[Any, Any]],
    now: float,
    wall_now: float,
) -> RateLimitSnapshot:
    """Read one response's rate-limit headers.  Never raises on header content.

    ``headers`` is a mapping or an iterable of (name, value) pairs, str or
    bytes.  ``now`` is the monotonic time the headers arrived, ``wall_now`` the
    wall-clock time (seconds since the epoch) to interpret absolute stamps.
    """
    h = _normalise(headers)
    resources: dict[str, ResourceLimit] = {}
    for res in spec.resources:
        raw_limit = h.get(spec.limit.format(resource=res))
        raw_remaining = h.get(spec.remaining.format(resource=res))
        raw_reset = h.get(spec.reset.format(resource=res))
        limit = None if raw_limit is None else _parse_number(raw_limit)
        if limit is not None and limit < 1:
            # A limit below one request/token (".1", "0", "-1") is no usable
            # limit: the whole resource is unknown rather than a zero budget.
            # Azure answers -1 or 0 for "no limit configured"; its remaining
            # is meaningless then.
            continue
        remaining = None if raw_remaining is None else _parse_count(raw_remaining)
        delay = None if raw_reset is None else _reset_delay(spec.reset_format, raw_reset, wall_now)
        lim = None if limit is None else int(limit)
        if lim is not None and remaining is not None and remaining > lim:
            remaining = lim
        if lim is None and remaining is None and delay is None:
            continue
        resources[res] = ResourceLimit(
            limit=lim,
            remaining=remaining,
            reset_at=None if delay is None else now + delay,
        )
    retry_after = None
    for name in spec.retry_after:
        raw = h.get(name)
        if raw is None:
            continue
        retry_after = parse_retry_after(name, raw, wall_now)
        if retry_after is not None:
            break
    return RateLimitSnapshot(at=now, resources=resources, retry_after=retry_after)


# --------------------------------------------------------------------------
# The tracker.


def _positive_or_none(_inst: Any, attribute: attrs.Attribute[Any], value: float | None) -> None:
    if value is not None and (not math.isfinite(value) or value <= 0):
        raise ValueError(f"{attribute.name} must be a positive number or None, got {value!r}")


def _positive(_inst: Any, attribute: attrs.Attribute[Any], value: float) -> None:
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{attribute.name} must be a positive number, got {value!r}")


def _refill(_inst: Any, attribute: attrs.Attribute[Any], value: str) -> None:
    if value not in ("linear", "reset"):
        raise ValueError(f"{attribute.name} must be 'linear' or 'reset', got {value!r}")


@attrs.define
class ResourceState:
    """Our running estimate of one provider bucket."""

    limit: int | None
    level: float | None  # None: remaining unknown, never blocks
    level_at: float
    reset_at: float | None
    # Units per second flowing back (linear model); 0 for the reset model.
    rate: float = 0.0
    observed_at: float = 0.0


@attrs.define
class RateLimitState:
    """Plain, serialisable state of one lane's tracker."""

    resources: dict[str, ResourceState] = attrs.field(factory=dict)
    # Sliding-window log of admissions within the last WINDOW seconds: (t, tokens).
    log: list[tuple[float, int]] = attrs.field(factory=list)
    paused_until: float = 0.0
    consecutive_429: int = 0
    last_snapshot_at: float = -math.inf
    admitted: int = 0
    delayed: int = 0
    # Learned from the headers (see RateLimitTracker.observe): the provider's
    # request limit and the length of the window it counts them over.
    learned_rpm: int | None = None
    learned_window: float = 0.0
    # Set once a 429 came although the request limit was known: the provider
    # counts a sliding window, not the refilling bucket assumed until then.
    sliding: bool = False


@attrs.frozen
class ResourceStatistics:
    limit: int | None
    remaining: float | None
    reset_at: float | None


@attrs.frozen
class RateLimitStatistics:
    rpm: float | None
    tpm: float | None
    requests_in_window: int
    tokens_in_window: int
    paused_until: float
    consecutive_429: int
    admitted: int
    delayed: int
    resources: Mapping[str, ResourceStatistics]


def _cost_for(resource: str, tokens: int, input_tokens: int | None, output_tokens: int | None) -> int:
    if resource == "requests" or "request" in resource:
        return 1
    if resource == "input-tokens":
        return tokens if input_tokens is None else input_tokens
    if resource == "output-tokens":
        # Anthropic charges output as it is produced; an estimate only when given.
        return 0 if output_tokens is None else output_tokens
    return tokens


@attrs.define
class RateLimitTracker:
    """One lane's rate-limit knowledge and pacing decisions."""

    rpm: float | None = attrs.field(default=None, validator=_positive_or_none)
    tpm: float | None = attrs.field(default=None, validator=_positive_or_none)
    refill: str = attrs.field(default="linear", validator=_refill)
    backoff_base: float = attrs.field(default=1.0, validator=_positive)
    backoff_max: float = attrs.field(default=32.0, validator=_positive)
    state: RateLimitState = attrs.field(factory=RateLimitState)

    # -- knowledge ---------------------------------------------------------

    def observe(
        self,
        snapshot: RateLimitSnapshot,
        *,
        unseen_requests: int = 0,
        unseen_tokens: int = 0,
        sent_at: float | None = None,
    ) -> None:
        """Take in what a response said.  Older snapshots than the last one are ignored.

        ``unseen_requests`` / ``unseen_tokens``: what this lane admitted after
        the request that carried the snapshot went out.  The provider's
        ``remaining`` cannot include them yet, so they are taken off it;
        otherwise every response of a busy lane would hand back the slots its
        own requests in flight are about to use, and the lane would overshoot
        into 429s.  (Some of them may already have been counted upstream:
        subtracting them again errs on the safe side, and the next snapshot
        corrects it.)
        """
        st = self.state
        if snapshot.at < st.last_snapshot_at:
            # A long stream's headers arrive long before we read them; an
            # older picture must not overwrite a newer one.
            return
        st.last_snapshot_at = snapshot.at
        now = snapshot.at
        req = snapshot.resources.get("requests")
        if req is not None and req.limit is not None and req.reset_at is not None and sent_at is not None:
            # The request that carried this snapshot used a slot at about
            # ``sent_at``, and the bucket is full again by ``reset_at``: no
            # provider counts a request for longer than that.  The longest
            # such span seen (capped at a minute) is the window length.
            span = min(WINDOW, req.reset_at - sent_at)
            if span > st.learned_window:
                st.learned_window = span
            st.learned_rpm = req.limit
            # A per-minute bucket (what Anthropic and OpenAI document) is full
            # again ``deficit / limit`` of a minute after use.  A reset much
            # further away than that, with a small deficit, is a provider
            # that keeps each request on its books for a whole window.
            if req.remaining is not None and req.limit > 0:
                deficit = req.limit - req.remaining
                bucket_reset = deficit * WINDOW / req.limit
                if 0 < deficit <= max(1, req.limit // 3) and req.reset_at - now > 2 * bucket_reset + 1.0:
                    st.sliding = True
        for name, info in snapshot.resources.items():
            prev = st.resources.get(name)
            limit = info.limit if info.limit is not None else (prev.limit if prev else None)
            if info.remaining is None:
                if prev is not None:
                    prev.limit = limit
                    if info.reset_at is not None:
                        prev.reset_at = info.reset_at
                elif limit is not None:
                    st.resources[name] = ResourceState(
                        limit=limit, level=None, level_at=now, reset_at=info.reset_at, observed_at=now
                    )
                continue
            reset_at = info.reset_at if info.reset_at is not None else now + _DEFAULT_RESET
            rate = 0.0
            if self.refill == "linear" and limit is not None:
                deficit = limit - info.remaining
                if deficit > 0 and reset_at > now:
                    # The provider refills the deficit by reset: that is its rate.
                    rate = deficit / (reset_at - now)
                else:
                    # A full bucket says nothing about its rate; assume the
                    # usual per-minute bucket.
                    rate = limit / WINDOW
            if "request" in name:
                unseen = unseen_requests
            elif name == "output-tokens":
                unseen = 0
            else:
                unseen = unseen_tokens
            st.resources[name] = ResourceState(
                limit=limit,
                level=float(max(0, info.remaining - max(0, unseen))),
                level_at=now,
                reset_at=reset_at,
                rate=rate,
                observed_at=now,
            )
        if snapshot.retry_after is not None:
            self.pause_until(now + snapshot.retry_after)

    def pause_until(self, t: float) -> None:
        """Hold every admission of this lane until ``t`` (only ever extends)."""
        if math.isfinite(t) and t > self.state.paused_until:
            self.state.paused_until = t

    def backoff_429(self, now: float, rng: Any = None) -> float:
        """A 429 came without retry-after: pause exponentially longer; return the delay.

        With ``rng`` (anything with ``random()``) the delay is jittered into
        [d/2, d] so that several proxies do not return in lockstep.
        """
        st = self.state
        delay = min(self.backoff_max, self.backoff_base * (2.0 ** min(st.consecutive_429, 60)))
        if rng is not None:
            delay *= 0.5 + 0.5 * rng.random()
        st.consecutive_429 += 1
        self.pause_until(now + delay)
        return delay

    def record_success(self) -> None:
        """A request went through: forget the 429 back-off streak."""
        self.state.consecutive_429 = 0

    # -- decisions ---------------------------------------------------------

    def _advance(self, res: ResourceState, now: float) -> None:
        if res.level is None or now <= res.level_at:
            return
        if res.rate > 0:
            res.level += res.rate * (now - res.level_at)
            if res.limit is not None:
                res.level = min(res.level, float(res.limit))
        elif res.reset_at is not None and now >= res.reset_at:
            if res.limit is None:
                # Without a limit we cannot know how full the bucket is after
                # the reset: stop trusting the old remaining.
                res.level = None
            else:
                res.level = float(res.limit)
                # Fixed windows: the next reset is one window later.
                periods = math.floor((now - res.reset_at) / WINDOW) + 1
                res.reset_at += periods * WINDOW
        res.level_at = now

    @staticmethod
    def _resource_wait(res: ResourceState, need: float, now: float) -> float:
        if res.level is None:
            return 0.0
        if res.limit is not None:
            need = min(need, float(res.limit))
        # A billionth of a unit of slack: refill is float arithmetic, and a
        # caller that waited exactly the advised time must be admitted.
        if res.level + 1e-9 >= need:
            return 0.0
        if res.rate > 0:
            return (need - res.level) / res.rate
        if res.reset_at is None:  # pragma: no cover - observe always sets one
            return 0.0
        return max(0.0, res.reset_at - now)

    def _prune(self, now: float) -> None:
        # Exact comparison: ``_wait_until`` already rounds waits up so that a
        # caller coming back after the advised delay finds the entry gone,
        # while an entry is never dropped a hair before its window ends.
        log = self.state.log
        cut = 0
        edge = now - WINDOW
        while cut < len(log) and log[cut][0] <= edge:
            cut += 1
        if cut:
            del log[:cut]

    def _window_wait(self, now: float, limit: float, cost: float, tokens: bool, window: float | None = None) -> float:
        """Delay after which the sliding ``window`` has room for ``cost`` more."""
        # WINDOW is read at call time: tests shrink it to the mock's window.
        window = WINDOW if window is None else window
        log = self.state.log
        if window < WINDOW:
            edge = now - window
            log = [e for e in log if e[0] > edge]
        # A request larger than the whole window is admitted into an empty one.
        cost = min(cost, limit)
        used = sum(e[1] for e in log) if tokens else len(log)
        excess = used + cost - limit
        if excess <= 0:
            return 0.0
        # Room appears when enough of the oldest entries have left the window.
        for t, n in log:
            excess -= n if tokens else 1
            if excess <= 0:
                return _wait_until(now, t + window)
        return 0.0  # pragma: no cover - cost <= limit makes this unreachable

    def wait_time(
        self,
        now: float,
        tokens: int = 0,
        *,
        input_tokens: int | None = None,
        output_tokens: int | None = None,
    ) -> float:
        """How long until a request of ``tokens`` could be admitted (0 = now); charges nothing."""
        st = self.state
        self._prune(now)
        wait = max(0.0, st.paused_until - now)
        if self.rpm is not None:
            wait = max(wait, self._window_wait(now, self.rpm, 1, tokens=False))
        elif st.sliding and st.learned_rpm is not None and st.learned_window > 0:
            # The learned request limit as a sliding window of the learned
            # length: after a burst, a bucket's "remaining" trickles back
            # sooner than a sliding-window provider frees any slot.  Only
            # once the provider has shown it counts that way (a 429 the
            # bucket model did not expect): for a true bucket the log would
            # give up the bucket's burst allowance, up to a window per burst.
            wait = max(wait, self._window_wait(now, st.learned_rpm, 1, tokens=False, window=st.learned_window))
        if self.tpm is not None:
            wait = max(wait, self._window_wait(now, self.tpm, max(0, tokens), tokens=True))
        for name, res in st.resources.items():
            self._advance(res, now)
            need = _cost_for(name, max(0, tokens), input_tokens, output_tokens)
            if need > 0:
                wait = max(wait, self._resource_wait(res, need, now))
        return wait

    def reserve(
        self,
        now: float,
        tokens: int = 0,
        *,
        input_tokens: int | None = None,
        output_tokens: int | None = None,
    ) -> float:
        """Admit (return 0 and charge the local estimates) or return seconds to wait.

        A non-zero answer charges nothing: wait that long and call again.
        """
        wait = self.wait_time(now, tokens, input_tokens=input_tokens, output_tokens=output_tokens)
        st = self.state
        if wait > 0:
            st.delayed += 1
            return wait
        tokens = max(0, tokens)
        for name, res in st.resources.items():
            if res.level is not None:
                res.level = max(0.0, res.level - _cost_for(name, tokens, input_tokens, output_tokens))
        st.log.append((now, tokens))
        st.admitted += 1
        return 0.0

    def limit_hit(self) -> None:
        """A 429 came back.  If the request limit was already known, the
        provider does not refill the way the bucket model assumed: from now
        on the lane also keeps the learned limit as a sliding window."""
        if self.state.learned_rpm is not None and self.state.learned_window > 0:
            self.state.sliding = True

    def uncount(self, at: float, tokens: int = 0) -> bool:
        """Drop the window-log entry of an admission made at ``at`` that the
        provider refused without counting it (a 429 or 529).  False if none."""
        log = self.state.log
        tokens = max(0, tokens)
        for i in range(len(log) - 1, -1, -1):
            if log[i][0] == at and log[i][1] == tokens:
                del log[i]
                return True
        return False

    def recount(self, at: float, counted_by: float, tokens: int = 0) -> bool:
        """Move the log entry of an admission made at ``at`` to ``counted_by``:
        the provider counted the request somewhere between the two (on
        arrival), so its slot frees no earlier than ``counted_by`` + window.
        Keeping the admission time instead frees it a network delay too soon,
        and a lane that paces to the edge of the window meets 429s there."""
        log = self.state.log
        tokens = max(0, tokens)
        for i in range(len(log) - 1, -1, -1):
            if log[i][0] == at and log[i][1] == tokens:
                del log[i]
                bisect.insort(log, (max(at, counted_by), tokens))
                return True
        return False

    def refund(self, now: float, tokens: int = 0) -> None:
        """Give back a request's charge when it never reached the provider."""
        st = self.state
        for name, res in st.resources.items():
            if res.level is None:
                continue
            self._advance(res, now)
            cost = _cost_for(name, max(0, tokens), None, None)
            res.level += cost
            if res.limit is not None:
                res.level = min(res.level, float(res.limit))
        # Remove the most recent matching log entry (the refunded one).
        for i in range(len(st.log) - 1, -1, -1):
            if st.log[i][1] == max(0, tokens):
                del st.log[i]
                break

    def statistics(self, now: float | None = None) -> RateLimitStatistics:
        st = self.state
        if now is not None:
            self._prune(now)
            for res in st.resources.values():
                self._advance(res, now)
        return RateLimitStatistics(
            rpm=self.rpm,
            tpm=self.tpm,
            requests_in_window=len(st.log),
            tokens_in_window=sum(t for _, t in st.log),
            paused_until=st.paused_until,
            consecutive_429=st.consecutive_429,
            admitted=st.admitted,
            delayed=st.delayed,
            resources={
                name: ResourceStatistics(limit=r.limit, remaining=r.level, reset_at=r.reset_at)
                for name, r in st.resources.items()
            },
        )


def _wait_until(now: float, until: float) -> float:
    """``until - now``, rounded up so that ``now + wait >= until`` holds in
    floating point too (a caller that sleeps exactly the advised delay and
    asks again must be admitted, not told to wait another 1e-15 s)."""
    wait = until - now
    if wait <= 0:
        return 0.0
    while now + wait < until:
        wait = math.nextafter(wait, math.inf)
    return wait
