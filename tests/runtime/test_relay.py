"""The relay's pump/writer halves, on in-memory channels and the autojump clock."""

from __future__ import annotations

import json

import pytest
import trio

from hivemind_trio.core import errors
from hivemind_trio.runtime.relay import END_BODY, ClientAbort, RelayResult, StreamKind, _last_boundary, pump, write

SSE = StreamKind(b"text/event-stream", encoded=False, has_length=False)
NDJSON = StreamKind(b"application/x-ndjson", encoded=False, has_length=False)
OPAQUE = StreamKind(b"application/json", encoded=False, has_length=True)


async def _chunks(parts, *, fail_with=None, gap=0.0):
    for p in parts:
        if gap:
            await trio.sleep(gap)
        yield p
    if fail_with is not None:
        raise fail_with


async def _run(parts, kind, *, fail_with=None, stall=60.0, fmt=errors.ANTHROPIC, path="/v1/messages"):
    sent: list[dict] = []

    async def send(message):
        sent.append(message)

    result = RelayResult()
    s, r = trio.open_memory_channel(16)
    async with trio.open_nursery() as n:
        n.start_soon(pump, _chunks(parts, fail_with=fail_with), s, kind, stall, result)
        await write(send, r, kind, fmt, path, result)
    await send(END_BODY)
    return sent, result


def _body(sent):
    return b"".join(m["body"] for m in sent)


async def test_opaque_body_relayed_byte_for_byte():
    parts = [b"\x1f\x8b\x08", b"\x00garbage", b"", b"tail"]
    sent, result = await _run(parts, OPAQUE)
    assert _body(sent) == b"".join(parts)
    assert sent[-1] == {"type": "http.response.body", "body": b"", "more_body": False}
    assert result.bytes_sent == len(b"".join(parts))


async def test_sse_events_cut_only_at_event_boundaries():
    stream = b"event: a\ndata: 1\n\nevent: b\ndata: 2\n\nevent: c\ndata: 3\n\n"
    parts = [stream[i : i + 7] for i in range(0, len(stream), 7)]
    sent, _ = await _run(parts, SSE)
    bodies = [m["body"] for m in sent if m["body"]]
    assert b"".join(bodies) == stream
    # Every relayed piece ends on an event boundary: no torn event ever goes out.
    assert all(b.endswith(b"\n\n") for b in bodies)


async def test_trailing_partial_event_is_flushed_at_clean_end():
    sent, _ = await _run([b"data: 1\n\n", b"data: 2"], SSE)
    assert _body(sent) == b"data: 1\n\ndata: 2"


async def test_sse_broken_mid_stream_ends_with_provider_error_event():
    err = errors.UpstreamUnreachable("upstream broke the connection")
    sent, result = await _run([b"event: message_start\ndata: {}\n\nevent: content_block_delta\ndata: {\"par"], SSE, fail_with=err)
    body = _body(sent)
    # The torn event never reaches the client; an Anthropic error event closes the stream.
    assert b"{\"par" not in body
    assert body.startswith(b"event: message_start\ndata: {}\n\n")
    tail = body.split(b"\n\n")[1]
    assert tail.startswith(b"event: error\ndata: ")
    payload = json.loads(tail.split(b"data: ", 1)[1])
    assert payload["type"] == "error" and payload["error"]["type"] == "api_error"
    assert sent[-1]["more_body"] is False
    assert result.broken is err


@pytest.mark.parametrize(
    ("fmt", "path", "kind", "check"),
    [
        (errors.OPENAI, "/v1/chat/completions", SSE, lambda p: p["error"]["type"] == "server_error"),
        (errors.OPENAI, "/v1/responses", SSE, lambda p: p["type"] == "error"),
        (errors.OLLAMA, "/api/chat", NDJSON, lambda p: "error" in p),
    ],
)
async def test_mid_stream_error_event_in_each_format(fmt, path, kind, check):
    first = b"data: {}\n\n" if kind is SSE else b"{\"done\":false}\n"
    sent, _ = await _run([first], kind, fail_with=errors.UpstreamUnreachable("lost"), fmt=fmt, path=path)
    tail = _body(sent)[len(first) :]
    raw = tail.split(b"data: ", 1)[1] if kind is SSE else tail
    assert check(json.loads(raw))


async def test_break_in_length_framed_body_tears_connection():
    with pytest.RaisesGroup(ClientAbort):
        await _run([b"{\"a\":"], OPAQUE, fail_with=errors.UpstreamUnreachable("lost"))


async def test_stalled_client_releases_upstream_after_stall_limit(autojump_clock):
    """A writer that never takes chunks: the pump gives up after the stall limit."""
    result = RelayResult()
    s, r = trio.open_memory_channel(2)
    produced = 0
    upstream_closed = trio.Event()

    async def endless():
        nonlocal produced
        try:
            while True:
                produced += 1
                yield b"data: x\n\n"
                await trio.sleep(0.01)
        finally:
            upstream_closed.set()

    t0 = trio.current_time()
    async with r:
        gen = endless()
        await pump(gen, s, SSE, 60.0, result)
        await gen.aclose()
    assert result.stalled
    assert upstream_closed.is_set()
    # It waited the full stall limit (not less) and not much more.
    assert 60.0 <= trio.current_time() - t0 < 61.0
    assert produced <= 4


async def test_slow_but_reading_client_is_not_a_stall(autojump_clock):
    """A client slower than the stall limit per chunk in total, but never stuck
    for the whole limit, keeps its stream."""
    result = RelayResult()
    s, r = trio.open_memory_channel(0)
    got = []

    async def reader():
        async with r:
            async for item in r:
                got.append(item)
                await trio.sleep(30)  # each chunk takes half the stall limit

    async with trio.open_nursery() as n:
        n.start_soon(reader)
        await pump(_chunks([b"data: %d\n\n" % i for i in range(5)]), s, SSE, 60.0, result)
    assert not result.stalled
    assert len(got) == 6  # five chunks and the end marker


@pytest.mark.parametrize(
    ("buf", "sse", "cut"),
    [
        (b"", True, 0),
        (b"data: 1\n\ndata: 2", True, 9),
        (b"data: 1\r\n\r\ndata", True, 11),
        (b"a\nb\nc", False, 4),
        (b"abc", False, 0),
    ],
)
def test_last_boundary(buf, sse, cut):
    assert _last_boundary(buf, sse) == cut


def test_stream_kind_from_headers():
    k = StreamKind.of([(b"Content-Type", b"text/event-stream; charset=utf-8")])
    assert k.sse and k.event_framed
    k = StreamKind.of([(b"content-type", b"text/event-stream"), (b"content-encoding", b"gzip")])
    assert k.sse and not k.event_framed
    k = StreamKind.of([(b"content-type", b"application/x-ndjson")])
    assert k.ndjson and k.event_framed
    assert not StreamKind.of([(b"content-type", b"application/json"), (b"content-length", b"3")]).event_framed
