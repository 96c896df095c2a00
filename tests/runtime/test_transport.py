"""SchedulingTransport: the proxy's scheduler in-process, as an httpx transport.

Scheduling decisions are tested with ``httpx.MockTransport`` as the inner
transport on the autojump clock (no wall time passes, grant times are exact);
the SDK and the example talk to the real mock provider on a loopback port.
"""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anthropic
import httpx
import httpx2
import pytest
import trio

import hivemind_trio
from hivemind_trio import Config, SchedulingTransport, SchedulingTransport2
from hivemind_trio.config import BudgetConfig, Route, SchedulerConfig
from hivemind_trio.sim.mock import MockConfig, MockProvider, serve_mock

ROOT = Path(__file__).resolve().parents[2]
URL = "https://api.anthropic.com/v1/messages"
BODY = b'{"model":"claude-test",  "max_tokens":32,"metadata":{"user_id":"u-1"},"messages":[{"role":"user","content":"hi"}]}'
ANTHROPIC_HEADERS = {"x-api-key": "sk-test", "anthropic-version": "2023-06-01", "content-type": "application/json"}
OK_BODY = {
    "id": "msg_1", "type": "message", "role": "assistant", "model": "claude-test",
    "content": [{"type": "text", "text": "hello"}], "stop_reason": "end_turn",
    "usage": {"input_tokens": 5, "output_tokens": 7},
}
REPLY = "TRANSPORT-REPLY-9b1e"
GUARD = 20.0  # seconds of real time: only reached when something is broken


def _error(status: int, kind: str, **headers: str) -> httpx.Response:
    body = {"type": "error", "error": {"type": kind, "message": kind}}
    return httpx.Response(status, json=body, headers=headers)


def _lane(t: SchedulingTransport):
    (lane,) = t.scheduler.lanes.values()
    return lane


@asynccontextmanager
async def mock_provider(**overrides: object) -> AsyncIterator[tuple[MockProvider, str]]:
    """The mock provider on 127.0.0.1:0; yields it and its URL."""
    settings: dict[str, object] = {"latency": 0.0, "jitter": 0.0, "seed": 5, "stream_delay": 0.0, "reply_text": REPLY}
    settings.update(overrides)
    provider = MockProvider(MockConfig(**settings))  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve_mock, provider)
        yield provider, f"http://127.0.0.1:{port}"
        nursery.cancel_scope.cancel()


class Recorder:
    """An inner MockTransport handler that records what reached it and when."""

    def __init__(self, *responses) -> None:
        self.responses = list(responses)
        self.requests: list[httpx.Request] = []
        self.times: list[float] = []

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        self.times.append(trio.current_time())
        answer = self.responses.pop(0) if len(self.responses) > 1 else self.responses[0]
        if isinstance(answer, Exception):
            raise answer
        if callable(answer):
            return answer(request)
        return answer


# ------------------------------------------------------------------ (1) transparency


