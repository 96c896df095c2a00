"""Upstream forwarding: routing a request to its upstream and the httpx hop.

Theory of operation
-------------------
The proxy talks to upstreams through an ``httpx.AsyncBaseTransport`` directly,
not through ``httpx.AsyncClient``: the client layer adds a cookie jar shared by
every request, default headers (User-Agent, Accept-Encoding), redirects, auth,
``trust_env`` proxy variables and body decoding, each of which would break
transparency (SPEC §3.4).  The transport sends exactly the headers we give it
and hands back the raw, still-encoded body stream.

httpcore's pool can leak a connection slot when a request that is *waiting for
a pooled connection* is cancelled (httpcore issue 1093).  Under a proxy,
cancellation is routine (client disconnects, deadlines), so every request holds
a slot of a Trio ``CapacityLimiter`` sized like the pool for its whole life,
response body included.  Nobody ever waits inside httpcore's pool, so there is
nothing there for a cancellation to leak; waiting happens on the limiter, whose
cancellation is clean.

Lower-layer exceptions (httpx/httpcore/OSError) are translated here, and only
here, into :mod:`hivemind_trio.core.errors` so the app can answer in the
provider's format.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator, Mapping

import attrs
import httpx
import trio

from ..config import Config, Route
from ..core import errors
from ..profiles import GENERIC, Profile, detect_by_shape, profile_for_host
from . import headers as h


@attrs.frozen
class Target:
    """Where one request goes."""

    route: str
    url: httpx.URL  # full upstream URL: base + forwarded path + query
    profile: Profile
    # Configured limits of the route (0 = learn them from the headers).
    rpm: int = 0
    tpm: int = 0

    @property
    def host_header(self) -> bytes:
        return self.url.netloc


@attrs.frozen
class _CompiledRoute:
    name: str
    prefix: str
    strip: bool
    base: httpx.URL
    profile: Profile
    # Neither configured nor known by the upstream's host (a local gateway,
    # the mock provider): each request's shape then picks the profile, so an
    # Anthropic client behind such an upstream still gets Anthropic errors,
    # rate-limit headers and usage parsing.
    by_shape: bool
    rpm: int
    tpm: int


class Router:
    """Maps a request to a :class:`Target`: configured routes, then the single
    configured upstream, then (only with neither) zero-config detection by the
    request's shape.  The ``Host`` header never chooses the upstream (SPEC §8.2).
    """

    def __init__(self, config: Config, profiles: Mapping[str, Profile]) -> None:
        self.profiles = profiles
        routes: list[Route] = list(config.routes)
        if config.upstream:
            routes.append(Route(name="upstream", url=config.upstream, prefix="/", strip_prefix=False))
        compiled = []
        for r in routes:
            base = httpx.URL(r.url)
            profile = profiles[r.profile] if r.profile else profile_for_host(base.netloc.decode("ascii"), profiles)
            by_shape = not r.profile and profile.name == GENERIC
            compiled.append(_CompiledRoute(r.name, r.prefix, r.strip_prefix, base, profile, by_shape, r.rpm, r.tpm))
        # Longest prefix first, so "/anthropic" wins over "/".
        self._routes = sorted(compiled, key=lambda c: len(c.prefix), reverse=True)
        self.zero_config = not self._routes

    def describe(self) -> list[dict[str, str]]:
        if self.zero_config:
            return [
                {"route": p.name, "url": p.default_upstream, "profile": p.name, "match": "request shape"}
                for p in self.profiles.values()
                if p.default_upstream
            ]
        return [
            {
                "route": r.name,
                "url": str(r.base),
                "profile": "by request shape" if r.by_shape else r.profile.name,
                "match": f"prefix {r.prefix}",
            }
            for r in self._routes
        ]

    def resolve(self, method: str, raw_path: bytes, query: bytes, headers: list[tuple[bytes, bytes]]) -> Target | None:
        path = raw_path.decode("latin-1")
        for r in self._routes:
            if _prefix_matches(path, r.prefix):
                rest = path[len(r.prefix.rstrip("/")) :] if r.strip else path
                if not rest.startswith("/"):
                    rest = "/" + rest
                profile = r.profile
                if r.by_shape:
                    profile = detect_by_shape(method, rest, headers, self.profiles) or profile
                return Target(r.name, _join(r.base, rest, query), profile, r.rpm, r.tpm)
        if not self.zero_config:
            return None
        profile = detect_by_shape(method, path, headers, self.profiles)
        if profile is None or not profile.default_upstream:
            return None
        return Target(profile.name, _join(httpx.URL(profile.default_upstream), path, query), profile)


def _prefix_matches(path: str, prefix: str) -> bool:
    if prefix in ("", "/"):
        return True
    p = prefix.rstrip("/")
    return path == p or path.startswith(p + "/")


def _join(base: httpx.URL, path: str, query: bytes) -> httpx.URL:
    base_path = base.raw_path.split(b"?", 1)[0].rstrip(b"/")
    raw = base_path + path.encode("latin-1")
    if query:
        raw += b"?" + query
    return base.copy_with(raw_path=raw)


@attrs.frozen
class UpstreamResponse:
    status: int
    headers: list[tuple[bytes, bytes]]
    stream: AsyncIterator[bytes]
    http_version: str


class Forwarder:
    """Sends requests to upstreams over one shared transport (one pool)."""

    def __init__(
        self,
        config: Config,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        s = config.server
        self._limiter = trio.CapacityLimiter(s.max_connections)
        self._own_transport = transport is None
        if transport is None:
            transport = httpx.AsyncHTTPTransport(
                verify=ssl.create_default_context(),
                http1=True,
                http2=False,
                limits=httpx.Limits(
                    max_connections=s.max_connections,
                    max_keepalive_connections=s.max_connections,
                    keepalive_expiry=30.0,
                ),
                retries=0,
            )
        self.transport = transport
        read = s.upstream_read_timeout or None
        self._timeout = {"connect": s.connect_timeout, "read": read, "write": read, "pool": None}

    def statistics(self) -> trio.CapacityLimiterStatistics:
        return self._limiter.statistics()

    async def aclose(self) -> None:
        if self._own_transport:
            await self.transport.aclose()

    def build_request(
        self, method: str, target: Target, client_headers: list[tuple[bytes, bytes]], body: bytes, *, had_length: bool
    ) -> httpx.Request:
        out = h.end_to_end(client_headers, drop=frozenset({b"host", b"content-length"}))
        out.insert(0, (b"Host", target.host_header))
        if body or had_length:
            out.append((b"Content-Length", str(len(body)).encode()))
        request = httpx.Request(method, target.url, headers=out, content=body)
        request.extensions["timeout"] = self._timeout
        return request

    def open(self, request: httpx.Request, target: Target) -> _Exchange:
        """``async with forwarder.open(req, target) as resp:`` — the pool slot is
        held until the block exits, response body included."""
        return _Exchange(self, request, target)


class _Exchange:
    def __init__(self, forwarder: Forwarder, request: httpx.Request, target: Target) -> None:
        self._f = forwarder
        self._request = request
        self._target = target
        self._response: httpx.Response | None = None

    async def __aenter__(self) -> UpstreamResponse:
        await self._f._limiter.acquire()
        try:
            try:
                response = await self._f.transport.handle_async_request(self._request)
            except httpx.TransportError as exc:
                raise translate(exc, self._target) from exc
            except OSError as exc:  # some transports leak raw socket errors
                err = errors.UpstreamUnreachable(_describe(self._target, f"network error: {exc}"))
                err.transport_kind = "reset"
                raise err from exc
        except BaseException:
            self._f._limiter.release()
            raise
        self._response = response
        return UpstreamResponse(
            status=response.status_code,
            headers=list(response.headers.raw),
            stream=_raw_chunks(response, self._target),
            http_version=response.extensions.get("http_version", b"HTTP/1.1").decode(),
        )

    async def __aexit__(self, *exc_info: object) -> None:
        try:
            if self._response is not None:
                with trio.CancelScope(shield=True):
                    await self._response.aclose()
        finally:
            self._f._limiter.release()


async def _raw_chunks(response: httpx.Response, target: Target) -> AsyncIterator[bytes]:
    """The body as the upstream sent it (still encoded), chunk by chunk."""
    stream = response.stream
    assert isinstance(stream, httpx.AsyncByteStream)
    try:
        async for chunk in stream:
            if chunk:
                yield chunk
    except httpx.TransportError as exc:
        raise translate(exc, target) from exc


def _describe(target: Target, why: str) -> str:
    return f"hivemind_trio: upstream '{target.route}' ({target.url.scheme}://{target.url.netloc.decode()}) {why}"


def translate(exc: httpx.TransportError, target: Target) -> errors.ProxyError:
    """The one place lower-layer failures become provider-format errors."""
    err: errors.ProxyError
    if isinstance(exc, httpx.ConnectTimeout):
        err = errors.UpstreamTimeout(_describe(target, "did not accept a connection in time"))
        err.transport_kind = "connect_error"
    elif isinstance(exc, httpx.ConnectError):
        err = errors.UpstreamUnreachable(_describe(target, f"is unreachable: {exc or 'connection failed'}"))
    elif isinstance(exc, httpx.TimeoutException):
        err = errors.UpstreamTimeout(_describe(target, f"timed out: {type(exc).__name__}"))
    elif isinstance(exc, (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)):
        # A peer that vanished mid-exchange (RST, or closed without a response).
        err = errors.UpstreamUnreachable(_describe(target, f"broke the connection: {exc or type(exc).__name__}"))
        err.transport_kind = "reset"
    else:
        err = errors.UpstreamUnreachable(_describe(target, f"failed: {type(exc).__name__}: {exc}"))
        err.transport_kind = "protocol_error"
    return err
