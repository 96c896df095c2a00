"""Rate-limit header parsing and pacing (SPEC §5.2, PROTOCOLS.md)."""

from __future__ import annotations

import math
import random
from datetime import datetime, timezone

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hivemind_trio.core.ratelimit import (
    ANTHROPIC_SPEC,
    MAX_HORIZON,
    OPENAI_SPEC,
    RateLimitSnapshot,
    RateLimitSpec,
    RateLimitTracker,
    ResourceLimit,
    parse_go_duration,
    parse_headers,
    parse_retry_after,
)

WALL = 1_704_067_200.0  # 2024-01-01T00:00:00Z


# ---------------------------------------------------------------- Go durations


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("1s", 1.0),
        ("6m0s", 360.0),
        ("12ms", 0.012),
        ("1h2m3.5s", 3723.5),
        ("500us", 0.0005),
        ("500µs", 0.0005),
        ("500μs", 0.0005),
        ("250ns", 250e-9),
        ("0", 0.0),
        ("0s", 0.0),
        ("2h", 7200.0),
        ("1m30.25s", 90.25),
        (".5s", 0.5),
        ("7.66s", 7.66),
        ("17", 17.0),  # unit dropped by some gateway: seconds
        (" 3s ", 3.0),
    ],
)
def test_go_durations(text: str, seconds: float) -> None:
    got = parse_go_duration(text)
    assert got is not None
    assert math.isclose(got, seconds, rel_tol=1e-9, abs_tol=1e-12)


@pytest.mark.parametrize("text", ["", "s", "ms", "-1s", "1x", "1s2", "abc", "1h-2m", "nan", "inf", "1e999", "1 s"])
def test_go_durations_nonsense(text: str) -> None:
    assert parse_go_duration(text) is None


@given(
    h=st.integers(0, 48),
    m=st.integers(0, 59),
    s=st.integers(0, 59),
    ms=st.integers(0, 999),
)
def test_go_duration_roundtrip(h: int, m: int, s: int, ms: int) -> None:
    # The way Go prints durations: largest unit first, then fractional seconds.
    text = (f"{h}h" if h else "") + (f"{m}m" if h or m else "") + f"{s}.{ms:03d}s"
    assert math.isclose(parse_go_duration(text), h * 3600 + m * 60 + s + ms / 1000, abs_tol=1e-9)


@given(st.text(max_size=30))
def test_go_duration_never_raises(text: str) -> None:
    got = parse_go_duration(text)
    assert got is None or (math.isfinite(got) and got >= 0)


# ---------------------------------------------------------------- header parsing


def _anthropic_headers(**over: str) -> dict[str, str]:
    h = {
        "anthropic-ratelimit-requests-limit": "50",
        "anthropic-ratelimit-requests-remaining": "49",
        "anthropic-ratelimit-requests-reset": "2024-01-01T00:00:01Z",
        "anthropic-ratelimit-tokens-limit": "100000",
        "anthropic-ratelimit-tokens-remaining": "90000",
        "anthropic-ratelimit-tokens-reset": "2024-01-01T00:00:06.5Z",
        "anthropic-ratelimit-input-tokens-limit": "80000",
        "anthropic-ratelimit-input-tokens-remaining": "75000",
        "anthropic-ratelimit-input-tokens-reset": "2024-01-01T00:00:04+00:00",
        "anthropic-ratelimit-output-tokens-limit": "20000",
        "anthropic-ratelimit-output-tokens-remaining": "19000",
        "anthropic-ratelimit-output-tokens-reset": "2024-01-01T01:00:03+01:00",
    }
    h.update(over)
    return h


def test_anthropic_headers() -> None:
    snap = parse_headers(ANTHROPIC_SPEC, _anthropic_headers(), now=100.0, wall_now=WALL)
    assert snap.at == 100.0
    assert snap.get("requests") == ResourceLimit(50, 49, 101.0)
    assert snap.get("tokens") == ResourceLimit(100000, 90000, 106.5)
    assert snap.get("input-tokens") == ResourceLimit(80000, 75000, 104.0)
    # +01:00 offset is honoured.
    assert snap.get("output-tokens") == ResourceLimit(20000, 19000, 103.0)
    assert snap.retry_after is None