async def test_request_and_response_pass_through_unchanged(autojump_clock) -> None:
    gz = gzip.compress(json.dumps(OK_BODY).encode())
    upstream_headers = [
        (b"Content-Type", b"application/json"),
        (b"Content-Encoding", b"gzip"),
        (b"Content-Length", str(len(gz)).encode()),
        (b"request-id", b"req_123"),
        (b"X-Unknown-Thing", b"kept"),
    ]
    rec = Recorder(httpx.Response(200, headers=upstream_headers, content=gz))
    sent_headers = [
        (b"Host", b"api.anthropic.com"),
        (b"X-Api-Key", b"sk-test"),
        (b"anthropic-version", b"2023-06-01"),
        (b"X-Hivemind-Agent", b"alice"),
        (b"x-hivemind-priority", b"high"),
        (b"x-hivemind-anything", b"dropped"),
        (b"Accept-Encoding", b"gzip"),
        (b"content-type", b"application/json"),
        (b"Content-Length", str(len(BODY)).encode()),
    ]
    request = httpx.Request("POST", URL + "?beta=true", headers=sent_headers, content=BODY)
    request.extensions["timeout"] = {"connect": 5.0, "read": 600.0, "write": 600.0, "pool": None}
    async with SchedulingTransport(httpx.MockTransport(rec)) as t:
        response = await t.handle_async_request(request)
        raw = b"".join([chunk async for chunk in response.aiter_raw()])

    (seen,) = rec.requests
    assert seen.method == "POST"
    assert str(seen.url) == URL + "?beta=true"
    assert seen.headers.raw == [(k, v) for k, v in sent_headers if not k.lower().startswith(b"x-hivemind-")]
    assert seen.content == BODY
    assert seen.extensions["timeout"] == request.extensions["timeout"]
    # The body as the upstream sent it (still gzip), with its own headers.
    assert raw == gz
    assert response.status_code == 200
    assert response.headers.raw[: len(upstream_headers)] == upstream_headers
    assert response.headers["x-hivemind-agent"] == "alice"
    assert response.headers["x-hivemind-attempts"] == "1"
    stats = t.statistics()
    assert stats["lanes"][0]["route"] == "api.anthropic.com"
    assert stats["lanes"][0]["profile"] == "anthropic"
    assert stats["agents"]["alice"]["priority"] == "high"
    # Usage was metered from the gzip body on a side copy.
    assert stats["agents"]["alice"]["output_tokens"] == 7


async def test_lane_is_host_and_credential(autojump_clock) -> None:
    rec = Recorder(httpx.Response(200, json=OK_BODY))
    async with SchedulingTransport(httpx.MockTransport(rec), agent="bob") as t:
        async with httpx.AsyncClient(transport=t) as client:
            for key in ("sk-a", "sk-a", "sk-b"):
                r = await client.post(URL, content=BODY, headers={**ANTHROPIC_HEADERS, "x-api-key": key})
                assert r.status_code == 200
            r = await client.post("https://api.openai.com/v1/chat/completions", json={"model": "m"}, headers={"authorization": "Bearer sk-a"})
            assert r.headers["x-hivemind-agent"] == "bob"
        lanes = t.statistics()["lanes"]
    assert sorted((lane["route"], lane["profile"], lane["admitted"]) for lane in lanes) == [
        ("api.anthropic.com", "anthropic", 1),
        ("api.anthropic.com", "anthropic", 2),
        ("api.openai.com", "openai", 1),
    ]
    # Raw credentials are never part of a lane key.
    assert not any("sk-" in lane["key"] for lane in lanes)


# ------------------------------------------------------------------ (2) transparent retry


async def test_429_then_200_is_retried_transparently(autojump_clock) -> None:
    rec = Recorder(_error(429, "rate_limit_error", **{"retry-after": "2"}), httpx.Response(200, json=OK_BODY))
    async with SchedulingTransport(httpx.MockTransport(rec)) as t:
        async with httpx.AsyncClient(transport=t) as client:
            t0 = trio.current_time()
            r = await client.post(URL, content=BODY, headers=ANTHROPIC_HEADERS)
    assert r.status_code == 200
    assert r.json() == OK_BODY
    assert r.headers["x-hivemind-attempts"] == "2"
    assert len(rec.requests) == 2
    assert [req.content for req in rec.requests] == [BODY, BODY]
    # The retry waited out the upstream's retry-after (a floor, plus a little jitter).
    assert 2.0 <= rec.times[1] - t0 <= 3.0
    lane = _lane(t)
    assert (lane.upstream_429, lane.retries) == (1, 1)
    (agent,) = t.statistics()["agents"].values()
    assert (agent["retries"], agent["by_status"], agent["failures"]) == (1, {"200": 1}, 0)


async def test_transport_error_before_the_response_is_retried(autojump_clock) -> None:
    rec = Recorder(httpx.ConnectError("refused"), httpx.RemoteProtocolError("reset"), httpx.Response(200, json=OK_BODY))
    async with SchedulingTransport(httpx.MockTransport(rec)) as t:
        async with httpx.AsyncClient(transport=t) as client:
            r = await client.post(URL, content=BODY, headers=ANTHROPIC_HEADERS)
    assert r.status_code == 200
    assert len(rec.requests) == 3
    assert r.headers["x-hivemind-attempts"] == "3"
    # The reset counts against the lane (backpressure), the refused connect does not.
    assert (_lane(t).resets, _lane(t).retries) == (1, 2)


