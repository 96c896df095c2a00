"""A small Redis client for Trio: URL parsing, one connection, Lua scripts.

No asyncio Redis client runs under Trio, and the proxy needs little: a
handful of commands and EVALSHA.  One :class:`Connection` carries one command
(or one pipelined batch) at a time; the shared-state layer keeps its calls
few and short, so a lock costs less than a multiplexer would.

Every exchange runs shielded under its own deadline (``timeout``): a caller
cancelled half-way (a client that left) must not leave a reply unread on the
socket, and a server that stops answering must not hold the caller longer
than the deadline.  Any failure (timeout, reset, protocol error) closes the
connection: the caller reconnects.  Error *replies* (``-ERR``) are values
of type :class:`~hivemind_trio.state.resp.RedisError`, raised by
:meth:`Connection.command` and returned in place by :meth:`Connection.pipeline`.
"""

from __future__ import annotations

import hashlib
import ssl
import urllib.parse
from typing import Any

import attrs
import trio

from .resp import NEED_DATA, Arg, Parser, ProtocolError, RedisError, encode_command

__all__ = ["Connection", "ConnectionLost", "RedisURL", "Script", "parse_redis_url"]


class ConnectionLost(Exception):
    """The connection failed or timed out; it is closed now."""


# Query parameters a `state` URL may carry, with their ranges.
_PARAMS: dict[str, tuple[type, float, float]] = {
    # Seconds a lease (one request in flight upstream) lives without a heartbeat.
    "lease_ttl": (float, 1.0, 3600.0),
    # Seconds one Redis command may take before Redis counts as unreachable.
    "timeout": (float, 0.01, 60.0),
    # Seconds between two looks at a full shared window or a half-open probe.
    "poll": (float, 0.005, 10.0),
}


@attrs.frozen
class RedisURL:
    """A parsed ``redis://[user:password@]host[:port][/db][?param=value]`` URL
    (``rediss://`` for TLS, ``unix:///path/to/socket?db=N`` for a socket)."""

    host: str = "127.0.0.1"
    port: int = 6379
    db: int = 0
    username: str | None = None
    password: str | None = attrs.field(default=None, repr=False)
    tls: bool = False
    unix_path: str | None = None
    prefix: str = "hivemind"
    lease_ttl: float = 30.0
    timeout: float = 1.0
    poll: float = 0.05

    def describe(self) -> str:
        """Where, without the password."""
        where = f"unix://{self.unix_path}" if self.unix_path else f"{'rediss' if self.tls else 'redis'}://{self.host}:{self.port}"
        return f"{where}/{self.db}"


def parse_redis_url(url: str) -> RedisURL:
    """Parse a `state` URL; ValueError says what is wrong (never echoing a password)."""
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"not a valid URL ({exc})") from None
    scheme = parts.scheme
    if scheme not in ("redis", "rediss", "unix"):
        raise ValueError('must be "" or a redis://, rediss:// or unix:// URL')
    if parts.fragment:
        raise ValueError("must not have a #fragment")
    query = urllib.parse.parse_qs(parts.query, keep_blank_values=True, strict_parsing=False)
    kwargs: dict[str, Any] = {}
    for name, values in query.items():
        if len(values) != 1:
            raise ValueError(f"query parameter {name!r} given {len(values)} times")
        raw = values[0]
        if name == "db" and scheme == "unix":
            kwargs["db"] = _db(raw)
            continue
        if name == "prefix":
            if not raw or any(c in raw for c in " {}"):
                raise ValueError(f"prefix must be a non-empty name without spaces or braces, got {raw!r}")
            kwargs["prefix"] = raw
            continue
        spec = _PARAMS.get(name)
        if spec is None:
            known = ", ".join(sorted([*_PARAMS, "prefix"] + (["db"] if scheme == "unix" else [])))
            raise ValueError(f"unknown query parameter {name!r} (known: {known})")
        _, low, high = spec
        try:
            value = float(raw)
        except ValueError:
            raise ValueError(f"{name} must be a number, got {raw!r}") from None
        if not low <= value <= high:
            raise ValueError(f"{name} must be between {low:g} and {high:g}, got {raw!r}")
        kwargs[name] = value
    user = urllib.parse.unquote(parts.username) if parts.username else None
    password = urllib.parse.unquote(parts.password) if parts.password is not None else None
    if scheme == "unix":
        if not parts.path:
            raise ValueError("a unix:// URL must name a socket path")
        return RedisURL(unix_path=parts.path, username=user, password=password, **kwargs)
    if not parts.hostname:
        raise ValueError("URL must name a host")
    path = parts.path.strip("/")
    db = _db(path) if path else 0
    return RedisURL(
        host=parts.hostname,
        port=port or 6379,
        db=db,
        username=user,
        password=password,
        tls=scheme == "rediss",
        **kwargs,
    )