def test_openai_headers_and_bytes_pairs() -> None:
    headers = [
        (b"X-RateLimit-Limit-Requests", b"60"),
        (b"x-ratelimit-remaining-requests", b"59"),
        (b"x-ratelimit-reset-requests", b"1s"),
        (b"x-ratelimit-limit-tokens", b"150000"),
        (b"x-ratelimit-remaining-tokens", b"149984"),
        (b"x-ratelimit-reset-tokens", b"6m0s"),
    ]
    snap = parse_headers(OPENAI_SPEC, headers, now=10.0, wall_now=WALL)
    assert snap.get("requests") == ResourceLimit(60, 59, 11.0)
    assert snap.get("tokens") == ResourceLimit(150000, 149984, 370.0)


def test_seconds_and_epoch_formats() -> None:
    base = dict(
        limit="rl-{resource}-limit",
        remaining="rl-{resource}-remaining",
        reset="rl-{resource}-reset",
        resources=("requests",),
    )
    secs = RateLimitSpec(**base, reset_format="seconds")
    epoch = RateLimitSpec(**base, reset_format="epoch")
    h = {"rl-requests-limit": "10", "rl-requests-remaining": "0", "rl-requests-reset": "2.5"}
    assert parse_headers(secs, h, 1.0, WALL).get("requests") == ResourceLimit(10, 0, 3.5)
    h["rl-requests-reset"] = str(WALL + 30)
    assert parse_headers(epoch, h, 1.0, WALL).get("requests") == ResourceLimit(10, 0, 31.0)


def test_retry_after_ms_wins() -> None:
    h = {"retry-after-ms": "1500", "retry-after": "7"}
    assert parse_headers(OPENAI_SPEC, h, 0.0, WALL).retry_after == 1.5
    # Nonsense ms falls back to the seconds header.
    h = {"retry-after-ms": "soon", "retry-after": "7"}
    assert parse_headers(OPENAI_SPEC, h, 0.0, WALL).retry_after == 7.0


def test_retry_after_http_date() -> None:
    date = "Mon, 01 Jan 2024 00:00:30 GMT"
    assert parse_headers(ANTHROPIC_SPEC, {"retry-after": date}, 0.0, WALL).retry_after == 30.0
    # A date in the past means "now", not a negative wait.
    assert parse_retry_after("retry-after", date, WALL + 100) == 0.0


def test_missing_and_garbage_headers_are_ignored() -> None:
    h = _anthropic_headers(
        **{
            "anthropic-ratelimit-requests-limit": "lots",
            "anthropic-ratelimit-requests-remaining": "-3",
            "anthropic-ratelimit-requests-reset": "tomorrow",
            "anthropic-ratelimit-tokens-reset": "2024-01-01T00:00:06",  # naive: ambiguous
            "retry-after": "soon",
        }
    )
    del h["anthropic-ratelimit-input-tokens-limit"]
    snap = parse_headers(ANTHROPIC_SPEC, h, 0.0, WALL)
    assert "requests" not in snap.resources
    assert snap.get("tokens") == ResourceLimit(100000, 90000, None)
    assert snap.get("input-tokens") == ResourceLimit(None, 75000, 4.0)
    assert snap.retry_after is None
    assert parse_headers(OPENAI_SPEC, {}, 0.0, WALL).empty


def test_azure_minus_one_and_zero_limits_mean_unknown() -> None:
    for limit in ("-1", "0"):
        h = {
            "x-ratelimit-limit-requests": limit,
            "x-ratelimit-remaining-requests": "0",
            "x-ratelimit-reset-requests": "1s",
        }
        assert parse_headers(OPENAI_SPEC, h, 0.0, WALL).get("requests") is None


def test_remaining_above_limit_is_clamped_and_absurd_horizon_dropped() -> None:
    h = {
        "x-ratelimit-limit-requests": "10",
        "x-ratelimit-remaining-requests": "99",
        "x-ratelimit-reset-requests": "9999h",
        "retry-after": str(int(MAX_HORIZON * 10)),
    }
    snap = parse_headers(OPENAI_SPEC, h, 0.0, WALL)
    assert snap.get("requests") == ResourceLimit(10, 10, None)
    assert snap.retry_after is None


header_names = st.sampled_from(
    [
        "x-ratelimit-limit-requests",
        "x-ratelimit-remaining-requests",
        "x-ratelimit-reset-requests",
        "x-ratelimit-reset-tokens",
        "anthropic-ratelimit-tokens-reset",
        "anthropic-ratelimit-tokens-remaining",
        "retry-after",
        "retry-after-ms",
    ]
)
header_values = st.one_of(
    st.text(max_size=40),
    st.integers(-(10**30), 10**30).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(str),
    st.binary(max_size=20).map(lambda b: b.decode("latin-1")),
)


