"""Circuit breaker state machine (SPEC §5.4)."""

from __future__ import annotations

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hivemind_trio.core.breaker import (
    TRANSITIONS,
    BreakerEvent,
    BreakerState,
    BreakerStateError,
    CircuitBreaker,
)

CLOSED, OPEN, HALF = BreakerState.CLOSED, BreakerState.OPEN, BreakerState.HALF_OPEN


def _trip(b: CircuitBreaker, now: float, retry_after: float | None = None) -> None:
    while b.state is CLOSED:
        b.record_failure(now, retry_after)


def test_consecutive_failures_trip() -> None:
    b = CircuitBreaker(consecutive_failures=3, min_volume=100)
    b.record_failure(0.0)
    b.record_failure(0.1)
    b.record_success(0.2)  # breaks the run
    b.record_failure(0.3)
    b.record_failure(0.4)
    assert b.state is CLOSED
    b.record_failure(0.5)
    assert b.state is OPEN
    assert not b.allow(0.6)


def test_failure_ratio_trips_only_with_volume() -> None:
    b = CircuitBreaker(consecutive_failures=100, failure_ratio=0.5, min_volume=10, window=30)
    for i in range(4):
        b.record_success(float(i))
        b.record_failure(float(i) + 0.5)
    assert b.state is CLOSED  # 8 outcomes: below min volume
    b.record_success(5.0)
    b.record_failure(5.5)  # 10 outcomes, 5 failures
    assert b.state is OPEN


def test_old_outcomes_leave_the_window() -> None:
    b = CircuitBreaker(consecutive_failures=100, failure_ratio=0.5, min_volume=7, window=10)
    for i in range(3):
        b.record_failure(float(i))
        b.record_success(float(i))
    # Those were long ago: they no longer count.
    b.record_failure(100.0)
    assert b.state is CLOSED
    assert b.statistics(100.0).window_failures == 1


def test_cooldown_respects_retry_after_and_grows_capped() -> None:
    b = CircuitBreaker(consecutive_failures=1, base_cooldown=2.0, max_cooldown=10.0)
    b.record_failure(0.0, retry_after=7.0)
    assert b.statistics().open_until == 7.0
    assert b.next_allowed_at(1.0) == 7.0
    now = 7.0
    cooldowns = []
    for _ in range(5):
        assert b.allow(now)  # the probe
        assert b.state is HALF
        b.record_failure(now)
        cooldowns.append(b.statistics().cooldown)
        now = b.statistics().open_until
    assert cooldowns == [4.0, 8.0, 10.0, 10.0, 10.0]


def test_half_open_admits_exactly_one_probe_and_success_closes() -> None:
    b = CircuitBreaker(consecutive_failures=1, base_cooldown=1.0)
    b.record_failure(0.0)
    assert not b.allow(0.5)
    assert b.allow(1.0)
    assert [b.allow(1.0 + i) for i in range(5)] == [False] * 5
    assert b.next_allowed_at(2.0) is None
    b.record_success(2.0)
    assert b.state is CLOSED
    assert all(b.allow(2.0) for _ in range(5))
    assert b.statistics().consecutive_failures == 0


def test_cancelled_probe_frees_the_slot() -> None:
    b = CircuitBreaker(consecutive_failures=1, base_cooldown=1.0)
    b.record_failure(0.0)
    assert b.allow(1.0)
    assert not b.allow(1.0)
    b.record_cancelled(1.5)
    assert b.state is HALF
    assert b.allow(1.5)


def test_streak_forgotten_after_staying_closed() -> None:
    b = CircuitBreaker(consecutive_failures=1, base_cooldown=1.0, max_cooldown=8.0)
    b.record_failure(0.0)
    assert b.allow(1.0)
    b.record_success(1.0)
    b.record_failure(2.0)  # trips again soon: longer cool-down
    assert b.statistics().cooldown == 2.0
    assert b.allow(4.0)
    b.record_success(4.0)
    b.record_failure(100.0)  # long after: back to base
    assert b.statistics().cooldown == 1.0


def test_late_outcomes_while_open() -> None:
    b = CircuitBreaker(consecutive_failures=1, base_cooldown=1.0)
    b.record_failure(0.0)
    b.record_success(0.2)  # straggler: the cool-down stands
    assert b.state is OPEN and not b.allow(0.5)
    b.record_failure(0.3, retry_after=5.0)  # but its retry-after is honoured
    assert b.next_allowed_at(1.0) == 5.3


def test_illegal_transition_raises() -> None:
    b = CircuitBreaker()
    with pytest.raises(BreakerStateError, match="probe_succeeded.*closed"):
        b._transition(BreakerEvent.PROBE_SUCCEEDED, 0.0)


def test_validation_and_statistics() -> None:
    with pytest.raises(ValueError, match="failure_ratio"):
        CircuitBreaker(failure_ratio=0)
    with pytest.raises(ValueError, match="base_cooldown"):
        CircuitBreaker(base_cooldown=10, max_cooldown=5)
    s = CircuitBreaker().statistics()
    assert s.state is CLOSED and s.open_until is None
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        s.trips = 1  # type: ignore[misc]


ops = st.lists(
    st.one_of(
        st.tuples(st.just("allow")),
        st.tuples(st.just("ok")),
        st.tuples(st.just("fail"), st.none() | st.floats(0, 100)),
        st.tuples(st.just("cancel")),
        st.tuples(st.just("tick"), st.floats(0, 50)),
    ),
    max_size=150,
)


@settings(max_examples=300, deadline=None)
@given(seq=ops, n=st.integers(1, 6), vol=st.integers(1, 20))
def test_only_legal_transitions_and_one_probe(seq: list[tuple], n: int, vol: int) -> None:
    b = CircuitBreaker(consecutive_failures=n, min_volume=vol, base_cooldown=1.0, max_cooldown=30.0)
    now = 0.0
    admitted_in_half_open = 0
    for op in seq:
        before = b.state
        if op[0] == "allow":
            ok = b.allow(now)
            if before is OPEN:
                assert ok == (now >= b.data.open_until or b.state is HALF)
            if b.state is HALF and ok:
                admitted_in_half_open += 1
                # Exactly one probe until it reports.
                assert admitted_in_half_open == 1
        elif op[0] == "ok":
            b.record_success(now)
        elif op[0] == "fail":
            b.record_failure(now, op[1])
            if before is not OPEN and b.state is OPEN and op[1] is not None:
                assert b.data.open_until >= now + op[1]
        elif op[0] == "cancel":
            b.record_cancelled(now)
        else:
            now += op[1]
        if b.state is not HALF or not b.data.probe_in_flight:
            admitted_in_half_open = 0
        assert b.data.cooldown <= max(30.0, *(o[1] for o in seq if o[0] == "fail" and o[1] is not None), 0)
    # Every recorded move is a row of the table.
    legal = {(s.value, e.value, t.value) for (s, e), t in TRANSITIONS.items()}
    for frm, ev, to, _t in b.data.transitions:
        assert (frm, ev, to) in legal
    # And consecutive moves chain.
    for a, c in zip(b.data.transitions, b.data.transitions[1:]):
        assert a[2] == c[0]
