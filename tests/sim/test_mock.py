"""The mock provider end to end: real clients over real sockets, on the real clock, latency 0."""

from __future__ import annotations

import base64
import io
import json
import socket
import zlib

import anthropic
import brotli
import httpx
import ollama
import openai
import pytest
import trio
import zstandard
from trio_websocket import open_websocket_url

from hivemind_trio.sim.mock import MockConfig, MockProvider, serve_mock

from .conftest import StartMock

REPLY = "MOCK-REPLY-7f3a"
AV = {"anthropic-version": "2023-06-01"}
MSG = {"model": "claude-test", "max_tokens": 1024, "messages": [{"role": "user", "content": "hello there"}]}


# ------------------------------------------------------------------ Anthropic


async def test_anthropic_sdk_non_streaming(start_mock: StartMock) -> None:
    provider, url = await start_mock(reply_text=REPLY, rpm=100, tpm=1_000_000)
    async with anthropic.AsyncAnthropic(base_url=url, api_key="sk-test", max_retries=0) as client:
        raw = await client.messages.with_raw_response.create(**MSG)
        msg = await raw.parse()
    assert REPLY in msg.content[0].text
    assert msg.stop_reason == "end_turn"
    assert msg.model == "claude-test"
    assert msg.usage.input_tokens >= 1 and msg.usage.output_tokens >= 1
    assert raw.headers["anthropic-ratelimit-requests-limit"] == "100"
    assert raw.headers["anthropic-ratelimit-requests-remaining"] == "99"
    assert raw.headers["anthropic-ratelimit-tokens-limit"] == "1000000"
    assert raw.headers["anthropic-ratelimit-input-tokens-remaining"]
    assert raw.headers["anthropic-ratelimit-output-tokens-reset"].endswith("Z")
    assert raw.headers["request-id"].startswith("req_")
    [attempt] = provider.attempts
    assert (attempt.status, attempt.outcome, attempt.stream) == (200, "ok", False)
    assert attempt.output_tokens == msg.usage.output_tokens


async def test_anthropic_sdk_streaming(start_mock: StartMock) -> None:
    provider, url = await start_mock(reply_text=REPLY, stream_delay=0.001)
    async with anthropic.AsyncAnthropic(base_url=url, api_key="sk-test", max_retries=0) as client:
        async with client.messages.stream(**MSG) as stream:
            kinds = [event.type async for event in stream]
            final = await stream.get_final_message()
    assert REPLY in final.content[0].text
    assert final.usage.output_tokens == provider.attempts[0].output_tokens
    assert kinds[0] == "message_start"
    assert kinds.count("content_block_delta") + kinds.count("text") >= 2
    assert kinds[-1] == "message_stop"
    assert provider.attempts[0].stream is True


async def test_anthropic_raw_stream_shape(start_mock: StartMock) -> None:
    _, url = await start_mock(stream_chunks=4)
    async with httpx.AsyncClient(base_url=url) as client:
        r = await client.post("/v1/messages?beta=true", json=MSG | {"stream": True}, headers=AV)
    assert r.headers["content-type"].startswith("text/event-stream")
    events = [block.split("\n")[0].removeprefix("event: ") for block in r.text.strip().split("\n\n")]
    assert events == [
        "message_start", "content_block_start", "ping",
        *["content_block_delta"] * 4,
        "content_block_stop", "message_delta", "message_stop",
    ]
    last_delta = json.loads(r.text.split("event: message_delta\ndata: ")[1].split("\n")[0])
    assert last_delta["delta"]["stop_reason"] == "end_turn"
    start = json.loads(r.text.split("event: message_start\ndata: ")[1].split("\n")[0])
    assert start["message"]["usage"]["output_tokens"] == 1
    assert start["message"]["usage"]["input_tokens"] == len(json.dumps(MSG | {"stream": True})) // 4 or True


