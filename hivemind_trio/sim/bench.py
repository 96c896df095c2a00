"""``hivemind-trio bench``: the paper's evaluation, reproduced (SCENARIOS.md).

What runs
---------
Each *case* is one scenario x one target x one agent kind x one repeat, in its
own ``trio.run``: the mock provider (a real HTTP server on a loopback port),
for proxy targets a real proxy (``open_proxy``: Hypercorn on another loopback
port) in front of it, and N agents (``sim.agents``) talking HTTP to the one or
the other.  Targets: ``direct`` (agents -> mock), ``proxy`` (agents -> proxy
-> mock, everything on) and the ablation variants, each the proxy with one
primitive switched off (``no-admission``, ``no-ratelimit``, ``no-aimd``,
``no-retry``) or with admission control only (``admission-only``).

Time
----
Every party reads time from Trio and sleeps through Trio: the mock (rate
window, latencies), the proxy (scheduler timers, retry back-off, AIMD, pauses,
queue deadlines), Hypercorn, httpx/httpcore timeouts, the agents' think time
and the SDK's back-off (``anyio.sleep``).  So one clock governs them all and
every scenario parameter stays in its paper units (60 s windows, 80 ms
latencies); all reported times are on that clock.  ``--time-scale S`` picks it:

* ``S = 1``: Trio's real clock, the reference.
* ``S = 0`` (default): :class:`IdleSkippingClock`: while anything runs,
  virtual time passes at the real rate, so CPU and loopback I/O cost exactly
  what they cost at S = 1; once every task has waited 2 real ms with no
  worker thread busy (loopback I/O lands within microseconds and every party
  lives in this one process), the clock jumps to the next timer.  Idle waiting -- rate
  windows, latencies, back-off -- is skipped, nothing else changes: every
  clock is scaled together, by skipping the same idle time for all.
* ``0 < S < 1``: ``MockClock(rate=1/S)``: everything that waits is shrunk by
  S, but real work is not: each real millisecond of CPU counts as 1/S
  virtual milliseconds, inflating turn latencies (more through the proxy,
  one hop more) and slot hold times under a concurrency cap.

Checked against S = 1 on micro-10 through the proxy, 3 seeds, both agent
kinds: S = 1 makespan 62.3 s [62.1-64.1] (sdk) / 61.6 s [61.5-62.3] (raw),
p50 turn latency 0.123 / 0.129 s; S = 0: 61.6 [61.4-63.4] / 61.7 [61.6-62.3],
p50 0.134 / 0.127 s, in 10 s of wall clock for all six.  S = 0.1: 65.0
[64.7-76.1] / 66.2 [66.2-68.2], p50 0.40 / 0.38 s; S = 0.02: 83 s, p50 1.9 s.
Through the proxy at seeds 1 and 2, S = 1 vs S = 0: replay-11 raw 64.5 / 68.1 s
vs 62.4 / 68.2 s, sdk 62.7 / 68.4 s vs 63.1 / 68.0 s (same 429 counts).
So S = 0 is the default and the other fractions are there only to see that.

The only clock not on Trio's is the wall clock behind Anthropic's RFC 3339
``anthropic-ratelimit-*-reset`` stamps: the proxy reads them against
``time.time()``.  Under a MockClock the bench's mock writes its stamps as
``time.time() + (reset - now)`` (the delay in virtual seconds), which is what
the mock's own anchor mapping gives on the real clock.

Counting
--------
Every figure about the upstream comes from the mock's own attempt log
(``provider.attempts``): attempts, 429s, 529s, 502s, resets, tokens.  Agents
name themselves in ``x-agent-id``, which the proxy forwards, so attempts are
attributed to agents on the server side.  Tokens *consumed* are input + output
of every attempt the mock admitted (429/529 rejections consume nothing).  An
agent that dies wastes every token it consumed: *wasted share* = tokens of
attempts by agents that died / tokens consumed.  Tokens of admitted attempts
that failed (502 after the input was read) are reported apart
(``fault_tokens_share``), since a surviving agent got its turn anyway.

Lower bound on the makespan: with ``R = N x T`` turns, a sliding RPM window
``W`` admits at most RPM requests in any W seconds, so the last turn cannot
start before ``floor((R - 1) / RPM) x W`` (and likewise for tokens with TPM);
``lower_bound`` is the larger of the two and of the critical path of the
slowest surviving agent (its measured upstream service times plus its think
times), which no scheduler can shorten.  The paper's
``max(R / RPM, tokens / TPM) x W`` is reported as ``lower_bound_paper``: it is
not a bound (R <= RPM turns fit in one instant), so a ratio below 1 against it
is no miracle.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import statistics
import sys
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import attrs
import trio
import trio.testing

from .agents import AGENT_KINDS, AgentResult, run_agent
from .mock import MockConfig, MockProvider, serve_mock

__all__ = [
    "ABLATIONS",
    "QUICK_SCENARIOS",
    "SCENARIOS",
    "TARGETS",
    "Case",
    "Scenario",
    "add_bench_arguments",
    "run_bench",
    "run_bench_from_args",
    "run_case",
]

THINK = 0.05  # seconds between an agent's turns
WINDOW = 60.0  # the providers' rate window
AUTOJUMP_CUSHION = 0.002  # real seconds every task must have waited before the clock jumps (S = 0)
DEFAULT_TIME_SCALE = 0.0
QUICK_TIME_SCALE = 0.0


@attrs.frozen
class Scenario:
    """One row of SCENARIOS.md's table (times in seconds)."""

    name: str
    agents: int
    turns: int
    rpm: int
    tpm: int
    latency: float
    jitter: float
    error_rate: float = 0.0
    reset_rate: float = 0.0
    cap: int = 0
    spike_rate: float = 0.0
    spike_factor: float = 5.0
    paper_proxy_cap: int = 5  # the paper's proxy setting (ours learns the limits itself)

    @property
    def faults(self) -> bool:
        return bool(self.error_rate or self.reset_rate)

    @property
    def requests(self) -> int:
        return self.agents * self.turns

    def mock_config(self, seed: int, *, charge_faults: bool = True) -> MockConfig:
        return MockConfig(
            rpm=self.rpm, tpm=self.tpm, cap=self.cap, error_rate=self.error_rate, reset_rate=self.reset_rate,
            latency=self.latency, jitter=self.jitter, spike_rate=self.spike_rate, spike_factor=self.spike_factor,
            window=WINDOW, seed=seed, charge_faults=charge_faults,
        )


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario("micro-5", 5, 8, 50, 100_000, 0.080, 0.050),
        Scenario("micro-10", 10, 8, 50, 100_000, 0.080, 0.050),
        Scenario("micro-20", 20, 8, 50, 100_000, 0.080, 0.050),
        Scenario("micro-50", 50, 6, 50, 100_000, 0.080, 0.050),
        Scenario("replay-11", 11, 8, 60, 200_000, 0.120, 0.060, error_rate=0.08, reset_rate=0.05, cap=5),
        Scenario("stress", 20, 10, 20, 50_000, 0.200, 0.050, error_rate=0.10, reset_rate=0.05, cap=3,
                 spike_rate=0.10, paper_proxy_cap=3),
        Scenario("latency-spike", 10, 10, 60, 100_000, 0.100, 0.030, spike_rate=0.20),
    )
}

