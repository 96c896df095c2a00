"""Prometheus metrics for ``GET /hivemind/metrics`` (text exposition format).

Two sources, nothing else:

* every finished request's :class:`~hivemind_trio.runtime.app.RequestRecord`,
  through a sink registered in ``Runtime.sinks`` when the runtime is built (so
  the histograms see requests from before the first scrape): request counts,
  attempts, tokens, queue wait and latency histograms;
* the statistics snapshots, read at scrape time by a custom collector
  (``Runtime.status()`` — which carries the scheduler's lane and agent
  statistics — and the budget's ``statistics()``): windows, in flight, queue
  depth, breaker, rate limits, retries, budgets.  Like status and the
  dashboard, metrics never reach into live scheduler state.

Each :class:`Metrics` owns its own :class:`CollectorRegistry` (never the
process-wide default one): a process may run many proxies (the tests do).

Labels are agent names (already bounded to 128 characters by identity, and
never a credential: an agent without a name is ``key-<salted hash>``), lane
keys (``route:fingerprint``, the salted fingerprint, never the key) and
statuses.  Agent cardinality is bounded: the first ``server.metrics_max_agents``
agents seen keep their names, every later one is counted as ``other``.  The
choice is sticky for the life of the runtime, so a series never changes agent.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from ..core.budget import PERIODS, period_key

if TYPE_CHECKING:  # pragma: no cover - typing only
    from ..runtime.app import RequestRecord, Runtime

log = logging.getLogger("hivemind_trio.metrics")

# The classic text format: every Prometheus version scrapes it, and every name
# and label here is a legacy (underscore) name, so nothing needs the 1.0.0 escaping.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Agents beyond server.metrics_max_agents are counted under this name.
OTHER = "other"

PRIORITIES = ("critical", "high", "normal", "low")
BREAKER_STATES = ("closed", "open", "half_open")

QUEUE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
TTFB_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0)
TOTAL_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0)


class AgentLabels:
    """Agent name -> label value, with at most ``limit`` distinct names (then ``other``)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.known: set[str] = set()

    def __call__(self, agent: str) -> str:
        if agent in self.known:
            return agent
        if len(self.known) < self.limit:
            self.known.add(agent)
            return agent
        return OTHER


class Metrics:
    """The metrics of one runtime: built with it, fed by its records, read by scrapes."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.registry = CollectorRegistry(auto_describe=False)
        self.agent_label = AgentLabels(rt.config.server.metrics_max_agents)
        r = self.registry
        self.requests = Counter(
            "hivemind_requests", "Requests finished, by lane, agent and final status (client_gone: the client left before any status).",
            ("lane", "agent", "status"), registry=r,
        )
        self.attempts = Counter(
            "hivemind_upstream_attempts", "Upstream attempts made for finished requests (retries included).",
            ("lane", "agent"), registry=r,
        )
        self.tokens = Counter(
            "hivemind_tokens", "Tokens of finished requests by agent; source=measured (from the provider's usage) or estimated (no usage in the response).",
            ("agent", "direction", "source"), registry=r,
        )
        self.queue_wait = Histogram(
            "hivemind_queue_wait_seconds", "Time a request waited for admission (all its attempts).",
            ("lane", "priority"), buckets=QUEUE_BUCKETS, registry=r,
        )
        self.upstream_ttfb = Histogram(
            "hivemind_upstream_ttfb_seconds", "Time to the first body byte relayed to the client, queue wait excluded (requests that went upstream and got a body).",
            ("lane",), buckets=TTFB_BUCKETS, registry=r,
        )
        self.upstream_duration = Histogram(
            "hivemind_upstream_duration_seconds", "Time from admission to the end of the response, queue wait excluded (requests that went upstream).",
            ("lane",), buckets=TOTAL_BUCKETS, registry=r,
        )
        self.duration = Histogram(
            "hivemind_request_duration_seconds", "Whole request as the client saw it, queue wait included.",
            ("lane",), buckets=TOTAL_BUCKETS, registry=r,
        )
        r.register(_SnapshotCollector(self))
        rt.sinks.append(self.observe)

    # -- the sink -------------------------------------------------------------

    def observe(self, rec: RequestRecord) -> None:
        """Count one finished request.  Never raises: it runs in the request's finally."""
        try:
            self._observe(rec)
        except Exception:  # pragma: no cover - a metrics bug must not break a request
            log.exception("metrics: could not record a request")

    def _observe(self, rec: RequestRecord) -> None:
        agent = self.agent_label(rec.agent)
        lane = rec.lane
        self.requests.labels(lane, agent, str(rec.status) if rec.status else "client_gone").inc()
        if rec.attempts:
            self.attempts.labels(lane, agent).inc(rec.attempts)
        source = "estimated" if rec.estimated else "measured"
        if rec.input_tokens:
            self.tokens.labels(agent, "input", source).inc(rec.input_tokens)
        if rec.output_tokens:
            self.tokens.labels(agent, "output", source).inc(rec.output_tokens)
        self.queue_wait.labels(lane, rec.priority).observe(max(0.0, rec.queue_s))
        self.duration.labels(lane).observe(max(0.0, rec.total_s))
        if rec.attempts:
            self.upstream_duration.labels(lane).observe(max(0.0, rec.total_s - rec.queue_s))
            if rec.ttfb_s is not None:
                self.upstream_ttfb.labels(lane).observe(max(0.0, rec.ttfb_s - rec.queue_s))

    def render(self) -> bytes:
        return generate_latest(_WithoutCreated(self.registry))  # type: ignore[arg-type]


