"""SPEC §3 end to end: a real Hypercorn proxy in front of a real Hypercorn
upstream whose behaviour each test scripts, reached by real HTTP clients."""

from __future__ import annotations

import gzip
import json

import brotli
import httpx
import pytest
import trio
import trio_websocket
import zstandard

from hivemind_trio import Config, ServerConfig, open_proxy
from tests.helpers import answer_lifespan, read_http_response, serve_asgi


class Recorder:
    """An upstream that records what it receives and answers as told."""

    def __init__(self, handler=None):
        self.requests: list[dict] = []
        self.handler = handler

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan":
            await answer_lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        body = b""
        while True:
            m = await receive()
            body += m.get("body", b"")
            if not m.get("more_body"):
                break
        rec = {
            "method": scope["method"],
            "raw_path": scope["raw_path"],
            "query": scope["query_string"],
            "headers": list(scope["headers"]),
            "body": body,
        }
        self.requests.append(rec)
        if self.handler is not None:
            await self.handler(rec, receive, send)
            return
        payload = json.dumps({"ok": True, "n": len(self.requests)}).encode()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": payload})


def header_values(headers, name: bytes):
    return [v for k, v in headers if k.lower() == name]


async def _proxy(url, **server):
    return open_proxy(Config(upstream=url, server=ServerConfig(**server)))


# -- requests reach the upstream unchanged ------------------------------------


@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD"])
async def test_every_method_path_query_body_and_headers_forwarded(method):
    up = Recorder()
    body = b'{"metadata": {"user_id": "x"},  "broken json' + bytes(range(256)) if method not in ("GET", "HEAD") else b""
    async with serve_asgi(up) as url, await _proxy(url) as proxy:
        async with httpx.AsyncClient(base_url=proxy.url) as client:
            r = await client.request(
                method,
                "/v1/messages?beta=true&q=a%20b",
                content=body,
                headers={
                    "anthropic-beta": "tools-2024,prompt-caching",
                    "X-Unknown-Thing": "Kept As Is",
                    "Connection": "X-Hop-Only",
                    "X-Hop-Only": "must not pass",
                    "x-hivemind-agent": "agent-7",
                    "x-hivemind-priority": "high",
                    "Host": "evil.example",
                },
            )
    assert r.status_code == 200
    assert r.headers["x-hivemind-agent"] == "agent-7"
    got = up.requests[-1]
    assert got["method"] == method
    assert got["raw_path"] == b"/v1/messages"
    assert got["query"] == b"beta=true&q=a%20b"
    assert got["body"] == body
    hdrs = got["headers"]
    assert header_values(hdrs, b"anthropic-beta") == [b"tools-2024,prompt-caching"]
    assert header_values(hdrs, b"x-unknown-thing") == [b"Kept As Is"]
    assert header_values(hdrs, b"x-hop-only") == []
    assert not [k for k, _ in hdrs if k.lower().startswith(b"x-hivemind-")]
    # Host is the upstream's, never the client's: it does not choose the upstream either.
    assert header_values(hdrs, b"host") == [httpx.URL(url).netloc]


async def test_accept_encoding_and_user_agent_exactly_as_client_sent():
    up = Recorder()
    async with serve_asgi(up) as url, await _proxy(url) as proxy:
        # A raw request with no User-Agent and no Accept-Encoding: the proxy adds neither.
        stream = await trio.open_tcp_stream("127.0.0.1", proxy.port)
        async with stream:
            await stream.send_all(b"GET /v1/models HTTP/1.1\r\nHost: x\r\nx-api-key: k\r\nConnection: close\r\n\r\n")
            await read_http_response(stream)
        async with httpx.AsyncClient(base_url=proxy.url) as client:
            await client.get("/v1/models", headers={"Accept-Encoding": "zstd,gzip"})
    first, second = up.requests
    assert header_values(first["headers"], b"user-agent") == []
    assert header_values(first["headers"], b"accept-encoding") == []
    assert header_values(second["headers"], b"accept-encoding") == [b"zstd,gzip"]


