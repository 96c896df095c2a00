"""The mock's rate window and admission decisions, without sockets (explicit or mock time)."""

from __future__ import annotations

import math

import pytest
import trio

from hivemind_trio.sim.mock import OK, OVERLOADED, RATE_LIMITED, TOO_LARGE, MockConfig, MockProvider
from hivemind_trio.sim.mock_limits import SlidingWindow, go_duration, rfc3339


def test_requests_limit_and_exact_wait() -> None:
    w = SlidingWindow(60.0)
    for t in (0.0, 10.0, 20.0):
        assert w.wait_time(t, tokens=1, rpm=3, tpm=0) == 0.0
        w.record(t, 1)
    # Fourth request: the oldest entry (t=0) must expire first.
    assert w.wait_time(30.0, tokens=1, rpm=3, tpm=0) == pytest.approx(30.0)
    req, _tok = w.buckets(30.0, rpm=3, tpm=0)
    assert (req.limit, req.used, req.remaining) == (3, 3, 0)
    assert req.reset_at == pytest.approx(80.0)  # full replenishment: newest + window
    assert w.wait_time(60.0, tokens=1, rpm=3, tpm=0) == 0.0  # t=0 expired exactly at 60


def test_tokens_limit_waits_for_enough_tokens_to_expire() -> None:
    w = SlidingWindow(60.0)
    w.record(0.0, 400)
    w.record(5.0, 300)
    w.record(10.0, 200)
    # 900 used of 1000; 350 more needs 250 freed: entry 1 (400) suffices.
    assert w.wait_time(20.0, tokens=350, rpm=0, tpm=1000) == pytest.approx(40.0)
    # 750 more needs 650 freed: entries 1 and 2.
    assert w.wait_time(20.0, tokens=750, rpm=0, tpm=1000) == pytest.approx(45.0)
    assert math.isinf(w.wait_time(20.0, tokens=1001, rpm=0, tpm=1000))
    assert w.wait_time(20.0, tokens=100, rpm=0, tpm=1000) == 0.0


def test_settle_corrects_a_charge() -> None:
    w = SlidingWindow(60.0)
    e = w.record(0.0, 500)
    w.settle(e, 100)
    assert w.usage(1.0) == (1, 100)
    assert w.usage(60.0) == (0, 0)


def test_unlimited_never_waits() -> None:
    w = SlidingWindow(60.0)
    for i in range(1000):
        w.record(i * 0.001, 10_000)
    assert w.wait_time(1.0, tokens=10**9, rpm=0, tpm=0) == 0.0


def test_window_must_be_positive() -> None:
    with pytest.raises(ValueError, match="window"):
        SlidingWindow(0)
    with pytest.raises(ValueError, match="window"):
        MockConfig(window=0)
    with pytest.raises(ValueError, match="error_rate"):
        MockConfig(error_rate=1.5)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (0.012, "12ms"),
        (0.0015, "1.5ms"),
        (1, "1s"),
        (1.5, "1.5s"),
        (59.9, "59.9s"),
        (360, "6m0s"),
        (3723.5, "1h2m3.5s"),
    ],
)
def test_go_duration(seconds: float, text: str) -> None:
    assert go_duration(seconds) == text


def test_rfc3339_rounds_up() -> None:
    assert rfc3339(0.2) == "1970-01-01T00:00:01Z"
    assert rfc3339(86400) == "1970-01-02T00:00:00Z"


async def test_provider_window_frees_after_the_window(autojump_clock: trio.testing.MockClock) -> None:
    p = MockProvider(MockConfig(rpm=3, seed=1))
    for _ in range(3):
        adm = p.admit(input_tokens=10, stream=False)
        assert adm.verdict == OK
        p.release(adm)
    denied = p.admit(input_tokens=10, stream=False)
    assert denied.verdict == RATE_LIMITED
    assert denied.wait == pytest.approx(60.0)
    await trio.sleep(59.9)
    assert p.admit(input_tokens=10, stream=False).verdict == RATE_LIMITED
    await trio.sleep(0.1)
    assert p.admit(input_tokens=10, stream=False).verdict == OK


async def test_provider_tpm_and_cap(autojump_clock: trio.testing.MockClock) -> None:
    p = MockProvider(MockConfig(tpm=1000, output_mean=100, output_sd=0, cap=2, seed=1))
    a = p.admit(input_tokens=300, stream=True)  # 400 tokens
    b = p.admit(input_tokens=300, stream=True)  # 800
    assert (a.verdict, b.verdict) == (OK, OK)
    assert p.admit(input_tokens=50, stream=True).verdict == OVERLOADED  # fits the budget, over the cap
    p.release(a)
    assert p.admit(input_tokens=150, stream=True).verdict == RATE_LIMITED  # 250 > 200 left
    assert p.admit(input_tokens=5000, stream=True).verdict == TOO_LARGE
    p.release(b)
    p.settle(a, 300, 0)  # a delivered nothing: charged its input only
    assert p.admit(input_tokens=150, stream=True).verdict == OK
    assert p.statistics().peak_in_flight == 2


@pytest.mark.parametrize("charge_faults", [True, False])
async def test_faulted_attempts_count_against_the_window_unless_told_not_to(
    autojump_clock: trio.testing.MockClock, charge_faults: bool
) -> None:
    p = MockProvider(MockConfig(rpm=2, seed=1, charge_faults=charge_faults))
    faulted = [p.admit(input_tokens=10, stream=False, forced=f) for f in ("502", "reset")]
    assert [a.verdict for a in faulted] == [OK, OK]
    for a in faulted:
        p.release(a)
    # Two faulted attempts used up rpm=2, or nothing at all.
    second = p.admit(input_tokens=10, stream=False)
    assert second.verdict == (RATE_LIMITED if charge_faults else OK)
    assert p.window.usage(trio.current_time())[0] == (2 if charge_faults else 1)


def test_fault_draws_follow_the_seed() -> None:
    cfg = MockConfig(error_rate=0.3, reset_rate=0.2, drop_rate=0.1, seed=42)

    def draws() -> list[str | None]:
        p = MockProvider(cfg, clock=lambda: 0.0)
        out = []
        for _ in range(2000):
            adm = p.admit(input_tokens=1, stream=True)
            p.release(adm)
            out.append(adm.fault)
        return out

    first = draws()
    assert first == draws()
    assert first.count("502") / 2000 == pytest.approx(0.3, abs=0.04)
    assert first.count("reset") / 2000 == pytest.approx(0.2, abs=0.04)
    assert first.count("drop") / 2000 == pytest.approx(0.1, abs=0.03)


def test_latency_spikes_and_floor() -> None:
    p = MockProvider(MockConfig(latency=0.1, jitter=0.5, spike_rate=0.5, spike_factor=5, seed=3), clock=lambda: 0.0)
    lat = []
    for _ in range(500):
        adm = p.admit(input_tokens=1, stream=False)
        p.release(adm)
        lat.append(adm.latency)
    assert min(lat) >= 0.0
    assert max(lat) > 1.0
