"""GET /hivemind/metrics through a real proxy: the scrape parses with
prometheus_client's own parser, and the samples say what the requests did.

Upstreams are the built-in mock provider (usage, rate-limit headers) or a tiny
scripted ASGI app (exact failures: a 503 then a 200, a run of 500s that trips
the breaker).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import trio
from prometheus_client.parser import text_string_to_metric_families

from hivemind_trio import Config, ServerConfig, open_proxy
from hivemind_trio.config import BudgetConfig, SchedulerConfig
from hivemind_trio.runtime.serve import Proxy
from hivemind_trio.sim.mock import MockConfig, MockProvider, serve_mock
from tests.helpers import answer_lifespan, serve_asgi

SECRET = "sk-ant-api03-METRICS-SECRET-7f3a9c"
MSG = {"model": "claude-test", "max_tokens": 64, "messages": [{"role": "user", "content": "hello there"}]}
ANTHROPIC = {"x-api-key": SECRET, "anthropic-version": "2023-06-01"}
GUARD = 10.0


def _server(**overrides: object) -> ServerConfig:
    settings: dict[str, object] = {"shutdown_grace": 1.0}
    settings.update(overrides)
    return ServerConfig(**settings)  # type: ignore[arg-type]


@asynccontextmanager
async def mock_behind_proxy(*, server: dict[str, object] | None = None, budget: BudgetConfig | None = None,
                            **mock: object) -> AsyncIterator[tuple[MockProvider, Proxy]]:
    settings: dict[str, object] = {"latency": 0.0, "jitter": 0.0, "seed": 11, "stream_delay": 0.0, "rpm": 1000}
    settings.update(mock)
    provider = MockProvider(MockConfig(**settings))  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve_mock, provider)
        config = Config(upstream=f"http://127.0.0.1:{port}", server=_server(**(server or {})), budget=budget or BudgetConfig())
        async with open_proxy(config) as proxy:
            yield provider, proxy
        nursery.cancel_scope.cancel()


def _scripted(statuses: list[int]):
    """An upstream answering the given statuses in turn, then 200s (Anthropic
    shapes; the 200 carries no usage, so the proxy has to estimate it)."""
    calls: list[int] = []

    async def app(scope, receive, send):
        if scope["type"] == "lifespan":
            await answer_lifespan(receive, send)
            return
        while (await receive()).get("more_body"):
            pass
        status = statuses[len(calls)] if len(calls) < len(statuses) else 200
        calls.append(status)
        if status == 200:
            body = {"id": "msg_1", "type": "message", "role": "assistant", "model": "claude-test",
                    "content": [{"type": "text", "text": "a reply of several words"}], "stop_reason": "end_turn"}
            headers = [(b"content-type", b"application/json")]
        else:
            body = {"type": "error", "error": {"type": "api_error", "message": "scripted failure"}}
            headers = [(b"content-type", b"application/json"), (b"retry-after-ms", b"1")]
        raw = json.dumps(body).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": headers + [(b"content-length", str(len(raw)).encode())]})
        await send({"type": "http.response.body", "body": raw})

    return app, calls


async def scrape(client: httpx.AsyncClient) -> tuple[str, dict[tuple[str, tuple[tuple[str, str], ...]], float], dict[str, str]]:
    """The raw text, {(sample name, sorted labels): value} and {family: type}."""
    r = await client.get("/hivemind/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    types: dict[str, str] = {}
    for family in text_string_to_metric_families(r.text):
        types[family.name] = family.type
        for s in family.samples:
            key = (s.name, tuple(sorted(s.labels.items())))
            assert key not in samples, f"duplicate sample {key}"
            samples[key] = s.value
    return r.text, samples, types


def value(samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def total(samples, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    return sum(v for (n, ls), v in samples.items() if n == name and labels.items() <= dict(ls).items())


async def _lane_key(client: httpx.AsyncClient) -> str:
    lanes = (await client.get("/hivemind/status")).json()["lanes"]
    assert len(lanes) == 1
    return lanes[0]["key"]


async def test_requests_latency_tokens_and_lane_state() -> None:
    budget = BudgetConfig(agent_tokens=100_000, global_tokens=1_000_000, ledger="off")
    async with mock_behind_proxy(budget=budget) as (provider, proxy):
        async with httpx.AsyncClient(base_url=proxy.url, timeout=GUARD) as client:
            with trio.fail_after(GUARD):
                for agent, n in (("alpha", 3), ("beta", 2)):
                    for _ in range(n):
                        r = await client.post("/v1/messages", json=MSG, headers=ANTHROPIC | {"x-hivemind-agent": agent})
                        assert r.status_code == 200
                async with client.stream("POST", "/v1/messages", json=MSG | {"stream": True},
                                         headers=ANTHROPIC | {"x-hivemind-agent": "beta", "x-hivemind-priority": "high"}) as r:
                    assert r.status_code == 200
                    assert b"message_stop" in b"".join([c async for c in r.aiter_bytes()])
                lane = await _lane_key(client)
                text, samples, types = await scrape(client)

    assert len(provider.attempts) == 6
    assert value(samples, "hivemind_requests_total", lane=lane, agent="alpha", status="200") == 3
    assert value(samples, "hivemind_requests_total", lane=lane, agent="beta", status="200") == 3
    assert value(samples, "hivemind_upstream_attempts_total", lane=lane, agent="alpha") == 3
    assert total(samples, "hivemind_upstream_attempts_total") == 6
    assert types["hivemind_requests"] == "counter"
    assert not any(name.endswith("_created") for name, _ in samples)

    # Histograms: one observation per request.
    for name in ("hivemind_queue_wait_seconds", "hivemind_upstream_ttfb_seconds",
                 "hivemind_upstream_duration_seconds", "hivemind_request_duration_seconds"):
        assert types[name] == "histogram"
        assert total(samples, name + "_count") == 6, name
        assert total(samples, name + "_bucket", le="+Inf") == 6, name
    assert value(samples, "hivemind_queue_wait_seconds_count", lane=lane, priority="normal") == 5
    assert value(samples, "hivemind_queue_wait_seconds_count", lane=lane, priority="high") == 1

    # Tokens: measured from the mock's usage, and exactly what the budgets were charged.
    for agent in ("alpha", "beta"):
        tin = value(samples, "hivemind_tokens_total", agent=agent, direction="input", source="measured")
        tout = value(samples, "hivemind_tokens_total", agent=agent, direction="output", source="measured")
        assert tin > 0 and tout > 0
        left = value(samples, "hivemind_budget_remaining_tokens", scope="agent", agent=agent, period="day")
        assert left == 100_000 - tin - tout
    assert total(samples, "hivemind_tokens_total", source="estimated") == 0
    assert total(samples, "hivemind_tokens_total", direction="output") == sum(a.output_tokens for a in provider.attempts)
    used = total(samples, "hivemind_tokens_total")
    assert value(samples, "hivemind_budget_remaining_tokens", scope="global", agent="", period="day") == 1_000_000 - used

    # Lane state, read from the statistics snapshot at scrape time.
    assert value(samples, "hivemind_lane_window", lane=lane) >= 1
    assert value(samples, "hivemind_lane_in_flight", lane=lane) == 0
    assert value(samples, "hivemind_lane_admitted_total", lane=lane) == 6
    for p in ("critical", "high", "normal", "low"):
        assert value(samples, "hivemind_lane_queue_depth", lane=lane, priority=p) == 0
    assert value(samples, "hivemind_lane_breaker_state", lane=lane, state="closed") == 1
    assert value(samples, "hivemind_lane_breaker_state", lane=lane, state="open") == 0
    assert value(samples, "hivemind_lane_breaker_state", lane=lane, state="half_open") == 0
    assert value(samples, "hivemind_lane_breaker_trips_total", lane=lane) == 0
    assert value(samples, "hivemind_lane_ratelimit_limit", lane=lane, resource="requests") == 1000
    assert value(samples, "hivemind_lane_ratelimit_remaining", lane=lane, resource="requests") <= 1000 - 6
    assert 0 < value(samples, "hivemind_lane_ratelimit_reset_seconds", lane=lane, resource="requests") <= 120
    assert value(samples, "hivemind_lane_retries_total", lane=lane) == 0
    for reason in ("429", "5xx", "reset"):
        assert value(samples, "hivemind_lane_upstream_failures_total", lane=lane, reason=reason) == 0
    assert value(samples, "hivemind_agent_in_flight", agent="alpha") == 0
    # The scrape itself is not a proxied request.
    assert value(samples, "hivemind_in_flight") == 0
    assert SECRET not in text


async def test_retries_by_reason_and_estimated_tokens() -> None:
    app, calls = _scripted([503])
    async with serve_asgi(app) as url, open_proxy(Config(upstream=url, server=_server())) as proxy:
        async with httpx.AsyncClient(base_url=proxy.url, timeout=GUARD) as client:
            with trio.fail_after(GUARD):
                r = await client.post("/v1/messages", json=MSG, headers=ANTHROPIC | {"x-hivemind-agent": "gamma"})
                assert r.status_code == 200
                assert r.headers["x-hivemind-attempts"] == "2"
                lane = await _lane_key(client)
                _, samples, _ = await scrape(client)
    assert calls == [503, 200]
    assert value(samples, "hivemind_requests_total", lane=lane, agent="gamma", status="200") == 1
    assert value(samples, "hivemind_upstream_attempts_total", lane=lane, agent="gamma") == 2
    assert value(samples, "hivemind_lane_retries_total", lane=lane) == 1
    assert value(samples, "hivemind_agent_retries_total", agent="gamma") == 1
    assert value(samples, "hivemind_lane_upstream_failures_total", lane=lane, reason="5xx") == 1
    assert value(samples, "hivemind_lane_upstream_failures_total", lane=lane, reason="429") == 0
    assert value(samples, "hivemind_lane_admitted_total", lane=lane) == 2
    # No usage in the upstream's answer: the tokens are estimates, and say so.
    assert value(samples, "hivemind_tokens_total", agent="gamma", direction="output", source="estimated") > 0
    assert total(samples, "hivemind_tokens_total", source="measured") == 0
    assert value(samples, "hivemind_upstream_ttfb_seconds_count", lane=lane) == 1


async def test_breaker_trip_shows_as_open_with_one_trip() -> None:
    # Five 500s in a row open the breaker (retries off, so one attempt each).
    app, calls = _scripted([500] * 5)
    async with serve_asgi(app) as url:
        config = Config(upstream=url, server=_server(), scheduler=SchedulerConfig(retry=False))
        async with open_proxy(config) as proxy:
            async with httpx.AsyncClient(base_url=proxy.url, timeout=GUARD) as client:
                with trio.fail_after(GUARD):
                    for _ in range(5):
                        r = await client.post("/v1/messages", json=MSG, headers=ANTHROPIC | {"x-hivemind-agent": "delta"})
                        assert r.status_code == 500
                    lane = await _lane_key(client)
                    _, samples, _ = await scrape(client)
    assert calls == [500] * 5
    assert value(samples, "hivemind_requests_total", lane=lane, agent="delta", status="500") == 5
    assert value(samples, "hivemind_lane_breaker_state", lane=lane, state="open") == 1
    assert value(samples, "hivemind_lane_breaker_state", lane=lane, state="closed") == 0
    assert value(samples, "hivemind_lane_breaker_trips_total", lane=lane) == 1
    assert value(samples, "hivemind_lane_upstream_failures_total", lane=lane, reason="5xx") == 5
    assert value(samples, "hivemind_upstream_duration_seconds_count", lane=lane) == 5


async def test_agents_beyond_the_limit_fold_into_other() -> None:
    async with mock_behind_proxy(server={"metrics_max_agents": 2}) as (_, proxy):
        async with httpx.AsyncClient(base_url=proxy.url, timeout=GUARD) as client:
            with trio.fail_after(GUARD):
                for agent in ("a1", "a2", "a3", "a4", "a1", "a4"):
                    r = await client.post("/v1/messages", json=MSG, headers=ANTHROPIC | {"x-hivemind-agent": agent})
                    assert r.status_code == 200
                lane = await _lane_key(client)
                _, samples, _ = await scrape(client)
    assert value(samples, "hivemind_requests_total", lane=lane, agent="a1", status="200") == 2
    assert value(samples, "hivemind_requests_total", lane=lane, agent="a2", status="200") == 1
    assert value(samples, "hivemind_requests_total", lane=lane, agent="other", status="200") == 3
    agents = {dict(ls).get("agent") for (_, ls) in samples} - {None, ""}
    assert agents == {"a1", "a2", "other"}
    assert value(samples, "hivemind_agent_in_flight", agent="other") == 0
    assert value(samples, "hivemind_agent_retries_total", agent="other") == 0
    assert value(samples, "hivemind_tokens_total", agent="other", direction="output", source="measured") > 0


async def test_credentials_never_appear_in_a_scrape() -> None:
    bearer = "sk-proj-METRICS-BEARER-0d9e21"
    async with mock_behind_proxy() as (_, proxy):
        async with httpx.AsyncClient(base_url=proxy.url, timeout=GUARD) as client:
            with trio.fail_after(GUARD):
                # No agent header: the agent is named from a salted hash of the key.
                r = await client.post("/v1/messages", json=MSG, headers=ANTHROPIC)
                assert r.status_code == 200
                r = await client.post("/v1/chat/completions", headers={"authorization": f"Bearer {bearer}"},
                                      json={"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}]})
                assert r.status_code == 200
                text, samples, _ = await scrape(client)
    assert SECRET not in text and bearer not in text
    for fragment in ("METRICS-SECRET", "METRICS-BEARER", "sk-ant", "sk-proj"):
        assert fragment not in text
    agents = {dict(ls)["agent"] for (n, ls) in samples if n == "hivemind_requests_total"}
    assert len(agents) == 2 and all(a.startswith("key-") for a in agents)
    assert total(samples, "hivemind_requests_total") == 2