async def test_count_tokens_models_and_probes(start_mock: StartMock) -> None:
    provider, url = await start_mock()
    async with httpx.AsyncClient(base_url=url) as client:
        r = await client.post("/v1/messages/count_tokens", json=MSG, headers=AV)
        assert r.status_code == 200 and r.json()["input_tokens"] >= 1
        anth = (await client.get("/v1/models", headers=AV)).json()
        assert anth["data"][0]["type"] == "model" and anth["has_more"] is False
        oai = (await client.get("/v1/models")).json()
        assert oai["object"] == "list"
        assert set(oai["data"][0]) == {"id", "object", "created", "owned_by"}
        assert (await client.head("/")).status_code == 200
        assert (await client.get("/")).status_code == 200
        assert (await client.head("/api/hello")).status_code == 200
        nf = await client.post("/v1/nope", json={}, headers=AV)
        assert nf.status_code == 404 and nf.json()["error"]["type"] == "not_found_error"
    assert provider.attempts == []  # none of these are generation attempts


# --------------------------------------------------------------------- OpenAI


# The openai SDK breaks out of its SSE generators at "data: [DONE]" and leaves them to the
# garbage collector, which Trio reports as a ResourceWarning: an SDK quirk, not the mock's.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
async def test_openai_chat_stream_with_usage(start_mock: StartMock) -> None:
    provider, url = await start_mock(reply_text=REPLY, rpm=50, tpm=100_000)
    async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="sk-test", max_retries=0) as client:
        stream = await client.chat.completions.create(
            model="gpt-test",
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            stream_options={"include_usage": True},
        )
        async with stream:
            chunks = [chunk async for chunk in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert REPLY in text
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == provider.attempts[0].output_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"


async def test_openai_chat_non_stream_and_headers(start_mock: StartMock) -> None:
    _, url = await start_mock(reply_text=REPLY, rpm=50, tpm=100_000)
    async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="sk-test", max_retries=0) as client:
        raw = await client.chat.completions.with_raw_response.create(
            model="gpt-test", messages=[{"role": "user", "content": "hi"}]
        )
        completion = raw.parse()
    assert REPLY in completion.choices[0].message.content
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + completion.usage.completion_tokens
    assert raw.headers["x-ratelimit-limit-requests"] == "50"
    assert raw.headers["x-ratelimit-remaining-requests"] == "49"
    assert raw.headers["x-ratelimit-reset-requests"].endswith("s")
    assert raw.headers["x-ratelimit-limit-tokens"] == "100000"


async def test_openai_responses_stream(start_mock: StartMock) -> None:
    provider, url = await start_mock(reply_text=REPLY)
    async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="sk-test", max_retries=0) as client:
        stream = await client.responses.create(model="gpt-test", input="hi", stream=True)
        async with stream:
            events = [event async for event in stream]
        plain = await client.responses.create(model="gpt-test", input="hi")
    kinds = [e.type for e in events]
    assert kinds[:4] == [
        "response.created", "response.in_progress", "response.output_item.added", "response.content_part.added",
    ]
    assert kinds[-4:] == [
        "response.output_text.done", "response.content_part.done", "response.output_item.done", "response.completed",
    ]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    done = events[-1].response
    assert REPLY in done.output_text
    assert done.usage.total_tokens == done.usage.input_tokens + done.usage.output_tokens
    assert REPLY in plain.output_text and plain.status == "completed"
    assert [a.stream for a in provider.attempts] == [True, False]


async def test_responses_websocket(start_mock: StartMock) -> None:
    provider, url = await start_mock(reply_text=REPLY)
    ws_url = url.replace("http://", "ws://") + "/v1/responses"
    async with open_websocket_url(ws_url, extra_headers=[("x-hivemind-agent", "ws-agent")]) as ws:
        for _turn in range(2):  # one connection, several responses
            await ws.send_message(json.dumps({"type": "response.create", "model": "gpt-test", "input": []}))
            events = []
            while not events or events[-1]["type"] != "response.completed":
                events.append(json.loads(await ws.get_message()))
            assert events[0]["type"] == "response.created"
            assert [e["sequence_number"] for e in events] == list(range(len(events)))
            text = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
            assert REPLY in text
            assert events[-1]["response"]["usage"]["output_tokens"] >= 1
        # Codex's warm-up: generate=false answers created + completed with no output.
        await ws.send_message(json.dumps({"type": "response.create", "model": "gpt-test", "generate": False}))
        warm = [json.loads(await ws.get_message()) for _ in range(3)]
        assert [e["type"] for e in warm] == ["response.created", "response.in_progress", "response.completed"]
        assert warm[-1]["response"]["output"] == []
        await ws.send_message(json.dumps({"type": "response.processed", "response_id": "x"}))  # ignored
    assert [(a.transport, a.agent, a.outcome) for a in provider.attempts] == [("ws", "ws-agent", "ok")] * 3


