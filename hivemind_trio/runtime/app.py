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
import signal
from collections import Counter
from contextlib import aclosing
from email.utils import formatdate
from collections.abc import Callable
from typing import Any

import attrs
import httpx
import trio

from ..admin.metrics import Metrics
from ..config import Config, ConfigError, load_config
from ..core import errors
from ..core.budget import Reservation
from ..core.identity import Identity, Priority, identify
from ..core.retry import Outcome, OutcomeKind
from ..core.usage import Usage, UsageMeter
from ..logs import adopt_server_logging, log_request
from ..profiles import load_profiles
from . import headers as h
from .forward import Forwarder, Router, Target
from .relay import END_BODY, ClientAbort, RelayResult, StreamKind, pump, write
from .scheduler import (
    BreakerCancelled,
    Lane,
    QueueTimeout,
    RequestInfo,
    Scheduler,
    Ticket,
    info_headers,
    no_retry,
    priority_of,
    request_info,
    should_retry,
)

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


@attrs.frozen
class RequestRecord:
    """What one finished request did: the one record that logs and metrics read."""

    method: str
    path: str
    route: str
    lane: str
    agent: str
    priority: str
    status: int  # 0 when the client left before any status
    attempts: int
    queue_s: float
    ttfb_s: float | None  # first body byte relayed to the client
    total_s: float
    input_tokens: int | None
    output_tokens: int | None
    estimated: bool
    bytes_sent: int
    client_gone: bool


class Runtime:
    """Per-process state of a running proxy."""

    def __init__(self, config: Config, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.config = config
        self.profiles = load_profiles(config.server.profiles_dir or None)
        self.router = Router(config, self.profiles)
        self.forwarder = Forwarder(config, transport)
        self.counters = Counters()
        self.scheduler = Scheduler(config)
        # Called with every RequestRecord: the per-request log line first
        # (hivemind_trio.logs), then metrics, which register themselves.
        self.sinks: list[Callable[[RequestRecord], None]] = [log_request]
        self.metrics = Metrics(self)
        # Salt for credential fingerprints: per process, never persisted, so a
        # fingerprint cannot be turned back into a key from logs.  Instances
        # sharing state need the same lanes and agent names: one shared salt.
        shared = self.scheduler.shared
        self.salt = shared.salt() if shared is not None else secrets.token_bytes(32)
        self.started_at = trio.current_time()

    async def aclose(self) -> None:
        self.scheduler.close()
        await self.forwarder.aclose()

    def record(self, rec: RequestRecord) -> None:
        for sink in self.sinks:
            sink(rec)

    def priority_of(self, identity: Identity, own: dict[bytes, bytes], headers: list[tuple[bytes, bytes]]) -> Priority:
        return priority_of(self.config.agents, identity, own, headers)

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
            "state": self.scheduler.state_statistics(),
            **self.scheduler.statistics(),
            "events": list(self.scheduler.events)[-50:],
        }


