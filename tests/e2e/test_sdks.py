"""The official clients end to end: anthropic, openai, ollama and curl talk to a
real Hypercorn proxy (port 0), which talks to the mock provider or to a tiny
scripted upstream over real sockets.

Streaming tests check *ordering*, never wall-clock durations: either the
upstream withholds the rest of a stream until the client has confirmed the
first event (a buffering proxy deadlocks and the test fails), or the client
checks that the mock had not finished its stream when the first event arrived.

The last test is the regression test for the httpcore pool-slot leak under
cancellation (httpcore issue 1093, DESIGN.md "Known traps").
"""

from __future__ import annotations

import json
import os
import random
import shutil
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial

import anthropic
import httpx
import ollama
import openai
import pytest
import trio
import trio.testing

from hivemind_trio import Config, ServerConfig, open_proxy
from hivemind_trio.runtime.serve import Proxy
from hivemind_trio.sim.mock import MockConfig, MockProvider, serve_mock
from tests.helpers import answer_lifespan, serve_asgi

REPLY = "SDK-E2E-REPLY-5c1d"
MSG = {"model": "claude-test", "max_tokens": 1024, "messages": [{"role": "user", "content": "hello there"}]}
CHAT = [{"role": "user", "content": "hi"}]
GUARD = 10.0  # seconds: only ever reached when something is broken


# ------------------------------------------------------------------ fixtures


def _server(**overrides: object) -> ServerConfig:
    # A short grace so a test that leaves a connection open does not hold
    # the proxy's shutdown for the default 30 s.
    settings: dict[str, object] = {"shutdown_grace": 1.0}
    settings.update(overrides)
    return ServerConfig(**settings)  # type: ignore[arg-type]


@asynccontextmanager
async def mock_behind_proxy(**overrides: object) -> AsyncIterator[tuple[MockProvider, Proxy]]:
    """The mock on port 0 and a real proxy in front of it (its only upstream).

    A context manager, not a fixture: the proxy's nursery must be opened and
    closed by the same task, and ``overrides`` are per test.
    """
    settings: dict[str, object] = {
        "latency": 0.0, "jitter": 0.0, "seed": 11, "stream_delay": 0.0, "reply_text": REPLY,
    }
    settings.update(overrides)
    provider = MockProvider(MockConfig(**settings))  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve_mock, provider)
        async with open_proxy(Config(upstream=f"http://127.0.0.1:{port}", server=_server())) as proxy:
            yield provider, proxy
        nursery.cancel_scope.cancel()


# Upstreams are served like any ASGI app in the tests.
serve_upstream = serve_asgi


async def _read_body(receive) -> bytes | None:
    """The request body, or None if the client left before sending all of it
    (the disconnect is then consumed here, so the handler must not wait for it)."""
    body = b""
    while True:
        m = await receive()
        if m["type"] == "http.disconnect":
            return None
        body += m.get("body", b"")
        if not m.get("more_body"):
            return body


def _lifespan_or_http(handler):
    """Wrap an HTTP handler ``(scope, body, receive, send)`` into an ASGI app."""

    async def app(scope, receive, send):
        if scope["type"] == "lifespan":
            await answer_lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        body = await _read_body(receive)
        if body is not None:
            await handler(scope, body, receive, send)

    return app


def _oks(provider: MockProvider) -> list[tuple[int, str, bool]]:
    return [(a.status, a.outcome, a.stream) for a in provider.attempts]


# ------------------------------------------------------------------ Anthropic


async def test_anthropic_sync_client_in_a_thread() -> None:
    async with mock_behind_proxy() as (provider, proxy):

        def call():
            with anthropic.Anthropic(base_url=proxy.url, api_key="sk-test", max_retries=0) as client:
                raw = client.messages.with_raw_response.create(**MSG)
                return dict(raw.headers), raw.parse()

        headers, msg = await trio.to_thread.run_sync(call)
        assert REPLY in msg.content[0].text
        assert msg.stop_reason == "end_turn"
        assert msg.usage.input_tokens >= 1
        assert msg.usage.output_tokens == provider.attempts[0].output_tokens >= 1
        assert headers["request-id"] == provider.attempts[0].request_id
        assert headers["x-hivemind-attempts"] == "1"
        assert _oks(provider) == [(200, "ok", False)]