async def test_final_failure_is_the_upstreams_answer_with_no_retry_hint(autojump_clock) -> None:
    rec = Recorder(_error(503, "api_error", **{"x-request-id": "r-1"}))
    config = Config(scheduler=SchedulerConfig(max_attempts=2))
    async with SchedulingTransport(httpx.MockTransport(rec), config=config) as t:
        async with httpx.AsyncClient(transport=t) as client:
            r = await client.post(URL, content=BODY, headers=ANTHROPIC_HEADERS)
    assert len(rec.requests) == 2
    assert r.status_code == 503
    assert r.json()["error"]["type"] == "api_error"
    assert r.headers["x-request-id"] == "r-1"
    assert r.headers["x-should-retry"] == "false"


async def test_client_errors_and_quota_429s_are_not_retried(autojump_clock) -> None:
    rec = Recorder(_error(400, "invalid_request_error"), _error(429, "credit_balance_exhausted"))
    async with SchedulingTransport(httpx.MockTransport(rec)) as t:
        async with httpx.AsyncClient(transport=t) as client:
            r1 = await client.post(URL, content=BODY, headers=ANTHROPIC_HEADERS)
            r2 = await client.post(URL, content=BODY, headers=ANTHROPIC_HEADERS)
    assert (r1.status_code, r2.status_code) == (400, 429)
    assert len(rec.requests) == 2
    assert "x-should-retry" not in r1.headers


async def test_transport_error_after_the_last_attempt_is_raised_as_is(autojump_clock) -> None:
    rec = Recorder(httpx.ConnectError("refused"))
    config = Config(scheduler=SchedulerConfig(max_attempts=2))
    async with SchedulingTransport(httpx.MockTransport(rec), config=config) as t:
        async with httpx.AsyncClient(transport=t) as client:
            with pytest.raises(httpx.ConnectError, match="refused"):
                await client.post(URL, content=BODY, headers=ANTHROPIC_HEADERS)
        assert t.statistics()["lanes"][0]["in_flight"] == 0
    assert len(rec.requests) == 2


async def test_breaker_trip_requeues_an_attempt_waiting_for_headers(autojump_clock) -> None:
    """SPEC §5.4: the hung attempt is cancelled when the breaker opens and sent
    again after the cool-down, as the half-open probe; it is not a failure."""
    slow_calls = 0

    async def handler(request: httpx.Request) -> httpx.Response:
        nonlocal slow_calls
        if request.headers["x-who"] == "slow":
            slow_calls += 1
            if slow_calls == 1:
                await trio.sleep_forever()
            return httpx.Response(200, json=OK_BODY)
        return _error(500, "api_error")

    config = Config(scheduler=SchedulerConfig(max_attempts=1))
    async with SchedulingTransport(httpx.MockTransport(handler), config=config) as t:
        async with httpx.AsyncClient(transport=t) as client:
            results: dict[str, httpx.Response] = {}

            async def call(who: str) -> None:
                results[who] = await client.post(URL, content=BODY, headers={**ANTHROPIC_HEADERS, "x-who": who})

            async with trio.open_nursery() as nursery:
                nursery.start_soon(call, "slow")
                await trio.sleep(1)
                for i in range(5):
                    await call(f"bad{i}")
                assert _lane(t).breaker.state.value == "open"
    slow = results["slow"]
    assert slow.status_code == 200
    assert slow.headers["x-hivemind-attempts"] == "1"
    assert slow_calls == 2
    assert [results[f"bad{i}"].status_code for i in range(5)] == [500] * 5
    assert _lane(t).breaker.state.value == "closed"
    assert _lane(t).in_flight == 0


# ------------------------------------------------------------------ (3) admission


