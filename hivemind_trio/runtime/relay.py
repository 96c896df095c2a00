"""Relaying one upstream response to the ASGI client.

Theory of operation
-------------------
Two tasks per response, joined by a small memory channel:

* the *pump* owns the upstream exchange (and so the pool slot): it reads raw
  chunks and puts them in the channel;
* the *writer* (the ASGI handler's own task) takes chunks out and calls
  Hypercorn's ``send``.

They are split because Hypercorn writes to the socket inside a shielded cancel
scope: a client that stops reading blocks ``send`` and no cancel scope around
it can bound that.  The pump is not blocked by the socket, only by the channel;
when the channel stays full for ``stall_timeout`` the pump gives up, closes the
upstream stream and frees its slot (SPEC §3.7) while the writer stays parked in
Hypercorn until the socket dies.

Event streams (SSE, NDJSON) that are not content-encoded are relayed at event
boundaries: bytes after the last complete event wait for the rest of their event.
No event is delayed by that (a client cannot act on half an event), and if the
upstream breaks mid-stream the client holds complete events only, followed by a
provider-format error event, instead of a torn one.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing

import attrs
import trio

from ..core import errors

Send = Callable[[dict], Awaitable[None]]

# What the pump hands the writer.
_END = object()


@attrs.frozen
class _Broken:
    error: errors.ProxyError


@attrs.frozen
class StreamKind:
    """How a response body is framed, decided from the response alone."""

    content_type: bytes
    encoded: bool
    has_length: bool

    @property
    def sse(self) -> bool:
        return self.content_type.startswith(b"text/event-stream")

    @property
    def ndjson(self) -> bool:
        return self.content_type.startswith((b"application/x-ndjson", b"application/jsonl", b"application/json-seq"))

    @property
    def event_framed(self) -> bool:
        return (self.sse or self.ndjson) and not self.encoded and not self.has_length

    @classmethod
    def of(cls, headers: list[tuple[bytes, bytes]]) -> StreamKind:
        ctype = b""
        encoded = False
        has_length = False
        for k, v in headers:
            low = k.lower()
            if low == b"content-type":
                ctype = v.strip().lower()
            elif low == b"content-encoding" and v.strip().lower() not in (b"", b"identity"):
                encoded = True
            elif low == b"content-length":
                has_length = True
        return cls(ctype, encoded, has_length)


def _last_boundary(buf: bytes, sse: bool) -> int:
    """Index just past the last complete event in ``buf`` (0 if none)."""
    if not sse:
        i = buf.rfind(b"\n")
        return i + 1 if i >= 0 else 0
    best = 0
    for sep in (b"\n\n", b"\r\n\r\n", b"\r\r"):
        i = buf.rfind(sep)
        if i >= 0:
            best = max(best, i + len(sep))
    return best


@attrs.define
class RelayResult:
    bytes_sent: int = 0
    chunks: int = 0
    stalled: bool = False
    broken: errors.ProxyError | None = None
    first_byte_at: float | None = None
    client_gone: bool = False


async def pump(
    chunks: AsyncIterator[bytes],
    out: trio.MemorySendChannel,
    kind: StreamKind,
    stall_timeout: float,
    result: RelayResult,
) -> None:
    """Move upstream chunks into ``out``; returns when the body ends, breaks or stalls."""
    held = b""
    framed = kind.event_framed
    async with out, aclosing(chunks):
        try:
            async for chunk in chunks:
                if framed:
                    buf = held + chunk
                    cut = _last_boundary(buf, kind.sse)
                    held = buf[cut:]
                    chunk = buf[:cut]
                    if not chunk:
                        continue
                if not await _put(out, chunk, stall_timeout):
                    result.stalled = True
                    return
            if held and not await _put(out, held, stall_timeout):
                result.stalled = True
                return
        except errors.ProxyError as exc:
            result.broken = exc
            with trio.move_on_after(stall_timeout):
                await out.send(_Broken(exc))
            return
        with trio.move_on_after(stall_timeout):
            await out.send(_END)


async def _put(out: trio.MemorySendChannel, item: object, stall_timeout: float) -> bool:
    with trio.move_on_after(stall_timeout):
        await out.send(item)
        return True
    return False


class ClientAbort(Exception):
    """The response cannot be completed cleanly; make Hypercorn drop the connection."""


async def write(
    send: Send,
    items: trio.MemoryReceiveChannel,
    kind: StreamKind,
    fmt: str,
    path: str,
    result: RelayResult,
) -> None:
    """The writer half: relay chunks; raises :class:`ClientAbort` if the body
    cannot be completed.  The caller sends the final empty body message
    (:data:`END_BODY`) once it has left any cancel scope a disconnect watcher
    could cancel: Hypercorn closes a ``Connection: close`` socket *inside*
    that ``send``, and a cancellation landing there leaves the socket open.
    """
    ended = False
    async with items:
        async for item in items:
            if item is _END:
                ended = True
                break
            if isinstance(item, _Broken):
                if kind.event_framed:
                    # Complete events went out; end with an error event the SDK understands.
                    await send(
                        {
                            "type": "http.response.body",
                            "body": errors.stream_error_event(fmt, path, item.error.message),
                            "more_body": True,
                        }
                    )
                    ended = True
                    break
                raise ClientAbort(item.error.message)
            if result.first_byte_at is None:
                result.first_byte_at = trio.current_time()
            result.bytes_sent += len(item)
            result.chunks += 1
            await send({"type": "http.response.body", "body": item, "more_body": True})
    if not ended:
        # The pump stalled or was cancelled: the body is incomplete.
        raise ClientAbort("upstream stream did not complete")


END_BODY = {"type": "http.response.body", "body": b"", "more_body": False}
