"""The ASGI application: routing, admin endpoints and the proxy path.

``ProxyApp`` is a plain ASGI 3 callable.  Everything it needs at run time (the
router, the upstream forwarder, counters) lives in a :class:`Runtime` built at
lifespan start-up, so an invalid configuration stops Hypercorn before it
accepts a connection.  When a server skips the lifespan protocol the runtime
is built on the first request instead.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import secrets
from collections import Counter
from email.utils import formatdate
from typing import Any

import attrs
import httpx
import trio

from ..config import Config, load_config
from ..core import errors
from ..core.identity import Identity, Priority, identify
from ..profiles import load_profiles
from . import headers as h
from .forward import Forwarder, Router, Target
from .relay import END_BODY, ClientAbort, RelayResult, StreamKind, pump, write

log = logging.getLogger("hivemind_trio")

Scope = dict[str, Any]


class ClientGone(Exception):
    """The client disconnected before its request body arrived."""


@attrs.define
class Counters:
    in_flight: int = 0
    requests: int = 0
    by_status: Counter = attrs.field(factory=Counter)
    by_route: Counter = attrs.field(factory=Counter)
    disconnects: int = 0
    stalls: int = 0
    upstream_errors: int = 0
    websockets_open: int = 0
    websockets_total: int = 0


class Runtime:
    """Per-process state of a running proxy."""

    def __init__(self, config: Config, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.config = config
        self.profiles = load_profiles(config.server.profiles_dir or None)
        self.router = Router(config, self.profiles)
        self.forwarder = Forwarder(config, transport)
        self.counters = Counters()
        # Salt for credential fingerprints: per process, never persisted, so a
        # fingerprint cannot be turned back into a key from logs.
        self.salt = secrets.token_bytes(32)
        self.started_at = trio.current_time()

    async def aclose(self) -> None:
        await self.forwarder.aclose()

    def status(self) -> dict[str, Any]:
        c = self.counters
        pool = self.forwarder.statistics()
        return {
            "upstreams": self.router.describe(),
            "in_flight": c.in_flight,
            "requests": c.requests,
            "by_status": {str(k): v for k, v in sorted(c.by_status.items())},
            "by_route": dict(c.by_route),
            "client_disconnects": c.disconnects,
            "stalled_clients": c.stalls,
            "upstream_errors": c.upstream_errors,
            "websockets": {"open": c.websockets_open, "total": c.websockets_total},
            "pool": {"in_use": pool.borrowed_tokens, "size": pool.total_tokens, "waiting": pool.tasks_waiting},
            "uptime_s": round(trio.current_time() - self.started_at, 3),
        }


class ProxyApp:
    """ASGI app.  ``config=None`` loads configuration from the environment
    (``HIVEMIND_CONFIG``, ``HIVEMIND_*``) at start-up."""

    def __init__(self, config: Config | None = None, *, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self._config = config
        self._transport = transport
        self.runtime: Runtime | None = None

    def _ensure_runtime(self) -> Runtime:
        if self.runtime is None:
            config = self._config if self._config is not None else load_config()
            self.runtime = Runtime(config, self._transport)
        return self.runtime

    async def __call__(self, scope: Scope, receive, send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "websocket":
            from .websocket import relay_websocket

            await relay_websocket(self._ensure_runtime(), scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(receive, send)

    async def _lifespan(self, receive, send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    self._ensure_runtime()
                except Exception as exc:
                    log.error("hivemind_trio cannot start: %s", exc)
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self.runtime is not None:
                    await self.runtime.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return

    # -- HTTP ---------------------------------------------------------------

    async def _http(self, scope: Scope, receive, send) -> None:
        rt = self._ensure_runtime()
        method: str = scope["method"]
        raw_path: bytes = scope.get("raw_path") or scope["path"].encode()
        query: bytes = scope.get("query_string", b"")
        # Never an open proxy: absolute-form targets ("GET http://x/") and
        # CONNECT tunnels are refused outright (SPEC §8.2).
        if method == "CONNECT":
            await _respond(send, _closing(errors.MethodNotAllowed("hivemind_trio is not a forward proxy: CONNECT is refused").render(errors.PLAIN)))
            return
        if not raw_path.startswith(b"/"):
            await _respond(send, _closing(errors.BadRequest("hivemind_trio is not a forward proxy: absolute-form request targets are refused").render(errors.PLAIN)))
            return
        if raw_path == b"/hivemind" or raw_path.startswith(b"/hivemind/"):
            await self._admin(rt, scope, raw_path, send)
            return

        client_headers, own = h.split_own(scope["headers"])
        target = rt.router.resolve(method, raw_path, query, client_headers)
        if target is None:
            await _respond(
                send,
                errors.NotFound(
                    "hivemind_trio: no upstream for this request (configure `upstream` or `routes`, "
                    "or send a recognisable Anthropic/OpenAI/Ollama request)"
                ).render(errors.PLAIN),
            )
            return
        fmt = target.profile.error_format
        try:
            body, had_length = await _read_body(scope, receive, rt.config.server.max_body_bytes)
        except errors.ProxyError as exc:
            await _respond(send, exc.render(fmt))
            return
        except ClientGone:
            rt.counters.disconnects += 1
            return
        identity = identify(client_headers, own, scope.get("client"), rt.salt)
        priority = Priority.parse(own.get(b"x-hivemind-priority")) or Priority.NORMAL
        request = rt.forwarder.build_request(method, target, client_headers, body, had_length=had_length)
        await self._exchange(rt, request, target, identity, priority, receive, send)

    async def _exchange(self, rt: Runtime, request, target: Target, identity: Identity, priority: Priority, receive, send) -> None:
        c = rt.counters
        c.in_flight += 1
        c.requests += 1
        c.by_route[target.route] += 1
        fmt = target.profile.error_format
        t0 = trio.current_time()
        status = 0
        result = RelayResult()
        started = False
        # What to send once the disconnect watcher is gone (see relay.write).
        final: tuple[int, list[tuple[bytes, bytes]], bytes] | dict | None = None
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_watch_disconnect, receive, nursery.cancel_scope, result)
                try:
                    head = await nursery.start(_upstream, rt, request, target, result)
                except errors.ProxyError as exc:
                    c.upstream_errors += 1
                    status, hdrs, body = exc.render(fmt)
                    final = (status, hdrs + _info(rt, identity, t0, 1), body)
                    nursery.cancel_scope.cancel()
                    return
                status, resp_headers, items, kind = head
                out = h.end_to_end(resp_headers)
                if kind.sse:
                    _setdefault(out, b"cache-control", b"no-cache")
                    _setdefault(out, b"x-accel-buffering", b"no")
                out += _info(rt, identity, t0, 1)
                await send({"type": "http.response.start", "status": status, "headers": out})
                started = True
                try:
                    await write(send, items, kind, fmt, target.url.path, result)
                except ClientAbort as exc:
                    log.warning("aborting response to %s: %s", identity.agent, exc)
                    raise
                final = END_BODY
                nursery.cancel_scope.cancel()
        except* ClientAbort as group:
            # Tear the connection (Hypercorn drops it when the app raises after
            # the response started): a truncated body must not look complete.
            raise group.exceptions[0] from None
        finally:
            if result.client_gone and final is None:
                # The watcher cancelled the exchange: the client left mid-way
                # (a disconnect seen after the last byte went out is no loss).
                c.disconnects += 1
            if isinstance(final, dict):
                await send(final)
            elif final is not None:
                await _respond(send, final)
            c.in_flight -= 1
            if status:
                c.by_status[status] += 1
            log.info(
                "%s %s -> %s agent=%s route=%s status=%s bytes=%d ms=%.1f%s",
                request.method,
                target.url.path,
                target.url.host,
                identity.agent,
                target.route,
                status or "-",
                result.bytes_sent,
                (trio.current_time() - t0) * 1000,
                "" if started or status else " (client gone)",
            )

    # -- admin ----------------------------------------------------------------

    async def _admin(self, rt: Runtime, scope: Scope, raw_path: bytes, send) -> None:
        path = raw_path.rstrip(b"/")
        if path == b"/hivemind/health":
            await _respond_json(send, 200, {"status": "ok"})
            return
        if not _admin_allowed(rt, scope):
            await _respond(send, errors.Forbidden("admin endpoints need the admin token (Authorization: Bearer <server.admin_token>) when the proxy is bound to a non-loopback address").render(errors.PLAIN))
            return
        if path == b"/hivemind/status":
            await _respond_json(send, 200, rt.status())
            return
        await _respond(send, errors.NotFound(f"no admin endpoint {raw_path.decode('latin-1')}").render(errors.PLAIN))


# -- helpers ------------------------------------------------------------------


async def _upstream(rt: Runtime, request, target: Target, result: RelayResult, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Owns the exchange: report the head, then pump the body; the pool slot
    is released when this task ends, whatever the writer is doing."""
    async with rt.forwarder.open(request, target) as resp:
        kind = StreamKind.of(resp.headers)
        send_ch, recv_ch = trio.open_memory_channel(16)
        task_status.started((resp.status, resp.headers, recv_ch, kind))
        await pump(resp.stream, send_ch, kind, rt.config.server.stall_timeout, result)
    if result.stalled:
        # Counted here, not by the writer: the writer may stay parked in
        # Hypercorn's shielded send until the client's socket dies.
        rt.counters.stalls += 1
        log.warning("client stopped reading for %.0f s; upstream %s released", rt.config.server.stall_timeout, target.route)


