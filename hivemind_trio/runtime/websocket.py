"""WebSocket relay (SPEC §3.9): Codex's Responses-over-WebSocket.

Hypercorn serves the client side of the socket; trio-websocket opens the
upstream side.  The upstream handshake happens *before* the client's is
accepted, so an upstream refusal (404, 426, 401...) reaches the client as that
same HTTP response (ASGI ``websocket.http.response``) and Codex falls back to
HTTP streaming exactly as it would against the real API.  After that, frames
are relayed as they come, text as text and bytes as bytes, and a close on
either side closes the other with the same code.
"""

from __future__ import annotations

import logging
import ssl
from typing import TYPE_CHECKING, Any

import trio
import trio_websocket

from ..core import errors
from ..core.identity import identify
from . import headers as h

if TYPE_CHECKING:
    from .app import Runtime

log = logging.getLogger("hivemind_trio")

# Larger than any Responses request a coding agent sends (whole conversations).
MAX_MESSAGE = 64 * 1024 * 1024


async def relay_websocket(rt: Runtime, scope: dict[str, Any], receive, send) -> None:
    message = await receive()
    if message["type"] != "websocket.connect":
        return
    raw_path: bytes = scope.get("raw_path") or scope["path"].encode()
    query: bytes = scope.get("query_string", b"")
    client_headers, own = h.split_own(scope["headers"])
    target = rt.router.resolve("GET", raw_path, query, client_headers) if raw_path.startswith(b"/") else None
    if target is None:
        await _reject(send, errors.NotFound("hivemind_trio: no upstream for this WebSocket").render(errors.PLAIN))
        return
    identity = identify(client_headers, own, scope.get("client"), rt.salt)
    url = target.url
    secure = url.scheme in ("https", "wss")
    port = url.port or (443 if secure else 80)
    resource = url.raw_path.decode("latin-1")
    # The upstream's own Host goes in the handshake (wrap_client_stream's host).
    forwarded = h.end_to_end(client_headers, drop=h.WS_HANDSHAKE | {b"host"})
    subprotocols = scope.get("subprotocols") or None
    c = rt.counters
    accepted = False
    stream: trio.abc.Stream | None = None
    try:
        async with trio.open_nursery() as nursery:
            # The TCP/TLS stream is ours, so it is closed whatever happens
            # (trio-websocket leaves it open when the upstream refuses).
            if secure:
                stream = await trio.open_ssl_over_tcp_stream(
                    url.host, port, ssl_context=ssl.create_default_context(), https_compatible=True
                )
            else:
                stream = await trio.open_tcp_stream(url.host, port)
            # The reader task trio-websocket starts in this nursery raises a
            # refusal (ConnectionRejected) into the nursery, not out of
            # wrap_client_stream, hence the except* below.
            upstream = await trio_websocket.wrap_client_stream(
                nursery,
                stream,
                target.host_header.decode("ascii"),
                resource,
                subprotocols=subprotocols,
                extra_headers=forwarded,
                max_message_size=MAX_MESSAGE,
            )
            accept: dict[str, Any] = {"type": "websocket.accept", "subprotocol": upstream.subprotocol}
            if rt.config.server.info_headers:
                accept["headers"] = [(b"x-hivemind-agent", identity.agent.encode("utf-8", "replace"))]
            await send(accept)
            accepted = True
            c.websockets_open += 1
            c.websockets_total += 1
            log.info("websocket %s -> %s agent=%s route=%s opened", raw_path.decode("latin-1"), url.host, identity.agent, target.route)
            try:
                nursery.start_soon(_client_to_upstream, receive, upstream, nursery.cancel_scope)
                await _upstream_to_client(upstream, send)
                nursery.cancel_scope.cancel()
            finally:
                c.websockets_open -= 1
                with trio.CancelScope(shield=True), trio.move_on_after(2):
                    await upstream.aclose()
    except* trio_websocket.ConnectionRejected as group:
        if accepted:
            raise
        # Relay the upstream's refusal as is: Codex counts these to fall back to HTTP.
        exc = group.exceptions[0]
        await _reject(send, (exc.status_code, h.end_to_end(list(exc.headers or ())), exc.body or b""))
    except* (OSError, trio_websocket.HandshakeError, trio.TooSlowError) as group:
        if accepted:
            raise
        exc = group.exceptions[0]
        err = errors.UpstreamUnreachable(
            f"hivemind_trio: upstream '{target.route}' ({url.host}:{port}) WebSocket failed: {exc or type(exc).__name__}"
        )
        await _reject(send, err.render(target.profile.error_format))
    finally:
        if stream is not None:
            with trio.CancelScope(shield=True):
                await stream.aclose()


async def _client_to_upstream(receive, upstream: trio_websocket.WebSocketConnection, scope: trio.CancelScope) -> None:
    while True:
        message = await receive()
        kind = message["type"]
        if kind == "websocket.receive":
            data = message.get("text")
            if data is None:
                data = message.get("bytes") or b""
            try:
                await upstream.send_message(data)
            except trio_websocket.ConnectionClosed:
                return
        elif kind == "websocket.disconnect":
            code = message.get("code", 1000)
            # 1005/1006 are not allowed on the wire; report a normal close.
            await upstream.aclose(code=1000 if code in (1005, 1006) else code)
            scope.cancel()
            return


async def _upstream_to_client(upstream: trio_websocket.WebSocketConnection, send) -> None:
    try:
        while True:
            data = await upstream.get_message()
            if isinstance(data, str):
                await send({"type": "websocket.send", "text": data})
            else:
                await send({"type": "websocket.send", "bytes": data})
    except trio_websocket.ConnectionClosed as exc:
        code = exc.reason.code if exc.reason else 1000
        if code in (1005, 1006, 1015):
            code = 1011 if code == 1006 else 1000
        await send({"type": "websocket.close", "code": code, "reason": (exc.reason.reason or "") if exc.reason else ""})


async def _reject(send, rendered: tuple[int, list[tuple[bytes, bytes]], bytes]) -> None:
    status, headers, body = rendered
    headers = [(k, v) for k, v in headers if k.lower() != b"content-length"] + [
        (b"content-length", str(len(body)).encode())
    ]
    await send({"type": "websocket.http.response.start", "status": status, "headers": headers})
    await send({"type": "websocket.http.response.body", "body": body, "more_body": False})
