"""The scheduler end to end (SPEC §5): real agents -> a real Hypercorn proxy
(``open_proxy``, port 0) -> the real mock provider (or a tiny scripted
upstream) over loopback sockets.

Every count comes from the upstream's own log (``provider.attempts`` of the
mock, ``Scripted.requests`` of a scripted upstream), never from the proxy's
account of itself.  The mock's ``window`` option shrinks the 60 s rate window
(rpm=50 over 3 s) so a scenario takes seconds of wall clock.  Nothing asserts
on durations: the ``trio.fail_after`` guards are only ever reached when
something is broken (one is deliberately shorter than a 30 s ``retry-after``,
see the test that needs it).

The "raw" agents are the paper's: the official ``anthropic`` SDK with
``max_retries=0``, dying on their first error.  Each test prints what the
upstream saw (run with ``-s`` to read it).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anthropic
import attrs
import httpx
import trio

from hivemind_trio import Config, ServerConfig, open_proxy
from hivemind_trio.config import BudgetConfig, SchedulerConfig
from hivemind_trio.runtime.serve import Proxy
from hivemind_trio.sim.mock import MockConfig, MockProvider, serve_mock
from tests.helpers import answer_lifespan, serve_asgi

REPLY = "SCHED-E2E-REPLY-9e2b"
PROMPT = ("Summarise the state of the build and list the next three steps. " * 4)[:200]  # 200 characters
GUARD = 120.0  # seconds: only ever reached when something is broken
ANTHROPIC_HEADERS = {"anthropic-version": "2023-06-01", "x-api-key": "sk-test", "content-type": "application/json"}

# The paper's micro scenarios, with the 60 s window scaled to 3 s.
SCALED = {"rpm": 50, "tpm": 100_000, "window": 3.0}


def _msg(max_tokens: int = 256) -> dict:
    return {"model": "claude-test", "max_tokens": max_tokens, "messages": [{"role": "user", "content": PROMPT}]}


def _server() -> ServerConfig:
    # A short grace so a connection left open does not hold shutdown for 30 s.
    return ServerConfig(shutdown_grace=1.0)


@asynccontextmanager
async def mock_behind_proxy(config: Config | None = None, **overrides: object) -> AsyncIterator[tuple[MockProvider, Proxy]]:
    """The mock on port 0 and a real proxy whose only upstream it is."""
    settings: dict[str, object] = {
        "latency": 0.01, "jitter": 0.005, "seed": 20260, "stream_delay": 0.002, "reply_text": REPLY,
    }
    settings.update(overrides)
    provider = MockProvider(MockConfig(**settings))  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve_mock, provider)
        cfg = attrs.evolve(config or Config(), upstream=f"http://127.0.0.1:{port}", server=_server())
        async with open_proxy(cfg) as proxy:
            yield provider, proxy
        nursery.cancel_scope.cancel()


class Scripted:
    """An upstream that answers every request with the same canned response
    and logs what it received (its own attempt log)."""

    def __init__(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        self.status, self.headers, self.body = status, headers, body
        self.requests: list[tuple[str, dict[bytes, bytes], bytes]] = []

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            await answer_lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        body = b""
        while True:
            m = await receive()
            if m["type"] == "http.disconnect":
                return
            body += m.get("body", b"")
            if not m.get("more_body"):
                break
        self.requests.append((scope["path"], dict(scope["headers"]), body))
        headers = [*self.headers, (b"content-length", str(len(self.body)).encode())]
        await send({"type": "http.response.start", "status": self.status, "headers": headers})
        await send({"type": "http.response.body", "body": self.body})


@asynccontextmanager
async def scripted_behind_proxy(up: Scripted, config: Config | None = None) -> AsyncIterator[Proxy]:
    async with serve_asgi(up) as url:
        cfg = attrs.evolve(config or Config(), upstream=url, server=_server())
        async with open_proxy(cfg) as proxy:
            yield proxy


def _seen(provider: MockProvider) -> Counter:
    """What the upstream saw: (status, outcome) -> attempts."""
    return Counter((a.status, a.outcome) for a in provider.attempts)


def _report(name: str, provider: MockProvider, **extra: object) -> None:
    seen = ", ".join(f"{s}/{o}: {n}" for (s, o), n in sorted(_seen(provider).items()))
    more = "".join(f" {k}={v}" for k, v in extra.items())
    print(f"\n[{name}] upstream attempts={len(provider.attempts)} ({seen}) peak_in_flight={provider.peak_in_flight}{more}")


def _sse(raw: bytes) -> list[tuple[str, dict]]:
    out = []
    for block in raw.decode().replace("\r\n", "\n").strip().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
        out.append((fields.get("event", ""), json.loads(fields["data"])))
    return out


# ------------------------------------------------------------------ raw agents


@attrs.define
class AgentRun:
    name: str
    turns_done: int = 0
    death: str | None = None
    request_ids: list[str] = attrs.field(factory=list)


async def raw_agent(proxy_url: str, run: AgentRun, turns: int, *, stream_turns: frozenset[int] = frozenset()) -> None:
    """The paper's agent: sequential turns, 50 ms think time, no retries, dies on the first error."""
    headers = {"x-hivemind-agent": run.name, "x-agent-id": run.name}  # the proxy's / the mock's log's
    async with anthropic.AsyncAnthropic(
        base_url=proxy_url, api_key="sk-test", max_retries=0, default_headers=headers
    ) as client:
        for turn in range(turns):
            try:
                if turn in stream_turns:
                    async with client.messages.stream(**_msg()) as stream:
                        msg = await stream.get_final_message()
                        rid = stream.request_id
                else:
                    msg = await client.messages.create(**_msg())
                    rid = msg._request_id
            except anthropic.APIError as exc:
                run.death = f"turn {turn}: {exc!r}"
                return
            assert REPLY in msg.content[0].text, msg
            assert rid, "no request-id reached the agent"
            run.request_ids.append(rid)
            run.turns_done += 1
            await trio.sleep(0.05)