class _WithoutCreated:
    """The registry minus prometheus_client's ``*_created`` series: a timestamp
    per counter and histogram child that nothing here reads, and that would
    double the series a scrape stores (without touching the library's
    process-wide switch, which other registries in the process may rely on)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry

    def collect(self) -> Iterator[Metric]:
        for metric in self.registry.collect():
            if metric.type in ("counter", "histogram"):
                metric.samples = [s for s in metric.samples if not s.name.endswith("_created")]
            yield metric


class _SnapshotCollector:
    """Gauges and counters read from the statistics snapshots at scrape time."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def describe(self) -> list[Metric]:
        # Nothing to describe up front: collect() needs a running Trio clock.
        return []

    def collect(self) -> Iterator[Metric]:
        rt = self.metrics.rt
        status = rt.status()
        yield from _process_metrics(status)
        yield from _lane_metrics(status.get("lanes", ()))
        yield from _agent_metrics(status.get("agents", {}), self.metrics.agent_label)
        yield from _budget_metrics(rt, self.metrics.agent_label)


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


def _process_metrics(status: dict[str, Any]) -> Iterator[Metric]:
    pool = status.get("pool", {})
    ws = status.get("websockets", {})
    yield _gauge("hivemind_in_flight", "Requests being handled by the proxy (queued or upstream).", status.get("in_flight", 0))
    yield _counter("hivemind_client_disconnects", "Clients that left before their response was complete.", status.get("client_disconnects", 0))
    yield _counter("hivemind_stalled_clients", "Streams aborted because the client stopped reading (server.stall_timeout).", status.get("stalled_clients", 0))
    yield _counter("hivemind_upstream_errors", "Requests answered with the proxy's own error after a transport failure upstream.", status.get("upstream_errors", 0))
    yield _gauge("hivemind_websockets_open", "WebSocket connections open.", ws.get("open", 0))
    yield _counter("hivemind_websockets", "WebSocket connections accepted.", ws.get("total", 0))
    yield _gauge("hivemind_pool_in_use", "Upstream connection-pool slots in use.", pool.get("in_use", 0))
    yield _gauge("hivemind_pool_size", "Upstream connection-pool size (server.max_connections).", pool.get("size", 0))
    yield _gauge("hivemind_uptime_seconds", "Seconds since the proxy started.", status.get("uptime_s", 0.0))
    state = status.get("state") or {}
    if state.get("backend") == "redis":
        # Shared state (SPEC §7.5): alert on 0, an instance on local state alone.
        yield _gauge("hivemind_state_connected", "1 while the shared state (Redis) is reachable, 0 while on local state alone.", 1 if state.get("connected") else 0)
        yield _counter("hivemind_state_outages", "Times the shared state became unreachable.", state.get("outages", 0))