async def test_configured_rpm_paces_admission(autojump_clock) -> None:
    rec = Recorder(httpx.Response(200, json=OK_BODY))
    async with SchedulingTransport(httpx.MockTransport(rec), rpm=2) as t:
        async with httpx.AsyncClient(transport=t) as client:
            statuses: list[int] = []

            async def call() -> None:
                statuses.append((await client.post(URL, content=BODY, headers=ANTHROPIC_HEADERS)).status_code)

            async with trio.open_nursery() as nursery:
                for _ in range(5):
                    nursery.start_soon(call)
    assert statuses == [200] * 5
    # No 60 s window ever holds more than 2 admissions.
    assert rec.times == pytest.approx([0, 0, 60, 60, 120], abs=1e-3)


async def test_route_limits_and_priority_header(autojump_clock) -> None:
    """A configured upstream lends its rpm; x-hivemind-priority reorders the queue."""
    rec = Recorder(lambda req: httpx.Response(200, json=OK_BODY, headers={"x-who": req.headers.get("x-who", "")}))
    config = Config(
        routes=(Route(name="anthropic", url="https://api.anthropic.com", rpm=1),),
        # No aging within this test's minutes: priority alone orders the queue.
        scheduler=SchedulerConfig(aging_interval=3600),
    )
    order: list[str] = []
    async with SchedulingTransport(httpx.MockTransport(rec), config=config) as t:
        async with httpx.AsyncClient(transport=t) as client:

            async def call(who: str, priority: str) -> None:
                headers = {**ANTHROPIC_HEADERS, "x-who": who, "x-hivemind-priority": priority}
                r = await client.post(URL, content=BODY, headers=headers)
                order.append(r.headers["x-who"])

            async with trio.open_nursery() as nursery:
                nursery.start_soon(call, "first", "normal")
                await trio.sleep(1)
                nursery.start_soon(call, "held", "normal")
                await trio.sleep(1)
                nursery.start_soon(call, "normal", "normal")
                await trio.sleep(1)
                nursery.start_soon(call, "urgent", "critical")
    # Critical overtakes normal work queued before it (whether the pacer had
    # already chosen "held" as the lane's next grant is the scheduler's business).
    assert order[0] == "first"
    assert order.index("urgent") < order.index("normal")
    assert rec.times == pytest.approx([0, 60, 120, 180], abs=1e-3)
    assert all("x-hivemind-priority" not in req.headers for req in rec.requests)


async def test_queue_timeout_is_a_provider_format_overload(autojump_clock) -> None:
    rec = Recorder(httpx.Response(200, json=OK_BODY))
    config = Config(scheduler=SchedulerConfig(queue_timeout=5.0))
    async with SchedulingTransport(httpx.MockTransport(rec), config=config, rpm=1) as t:
        async with httpx.AsyncClient(transport=t) as client:
            r1 = await client.post(URL, content=BODY, headers=ANTHROPIC_HEADERS)
            r2 = await client.post(URL, content=BODY, headers=ANTHROPIC_HEADERS)
    assert r1.status_code == 200
    assert r2.status_code == 529
    assert r2.json()["error"]["type"] == "overloaded_error"
    assert int(r2.headers["retry-after"]) >= 1
    assert len(rec.requests) == 1
    (agent,) = t.statistics()["agents"].values()
    assert agent["queue_timeouts"] == 1
    assert [e["kind"] for e in t.scheduler.events] == ["queue_timeout"]


async def test_spent_budget_refuses_without_an_upstream_call(autojump_clock) -> None:
    rec = Recorder(httpx.Response(200, json=OK_BODY))
    config = Config(budget=BudgetConfig(agent_tokens=10, ledger="off"))
    async with SchedulingTransport(httpx.MockTransport(rec), config=config, agent="spender") as t:
        async with httpx.AsyncClient(transport=t) as client:
            r = await client.post(URL, content=BODY, headers=ANTHROPIC_HEADERS)
    assert r.status_code == 429
    assert r.headers["x-should-retry"] == "false"
    assert "budget" in r.json()["error"]["message"]
    assert rec.requests == []
    assert t.statistics()["agents"]["spender"]["budget_refusals"] == 1


# ------------------------------------------------------------------ (4) the slot follows the stream