async def _watch_disconnect(receive, scope: trio.CancelScope, result: RelayResult) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            result.client_gone = True
            scope.cancel()
            return


async def _read_body(scope: Scope, receive, limit: int) -> tuple[bytes, bool]:
    declared = h.get(scope["headers"], b"content-length")
    if declared is not None:
        try:
            n = int(declared)
        except ValueError:
            raise errors.BadRequest(f"invalid Content-Length {declared.decode('latin-1')!r}") from None
        if n > limit:
            raise errors.BodyTooLarge(f"request body of {n} bytes exceeds the proxy's limit of {limit} bytes (server.max_body_bytes)")
    parts: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone()
        chunk = message.get("body", b"")
        if chunk:
            size += len(chunk)
            if size > limit:
                raise errors.BodyTooLarge(f"request body exceeds the proxy's limit of {limit} bytes (server.max_body_bytes)")
            parts.append(chunk)
        if not message.get("more_body", False):
            break
    return b"".join(parts), declared is not None


def _info(rt: Runtime, identity: Identity, t0: float, attempts: int) -> list[tuple[bytes, bytes]]:
    if not rt.config.server.info_headers:
        return []
    return [
        (b"x-hivemind-agent", identity.agent.encode("utf-8", "replace")),
        (b"x-hivemind-queue-ms", b"0"),
        (b"x-hivemind-attempts", str(attempts).encode()),
    ]


