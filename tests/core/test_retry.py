"""Retry classification, backoff and budgets (SPEC §5.7)."""

from __future__ import annotations

import random

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hivemind_trio.core.retry import (
    Action,
    Outcome,
    OutcomeKind,
    RetryBudget,
    RetryPolicy,
    Verdict,
    classify,
    is_breaker_failure,
    is_overload,
    parse_retry_count,
)

RNG = random.Random(1)


@pytest.mark.parametrize("status", [408, 429, 500, 502, 503, 504, 529])
def test_retryable_statuses(status: int) -> None:
    assert classify(Outcome.http(status)) is Verdict.RETRYABLE


@pytest.mark.parametrize("status", [400, 401, 403, 404, 405, 409, 413, 422, 451, 499, 501, 505])
def test_never_retried(status: int) -> None:
    assert classify(Outcome.http(status)) is Verdict.FATAL


@pytest.mark.parametrize("status", [200, 201, 204, 301, 304])
def test_success(status: int) -> None:
    assert classify(Outcome.http(status)) is Verdict.SUCCESS


@pytest.mark.parametrize(
    "body",
    [
        b'{"error":{"message":"You exceeded your current quota","type":"insufficient_quota","code":"insufficient_quota"}}',
        b'{"error":{"code":"credit_balance_exhausted"}}',
        b'{"error":{"message":"Request too large for gpt-4o on tokens per min (TPM): Limit 30000, Requested 50000."}}',
        b'{"type":"error","error":{"type":"rate_limit_error","message":"You have reached your specified API usage limits"}}',
        b"monthly Spend Limit reached",
    ],
)
def test_quota_429s_are_fatal(body: bytes) -> None:
    assert classify(Outcome.http(429, body=body)) is Verdict.FATAL
    d = RetryPolicy().decide(Outcome.http(429, body=body), 1, 0.0, RNG)
    assert d.action is Action.GIVE_UP and d.reason == "quota"


def test_transient_429_retried_and_custom_markers() -> None:
    body = b'{"error":{"message":"Rate limit reached","code":"rate_limit_exceeded"}}'
    assert classify(Outcome.http(429, body=body)) is Verdict.RETRYABLE
    assert classify(Outcome.http(429, body=b"org frozen"), ("org frozen",)) is Verdict.FATAL


@pytest.mark.parametrize(
    "kind",
    [OutcomeKind.CONNECT_ERROR, OutcomeKind.RESET, OutcomeKind.TIMEOUT_BEFORE_HEADERS, OutcomeKind.PROTOCOL_ERROR],
)
def test_transport_errors_before_headers_retried(kind: OutcomeKind) -> None:
    assert classify(Outcome.transport(kind)) is Verdict.RETRYABLE
    assert is_breaker_failure(Outcome.transport(kind))


def test_broken_stream_after_bytes_never_retried() -> None:
    o = Outcome.transport(OutcomeKind.STREAM_BROKEN_AFTER_BYTES)
    assert classify(o) is Verdict.FATAL
    assert RetryPolicy().decide(o, 1, 0.0, RNG).reason == "bytes_sent"


def test_upstream_should_retry_false_is_obeyed() -> None:
    assert classify(Outcome.http(529, should_retry=False)) is Verdict.FATAL


def test_signals_for_aimd_and_breaker() -> None:
    assert is_overload(Outcome.http(429)) and is_overload(Outcome.http(529))
    assert is_overload(Outcome.transport(OutcomeKind.RESET))
    assert not is_overload(Outcome.http(500)) and not is_overload(Outcome.ok())
    assert is_breaker_failure(Outcome.http(503))
    assert not is_breaker_failure(Outcome.http(429))
    assert not is_breaker_failure(Outcome.http(404))


def test_retry_after_is_a_floor_with_small_jitter() -> None:
    p = RetryPolicy(jitter_ratio=0.1, jitter_max=1.0)
    rng = random.Random(3)
    for _ in range(200):
        d = p.decide(Outcome.http(429, retry_after=20.0), 1, 0.0, rng)
        assert d.action is Action.RETRY
        assert 20.0 <= d.delay <= 21.0
    for _ in range(200):
        d = p.decide(Outcome.http(529, retry_after=0.0), 1, 0.0, rng)
        assert 0.0 <= d.delay <= 0.1


def test_full_jitter_exponential() -> None:
    p = RetryPolicy(base=0.5, cap=4.0, max_attempts=100)
    rng = random.Random(5)
    for attempt in range(1, 10):
        ceiling = min(4.0, 0.5 * 2 ** (attempt - 1))
        delays = [p.decide(Outcome.http(503), attempt, 0.0, rng).delay for _ in range(300)]
        assert all(0 <= d <= ceiling for d in delays)
        # Full jitter really spreads over the range.
        assert max(delays) > 0.8 * ceiling and min(delays) < 0.2 * ceiling