class EndlessEvents(httpx.AsyncByteStream):
    """An SSE body that never ends (one event per second); records its close."""

    def __init__(self) -> None:
        self.closed = False

    async def __aiter__(self):
        yield b'event: message_start\ndata: {"type":"message_start","message":{"usage":{"input_tokens":9,"output_tokens":1}}}\n\n'
        while True:
            await trio.sleep(1)
            yield b'event: ping\ndata: {"type":"ping"}\n\n'

    async def aclose(self) -> None:
        self.closed = True


async def test_slot_is_released_when_a_stream_is_closed_early(autojump_clock) -> None:
    body = EndlessEvents()
    rec = Recorder(httpx.Response(200, headers={"content-type": "text/event-stream"}, stream=body))
    async with SchedulingTransport(httpx.MockTransport(rec), agent="reader") as t:
        async with httpx.AsyncClient(transport=t) as client:
            async with client.stream("POST", URL, content=BODY, headers=ANTHROPIC_HEADERS) as r:
                chunks = r.aiter_raw()
                first = await chunks.__anext__()
                assert b"message_start" in first
                await chunks.__anext__()
                lane = _lane(t)
                assert lane.in_flight == 1
                assert lane.limiter.borrowed_tokens == 1
                assert t._core.guard.borrowed_tokens == 1
                await chunks.aclose()
            assert body.closed
            assert lane.in_flight == 0
            assert lane.limiter.borrowed_tokens == 0
            assert t._core.guard.borrowed_tokens == 0
            agent = t.statistics()["agents"]["reader"]
            assert agent["in_flight"] == 0
            # What was metered before the close is charged.
            assert agent["input_tokens"] == 9


async def test_slot_is_released_at_the_end_of_a_stream_and_usage_metered(autojump_clock) -> None:
    events = (
        b'event: message_start\ndata: {"type":"message_start","message":{"usage":{"input_tokens":11,"output_tokens":1}}}\n\n'
        b'event: content_block_delta\ndata: {"type":"content_block_delta","delta":{"type":"text_delta","text":"hi"}}\n\n'
        b'event: message_delta\ndata: {"type":"message_delta","usage":{"output_tokens":23}}\n\n'
        b'event: message_stop\ndata: {"type":"message_stop"}\n\n'
    )
    rec = Recorder(httpx.Response(200, headers={"content-type": "text/event-stream"}, content=events))
    async with SchedulingTransport(httpx.MockTransport(rec), agent="streamer", config=Config(scheduler=SchedulerConfig())) as t:
        request = httpx.Request("POST", URL, headers=ANTHROPIC_HEADERS, content=BODY)
        response = await t.handle_async_request(request)
        lane = _lane(t)
        assert lane.in_flight == 1
        got = b"".join([chunk async for chunk in response.stream])
        # Released at the last byte, before (without) any close.
        assert lane.in_flight == 0
        await response.aclose()
        assert got == events
        agent = t.statistics()["agents"]["streamer"]
    assert (agent["input_tokens"], agent["output_tokens"], agent["estimated_requests"]) == (11, 23, 0)


# httpx2 iterates its layered streams with nested async generators and closes
# only the connection (as httpx does, see pyproject.toml): theirs are ignored.
@pytest.mark.filterwarnings("ignore:Async generator 'http(x|core)2\\._:ResourceWarning")
async def test_httpx2_stream_closed_early_over_real_sockets() -> None:
    """The httpx2 flavour over its default inner transport, against the mock:
    the slot and the connection guard come back when the caller closes early."""
    with trio.fail_after(GUARD):
        async with mock_provider(stream_delay=0.05, stream_chunks=40) as (provider, url):
            async with SchedulingTransport2(agent="early") as t:
                async with httpx2.AsyncClient(transport=t, timeout=60) as client:
                    body = {"model": "claude-test", "max_tokens": 64, "stream": True, "messages": [{"role": "user", "content": "hi"}]}
                    async with client.stream("POST", url + "/v1/messages", json=body, headers=ANTHROPIC_HEADERS) as r:
                        assert r.headers["content-type"].startswith("text/event-stream")
                        lines = r.aiter_lines()
                        assert (await lines.__anext__()).startswith("event: message_start")
                        assert _lane(t).in_flight == 1
                        await lines.aclose()
                    assert _lane(t).in_flight == 0
                    assert t._core.guard.borrowed_tokens == 0
                    # The lane is free for the next request.
                    r2 = await client.post(url + "/v1/messages", json={**body, "stream": False}, headers=ANTHROPIC_HEADERS)
                    assert r2.status_code == 200 and REPLY in r2.text
                agent = t.statistics()["agents"]["early"]
    assert agent["requests"] == 2 and agent["in_flight"] == 0 and agent["failures"] == 0
    assert agent["input_tokens"] >= 2  # the abandoned stream's message_start was metered


