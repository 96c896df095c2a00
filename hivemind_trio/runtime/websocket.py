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

import collections
import json
import logging
import ssl
from typing import TYPE_CHECKING, Any

import trio
import trio_websocket

from ..core import errors
from ..core.budget import Reservation
from ..core.usage import Usage
from ..core.identity import identify
from . import headers as h
from .scheduler import QueueTimeout, Ticket, request_info

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
            turns = _Turns(rt, target, identity, client_headers, own)
            try:
                nursery.start_soon(_client_to_upstream, receive, upstream, nursery.cancel_scope, turns, send)
                await _upstream_to_client(upstream, send, turns)
                nursery.cancel_scope.cancel()
            finally:
                turns.close()
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


class _Turns:
    """Each ``response.create`` frame passes the lane's scheduler like an HTTP
    request (SPEC §3.9): it takes a budget reservation (or is refused with an
    error event, never sent upstream), is held until admitted, and its slot is
    freed when the upstream's terminal event for it (``response.completed`` /
    ``.incomplete`` / ``.failed`` or ``error``) comes back, whose usage then
    replaces the reservation.  Responses on one socket are answered in order,
    so turns are matched first in, first out."""

    _TERMINAL = frozenset({"response.completed", "response.incomplete", "response.failed", "error"})

    def __init__(self, rt: Runtime, target, identity, client_headers, own) -> None:
        self.rt = rt
        self.sched = rt.scheduler
        self.identity = identity
        self.client_headers = client_headers
        self.priority = rt.priority_of(identity, own, client_headers)
        self.lane = self.sched.lane_for(target.route, target.profile, identity.credential, rpm=target.rpm, tpm=target.tpm)
        self.agent = self.sched.agent(identity.agent)
        self.pending: collections.deque[tuple[Ticket, Reservation | None]] = collections.deque()

    async def admit(self, frame: str) -> str | None:
        """Wait for a ``response.create`` frame's turn; None if it may go now,
        else the error event to answer the client with instead."""
        if '"response.create"' not in frame:
            return None
        try:
            doc = json.loads(frame)
        except ValueError:
            return None
        if not isinstance(doc, dict) or doc.get("type") != "response.create":
            return None
        info = request_info(self.rt.config.scheduler, self.identity, self.priority, frame.encode(), self.client_headers)
        self.agent.requests += 1
        try:
            reservation = await self.sched.reserve_or_refuse(info, self.agent, self.lane)
        except errors.BudgetExhausted as err:
            # What the Responses API sends when it will not answer for
            # billing reasons: an error event with a quota code, which Codex
            # does not retry.
            return json.dumps({"type": "error", "status": 429, "error": {
                "type": "insufficient_quota", "code": "hivemind_budget_exhausted", "message": err.message}})
        ticket = self.sched.new_ticket(info, self.lane)
        try:
            await self.lane.wait_turn(ticket)
        except QueueTimeout as exc:
            self.sched.settle(reservation, None)
            self.agent.queue_timeouts += 1
            why = "the proxy is shutting down" if exc.shutting_down else f"no upstream capacity for {exc.waited:.1f} s"
            return json.dumps({"type": "error", "status": 503, "error": {
                "type": "server_error", "code": "hivemind_unavailable", "message": f"hivemind_trio: {why}; try again later"}})
        except BaseException:
            self.sched.settle(reservation, None)
            raise
        self.pending.append((ticket, reservation))
        self.agent.in_flight += 1
        return None

    def answered(self, frame: str) -> None:
        """Look at an upstream frame; a terminal event frees the oldest turn."""
        if not self.pending or not any(f'"{t}"' in frame for t in self._TERMINAL):
            return
        try:
            doc = json.loads(frame)
        except ValueError:
            return
        kind = doc.get("type") if isinstance(doc, dict) else None
        if kind not in self._TERMINAL:
            return
        ticket, reservation = self.pending.popleft()
        self.agent.in_flight -= 1
        usage = doc.get("response", {}).get("usage") if isinstance(doc.get("response"), dict) else None
        out = None
        used = None
        if isinstance(usage, dict):
            inp, out = usage.get("input_tokens"), usage.get("output_tokens")
            if isinstance(inp, int) and isinstance(out, int) and inp >= 0 and out >= 0:
                self.agent.input_tokens += inp
                self.agent.output_tokens += out
                used = Usage(input_tokens=inp, output_tokens=out, source="openai_responses")
            else:
                out = None
        # A turn that failed with no usage reported consumed nothing we know of:
        # its reservation is given back, as on the HTTP path.
        if self.sched.settle(reservation, used):
            log.warning("budget warning agent=%s: 85%% of a budget is used", self.identity.agent)
            self.sched.emit("budget_warning", agent=self.identity.agent, lane=self.lane.key)
        ok = kind in ("response.completed", "response.incomplete")
        if not ok:
            self.agent.failures += 1
        self.lane.release(ticket, ok=ok or None, output_tokens=out)

    def close(self) -> None:
        """The socket is gone: turns still out end with no verdict."""
        while self.pending:
            ticket, reservation = self.pending.popleft()
            self.sched.settle(reservation, None)
            self.agent.in_flight -= 1
            self.lane.on_cancelled(ticket)
            self.lane.release(ticket, ok=None)


async def _client_to_upstream(receive, upstream: trio_websocket.WebSocketConnection, scope: trio.CancelScope,
                              turns: _Turns, send) -> None:
    while True:
        message = await receive()
        kind = message["type"]
        if kind == "websocket.receive":
            data = message.get("text")
            if data is None:
                data = message.get("bytes") or b""
            else:
                refusal = await turns.admit(data)
                if refusal is not None:
                    await send({"type": "websocket.send", "text": refusal})
                    continue
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


async def _upstream_to_client(upstream: trio_websocket.WebSocketConnection, send, turns: _Turns) -> None:
    try:
        while True:
            data = await upstream.get_message()
            if isinstance(data, str):
                await send({"type": "websocket.send", "text": data})
                turns.answered(data)
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