async def test_anthropic_async_client() -> None:
    async with mock_behind_proxy() as (provider, proxy):
        async with anthropic.AsyncAnthropic(base_url=proxy.url, api_key="sk-test", max_retries=0) as client:
            msg = await client.messages.create(**MSG)
            count = await client.messages.count_tokens(model=MSG["model"], messages=MSG["messages"])
        assert REPLY in msg.content[0].text
        assert msg.model == "claude-test"
        assert msg.usage.output_tokens == provider.attempts[0].output_tokens >= 1
        assert count.input_tokens >= 1
        # count_tokens is not a generation: exactly one attempt in the log.
        assert _oks(provider) == [(200, "ok", False)]


async def test_anthropic_streaming_helper_and_raw_stream() -> None:
    async with mock_behind_proxy(stream_delay=0.001) as (provider, proxy):
        async with anthropic.AsyncAnthropic(base_url=proxy.url, api_key="sk-test", max_retries=0) as client:
            async with client.messages.stream(**MSG) as stream:
                texts = [t async for t in stream.text_stream]
                final = await stream.get_final_message()
            raw = await client.messages.create(**MSG, stream=True)
            async with raw:
                events = [e async for e in raw]
        assert len(texts) >= 2  # arrived as several deltas, not one blob
        assert REPLY in "".join(texts) == final.content[0].text
        assert final.usage.input_tokens >= 1
        assert final.usage.output_tokens == provider.attempts[0].output_tokens
        kinds = [e.type for e in events]
        assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
        delta = [e for e in events if e.type == "message_delta"][-1]
        assert delta.usage.output_tokens == provider.attempts[1].output_tokens
        assert REPLY in "".join(e.delta.text for e in events if e.type == "content_block_delta")
        assert _oks(provider) == [(200, "ok", True), (200, "ok", True)]


# --------------------------------------------------------------------- OpenAI


# The openai SDK breaks out of its SSE generator at "data: [DONE]" and leaves it
# to the garbage collector, which Trio reports: an SDK quirk (tests/sim does the same).
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
async def test_openai_chat_stream_include_usage() -> None:
    async with mock_behind_proxy() as (provider, proxy):
        async with openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="sk-test", max_retries=0) as client:
            stream = await client.chat.completions.create(
                model="gpt-test", messages=CHAT, stream=True, stream_options={"include_usage": True}
            )
            async with stream:
                chunks = [c async for c in stream]
        assert REPLY in "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        last = chunks[-1]
        assert last.choices == []
        assert last.usage is not None
        assert last.usage.completion_tokens == provider.attempts[0].output_tokens
        assert last.usage.total_tokens == last.usage.prompt_tokens + last.usage.completion_tokens
        assert all(c.usage is None for c in chunks[:-1])
        assert _oks(provider) == [(200, "ok", True)]


async def test_openai_responses_stream() -> None:
    async with mock_behind_proxy() as (provider, proxy):
        async with openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="sk-test", max_retries=0) as client:
            stream = await client.responses.create(model="gpt-test", input="hi", stream=True)
            async with stream:
                events = [e async for e in stream]
        kinds = [e.type for e in events]
        assert kinds[0] == "response.created"
        assert kinds[-1] == "response.completed" and kinds.count("response.completed") == 1
        assert [e.sequence_number for e in events] == list(range(len(events)))
        done = events[-1].response
        assert REPLY in done.output_text
        assert REPLY in "".join(e.delta for e in events if e.type == "response.output_text.delta")
        assert done.usage.output_tokens == provider.attempts[0].output_tokens
        assert done.usage.total_tokens == done.usage.input_tokens + done.usage.output_tokens
        assert _oks(provider) == [(200, "ok", True)]