async def run_agents(proxy: Proxy, n: int, turns: int, *, prefix: str = "agent", **kw: object) -> list[AgentRun]:
    runs = [AgentRun(f"{prefix}-{i:02d}") for i in range(n)]
    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery:
            for run in runs:
                nursery.start_soon(lambda r=run: raw_agent(proxy.url, r, turns, **kw))
    return runs


def _check_every_turn_served_once(provider: MockProvider, runs: list[AgentRun], turns: int) -> None:
    dead = {r.name: r.death for r in runs if r.death}
    history = {name: [(round(a.t, 3), a.status, a.outcome) for a in provider.attempts if a.agent == name] for name in dead}
    assert not dead, f"{len(dead)} agent(s) died: {dead}; their attempts (t, status, outcome): {history}"
    assert all(r.turns_done == turns for r in runs)
    # Every answer an agent got is one successful attempt in the mock's log,
    # for that agent; no answer was delivered twice.
    ok_by_id = {a.request_id: a for a in provider.attempts if a.status == 200 and a.outcome == "ok"}
    got = [rid for r in runs for rid in r.request_ids]
    assert len(got) == len(set(got)) == len(runs) * turns
    for r in runs:
        for rid in r.request_ids:
            assert rid in ok_by_id, f"{r.name} got {rid}, which the mock never answered with a 200"
            assert ok_by_id[rid].agent == r.name


async def test_twenty_raw_agents_all_finish_under_a_50_rpm_limit() -> None:
    """micro-20 (scaled): 20 agents that die on their first error, 3 turns
    each, 50 requests per window.  Direct, most of them die on a 429."""
    turns = 3
    async with mock_behind_proxy(**SCALED) as (provider, proxy):
        runs = await run_agents(proxy, 20, turns, stream_turns=frozenset({1}))
        status = proxy.app.runtime.status()
    _report("micro-20", provider, lane_429s=status["lanes"][0]["upstream_429"], retries=status["lanes"][0]["retries"])
    _check_every_turn_served_once(provider, runs, turns)
    # More than one window's worth of requests really went through the limit.
    assert sum(1 for a in provider.attempts if a.status == 200) >= 20 * turns > SCALED["rpm"]