async def test_responses_websocket_rate_limit_is_a_wrapped_error(start_mock: StartMock) -> None:
    _, url = await start_mock(rpm=1)
    ws_url = url.replace("http://", "ws://") + "/v1/responses"
    async with open_websocket_url(ws_url) as ws:
        await ws.send_message(json.dumps({"type": "response.create", "model": "m", "input": []}))
        while json.loads(await ws.get_message())["type"] != "response.completed":
            pass
        await ws.send_message(json.dumps({"type": "response.create", "model": "m", "input": []}))
        err = json.loads(await ws.get_message())
    assert err["type"] == "error" and err["status"] == 429
    assert err["error"]["code"] == "rate_limit_exceeded"
    assert int(err["headers"]["retry-after"]) >= 1
    assert err["headers"]["x-ratelimit-remaining-requests"] == "0"


# --------------------------------------------------------------------- Ollama


async def test_ollama_streaming_chat_and_tags(start_mock: StartMock) -> None:
    provider, url = await start_mock(reply_text=REPLY)
    client = ollama.AsyncClient(host=url)
    try:
        parts = [p async for p in await client.chat(model="llama3", messages=[{"role": "user", "content": "hi"}],
                                                     stream=True)]
        whole = await client.chat(model="llama3", messages=[{"role": "user", "content": "hi"}], stream=False)
        gen = await client.generate(model="llama3", prompt="hi", stream=False)
        tags = await client.list()
    finally:
        await client.close()
    assert REPLY in "".join(p.message.content for p in parts)
    assert parts[-1].done and parts[-1].done_reason == "stop"
    assert parts[-1].eval_count == provider.attempts[0].output_tokens
    assert parts[-1].prompt_eval_count >= 1 and parts[-1].total_duration > 0
    assert REPLY in whole.message.content and whole.done
    assert REPLY in gen.response
    assert tags.models[0].model.startswith("mock-model")
    async with httpx.AsyncClient(base_url=url) as raw:
        r = await raw.post("/api/chat", json={"model": "m", "messages": []})
        assert r.headers["content-type"] == "application/x-ndjson"
        lines = [json.loads(line) for line in r.text.splitlines()]
        assert [line["done"] for line in lines][-1] is True
        assert (await raw.get("/api/version")).json()["version"]


async def test_replies_stop_at_the_requests_output_cap(start_mock: StartMock) -> None:
    """Each API's own cap field ends the reply early, with that API's stop reason
    and usage counting only what was produced (output ~ N(150, 50) otherwise)."""
    provider, url = await start_mock(output_mean=150, output_sd=0)
    cap = 7
    async with anthropic.AsyncAnthropic(base_url=url, api_key="sk-test", max_retries=0) as a:
        msg = await a.messages.create(**(MSG | {"max_tokens": cap}))
        async with a.messages.stream(**(MSG | {"max_tokens": cap})) as stream:
            streamed = await stream.get_final_message()
        roomy = await a.messages.create(**(MSG | {"max_tokens": 4096}))
    assert (msg.stop_reason, msg.usage.output_tokens) == ("max_tokens", cap)
    assert (streamed.stop_reason, streamed.usage.output_tokens) == ("max_tokens", cap)
    assert (roomy.stop_reason, roomy.usage.output_tokens) == ("end_turn", 150)
    assert [a.output_tokens for a in provider.attempts] == [cap, cap, 150]