# --------------------------------------------------------------------- Ollama


async def test_ollama_client_streaming_chat() -> None:
    async with mock_behind_proxy() as (provider, proxy):
        client = ollama.AsyncClient(host=proxy.url)
        try:
            parts = [p async for p in await client.chat(model="llama3", messages=CHAT, stream=True)]
            whole = await client.chat(model="llama3", messages=CHAT, stream=False)
        finally:
            await client.close()
        assert len(parts) >= 3
        assert REPLY in "".join(p.message.content for p in parts)
        assert [p.done for p in parts] == [False] * (len(parts) - 1) + [True]
        assert parts[-1].eval_count == provider.attempts[0].output_tokens
        assert parts[-1].prompt_eval_count >= 1
        assert REPLY in whole.message.content and whole.done
        assert _oks(provider) == [(200, "ok", True), (200, "ok", False)]


async def test_ollama_default_stream_relayed_before_the_mock_finishes() -> None:
    """A raw POST /api/chat with no "stream" field: Ollama streams by default and
    the proxy must recognise that from the response, relaying line by line."""
    async with mock_behind_proxy(stream_delay=0.3, stream_chunks=4) as (provider, proxy):
        seen_unfinished: list[bool] = []
        lines: list[dict] = []
        async with httpx.AsyncClient(base_url=proxy.url, timeout=GUARD) as client:
            with trio.fail_after(GUARD):
                async with client.stream("POST", "/api/chat", json={"model": "llama3", "messages": CHAT}) as r:
                    assert r.status_code == 200
                    assert r.headers["content-type"] == "application/x-ndjson"
                    it = r.aiter_lines()
                    try:
                        async for line in it:
                            if not lines:
                                # The mock records an attempt only after its last frame,
                                # about four stream_delays from now.
                                seen_unfinished.append(provider.attempts == [] and provider.in_flight == 1)
                            lines.append(json.loads(line))
                    finally:
                        await it.aclose()
    assert seen_unfinished == [True]
    assert len(lines) >= 4
    assert [line["done"] for line in lines] == [False] * (len(lines) - 1) + [True]
    assert REPLY in "".join(line["message"]["content"] for line in lines)
    assert _oks(provider) == [(200, "ok", True)]


# ------------------------------------- event by event, gated by the client's receipt


class Gated:
    """An upstream that sends the first part of a stream, then waits until the
    client confirms (through the proxy) that it has it, then sends the rest.

    ``order`` records both sides; a buffering proxy leaves the client without
    its first event, the gate times out after GUARD and the order is wrong.
    """

    def __init__(self, content_type: bytes, first: list[bytes], rest: list[bytes]) -> None:
        self.content_type, self.first, self.rest = content_type, first, rest
        self.gate = trio.Event()
        self.order: list[str] = []
        self.requests: list[bytes] = []
        self.app = _lifespan_or_http(self._handle)

    def client_got_first(self) -> None:
        self.order.append("client got first")
        self.gate.set()

    async def _handle(self, scope, body, receive, send) -> None:
        self.requests.append(body)
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", self.content_type)]})
        # Recorded before sending: once the bytes are on the socket the client
        # may see them before this task runs again.
        self.order.append("upstream sends first")
        for part in self.first:
            await send({"type": "http.response.body", "body": part, "more_body": True})
        with trio.move_on_after(GUARD):
            await self.gate.wait()
        self.order.append("upstream sends rest")
        for part in self.rest:
            await send({"type": "http.response.body", "body": part, "more_body": True})
        await send({"type": "http.response.body", "body": b""})


def _sse(event: str, data: dict) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n".encode()


