"""AIMD window (SPEC §5.3)."""

from __future__ import annotations

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hivemind_trio.core.aimd import AimdWindow


def _fill(w: AimdWindow, now: float, n: int) -> None:
    for _ in range(n):
        w.on_success(now, in_flight=w.limit)


def test_additive_increase_one_per_window_of_successes() -> None:
    w = AimdWindow(min=1, initial=4, max=100)
    _fill(w, 0.0, 4)
    assert w.limit == 5
    _fill(w, 0.0, 5)
    assert w.limit == 6
    assert w.statistics().increases == 2


def test_no_growth_when_window_not_used() -> None:
    w = AimdWindow(min=1, initial=10, max=100)
    for _ in range(1000):
        w.on_success(0.0, in_flight=2)
    assert w.limit == 10


def test_multiplicative_decrease_and_bounds() -> None:
    w = AimdWindow(min=2, initial=16, max=32, min_decrease_interval=0.0)
    assert w.on_overload(1.0, "429")
    assert w.limit == 8
    for t in range(2, 10):
        w.on_overload(float(t), "529")
    assert w.limit == 2
    _fill(w, 10.0, 10_000)
    assert w.limit == 32


def test_burst_from_one_window_decreases_once() -> None:
    w = AimdWindow(min=1, initial=32, max=64)
    # 32 requests all started at t=0, all fail around t=5.
    results = [w.on_overload(5.0 + i * 0.01, "503", started_at=0.0) for i in range(32)]
    assert results.count(True) == 1
    assert w.limit == 16
    # A request admitted after the decrease that also fails is a new event.
    assert w.on_overload(7.0, "503", started_at=6.0)
    assert w.limit == 8


def test_without_start_times_decreases_spaced_by_rtt() -> None:
    w = AimdWindow(min=1, initial=64, max=64, min_decrease_interval=0.5)
    w.on_success(0.0, in_flight=64, latency=2.0)
    assert w.decrease_interval() == 2.0
    assert w.on_overload(10.0, "reset")
    assert not w.on_overload(11.0, "reset")
    assert w.on_overload(12.0, "reset")
    assert w.limit == 16
    assert w.statistics().ignored_signals == 1


def test_slow_ttfb_is_an_overload_signal_after_warmup() -> None:
    w = AimdWindow(min=1, initial=8, max=8, ttfb_warmup=5)
    for i in range(5):
        w.on_success(float(i), in_flight=1, ttfb=0.5)
    assert w.statistics().ttfb_baseline == pytest.approx(0.5)
    assert not w.is_slow_ttfb(1.4)  # 3x but under the absolute excess
    assert w.is_slow_ttfb(3.0)
    w.on_success(10.0, in_flight=1, ttfb=3.0)
    assert w.limit == 4
    # The outlier moved the baseline only by the clipped amount.
    assert w.statistics().ttfb_baseline <= 0.5 + 0.2 * (1.5 - 0.5) + 1e-9


def test_baseline_follows_a_real_shift() -> None:
    w = AimdWindow(min=1, initial=8, max=8, ttfb_warmup=1, min_decrease_interval=0.0)
    for i in range(5):
        w.observe_ttfb(float(i), 0.5)
    for i in range(60):
        w.observe_ttfb(100.0 + i, 5.0)
    assert not w.is_slow_ttfb(5.0)


def test_validation_messages() -> None:
    with pytest.raises(ValueError, match="initial"):
        AimdWindow(min=2, initial=1, max=4)
    with pytest.raises(ValueError, match="min must be <= max"):
        AimdWindow(min=5, initial=5, max=4)
    with pytest.raises(ValueError, match="decrease_factor"):
        AimdWindow(decrease_factor=1.0)
    with pytest.raises(ValueError, match="max"):
        AimdWindow(max=0)


def test_statistics_frozen() -> None:
    s = AimdWindow().statistics()
    assert s.limit == 4 and s.min == 1 and s.max == 64
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        s.limit = 3  # type: ignore[misc]


events = st.lists(
    st.one_of(
        st.tuples(st.just("ok"), st.integers(0, 200), st.none() | st.floats(0, 100), st.none() | st.floats(0, 50)),
        st.tuples(st.just("bad"), st.sampled_from(["429", "529", "503", "502", "reset"]), st.none() | st.floats(-5, 5)),
        st.tuples(st.just("tick"), st.floats(0, 10)),
    ),
    max_size=200,
)


@settings(max_examples=200, deadline=None)
@given(lo=st.integers(1, 10), span=st.integers(0, 50), init=st.floats(0, 1), seq=events)
def test_window_always_within_bounds(lo: int, span: int, init: float, seq: list[tuple]) -> None:
    hi = lo + span
    w = AimdWindow(min=lo, initial=lo + round(span * init), max=hi)
    now = 0.0
    for ev in seq:
        if ev[0] == "ok":
            w.on_success(now, ev[1], ttfb=ev[2], latency=ev[3])
        elif ev[0] == "bad":
            started = None if ev[2] is None else now + ev[2]
            w.on_overload(now, ev[1], started_at=started)
        else:
            now += ev[1]
        assert lo <= w.limit <= hi
        assert lo <= w.state.cwnd <= hi


def test_converges_without_wild_oscillation() -> None:
    """Capacity 20 in flight: above it every completion is an overload signal.

    The window should saw-tooth between roughly capacity/2 and capacity, not
    swing between min and max.
    """
    cap = 20
    w = AimdWindow(min=1, initial=1, max=200, min_decrease_interval=1.0)
    history = []
    t = 0.0
    for _ in range(3000):
        t += 0.05
        n = w.limit
        if n > cap:
            w.on_overload(t, "429")
        else:
            w.on_success(t, in_flight=n, latency=1.0)
        history.append(w.limit)
    tail = history[1000:]
    assert max(tail) <= cap + 1
    assert min(tail) >= cap // 2 - 1
