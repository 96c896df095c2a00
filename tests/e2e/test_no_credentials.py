"""SPEC §4.1 / §7.3: no credential ever shows in the logs, /hivemind/status,
/hivemind/metrics or the dashboard page.

A real proxy (Hypercorn on a loopback port) in front of the mock provider
gets requests that carry distinctive secrets, as ``x-api-key`` and as
``Authorization: Bearer``, over every path that logs something: success
(plain, streamed, a WebSocket), an unreachable upstream, TCP resets, 502s
after retries, 429s (rate limit past the client's deadline, quota),
a budget refusal, malformed JSON, a client that leaves mid-stream, and admin
requests with the right and a wrong admin token.  Every log record of the
process (all loggers, DEBUG and up: the proxy's, Hypercorn's, httpx/httpcore's,
trio-websocket's) is then rendered with both formatters (human and JSON) and
searched for the secrets and for pieces of them.
"""

from __future__ import annotations

import json
import logging
import secrets
import socket
from pathlib import Path

import anthropic
import httpx
import pytest
import trio
import trio_websocket

import hivemind_trio
from hivemind_trio import Config, Route, ServerConfig, open_proxy
from hivemind_trio.config import BudgetConfig, SchedulerConfig
from hivemind_trio.logs import HUMAN_FORMAT, JsonFormatter
from hivemind_trio.sim.mock import MockConfig, MockProvider, serve_mock