def _closing(rendered: tuple[int, list[tuple[bytes, bytes]], bytes]) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """A refusal after which the connection is not reused (a client that
    tried to tunnel or sent a body we will not read gets no second chance on
    the same socket)."""
    status, headers, body = rendered
    return status, headers + [(b"connection", b"close")], body


def _setdefault(headers: list[tuple[bytes, bytes]], name: bytes, value: bytes) -> None:
    if h.get(headers, name) is None:
        headers.append((name, value))


def _admin_allowed(rt: Runtime, scope: Scope) -> bool:
    server = scope.get("server")
    host = server[0] if server else "127.0.0.1"
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    token = rt.config.server.admin_token
    if loopback and not token:
        return True
    if not token:
        return False
    auth = h.get(scope["headers"], b"authorization") or b""
    given = auth.partition(b" ")[2].strip()
    return secrets.compare_digest(given, token.encode())


async def _respond(send, rendered: tuple[int, list[tuple[bytes, bytes]], bytes]) -> None:
    """One of the proxy's own answers (not a relayed one)."""
    status, headers, body = rendered
    if h.get(headers, b"date") is None:
        headers = headers + [(b"date", formatdate(usegmt=True).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def _respond_json(send, status: int, payload: Any) -> None:
    body = json.dumps(payload, indent=None, separators=(",", ":")).encode()
    await _respond(send, (status, [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())], body))


def default_app() -> ProxyApp:
    """The module-level app for ``hypercorn -k trio hivemind_trio:app``."""
    return ProxyApp(None)


__all__ = ["ProxyApp", "Runtime", "default_app"]