async def test_raw_agents_survive_502s_resets_and_a_concurrency_cap() -> None:
    """replay-11-like faults (scaled): 8% 502 api_error, 5% real TCP resets
    (SO_LINGER 0), a concurrency cap of 5 (529 over it).  Every agent
    finishes, and the mock's log shows the faults really happened, so the
    agents' survival is the proxy's retries at work.

    Which attempts draw a fault depends on how many were refused before
    them (timing), so a round of 60 turns sees no reset about one time in
    25: a round is repeated with fresh agents (at most 4) until the mock has
    injected at least one fault of each kind; every round must succeed."""
    turns = 3
    async with mock_behind_proxy(error_rate=0.08, reset_rate=0.05, cap=5, latency=0.03, jitter=0.01, **SCALED) as (
        provider,
        proxy,
    ):
        runs: list[AgentRun] = []
        for round_no in range(4):
            batch = await run_agents(proxy, 20, turns, prefix=f"r{round_no}-agent", stream_turns=frozenset({1}))
            runs += batch
            outcomes = Counter(a.outcome for a in provider.attempts)
            if outcomes["502"] and outcomes["reset"]:
                break
        status = proxy.app.runtime.status()
    lane = status["lanes"][0]
    _report("faults", provider, rounds=round_no + 1, retries=lane["retries"], window=lane["window"],
            breaker_trips=lane["breaker_trips"])
    assert outcomes["502"] >= 1, outcomes
    assert outcomes["reset"] >= 1, outcomes
    _check_every_turn_served_once(provider, runs, turns)
    # The faults were absorbed by retries: more attempts than answers.
    assert len(provider.attempts) > len(runs) * turns


# ---------------------------------------------------------- never retried


async def test_stream_dropped_after_a_200_is_not_retried_and_ends_in_an_error_event() -> None:
    """The upstream resets the connection half-way through a 200 stream: bytes
    reached the client, so a retry would duplicate output.  One attempt; the
    client holds complete events, each once, then a provider-format error."""
    async with mock_behind_proxy(drop_rate=1.0, stream_delay=0.01) as (provider, proxy):
        async with httpx.AsyncClient(base_url=proxy.url, timeout=GUARD) as client:
            with trio.fail_after(GUARD):
                async with client.stream("POST", "/v1/messages", headers=ANTHROPIC_HEADERS,
                                         json=_msg() | {"stream": True}) as r:
                    status, raw = r.status_code, b"".join([c async for c in r.aiter_raw()])
        assert len(provider.attempts) == 1
        assert [(a.status, a.outcome) for a in provider.attempts] == [(200, "drop")]
        assert status == 200
        events = _sse(raw)
        names = [name for name, _ in events]
        assert names[0] == "message_start" and names.count("message_start") == 1
        assert names[-1] == "error" and names.count("error") == 1
        assert "message_stop" not in names
        assert events[-1][1]["type"] == "error" and events[-1][1]["error"]["type"]
        text = "".join(d["delta"]["text"] for name, d in events if name == "content_block_delta")
        assert text.startswith(REPLY) and text.count(REPLY) == 1

        # The same through a raw SDK agent: a clean APIError, its text once.
        texts: list[str] = []
        async with anthropic.AsyncAnthropic(base_url=proxy.url, api_key="sk-test", max_retries=0) as sdk:
            with trio.fail_after(GUARD):
                try:
                    async with sdk.messages.stream(**_msg()) as stream:
                        async for t in stream.text_stream:
                            texts.append(t)
                except anthropic.APIError as exc:
                    error: Exception | None = exc
                else:
                    error = None
        assert error is not None, "a broken stream must not look complete"
        assert "".join(texts).startswith(REPLY) and "".join(texts).count(REPLY) == 1
        _report("drop", provider, client_error=type(error).__name__)
        assert [(a.status, a.outcome) for a in provider.attempts] == [(200, "drop"), (200, "drop")]


