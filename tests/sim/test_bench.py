"""``hivemind-trio bench --quick`` as CI runs it.

Asserts only what cannot be noise (every count from the mock's own attempt
log): through the proxy every agent survives, and the upstream never sees more
attempts than the proxy's retry rules allow -- at most ``max_attempts`` per
request the agents sent (429s, which the proxy waits out instead of counting
them, excepted) and at most what the lane's retry budget allows.  Makespans,
latencies and 429 shares are printed, never asserted.

The bench calls ``trio.run`` once per case, so these tests are synchronous.
"""

from __future__ import annotations

import json

import pytest

from hivemind_trio.sim.bench import QUICK_SCENARIOS, SCENARIOS, lower_bounds, main, plan


def test_quick_bench_through_the_proxy(tmp_path, capsys):
    rc = main(["--quick", "--targets", "proxy", "--out", str(tmp_path), "--no-chart", "--no-progress"])
    assert rc == 0
    table = capsys.readouterr().out
    print(table)
    report = json.loads((tmp_path / "bench.json").read_text())
    runs = report["runs"]
    assert {(r["scenario"], r["kind"]) for r in runs} == {(s, k) for s in QUICK_SCENARIOS for k in ("raw", "sdk")}
    for r in runs:
        name = f"{r['scenario']} proxy/{r['kind']}"
        assert not r["timed_out"], name
        assert r["agents_failed"] == 0, (name, r["deaths"], r["agents_detail"])
        assert r["turns_done"] == r["turns_planned"], name
        assert r["attempts"] - r["upstream_429"] <= r["requests_sent"] * r["max_attempts"], name
        assert r["excess_attempts"] == 0, name
        assert r["upstream_retries"] <= r["retries_allowed"], name
    assert "| micro-10 | proxy | raw |" in table
    # The summary next to the paper: its figures, and ours for both kinds
    # (no direct target here, so failure rates are the proxy's alone).
    assert "| micro-10 | 100 -> 10 | 0.0 | 0.0 | 0.0 / 0.0 |" in table
    assert "| replay-11 | 72.7 -> 18.2 | 0.0 | 0.0 |" in table


def test_plan_and_bounds():
    cases = plan(["replay-11", "micro-5"], ["direct", "proxy"], ["raw", "sdk"], ablation=True, repeat=2, seed=7)
    targets = {c.target for c in cases if c.scenario.name == "replay-11"}
    assert targets == {"direct", "proxy", "no-admission", "no-ratelimit", "no-aimd", "no-retry", "admission-only"}
    assert {c.target for c in cases if c.scenario.name == "micro-5"} == {"direct", "proxy"}
    assert sorted({c.seed for c in cases}) == [7, 8]
    # 160 requests at 50 RPM: the last can start at 3 windows, not 3.2.
    strict, paper = lower_bounds(SCENARIOS["micro-20"], tokens=0)
    assert strict == pytest.approx(180.0) and paper == pytest.approx(192.0)