def test_max_attempts_and_client_retry_count() -> None:
    p = RetryPolicy(max_attempts=4)
    assert p.decide(Outcome.http(503), 3, 0.0, RNG).action is Action.RETRY
    assert p.decide(Outcome.http(503), 4, 0.0, RNG).reason == "max_attempts"
    # A client already on its second retry gets two fewer attempts.
    assert p.allowed_attempts(2) == 2
    assert p.decide(Outcome.http(503), 2, 0.0, RNG, client_retry_count=2).reason == "max_attempts"
    assert p.allowed_attempts(50) == 1


def test_deadline_gives_up_now_and_spends_no_budget() -> None:
    budget = RetryBudget(capacity=1.0, floor_per_second=0.0)
    d = RetryPolicy().decide(Outcome.http(429, retry_after=30.0), 1, 100.0, RNG, deadline=120.0, budget=budget)
    assert d.action is Action.GIVE_UP and d.reason == "deadline"
    assert budget.statistics().balance == 1.0
    d = RetryPolicy().decide(Outcome.http(429, retry_after=5.0), 1, 100.0, RNG, deadline=120.0, budget=budget)
    assert d.action is Action.RETRY


def test_retry_budget_limits_retries_to_a_fraction() -> None:
    budget = RetryBudget(ratio=0.2, capacity=5.0, floor_per_second=0.0)
    p = RetryPolicy(max_attempts=10)
    retries = 0
    for i in range(1000):
        budget.record_request(float(i))
        # Every request fails once.
        if p.decide(Outcome.http(503), 1, float(i), RNG, budget=budget).action is Action.RETRY:
            retries += 1
    assert retries <= 0.2 * 1000 + 5
    assert retries >= 0.2 * 1000 - 1
    s = budget.statistics()
    assert s.retries == retries and s.refused == 1000 - retries


def test_retry_budget_floor_refills_over_time() -> None:
    budget = RetryBudget(ratio=0.0, capacity=2.0, floor_per_second=0.5)
    assert budget.try_withdraw(0.0) and budget.try_withdraw(0.0)
    assert not budget.try_withdraw(0.0)
    assert budget.try_withdraw(2.0)


@settings(max_examples=200, deadline=None)
@given(
    ratio=st.floats(0, 1),
    cap=st.floats(1, 20),
    floor=st.floats(0, 2),
    ops=st.lists(st.tuples(st.booleans(), st.floats(0, 5)), max_size=200),
)
def test_retry_budget_bound(ratio: float, cap: float, floor: float, ops: list[tuple[bool, float]]) -> None:
    b = RetryBudget(ratio=ratio, capacity=cap, floor_per_second=floor)
    now = 0.0
    for is_request, dt in ops:
        now += dt
        if is_request:
            b.record_request(now)
        else:
            b.try_withdraw(now)
        s = b.statistics()
        assert 0 <= s.balance <= cap
        assert s.retries <= ratio * s.requests + cap + floor * now + 1e-6


def test_parse_retry_count() -> None:
    assert parse_retry_count(None) == 0
    assert parse_retry_count(b"2") == 2
    assert parse_retry_count(" 3 ") == 3
    assert parse_retry_count("-1") == 0
    assert parse_retry_count("lots") == 0
    assert parse_retry_count("9" * 50) == 0


def test_outcome_validation() -> None:
    with pytest.raises(ValueError, match="status"):
        Outcome(OutcomeKind.HTTP_STATUS)
    with pytest.raises(ValueError, match="status"):
        Outcome.http(42)
    with pytest.raises(ValueError, match="retry_after"):
        Outcome.http(429, retry_after=-1.0)
    with pytest.raises(ValueError, match="max_attempts"):
        RetryPolicy(max_attempts=0)
    o = Outcome.http(200)
    assert o.kind is OutcomeKind.OK
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        o.status = 500  # type: ignore[misc]


outcomes = st.one_of(
    st.builds(
        Outcome.http,
        st.integers(100, 599),
        retry_after=st.none() | st.floats(0, 100),
        body=st.binary(max_size=64),
        should_retry=st.none() | st.booleans(),
    ),
    st.sampled_from(list(OutcomeKind)).filter(lambda k: k not in (OutcomeKind.OK, OutcomeKind.HTTP_STATUS)).map(Outcome.transport),
)


@settings(max_examples=300)
@given(o=outcomes, attempt=st.integers(1, 10), deadline=st.none() | st.floats(0, 200), retry_count=st.integers(0, 5))
def test_decision_properties(o: Outcome, attempt: int, deadline: float | None, retry_count: int) -> None:
    p = RetryPolicy()
    d = p.decide(o, attempt, 10.0, random.Random(0), deadline=deadline, client_retry_count=retry_count)
    if d.action is Action.RETRY:
        assert classify(o) is Verdict.RETRYABLE
        assert o.status is None or o.status in (408, 429, 500, 502, 503, 504, 529)
        assert attempt < p.allowed_attempts(retry_count)
        assert deadline is None or 10.0 + d.delay < deadline
        if o.retry_after is not None:
            assert d.delay >= o.retry_after
    if o.status is not None and 400 <= o.status < 500 and o.status not in (408, 429):
        assert d.action is Action.GIVE_UP
