"""The mock provider's I/O: Trio sockets, h11 for HTTP/1.1, wsproto for WebSocket.

One task per connection, keep-alive by h11's cycle (``start_next_cycle``).
Owning the socket is the point: a reset is ``SO_LINGER (1, 0)`` then
``close()``, so the kernel sends RST and the peer sees ECONNRESET, exactly
what a real network failure looks like to an SDK.

Generations go through :func:`_generate`, shared by plain HTTP (JSON or a
stream of SSE/NDJSON frames) and the Responses WebSocket (one JSON text frame
per event); the *sink* hides which.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import math
import secrets
import socket
import struct
import sys
import zlib
from functools import partial
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlsplit

import attrs
import brotli
import h11
import trio
import zstandard
from wsproto.connection import Connection as WsConnection
from wsproto.connection import ConnectionType
from wsproto.utilities import generate_accept_token
from wsproto.events import BytesMessage, CloseConnection, Message, Ping, TextMessage

from . import mock_wire as wire
from .mock import (
    API_ERROR,
    BAD_REQUEST,
    CLIENT_GONE,
    DROP,
    ERROR_EVENT,
    OK,
    OVERLOADED,
    QUOTA,
    RATE_LIMITED,
    RESET,
    STALL,
    TOO_LARGE,
    Admission,
    Attempt,
)

if TYPE_CHECKING:
    from .mock import MockProvider

log = logging.getLogger(__name__)

_MAX_BODY = 64 * 1024 * 1024


class _Reset(Exception):
    """The connection was reset on purpose; nothing more may touch it."""


@attrs.frozen
class _Request:
    method: str
    target: str
    path: str
    query: str
    raw_headers: tuple[tuple[bytes, bytes], ...]  # names in the client's case
    body: bytes

    def header(self, name: str) -> str:
        want = name.lower().encode()
        for k, v in self.raw_headers:
            if k.lower() == want:
                return v.decode("latin-1")
        return ""


# ------------------------------------------------------------------ encodings


def pick_encoding(wanted: str, accept_encoding: str) -> str | None:
    """The Content-Encoding to use: ``wanted`` ('auto' or a name) if the client accepts it."""
    if not wanted or wanted == "identity":
        return None
    accepted = {part.split(";")[0].strip().lower() for part in accept_encoding.split(",")}
    if wanted == "auto":
        return next((e for e in ("zstd", "br", "gzip") if e in accepted), None)
    return wanted if wanted in accepted else None


def compress_all(encoding: str, data: bytes) -> bytes:
    if encoding == "zstd":  # one-shot: the frame header then carries the content size
        return zstandard.ZstdCompressor().compress(data)
    enc = _Encoder(encoding)
    return enc.chunk(data, flush=False) + enc.finish()


class _Encoder:
    """Incremental compressor; every chunk is flushed so a stream stays a stream."""

    def __init__(self, encoding: str) -> None:
        self.encoding = encoding
        if encoding == "gzip":
            self._z = zlib.compressobj(6, zlib.DEFLATED, 31)
        elif encoding == "br":
            self._br = brotli.Compressor()
        elif encoding == "zstd":
            self._zs = zstandard.ZstdCompressor().compressobj()
        else:
            raise ValueError(f"unknown encoding {encoding!r}")

    def chunk(self, data: bytes, *, flush: bool = True) -> bytes:
        if self.encoding == "gzip":
            out = self._z.compress(data)
            return out + self._z.flush(zlib.Z_SYNC_FLUSH) if flush else out
        if self.encoding == "br":
            out = self._br.process(data)
            return out + self._br.flush() if flush else out
        out = self._zs.compress(data)
        return out + self._zs.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK) if flush else out

    def finish(self) -> bytes:
        if self.encoding == "gzip":
            return self._z.flush(zlib.Z_FINISH)
        if self.encoding == "br":
            return self._br.finish()
        return self._zs.flush(zstandard.COMPRESSOBJ_FLUSH_FINISH)


# ---------------------------------------------------------------------- server


async def serve(
    provider: MockProvider,
    host: str,
    port: int,
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    listeners = await trio.open_tcp_listeners(port, host=host)
    actual = listeners[0].socket.getsockname()[1]
    provider.now()  # anchor the clock-to-wall mapping at start
    async with trio.open_nursery() as nursery:
        await nursery.start(partial(trio.serve_listeners, partial(_handle, provider), listeners))
        task_status.started(actual)


async def _handle(provider: MockProvider, stream: trio.SocketStream) -> None:
    provider.connections += 1
    try:
        await _Connection(provider, stream).run()
    except Exception:  # one broken connection must not take the server down
        log.exception("mock provider: connection handler crashed")


class _Connection:
    def __init__(self, provider: MockProvider, stream: trio.SocketStream) -> None:
        self.provider = provider
        self.stream = stream
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=1 << 20)
        self.gone = False  # socket closed (reset) or handed to the WebSocket code

    # ---- low level

    async def _next_event(self) -> Any:
        while True:
            event = self.h11.next_event()
            if event is not h11.NEED_DATA:
                return event
            data = await self.stream.receive_some(65536)
            self.h11.receive_data(data)

    async def _send(self, event: Any) -> None:
        data = self.h11.send(event)
        if data:
            await self.stream.send_all(data)

    def reset(self) -> None:
        """Abort with RST: SO_LINGER on, timeout 0, close."""
        sock = self.stream.socket
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        finally:
            sock.close()
            self.gone = True
        raise _Reset

    # ---- the request loop

    async def run(self) -> None:
        try:
            while True:
                request = await self._read_request()
                if request is None:
                    return
                await self._dispatch(request)
                if self.gone:
                    return
                if self.h11.our_state is h11.MUST_CLOSE or self.h11.their_state is not h11.DONE:
                    return
                self.h11.start_next_cycle()
        except _Reset:
            return
        except h11.RemoteProtocolError as exc:
            await self._bad_request(exc)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            return
        finally:
            if not self.gone:
                with trio.CancelScope(shield=True):
                    try:
                        await self.stream.aclose()
                    except (trio.BrokenResourceError, OSError):
                        pass

    async def _read_request(self) -> _Request | None:
        event = await self._next_event()
        if isinstance(event, h11.ConnectionClosed):
            return None
        if not isinstance(event, h11.Request):
            return None
        body = bytearray()
        while True:
            part = await self._next_event()
            if isinstance(part, h11.Data):
                body += part.data
                if len(body) > _MAX_BODY:
                    raise h11.RemoteProtocolError("request body too large", error_status_hint=413)
            elif isinstance(part, h11.EndOfMessage):
                break
            else:
                return None
        target = event.target.decode("latin-1")
        split = urlsplit(target)
        return _Request(
            method=event.method.decode("latin-1").upper(),
            target=target,
            path=split.path or "/",
            query=split.query,
            raw_headers=tuple((k, v) for k, v in event.headers.raw_items()),
            body=bytes(body),
        )

    async def _bad_request(self, exc: h11.RemoteProtocolError) -> None:
        if self.h11.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        body = json.dumps({"error": str(exc)}).encode()
        try:
            await self._send(
                h11.Response(
                    status_code=exc.error_status_hint,
                    headers=[("content-type", "application/json"), ("content-length", str(len(body))),
                             ("connection", "close")],
                )
            )
            await self._send(h11.Data(data=body))
            await self._send(h11.EndOfMessage())
        except (h11.LocalProtocolError, trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass

    # ---- responses

    async def respond(
        self,
        req: _Request,
        status: int,
        headers: list[tuple[str, str]],
        body: bytes,
        *,
        encoding: str | None = None,
    ) -> None:
        headers = list(headers)
        if encoding and body:
            body = compress_all(encoding, body)
            headers.append(("content-encoding", encoding))
        headers.append(("content-length", str(len(body))))
        await self._send(h11.Response(status_code=status, headers=headers))
        if req.method != "HEAD" and body:
            await self._send(h11.Data(data=body))
        await self._send(h11.EndOfMessage())

    async def respond_json(self, req: _Request, status: int, data: Any,
                           headers: list[tuple[str, str]] | None = None) -> None:
        body = json.dumps(data, separators=(",", ":")).encode()
        await self.respond(req, status, [("content-type", "application/json"), *(headers or [])], body)

    # ---- routing

    async def _dispatch(self, req: _Request) -> None:
        method, path = req.method, req.path.rstrip("/") or "/"
        if self.provider.verbose:
            shown = " ".join(f"{k.decode()}={v.decode('latin-1')[:60]}" for k, v in req.raw_headers
                             if k.lower() not in (b"authorization", b"x-api-key"))
            print(f"mock: {method} {req.target} [{len(req.body)} B] {shown}", file=sys.stderr, flush=True)
        if path.startswith("/mock/"):
            await self._control(req, path)
            return
        if path in ("/", "/api/hello"):  # Claude Code probes HEAD /api/hello at start
            await self.respond(req, 200, [("content-type", "text/plain")], b"mock provider ok\n")
            return
        api_path = path[3:] if path.startswith("/v1/") else path
        if method == "POST":
            api = {
                "/messages": wire.ANTHROPIC,
                "/chat/completions": wire.OPENAI_CHAT,
                "/responses": wire.OPENAI_RESPONSES,
                "/api/chat": wire.OLLAMA_CHAT,
                "/api/generate": wire.OLLAMA_GENERATE,
            }.get(api_path)
            if api is not None:
                await self._generation(req, api)
                return
            if api_path == "/messages/count_tokens":
                await self.respond_json(req, 200, {"input_tokens": max(1, len(req.body) // 4)},
                                        [("request-id", _rid())])
                return
        if method in ("GET", "HEAD"):
            if api_path == "/responses" and "websocket" in req.header("upgrade").lower():
                await _serve_websocket(self, req)
                return
            if api_path == "/models" or api_path.startswith("/models/"):
                await self._models(req, api_path)
                return
            if path == "/api/tags":
                await self.respond_json(req, 200, {"models": [_ollama_model(self.provider.config.model)]})
                return
            if path == "/api/ps":
                await self.respond_json(req, 200, {"models": []})
                return
            if path == "/api/version":
                await self.respond_json(req, 200, {"version": "0.12.6"})
                return
        fmt = "anthropic" if req.header("anthropic-version") else ("ollama" if path.startswith("/api/") else "openai")
        rid = _rid()
        body = wire.error_body(fmt, 404, f"Not found: {method} {req.target}", request_id=rid)
        await self.respond_json(req, 404, body, [("request-id", rid)])

    async def _control(self, req: _Request, path: str) -> None:
        provider = self.provider
        if path == "/mock/echo" or path.startswith("/mock/echo/"):
            data = {
                "method": req.method,
                "path": req.path,
                "query": req.query,
                "headers": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in req.raw_headers],
                "body_b64": base64.b64encode(req.body).decode(),
            }
            await self.respond_json(req, 200, data)
        elif path == "/mock/log" and req.method == "GET":
            await self.respond_json(req, 200, [attrs.asdict(a) for a in provider.attempts])
        elif path == "/mock/stats" and req.method == "GET":
            await self.respond_json(req, 200, provider.statistics().to_json())
        elif path == "/mock/reset" and req.method == "POST":
            provider.reset()
            await self.respond_json(req, 200, {"ok": True})
        elif path == "/mock/config" and req.method == "GET":
            await self.respond_json(req, 200, attrs.asdict(provider.config))
        else:
            await self.respond_json(req, 404, {"error": f"no mock control endpoint {req.method} {path}"})

    async def _models(self, req: _Request, api_path: str) -> None:
        cfg = self.provider.config
        ids = list(dict.fromkeys([cfg.model, "claude-sonnet-4-5", "claude-haiku-4-5", "gpt-5", "gpt-4o-mini"]))
        wanted = api_path[len("/models/"):] if api_path.startswith("/models/") else None
        if req.header("anthropic-version"):
            models = [
                {"type": "model", "id": i, "display_name": f"{i} (mock)", "created_at": "2025-01-01T00:00:00Z"}
                for i in ids
            ]
            if wanted is not None:
                match = next((m for m in models if m["id"] == wanted), models[0] | {"id": wanted})
                await self.respond_json(req, 200, match, [("request-id", _rid())])
                return
            data = {"data": models, "has_more": False, "first_id": ids[0], "last_id": ids[-1]}
            await self.respond_json(req, 200, data, [("request-id", _rid())])
            return
        models = [{"id": i, "object": "model", "created": 1735689600, "owned_by": "mock"} for i in ids]
        if wanted is not None:
            match = next((m for m in models if m["id"] == wanted), models[0] | {"id": wanted})
            await self.respond_json(req, 200, match, [("x-request-id", _rid())])
            return
        await self.respond_json(req, 200, {"object": "list", "data": models}, [("x-request-id", _rid())])

    async def _generation(self, req: _Request, api: str) -> None:
        provider = self.provider
        encoding = pick_encoding(req.header("x-mock-encoding") or provider.config.compress,
                                 req.header("accept-encoding"))
        extra: list[tuple[str, str]] = []
        if req.header("x-mock-echo") == "1":
            pairs = [[k.decode("latin-1"), v.decode("latin-1")] for k, v in req.raw_headers]
            extra.append(("x-mock-request-headers", json.dumps(pairs)))
        sink = _HttpSink(self, req, encoding, extra)
        try:
            body = json.loads(req.body)
            if not isinstance(body, dict):
                raise ValueError("the body must be a JSON object")
        except ValueError as exc:
            fmt = wire.error_format(api)
            rid = _rid()
            provider.record(_attempt(provider, req.method, req.path, provider.now(), 400, BAD_REQUEST,
                                     _agent(req), 0, 0, False, api, "", rid))
            await self.respond_json(req, 400, wire.error_body(fmt, 400, f"invalid JSON body: {exc}", request_id=rid),
                                    [("request-id", rid)])
            return
        stream = bool(body.get("stream", api.startswith("ollama")))
        await _generate(
            provider, sink, api=api, body=body, raw_len=len(req.body), stream=stream,
            agent=_agent(req), forced=req.header("x-mock-fault") or None, method=req.method, path=req.path,
            transport="http",
        )


def _rid() -> str:
    return "req_" + secrets.token_hex(12)


def _agent(req: _Request) -> str:
    return req.header("x-hivemind-agent") or req.header("x-agent-id")


def _ollama_model(name: str) -> dict[str, Any]:
    return {
        "name": f"{name}:latest",
        "model": f"{name}:latest",
        "modified_at": "2025-01-01T00:00:00Z",
        "size": 1_000_000,
        "digest": hashlib.sha256(name.encode()).hexdigest(),
        "details": {"format": "gguf", "family": "mock", "parameter_size": "1B", "quantization_level": "Q4_0"},
    }


def _attempt(provider: MockProvider, method: str, path: str, t: float, status: int, outcome: str, agent: str,
             input_tokens: int, output_tokens: int, stream: bool, api: str, model: str, rid: str,
             transport: str = "http") -> Attempt:
    return Attempt(
        t=t, method=method, path=path, status=status, outcome=outcome, agent=agent,
        input_tokens=input_tokens, output_tokens=output_tokens, stream=stream, api=api, model=model,
        request_id=rid, t_end=provider.now(), transport=transport,
    )


# ------------------------------------------------------------------- sinks


class _Sink(Protocol):
    async def reject(self, status: int, headers: list[tuple[str, str]], body: dict[str, Any]) -> None: ...
    async def full(self, status: int, headers: list[tuple[str, str]], body: dict[str, Any]) -> None: ...
    async def start(self, status: int, headers: list[tuple[str, str]], content_type: str) -> None: ...
    async def frame(self, api: str, frame: wire.Frame) -> None: ...
    async def end(self) -> None: ...
    def reset(self) -> None: ...


class _HttpSink:
    def __init__(self, conn: _Connection, req: _Request, encoding: str | None,
                 extra: list[tuple[str, str]]) -> None:
        self.conn, self.req, self.encoding, self.extra = conn, req, encoding, extra
        self._encoder: _Encoder | None = None

    async def reject(self, status: int, headers: list[tuple[str, str]], body: dict[str, Any]) -> None:
        await self.full(status, headers, body)

    async def full(self, status: int, headers: list[tuple[str, str]], body: dict[str, Any]) -> None:
        raw = json.dumps(body, separators=(",", ":")).encode()
        await self.conn.respond(self.req, status, [("content-type", "application/json"), *headers, *self.extra],
                                raw, encoding=self.encoding)

    async def start(self, status: int, headers: list[tuple[str, str]], content_type: str) -> None:
        headers = [("content-type", content_type), ("cache-control", "no-cache"), *headers, *self.extra]
        if self.encoding:
            self._encoder = _Encoder(self.encoding)
            headers.append(("content-encoding", self.encoding))
        await self.conn._send(h11.Response(status_code=status, headers=headers))

    async def frame(self, api: str, frame: wire.Frame) -> None:
        data = wire.encode_frame(api, frame)
        if self._encoder is not None:
            data = self._encoder.chunk(data)
        await self.conn._send(h11.Data(data=data))

    async def end(self) -> None:
        if self._encoder is not None:
            tail = self._encoder.finish()
            if tail:
                await self.conn._send(h11.Data(data=tail))
        await self.conn._send(h11.EndOfMessage())

    def reset(self) -> None:
        self.conn.reset()


class _WsSink:
    """Responses over WebSocket: one JSON text frame per event; errors as wrapped error events."""

    def __init__(self, conn: _Connection, ws: WsConnection) -> None:
        self.conn, self.ws = conn, ws

    async def _send_json(self, data: Any) -> None:
        await self.conn.stream.send_all(self.ws.send(Message(data=json.dumps(data, separators=(",", ":")))))

    async def reject(self, status: int, headers: list[tuple[str, str]], body: dict[str, Any]) -> None:
        error = body.get("error", body)
        await self._send_json({"type": "error", "status": status, "error": error, "headers": dict(headers)})

    async def full(self, status: int, headers: list[tuple[str, str]], body: dict[str, Any]) -> None:
        raise AssertionError("the WebSocket transport always streams")

    async def start(self, status: int, headers: list[tuple[str, str]], content_type: str) -> None:
        pass

    async def frame(self, api: str, frame: wire.Frame) -> None:
        if isinstance(frame[1], dict):
            await self._send_json(frame[1])

    async def end(self) -> None:
        pass

    def reset(self) -> None:
        self.conn.reset()


# -------------------------------------------------------------- generation


def _ids(api: str) -> tuple[str, str]:
    tok = secrets.token_hex(12)
    if api == wire.ANTHROPIC:
        return "msg_mock" + tok, ""
    if api == wire.OPENAI_CHAT:
        return "chatcmpl-mock" + tok, ""
    if api == wire.OPENAI_RESPONSES:
        return "resp_mock" + tok, "msg_mock" + tok
    return "", ""


def _rejection(provider: MockProvider, api: str, adm: Admission, input_tokens: int,
               base: list[tuple[str, str]]) -> tuple[int, list[tuple[str, str]], dict[str, Any]]:
    """Status, headers and body for an attempt refused before admission."""
    fmt = wire.error_format(api)
    cfg = provider.config
    rid = adm.request_id
    if adm.verdict == RATE_LIMITED:
        req_bucket, _ = provider.buckets()
        exhausted = "requests" if cfg.rpm and req_bucket.used >= cfg.rpm else "tokens"
        if not cfg.rpm and not cfg.tpm:
            exhausted = "all"
        secs = max(1, math.ceil(adm.wait))
        headers = [*base, *provider.rate_headers(fmt, exhausted=exhausted), ("retry-after", str(secs))]
        if fmt == "anthropic":
            limit = cfg.rpm if exhausted == "requests" else cfg.tpm
            unit = "requests" if exhausted == "requests" else "tokens"
            msg = (f"This request would exceed the rate limit for your organization of {limit} {unit} "
                   f"per window. Please retry after {secs} seconds.")
            return 429, headers, wire.error_body(fmt, 429, msg, request_id=rid)
        headers.append(("retry-after-ms", str(max(1, math.ceil(adm.wait * 1000)))))
        if fmt == "openai":
            limit = cfg.rpm if exhausted == "requests" else cfg.tpm
            msg = (f"Rate limit reached for {cfg.model} on {exhausted} per min: Limit {limit}. "
                   f"Please try again in {adm.wait:.3f}s.")
            return 429, headers, wire.error_body(fmt, 429, msg, request_id=rid, kind=exhausted,
                                                 code="rate_limit_exceeded")
        return 429, headers, wire.error_body(fmt, 429, "rate limit exceeded, retry later", request_id=rid)
    if adm.verdict == OVERLOADED:
        headers = [*base, *provider.rate_headers(fmt)]
        if fmt == "anthropic":
            return 529, headers, wire.error_body(fmt, 529, "Overloaded", request_id=rid)
        msg = ("server busy, please try again.  maximum pending requests exceeded" if fmt == "ollama"
               else "The server is overloaded. Please try again later.")
        return 503, headers, wire.error_body(fmt, 503, msg, request_id=rid, kind="server_error", code="overloaded")
    if adm.verdict == QUOTA:
        headers = [*base, *provider.rate_headers(fmt)]
        if fmt == "anthropic":
            msg = ("Your credit balance is too low to access the Anthropic API. "
                   "Please go to Plans & Billing to upgrade or purchase credits.")
            return 400, headers, wire.error_body(fmt, 400, msg, request_id=rid)
        msg = "You exceeded your current quota, please check your plan and billing details."
        return 429, headers, wire.error_body(fmt, 429, msg, request_id=rid, kind="insufficient_quota",
                                             code="insufficient_quota")
    # TOO_LARGE: bigger than the whole token budget; never admissible, no retry-after.
    headers = [*base, *provider.rate_headers(fmt)]
    msg = (f"Request too large for {cfg.model} on tokens per min (TPM): Limit {cfg.tpm}, "
           f"Requested {input_tokens}. The input or output tokens must be reduced in order to run successfully.")
    if fmt == "ollama":
        return 400, headers, wire.error_body(fmt, 400, msg, request_id=rid)
    return 429, headers, wire.error_body(fmt, 429, msg, request_id=rid, kind="tokens", code="rate_limit_exceeded")


async def _generate(
    provider: MockProvider,
    sink: _Sink,
    *,
    api: str,
    body: dict[str, Any],
    raw_len: int,
    stream: bool,
    agent: str,
    forced: str | None,
    method: str,
    path: str,
    transport: str,
) -> None:
    """One attempt, from admission to the last byte, recorded exactly once."""
    cfg = provider.config
    fmt = wire.error_format(api)
    model = str(body.get("model") or cfg.model)
    input_tokens = max(1, raw_len // 4)
    adm = provider.admit(input_tokens=input_tokens, stream=stream, forced=forced)
    base = [("request-id", adm.request_id)] if fmt == "anthropic" else [("x-request-id", adm.request_id)]
    status, outcome, delivered = 0, CLIENT_GONE, 0
    try:
        if adm.verdict != OK:
            status, headers, err = _rejection(provider, api, adm, input_tokens, base)
            outcome = adm.verdict
            await sink.reject(status, headers, err)
            return
        await trio.sleep(adm.latency)
        if adm.fault == "reset":
            outcome = RESET
            sink.reset()
        headers = [*base, *provider.rate_headers(fmt)]
        if adm.fault == "502":
            status, outcome = 502, API_ERROR
            msg = "Internal server error (mock fault)" if fmt == "anthropic" else "Bad gateway (mock fault)"
            await sink.reject(502, headers, wire.error_body(fmt, 502, msg, request_id=adm.request_id))
            return
        msg_id, item_id = _ids(api)
        # A reply stops at the request's own output cap, as a model does.
        cap = wire.output_cap(api, body)
        output_tokens = adm.output_tokens if cap is None else min(adm.output_tokens, cap)
        text = provider.reply_text(output_tokens)
        generate = body.get("generate") is not False
        plan = wire.ReplyPlan(
            api=api, model=model, text=text if generate else "", deltas=provider.split_deltas(text),
            input_tokens=input_tokens, output_tokens=output_tokens if generate else 0,
            truncated=generate and cap is not None and adm.output_tokens > cap,
            msg_id=msg_id, item_id=item_id, created=int(provider.wall(provider.now())),
            include_usage=bool((body.get("stream_options") or {}).get("include_usage")),
            generate=generate, request=body,
        )
        duration_ns = max(1_000_000, int((adm.latency + cfg.stream_delay * (cfg.stream_chunks + 1)) * 1e9))
        if not stream:
            status = 200
            await sink.full(200, headers, wire.reply_body(plan, duration_ns))
            outcome, delivered = OK, plan.output_tokens
            return
        frames = wire.reply_frames(plan, duration_ns)
        status = 200
        await sink.start(200, headers, wire.stream_content_type(api))
        cut = max(1, len(frames) // 2) if adm.fault in ("drop", "stall", "error") else -1
        for i, frame in enumerate(frames):
            if i == cut:
                delivered = plan.output_tokens * i // len(frames)
                if adm.fault == "drop":
                    outcome = DROP
                    sink.reset()
                if adm.fault == "stall":
                    outcome = STALL
                    await trio.sleep(cfg.stall_seconds)
                    sink.reset()
                outcome = ERROR_EVENT
                await sink.frame(api, wire.midstream_error_frame(api, plan, i))
                await sink.end()
                return
            await sink.frame(api, frame)
            if cfg.stream_delay and i < len(frames) - 1:
                await trio.sleep(cfg.stream_delay)
        await sink.end()
        outcome, delivered = OK, plan.output_tokens
    finally:
        provider.release(adm)
        if adm.verdict == OK:
            provider.settle(adm, input_tokens, delivered)
        provider.record(_attempt(provider, method, path, adm.t, status, outcome, agent,
                                 input_tokens, delivered, stream, api,
                                 model, adm.request_id, transport))


# --------------------------------------------------------------- WebSocket


async def _serve_websocket(conn: _Connection, req: _Request) -> None:
    """The Responses API over WebSocket (what Codex's built-in provider tries first)."""
    key = req.header("sec-websocket-key")
    if not key or req.header("sec-websocket-version") != "13" or "upgrade" not in req.header("connection").lower():
        await conn.respond_json(req, 400, {"error": {"message": "bad websocket handshake", "type": "invalid_request_error",
                                                     "param": None, "code": None}})
        return
    accept = generate_accept_token(key.encode("latin-1")).decode()
    await conn._send(
        h11.InformationalResponse(
            status_code=101,
            headers=[
                ("upgrade", "websocket"),
                ("connection", "Upgrade"),
                ("sec-websocket-accept", accept),
                ("x-request-id", _rid()),
            ],
        )
    )
    trailing, _closed = conn.h11.trailing_data
    conn.gone = True  # the HTTP loop must not touch the connection any more
    ws = WsConnection(ConnectionType.SERVER, trailing_data=trailing)
    stream = conn.stream
    sink = _WsSink(conn, ws)
    parts: list[str] = []
    agent = _agent(req)
    forced = req.header("x-mock-fault") or None
    try:
        while True:
            for event in ws.events():
                if isinstance(event, TextMessage):
                    parts.append(event.data)
                    if not event.message_finished:
                        continue
                    text, parts = "".join(parts), []
                    await _ws_message(conn, sink, text, agent=agent, forced=forced, path=req.path)
                elif isinstance(event, BytesMessage):
                    continue
                elif isinstance(event, Ping):
                    await stream.send_all(ws.send(event.response()))
                elif isinstance(event, CloseConnection):
                    try:
                        await stream.send_all(ws.send(event.response()))
                    except Exception:
                        pass
                    return
            data = await stream.receive_some(65536)
            if not data:
                return
            ws.receive_data(data)
    except _Reset:
        return
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        return
    finally:
        if conn.stream.socket.fileno() != -1:
            with trio.CancelScope(shield=True):
                try:
                    await stream.aclose()
                except (trio.BrokenResourceError, OSError):
                    pass


async def _ws_message(conn: _Connection, sink: _WsSink, text: str, *, agent: str, forced: str | None,
                      path: str) -> None:
    try:
        msg = json.loads(text)
    except ValueError:
        msg = None
    if not isinstance(msg, dict):
        await sink.reject(400, [], {"error": {"type": "invalid_request_error", "code": "invalid_json",
                                              "message": "frames must be JSON objects"}})
        return
    kind = msg.get("type")
    if kind != "response.create":
        return  # e.g. "response.processed" acknowledgements: nothing to answer
    body = {k: v for k, v in msg.items() if k != "type"}
    await _generate(conn.provider, sink, api=wire.OPENAI_RESPONSES, body=body, raw_len=len(text), stream=True,
                    agent=agent, forced=forced, method="WS", path=path, transport="ws")
