"""The mock provider's rate window, sans-io (time is passed in).

Theory of operation: a sliding log.  Every admitted attempt leaves one entry
``(t, tokens)``; an entry counts against the limits until ``t + window``.  An
attempt needing ``n`` tokens is admissible at ``now`` when, after dropping the
expired entries, one more request fits under the RPM limit and ``n`` more
tokens fit under the TPM limit.  When it does not fit, the wait is exact: the
time until enough of the oldest entries expire.  A request larger than the
whole TPM budget never fits (``math.inf``).

A sliding log has no boundary burst (a fixed window admits 2x the limit
around its edge), so "total requests / RPM" is a true lower bound on a run's
makespan, which the bench relies on.

``reset_at`` in the bucket snapshots is when the bucket is *fully*
replenished (the newest entry expires), the meaning both Anthropic's RFC 3339
``*-reset`` headers and OpenAI's duration resets document.
"""

from __future__ import annotations

import math
from collections import deque
from datetime import datetime, timezone

import attrs


@attrs.frozen
class BucketState:
    """One limit as seen at one instant; ``limit == 0`` means unlimited."""

    limit: int
    used: int
    remaining: int
    reset_at: float


class WindowEntry:
    """One admitted attempt's charge; mutable so the charge can be settled."""

    __slots__ = ("t", "tokens")

    def __init__(self, t: float, tokens: int) -> None:
        self.t = t
        self.tokens = tokens


class SlidingWindow:
    """Requests and tokens admitted in the last ``window`` seconds."""

    def __init__(self, window: float = 60.0) -> None:
        if not window > 0:
            raise ValueError(f"window must be > 0, got {window!r}")
        self.window = window
        self._log: deque[WindowEntry] = deque()

    def clear(self) -> None:
        self._log.clear()

    def _expire(self, now: float) -> None:
        log = self._log
        while log and log[0].t + self.window <= now:
            log.popleft()

    def usage(self, now: float) -> tuple[int, int]:
        """(requests, tokens) currently counted."""
        self._expire(now)
        return len(self._log), sum(e.tokens for e in self._log)

    def wait_time(self, now: float, *, tokens: int, rpm: int, tpm: int) -> float:
        """Seconds until an attempt of ``tokens`` tokens fits: 0.0 now, inf never."""
        self._expire(now)
        log = self._log
        wait = 0.0
        if rpm > 0 and len(log) + 1 > rpm:
            # The (len - rpm + 1)-th oldest entry must expire first.
            entry = log[len(log) - rpm]
            wait = max(wait, entry.t + self.window - now)
        if tpm > 0:
            if tokens > tpm:
                return math.inf
            used = sum(e.tokens for e in log)
            excess = used + tokens - tpm
            if excess > 0:
                freed = 0
                for entry in log:
                    freed += entry.tokens
                    if freed >= excess:
                        wait = max(wait, entry.t + self.window - now)
                        break
        return wait

    def record(self, now: float, tokens: int) -> WindowEntry:
        """Charge an admitted attempt; entries must be recorded in time order."""
        self._expire(now)
        entry = WindowEntry(now, tokens)
        self._log.append(entry)
        return entry

    def discard(self, entry: WindowEntry) -> None:
        """Take an attempt out of the window altogether (it was never counted)."""
        try:
            self._log.remove(entry)
        except ValueError:
            pass  # already expired

    @staticmethod
    def settle(entry: WindowEntry, tokens: int) -> None:
        """Correct an entry's charge once the attempt's real usage is known."""
        entry.tokens = tokens

    def buckets(self, now: float, *, rpm: int, tpm: int) -> tuple[BucketState, BucketState]:
        """Snapshot (requests, tokens) for the rate-limit headers."""
        requests, tokens = self.usage(now)
        reset_at = self._log[-1].t + self.window if self._log else now
        return (
            BucketState(rpm, requests, max(0, rpm - requests) if rpm else 0, reset_at),
            BucketState(tpm, tokens, max(0, tpm - tokens) if tpm else 0, reset_at),
        )


def go_duration(seconds: float) -> str:
    """Format like Go's ``time.Duration.String``: ``12ms``, ``1s``, ``6m0s``, ``1h2m3.5s``."""
    if seconds <= 0:
        return "0s"
    if seconds < 1:
        ms = round(seconds * 1000, 3)
        if ms >= 1:
            return _trim(ms) + "ms"
        return _trim(round(seconds * 1_000_000, 3)) + "µs"
    total_ms = round(seconds * 1000)
    hours, rest_ms = divmod(total_ms, 3_600_000)
    minutes, rest_ms = divmod(rest_ms, 60_000)
    secs = _trim(rest_ms / 1000) + "s"
    if hours:
        return f"{hours}h{minutes}m{secs}"
    if minutes:
        return f"{minutes}m{secs}"
    return secs


def _trim(value: float) -> str:
    text = f"{value:.3f}".rstrip("0").rstrip(".")
    return text or "0"


def rfc3339(wall: float) -> str:
    """A UTC RFC 3339 timestamp, rounded up to the second (never early)."""
    return datetime.fromtimestamp(math.ceil(wall), timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