# ------------------------------------------------------------------ lifecycle


class ClosingMock(httpx.MockTransport):
    def __init__(self, handler) -> None:
        super().__init__(handler)
        self.closed = False

    async def aclose(self) -> None:
        self.closed = True


async def test_without_async_with_the_dispatchers_run_in_a_system_task(autojump_clock) -> None:
    inner = ClosingMock(Recorder(httpx.Response(200, json=OK_BODY)))
    t = SchedulingTransport(inner, rpm=1)
    client = httpx.AsyncClient(transport=t)
    r1 = await client.post(URL, content=BODY, headers=ANTHROPIC_HEADERS)
    r2 = await client.post(URL, content=BODY, headers=ANTHROPIC_HEADERS)  # paced by a dispatcher
    assert (r1.status_code, r2.status_code) == (200, 200)
    assert trio.current_time() == pytest.approx(60, abs=1e-3)
    await client.aclose()
    assert inner.closed
    with pytest.raises(RuntimeError, match="closed"):
        await t.handle_async_request(httpx.Request("POST", URL, headers=ANTHROPIC_HEADERS, content=BODY))


async def test_clients_inside_async_with_share_the_transport(autojump_clock) -> None:
    inner = ClosingMock(Recorder(httpx.Response(200, json=OK_BODY)))
    async with SchedulingTransport(inner) as t:
        for _ in range(2):
            async with httpx.AsyncClient(transport=t) as client:
                assert (await client.post(URL, content=BODY, headers=ANTHROPIC_HEADERS)).status_code == 200
            await client.aclose()  # what an SDK's close() does: deferred to the outer exit
            assert not inner.closed
    assert inner.closed
    assert _lane(t).admitted == 2


async def test_an_error_in_the_block_comes_out_unwrapped() -> None:
    with pytest.raises(ValueError, match="boom"):
        async with SchedulingTransport(ClosingMock(Recorder(httpx.Response(200)))):
            raise ValueError("boom")


async def test_wrong_flavour_is_refused_clearly() -> None:
    with pytest.raises(TypeError, match="SchedulingTransport2"):
        SchedulingTransport(httpx2.MockTransport(lambda r: httpx2.Response(200)))
    async with SchedulingTransport(ClosingMock(Recorder(httpx.Response(200)))) as t:
        with pytest.raises(TypeError, match="SchedulingTransport2"):
            await t.handle_async_request(httpx2.Request("GET", URL))


def test_exported() -> None:
    assert "SchedulingTransport" in hivemind_trio.__all__
    assert hivemind_trio.SchedulingTransport is SchedulingTransport
    assert issubclass(SchedulingTransport, httpx.AsyncBaseTransport)
    assert issubclass(SchedulingTransport2, httpx2.AsyncBaseTransport)


# ------------------------------------------------------------------ (5) the official SDK


async def test_the_anthropic_sdk_needs_and_gets_the_httpx2_flavour() -> None:
    # anthropic 2.x is built on httpx2 and refuses plain httpx clients outright.
    with pytest.raises(TypeError, match="httpx2"):
        anthropic.AsyncAnthropic(api_key="sk-test", http_client=httpx.AsyncClient(transport=SchedulingTransport()))