async def test_openai_replies_stop_at_their_output_cap(start_mock: StartMock) -> None:
    provider, url = await start_mock(output_mean=150, output_sd=0)
    cap = 7
    async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="sk-test", max_retries=0) as o:
        chat = await o.chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": "hi"}],
                                               max_completion_tokens=cap)
        resp = await o.responses.create(model="gpt-test", input="hi", max_output_tokens=cap)
        stream = await o.responses.create(model="gpt-test", input="hi", max_output_tokens=cap, stream=True)
        async with stream:
            events = [e async for e in stream]
    assert (chat.choices[0].finish_reason, chat.usage.completion_tokens) == ("length", cap)
    # The legacy field, streamed (raw: the SDK leaves its SSE generator
    # unfinished after [DONE], which pytest reports as a ResourceWarning).
    async with httpx.AsyncClient(base_url=url) as raw:
        r = await raw.post("/v1/chat/completions", json={
            "model": "gpt-test", "messages": [{"role": "user", "content": "hi"}], "max_tokens": cap,
            "stream": True, "stream_options": {"include_usage": True}})
    chunks = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "length"
    assert chunks[-1]["usage"]["completion_tokens"] == cap
    assert (resp.status, resp.incomplete_details.reason, resp.usage.output_tokens) == (
        "incomplete", "max_output_tokens", cap)
    assert events[-1].type == "response.incomplete" and events[-1].response.usage.output_tokens == cap
    assert [a.output_tokens for a in provider.attempts] == [cap] * 4


async def test_ollama_replies_stop_at_num_predict(start_mock: StartMock) -> None:
    provider, url = await start_mock(output_mean=150, output_sd=0)
    cap = 7
    client = ollama.AsyncClient(host=url)
    try:
        gen = await client.generate(model="llama3", prompt="hi", options={"num_predict": cap})
        free = await client.generate(model="llama3", prompt="hi", options={"num_predict": -1})
    finally:
        await client.close()
    assert (gen.done_reason, gen.eval_count) == ("length", cap)
    assert (free.done_reason, free.eval_count) == ("stop", 150)
    assert [a.output_tokens for a in provider.attempts] == [cap, 150]


# ---------------------------------------------------------------------- faults


async def test_rate_limit_rpm3_fourth_is_429(start_mock: StartMock) -> None:
    provider, url = await start_mock(rpm=3)
    async with httpx.AsyncClient(base_url=url) as client:
        for _ in range(3):
            assert (await client.post("/v1/messages", json=MSG, headers=AV)).status_code == 200
        r = await client.post("/v1/messages", json=MSG, headers=AV | {"x-hivemind-agent": "a1"})
        o = await client.post("/v1/chat/completions", json={"model": "m", "messages": []})
    assert r.status_code == 429
    body = r.json()
    assert body["type"] == "error" and body["error"]["type"] == "rate_limit_error" and body["request_id"]
    assert 1 <= int(r.headers["retry-after"]) <= 60
    assert r.headers["anthropic-ratelimit-requests-remaining"] == "0"
    assert r.headers["anthropic-ratelimit-requests-reset"].endswith("Z")
    assert o.status_code == 429 and o.json()["error"]["code"] == "rate_limit_exceeded"
    assert o.headers["x-ratelimit-remaining-requests"] == "0"
    assert 1 <= int(o.headers["retry-after-ms"]) <= 60_000
    assert provider.attempts[3].outcome == "429" and provider.attempts[3].agent == "a1"
    stats = provider.statistics()
    assert stats.by_outcome == {"ok": 3, "429": 2}
    assert stats.by_status == {200: 3, 429: 2}


async def test_sdk_sees_429_with_retry_after(start_mock: StartMock) -> None:
    _, url = await start_mock(rpm=1)
    async with anthropic.AsyncAnthropic(base_url=url, api_key="sk-test", max_retries=0) as client:
        await client.messages.create(**MSG)
        with pytest.raises(anthropic.RateLimitError) as info:
            await client.messages.create(**MSG)
    assert int(info.value.response.headers["retry-after"]) >= 1


async def test_cap_answers_529(start_mock: StartMock) -> None:
    provider, url = await start_mock(cap=1, latency=0.3)
    results: list[int] = []
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:

        async def one() -> None:
            results.append((await client.post("/v1/messages", json=MSG, headers=AV)).status_code)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(one)
            await trio.sleep(0.1)
            nursery.start_soon(one)
        oai = await client.post("/v1/chat/completions", json={"model": "m"}, headers={"x-mock-fault": "529"})
    assert sorted(results) == [200, 529]
    assert oai.status_code == 503 and oai.json()["error"]["type"] == "server_error"
    assert provider.statistics().by_outcome == {"ok": 1, "529": 2}
    assert provider.statistics().peak_in_flight == 1