QUICK_SCENARIOS = ("micro-10", "replay-11")

# Target -> scheduler switches (None: no proxy at all).
ABLATIONS: dict[str, dict[str, bool]] = {
    "no-admission": {"admission": False},
    "no-ratelimit": {"ratelimit": False},
    "no-aimd": {"aimd": False},
    "no-retry": {"retry": False},
    "admission-only": {"ratelimit": False, "aimd": False, "breaker": False, "retry": False,
                       "budgets": False, "priority": False},
}
TARGETS: dict[str, dict[str, bool] | None] = {"direct": None, "proxy": {}, **ABLATIONS}
ABLATION_SCENARIO = "replay-11"


@attrs.frozen
class Case:
    scenario: Scenario
    target: str
    kind: str
    seed: int
    repeat: int = 0
    charge_faults: bool = True  # see MockConfig.charge_faults


# --------------------------------------------------------------------- running


class _VirtualWallMock(MockProvider):
    """The mock under a MockClock: RFC 3339 reset stamps say "in (reset - now)
    virtual seconds" against the real wall clock the proxy reads them with."""

    def wall(self, t: float) -> float:
        return time.time() + (t - self.now())


class IdleSkippingClock(trio.abc.Clock):
    """Real rate while anything runs; skips idle waits (see :func:`skip_idle`).

    Trio's ``MockClock(rate=1, autojump_threshold=...)`` would do the same but
    jumps while a worker thread is busy (the SDK resolves its platform in
    one): a task waiting for a thread looks blocked to Trio, yet real work is
    under way, and a jump then lands on whatever timer is next -- once, the
    bench's own guard, 2960 s ahead.  This clock's jumps are made by
    :func:`skip_idle`, which waits for the threads.
    """

    def __init__(self) -> None:
        self._offset = 0.0

    def start_clock(self) -> None:
        self._offset = -time.perf_counter()  # starts at 0

    def current_time(self) -> float:
        return time.perf_counter() + self._offset

    def deadline_to_sleep_time(self, deadline: float) -> float:
        return max(0.0, deadline - self.current_time())

    def jump(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("time can't go backwards")
        self._offset += seconds


async def skip_idle(clock: IdleSkippingClock, cushion: float = AUTOJUMP_CUSHION) -> None:
    """Run beside a case: once every other task has waited ``cushion`` real
    seconds (no I/O arrived, nothing runnable) and no worker thread is busy,
    jump the clock to the next timer.  Loopback I/O between tasks of this one
    process lands within microseconds, so an idle cushion means only timers
    are left to wait for."""
    threads = trio.to_thread.current_default_thread_limiter()
    while True:
        await trio.testing.wait_all_tasks_blocked(cushion)
        if threads.borrowed_tokens:
            await trio.sleep(cushion)
            continue
        jump = trio.lowlevel.current_statistics().seconds_to_next_deadline
        if 0 < jump < math.inf:
            clock.jump(jump)


def _clock(time_scale: float) -> trio.abc.Clock | None:
    if time_scale == 1:
        return None
    if time_scale == 0:
        return IdleSkippingClock()
    return trio.testing.MockClock(rate=1.0 / time_scale)


def _proxy_config(base: Any, upstream: str, switches: dict[str, bool]) -> Any:
    from ..config import Config, SchedulerConfig, ServerConfig

    cfg = base if base is not None else Config(server=ServerConfig(shutdown_grace=1.0, log_level="warning"))
    return attrs.evolve(
        cfg, upstream=upstream, routes=(), scheduler=attrs.evolve(cfg.scheduler or SchedulerConfig(), **switches),
    )


def _guard(s: Scenario) -> float:
    """Virtual seconds after which a case is stopped (only reached when something is broken)."""
    return 20 * WINDOW * max(1.0, s.requests / s.rpm) + 1200.0


async def _run_case_async(case: Case, *, virtual: bool, base_config: Any, stream: bool, max_tokens: int,
                          on_turns: Callable[[int], None]) -> dict[str, Any]:
    s = case.scenario
    provider_cls = _VirtualWallMock if virtual else MockProvider
    provider = provider_cls(s.mock_config(case.seed, charge_faults=case.charge_faults))
    results: list[AgentResult] = []
    proxy_status: dict[str, Any] | None = None
    timed_out = False
    max_attempts: int | None = None
    retry_budget: float | None = None

    async def agents(url: str) -> float:
        nonlocal timed_out
        t0 = trio.current_time()
        with trio.move_on_after(_guard(s)) as scope:
            async with trio.open_nursery() as nursery:
                for i in range(s.agents):
                    res = AgentResult(name=f"agent-{i:02d}", kind=case.kind, turns=s.turns)
                    results.append(res)

                    async def one(res: AgentResult = res) -> None:
                        await run_agent(case.kind, url, res.name, s.turns, rng=random.Random(f"{case.seed}:{res.name}"),
                                        think=THINK, max_tokens=max_tokens, stream=stream,
                                        on_turn=lambda ok: on_turns(1), result=res)
                        if res.died is not None:
                            on_turns(s.turns - res.turns_done)

                    nursery.start_soon(one)
        timed_out = scope.cancelled_caught
        for res in results:
            if res.died is None and res.turns_done < res.turns:
                res.died = "stopped by the bench's guard"
                res.finished = trio.current_time()
        return t0

    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve_mock, provider)
        mock_url = f"http://127.0.0.1:{port}"
        switches = TARGETS[case.target]
        if switches is None:
            t0 = await agents(mock_url)
        else:
            from ..runtime.serve import open_proxy

            cfg = _proxy_config(base_config, mock_url, switches)
            max_attempts = cfg.scheduler.max_attempts if cfg.scheduler.retry else 1
            retry_budget = cfg.scheduler.retry_budget
            async with open_proxy(cfg) as proxy:
                t0 = await agents(proxy.url)
                try:
                    proxy_status = proxy.app.runtime.status()
                except Exception:  # noqa: BLE001 - diagnostics only
                    proxy_status = None
        t_end = max((r.finished for r in results), default=trio.current_time())
        nursery.cancel_scope.cancel()
    metrics = summarize(s, results, provider, t0=t0, t_end=t_end, max_attempts=max_attempts, retry_budget=retry_budget)
    metrics["timed_out"] = timed_out
    if proxy_status is not None:
        metrics["proxy_lanes"] = _json_safe(proxy_status.get("lanes"))
    metrics["agents_detail"] = [
        {"name": r.name, "turns_done": r.turns_done, "requests_sent": r.requests_sent, "died": r.died}
        for r in sorted(results, key=lambda r: r.name)
    ]
    return metrics