async def test_no_cookie_jar_between_requests():
    async def set_cookie(rec, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": [(b"set-cookie", b"session=secret; Path=/")]})
        await send({"type": "http.response.body", "body": b"{}"})

    up = Recorder(set_cookie)
    async with serve_asgi(up) as url, await _proxy(url) as proxy:
        for _ in range(2):
            stream = await trio.open_tcp_stream("127.0.0.1", proxy.port)
            async with stream:
                await stream.send_all(b"GET /v1/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                raw = await read_http_response(stream)
            assert b"set-cookie: session=secret" in raw.lower()
    assert all(header_values(r["headers"], b"cookie") == [] for r in up.requests)


# -- responses reach the client unchanged -------------------------------------


async def test_response_status_headers_and_body_unchanged():
    async def limited(rec, receive, send):
        await send(
            {
                "type": "http.response.start",
                "status": 429,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"retry-after", b"7"),
                    (b"retry-after-ms", b"7000"),
                    (b"anthropic-ratelimit-requests-remaining", b"0"),
                    (b"x-ratelimit-reset-requests", b"6m0s"),
                    (b"request-id", b"req_1"),
                    (b"x-should-retry", b"true"),
                    (b"x-brand-new-header", b"v"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": b'{"type":"error","error":{"type":"rate_limit_error","message":"slow down"}}'})

    up = Recorder(limited)
    async with serve_asgi(up) as url, await _proxy(url) as proxy:
        async with httpx.AsyncClient(base_url=proxy.url) as client:
            # A streaming request gets the upstream's 429, never a 200 event
            # stream.  Its deadline (5 s, as an SDK says it) is shorter than
            # the retry-after, so the proxy passes the 429 on at once instead
            # of retrying (SPEC §5.7).
            r = await client.post(
                "/v1/messages",
                content=b'{"stream": true}',
                headers={"anthropic-version": "2023-06-01", "x-stainless-timeout": "5"},
            )
    assert r.status_code == 429
    assert r.json()["error"]["message"] == "slow down"
    for name, value in [
        ("retry-after", "7"),
        ("retry-after-ms", "7000"),
        ("anthropic-ratelimit-requests-remaining", "0"),
        ("x-ratelimit-reset-requests", "6m0s"),
        ("request-id", "req_1"),
        ("x-should-retry", "true"),
        ("x-brand-new-header", "v"),
    ]:
        assert r.headers[name] == value


@pytest.mark.parametrize("encoding", ["gzip", "br", "zstd"])
async def test_encoded_bodies_relayed_raw(encoding):
    plain = json.dumps({"content": [{"type": "text", "text": "hello " * 200}]}).encode()
    encoded = {
        "gzip": gzip.compress,
        "br": brotli.compress,
        "zstd": zstandard.ZstdCompressor().compress,
    }[encoding](plain)

    async def compressed(rec, receive, send):
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-encoding", encoding.encode()),
                    (b"content-length", str(len(encoded)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": encoded})

    up = Recorder(compressed)
    async with serve_asgi(up) as url, await _proxy(url) as proxy:
        async with httpx.AsyncClient(base_url=proxy.url) as client:
            async with client.stream("POST", "/v1/messages", content=b"{}", headers={"Accept-Encoding": "gzip, deflate, br, zstd"}) as r:
                raw = b"".join([c async for c in r.aiter_raw()])
                assert r.headers["content-encoding"] == encoding
                assert r.headers["content-length"] == str(len(encoded))
    assert raw == encoded
    assert header_values(up.requests[0]["headers"], b"accept-encoding") == [b"gzip, deflate, br, zstd"]


async def _raw_head(port: int, request: bytes) -> tuple[bytes, bytes]:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(request)
        raw = await read_http_response(stream)
    head, _, body = raw.partition(b"\r\n\r\n")
    return head.lower(), body


async def test_never_content_length_with_chunked():
    async def chunked(rec, receive, send):
        if rec["raw_path"] == b"/stream":
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
            await send({"type": "http.response.body", "body": b"data: 1\n\n", "more_body": True})
            await send({"type": "http.response.body", "body": b"data: 2\n\n"})
        else:
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
            await send({"type": "http.response.body", "body": b"{}"})

    up = Recorder(chunked)
    async with serve_asgi(up) as url, await _proxy(url) as proxy:
        head, body = await _raw_head(proxy.port, b"GET /stream HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert b"transfer-encoding: chunked" in head and b"content-length" not in head
        # SSE gets the anti-buffering headers.
        assert b"cache-control: no-cache" in head and b"x-accel-buffering: no" in head
        head, body = await _raw_head(proxy.port, b"GET /plain HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert b"content-length: 2" in head and b"transfer-encoding" not in head
        assert body == b"{}"


# -- streaming ----------------------------------------------------------------


def _gated_stream(content_type: bytes, first: bytes, last: bytes, gate: trio.Event, saw_end: list):
    async def handler(rec, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", content_type)]})
        await send({"type": "http.response.body", "body": first, "more_body": True})
        # The last event is only sent once the test has seen the first one
        # through the proxy: a buffering proxy deadlocks here and the test fails.
        await gate.wait()
        await send({"type": "http.response.body", "body": last})
        saw_end.append(True)

    return handler


@pytest.mark.parametrize(
    ("path", "body", "ctype", "first", "last"),
    [
        ("/v1/messages", b'{"stream": true}', b"text/event-stream", b"event: message_start\ndata: {}\n\n", b"event: message_stop\ndata: {}\n\n"),
        # Ollama streams by default: no "stream" field in the request at all.
        ("/api/chat", b'{"model": "llama3", "messages": []}', b"application/x-ndjson", b'{"done":false}\n', b'{"done":true}\n'),
    ],
)
async def test_first_event_arrives_before_upstream_sends_last(path, body, ctype, first, last):
    gate = trio.Event()
    saw_end: list = []
    up = Recorder(_gated_stream(ctype, first, last, gate, saw_end))
    async with serve_asgi(up) as url, await _proxy(url) as proxy:
        async with httpx.AsyncClient(base_url=proxy.url) as client:
            with trio.fail_after(10):
                async with client.stream("POST", path, content=body) as r:
                    it = r.aiter_raw()
                    got = await it.__anext__()
                    assert got == first
                    assert not saw_end  # the upstream has not sent the last event yet
                    gate.set()
                    rest = b"".join([c async for c in it])
    assert rest == last


async def test_client_disconnect_cancels_upstream():
    cancelled = trio.Event()

    async def endless(rec, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
        try:
            while True:
                await send({"type": "http.response.body", "body": b"data: tick\n\n", "more_body": True})
                await trio.sleep(0.02)
        finally:
            cancelled.set()

    async def watch(rec, receive, send):
        async with trio.open_nursery() as n:
            n.start_soon(endless, rec, receive, send)
            while (await receive())["type"] != "http.disconnect":
                pass
            n.cancel_scope.cancel()

    up = Recorder(watch)
    async with serve_asgi(up) as url, await _proxy(url) as proxy:
        async with httpx.AsyncClient(base_url=proxy.url) as client:
            async with client.stream("POST", "/v1/messages", content=b"{}") as r:
                it = r.aiter_raw()
                await it.__anext__()
                await it.aclose()
        t0 = trio.current_time()
        with trio.fail_after(10):
            await cancelled.wait()
        print(f"upstream cancelled {1000 * (trio.current_time() - t0):.1f} ms after the client left")
        with trio.fail_after(10):
            while proxy.app.runtime.counters.in_flight:
                await trio.sleep(0.01)
        assert proxy.app.runtime.forwarder.statistics().borrowed_tokens == 0


async def test_stalled_client_releases_upstream_slot():
    released = trio.Event()
    chunk = b"data: " + b"x" * 65000 + b"\n\n"

    async def firehose(rec, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
        async with trio.open_nursery() as n:

            async def on_disconnect():
                while (await receive())["type"] != "http.disconnect":
                    pass
                released.set()
                n.cancel_scope.cancel()

            n.start_soon(on_disconnect)
            while True:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
                # Hypercorn's send() returns without a checkpoint once the
                # peer is gone; let on_disconnect run.
                await trio.sleep(0)

    up = Recorder(firehose)
    async with serve_asgi(up) as url, await _proxy(url, stall_timeout=0.5) as proxy:
        stream = await trio.open_tcp_stream("127.0.0.1", proxy.port)
        async with stream:
            await stream.send_all(b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
            # ... and never read a byte.
            with trio.fail_after(30):
                await released.wait()
                while proxy.app.runtime.forwarder.statistics().borrowed_tokens:
                    await trio.sleep(0.01)
        assert proxy.app.runtime.counters.stalls == 1


async def test_long_generation_not_cut_by_timeouts():
    """The proxy's upstream read timeout is longer than the agents' own 600 s
    and Hypercorn's read_timeout is off (checked on the objects, since a
    ten-minute wait cannot run in a test; the MockClock test below exercises it)."""
    from hivemind_trio.runtime.forward import Forwarder
    from hivemind_trio.runtime.serve import hypercorn_config

    cfg = Config(upstream="http://127.0.0.1:1")
    assert hypercorn_config(cfg).read_timeout is None
    t = Forwarder(cfg)._timeout
    assert t["read"] is None or t["read"] > 600


async def test_ten_minute_generation_with_mock_clock(mock_clock):
    """A real proxy and upstream under a MockClock: the upstream takes 10
    (virtual) minutes before it answers; nothing in between times out."""
    mock_clock.autojump_threshold = 0.05  # jump only when the real sockets are idle too

    async def slow(rec, receive, send):
        await trio.sleep(600)
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": b'{"done":true}'})

    up = Recorder(slow)
    async with serve_asgi(up) as url, await _proxy(url) as proxy:
        async with httpx.AsyncClient(base_url=proxy.url, timeout=None) as client:
            t0 = trio.current_time()
            r = await client.post("/v1/messages", content=b"{}")
            assert trio.current_time() - t0 >= 600
    assert r.status_code == 200 and r.json() == {"done": True}


# -- bad input ----------------------------------------------------------------


async def test_absolute_form_and_connect_refused():
    up = Recorder()
    async with serve_asgi(up) as url, await _proxy(url) as proxy:
        head, _ = await _raw_head(proxy.port, b"GET http://evil.example/steal HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n")
        assert head.startswith(b"http/1.1 400")
        head, _ = await _raw_head(proxy.port, b"CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example:443\r\n\r\n")
        assert head.startswith(b"http/1.1 4")
    assert up.requests == []


@pytest.mark.parametrize("chunked", [False, True])
async def test_body_over_limit_gets_413_in_provider_format(chunked):
    up = Recorder()
    async with serve_asgi(up) as url, await _proxy(url, max_body_bytes=1000) as proxy:
        async with httpx.AsyncClient(base_url=proxy.url) as client:
            big = b"x" * 5000

            async def gen():
                yield big

            r = await client.post(
                "/v1/messages",
                content=gen() if chunked else big,
                headers={"anthropic-version": "2023-06-01"},
            )
            assert r.status_code == 413
            assert r.json()["type"] == "error" and r.json()["error"]["type"] == "request_too_large"
            # Nothing else breaks: the next request goes through.
            ok = await client.post("/v1/messages", content=b"{}")
            assert ok.status_code == 200
    assert len(up.requests) == 1


async def test_unreachable_upstream_gives_provider_502_naming_it():
    # A port with nothing listening.
    sock = trio.socket.socket()
    await sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    cfg = Config(upstream=f"http://127.0.0.1:{port}")
    async with open_proxy(cfg) as proxy:
        async with httpx.AsyncClient(base_url=proxy.url, timeout=20) as client:
            # The proxy retries a connect error for as long as the client's own
            # deadline (as the SDKs send it) allows, then answers.
            r = await client.post("/v1/messages", content=b"{}",
                                  headers={"anthropic-version": "2023-06-01", "x-stainless-timeout": "3"})
    assert r.status_code == 502
    assert r.headers["x-should-retry"] == "false"
    body = r.json()
    # The generic profile answers in a plain error format; the message names the upstream.
    text = json.dumps(body)
    assert f"127.0.0.1:{port}" in text and "unreachable" in text


# -- WebSocket ----------------------------------------------------------------


async def test_websocket_frames_relayed_both_ways():
    seen_headers: list = []

    async def ws_app(scope, receive, send):
        if scope["type"] == "lifespan":
            await Recorder()(scope, receive, send)
            return
        if scope["type"] != "websocket":
            return
        seen_headers.extend(scope["headers"])
        assert (await receive())["type"] == "websocket.connect"
        await send({"type": "websocket.accept"})
        while True:
            m = await receive()
            if m["type"] == "websocket.disconnect":
                return
            if m.get("text") is not None:
                event = json.loads(m["text"])
                for i in range(3):
                    await send({"type": "websocket.send", "text": json.dumps({"type": "response.output_text.delta", "i": i, "of": event["type"]})})
            else:
                await send({"type": "websocket.send", "bytes": m["bytes"][::-1]})

    async with serve_asgi(ws_app) as url, await _proxy(url) as proxy:
        port = proxy.port
        async with trio_websocket.open_websocket(
            "127.0.0.1", port, "/v1/responses", use_ssl=False, extra_headers=[(b"authorization", b"Bearer sk-test"), (b"x-hivemind-agent", b"codex-1")]
        ) as ws:
            await ws.send_message(json.dumps({"type": "response.create", "model": "gpt-5"}))
            frames = [json.loads(await ws.get_message()) for _ in range(3)]
            assert [f["i"] for f in frames] == [0, 1, 2]
            assert frames[0]["of"] == "response.create"
            await ws.send_message(b"\x01\x02\x03")
            assert await ws.get_message() == b"\x03\x02\x01"
    assert (b"authorization", b"Bearer sk-test") in seen_headers
    assert not [k for k, _ in seen_headers if k.lower().startswith(b"x-hivemind")]


async def test_websocket_refusal_relayed_so_codex_falls_back():
    async def refuse(scope, receive, send):
        if scope["type"] == "lifespan":
            await Recorder()(scope, receive, send)
            return
        await receive()
        body = b'{"error":{"message":"websocket not supported","type":"invalid_request_error"}}'
        await send({"type": "websocket.http.response.start", "status": 426, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "websocket.http.response.body", "body": body})

    async with serve_asgi(refuse) as url, await _proxy(url) as proxy:
        # Our own stream: trio-websocket does not close its socket on a refusal.
        stream = await trio.open_tcp_stream("127.0.0.1", proxy.port)
        async with stream:
            with pytest.RaisesGroup(trio_websocket.ConnectionRejected, flatten_subgroups=True) as info:
                async with trio.open_nursery() as nursery:
                    await trio_websocket.wrap_client_stream(nursery, stream, f"127.0.0.1:{proxy.port}", "/v1/responses")
    [rejected] = info.value.exceptions
    assert rejected.status_code == 426
    assert b"websocket not supported" in rejected.body


# -- admin ----------------------------------------------------------------------


async def test_health_and_status():
    up = Recorder()
    async with serve_asgi(up) as url, await _proxy(url) as proxy:
        async with httpx.AsyncClient(base_url=proxy.url) as client:
            assert (await client.get("/hivemind/health")).json() == {"status": "ok"}
            await client.post("/v1/messages", content=b"{}", headers={"x-api-key": "sk-never-shown"})
            status = (await client.get("/hivemind/status")).json()
    assert status["requests"] == 1 and status["in_flight"] == 0
    assert status["by_status"] == {"200": 1}
    assert status["upstreams"][0]["url"].startswith(url)
    assert "sk-never-shown" not in json.dumps(status)
    assert up.requests[0]["raw_path"] == b"/v1/messages"  # admin paths never reach the upstream
    assert len(up.requests) == 1