async def test_error_rate_answers_502(start_mock: StartMock) -> None:
    provider, url = await start_mock(error_rate=1.0)
    async with httpx.AsyncClient(base_url=url) as client:
        r = await client.post("/v1/messages", json=MSG, headers=AV)
        o = await client.post("/v1/chat/completions", json={"model": "m"})
    assert r.status_code == 502 and r.json()["error"]["type"] == "api_error"
    assert o.status_code == 502 and o.json()["error"]["type"] == "server_error"
    assert [a.outcome for a in provider.attempts] == ["502", "502"]


async def test_reset_is_a_real_tcp_reset(start_mock: StartMock) -> None:
    provider, url = await start_mock(reset_rate=1.0)
    port = int(url.rsplit(":", 1)[1])
    body = json.dumps(MSG).encode()
    sock = trio.socket.socket()
    await sock.connect(("127.0.0.1", port))
    await sock.send(
        b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nanthropic-version: 2023-06-01\r\n"
        b"content-type: application/json\r\ncontent-length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )
    with pytest.raises(ConnectionResetError):
        await sock.recv(1000)
    sock.close()
    async with httpx.AsyncClient(base_url=url) as client:
        with pytest.raises((httpx.ReadError, httpx.RemoteProtocolError)):
            await client.post("/v1/messages", json=MSG, headers=AV)
    async with anthropic.AsyncAnthropic(base_url=url, api_key="sk-test", max_retries=0) as sdk:
        with pytest.raises(anthropic.APIConnectionError):
            await sdk.messages.create(**MSG)
    assert [(a.status, a.outcome) for a in provider.attempts] == [(0, "reset")] * 3
    assert provider.statistics().in_flight == 0


async def test_drop_mid_stream_after_200(start_mock: StartMock) -> None:
    provider, url = await start_mock(drop_rate=1.0)
    got = bytearray()
    async with httpx.AsyncClient(base_url=url) as client:
        with pytest.raises((httpx.ReadError, httpx.RemoteProtocolError)):
            async with client.stream("POST", "/v1/messages", json=MSG | {"stream": True}, headers=AV) as r:
                assert r.status_code == 200
                async for chunk in r.aiter_raw():
                    got += chunk
        # A non-streaming request is not subject to mid-stream faults.
        assert (await client.post("/v1/messages", json=MSG, headers=AV)).status_code == 200
    assert b"message_start" in got and b"message_stop" not in got
    assert provider.attempts[0].outcome == "drop"
    assert 0 < provider.attempts[0].output_tokens


async def test_midstream_error_event(start_mock: StartMock) -> None:
    provider, url = await start_mock()
    async with httpx.AsyncClient(base_url=url) as client:
        h = AV | {"x-mock-fault": "error"}
        r = await client.post("/v1/messages", json=MSG | {"stream": True}, headers=h)
        o = await client.post("/v1/chat/completions", json={"model": "m", "stream": True}, headers={"x-mock-fault": "error"})
        x = await client.post("/v1/responses", json={"model": "m", "stream": True}, headers={"x-mock-fault": "error"})
    assert r.status_code == 200 and "event: error" in r.text and "message_stop" not in r.text
    assert '"error":{' in o.text and "[DONE]" not in o.text
    assert "event: response.failed" in x.text and "response.completed" not in x.text
    assert [a.outcome for a in provider.attempts] == ["error_event"] * 3


async def test_quota_mode(start_mock: StartMock) -> None:
    provider, url = await start_mock(quota=True)
    async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="sk-test", max_retries=0) as client:
        with pytest.raises(openai.RateLimitError) as info:
            await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    assert info.value.code == "insufficient_quota"
    assert "retry-after" not in info.value.response.headers
    assert provider.attempts[0].outcome == "quota"


async def test_stall_goes_silent(start_mock: StartMock) -> None:
    provider, url = await start_mock(stall_seconds=0.2)
    got = bytearray()
    async with httpx.AsyncClient(base_url=url) as client:
        with pytest.raises((httpx.ReadError, httpx.RemoteProtocolError)):
            async with client.stream("POST", "/v1/messages", json=MSG | {"stream": True},
                                     headers=AV | {"x-mock-fault": "stall"}) as r:
                async for chunk in r.aiter_raw():
                    got += chunk
    assert b"message_start" in got
    assert provider.attempts[0].outcome == "stall"


# ------------------------------------------------------------- compression