class ProxyApp:
    """ASGI app.  ``config=None`` loads configuration from the environment
    (``HIVEMIND_CONFIG``, ``HIVEMIND_*``) at start-up."""

    def __init__(self, config: Config | None = None, *, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self._config = config
        self._transport = transport
        self.runtime: Runtime | None = None

    def prepare(self) -> Runtime:
        """Build the runtime now (instead of at lifespan start-up)."""
        return self._ensure_runtime()

    def begin_shutdown(self) -> None:
        """Stop admitting: queued and new requests get 503/529 + Retry-After."""
        if self.runtime is not None:
            self.runtime.scheduler.shut()

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
        message = await receive()
        if message["type"] != "lifespan.startup":  # pragma: no cover - ASGI order
            return
        try:
            rt = self._ensure_runtime()
            _refuse_unshared_workers(rt.config)
        except Exception as exc:
            log.error("hivemind_trio cannot start: %s", exc)
            await send({"type": "lifespan.startup.failed", "message": str(exc)})
            return
        if rt.scheduler.attached:
            # open_proxy / serve run the dispatchers in their own nursery, where
            # a crash propagates to the caller.
            await send({"type": "lifespan.startup.complete"})
            while (await receive())["type"] != "lifespan.shutdown":
                pass
        else:
            # A bare ASGI server (`hypercorn -k trio hivemind_trio:app`): log
            # per server.log_level / log_json unless logging is set up already.
            adopt_server_logging(rt.config)
            await self._lifespan_with_dispatchers(rt, receive, send)
        await rt.aclose()
        await send({"type": "lifespan.shutdown.complete"})

    async def _lifespan_with_dispatchers(self, rt: Runtime, receive, send) -> None:
        """Under a bare ASGI server the lane dispatchers live in the lifespan task.
        Hypercorn only logs a failed lifespan task and goes on serving, which
        would leave a proxy that queues forever: a crash stops the process
        instead (SPEC §8.4), so a supervisor can restart it."""
        try:
            async with trio.open_nursery() as nursery:
                rt.scheduler.attach(nursery)
                await rt.scheduler.start_shared(nursery)
                await send({"type": "lifespan.startup.complete"})
                while (await receive())["type"] != "lifespan.shutdown":
                    pass
                nursery.cancel_scope.cancel()
        except Exception:
            log.critical("hivemind_trio scheduler crashed; stopping the server", exc_info=True)
            rt.scheduler.shut()
            signal.raise_signal(signal.SIGTERM)
            raise

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
        priority = rt.priority_of(identity, own, client_headers)
        request = rt.forwarder.build_request(method, target, client_headers, body, had_length=had_length)
        info = request_info(rt.config.scheduler, identity, priority, body, client_headers)
        await self._exchange(rt, request, target, identity, info, receive, send)

    async def _exchange(self, rt: Runtime, request, target: Target, identity: Identity, info: RequestInfo, receive, send) -> None:
        c = rt.counters
        sched = rt.scheduler
        cfg = rt.config.scheduler
        c.in_flight += 1
        c.requests += 1
        c.by_route[target.route] += 1
        fmt = target.profile.error_format
        t0 = trio.current_time()
        lane = sched.lane_for(target.route, target.profile, identity.credential, rpm=target.rpm, tpm=target.tpm)
        agent = sched.agent(identity.agent)
        agent.requests += 1
        agent.in_flight += 1
        agent.priority = info_priority_name(info.priority)
        status = 0
        attempts = 0
        queued = 0.0
        result = RelayResult()
        started = False
        declared: int | None = None  # the relayed response's Content-Length
        box = _UsageBox()
        reservation = None
        # What to send once the disconnect watcher is gone (see relay.write).
        final: tuple[int, list[tuple[bytes, bytes]], bytes] | dict | None = None
        try:
            try:
                reservation = await sched.reserve_or_refuse(info, agent, lane)
            except errors.BudgetExhausted as err:
                status, hdrs, body = err.render(fmt)
                final = (status, hdrs + info_headers(rt.config.server.info_headers, identity.agent, 0.0, 0), body)
                return
            warn = bool(reservation is not None and reservation.warning)
            if cfg.retry:
                lane.retry_budget.record_request(trio.current_time())
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_watch_disconnect, receive, nursery.cancel_scope, result)
                retry = False
                limited = 0  # attempts that ended in a 429
                last_failure: tuple[int, list[tuple[bytes, bytes]], bytes] | None = None
                while True:
                    ticket = sched.new_ticket(info, lane, retry=retry)
                    tq = trio.current_time()
                    try:
                        await lane.wait_turn(ticket)
                    except QueueTimeout as exc:
                        queued += exc.waited
                        agent.queue_timeouts += 1
                        if not exc.shutting_down:
                            sched.emit("queue_timeout", agent=identity.agent, lane=lane.key, waited=round(exc.waited, 3))
                        if last_failure is not None and not exc.shutting_down:
                            # A retry that ran out of time in the queue: the
                            # client gets the upstream's own last answer (or
                            # the proxy's error naming the upstream), not a
                            # vaguer "overloaded".
                            status, hdrs, body = last_failure
                            final = (status, no_retry(hdrs, attempts) + info_headers(rt.config.server.info_headers, identity.agent, queued, attempts), body)
                            break
                        cls = errors.Overloaded if fmt == errors.ANTHROPIC else errors.Unavailable
                        why = (
                            "the proxy is shutting down"
                            if exc.shutting_down
                            else f"no upstream capacity for {exc.waited:.1f} s on '{target.route}'"
                        )
                        err = cls(
                            f"hivemind_trio: {why}; try again later",
                            headers=(("retry-after", str(int(exc.retry_after))),),
                        )
                        status, hdrs, body = err.render(fmt)
                        final = (status, hdrs + info_headers(rt.config.server.info_headers, identity.agent, queued, attempts), body)
                        break
                    queued += trio.current_time() - tq
                    attempts += 1
                    try:
                        head = await nursery.start(_upstream, rt, lane, ticket, request, target, result, box)
                    except BreakerCancelled:
                        # Not the request's fault: back into the queue, ahead of new work.
                        attempts -= 1
                        retry = True
                        continue
                    except errors.ProxyError as exc:
                        outcome = Outcome.transport(OutcomeKind(getattr(exc, "transport_kind", "connect_error")))
                        last_failure = exc.render(fmt)
                        if await should_retry(rt.scheduler, lane, info, outcome, attempts - limited, agent):
                            retry = True
                            continue
                        c.upstream_errors += 1
                        status, hdrs, body = exc.render(fmt)
                        final = (status, no_retry(hdrs, attempts) + info_headers(rt.config.server.info_headers, identity.agent, queued, attempts), body)
                        break
                    if head.body is not None:
                        # An error answer, read whole: retry it or pass it on untouched.
                        last_failure = (head.status, h.end_to_end(head.headers), head.body)
                        if await should_retry(rt.scheduler, lane, info, head.outcome, attempts - limited, agent):
                            retry = True
                            if head.status == 429:
                                limited += 1
                            continue
                        status = head.status
                        out = no_retry(h.end_to_end(head.headers), attempts)
                        final = (status, out + info_headers(rt.config.server.info_headers, identity.agent, queued, attempts, warn), head.body)
                        break
                    status = head.status
                    out = h.end_to_end(head.headers)
                    if head.kind.sse:
                        _setdefault(out, b"cache-control", b"no-cache")
                        _setdefault(out, b"x-accel-buffering", b"no")
                    out += info_headers(rt.config.server.info_headers, identity.agent, queued, attempts, warn)
                    await send({"type": "http.response.start", "status": status, "headers": out})
                    started = True
                    length = h.get(head.headers, b"content-length")
                    if length is not None and length.strip().isdigit():
                        declared = int(length)
                    try:
                        await write(send, head.items, head.kind, fmt, target.url.path, result)
                    except ClientAbort as exc:
                        log.warning("aborting response to %s: %s", identity.agent, exc)
                        raise
                    final = END_BODY
                    break
                nursery.cancel_scope.cancel()
        except* ClientAbort as group:
            # Tear the connection (Hypercorn drops it when the app raises after
            # the response started): a truncated body must not look complete.
            agent.failures += 1
            raise group.exceptions[0] from None
        finally:
            if result.client_gone and final is None and not (declared is not None and result.bytes_sent >= declared):
                # The watcher cancelled the exchange: the client left mid-way.
                # A client that closes as soon as it has the whole declared
                # body (curl does) can be seen leaving before the last empty
                # body message goes out: that is no loss.
                c.disconnects += 1
            usage = box.usage
            if isinstance(reservation, Reservation):
                if sched.settle(reservation, usage):
                    log.warning("budget warning agent=%s: 85%% of a budget is used", identity.agent)
                    sched.emit("budget_warning", agent=identity.agent, lane=lane.key)
            if usage is not None:
                agent.input_tokens += usage.all_input_tokens
                agent.output_tokens += usage.output_tokens
                if usage.estimated:
                    agent.estimated_requests += 1
            if isinstance(final, dict):
                await send(final)
            elif final is not None:
                await _respond(send, final)
            c.in_flight -= 1
            agent.in_flight -= 1
            if status:
                c.by_status[status] += 1
                agent.by_status[status] += 1
                if status >= 400 and final is not END_BODY:
                    agent.failures += 1
            rt.record(RequestRecord(
                method=request.method,
                path=target.url.path,
                route=target.route,
                lane=lane.key,
                agent=identity.agent,
                priority=info_priority_name(info.priority),
                status=status,
                attempts=attempts,
                queue_s=queued,
                ttfb_s=None if result.first_byte_at is None else result.first_byte_at - t0,
                total_s=trio.current_time() - t0,
                input_tokens=None if usage is None else usage.all_input_tokens,
                output_tokens=None if usage is None else usage.output_tokens,
                estimated=bool(usage is not None and usage.estimated),
                bytes_sent=result.bytes_sent,
                client_gone=not (started or status),
            ))  # logged by the first sink (hivemind_trio.logs.log_request)

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
        if path == b"/hivemind/metrics":
            from ..admin.metrics import render_metrics

            ctype, body = render_metrics(rt)
            await _respond(send, (200, [(b"content-type", ctype.encode()), (b"content-length", str(len(body)).encode())], body))
            return
        if path == b"/hivemind":
            from ..admin.dashboard import dashboard_page

            body = dashboard_page()
            await _respond(send, (200, [(b"content-type", b"text/html; charset=utf-8"), (b"cache-control", b"no-cache"),
                                        (b"content-length", str(len(body)).encode())], body))
            return
        await _respond(send, errors.NotFound(f"no admin endpoint {raw_path.decode('latin-1')}").render(errors.PLAIN))