def _db(raw: str) -> int:
    if not raw.isdigit() or not 0 <= int(raw) <= 65535:
        raise ValueError(f"database must be a number 0-65535, got {raw!r}")
    return int(raw)


@attrs.frozen
class Script:
    """A Lua script, run by its SHA1 (loaded on first NOSCRIPT)."""

    source: str
    sha: str = attrs.field(init=False)

    @sha.default
    def _sha(self) -> str:
        return hashlib.sha1(self.source.encode()).hexdigest()


class Connection:
    """One connection to Redis.  Use :meth:`open`."""

    def __init__(self, stream: trio.abc.Stream, url: RedisURL) -> None:
        self._stream = stream
        self._url = url
        self._parser = Parser()
        self._lock = trio.Lock()
        self.closed = False

    @classmethod
    async def open(cls, url: RedisURL) -> Connection:
        """Connect, authenticate and select the database (within ``url.timeout``)."""
        stream: trio.abc.Stream | None = None
        try:
            with trio.fail_after(url.timeout * 3):
                if url.unix_path:
                    stream = await trio.open_unix_socket(url.unix_path)
                elif url.tls:
                    stream = await trio.open_ssl_over_tcp_stream(url.host, url.port, ssl_context=ssl.create_default_context())
                else:
                    stream = await trio.open_tcp_stream(url.host, url.port)
        except (OSError, trio.TooSlowError) as exc:
            if stream is not None:
                await trio.aclose_forcefully(stream)
            raise ConnectionLost(f"cannot connect to {url.describe()}: {exc or 'timed out'}") from None
        conn = cls(stream, url)
        try:
            if url.password is not None:
                auth: list[Arg] = ["AUTH", url.username, url.password] if url.username else ["AUTH", url.password]
                await conn.command(*auth)
            if url.db:
                await conn.command("SELECT", url.db)
        except RedisError as exc:
            await conn.aclose()
            # WRONGPASS & co. name no secret; say which step failed.
            raise ConnectionLost(f"{url.describe()} refused the connection setup: {exc}") from None
        return conn

    async def aclose(self) -> None:
        self.closed = True
        await trio.aclose_forcefully(self._stream)

    async def command(self, *args: Arg) -> Any:
        """Run one command; raises RedisError on an error reply, ConnectionLost on failure."""
        (reply,) = await self.pipeline([args])
        if isinstance(reply, RedisError):
            raise reply
        return reply

    async def pipeline(self, commands: list[tuple[Arg, ...]] | list[list[Arg]]) -> list[Any]:
        """Send several commands in one write and read their replies in order."""
        if self.closed:
            raise ConnectionLost("connection is closed")
        payload = b"".join(encode_command(*c) for c in commands)
        with trio.CancelScope(shield=True):
            try:
                with trio.fail_after(self._url.timeout):
                    async with self._lock:
                        await self._stream.send_all(payload)
                        replies = []
                        while len(replies) < len(commands):
                            reply = self._parser.next_reply()
                            if reply is NEED_DATA:
                                data = await self._stream.receive_some(65536)
                                if not data:
                                    raise ConnectionLost("Redis closed the connection")
                                self._parser.feed(data)
                                continue
                            replies.append(reply)
                        return replies
            except ConnectionLost:
                await self.aclose()
                raise
            except (OSError, trio.BrokenResourceError, trio.ClosedResourceError, ProtocolError) as exc:
                await self.aclose()
                raise ConnectionLost(f"{self._url.describe()}: {exc!r}") from None
            except trio.TooSlowError:
                await self.aclose()
                raise ConnectionLost(f"{self._url.describe()}: no answer within {self._url.timeout:g} s") from None

    async def eval(self, script: Script, keys: list[Arg], args: list[Arg]) -> Any:
        """EVALSHA, falling back to EVAL (which caches the script) on NOSCRIPT."""
        try:
            return await self.command("EVALSHA", script.sha, len(keys), *keys, *args)
        except RedisError as exc:
            if exc.kind != "NOSCRIPT":
                raise
        return await self.command("EVAL", script.source, len(keys), *keys, *args)
