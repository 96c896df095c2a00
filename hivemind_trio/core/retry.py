"""Transparent retry: classification, backoff and budgets (SPEC §5.7), sans-io.

Theory of operation
-------------------
An attempt ends in an :class:`Outcome`.  :func:`classify` sorts it:

* ``SUCCESS`` — a 1xx-3xx, or any 4xx the client must see (never retried);
* ``RETRYABLE`` — 408, 429 (unless it is a quota/size refusal), 500, 502,
  503, 504, 529, and transport failures *before response headers*: connect
  errors, resets, protocol errors, timeouts before the first byte;
* ``FATAL`` — everything else: other 4xx, quota 429s, and any failure after
  bytes reached the client (retrying would duplicate output).

:meth:`RetryPolicy.decide` then turns a retryable outcome into ``RETRY``
after a delay, or ``GIVE_UP`` (pass the upstream's response through) when:
the per-request attempt allowance is used up (smaller when the client says
it is itself retrying, ``x-stainless-retry-count > 0``); the delay would end
past the client's deadline (the client gets the 429 with its
``retry-after`` at once instead of a timeout later); or the lane's
:class:`RetryBudget` is empty.

Delay: the upstream's ``retry-after-ms`` / ``retry-after`` is a floor plus a
small jitter (so a fleet does not return in lockstep); without it, full
jitter exponential backoff ``uniform(0, min(cap, base × 2^(attempt-1)))``.

The retry budget is a token bucket per lane: each first attempt deposits
``ratio`` tokens (20 % by default), each retry withdraws one, and the bucket
also refills at ``floor_per_second`` so a quiet lane can still retry a
little.  Over any interval, retries <= ratio × requests + capacity +
floor_per_second × elapsed: under an outage retries cannot multiply load.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable
from typing import Any, Protocol

import attrs

__all__ = [
    "DEFAULT_QUOTA_MARKERS",
    "RETRYABLE_STATUSES",
    "OVERLOAD_STATUSES",
    "OutcomeKind",
    "Outcome",
    "Verdict",
    "Action",
    "RetryDecision",
    "RetryPolicy",
    "RetryBudget",
    "RetryBudgetState",
    "RetryBudgetStatistics",
    "classify",
    "is_quota_refusal",
    "is_overload",
    "is_breaker_failure",
    "parse_retry_count",
]

RETRYABLE_STATUSES = frozenset({408, 429, 500, 502, 503, 504, 529})
# Statuses that mean "the upstream is overloaded": AIMD decrease signals.
OVERLOAD_STATUSES = frozenset({429, 502, 503, 529})

# Substrings (case-insensitive) of a 429 body that mean "waiting will not help".
DEFAULT_QUOTA_MARKERS: tuple[str, ...] = (
    "insufficient_quota",
    "credit_balance_exhausted",
    "request too large",
    "spend limit",
    "spending limit",
    "billing_hard_limit",
    "usage limit",
)


class OutcomeKind(enum.Enum):
    OK = "ok"
    HTTP_STATUS = "http_status"
    CONNECT_ERROR = "connect_error"
    RESET = "reset"
    TIMEOUT_BEFORE_HEADERS = "timeout_before_headers"
    PROTOCOL_ERROR = "protocol_error"
    STREAM_BROKEN_AFTER_BYTES = "stream_broken_after_bytes"


_TRANSPORT_BEFORE_HEADERS = frozenset(
    {
        OutcomeKind.CONNECT_ERROR,
        OutcomeKind.RESET,
        OutcomeKind.TIMEOUT_BEFORE_HEADERS,
        OutcomeKind.PROTOCOL_ERROR,
    }
)


def _status(_inst: Any, attribute: attrs.Attribute[Any], value: int | None) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 100 <= value <= 999):
        raise ValueError(f"{attribute.name} must be an HTTP status 100..999 or None, got {value!r}")


def _optional_delay(_inst: Any, attribute: attrs.Attribute[Any], value: float | None) -> None:
    if value is not None and (not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0):
        raise ValueError(f"{attribute.name} must be a non-negative number or None, got {value!r}")


@attrs.frozen
class Outcome:
    """How one upstream attempt ended."""

    kind: OutcomeKind
    status: int | None = attrs.field(default=None, validator=_status)
    # Seconds the upstream asked to wait (retry-after-ms / retry-after), parsed.
    retry_after: float | None = attrs.field(default=None, validator=_optional_delay)
    # The start of the error body (decoded), for quota markers.
    body: bytes = b""
    # The upstream's x-should-retry, when it sent one.
    should_retry: bool | None = None

    def __attrs_post_init__(self) -> None:
        if self.kind in (OutcomeKind.OK, OutcomeKind.HTTP_STATUS) and self.status is None:
            raise ValueError(f"status is required for kind={self.kind.value}, got None")

    @classmethod
    def ok(cls, status: int = 200) -> Outcome:
        return cls(OutcomeKind.OK, status)

    @classmethod
    def http(
        cls,
        status: int,
        *,
        retry_after: float | None = None,
        body: bytes = b"",
        should_retry: bool | None = None,
    ) -> Outcome:
        kind = OutcomeKind.OK if status < 400 else OutcomeKind.HTTP_STATUS
        return cls(kind, status, retry_after, body, should_retry)

    @classmethod
    def transport(cls, kind: OutcomeKind) -> Outcome:
        return cls(kind)


class Verdict(enum.Enum):
    SUCCESS = "success"
    RETRYABLE = "retryable"
    FATAL = "fatal"


class Action(enum.Enum):
    DONE = "done"  # success: nothing to do
    RETRY = "retry"  # re-queue after ``delay``
    GIVE_UP = "give_up"  # pass the upstream's response (or the proxy's error) through


@attrs.frozen
class RetryDecision:
    action: Action
    delay: float = 0.0
    reason: str = ""


def is_quota_refusal(body: bytes, markers: Iterable[str] = DEFAULT_QUOTA_MARKERS) -> bool:
    """Does a 429 body say the account, not the moment, is the problem?"""
    text = body[:64 * 1024].decode("utf-8", errors="replace").lower()
    return any(m.lower() in text for m in markers)


def classify(outcome: Outcome, quota_markers: Iterable[str] = DEFAULT_QUOTA_MARKERS) -> Verdict:
    kind = outcome.kind
    if kind is OutcomeKind.OK:
        return Verdict.SUCCESS
    if kind is OutcomeKind.STREAM_BROKEN_AFTER_BYTES:
        # Bytes reached the client: a retry would duplicate output.
        return Verdict.FATAL
    if kind in _TRANSPORT_BEFORE_HEADERS:
        return Verdict.RETRYABLE
    status = outcome.status
    assert status is not None
    if status < 400:
        return Verdict.SUCCESS
    if outcome.should_retry is False:
        # The provider knows this one will not get better.
        return Verdict.FATAL
    if status == 429 and is_quota_refusal(outcome.body, quota_markers):
        return Verdict.FATAL
    if status in RETRYABLE_STATUSES:
        return Verdict.RETRYABLE
    return Verdict.FATAL


def is_overload(outcome: Outcome) -> bool:
    """An AIMD decrease signal (429, 502, 503, 529, connection reset)."""
    if outcome.kind is OutcomeKind.RESET:
        return True
    return outcome.kind is OutcomeKind.HTTP_STATUS and outcome.status in OVERLOAD_STATUSES


def is_breaker_failure(outcome: Outcome) -> bool:
    """Does this outcome say the upstream is down (as opposed to busy or refusing)?

    Rate limiting (429) is the rate tracker's business, not an outage, and a
    4xx is the client's problem.
    """
    if outcome.kind is OutcomeKind.OK:
        return False
    if outcome.kind is OutcomeKind.HTTP_STATUS:
        return outcome.status is not None and outcome.status >= 500
    # Transport failures, including a stream that broke mid-way.
    return True


def parse_retry_count(value: str | bytes | None) -> int:
    """``x-stainless-retry-count`` as a non-negative int; 0 for absent or garbage."""
    if value is None:
        return 0
    if isinstance(value, (bytes, bytearray)):
        value = value.decode("latin-1", errors="replace")
    v = value.strip()
    if not v.isdigit() or len(v) > 6:
        return 0
    return int(v)


class _Random(Protocol):
    def random(self) -> float: ...


def _positive(_inst: Any, attribute: attrs.Attribute[Any], value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{attribute.name} must be a positive number, got {value!r}")


def _non_negative(_inst: Any, attribute: attrs.Attribute[Any], value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{attribute.name} must be a non-negative number, got {value!r}")


def _attempts(_inst: Any, attribute: attrs.Attribute[Any], value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{attribute.name} must be an integer >= 1, got {value!r}")


@attrs.define
class RetryBudgetState:
    balance: float
    last: float | None = None
    deposits: int = 0
    withdrawals: int = 0
    refused: int = 0


@attrs.frozen
class RetryBudgetStatistics:
    balance: float
    capacity: float
    requests: int
    retries: int
    refused: int


@attrs.define
class RetryBudget:
    """Per-lane token bucket bounding retries to a fraction of requests."""

    ratio: float = attrs.field(default=0.2, validator=_non_negative)
    capacity: float = attrs.field(default=10.0, validator=_positive)
    floor_per_second: float = attrs.field(default=0.1, validator=_non_negative)
    state: RetryBudgetState = attrs.field(default=None)

    def __attrs_post_init__(self) -> None:
        if self.state is None:
            # Start full: the first failures of a fresh lane may be retried.
            self.state = RetryBudgetState(balance=self.capacity)

    def _refill(self, now: float) -> None:
        st = self.state
        if st.last is not None and now > st.last:
            st.balance = min(self.capacity, st.balance + (now - st.last) * self.floor_per_second)
        if st.last is None or now > st.last:
            st.last = now

    def record_request(self, now: float) -> None:
        """A new request (not a retry) started: it earns ``ratio`` of a retry."""
        self._refill(now)
        st = self.state
        st.balance = min(self.capacity, st.balance + self.ratio)
        st.deposits += 1

    def try_withdraw(self, now: float) -> bool:
        self._refill(now)
        st = self.state
        if st.balance >= 1.0:
            st.balance -= 1.0
            st.withdrawals += 1
            return True
        st.refused += 1
        return False

    def statistics(self) -> RetryBudgetStatistics:
        st = self.state
        return RetryBudgetStatistics(
            balance=st.balance,
            capacity=self.capacity,
            requests=st.deposits,
            retries=st.withdrawals,
            refused=st.refused,
        )


@attrs.frozen
class RetryPolicy:
    """Per-request retry rules (stateless; the lane's RetryBudget holds the state)."""

    # Attempts in total, the first one included.
    max_attempts: int = attrs.field(default=4, validator=_attempts)
    base: float = attrs.field(default=0.5, validator=_positive)
    cap: float = attrs.field(default=8.0, validator=_positive)
    # Jitter on top of a retry-after floor: up to this fraction of it...
    jitter_ratio: float = attrs.field(default=0.1, validator=_non_negative)
    # ...and at most this many seconds.
    jitter_max: float = attrs.field(default=1.0, validator=_non_negative)
    quota_markers: tuple[str, ...] = attrs.field(default=DEFAULT_QUOTA_MARKERS, converter=tuple)

    def allowed_attempts(self, client_retry_count: int = 0) -> int:
        """Attempts for one request; a client already retrying gets fewer, since its
        own retries multiply ours."""
        return max(1, self.max_attempts - max(0, client_retry_count))

    def backoff(self, attempt: int, rng: _Random, retry_after: float | None = None) -> float:
        """Delay before attempt ``attempt + 1`` (``attempt`` >= 1 have been made)."""
        if retry_after is not None:
            jitter = min(self.jitter_max, self.jitter_ratio * max(retry_after, 1.0))
            return retry_after + jitter * rng.random()
        ceiling = min(self.cap, self.base * 2.0 ** min(max(0, attempt - 1), 60))
        return ceiling * rng.random()

    def decide(
        self,
        outcome: Outcome,
        attempt: int,
        now: float,
        rng: _Random,
        *,
        deadline: float | None = None,
        client_retry_count: int = 0,
        budget: RetryBudget | None = None,
    ) -> RetryDecision:
        """What to do after attempt number ``attempt`` (1-based) ended in ``outcome``."""
        verdict = classify(outcome, self.quota_markers)
        if verdict is Verdict.SUCCESS:
            return RetryDecision(Action.DONE, reason="success")
        if verdict is Verdict.FATAL:
            return RetryDecision(Action.GIVE_UP, reason=_fatal_reason(outcome, self.quota_markers))
        if attempt >= self.allowed_attempts(client_retry_count):
            return RetryDecision(Action.GIVE_UP, reason="max_attempts")
        delay = self.backoff(attempt, rng, outcome.retry_after)
        if deadline is not None and now + delay >= deadline:
            return RetryDecision(Action.GIVE_UP, delay=delay, reason="deadline")
        # Withdraw last: a give-up for another reason must not spend the budget.
        if budget is not None and not budget.try_withdraw(now):
            return RetryDecision(Action.GIVE_UP, reason="retry_budget")
        return RetryDecision(Action.RETRY, delay=delay, reason=_retry_reason(outcome))


def _fatal_reason(outcome: Outcome, markers: Iterable[str]) -> str:
    if outcome.kind is OutcomeKind.STREAM_BROKEN_AFTER_BYTES:
        return "bytes_sent"
    if outcome.should_retry is False:
        return "upstream_says_no"
    if outcome.status == 429 and is_quota_refusal(outcome.body, markers):
        return "quota"
    return "not_retryable"


def _retry_reason(outcome: Outcome) -> str:
    if outcome.kind is OutcomeKind.HTTP_STATUS:
        return str(outcome.status)
    return outcome.kind.value