@settings(max_examples=300)
@given(st.lists(st.tuples(header_names, header_values), max_size=12), st.sampled_from([ANTHROPIC_SPEC, OPENAI_SPEC]))
def test_garbage_headers_never_raise(pairs: list[tuple[str, str]], spec: RateLimitSpec) -> None:
    snap = parse_headers(spec, pairs, 5.0, WALL)
    for r in snap.resources.values():
        assert r.limit is None or r.limit > 0
        assert r.remaining is None or r.remaining >= 0
        assert r.reset_at is None or 5.0 <= r.reset_at <= 5.0 + MAX_HORIZON
    assert snap.retry_after is None or 0 <= snap.retry_after <= MAX_HORIZON
    # And the tracker digests whatever came out.
    tr = RateLimitTracker(rpm=100)
    tr.observe(snap)
    assert tr.reserve(5.0, 10) >= 0


def test_spec_validation_messages_name_field() -> None:
    with pytest.raises(ValueError, match="reset_format"):
        attrs.evolve(OPENAI_SPEC, reset_format="iso")
    with pytest.raises(ValueError, match="limit.*resource"):
        attrs.evolve(OPENAI_SPEC, limit="x-ratelimit-limit")
    with pytest.raises(ValueError, match="resources"):
        attrs.evolve(OPENAI_SPEC, resources=())


# ---------------------------------------------------------------- tracker


def _snap(at: float, **res: ResourceLimit) -> RateLimitSnapshot:
    return RateLimitSnapshot(at=at, resources={k.replace("_", "-"): v for k, v in res.items()})


def test_no_knowledge_admits() -> None:
    tr = RateLimitTracker()
    assert all(tr.reserve(float(i), 1000) == 0 for i in range(100))


def test_remaining_requests_are_spent_locally_then_wait_for_reset() -> None:
    tr = RateLimitTracker(refill="reset")
    tr.observe(_snap(0.0, requests=ResourceLimit(10, 3, 20.0)))
    assert [tr.reserve(1.0) for _ in range(3)] == [0, 0, 0]
    assert tr.reserve(1.0) == pytest.approx(19.0)
    # Waiting charged nothing; at the reset the bucket is full again.
    assert tr.reserve(20.0) == 0
    assert tr.statistics(20.0).resources["requests"].remaining == 9


def test_tokens_exceeding_remaining_wait() -> None:
    tr = RateLimitTracker(refill="reset")
    tr.observe(_snap(0.0, tokens=ResourceLimit(10000, 500, 30.0)))
    assert tr.reserve(0.0, 400) == 0
    assert tr.reserve(0.0, 400) == pytest.approx(30.0)
    # A small one still fits in what is left.
    assert tr.reserve(0.0, 100) == 0


def test_linear_refill_admits_before_full_reset() -> None:
    tr = RateLimitTracker()  # linear by default
    # 6000 of 60000 left, full in 54 s: 1000 tokens/s come back.
    tr.observe(_snap(0.0, tokens=ResourceLimit(60000, 6000, 54.0)))
    assert tr.reserve(0.0, 6000) == 0
    assert tr.reserve(0.0, 2000) == pytest.approx(2.0)
    assert tr.reserve(2.0, 2000) == 0


def test_request_bigger_than_bucket_waits_for_full_bucket_not_forever() -> None:
    tr = RateLimitTracker(refill="reset")
    tr.observe(_snap(0.0, tokens=ResourceLimit(1000, 10, 5.0)))
    assert tr.reserve(0.0, 50_000) == pytest.approx(5.0)
    assert tr.reserve(5.0, 50_000) == 0


def test_output_tokens_only_charged_when_estimated() -> None:
    tr = RateLimitTracker(refill="reset")
    tr.observe(_snap(0.0, output_tokens=ResourceLimit(1000, 0, 10.0)))
    # Anthropic counts output as produced: an input-only request passes...
    assert tr.reserve(0.0, 500) == 0
    # ...one that declares output waits.
    assert tr.reserve(0.0, 500, output_tokens=200) == pytest.approx(10.0)


def test_newer_snapshot_overwrites_older_is_ignored() -> None:
    tr = RateLimitTracker(refill="reset")
    tr.observe(_snap(5.0, requests=ResourceLimit(10, 0, 60.0)))
    tr.observe(_snap(1.0, requests=ResourceLimit(10, 10, 60.0)))  # stale
    assert tr.reserve(5.0) == pytest.approx(55.0)
    tr.observe(_snap(6.0, requests=ResourceLimit(10, 5, 60.0)))
    assert tr.reserve(6.0) == 0