async def test_anthropic_async_sdk_through_the_transport() -> None:
    with trio.fail_after(GUARD):
        async with mock_provider(stream_delay=0.001) as (provider, url):
            async with SchedulingTransport2(agent="sdk") as transport:
                http = httpx2.AsyncClient(transport=transport, timeout=60)
                async with anthropic.AsyncAnthropic(base_url=url, api_key="sk-test", http_client=http, max_retries=0) as client:
                    texts: list[str] = []

                    async def ask(i: int) -> None:
                        msg = await client.messages.create(
                            model="claude-test", max_tokens=32, messages=[{"role": "user", "content": f"q{i}"}]
                        )
                        texts.append(msg.content[0].text)

                    async with trio.open_nursery() as nursery:
                        for i in range(4):
                            nursery.start_soon(ask, i)
                    async with client.messages.stream(
                        model="claude-test", max_tokens=32, messages=[{"role": "user", "content": "stream"}]
                    ) as stream:
                        deltas = [d async for d in stream.text_stream]
                        final = await stream.get_final_message()
                stats = transport.statistics()
    assert len(texts) == 4 and all(REPLY in text for text in texts)
    assert len(deltas) >= 2 and REPLY in "".join(deltas)
    assert [a.status for a in provider.attempts] == [200] * 5
    (lane,) = stats["lanes"]
    assert (lane["profile"], lane["admitted"], lane["in_flight"]) == ("anthropic", 5, 0)
    agent = stats["agents"]["sdk"]
    assert agent["requests"] == 5 and agent["in_flight"] == 0
    assert agent["output_tokens"] == sum(a.output_tokens for a in provider.attempts)
    assert final.usage.output_tokens == provider.attempts[-1].output_tokens


async def test_anthropic_sdk_rate_limited_upstream_is_retried_for_it() -> None:
    """The SDK's own retries are off: the transport absorbs the mock's 429s."""
    with trio.fail_after(GUARD):
        async with mock_provider(rpm=2, window=0.5) as (provider, url):
            async with SchedulingTransport2() as transport:
                http = httpx2.AsyncClient(transport=transport, timeout=60)
                async with anthropic.AsyncAnthropic(base_url=url, api_key="sk-test", http_client=http, max_retries=0) as client:
                    async with trio.open_nursery() as nursery:
                        for i in range(5):
                            nursery.start_soon(
                                lambda i=i: client.messages.create(
                                    model="claude-test", max_tokens=16, messages=[{"role": "user", "content": f"q{i}"}]
                                )
                            )
    assert sum(1 for a in provider.attempts if a.status == 200) == 5


# The openai SDK leaves its SSE generators (and httpx2's below them) to the
# garbage collector when it stops at "data: [DONE]": an SDK quirk, as in tests/e2e.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
async def test_openai_async_sdk_through_the_transport() -> None:
    import openai

    with trio.fail_after(GUARD):
        async with mock_provider() as (provider, url):
            async with SchedulingTransport2(agent="oa") as transport:
                http = httpx2.AsyncClient(transport=transport, timeout=60)
                async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="sk-test", http_client=http, max_retries=0) as client:
                    chat = await client.chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": "hi"}])
                    stream = await client.chat.completions.create(
                        model="gpt-test", messages=[{"role": "user", "content": "hi"}], stream=True,
                        stream_options={"include_usage": True},
                    )
                    async with stream:
                        chunks = [c async for c in stream]
                stats = transport.statistics()
    assert REPLY in chat.choices[0].message.content
    assert chunks[-1].usage is not None
    (lane,) = stats["lanes"]
    assert (lane["profile"], lane["admitted"], lane["in_flight"]) == ("openai", 2, 0)
    assert stats["agents"]["oa"]["output_tokens"] == chat.usage.completion_tokens + chunks[-1].usage.completion_tokens


# ------------------------------------------------------------------ (6) the example


def test_the_example_runs() -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "scheduled_sdk.py"), "--calls", "6", "--rpm", "3", "--window", "0.5"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    answers = [line for line in lines if line.startswith("call ")]
    assert len(answers) == 6
    assert all("Answer from the mock." in line for line in answers)
    assert "6/6 calls answered" in lines[-1]
    assert any(line.startswith("lane 127.0.0.1:") and "(anthropic)" in line for line in lines)