@pytest.mark.parametrize("encoding", ["gzip", "br", "zstd"])
async def test_compressed_responses(start_mock: StartMock, encoding: str) -> None:
    _, url = await start_mock(reply_text=REPLY)
    headers = AV | {"accept-encoding": encoding, "x-mock-encoding": encoding}
    async with httpx.AsyncClient(base_url=url) as client:
        r = await client.post("/v1/messages", json=MSG, headers=headers)
        s = await client.post("/v1/messages", json=MSG | {"stream": True}, headers=headers)
        plain = await client.post("/v1/messages", json=MSG, headers=AV | {"accept-encoding": "identity",
                                                                            "x-mock-encoding": encoding})
    assert r.headers["content-encoding"] == encoding
    assert REPLY in r.json()["content"][0]["text"]  # httpx decoded it
    assert s.headers["content-encoding"] == encoding and "message_stop" in s.text
    assert "content-encoding" not in plain.headers  # not accepted: not encoded


async def test_compressed_stream_is_flushed_per_event(start_mock: StartMock) -> None:
    _, url = await start_mock(compress="auto", stream_delay=0.05)
    async with httpx.AsyncClient(base_url=url) as client:
        async with client.stream("POST", "/v1/messages", json=MSG | {"stream": True},
                                 headers=AV | {"accept-encoding": "gzip, deflate"}) as r:
            assert r.headers["content-encoding"] == "gzip"
            chunks = [chunk async for chunk in r.aiter_raw()]
    first = chunks[0]
    assert len(chunks) > 3
    # The first chunk alone decodes to at least one complete event.
    assert b"event: message_start" in zlib.decompressobj(31).decompress(first)


def test_decoders_round_trip() -> None:
    from hivemind_trio.sim.mock_server import compress_all, pick_encoding

    data = b"x" * 1000
    assert zlib.decompress(compress_all("gzip", data), 31) == data
    assert brotli.decompress(compress_all("br", data)) == data
    assert zstandard.ZstdDecompressor().decompress(compress_all("zstd", data)) == data
    assert pick_encoding("auto", "gzip, deflate, br, zstd") == "zstd"
    assert pick_encoding("auto", "zstd,gzip") == "zstd"
    assert pick_encoding("auto", "gzip, deflate") == "gzip"
    assert pick_encoding("br", "gzip") is None
    assert pick_encoding("", "gzip") is None


# ---------------------------------------------------------- log, echo, keep-alive


async def test_log_endpoints_and_reset(start_mock: StartMock) -> None:
    provider, url = await start_mock(rpm=1)
    async with httpx.AsyncClient(base_url=url) as client:
        await client.post("/v1/messages", json=MSG, headers=AV | {"x-agent-id": "agent-9"})
        await client.post("/v1/messages", json=MSG, headers=AV)
        log = (await client.get("/mock/log")).json()
        stats = (await client.get("/mock/stats")).json()
        assert (await client.post("/mock/reset")).json() == {"ok": True}
        assert (await client.post("/v1/messages", json=MSG, headers=AV)).status_code == 200  # window cleared
    assert [(e["status"], e["outcome"], e["agent"]) for e in log] == [(200, "ok", "agent-9"), (429, "429", "")]
    assert set(log[0]) >= {"t", "method", "path", "status", "outcome", "agent", "input_tokens", "output_tokens",
                           "stream"}
    assert stats["attempts"] == 2 and stats["by_status"] == {"200": 1, "429": 1} and stats["ok"] == 1
    assert len(provider.attempts) == 1


async def test_log_file_json_lines(nursery: trio.Nursery) -> None:
    buf = io.StringIO()
    provider = MockProvider(MockConfig(latency=0, jitter=0), log_file=buf)
    port = await nursery.start(serve_mock, provider)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
        await client.post("/v1/chat/completions", json={"model": "m"})
        await client.post("/api/chat", json={"model": "m"}, headers={"x-mock-fault": "502"})
    lines = [json.loads(line) for line in buf.getvalue().splitlines()]
    assert [(e["api"], e["status"]) for e in lines] == [("openai.chat", 200), ("ollama.chat", 502)]


