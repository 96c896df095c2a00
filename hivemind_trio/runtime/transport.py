"""SchedulingTransport: the proxy's scheduling in-process, as an httpx transport.

Theory of operation
-------------------
``SchedulingTransport`` wraps another async transport (by default a plain
``httpx.AsyncHTTPTransport``) and puts every request through the same
:class:`~hivemind_trio.runtime.scheduler.Scheduler` the proxy uses, with no
HTTP hop: identify the agent, pick the lane (request host, credential
fingerprint) and the provider profile, take the budget reservation, wait for
admission (:meth:`Lane.wait_turn`), send, report the outcome
(:meth:`Lane.on_response` / :meth:`Lane.on_failure`), and retry transparently
while nothing has been returned to the caller.  Everything that decides
(gates, pacing, AIMD, breaker, retry policy, budgets) lives in the scheduler
and the sans-io core; this module only adapts it to the transport API.

One request, one *exchange*:

* The attempt runs in the caller's task.  While it waits for response headers
  it sits in a cancel scope the lane can cancel when its breaker opens; the
  request then goes back into the queue (nothing was returned yet).
* An error answer that is not an event stream is read whole (the retry
  decision needs its body, e.g. quota markers) and either retried or returned
  as a complete response, ``x-should-retry: false`` added after retries.
* Any other answer is returned at once, its raw stream wrapped: chunks are
  teed into a :class:`~hivemind_trio.core.usage.UsageMeter`, and the lane
  slot is released (:meth:`Lane.release`) when the stream ends, breaks, or
  the caller closes the response, whichever comes first.  A response the
  caller never reads nor closes holds its slot, exactly as it holds its pooled
  connection in plain httpx: close your responses (``async with`` / ``aread``).

Every exchange holds a slot of a ``trio.CapacityLimiter`` (``max_connections``,
sized like the inner pool) from before the inner call until its response is
closed, as the proxy's forwarder does: nobody waits inside httpcore's pool, so
a cancellation cannot leak a pool slot there (httpcore issue 1093).

Where the lane dispatchers run
------------------------------
Each lane has a dispatcher task.  ``async with transport:`` opens a nursery in
the entering task and the dispatchers live there, so a crash surfaces in the
caller's code.  An ``httpx.AsyncClient(transport=...)`` used as a context
manager enters its transport too; nested or concurrent entries (from any task)
only count, and the *owner's* exit (the first entry, when no dispatcher home
existed yet) closes the transport.  Used without ``async with`` (the SDKs never
enter their client's transport), the dispatchers run in one Trio *system task*
spawned on first use: it ends with ``aclose()`` or with the Trio run, and, like
every system task, crashes the whole run if it ever fails.  While the
transport is entered, ``aclose()`` (what ``AsyncClient.aclose()`` and an SDK's
``close()`` call) is deferred to the exit, so several clients can share one
transport.  A transport belongs to the Trio run that first used it.

The two flavours
----------------
The official SDKs (anthropic 2.x, openai 3.x) are built on ``httpx2`` and only
take an ``httpx2.AsyncClient``; :class:`SchedulingTransport2` is the same core
behind ``httpx2`` types.  :class:`SchedulingTransport` is the plain httpx one.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Mapping
from contextlib import AsyncExitStack
from types import ModuleType, TracebackType
from typing import Any

import attrs
import httpx
import trio

from ..config import Config, ConfigError
from ..core import errors
from ..core.budget import Reservation
from ..core.identity import Identity, Priority, identify
from ..core.retry import Outcome, OutcomeKind
from ..core.usage import Usage, UsageMeter
from ..profiles import GENERIC, Profile, detect_by_shape, load_profiles, profile_for_host
from . import headers as h
from .relay import StreamKind
from .scheduler import (
    AgentStats,
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

try:
    import httpx2
except ImportError:  # pragma: no cover - httpx2 comes with the official SDKs
    httpx2 = None

log = logging.getLogger("hivemind_trio.transport")

# httpx's default pool size: the guard matches the default inner transport.
DEFAULT_MAX_CONNECTIONS = 100

__all__ = ["SchedulingTransport", "SchedulingTransport2"]


# ------------------------------------------------------------------ helpers


def _transport_kind(x: ModuleType, exc: BaseException) -> OutcomeKind | None:
    """How an inner transport failed, as the scheduler sees it; None: not a
    transport failure (a cancellation, a bug) and not ours to retry.

    The same mapping as the proxy's ``forward.translate``, for either module.
    """
    if isinstance(exc, (x.ConnectTimeout, x.ConnectError)):
        return OutcomeKind.CONNECT_ERROR
    if isinstance(exc, x.TimeoutException):
        return OutcomeKind.TIMEOUT_BEFORE_HEADERS
    if isinstance(exc, (x.RemoteProtocolError, x.ReadError, x.WriteError)):
        return OutcomeKind.RESET
    if isinstance(exc, x.TransportError):
        return OutcomeKind.PROTOCOL_ERROR
    if isinstance(exc, OSError):  # some transports leak raw socket errors
        return OutcomeKind.RESET
    return None


async def _read_raw(response: Any) -> bytes:
    """The body as sent (still encoded), then the response closed."""
    parts = []
    try:
        async for chunk in response.stream:
            parts.append(chunk)
    finally:
        with trio.CancelScope(shield=True):
            await response.aclose()
    return b"".join(parts)


@attrs.frozen
class _RouteRule:
    scheme: str
    netloc: str
    path: str  # base path, no trailing slash
    profile: str
    rpm: int
    tpm: int


# ------------------------------------------------------------------ the slot


@attrs.define(eq=False)
class _Slot:
    """One admitted attempt: its lane slot and its connection guard, given back once."""

    lane: Lane
    ticket: Ticket
    guard: trio.CapacityLimiter
    started: float
    guarded: bool = False
    closed: bool = False

    def close(self, ok: bool | None, output_tokens: int | None = None) -> None:
        """``ok=None``: the attempt ended with no verdict (cancelled, abandoned)."""
        if self.closed:
            return
        self.closed = True
        try:
            if ok is None:
                self.lane.on_cancelled(self.ticket)
            self.lane.release(self.ticket, ok=ok, latency=trio.current_time() - self.started, output_tokens=output_tokens)
        finally:
            if self.guarded:
                self.guarded = False
                self.guard.release_on_behalf_of(self.ticket)


# ------------------------------------------------------------------ the exchange


@attrs.define(eq=False)
class _Exchange:
    """Bookkeeping of one request across its attempts (what the proxy logs and counts)."""

    core: _Core
    method: str
    url: str
    lane: Lane
    agent_name: str
    agent: AgentStats
    info: RequestInfo
    t0: float
    reservation: Reservation | None = None
    warn: bool = False
    queued: float = 0.0
    attempts: int = 0
    status: int = 0
    done: bool = False

    def info_headers(self) -> list[tuple[bytes, bytes]]:
        return info_headers(self.core.config.server.info_headers, self.agent_name, self.queued, self.attempts, self.warn)

    def answer(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes, extensions: dict | None = None) -> Any:
        """A complete response (the transport's own refusal or an upstream error read whole)."""
        x = self.core.x
        self.finish(status, None, failed=status >= 400)
        return x.Response(status, headers=headers + self.info_headers(), stream=x.ByteStream(body), extensions=extensions or {})

    def finish(self, status: int, usage: Usage | None, *, failed: bool, note: str = "") -> None:
        if self.done:
            return
        self.done = True
        sched = self.core.scheduler
        agent = self.agent
        if self.reservation is not None and sched.settle(self.reservation, usage):
            log.warning("budget warning agent=%s: 85%% of a budget is used", self.agent_name)
            sched.emit("budget_warning", agent=self.agent_name, lane=self.lane.key)
        if usage is not None:
            agent.input_tokens += usage.all_input_tokens
            agent.output_tokens += usage.output_tokens
            if usage.estimated:
                agent.estimated_requests += 1
        agent.in_flight -= 1
        if status:
            self.status = status
            agent.by_status[status] += 1
        if failed:
            agent.failures += 1
        log.info(
            "%s %s agent=%s lane=%s priority=%s queue_ms=%.1f attempts=%d status=%s tokens=%s ms=%.1f%s",
            self.method,
            self.url,
            self.agent_name,
            self.lane.key,
            Priority(self.info.priority).name.lower(),
            self.queued * 1000,
            self.attempts,
            status or "-",
            "-" if usage is None else f"{usage.all_input_tokens}/{usage.output_tokens}{'~' if usage.estimated else ''}",
            (trio.current_time() - self.t0) * 1000,
            note,
        )


class _Body:
    """The caller's view of a streamed response: raw chunks, metered; the slot
    is released at the end of the stream, on a break, or on close."""

    def __init__(self, core: _Core, exchange: _Exchange, slot: _Slot, response: Any, meter: UsageMeter) -> None:
        self._core = core
        self._exchange = exchange
        self._slot = slot
        self._response = response
        self._meter = meter
        self._status = response.status_code
        self._ended = False
        self._iterators: list[Any] = []

    def __aiter__(self) -> Any:
        # Kept so that aclose() can close an iteration the caller left early
        # (httpx only calls the stream's aclose()): nothing is left to the GC.
        it = self._chunks()
        self._iterators.append(it)
        return it

    async def _chunks(self) -> Any:
        inner = self._response.stream.__aiter__()
        try:
            while True:
                try:
                    chunk = await inner.__anext__()
                except StopAsyncIteration:
                    break
                if chunk:
                    self._meter.feed(chunk)
                    yield chunk
        except BaseException as exc:
            self._end("broken" if _transport_kind(self._core.x, exc) is not None else "abandoned")
            raise
        finally:
            close = getattr(inner, "aclose", None)
            if close is not None:
                with trio.CancelScope(shield=True):
                    await close()
        self._end("complete")

    async def aclose(self) -> None:
        try:
            with trio.CancelScope(shield=True):
                for it in self._iterators:
                    try:
                        await it.aclose()
                    except RuntimeError:  # being iterated by another task right now
                        pass
                await self._response.aclose()
        finally:
            self._end("abandoned")

    def _end(self, how: str) -> None:
        if self._ended:
            return
        self._ended = True
        slot = self._slot
        # What was metered is charged even when the caller stopped early: the
        # upstream generated it.
        usage = self._meter.finish()
        ok: bool | None
        if how == "complete":
            ok = self._status < 400
        elif how == "broken":
            slot.lane.on_failure(slot.ticket, OutcomeKind.STREAM_BROKEN_AFTER_BYTES)
            ok = False
        else:
            ok = None
        try:
            slot.close(ok, None if usage.estimated else usage.output_tokens)
        finally:
            self._exchange.finish(self._status, usage, failed=how == "broken", note="" if how == "complete" else f" ({how})")


class _HttpxBody(_Body, httpx.AsyncByteStream):
    pass


if httpx2 is not None:

    class _Httpx2Body(_Body, httpx2.AsyncByteStream):
        pass


# ------------------------------------------------------------------ where the dispatchers live


class _Home:
    """The nursery the lane dispatchers run in: the owner's (``async with``) or a system task's."""

    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler
        self.nursery: trio.Nursery | None = None
        self.token: trio.lowlevel.TrioToken | None = None
        self.spawned = False
        self._ready = trio.Event()
        self._service_scope = trio.CancelScope()

    def claim(self) -> None:
        """Tie the transport to the current Trio run."""
        try:
            token = trio.lowlevel.current_trio_token()
        except RuntimeError:
            raise RuntimeError("SchedulingTransport runs under Trio only (trio.run)") from None
        if self.token is None:
            self.token = token
        elif self.token is not token:
            raise RuntimeError("this SchedulingTransport belongs to another Trio run; make one per trio.run")

    def adopt(self, nursery: trio.Nursery) -> None:
        self.nursery = nursery
        self.scheduler.attach(nursery)
        shared = self.scheduler.shared
        if shared is not None and not shared.started:
            # Connects in the background: requests go on local state until it is up.
            shared.started = True
            nursery.start_soon(shared.run)
        self._ready.set()

    async def ready(self) -> None:
        """Make sure the dispatchers have a home before any lane exists."""
        if self.nursery is not None:
            return
        if not self.spawned:
            self.spawned = True
            trio.lowlevel.spawn_system_task(self._service, name="hivemind_trio SchedulingTransport dispatchers")
        await self._ready.wait()

    async def _service(self) -> None:
        with self._service_scope:
            async with trio.open_nursery() as nursery:
                self.adopt(nursery)
                await trio.sleep_forever()

    def stop_service(self) -> None:
        self._service_scope.cancel()


# ------------------------------------------------------------------ the core


class _Core:
    """Everything both flavours share; ``x`` is the httpx module (httpx or httpx2)."""

    def __init__(
        self,
        x: ModuleType,
        inner: Any,
        *,
        config: Config | None,
        agent: str | None,
        priority: str | int | None,
        rpm: int,
        tpm: int,
        profiles: Mapping[str, Profile] | None,
        max_connections: int,
        seed: int | None,
    ) -> None:
        self.x = x
        self.inner = inner
        self.config = config if config is not None else Config()
        self.profiles = dict(profiles) if profiles is not None else load_profiles(self.config.server.profiles_dir or None)
        self.scheduler = Scheduler(self.config, seed=seed)
        # Per transport, never persisted: a fingerprint cannot be turned back into a key.
        shared = self.scheduler.shared
        self.salt = shared.salt() if shared is not None else secrets.token_bytes(32)
        self.defaults: dict[bytes, bytes] = {}
        if agent:
            self.defaults[b"x-hivemind-agent"] = agent.encode("utf-8")
        if priority is not None:
            p = Priority.parse(str(priority))
            if p is None:
                raise ValueError(f"priority must be critical|high|normal|low or 3..0, got {priority!r}")
            self.defaults[b"x-hivemind-priority"] = str(int(p)).encode()
        if rpm < 0 or tpm < 0:
            raise ValueError(f"rpm and tpm must be >= 0, got rpm={rpm!r} tpm={tpm!r}")
        self.rpm = rpm
        self.tpm = tpm
        if max_connections < 1:
            raise ValueError(f"max_connections must be >= 1, got {max_connections!r}")
        self.guard = trio.CapacityLimiter(max_connections)
        self.rules = self._compile_routes()
        self.home = _Home(self.scheduler)
        self.body_cls = _HttpxBody if x is httpx else _Httpx2Body
        self.closed = False
        # Entries (see the module docstring, "Where the lane dispatchers run").
        self._owner: trio.lowlevel.Task | None = None
        self._owner_depth = 0
        self._foreign = 0
        self._stack: AsyncExitStack | None = None

    def _compile_routes(self) -> list[_RouteRule]:
        """Configured upstreams lend their profile and limits to requests sent to them."""
        rules = []
        routes = [(r.url, r.profile, r.rpm, r.tpm) for r in self.config.routes]
        if self.config.upstream:
            routes.append((self.config.upstream, "", 0, 0))
        for url, profile, rpm, tpm in routes:
            if profile and profile not in self.profiles:
                raise ConfigError(f"routes: unknown profile {profile!r}; known: {', '.join(sorted(self.profiles))}")
            u = httpx.URL(url)
            rules.append(_RouteRule(u.scheme, u.netloc.decode("ascii").lower(), u.path.rstrip("/"), profile, rpm, tpm))
        # Longest base path first.
        return sorted(rules, key=lambda r: len(r.path), reverse=True)

    # -- lifecycle ------------------------------------------------------------

    def _check_open(self) -> None:
        if self.closed:
            raise RuntimeError("SchedulingTransport is closed")

    async def enter(self) -> None:
        self._check_open()
        self.home.claim()
        task = trio.lowlevel.current_task()
        if self._owner is task:
            self._owner_depth += 1
            return
        if self._owner is None and self.home.nursery is None and not self.home.spawned:
            stack = AsyncExitStack()
            nursery = await stack.enter_async_context(trio.open_nursery())
            self._stack = stack
            self._owner = task
            self._owner_depth = 1
            self.home.adopt(nursery)
            return
        self._foreign += 1

    async def exit(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> bool:
        if self._owner is not None and self._owner is trio.lowlevel.current_task():
            self._owner_depth -= 1
            if self._owner_depth:
                return False
            return await self._owner_exit(exc_type, exc, tb)
        if self._foreign:
            self._foreign -= 1
        if not self._foreign and self._owner is None:
            await self.aclose()
        return False

    async def _owner_exit(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> bool:
        stack = self._stack
        nursery = self.home.nursery
        assert stack is not None and nursery is not None
        self._owner = None
        self._stack = None
        self._foreign = 0
        self.closed = True
        self.scheduler.shut()
        nursery.cancel_scope.cancel()
        try:
            try:
                return bool(await stack.__aexit__(exc_type, exc, tb))
            except BaseExceptionGroup as group:
                # A strict nursery wraps the body's own exception: hand it back
                # unwrapped (a dispatcher crash still comes out as a group).
                if exc is not None and len(group.exceptions) == 1 and group.exceptions[0] is exc:
                    return False
                raise
        finally:
            await self._release_resources()

    async def aclose(self) -> None:
        if self.closed or self._owner is not None or self._foreign:
            # Entered: the outermost exit closes.
            return
        self.closed = True
        self.scheduler.shut()
        self.home.stop_service()
        await self._release_resources()

    async def _release_resources(self) -> None:
        try:
            self.scheduler.close()
        finally:
            with trio.CancelScope(shield=True):
                await self.inner.aclose()

    # -- one request ------------------------------------------------------------

    def _target(self, method: str, url: Any, headers: list[tuple[bytes, bytes]]) -> tuple[str, Profile, int, int]:
        """(lane route, profile, rpm, tpm) for a request: its host is the route."""
        netloc = url.netloc.decode("ascii").lower()
        path = url.path
        rpm, tpm = self.rpm, self.tpm
        profile: Profile | None = None
        for r in self.rules:
            if r.scheme == url.scheme and r.netloc == netloc and (not r.path or path == r.path or path.startswith(r.path + "/")):
                rpm = r.rpm or rpm
                tpm = r.tpm or tpm
                if r.profile:
                    profile = self.profiles[r.profile]
                break
        if profile is None:
            profile = profile_for_host(netloc, self.profiles)
            if profile.name == GENERIC:
                # An unknown host (a gateway, the mock): the request's shape decides.
                profile = detect_by_shape(method, path, headers, self.profiles) or profile
        return netloc, profile, rpm, tpm

    async def handle(self, request: Any) -> Any:
        x = self.x
        if not isinstance(request, x.Request):
            other = "SchedulingTransport2 (httpx2)" if x is httpx else "SchedulingTransport (httpx)"
            raise TypeError(f"got a {type(request).__module__}.{type(request).__name__}; use {other} with that client")
        self._check_open()
        self.home.claim()
        await self.home.ready()
        self._check_open()
        body = await request.aread()
        headers, own = h.split_own(request.headers.raw)
        for name, value in self.defaults.items():
            own.setdefault(name, value)
        route, profile, rpm, tpm = self._target(request.method, request.url, headers)
        identity = identify(headers, own, None, self.salt)
        priority = priority_of(self.config.agents, identity, own, headers)
        info = request_info(self.config.scheduler, identity, priority, body, headers)
        # Exactly what the caller built, minus our own headers; the body is the
        # same bytes, replayable for retries.
        outgoing = x.Request(request.method, request.url, headers=headers, stream=x.ByteStream(body), extensions=request.extensions)
        return await self._exchange(outgoing, route, profile, rpm, tpm, identity, info, len(body))

    async def _exchange(self, request: Any, route: str, profile: Profile, rpm: int, tpm: int, identity: Identity, info: RequestInfo, request_bytes: int) -> Any:
        sched = self.scheduler
        cfg = self.config.scheduler
        fmt = profile.error_format
        lane = sched.lane_for(route, profile, identity.credential, rpm=rpm, tpm=tpm)
        agent = sched.agent(identity.agent)
        agent.requests += 1
        agent.in_flight += 1
        agent.priority = Priority(info.priority).name.lower()
        ex = _Exchange(self, request.method, f"{request.url.scheme}://{route}{request.url.path}", lane, identity.agent, agent, info, trio.current_time())
        try:
            try:
                reservation = await sched.reserve_or_refuse(info, agent, lane)
            except errors.BudgetExhausted as err:
                return ex.answer(*err.render(fmt))
            ex.reservation = reservation
            ex.warn = bool(reservation is not None and reservation.warning)
            if cfg.retry:
                lane.retry_budget.record_request(trio.current_time())
            retry = False
            limited = 0  # attempts that ended in a 429 (they do not use up the allowance)
            while True:
                ticket = sched.new_ticket(info, lane, retry=retry)
                tq = trio.current_time()
                try:
                    await lane.wait_turn(ticket)
                except QueueTimeout as exc:
                    ex.queued += exc.waited
                    agent.queue_timeouts += 1
                    if not exc.shutting_down:
                        sched.emit("queue_timeout", agent=identity.agent, lane=lane.key, waited=round(exc.waited, 3))
                    cls = errors.Overloaded if fmt == errors.ANTHROPIC else errors.Unavailable
                    why = "the transport is closing" if exc.shutting_down else f"no upstream capacity for {exc.waited:.1f} s on '{route}'"
                    err = cls(f"hivemind_trio: {why}; try again later", headers=(("retry-after", str(int(exc.retry_after))),))
                    return ex.answer(*err.render(fmt))
                ex.queued += trio.current_time() - tq
                ex.attempts += 1
                slot = _Slot(lane, ticket, self.guard, trio.current_time())
                try:
                    response, body, outcome = await self._attempt(slot, request)
                except BreakerCancelled:
                    # Not the request's fault: back into the queue, ahead of new work.
                    ex.attempts -= 1
                    retry = True
                    continue
                except Exception as exc:
                    kind = _transport_kind(self.x, exc)
                    if kind is None:
                        raise
                    if await should_retry(sched, lane, info, Outcome.transport(kind), ex.attempts - limited, agent):
                        retry = True
                        continue
                    raise
                if body is not None:
                    # An error answer, read whole: retry it or hand it over untouched.
                    if await should_retry(sched, lane, info, outcome, ex.attempts - limited, agent):
                        retry = True
                        if response.status_code == 429:
                            limited += 1
                        continue
                    return ex.answer(response.status_code, no_retry(list(response.headers.raw), ex.attempts), body, dict(response.extensions))
                raw = list(response.headers.raw)
                meter = UsageMeter(h.get(raw, b"content-type"), h.get(raw, b"content-encoding"), request_bytes=request_bytes)
                stream = self.body_cls(self, ex, slot, response, meter)
                return self.x.Response(response.status_code, headers=raw + ex.info_headers(), stream=stream, extensions=dict(response.extensions))
        except BaseException as exc:
            # Nothing handed to the caller: no usage to charge.
            cancelled = isinstance(exc, trio.Cancelled)
            ex.finish(0, None, failed=not cancelled, note=" (cancelled)" if cancelled else f" ({type(exc).__name__})")
            raise

    async def _attempt(self, slot: _Slot, request: Any) -> tuple[Any, bytes | None, Outcome]:
        """One admitted attempt up to its response headers (and, for an error
        answer, its whole body).  The slot is released here unless a streamed
        response is returned (its body wrapper releases it then)."""
        lane, ticket = slot.lane, slot.ticket
        scope = trio.CancelScope()
        try:
            await self.guard.acquire_on_behalf_of(ticket)
            slot.guarded = True
            with scope:
                lane.watch_headers(scope)
                try:
                    response = await self.inner.handle_async_request(request)
                finally:
                    lane.unwatch_headers(scope)
            if scope.cancelled_caught:
                slot.close(None)
                raise BreakerCancelled()
            status = response.status_code
            raw = list(response.headers.raw)
            kind = StreamKind.of(raw)
            if status >= 400 and not (kind.sse or kind.ndjson):
                body = await _read_raw(response)
                outcome = lane.on_response(ticket, status, raw, body)
                slot.close(False)
                return response, body, outcome
            return response, None, lane.on_response(ticket, status, raw)
        except BaseException as exc:
            if not slot.closed:
                kind = _transport_kind(self.x, exc)
                if kind is not None:
                    lane.on_failure(ticket, kind)
                    slot.close(False)
                else:
                    slot.close(None)
            raise


# ------------------------------------------------------------------ the public flavours


class _Adapter:
    """The transport API over :class:`_Core`; ``_module`` picks httpx or httpx2."""

    _module: ModuleType

    def __init__(
        self,
        transport: Any | None = None,
        *,
        config: Config | None = None,
        agent: str | None = None,
        priority: str | int | None = None,
        rpm: int = 0,
        tpm: int = 0,
        profiles: Mapping[str, Profile] | None = None,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        seed: int | None = None,
    ) -> None:
        x = self._module
        if transport is None:
            transport = x.AsyncHTTPTransport(limits=x.Limits(max_connections=max_connections, max_keepalive_connections=max_connections))
        elif not isinstance(transport, x.AsyncBaseTransport):
            hint = "SchedulingTransport2 wraps httpx2 transports" if x is httpx else "SchedulingTransport wraps httpx transports"
            raise TypeError(
                f"transport must be an {x.__name__}.AsyncBaseTransport, got "
                f"{type(transport).__module__}.{type(transport).__name__} ({hint})"
            )
        self._core = _Core(
            x, transport, config=config, agent=agent, priority=priority, rpm=rpm, tpm=tpm,
            profiles=profiles, max_connections=max_connections, seed=seed,
        )

    @property
    def scheduler(self) -> Scheduler:
        """The scheduler (lanes, agents, budgets) behind this transport."""
        return self._core.scheduler

    def statistics(self) -> dict[str, Any]:
        """Per lane and per agent state, as in the proxy's ``/hivemind/status``."""
        return self._core.scheduler.statistics()

    async def handle_async_request(self, request: Any) -> Any:
        return await self._core.handle(request)

    async def __aenter__(self) -> Any:
        await self._core.enter()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None = None,
        exc_value: BaseException | None = None,
        traceback: TracebackType | None = None,
    ) -> bool:
        return await self._core.exit(exc_type, exc_value, traceback)

    async def aclose(self) -> None:
        await self._core.aclose()


class SchedulingTransport(_Adapter, httpx.AsyncBaseTransport):
    """An ``httpx.AsyncBaseTransport`` that schedules requests as the proxy does,
    in-process, with no HTTP hop::

        async with SchedulingTransport(agent="indexer") as transport:
            async with httpx.AsyncClient(transport=transport, timeout=600) as client:
                ...

    ``transport``: the inner async transport (default: a new
    ``httpx.AsyncHTTPTransport()``; closed with this one).  ``config``: a
    :class:`hivemind_trio.Config` (scheduler switches and limits, budgets,
    agent priority rules, info headers; ``upstream`` / ``routes`` lend their
    profile and rpm/tpm to requests sent to those URLs); default ``Config()``.
    ``agent`` / ``priority``: defaults for requests that carry no
    ``x-hivemind-agent`` / ``x-hivemind-priority`` header.  ``rpm`` / ``tpm``:
    configured limits of every lane (0 = the profile's, else learnt from the
    rate-limit headers).  ``profiles``: provider profiles (default: the
    built-in ones plus ``config.server.profiles_dir``).  ``max_connections``:
    the connection guard, no larger than the inner transport's pool.
    ``seed``: the scheduler's random generator (jitter), for reproducible runs.

    The official SDKs take only httpx2 clients: use :class:`SchedulingTransport2` there.
    """

    _module = httpx


if httpx2 is not None:

    class SchedulingTransport2(_Adapter, httpx2.AsyncBaseTransport):
        """The httpx2 flavour of :class:`SchedulingTransport` (same arguments), for
        the official SDKs (anthropic 2.x, openai 3.x), which take only httpx2 clients::

            async with SchedulingTransport2(agent="planner") as transport:
                client = anthropic.AsyncAnthropic(http_client=httpx2.AsyncClient(transport=transport, timeout=600))
        """

        _module = httpx2

else:  # pragma: no cover

    class SchedulingTransport2:  # type: ignore[no-redef]
        def __init__(self, *args: object, **kwargs: object) -> None:
            raise RuntimeError("SchedulingTransport2 needs httpx2 (pip install httpx2; the official SDKs bring it)")