async def test_insufficient_quota_is_attempted_once_and_relayed_unchanged() -> None:
    """An OpenAI quota 429 can never succeed on retry: one upstream attempt, and
    the client gets the very bytes a direct caller gets."""
    async with mock_behind_proxy(quota=True) as (provider, proxy):
        req = {"model": "gpt-test", "messages": [{"role": "user", "content": PROMPT}]}
        headers = {"authorization": "Bearer sk-test", "content-type": "application/json"}
        async with httpx.AsyncClient(timeout=GUARD) as client:
            with trio.fail_after(GUARD):
                mock_url = proxy.app.runtime.config.upstream
                direct = await client.post(f"{mock_url}/v1/chat/completions", json=req,
                                           headers=headers | {"x-agent-id": "direct"})
                proxied = await client.post(f"{proxy.url}/v1/chat/completions", json=req,
                                            headers=headers | {"x-agent-id": "proxied"})
        _report("quota", provider)
        assert [(a.agent, a.status, a.outcome) for a in provider.attempts] == [
            ("direct", 429, "quota"), ("proxied", 429, "quota"),
        ]
        assert direct.status_code == proxied.status_code == 429
        assert proxied.json()["error"]["code"] == "insufficient_quota"
        assert proxied.content == direct.content
        assert proxied.headers["x-request-id"] == provider.attempts[1].request_id
        assert proxied.headers["content-type"] == direct.headers["content-type"]
        assert "x-should-retry" not in proxied.headers  # the proxy did not retry: nothing to add
        assert proxied.headers["x-hivemind-attempts"] == "1"


async def test_429_asking_longer_than_the_client_deadline_is_relayed_at_once() -> None:
    """retry-after: 30 but the client waits only 5 s (x-stainless-timeout): the
    client gets the upstream's 429, retry-after intact, without the proxy
    sitting on it.  The guard here is 20 s, below the 30 s a proxy that
    waited out the retry-after would take."""
    body = json.dumps({"type": "error", "error": {"type": "rate_limit_error", "message": "Slow down (scripted)."},
                       "request_id": "req_scripted_429"}).encode()
    up = Scripted(429, [(b"content-type", b"application/json"), (b"retry-after", b"30"),
                        (b"request-id", b"req_scripted_429"), (b"x-scripted", b"429")], body)
    async with scripted_behind_proxy(up) as proxy:
        async with httpx.AsyncClient(base_url=proxy.url, timeout=GUARD) as client:
            with trio.fail_after(20):
                r = await client.post("/v1/messages", json=_msg(),
                                      headers=ANTHROPIC_HEADERS | {"x-stainless-timeout": "5"})
    print(f"\n[retry-after 30 > deadline 5] upstream attempts={len(up.requests)} client status={r.status_code}")
    assert len(up.requests) == 1
    assert r.status_code == 429
    assert r.headers["retry-after"] == "30"
    assert r.headers["request-id"] == "req_scripted_429"
    assert r.headers["x-scripted"] == "429"
    assert r.content == body
    assert "x-should-retry" not in r.headers


async def test_final_failure_after_retries_is_the_upstreams_own_answer() -> None:
    """An upstream that always answers 503: the proxy retries (bounded by
    max_attempts), then hands over the upstream's last response untouched
    but for ``x-should-retry: false``, so the SDK does not multiply attempts."""
    body = json.dumps({"type": "error", "error": {"type": "api_error", "message": "upstream down (scripted)"},
                       "request_id": "req_scripted_503"}).encode()
    up = Scripted(503, [(b"content-type", b"application/json"), (b"request-id", b"req_scripted_503"),
                        (b"x-should-retry", b"true"), (b"x-scripted", b"503")], body)
    # Four attempts keep the test short: with the default allowance the
    # breaker opens after five failures and its cool-downs stretch the run.
    max_attempts = 4
    async with scripted_behind_proxy(up, Config(scheduler=SchedulerConfig(max_attempts=max_attempts))) as proxy:
        async with httpx.AsyncClient(base_url=proxy.url, timeout=GUARD) as client:
            with trio.fail_after(GUARD):
                r = await client.post("/v1/messages", json=_msg(), headers=ANTHROPIC_HEADERS)
    print(f"\n[always 503] upstream attempts={len(up.requests)} (max_attempts={max_attempts}) "
          f"client status={r.status_code} x-hivemind-attempts={r.headers.get('x-hivemind-attempts')}")
    assert 1 < len(up.requests) <= max_attempts
    assert len({b for _, _, b in up.requests}) == 1  # the same request each time
    assert r.status_code == 503
    assert r.content == body
    assert r.headers["request-id"] == "req_scripted_503"
    assert r.headers["x-scripted"] == "503"
    assert r.headers.get_list("x-should-retry") == ["false"]