def test_remaining_without_reset_is_not_trusted_forever() -> None:
    tr = RateLimitTracker(refill="reset")
    tr.observe(_snap(0.0, requests=ResourceLimit(None, 0, None)))
    w = tr.reserve(0.0)
    assert 0 < w <= 60.0
    assert tr.reserve(w) == 0


def test_retry_after_pauses_this_tracker_only() -> None:
    a, b = RateLimitTracker(), RateLimitTracker()
    a.observe(RateLimitSnapshot(at=0.0, retry_after=12.0))
    assert a.reserve(0.0) == pytest.approx(12.0)
    assert b.reserve(0.0) == 0
    assert a.reserve(12.0) == 0
    # Pauses only ever extend.
    a.pause_until(30.0)
    a.pause_until(20.0)
    assert a.reserve(12.0) == pytest.approx(18.0)


def test_backoff_429_is_exponential_capped_and_reset_by_success() -> None:
    tr = RateLimitTracker(backoff_base=0.5, backoff_max=8.0)
    delays = [tr.backoff_429(0.0) for _ in range(8)]
    assert delays == [0.5, 1, 2, 4, 8, 8, 8, 8]
    assert 60.0 not in delays
    assert tr.reserve(0.0) == pytest.approx(8.0)
    tr.record_success()
    assert tr.backoff_429(100.0) == 0.5


def test_backoff_429_jitter_stays_in_half_to_full() -> None:
    tr = RateLimitTracker(backoff_base=1.0, backoff_max=64.0)
    rng = random.Random(7)
    for n in range(7):
        d = tr.backoff_429(0.0, rng)
        assert 2**n / 2 <= d <= 2**n


def test_configured_rpm_never_exceeded_in_any_60s_window() -> None:
    tr = RateLimitTracker(rpm=10)
    admitted: list[float] = []
    t = 0.0
    while t < 300:
        if tr.reserve(t) == 0:
            admitted.append(t)
        t += 0.7
    for i, start in enumerate(admitted):
        assert sum(1 for x in admitted[i:] if x < start + 60) <= 10
    # And the pace is not needlessly slow: ~10 per minute.
    assert len(admitted) >= 45


@settings(max_examples=150, deadline=None)
@given(
    rpm=st.integers(1, 30),
    tpm=st.integers(100, 5000),
    steps=st.lists(st.tuples(st.floats(0, 20), st.integers(0, 3000)), min_size=1, max_size=120),
)
def test_sliding_window_property(rpm: int, tpm: int, steps: list[tuple[float, int]]) -> None:
    tr = RateLimitTracker(rpm=rpm, tpm=tpm)
    t = 0.0
    log: list[tuple[float, int]] = []
    for dt, tokens in steps:
        t += dt
        wait = tr.reserve(t, tokens)
        assert wait >= 0
        if wait == 0:
            log.append((t, tokens))
        else:
            # Following the advice admits.
            assert tr.reserve(t + wait, tokens) == 0
            t += wait
            log.append((t, tokens))
    for i, (start, _) in enumerate(log):
        inside = [n for x, n in log[i:] if x < start + 60]
        assert len(inside) <= rpm
        # A request bigger than the whole tpm only goes alone into an empty window.
        assert sum(min(n, tpm) for n in inside) <= tpm


def test_refund_gives_back() -> None:
    tr = RateLimitTracker(rpm=1, refill="reset")
    tr.observe(_snap(0.0, requests=ResourceLimit(5, 1, 30.0)))
    assert tr.reserve(0.0, 10) == 0
    assert tr.reserve(0.0, 10) > 0
    tr.refund(0.0, 10)
    assert tr.reserve(0.0, 10) == 0


def test_statistics_snapshot_is_frozen() -> None:
    tr = RateLimitTracker(rpm=60, tpm=1000)
    tr.reserve(0.0, 10)
    tr.observe(parse_headers(OPENAI_SPEC, {"x-ratelimit-limit-requests": "60", "x-ratelimit-remaining-requests": "7", "x-ratelimit-reset-requests": "3s"}, 0.0, WALL))
    s = tr.statistics(0.0)
    assert s.requests_in_window == 1 and s.tokens_in_window == 10
    assert s.resources["requests"].remaining == 7
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        s.admitted = 3  # type: ignore[misc]