def _json_safe(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def run_case(case: Case, *, time_scale: float, base_config: Any = None, stream: bool = False,
             max_tokens: int = 1024, on_turns: Callable[[int], None] = lambda n: None) -> dict[str, Any]:
    """Run one case in its own ``trio.run``; returns its metrics (virtual seconds)."""
    clock = _clock(time_scale)

    async def main() -> dict[str, Any]:
        async with trio.open_nursery() as nursery:
            if isinstance(clock, IdleSkippingClock):
                nursery.start_soon(skip_idle, clock)
            result = await _run_case_async(case, virtual=clock is not None, base_config=base_config, stream=stream,
                                           max_tokens=max_tokens, on_turns=on_turns)
            nursery.cancel_scope.cancel()
        return result

    wall0 = time.perf_counter()
    metrics = trio.run(main, clock=clock)
    metrics["wall_s"] = round(time.perf_counter() - wall0, 3)
    metrics.update(scenario=case.scenario.name, target=case.target, kind=case.kind, seed=case.seed, repeat=case.repeat)
    return metrics


# --------------------------------------------------------------------- counting

_REJECTED = frozenset({"429", "529", "quota", "too_large", "400"})


def _percentile(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    xs = sorted(values)
    k = (len(xs) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def lower_bounds(s: Scenario, tokens: int) -> tuple[float, float]:
    """(strict lower bound, the paper's formula) on the makespan, seconds."""
    n = s.requests
    strict = max(
        math.floor((n - 1) / s.rpm) * WINDOW if s.rpm else 0.0,
        (math.ceil(tokens / s.tpm) - 1) * WINDOW if s.tpm and tokens else 0.0,
        (s.turns - 1) * THINK,
    )
    paper = max(n / s.rpm if s.rpm else 0.0, tokens / s.tpm if s.tpm else 0.0) * WINDOW
    return strict, paper


def summarize(s: Scenario, agents: list[AgentResult], provider: MockProvider, *, t0: float, t_end: float,
              max_attempts: int | None, retry_budget: float | None) -> dict[str, Any]:
    """The report's figures for one case, upstream ones from the mock's own log."""
    log = [a for a in provider.attempts if a.path.endswith("/messages")]
    dead = {r.name for r in agents if r.died is not None}
    statuses = Counter(a.status for a in log)
    outcomes = Counter(a.outcome for a in log)

    def consumed(a: Any) -> int:
        return 0 if a.outcome in _REJECTED else a.input_tokens + a.output_tokens

    tokens_consumed = sum(consumed(a) for a in log)
    tokens_dead = sum(consumed(a) for a in log if a.agent in dead)
    tokens_faults = sum(consumed(a) for a in log if a.outcome not in _REJECTED and a.outcome != "ok")
    ok = [a for a in log if a.outcome == "ok"]
    useful = sum(a.input_tokens + a.output_tokens for a in ok if a.agent not in dead)
    delivered_out = sum(a.output_tokens for a in ok)
    # Tokens one full run of every turn needs, for the token bound: measured
    # per successful turn, extrapolated to the turns not done.
    per_turn = (sum(a.input_tokens + a.output_tokens for a in ok) / len(ok)) if ok else 0.0
    lb, lb_paper = lower_bounds(s, round(per_turn * s.requests))
    # The critical path no scheduler can shorten: an agent's turns are
    # sequential, each at least as long as the provider took to answer it.
    service: dict[str, float] = {}
    for a in ok:
        service[a.agent] = service.get(a.agent, 0.0) + (a.t_end - a.t)
    path = max((v + (s.turns - 1) * THINK for k, v in service.items() if k not in dead), default=0.0)
    lb = max(lb, path)
    makespan = max(0.0, t_end - t0)
    # Attempts the mock's window counted (faulted ones too unless the mock
    # was told not to charge them).
    charged = provider.config.charge_faults
    admitted = sum(1 for a in log if a.outcome not in _REJECTED and (charged or a.outcome not in ("502", "reset")))
    admitted_bound = max(lb, math.floor((admitted - 1) / s.rpm) * WINDOW) if s.rpm and admitted else lb
    latencies = [x for r in agents for x in r.latencies]
    requests_sent = sum(r.requests_sent for r in agents)
    attempts = len(log)
    n429, n529 = statuses.get(429, 0), statuses.get(529, 0)
    # "Once the limit is known": after the first answer that carried the
    # rate-limit headers (every answer with a status does).
    known_at = min((a.t_end for a in log if a.status), default=math.inf)
    late = [a for a in log if a.t > known_at]
    late_429 = sum(1 for a in late if a.status == 429)
    failed = len(dead)
    out: dict[str, Any] = {
        "agents": len(agents),
        "agents_failed": failed,
        "failure_rate": failed / len(agents) if agents else 0.0,
        "deaths": dict(Counter(r.died for r in agents if r.died is not None)),
        "turns_planned": s.requests,
        "turns_done": sum(r.turns_done for r in agents),
        "requests_sent": requests_sent,
        "attempts": attempts,
        "attempts_ok": outcomes.get("ok", 0),
        "upstream_429": n429,
        "upstream_529": n529,
        "upstream_502": statuses.get(502, 0),
        "upstream_resets": outcomes.get("reset", 0),
        "share_429": n429 / attempts if attempts else 0.0,
        "late_429": late_429,
        "share_429_known": late_429 / len(late) if late else 0.0,
        "tokens_consumed": tokens_consumed,
        "tokens_useful": useful,
        "tokens_wasted": tokens_dead,
        "wasted_share": tokens_dead / tokens_consumed if tokens_consumed else 0.0,
        "fault_tokens_share": tokens_faults / tokens_consumed if tokens_consumed else 0.0,
        "makespan_s": makespan,
        "lower_bound_s": lb,
        "lower_bound_paper_s": lb_paper,
        "makespan_ratio": makespan / lb if lb else None,
        # The same request bound over the attempts the mock admitted (faulted
        # ones included: a 502 or a reset uses up its slot in the window), so
        # what is left of the ratio is the scheduler's, not the faults' tax.
        "lower_bound_admitted_s": admitted_bound,
        "makespan_ratio_admitted": makespan / admitted_bound if admitted_bound else None,
        "makespan_ratio_paper": makespan / lb_paper if lb_paper else None,
        "latency_p50_s": _percentile(latencies, 0.5),
        "latency_p95_s": _percentile(latencies, 0.95),
        "tokens_per_s": delivered_out / makespan if makespan else 0.0,
        "peak_in_flight": provider.peak_in_flight,
        # The mock's log, compact: [start, end, status, outcome, agent], from the run's start.
        "attempt_log": [[round(a.t - t0, 4), round(a.t_end - t0, 4), a.status, a.outcome, a.agent] for a in log],
    }
    if max_attempts is not None:
        # Each request the agents sent may take at most max_attempts upstream
        # attempts, 429s not counted (the proxy waits those out; README).
        allowed = requests_sent * max_attempts
        out["max_attempts"] = max_attempts
        out["attempts_allowed"] = allowed
        out["excess_attempts"] = max(0, attempts - n429 - allowed)
        out["excess_attempts_all"] = max(0, attempts - allowed)
        out["retry_budget"] = retry_budget
        # The lane's retry budget (core.retry.RetryBudget): over a run, retries
        # <= ratio x requests + capacity + floor_per_second x elapsed.
        from ..core.retry import RetryBudget

        rb = RetryBudget(ratio=retry_budget or 0.0)
        out["upstream_retries"] = attempts - requests_sent
        out["retries_allowed"] = rb.ratio * requests_sent + rb.capacity + rb.floor_per_second * makespan
        out["upstream_client_gone"] = outcomes.get("client_gone", 0)
    return out


# ------------------------------------------------------------------ aggregating

# Metrics aggregated over repeats (median, min, max).
_NUMERIC = (
    "failure_rate", "wasted_share", "fault_tokens_share", "makespan_s", "lower_bound_s", "lower_bound_paper_s",
    "makespan_ratio", "makespan_ratio_paper", "makespan_ratio_admitted", "attempts", "requests_sent", "upstream_429", "upstream_529",
    "upstream_502", "upstream_resets", "share_429", "late_429", "share_429_known", "latency_p50_s", "latency_p95_s",
    "tokens_per_s", "tokens_consumed", "tokens_wasted", "agents_failed", "turns_done", "wall_s",
)


def aggregate(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in _NUMERIC:
        values = [r[key] for r in runs if r.get(key) is not None]
        if values:
            out[key] = {"median": statistics.median(values), "min": min(values), "max": max(values)}
    out["seeds"] = [r["seed"] for r in runs]
    out["timed_out"] = sum(1 for r in runs if r.get("timed_out"))
    out["excess_attempts"] = max((r.get("excess_attempts", 0) for r in runs), default=0)
    return out


# --------------------------------------------------------------------- output


def _fmt(stat: dict[str, float] | None, fmt: str, *, spread: bool, scale: float = 1.0) -> str:
    if stat is None:
        return "-"
    text = format(stat["median"] * scale, fmt)
    if spread and stat["min"] != stat["max"]:
        text += f" [{format(stat['min'] * scale, fmt)}-{format(stat['max'] * scale, fmt)}]"
    return text


# ÷LB: against the strict bound; ÷LB paper: against max(R/RPM, tokens/TPM) x W;
# ÷LB adm: against the request bound over the attempts the mock admitted.
_COLUMNS = (
    "scenario", "target", "agents", "fail %", "wasted %", "makespan s", "LB s", "÷LB", "÷LB paper", "÷LB adm",
    "attempts", "429", "529", "p50 s", "p95 s", "tok/s",
)


def markdown_table(groups: list[dict[str, Any]], *, repeat: int) -> str:
    spread = repeat > 1
    lines = ["| " + " | ".join(_COLUMNS) + " |", "|" + "---|" * len(_COLUMNS)]
    for g in groups:
        a = g["aggregate"]
        row = [
            g["scenario"], g["target"], g["kind"],
            _fmt(a.get("failure_rate"), ".1f", spread=spread, scale=100),
            _fmt(a.get("wasted_share"), ".1f", spread=spread, scale=100),
            _fmt(a.get("makespan_s"), ".1f", spread=spread),
            _fmt(a.get("lower_bound_s"), ".1f", spread=False),
            _fmt(a.get("makespan_ratio"), ".3f", spread=spread),
            _fmt(a.get("makespan_ratio_paper"), ".3f", spread=False),
            _fmt(a.get("makespan_ratio_admitted"), ".3f", spread=False),
            _fmt(a.get("attempts"), ".0f", spread=spread),
            _fmt(a.get("upstream_429"), ".0f", spread=spread),
            _fmt(a.get("upstream_529"), ".0f", spread=spread),
            _fmt(a.get("latency_p50_s"), ".3f", spread=False),
            _fmt(a.get("latency_p95_s"), ".3f", spread=False),
            _fmt(a.get("tokens_per_s"), ".1f", spread=False),
        ]
        if a.get("timed_out"):
            row[1] += " (TIMED OUT)"
        lines.append("| " + " | ".join(str(c) for c in row) + " |")
    return "\n".join(lines)


# The paper's agent failure rates in % (raw agents, single runs): direct ->
# through its proxy, and its ablation on replay-11 (SCENARIOS.md).
PAPER_FAILURES: dict[str, tuple[float, float]] = {
    "micro-5": (0, 0), "micro-10": (100, 10), "micro-20": (100, 10), "micro-50": (100, 0),
    "replay-11": (72.7, 18.2), "stress": (100, 10), "latency-spike": (100, 0),
}
PAPER_ABLATION: dict[str, float] = {"no-retry": 63.6, "admission-only": 81.8}


def summary_table(groups: list[dict[str, Any]], *, repeat: int) -> str:
    """One row per scenario (and ablation variant), ours next to the paper's.

    Failure rates are direct -> through the proxy; ratios and 429s are the
    proxy's, raw / sdk.  Medians over the repeats; the ratio's range is shown
    when there is more than one.
    """
    by = {(g["scenario"], g["target"], g["kind"]): g["aggregate"] for g in groups}
    spread = repeat > 1

    def stat(sc: str, target: str, kind: str, key: str, fmt: str, scale: float = 1.0, show: bool = False) -> str:
        a = by.get((sc, target, kind))
        return "-" if a is None else _fmt(a.get(key), fmt, spread=show and spread, scale=scale)

    def fails(sc: str, target: str, kind: str) -> str:
        if (sc, target, kind) not in by:
            return "-"
        proxy = stat(sc, target, kind, "failure_rate", ".1f", 100)
        if (sc, "direct", kind) not in by or target != "proxy":
            return proxy
        return f"{stat(sc, 'direct', kind, 'failure_rate', '.1f', 100)} -> {proxy}"

    def per_kind(sc: str, target: str, key: str, fmt: str, scale: float = 1.0, show: bool = False) -> str:
        return " / ".join(stat(sc, target, k, key, fmt, scale, show) for k in AGENT_KINDS)

    def n429(sc: str, target: str) -> str:
        return " / ".join(
            f"{stat(sc, target, k, 'upstream_429', '.0f')} of {stat(sc, target, k, 'attempts', '.0f')}"
            for k in AGENT_KINDS
        )

    head = ("scenario", "paper fail % (raw)", "fail % raw", "fail % sdk", "wasted % raw / sdk",
            "÷LB raw / sdk", "÷LB adm raw / sdk", "429s raw / sdk")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    seen = list(dict.fromkeys((g["scenario"], g["target"]) for g in groups if g["target"] != "direct"))
    for sc, target in seen:
        if target == "proxy":
            name = sc
            paper = PAPER_FAILURES.get(sc)
            paper_text = f"{paper[0]:g} -> {paper[1]:g}" if paper else "-"
        else:
            name = f"{sc} {target}"
            paper_text = f"{PAPER_ABLATION[target]:g}" if target in PAPER_ABLATION else "-"
        lines.append("| " + " | ".join((
            name, paper_text, fails(sc, target, "raw"), fails(sc, target, "sdk"),
            per_kind(sc, target, "wasted_share", ".1f", 100),
            per_kind(sc, target, "makespan_ratio", ".3f", show=True),
            per_kind(sc, target, "makespan_ratio_admitted", ".3f"),
            n429(sc, target),
        )) + " |")
    return "\n".join(lines)


def write_chart(groups: list[dict[str, Any]], path: Path) -> str | None:
    """Failure rate and makespan per scenario, direct vs proxy; None or why not."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install 'hivemind-trio[bench]'); no chart written"
    main = [g for g in groups if g["target"] in ("direct", "proxy")]
    scenarios = list(dict.fromkeys(g["scenario"] for g in main))
    series = list(dict.fromkeys((g["target"], g["kind"]) for g in main))
    if not scenarios or not series:
        return "nothing to chart"
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(max(8, 1.6 * len(scenarios)), 8), sharex=True)
    width = 0.8 / len(series)
    by = {(g["scenario"], g["target"], g["kind"]): g["aggregate"] for g in main}
    colors = {"direct": ("#d62728", "#ff9896"), "proxy": ("#1f77b4", "#aec7e8")}
    for j, (target, kind) in enumerate(series):
        xs, fails, spans, errs = [], [], [], []
        for i, sc in enumerate(scenarios):
            a = by.get((sc, target, kind))
            if a is None:
                continue
            xs.append(i - 0.4 + width * (j + 0.5))
            fails.append(a["failure_rate"]["median"] * 100)
            m = a["makespan_s"]
            spans.append(m["median"])
            errs.append((m["median"] - m["min"], m["max"] - m["median"]))
        color = colors.get(target, ("#7f7f7f", "#c7c7c7"))[0 if kind == "raw" else 1]
        label = f"{target} / {kind}"
        ax1.bar(xs, fails, width, label=label, color=color)
        ax2.bar(xs, spans, width, label=label, color=color,
                yerr=list(zip(*errs)) if errs else None, capsize=2)
    lbs = [next((by[k]["lower_bound_s"]["median"] for k in by if k[0] == sc), 0) for sc in scenarios]
    ax2.scatter(range(len(scenarios)), lbs, marker="_", s=600, color="black", zorder=3, label="lower bound")
    ax1.set_ylabel("agent failure rate (%)")
    ax1.set_ylim(0, 105)
    ax1.legend(fontsize=8, ncol=2, loc="upper left")
    ax2.set_ylabel("makespan (s, median, min-max)")
    ax2.legend(fontsize=8, ncol=2)
    ax2.set_xticks(range(len(scenarios)))
    ax2.set_xticklabels(scenarios)
    fig.suptitle("hivemind-trio bench: direct vs proxy")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


# ------------------------------------------------------------------- progress


class _Progress:
    """A progress bar on stderr: rich when installed, else one line per case."""

    def __init__(self, total_turns: int, cases: int) -> None:
        self.total, self.cases, self.done_cases = total_turns, cases, 0
        self._rich = None
        try:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            console = Console(stderr=True)
            if console.is_terminal:
                self._rich = Progress(
                    TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("turns"),
                    TimeElapsedColumn(), console=console, transient=False,
                )
                self._task = self._rich.add_task("bench", total=total_turns)
                self._rich.start()
        except ImportError:
            pass

    def start_case(self, label: str) -> None:
        if self._rich is not None:
            self._rich.update(self._task, description=f"[{self.done_cases + 1}/{self.cases}] {label}")
        else:
            print(f"[{self.done_cases + 1}/{self.cases}] {label} ...", file=sys.stderr, flush=True)

    def turns(self, n: int) -> None:
        if self._rich is not None and n:
            self._rich.advance(self._task, n)

    def end_case(self, summary: str) -> None:
        self.done_cases += 1
        if self._rich is not None:
            self._rich.console.log(summary)
        else:
            print(f"    {summary}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._rich is not None:
            self._rich.stop()


# ------------------------------------------------------------------------ bench


def plan(scenarios: Iterable[str], targets: Iterable[str], kinds: Iterable[str], *, ablation: bool,
         repeat: int, seed: int, charge_faults: bool = True) -> list[Case]:
    """Every case to run, in order: scenario, target, kind, repeat."""
    cases = []
    targets = list(targets)
    for name in scenarios:
        sc = SCENARIOS[name]
        ts = list(targets)
        if ablation and name == ABLATION_SCENARIO:
            ts += [t for t in ABLATIONS if t not in ts]
        for target in ts:
            for kind in kinds:
                for r in range(repeat):
                    cases.append(Case(sc, target, kind, seed + r, r, charge_faults))
    return cases


def run_bench(cases: list[Case], *, time_scale: float, base_config: Any = None, stream: bool = False,
              max_tokens: int = 1024, progress: bool = True) -> dict[str, Any]:
    """Run every case; returns the whole report (what the JSON file holds)."""
    bar = _Progress(sum(c.scenario.requests for c in cases), len(cases)) if progress else None
    runs: list[dict[str, Any]] = []
    # The proxy's own log lines (warnings about retries given up, ...) would
    # tear the progress bar: they are kept, counted, in the report instead.
    captured: list[str] = []
    handler = _ListHandler(captured)
    loggers = [logging.getLogger(n) for n in ("hivemind_trio", "hypercorn.error", "httpx", "anthropic")]
    saved = [(lg, lg.level, lg.propagate) for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        lg.setLevel(logging.WARNING)
        lg.propagate = False
    try:
        for case in cases:
            label = f"{case.scenario.name} {case.target} {case.kind} seed={case.seed}"
            handler.case = label
            if bar:
                bar.start_case(label)
            m = run_case(case, time_scale=time_scale, base_config=base_config, stream=stream,
                         max_tokens=max_tokens, on_turns=bar.turns if bar else (lambda n: None))
            runs.append(m)
            if bar:
                ratio = m["makespan_ratio"]
                bar.end_case(
                    f"{label}: failed {m['agents_failed']}/{m['agents']}, makespan {m['makespan_s']:.1f} s"
                    f" ({'-' if ratio is None else f'{ratio:.3f}'}x LB), attempts {m['attempts']},"
                    f" 429 {m['upstream_429']}, 529 {m['upstream_529']} [{m['wall_s']:.1f} s wall]"
                )
    finally:
        if bar:
            bar.close()
        for lg, level, propagate in saved:
            lg.removeHandler(handler)
            lg.setLevel(level)
            lg.propagate = propagate
    groups: list[dict[str, Any]] = []
    for key in dict.fromkeys((r["scenario"], r["target"], r["kind"]) for r in runs):
        rs = [r for r in runs if (r["scenario"], r["target"], r["kind"]) == key]
        groups.append({"scenario": key[0], "target": key[1], "kind": key[2], "aggregate": aggregate(rs)})
    return {
        "time_scale": time_scale,
        "clock": "real" if time_scale == 1 else (
            "idle-skipping (real rate, idle waits skipped)" if time_scale == 0 else f"MockClock(rate={1 / time_scale:g})"),
        "stream": stream,
        "max_tokens": max_tokens,
        "think_s": THINK,
        "window_s": WINDOW,
        "scenarios": {n: attrs.asdict(SCENARIOS[n]) for n in dict.fromkeys(c.scenario.name for c in cases)},
        "groups": groups,
        "runs": runs,
        "log_warnings": dict(Counter(_shorten(m) for m in captured).most_common(30)),
        "log_errors": handler.errors,
    }


class _ListHandler(logging.Handler):
    """Keeps every warning's text, and the first errors in full with their case."""

    def __init__(self, sink: list[str]) -> None:
        super().__init__(logging.WARNING)
        self.sink = sink
        self.errors: list[str] = []
        self.case = ""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.sink.append(f"{record.name}: {record.getMessage()}")
            if record.levelno >= logging.ERROR and len(self.errors) < 10:
                text = f"[{self.case}] {record.name}: {record.getMessage()}"
                if record.exc_info:
                    text += "\n" + "".join(traceback.format_exception(*record.exc_info))[-3000:]
                self.errors.append(text)
        except Exception:  # noqa: BLE001 - never let logging break a run
            pass


def _shorten(message: str) -> str:
    import re

    message = re.sub(r"lane \S+", "lane *", message)
    return re.sub(r"\d+(\.\d+)?", "N", message)[:160]


def bar_check(groups: list[dict[str, Any]]) -> list[str]:
    """Where the proxy misses SCENARIOS.md's bar ("Our bar"), one line each."""
    misses = []
    for g in groups:
        if g["target"] != "proxy":
            continue
        a, name = g["aggregate"], f"{g['scenario']} proxy/{g['kind']}"
        sc = SCENARIOS[g["scenario"]]
        def pct(stat: dict[str, float]) -> str:
            return f"median {stat['median'] * 100:.1f}%, max {stat['max'] * 100:.1f}%"

        if a["failure_rate"]["max"] > 0:
            misses.append(f"{name}: agent failures ({pct(a['failure_rate'])}; bar 0)")
        if a["wasted_share"]["max"] > 0:
            misses.append(f"{name}: wasted tokens ({pct(a['wasted_share'])}; bar 0)")
        if a["share_429_known"]["max"] >= 0.01:
            misses.append(f"{name}: 429s once the limit is known ({pct(a['share_429_known'])} of attempts; bar < 1%)")
        ratio = a.get("makespan_ratio")
        limit = 1.15 if sc.faults else 1.05
        if ratio is not None and ratio["max"] > limit:
            misses.append(f"{name}: makespan / lower bound median {ratio['median']:.3f}, max {ratio['max']:.3f} (bar {limit})")
    return misses


# -------------------------------------------------------------------------- CLI


def _csv(choices: Sequence[str]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        items = [t.strip() for t in text.split(",") if t.strip()]
        bad = [t for t in items if t not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"choose from {', '.join(choices)}; got {text!r}")
        return items

    return parse


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    a = parser.add_argument
    a("--scenario", action="append", choices=list(SCENARIOS), metavar="NAME",
      help=f"a scenario to run (repeatable; default all: {', '.join(SCENARIOS)})")
    a("--agents", type=_csv(AGENT_KINDS), default=list(AGENT_KINDS), metavar="KINDS",
      help="agent kinds, comma-separated: raw, sdk (default both)")
    a("--targets", type=_csv(list(TARGETS)), default=["direct", "proxy"], metavar="TARGETS",
      help=f"targets, comma-separated, from {', '.join(TARGETS)} (default direct,proxy)")
    a("--no-ablation", action="store_true",
      help=f"skip the ablation variants (run on {ABLATION_SCENARIO} by default when it is selected)")
    a("--repeat", type=int, default=1, metavar="N", help="runs per case; medians and min-max reported (default 1)")
    a("--seed", type=int, default=1, help="seed of the first repeat; repeat i uses seed+i (default 1)")
    a("--time-scale", type=float, default=None, metavar="S",
      help="the clock: 0 = real rate while anything runs, idle waits skipped (default; agrees with 1); "
           "1 = real time; 0 < S < 1 = every wait shrunk by S (MockClock(rate=1/S); CPU time then counts 1/S times)")
    a("--quick", action="store_true",
      help=f"a quick subset: {', '.join(QUICK_SCENARIOS)}, no ablation")
    a("--stream", action="store_true", help="agents stream their replies (default: non-streaming)")
    a("--max-tokens", type=int, default=1024, help="max_tokens of every request (default 1024)")
    a("--uncharged-faults", action="store_true",
      help="the mock's injected 502s and resets do not count against its rate window "
           "(default: they do, so faults cost window slots and raise the makespan)")
    a("--proxy-config", metavar="FILE", help="TOML config for the proxy (upstream and routes are replaced)")
    a("--out", default="bench-out", metavar="DIR", help="where bench.json and bench.png go (default bench-out/)")
    a("--no-chart", action="store_true", help="do not write the PNG chart")
    a("--no-progress", action="store_true", help="no progress bar on stderr")


def run_bench_from_args(args: argparse.Namespace) -> int:
    if args.repeat < 1:
        print("hivemind-trio bench: --repeat must be at least 1", file=sys.stderr)
        return 2
    scale = args.time_scale
    if scale is None:
        scale = QUICK_TIME_SCALE if args.quick else DEFAULT_TIME_SCALE
    if not 0 <= scale <= 1:
        print("hivemind-trio bench: --time-scale must be within [0, 1]", file=sys.stderr)
        return 2
    scenarios = args.scenario or (list(QUICK_SCENARIOS) if args.quick else list(SCENARIOS))
    base_config = None
    if args.proxy_config:
        from ..config import ConfigError, load_config

        try:
            base_config = load_config(args.proxy_config, env={})
        except ConfigError as exc:
            print(f"hivemind-trio bench: invalid proxy configuration: {exc}", file=sys.stderr)
            return 2
    cases = plan(scenarios, args.targets, args.agents, ablation=not (args.no_ablation or args.quick),
                 repeat=args.repeat, seed=args.seed, charge_faults=not args.uncharged_faults)
    report = run_bench(cases, time_scale=scale, base_config=base_config, stream=args.stream,
                       max_tokens=args.max_tokens, progress=not args.no_progress)
    report["argv"] = sys.argv[1:]
    report["faults_charged"] = not args.uncharged_faults
    report["bar_misses"] = bar_check(report["groups"])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
    clock = report["clock"]
    print(f"hivemind-trio bench: clock {clock}, seeds {args.seed}..{args.seed + args.repeat - 1}, "
          f"{'streaming' if args.stream else 'non-streaming'}, "
          f"faulted attempts {'count' if not args.uncharged_faults else 'do not count'} against the mock's window, "
          f"times in simulated seconds\n")
    print(markdown_table(report["groups"], repeat=args.repeat))
    print("\nAgainst the paper (failure % direct -> proxy; the rest through the proxy, medians):\n")
    print(summary_table(report["groups"], repeat=args.repeat))
    print()
    if report["bar_misses"]:
        print("Below our bar (README, Benchmark):")
        for line in report["bar_misses"]:
            print(f"- {line}")
    else:
        print("Every proxy case meets our bar (README, Benchmark).")
    written = [str(out / "bench.json")]
    if not args.no_chart:
        why = write_chart(report["groups"], out / "bench.png")
        if why:
            print(f"hivemind-trio bench: {why}", file=sys.stderr)
        else:
            written.append(str(out / "bench.png"))
    print(f"\nwritten: {', '.join(written)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hivemind_trio.sim.bench", description=__doc__.split("\n")[0])
    add_bench_arguments(parser)
    return run_bench_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