GUARD = 60.0  # seconds: only ever reached when something is broken
MSG = {"model": "claude-test", "max_tokens": 64, "messages": [{"role": "user", "content": "hello there"}]}
CHAT = {"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}], "stream": True}

# Every logger that could see a request: the root gets DEBUG too, so anything
# else that logs in this process is captured as well.
LOGGERS = ("hivemind_trio", "hypercorn", "hypercorn.error", "hypercorn.access", "httpx", "httpcore",
           "h11", "h2", "hpack", "trio-websocket", "wsproto")

DASHBOARD = Path(hivemind_trio.__file__).parent / "admin" / "dashboard.py"


def _secret(kind: str) -> str:
    return f"sk-{kind}-SECRET{secrets.token_hex(16)}"


def _needles(secret: str) -> list[str]:
    """The secret and pieces of it: a masked or truncated form must not show either."""
    rand = secret.rsplit("SECRET", 1)[1]
    return [secret, rand, rand[:12], rand[10:22], rand[-8:]]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _assert_clean(where: str, text: str, needles: list[str]) -> None:
    for n in needles:
        assert n not in text, f"a credential (or a piece of one: {n!r}) appears in {where}:\n{text[:4000]}"


async def test_no_credential_in_logs_status_metrics_or_dashboard(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    for name in LOGGERS:
        caplog.set_level(logging.DEBUG, logger=name)
    key = _secret("ant-api03")        # as x-api-key
    bearer = _secret("proj")          # as Authorization: Bearer
    sdk_key = _secret("ant-sdk")      # the anthropic SDK's own x-api-key
    ws_bearer = _secret("ws")         # the WebSocket upgrade's Authorization
    admin = _secret("admin")          # the admin token
    wrong_admin = _secret("wrong")    # a refused admin token
    needles = [n for s in (key, bearer, sdk_key, ws_bearer, admin, wrong_admin) for n in _needles(s)]

    provider = MockProvider(MockConfig(latency=0.0, jitter=0.0, seed=5, stream_delay=0.002, output_sd=0))
    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery:
            port = await nursery.start(serve_mock, provider)
            mock = f"http://127.0.0.1:{port}"
            config = Config(
                routes=(
                    Route(name="mock", url=mock, prefix="/"),
                    Route(name="dead", url=f"http://127.0.0.1:{_closed_port()}", prefix="/dead"),
                ),
                server=ServerConfig(shutdown_grace=1.0, admin_token=admin),
                scheduler=SchedulerConfig(max_attempts=2, queue_timeout=5.0),
                budget=BudgetConfig(agent_tokens=5000, ledger="off"),
            )
            async with open_proxy(config) as proxy:
                anth = {"x-api-key": key, "anthropic-version": "2023-06-01", "x-stainless-timeout": "3"}
                bear = {"authorization": f"Bearer {bearer}", "x-stainless-timeout": "3"}
                async with httpx.AsyncClient(base_url=proxy.url, timeout=30) as client:

                    async def post(path: str, headers: dict[str, str], **kw: object) -> httpx.Response:
                        return await client.post(path, headers=headers, **kw)  # type: ignore[arg-type]

                    # Success, plain and streamed, both credential styles; one with no agent header
                    # (its identity is the salted hash of the key).
                    r = await post("/v1/messages", anth | {"x-hivemind-agent": "ok-anthropic"}, json=MSG)
                    assert r.status_code == 200, r.text
                    r = await post("/v1/messages", anth, json=MSG | {"stream": True})
                    assert r.status_code == 200, r.text
                    r = await post("/v1/chat/completions", bear | {"x-hivemind-agent": "ok-openai"}, json=CHAT)
                    assert r.status_code == 200, r.text
                    # Forced upstream faults: 429s past the client's deadline, quota, 529, 502, resets.
                    r = await post("/v1/messages", anth | {"x-hivemind-agent": "limited", "x-mock-fault": "429",
                                                           "x-stainless-timeout": "1.5"}, json=MSG)
                    assert r.status_code == 429, r.text
                    r = await post("/v1/chat/completions", bear | {"x-hivemind-agent": "quota", "x-mock-fault": "quota"},
                                   json=CHAT)
                    assert r.status_code == 429, r.text
                    for fault, agent in (("529", "overloaded"), ("502", "flaky"), ("reset", "resets")):
                        r = await post("/v1/messages", anth | {"x-hivemind-agent": agent, "x-mock-fault": fault}, json=MSG)
                        assert r.status_code >= 500, (fault, r.status_code, r.text)
                    # Mid-stream faults (after the first byte: no retry, the stream breaks or errors).
                    for fault in ("drop", "error"):
                        try:
                            async with client.stream("POST", "/v1/messages", json=MSG | {"stream": True},
                                                     headers=anth | {"x-hivemind-agent": f"mid-{fault}", "x-mock-fault": fault}) as s:
                                async for _ in s.aiter_raw():
                                    pass
                        except httpx.HTTPError:
                            pass
                    # An unreachable upstream (connect errors, retried, then 502).
                    r = await post("/dead/v1/messages", anth | {"x-hivemind-agent": "dead-end"}, json=MSG)
                    assert r.status_code == 502, r.text
                    r = await post("/dead/v1/chat/completions", bear | {"x-hivemind-agent": "dead-end"}, json=CHAT)
                    assert r.status_code == 502, r.text
                    # A spent budget: refused by the proxy itself.
                    r = await post("/v1/messages", anth | {"x-hivemind-agent": "big-spender"}, json=MSG | {"max_tokens": 100_000})
                    assert r.status_code == 429 and "budget" in r.text, r.text
                    # Malformed JSON, forwarded as is (the mock refuses it).
                    r = await post("/v1/messages", anth | {"x-hivemind-agent": "bad-json", "content-type": "application/json"},
                                   content=b'{"model": "claude-test", "max_tokens": ')
                    assert r.status_code >= 400, r.text
                    # A client that leaves after the first chunk of a stream.
                    async with client.stream("POST", "/v1/messages", json=MSG | {"stream": True},
                                             headers=anth | {"x-hivemind-agent": "leaver"}) as s:
                        async for _ in s.aiter_raw():
                            break
                    # The anthropic SDK's own request.
                    async with anthropic.AsyncAnthropic(base_url=proxy.url, api_key=sdk_key, max_retries=0) as sdk:
                        msg = await sdk.messages.create(**MSG)  # type: ignore[call-overload]
                        assert msg.content
                    # A WebSocket (Codex's Responses API transport) with a Bearer token.
                    async with trio_websocket.open_websocket(
                        "127.0.0.1", proxy.port, "/v1/responses", use_ssl=False,
                        extra_headers=[(b"authorization", f"Bearer {ws_bearer}".encode()), (b"x-hivemind-agent", b"ws-agent")],
                    ) as ws:
                        await ws.send_message(json.dumps({"type": "response.create", "model": "gpt-test", "input": "hi"}))
                        while json.loads(await ws.get_message()).get("type") != "response.completed":
                            pass

                    # The admin surfaces, with the admin token (and once with a wrong one).
                    auth = {"authorization": f"Bearer {admin}"}
                    r = await client.get("/hivemind/status", headers={"authorization": f"Bearer {wrong_admin}"})
                    assert r.status_code == 403
                    status = await client.get("/hivemind/status", headers=auth)
                    assert status.status_code == 200, status.text
                    metrics = await client.get("/hivemind/metrics", headers=auth)
                    assert metrics.status_code == 200, metrics.text
                    pages = {"/hivemind/status": status.text, "/hivemind/metrics": metrics.text}
                    if DASHBOARD.exists():  # the dashboard is being added alongside this test
                        page = await client.get("/hivemind/", headers=auth)
                        assert page.status_code == 200, page.text[:500]
                        pages["/hivemind/ (dashboard)"] = page.text
            nursery.cancel_scope.cancel()

    # The run did exercise what it claims: the agents and the failures are in the status...
    body = status.json()
    agents = body["agents"]
    for name in ("ok-anthropic", "ok-openai", "limited", "quota", "flaky", "resets", "dead-end", "big-spender",
                 "bad-json", "ws-agent"):
        assert name in agents, (name, sorted(agents))
    assert agents["big-spender"]["budget_refusals"] == 1
    assert any(name.startswith("key-") for name in agents), sorted(agents)  # identified by the hashed key
    # ...and in the logs, one request line each.
    request_lines = [r for r in caplog.records if r.name == "hivemind_trio.requests"]
    statuses = {getattr(r, "status", None) for r in request_lines}
    assert {200, 429, 502} <= statuses, statuses
    assert any("lane=" in r.getMessage() for r in request_lines)

    for where, text in pages.items():
        _assert_clean(where, text, needles)
    human = logging.Formatter(HUMAN_FORMAT)
    as_json = JsonFormatter()
    assert len(caplog.records) > 20
    for record in caplog.records:
        where = f"the log record {record.name}:{record.levelname} {record.getMessage()[:200]!r}"
        _assert_clean(where + " (human)", human.format(record), needles)
        _assert_clean(where + " (JSON)", as_json.format(record), needles)
    _assert_clean("caplog.text", caplog.text, needles)