def _lane_metrics(lanes: Iterable[dict[str, Any]]) -> Iterator[Metric]:
    in_flight = GaugeMetricFamily("hivemind_lane_in_flight", "Attempts of the lane upstream now.", labels=("lane",))
    window = GaugeMetricFamily("hivemind_lane_window", "The lane's concurrency window (AIMD).", labels=("lane",))
    depth = GaugeMetricFamily("hivemind_lane_queue_depth", "Requests waiting for admission, by priority class.", labels=("lane", "priority"))
    breaker = GaugeMetricFamily("hivemind_lane_breaker_state", "Circuit breaker state: 1 for the current state, 0 for the others.", labels=("lane", "state"))
    trips = CounterMetricFamily("hivemind_lane_breaker_trips", "Times the lane's breaker opened.", labels=("lane",))
    paused = GaugeMetricFamily("hivemind_lane_paused_seconds", "Seconds left in the lane's pause (retry-after or 429 back-off), 0 when not paused.", labels=("lane",))
    rl_remaining = GaugeMetricFamily("hivemind_lane_ratelimit_remaining", "Rate-limit remaining, per resource (provider headers or configured rpm/tpm).", labels=("lane", "resource"))
    rl_limit = GaugeMetricFamily("hivemind_lane_ratelimit_limit", "Rate-limit limit, per resource.", labels=("lane", "resource"))
    rl_reset = GaugeMetricFamily("hivemind_lane_ratelimit_reset_seconds", "Seconds until the resource's rate limit resets (as the provider announced it).", labels=("lane", "resource"))
    admitted = CounterMetricFamily("hivemind_lane_admitted", "Upstream attempts admitted on the lane (retries included).", labels=("lane",))
    retries = CounterMetricFamily("hivemind_lane_retries", "Transparent retries the lane made.", labels=("lane",))
    failures = CounterMetricFamily(
        "hivemind_lane_upstream_failures", "Failed upstream attempts by reason (429, 5xx, reset: connection reset or protocol error); what retries answer.",
        labels=("lane", "reason"),
    )
    budget = GaugeMetricFamily("hivemind_lane_retry_budget", "The lane's retry budget balance (retries it may still make).", labels=("lane",))
    for s in lanes:
        key = s["key"]
        in_flight.add_metric([key], s["in_flight"])
        window.add_metric([key], s["window"])
        by_priority = s.get("queue_by_priority", {})
        for p in PRIORITIES:
            depth.add_metric([key, p], by_priority.get(p, 0))
        for state in BREAKER_STATES:
            breaker.add_metric([key, state], 1.0 if s["breaker"] == state else 0.0)
        trips.add_metric([key], s["breaker_trips"])
        paused.add_metric([key], s["paused_for"])
        for resource, r in sorted(s.get("rate_limit", {}).items()):
            if r.get("remaining") is not None:
                rl_remaining.add_metric([key, resource], r["remaining"])
            if r.get("limit") is not None:
                rl_limit.add_metric([key, resource], r["limit"])
            if r.get("reset_in") is not None:
                rl_reset.add_metric([key, resource], r["reset_in"])
        admitted.add_metric([key], s["admitted"])
        retries.add_metric([key], s["retries"])
        failures.add_metric([key, "429"], s["upstream_429"])
        failures.add_metric([key, "5xx"], s["upstream_5xx"])
        failures.add_metric([key, "reset"], s["resets"])
        budget.add_metric([key], s["retry_budget"])
    yield from (in_flight, window, depth, breaker, trips, paused, rl_remaining, rl_limit, rl_reset, admitted, retries, failures, budget)