# ---------------------------------------------------------------- budgets


async def test_spent_agent_budget_is_refused_at_the_edge(tmp_path: Path) -> None:
    """Per-agent token budget: once spent, the next request gets a
    provider-format 429 saying so, x-should-retry: false, and never reaches
    the upstream.  Another agent is not affected."""
    config = Config(budget=BudgetConfig(agent_tokens=400, period="run", ledger=str(tmp_path / "ledger.sqlite")))
    async with mock_behind_proxy(config, output_mean=100, output_sd=0) as (provider, proxy):
        async with httpx.AsyncClient(base_url=proxy.url, timeout=GUARD) as client:
            answers = []
            with trio.fail_after(GUARD):
                for _ in range(10):
                    r = await client.post("/v1/messages", json=_msg(max_tokens=50),
                                          headers=ANTHROPIC_HEADERS | {"x-hivemind-agent": "spender", "x-agent-id": "spender"})
                    answers.append(r)
                    if r.status_code != 200:
                        break
                other = await client.post("/v1/messages", json=_msg(max_tokens=50),
                                          headers=ANTHROPIC_HEADERS | {"x-hivemind-agent": "other", "x-agent-id": "other"})
        _report("budget", provider, answers=[a.status_code for a in answers],
                spender_tokens=sum(a.input_tokens + a.output_tokens for a in provider.attempts if a.agent == "spender"))
        refused = answers[-1]
        served = answers[:-1]
        assert served and all(a.status_code == 200 for a in served)
        assert refused.status_code == 429
        doc = refused.json()
        assert doc["type"] == "error" and doc["error"]["type"] == "rate_limit_error"
        assert "budget" in doc["error"]["message"] and "spent" in doc["error"]["message"]
        assert refused.headers["x-should-retry"] == "false"
        # The upstream saw the served requests only.
        spender = [a for a in provider.attempts if a.agent == "spender"]
        assert len(spender) == len(served)
        assert {a.request_id for a in spender} == {a.headers["request-id"] for a in served}
        assert other.status_code == 200
        assert [a.agent for a in provider.attempts].count("other") == 1


# ----------------------------------------------------------------- status


async def test_status_shows_lanes_and_agents_as_the_upstream_counted_them() -> None:
    async with mock_behind_proxy(**SCALED) as (provider, proxy):
        runs = await run_agents(proxy, 3, 2, stream_turns=frozenset({1}))
        async with httpx.AsyncClient(base_url=proxy.url, timeout=GUARD) as client:
            with trio.fail_after(GUARD):
                r = await client.get("/hivemind/status")
    assert r.status_code == 200
    status = r.json()
    _report("status", provider, lanes=len(status["lanes"]))
    print(json.dumps({"lane": status["lanes"][0], "agent-00": status["agents"]["agent-00"]}, indent=1))
    assert not [run.death for run in runs if run.death]

    (lane,) = status["lanes"]
    for key in ("window", "in_flight", "queued", "queue_by_priority", "breaker", "rate_limit"):
        assert key in lane, key
    assert lane["window"] >= 1
    assert lane["in_flight"] == 0 and lane["queued"] == 0
    assert lane["breaker"] == "closed"
    # The requests limit was learnt from the mock's anthropic-ratelimit-* headers.
    assert lane["rate_limit"]["requests"]["limit"] == SCALED["rpm"]

    for run in runs:
        a = status["agents"][run.name]
        seen = [x for x in provider.attempts if x.agent == run.name]
        assert a["requests"] == 2 == len(seen)
        assert a["in_flight"] == 0
        assert a["input_tokens"] == sum(x.input_tokens for x in seen)
        assert a["output_tokens"] == sum(x.output_tokens for x in seen)