ANTHROPIC_FIRST = [
    _sse("message_start", {"type": "message_start", "message": {
        "id": "msg_gated", "type": "message", "role": "assistant", "model": "claude-test", "content": [],
        "stop_reason": None, "stop_sequence": None,
        "usage": {"input_tokens": 12, "output_tokens": 1}}}),
    _sse("content_block_start", {"type": "content_block_start", "index": 0,
                                 "content_block": {"type": "text", "text": ""}}),
    _sse("content_block_delta", {"type": "content_block_delta", "index": 0,
                                 "delta": {"type": "text_delta", "text": "first "}}),
]
ANTHROPIC_REST = [
    _sse("content_block_delta", {"type": "content_block_delta", "index": 0,
                                 "delta": {"type": "text_delta", "text": "second"}}),
    _sse("content_block_stop", {"type": "content_block_stop", "index": 0}),
    _sse("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                           "usage": {"output_tokens": 7}}),
    _sse("message_stop", {"type": "message_stop"}),
]
GATED_ORDER = ["upstream sends first", "client got first", "upstream sends rest"]


async def test_anthropic_sdk_gets_each_event_as_the_upstream_sends_it() -> None:
    up = Gated(b"text/event-stream", ANTHROPIC_FIRST, ANTHROPIC_REST)
    async with serve_upstream(up.app) as url, open_proxy(Config(upstream=url, server=_server())) as proxy:
        async with anthropic.AsyncAnthropic(base_url=proxy.url, api_key="sk-test", max_retries=0) as client:
            with trio.fail_after(2 * GUARD):
                async with client.messages.stream(**MSG) as stream:
                    texts = []
                    async for text in stream.text_stream:
                        if not texts:
                            up.client_got_first()
                        texts.append(text)
                    final = await stream.get_final_message()
    assert up.order == GATED_ORDER
    assert texts == ["first ", "second"]
    assert final.usage.input_tokens == 12 and final.usage.output_tokens == 7
    assert json.loads(up.requests[0])["stream"] is True


async def test_ollama_default_stream_gets_each_line_as_the_upstream_sends_it() -> None:
    def line(content: str, done: bool, **extra: object) -> bytes:
        return json.dumps({"model": "llama3", "created_at": "2026-01-01T00:00:00Z",
                           "message": {"role": "assistant", "content": content}, "done": done, **extra}).encode() + b"\n"

    up = Gated(b"application/x-ndjson", [line("first ", False)],
               [line("second", False), line("", True, done_reason="stop", eval_count=2, prompt_eval_count=3)])
    async with serve_upstream(up.app) as url, open_proxy(Config(upstream=url, server=_server())) as proxy:
        async with httpx.AsyncClient(base_url=proxy.url, timeout=2 * GUARD) as client:
            with trio.fail_after(2 * GUARD):
                # No "stream" field: Ollama's default is to stream.
                async with client.stream("POST", "/api/chat", json={"model": "llama3", "messages": CHAT}) as r:
                    got = []
                    it = r.aiter_lines()
                    try:
                        async for text in it:
                            if not got:
                                up.client_got_first()
                            got.append(json.loads(text))
                    finally:
                        await it.aclose()
    assert up.order == GATED_ORDER
    assert [g["message"]["content"] for g in got] == ["first ", "second", ""]
    assert got[-1]["done"] is True and got[-1]["eval_count"] == 2
    assert "stream" not in json.loads(up.requests[0])


# ----------------------------------------------------------------------- curl


@pytest.fixture
def curl() -> str:
    """A sync fixture: pytest-trio loses the reason of a skip raised in an async test."""
    path = shutil.which("curl")
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail("curl is not installed, and CI=true: the curl end-to-end tests must run in CI")
        pytest.skip("curl is not installed")
    return path


def _curl_args(curl: str, url: str, body: dict) -> list[str]:
    return [curl, "-sN", "--fail-with-body", "--max-time", str(2 * GUARD), "-X", "POST", url,
            "-H", "content-type: application/json", "-H", "anthropic-version: 2023-06-01",
            "-H", "x-api-key: sk-test", "--data-binary", json.dumps(body)]


def _sse_events(text: str) -> list[tuple[str, dict]]:
    out = []
    for block in text.strip().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines())
        out.append((fields["event"], json.loads(fields["data"])))
    return out