def _agent_metrics(agents: dict[str, dict[str, Any]], label: AgentLabels) -> Iterator[Metric]:
    summed = ("in_flight", "retries", "queue_timeouts", "budget_refusals")
    folded: dict[str, dict[str, float]] = {}
    for name, a in agents.items():
        row = folded.setdefault(label(name), dict.fromkeys(summed, 0))
        for field in summed:
            row[field] += a.get(field, 0)
    in_flight = GaugeMetricFamily("hivemind_agent_in_flight", "The agent's requests being handled now.", labels=("agent",))
    retries = CounterMetricFamily("hivemind_agent_retries", "Transparent retries made for the agent's requests.", labels=("agent",))
    timeouts = CounterMetricFamily("hivemind_agent_queue_timeouts", "The agent's requests refused after waiting past their deadline.", labels=("agent",))
    refusals = CounterMetricFamily("hivemind_agent_budget_refusals", "The agent's requests refused because a budget was spent.", labels=("agent",))
    for agent, row in sorted(folded.items()):
        in_flight.add_metric([agent], row["in_flight"])
        retries.add_metric([agent], row["retries"])
        timeouts.add_metric([agent], row["queue_timeouts"])
        refusals.add_metric([agent], row["budget_refusals"])
    yield from (in_flight, retries, timeouts, refusals)


def _budget_metrics(rt: Runtime, label: AgentLabels) -> Iterator[Metric]:
    """What each budget of the current period has left (tokens and USD).

    A folded ``other`` series shows the least any of its agents has left.
    """
    tokens = GaugeMetricFamily(
        "hivemind_budget_remaining_tokens", "Tokens a budget has left this period (used and reserved taken off); agent is empty for the global budget.",
        labels=("scope", "agent", "period"),
    )
    usd = GaugeMetricFamily(
        "hivemind_budget_remaining_usd", "USD a budget has left this period (used and reserved taken off); agent is empty for the global budget.",
        labels=("scope", "agent", "period"),
    )
    budget = rt.scheduler.budget
    if budget.limits:
        now = time.time()
        offset = getattr(budget, "utc_offset", 0.0)
        current = {period: period_key(period, now, offset) for period in PERIODS}
        left_tokens: dict[tuple[str, str, str], float] = {}
        left_usd: dict[tuple[str, str, str], float] = {}
        for c in budget.statistics().counters:
            if current.get(c.period) != c.period_key:
                continue  # a past hour or day kept for the ledger
            agent = "" if c.scope == "global" or c.agent is None else label(c.agent)
            key = (c.scope, agent, c.period)
            if c.limit_tokens is not None:
                left = max(0, c.limit_tokens - c.used_tokens - c.reserved_tokens)
                left_tokens[key] = min(left, left_tokens.get(key, math.inf))
            if c.limit_usd is not None:
                left = max(0.0, c.limit_usd - c.used_usd - c.reserved_usd)
                left_usd[key] = min(left, left_usd.get(key, math.inf))
        for key, value in sorted(left_tokens.items()):
            tokens.add_metric(list(key), value)
        for key, value in sorted(left_usd.items()):
            usd.add_metric(list(key), value)
    # No limits, no series (an empty family would only add HELP/TYPE lines).
    yield from (family for family in (tokens, usd) if family.samples)


def render_metrics(rt: Runtime) -> tuple[str, bytes]:
    """``(content type, body)`` of a scrape of ``rt``'s metrics."""
    metrics = getattr(rt, "metrics", None)
    if metrics is None:
        # A runtime built without its metrics: they start now.
        metrics = rt.metrics = Metrics(rt)
    return CONTENT_TYPE, metrics.render()


__all__ = ["CONTENT_TYPE", "OTHER", "AgentLabels", "Metrics", "render_metrics"]
