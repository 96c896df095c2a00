"""RESP2, the Redis wire protocol, sans-io (encoder and incremental parser).

Theory of operation
-------------------
A command is an array of bulk strings: ``*<n>\\r\\n`` then, per argument,
``$<len>\\r\\n<bytes>\\r\\n``.  Replies are one of five types, told apart by
their first byte: ``+`` simple string, ``-`` error, ``:`` integer, ``$``
bulk string (``$-1`` = nil), ``*`` array (``*-1`` = nil; elements are any
reply, nested).

:class:`Parser` is fed whatever bytes arrive (``feed``) and hands out whole
replies in order (``next_reply``), or :data:`NEED_DATA` while the buffer
holds only part of one.  Nothing is consumed until a whole reply is there, so
a reply split across any number of reads parses the same as one read (the
property tests check exactly that).  Error replies come back as
:class:`RedisError` *values*, not raised: the caller decides (a script's
``NOSCRIPT`` is a normal answer to EVALSHA).
"""

from __future__ import annotations

from typing import Any, Union

__all__ = ["NEED_DATA", "Parser", "ProtocolError", "RedisError", "encode_command"]


class ProtocolError(Exception):
    """The server sent something that is not RESP2."""


class RedisError(Exception):
    """An error reply (``-ERR ...``, ``-NOSCRIPT ...``, ``-WRONGPASS ...``)."""

    @property
    def kind(self) -> str:
        return str(self).split(" ", 1)[0]


class _NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Any = _NeedData()

Arg = Union[bytes, str, int, float]


def _arg(value: Arg) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, bool):
        raise TypeError("booleans are not Redis arguments; pass 0/1")
    if isinstance(value, int):
        return str(value).encode()
    if isinstance(value, float):
        return repr(value).encode()
    raise TypeError(f"not a Redis argument: {value!r}")


def encode_command(*args: Arg) -> bytes:
    """One command as RESP2 bytes."""
    parts = [b"*%d\r\n" % len(args)]
    for a in args:
        b = _arg(a)
        parts.append(b"$%d\r\n" % len(b))
        parts.append(b)
        parts.append(b"\r\n")
    return b"".join(parts)


# Deeper nesting than this is not a Redis reply we asked for.
_MAX_DEPTH = 32


class Parser:
    """Incremental RESP2 reply parser."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> None:
        self._buf += data

    def next_reply(self) -> Any:
        """The next whole reply, or :data:`NEED_DATA`."""
        try:
            value, end = self._parse(0, 0)
        except _Incomplete:
            return NEED_DATA
        del self._buf[:end]
        return value

    def _line(self, pos: int) -> tuple[bytes, int]:
        end = self._buf.find(b"\r\n", pos)
        if end < 0:
            raise _Incomplete
        return bytes(self._buf[pos:end]), end + 2

    def _int(self, raw: bytes) -> int:
        try:
            return int(raw)
        except ValueError:
            raise ProtocolError(f"bad length or integer {raw!r}") from None

    def _parse(self, pos: int, depth: int) -> tuple[Any, int]:
        if depth > _MAX_DEPTH:
            raise ProtocolError("reply nested too deeply")
        if pos >= len(self._buf):
            raise _Incomplete
        kind = self._buf[pos : pos + 1]
        line, pos = self._line(pos + 1)
        if kind == b"+":
            return line, pos
        if kind == b"-":
            return RedisError(line.decode("utf-8", "replace")), pos
        if kind == b":":
            return self._int(line), pos
        if kind == b"$":
            n = self._int(line)
            if n == -1:
                return None, pos
            if n < 0:
                raise ProtocolError(f"bad bulk length {n}")
            if len(self._buf) < pos + n + 2:
                raise _Incomplete
            if self._buf[pos + n : pos + n + 2] != b"\r\n":
                raise ProtocolError("bulk string not terminated by CRLF")
            return bytes(self._buf[pos : pos + n]), pos + n + 2
        if kind == b"*":
            n = self._int(line)
            if n == -1:
                return None, pos
            if n < 0:
                raise ProtocolError(f"bad array length {n}")
            items = []
            for _ in range(n):
                item, pos = self._parse(pos, depth + 1)
                items.append(item)
            return items, pos
        raise ProtocolError(f"unknown reply type {bytes(kind)!r}")


class _Incomplete(Exception):
    pass