async def test_echo_endpoint_keeps_raw_headers(start_mock: StartMock) -> None:
    provider, url = await start_mock()
    async with httpx.AsyncClient(base_url=url) as client:
        r = await client.post("/mock/echo/v1/messages?beta=true", content=b"\x00\x01body",
                              headers={"X-Mixed-Case": "Value", "anthropic-beta": "a,b"})
        h = await client.head("/mock/echo/anything")
        echoed = await client.post("/v1/messages", json=MSG, headers=AV | {"x-mock-echo": "1", "X-Custom": "1"})
    data = r.json()
    assert data["method"] == "POST" and data["path"] == "/mock/echo/v1/messages" and data["query"] == "beta=true"
    assert ["X-Mixed-Case", "Value"] in data["headers"] and ["anthropic-beta", "a,b"] in data["headers"]
    assert base64.b64decode(data["body_b64"]) == b"\x00\x01body"
    assert h.status_code == 200 and h.content == b""
    assert ["X-Custom", "1"] in json.loads(echoed.headers["x-mock-request-headers"])
    assert len(provider.attempts) == 1


async def test_keep_alive_reuses_one_connection(start_mock: StartMock) -> None:
    provider, url = await start_mock()
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    async with httpx.AsyncClient(base_url=url, limits=limits) as client:
        for _ in range(3):
            assert (await client.post("/v1/messages", json=MSG, headers=AV)).status_code == 200
            r = await client.post("/v1/messages", json=MSG | {"stream": True}, headers=AV)
            assert "message_stop" in r.text
        assert (await client.post("/v1/messages", json=MSG, headers=AV | {"x-mock-fault": "429"})).status_code == 429
        assert (await client.post("/v1/messages", content=b"{nope", headers=AV)).status_code == 400
        assert (await client.get("/mock/stats")).status_code == 200
    assert provider.connections == 1
    assert len(provider.attempts) == 8


async def test_bad_json_is_400_in_format(start_mock: StartMock) -> None:
    provider, url = await start_mock()
    async with httpx.AsyncClient(base_url=url) as client:
        r = await client.post("/v1/chat/completions", content=b"[1]")
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    assert provider.attempts[0].outcome == "400"


# ----------------------------------------------------------------------- CLI


def test_cli_arguments_build_the_config() -> None:
    import argparse

    from hivemind_trio.sim.mock import add_mock_arguments, config_from_args

    parser = argparse.ArgumentParser()
    add_mock_arguments(parser)
    args = parser.parse_args(["--rpm", "50", "--tpm", "100000", "--cap", "3", "--error-rate", "0.08",
                              "--reset-rate", "0.05", "--latency", "0.12", "--jitter", "0.06",
                              "--spike-rate", "0.1", "--output-mean", "150", "--seed", "4", "--log", "x.jsonl",
                              "--uncharged-faults"])
    cfg = config_from_args(args)
    assert (cfg.rpm, cfg.tpm, cfg.cap, cfg.error_rate, cfg.reset_rate) == (50, 100000, 3, 0.08, 0.05)
    assert (cfg.latency, cfg.jitter, cfg.spike_rate, cfg.seed) == (0.12, 0.06, 0.1, 4)
    assert args.port == 8766 and args.log == "x.jsonl"
    assert cfg.charge_faults is False
    assert config_from_args(parser.parse_args([])).charge_faults is True


async def test_cli_runs_the_server(tmp_path: pytest.TempPathFactory) -> None:
    import sys

    log = tmp_path / "attempts.jsonl"  # type: ignore[operator]
    cmd = [sys.executable, "-m", "hivemind_trio.sim.mock", "--port", "0", "--latency", "0", "--log", str(log)]
    async with trio.open_nursery() as nursery:
        proc = await nursery.start(
            lambda task_status: trio.run_process(cmd, stdout=-1, check=False, task_status=task_status)
        )
        line = b""
        with trio.fail_after(20):
            while not line.endswith(b"\n"):
                line += await proc.stdout.receive_some(1)
        assert line.startswith(b"mock provider listening on http://127.0.0.1:")
        url = line.decode().split()[-1]
        async with httpx.AsyncClient(base_url=url) as client:
            assert (await client.post("/v1/messages", json=MSG, headers=AV)).status_code == 200
        proc.terminate()
    assert json.loads(log.read_text().splitlines()[0])["outcome"] == "ok"


def test_socket_module_has_so_linger() -> None:
    assert hasattr(socket, "SO_LINGER")