def test_tracker_validators_name_field() -> None:
    with pytest.raises(ValueError, match="rpm"):
        RateLimitTracker(rpm=0)
    with pytest.raises(ValueError, match="refill"):
        RateLimitTracker(refill="sometimes")


@settings(max_examples=100, deadline=None)
@given(
    events=st.lists(
        st.one_of(
            st.tuples(st.just("obs"), st.integers(1, 100), st.integers(0, 150), st.floats(0, 100)),
            st.tuples(st.just("res"), st.integers(0, 200)),
            st.tuples(st.just("tick"), st.floats(0, 30)),
        ),
        max_size=60,
    )
)
def test_wait_advice_is_sound(events: list[tuple]) -> None:
    """Whatever happened, waiting the advised time then asking again eventually admits,
    and the level never goes negative or above the limit."""
    tr = RateLimitTracker()
    now = 0.0
    for ev in events:
        if ev[0] == "obs":
            tr.observe(_snap(now, requests=ResourceLimit(ev[1], min(ev[2], ev[1]), now + ev[3])))
        elif ev[0] == "res":
            for _ in range(5):
                w = tr.reserve(now, ev[1])
                if w == 0:
                    break
                assert math.isfinite(w)
                now += w
            else:
                pytest.fail("advice never admitted")
        else:
            now += ev[1]
        for r in tr.statistics(now).resources.values():
            assert r.remaining is None or 0 <= r.remaining <= (r.limit if r.limit is not None else math.inf)


def test_rfc3339_variants() -> None:
    stamp = datetime(2024, 1, 1, 0, 0, 9, 250000, tzinfo=timezone.utc)
    for text in (stamp.isoformat(), "2024-01-01T00:00:09.25Z", "2024-01-01T00:00:09.250000000Z"[:26] + "Z"):
        snap = parse_headers(ANTHROPIC_SPEC, {"anthropic-ratelimit-requests-reset": text}, 0.0, WALL)
        assert snap.get("requests").reset_at == pytest.approx(9.25)


# -- which refill the provider follows ------------------------------------------


def test_a_per_minute_bucket_is_trusted_to_refill() -> None:
    tr = RateLimitTracker()
    # 5 of 50 used: a per-minute bucket is full again 6 s later.
    tr.observe(_snap(0.1, requests=ResourceLimit(50, 45, 0.1 + 6.0)), sent_at=0.0)
    assert not tr.state.sliding
    assert tr.state.learned_rpm == 50


def test_a_whole_window_reset_after_a_small_deficit_means_a_sliding_window() -> None:
    tr = RateLimitTracker()
    tr.state.log.append((0.0, 0))  # the admission that carried the snapshot
    # 1 of 30 used, and its slot frees only 10 s later: a per-minute bucket
    # would be full again in 2 s.  The provider keeps requests for a window.
    tr.observe(_snap(0.1, requests=ResourceLimit(30, 29, 10.0)), sent_at=0.0)
    assert tr.state.sliding
    assert tr.state.learned_window == pytest.approx(10.0)
    # The learned limit holds as a sliding window of the learned length: 29
    # more fit now, the next waits for the first admission to leave it.
    assert all(tr.reserve(0.2 + i / 100) == 0 for i in range(29))
    assert tr.wait_time(0.6) == pytest.approx(10.0 - 0.6)


def test_an_unexpected_429_switches_to_the_sliding_window() -> None:
    tr = RateLimitTracker()
    tr.limit_hit()  # nothing known yet: no conclusion
    assert not tr.state.sliding
    tr.observe(_snap(1.0, requests=ResourceLimit(50, 20, 1.0 + 36.0)), sent_at=0.5)
    assert not tr.state.sliding  # 30 used, full in 36 s: a bucket's answer
    tr.limit_hit()
    assert tr.state.sliding


def test_refused_admissions_leave_the_log_and_counted_ones_move_to_arrival() -> None:
    tr = RateLimitTracker(rpm=2)
    assert tr.reserve(0.0, 5) == 0 and tr.reserve(1.0, 7) == 0
    assert tr.wait_time(2.0) == pytest.approx(58.0)
    # The first was refused upstream (429): its slot is free again.
    assert tr.uncount(0.0, 5)
    assert not tr.uncount(0.0, 5)
    assert tr.wait_time(2.0) == 0
    # The second reached the provider a little later than admitted: its slot
    # frees a window after that, not after the admission.
    assert tr.reserve(2.0, 1) == 0
    assert tr.recount(1.0, 1.4, 7)
    assert tr.wait_time(3.0) == pytest.approx(61.4 - 3.0)