# -- helpers ------------------------------------------------------------------


@attrs.define
class _UsageBox:
    usage: Usage | None = None


@attrs.frozen
class _Head:
    status: int
    headers: list[tuple[bytes, bytes]]
    # The whole body of an error answer (read so it can be retried or relayed
    # as one piece); None for a response relayed as it streams.
    body: bytes | None
    items: trio.MemoryReceiveChannel | None
    kind: StreamKind
    outcome: Outcome


async def _upstream(rt: Runtime, lane: Lane, ticket: Ticket, request, target: Target, result: RelayResult, box: _UsageBox, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """One admitted attempt: report the head, then pump the body.  The lane
    slot and the pool slot are released when this task ends, whatever the
    writer is doing."""
    ok: bool | None = None
    t_start = trio.current_time()
    output_tokens: int | None = None
    headers_scope = trio.CancelScope()
    try:
        with headers_scope:
            lane.watch_headers(headers_scope)
            try:
                async with rt.forwarder.open(request, target) as resp:
                    lane.unwatch_headers(headers_scope)
                    kind = StreamKind.of(resp.headers)
                    if resp.status >= 400 and not (kind.sse or kind.ndjson):
                        body = await _read_all(resp.stream)
                        outcome = lane.on_response(ticket, resp.status, resp.headers, body)
                        ok = False
                        task_status.started(_Head(resp.status, resp.headers, body, None, kind, outcome))
                        return
                    outcome = lane.on_response(ticket, resp.status, resp.headers)
                    meter = UsageMeter(h.get(resp.headers, b"content-type"), h.get(resp.headers, b"content-encoding"),
                                       request_bytes=len(request.content))
                    send_ch, recv_ch = trio.open_memory_channel(16)
                    task_status.started(_Head(resp.status, resp.headers, None, recv_ch, kind, outcome))
                    await pump(_metered(resp.stream, meter), send_ch, kind, rt.config.server.stall_timeout, result)
                    usage = meter.finish()
                    box.usage = usage
                    output_tokens = None if usage.estimated else usage.output_tokens
                    if result.broken is not None:
                        lane.on_failure(ticket, OutcomeKind.STREAM_BROKEN_AFTER_BYTES)
                        ok = False
                    else:
                        ok = resp.status < 400 and not result.stalled
            except errors.ProxyError as exc:
                lane.unwatch_headers(headers_scope)
                lane.on_failure(ticket, OutcomeKind(getattr(exc, "transport_kind", "connect_error")))
                raise
            finally:
                lane.unwatch_headers(headers_scope)
        if headers_scope.cancelled_caught:
            lane.on_cancelled(ticket)
            raise BreakerCancelled()
    finally:
        if ok is None and not headers_scope.cancelled_caught:
            lane.on_cancelled(ticket)
        lane.release(ticket, ok=ok, latency=trio.current_time() - t_start, output_tokens=output_tokens)
    if result.stalled:
        # Counted here, not by the writer: the writer may stay parked in
        # Hypercorn's shielded send until the client's socket dies.
        rt.counters.stalls += 1
        log.warning("client stopped reading for %.0f s; upstream %s released", rt.config.server.stall_timeout, target.route)


async def _metered(chunks, meter: UsageMeter):
    """Tee raw chunks into the usage meter (a side copy: the client gets the raw bytes)."""
    async with aclosing(chunks):
        async for chunk in chunks:
            meter.feed(chunk)
            yield chunk


async def _read_all(chunks) -> bytes:
    parts = []
    async with aclosing(chunks):
        async for chunk in chunks:
            parts.append(chunk)
    return b"".join(parts)


def info_priority_name(priority: int) -> str:
    return Priority(priority).name.lower()


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


def worker_processes() -> int:
    """How many worker processes of one server run this app: the spawned
    siblings of this process (``hypercorn --workers N`` spawns N from one
    supervisor).  1 when this is no spawned worker or it cannot be told (Linux
    /proc only)."""
    import multiprocessing
    import os

    if multiprocessing.parent_process() is None:
        return 1
    ppid = os.getppid()
    try:
        with open(f"/proc/{ppid}/task/{ppid}/children") as f:
            children = f.read().split()
    except OSError:
        return 1
    n = 0
    for pid in children:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                # The supervisor's other children (the resource tracker) are no workers.
                if b"spawn_main" in f.read():
                    n += 1
        except OSError:
            continue
    return max(1, n)


def _refuse_unshared_workers(config: Config) -> None:
    """SPEC §7.5: several workers without shared state would each apply the
    whole rate limit, window and budget, so together they would send N times
    the upstream's limit.  Refused at start-up (the server stops)."""
    n = worker_processes()
    if n > 1 and not config.state:
        raise ConfigError(
            f"{n} worker processes but no shared state: each would apply every rate limit, window and budget "
            f"on its own, and together they would send {n}x the upstream's limit; set state = \"redis://host:6379/0\" "
            "(HIVEMIND_STATE) so the workers share them, or run one worker"
        )


def default_app() -> ProxyApp:
    """The module-level app for ``hypercorn -k trio hivemind_trio:app``."""
    return ProxyApp(None)


__all__ = ["ProxyApp", "Runtime", "default_app"]