async def test_curl_reads_sse_through_the_proxy(curl: str) -> None:
    async with mock_behind_proxy(stream_chunks=4) as (provider, proxy):
        with trio.fail_after(2 * GUARD):
            done = await trio.run_process(_curl_args(curl, proxy.url + "/v1/messages?beta=true", MSG | {"stream": True}),
                                          capture_stdout=True, capture_stderr=True)
    events = _sse_events(done.stdout.decode())
    assert [name for name, _ in events] == [
        "message_start", "content_block_start", "ping",
        *["content_block_delta"] * 4,
        "content_block_stop", "message_delta", "message_stop",
    ]
    assert REPLY in "".join(d["delta"]["text"] for name, d in events if name == "content_block_delta")
    assert events[-2][1]["usage"]["output_tokens"] == provider.attempts[0].output_tokens
    assert _oks(provider) == [(200, "ok", True)]


async def test_curl_gets_the_first_event_before_the_upstream_sends_the_rest(curl: str) -> None:
    up = Gated(b"text/event-stream", ANTHROPIC_FIRST, ANTHROPIC_REST)
    async with serve_upstream(up.app) as url, open_proxy(Config(upstream=url, server=_server())) as proxy:
        args = _curl_args(curl, proxy.url + "/v1/messages", MSG | {"stream": True})
        out = b""
        with trio.fail_after(2 * GUARD):
            async with trio.open_nursery() as nursery:
                proc = await nursery.start(partial(trio.run_process, args, stdout=-1, check=False))
                async with proc.stdout:
                    while b"event: message_start" not in out:
                        chunk = await proc.stdout.receive_some(65536)
                        assert chunk, f"curl's output ended early: {out!r}"
                        out += chunk
                    up.client_got_first()
                    while chunk := await proc.stdout.receive_some(65536):
                        out += chunk
    assert proc.returncode == 0
    assert up.order == GATED_ORDER
    assert [name for name, _ in _sse_events(out.decode())][-1] == "message_stop"


# ------------------------------------------------- httpcore pool-slot leak (#1093)


POOL = 2
WAITERS = 4
ROUNDS = 30


class SlowUpstream:
    """``x-test: hang`` requests get an SSE head and one event, then nothing
    until the proxy goes away; ``x-test: pair`` requests are answered only once
    POOL of them are in progress at the same time."""

    def __init__(self) -> None:
        self.app = _lifespan_or_http(self._handle)
        self.hanging = 0
        self.pair_arrivals = 0
        self.pair_ready = trio.Event()

    async def _handle(self, scope, body, receive, send) -> None:
        mode = dict(scope["headers"]).get(b"x-test")
        if mode == b"hang":
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"text/event-stream")]})
            await send({"type": "http.response.body", "body": b"event: ping\ndata: {}\n\n", "more_body": True})
            self.hanging += 1
            try:
                while (await receive())["type"] != "http.disconnect":
                    pass
            finally:
                self.hanging -= 1
            return
        self.pair_arrivals += 1
        if self.pair_arrivals % POOL == 0:
            self.pair_ready.set()
        with trio.move_on_after(GUARD):
            await self.pair_ready.wait()
        status = 200 if self.pair_ready.is_set() else 504
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", b"11")]})
        await send({"type": "http.response.body", "body": b'{"ok":true}'})


def _raw_request(mode: str) -> bytes:
    return (f"POST /v1/messages HTTP/1.1\r\nHost: proxy\r\nx-test: {mode}\r\n"
            f"content-type: application/json\r\ncontent-length: 2\r\n\r\n{{}}").encode()


async def _wait_for(condition: Callable[[], bool], what: str, state: Callable[[], object] = lambda: "") -> None:
    with trio.move_on_after(GUARD):
        while not condition():
            await trio.sleep(0.005)
    assert condition(), f"{what}: {state()}"


async def test_cancelled_waiters_do_not_leak_upstream_pool_slots() -> None:
    """Requests waiting for an upstream connection are cancelled (their clients
    disconnect) while the requests holding the connections are cancelled too:
    the moment httpcore's pool hands a *new* connection to a waiter whose
    cancellation is already on its way, that connection is never opened nor
    reaped and its slot is lost for good (httpcore issue 1093).  The proxy's
    CapacityLimiter keeps every waiter outside httpcore, so there is nothing
    to lose; without it this test ends in PoolTimeout-like hangs."""
    up = SlowUpstream()
    rng = random.Random(1093)
    async with serve_upstream(up.app) as url, open_proxy(
        Config(upstream=url, server=_server(max_connections=POOL))
    ) as proxy:
        rt = proxy.app.runtime
        assert rt is not None
        for round_no in range(ROUNDS):
            streams: list[trio.SocketStream] = []
            try:
                # POOL requests take every upstream connection and keep it...
                for _ in range(POOL):
                    s = await trio.open_tcp_stream("127.0.0.1", proxy.port)
                    streams.append(s)
                    await s.send_all(_raw_request("hang"))
                    got = b""
                    with trio.fail_after(GUARD):
                        while b"event: ping" not in got:
                            chunk = await s.receive_some(65536)
                            assert chunk, f"round {round_no}: proxy closed a holder: {got!r}"
                            got += chunk
                # ... and WAITERS more queue behind them inside the proxy.
                for _ in range(WAITERS):
                    s = await trio.open_tcp_stream("127.0.0.1", proxy.port)
                    streams.append(s)
                    await s.send_all(_raw_request("hang"))
                await _wait_for(lambda: rt.counters.in_flight == POOL + WAITERS, "all requests reached the proxy")
                await trio.testing.wait_all_tasks_blocked()
                assert up.hanging == POOL, f"round {round_no}"
                # Every client goes away, holders and waiters interleaved, a few
                # scheduler ticks apart, so the pool's hand-over of a freed slot
                # races with the waiters' cancellations.
                rng.shuffle(streams)
                for s in streams:
                    await s.aclose()
                    for _ in range(rng.randrange(4)):
                        await trio.lowlevel.checkpoint()
            finally:
                for s in streams:
                    await s.aclose()
            await _wait_for(lambda: rt.counters.in_flight == 0, f"round {round_no}: every request ended",
                            lambda: (rt.status(), rt.forwarder.transport._pool))
            await _wait_for(lambda: up.hanging == 0, f"round {round_no}: the upstream saw every disconnect",
                            lambda: (up.hanging, rt.status(), rt.forwarder.transport._pool, rt.forwarder.transport._pool.connections))

        stats = rt.forwarder.statistics()
        assert (stats.borrowed_tokens, stats.tasks_waiting) == (0, 0)
        # Fresh requests still get upstream connections: POOL of them at once,
        # which the upstream answers only when all POOL are in progress, so
        # even a single leaked slot shows.
        for _ in range(3):
            statuses: list[int] = []
            async with httpx.AsyncClient(base_url=proxy.url, timeout=2 * GUARD) as client:

                async def pair() -> None:
                    r = await client.post("/v1/messages", content=b"{}", headers={"x-test": "pair"})
                    statuses.append(r.status_code)

                with trio.fail_after(2 * GUARD):
                    async with trio.open_nursery() as nursery:
                        for _ in range(POOL):
                            nursery.start_soon(pair)
            assert statuses == [200] * POOL, f"upstream pool lost slots: {rt.forwarder.transport!r}"
            up.pair_ready = trio.Event()
        await _wait_for(lambda: rt.counters.in_flight == 0, "fresh requests ended")
        assert rt.forwarder.statistics().borrowed_tokens == 0
