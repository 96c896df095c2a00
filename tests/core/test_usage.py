"""Incremental usage metering of responses (SPEC §6, PROTOCOLS.md).

Payloads are shaped like the providers' real responses.  Every expectation is
an exact number, so a parser that adds instead of overwriting, takes the first
value instead of the last, or miscounts the fallback estimate fails.
"""

from __future__ import annotations

import gzip
import json
import random
import zlib

import brotli
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hivemind_trio.core.usage import MAX_LINE, Decoder, Usage, UsageMeter, UsageParser

SSE = "text/event-stream"
NDJSON = "application/x-ndjson"
JSON = "application/json"


def dumps(obj: object) -> str:
    # Raw UTF-8 (not \u escapes), like the providers send, so multi-byte characters are on the wire.
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def sse(obj: object, event: str | None = None) -> bytes:
    head = f"event: {event}\n" if event else ""
    body = obj if isinstance(obj, str) else dumps(obj)
    return f"{head}data: {body}\n\n".encode()


def crlf(data: bytes) -> bytes:
    return data.replace(b"\n", b"\r\n")


def parse(data: bytes, content_type: str | None, pieces: list[bytes] | None = None, **kw: object) -> Usage:
    p = UsageParser(content_type, **kw)  # type: ignore[arg-type]
    for piece in pieces if pieces is not None else [data]:
        p.feed(piece)
    return p.finish()


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(max(c, 0), len(data)) for c in cuts})
    out, prev = [], 0
    for c in points:
        out.append(data[prev:c])
        prev = c
    out.append(data[prev:])
    return out


# ---------------------------------------------------------------- Anthropic payloads

ANTHROPIC_START_USAGE = {
    "input_tokens": 472,
    "cache_creation_input_tokens": 1536,
    "cache_read_input_tokens": 20480,
    "cache_creation": {"ephemeral_5m_input_tokens": 1536, "ephemeral_1h_input_tokens": 0},
    "output_tokens": 2,
    "service_tier": "standard",
}


def a_start(usage: dict | None = None) -> bytes:
    return sse(
        {
            "type": "message_start",
            "message": {
                "id": "msg_01XFDUDYJgAACzvnptvVoYEL",
                "type": "message",
                "role": "assistant",
                "content": [],
                "model": "claude-sonnet-4-5-20250929",
                "stop_reason": None,
                "stop_sequence": None,
                "usage": ANTHROPIC_START_USAGE if usage is None else usage,
            },
        },
        "message_start",
    )


def a_block_start(index: int = 0) -> bytes:
    return sse(
        {"type": "content_block_start", "index": index, "content_block": {"type": "text", "text": ""}},
        "content_block_start",
    )


def a_text(text: str, index: int = 0) -> bytes:
    return sse(
        {"type": "content_block_delta", "index": index, "delta": {"type": "text_delta", "text": text}},
        "content_block_delta",
    )


def a_block_stop(index: int = 0) -> bytes:
    return sse({"type": "content_block_stop", "index": index}, "content_block_stop")


def a_delta(usage: dict, stop_reason: str = "end_turn") -> bytes:
    return sse(
        {
            "type": "message_delta",
            "delta": {"stop_reason": stop_reason, "stop_sequence": None},
            "usage": usage,
        },
        "message_delta",
    )


A_PING = sse({"type": "ping"}, "ping")
A_STOP = sse({"type": "message_stop"}, "message_stop")

ANTHROPIC_STREAM = b"".join(
    [
        a_start(),
        a_block_start(),
        A_PING,
        a_text("Héllo, wörld ✓ "),
        a_text("日本語のテキスト 🚀"),
        A_PING,
        a_text(" — done."),
        a_block_stop(),
        a_delta({"output_tokens": 87}),
        A_STOP,
    ]
)


# ---------------------------------------------------------------- OpenAI chat payloads

CHAT_ID = "chatcmpl-B9MBs8CjcvOU2jLn4n570S5qMJKcT"


def chat_chunk(delta: dict, finish: str | None = None, usage: object = "absent") -> bytes:
    obj: dict = {
        "id": CHAT_ID,
        "object": "chat.completion.chunk",
        "created": 1741570283,
        "model": "gpt-4o-2024-08-06",
        "service_tier": "default",
        "system_fingerprint": "fp_fc9f1d7035",
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
    }
    if usage != "absent":
        obj["usage"] = usage
    return sse(obj)


CHAT_USAGE = {
    "prompt_tokens": 1117,
    "completion_tokens": 46,
    "total_tokens": 1163,
    "prompt_tokens_details": {"cached_tokens": 1024, "audio_tokens": 0},
    "completion_tokens_details": {
        "reasoning_tokens": 0,
        "audio_tokens": 0,
        "accepted_prediction_tokens": 0,
        "rejected_prediction_tokens": 0,
    },
}


def chat_body_chunks(with_usage_field: bool) -> list[bytes]:
    # With include_usage, OpenAI puts "usage": null on every ordinary chunk.
    u: object = None if with_usage_field else "absent"
    return [
        chat_chunk({"role": "assistant", "content": "", "refusal": None}, usage=u),
        chat_chunk({"content": "Bonjour"}, usage=u),
        chat_chunk({"content": " à tous — "}, usage=u),
        chat_chunk({"content": "你好 👋"}, usage=u),
        chat_chunk({}, finish="stop", usage=u),
    ]


CHAT_USAGE_CHUNK = sse(
    {
        "id": CHAT_ID,
        "object": "chat.completion.chunk",
        "created": 1741570283,
        "model": "gpt-4o-2024-08-06",
        "service_tier": "default",
        "system_fingerprint": "fp_fc9f1d7035",
        "choices": [],
        "usage": CHAT_USAGE,
    }
)
DONE = b"data: [DONE]\n\n"

CHAT_STREAM_WITH_USAGE = b"".join(chat_body_chunks(True)) + CHAT_USAGE_CHUNK + DONE
CHAT_STREAM_NO_USAGE = b"".join(chat_body_chunks(False)) + DONE


# ---------------------------------------------------------------- OpenAI Responses payloads

RESP_ID = "resp_67ccd2bed1ec8190b14f964abc0542670bb6a6b452d3795b"
RESP_USAGE = {
    "input_tokens": 5321,
    "input_tokens_details": {"cached_tokens": 4864},
    "output_tokens": 212,
    "output_tokens_details": {"reasoning_tokens": 128},
    "total_tokens": 5533,
}


def resp_obj(status: str, usage: object) -> dict:
    return {
        "id": RESP_ID,
        "object": "response",
        "created_at": 1741476542,
        "status": status,
        "model": "gpt-5-codex",
        "output": [],
        "parallel_tool_calls": True,
        "usage": usage,
    }


def resp_event(kind: str, seq: int, **fields: object) -> bytes:
    return sse({"type": kind, "sequence_number": seq, **fields}, kind)


def responses_stream(terminal: str = "response.completed", status: str = "completed", usage: object = None) -> bytes:
    usage = RESP_USAGE if usage is None else usage
    item = "msg_67ccd2bf17f0819081ff3bb2cf6508e60bb6a6b452d3795b"
    return b"".join(
        [
            resp_event("response.created", 0, response=resp_obj("in_progress", None)),
            resp_event("response.in_progress", 1, response=resp_obj("in_progress", None)),
            resp_event(
                "response.output_item.added",
                2,
                output_index=0,
                item={"id": item, "type": "message", "status": "in_progress", "role": "assistant", "content": []},
            ),
            resp_event("response.output_text.delta", 3, item_id=item, output_index=0, content_index=0, delta="Voilà "),
            resp_event("response.output_text.delta", 4, item_id=item, output_index=0, content_index=0, delta="— ✓ ok"),
            resp_event("response.output_text.done", 5, item_id=item, output_index=0, content_index=0, text="Voilà — ✓ ok"),
            resp_event(terminal, 6, response=resp_obj(status, usage)),
        ]
    )


RESPONSES_STREAM = responses_stream()


# ---------------------------------------------------------------- Ollama payloads


def ollama_line(obj: dict) -> bytes:
    return dumps(obj).encode() + b"\n"


def ollama_chunk(content: str) -> bytes:
    return ollama_line(
        {
            "model": "llama3.2",
            "created_at": "2025-03-09T22:49:02.123456Z",
            "message": {"role": "assistant", "content": content},
            "done": False,
        }
    )


OLLAMA_FINAL = {
    "model": "llama3.2",
    "created_at": "2025-03-09T22:49:06.987654Z",
    "message": {"role": "assistant", "content": ""},
    "done_reason": "stop",
    "done": True,
    "total_duration": 4883583458,
    "load_duration": 1334875,
    "prompt_eval_count": 26,
    "prompt_eval_duration": 342546000,
    "eval_count": 282,
    "eval_duration": 4535599000,
}

OLLAMA_STREAM = b"".join(
    [ollama_chunk("Le "), ollama_chunk("ciel est bleu ☀️"), ollama_chunk(" à cause de la diffusion."), ollama_line(OLLAMA_FINAL)]
)


# ---------------------------------------------------------------- vLLM payloads


def vllm_chunk(content: str | None, completion: int, finish: str | None = None) -> bytes:
    choices = [] if content is None else [{"index": 0, "delta": {"content": content}, "logprobs": None, "finish_reason": finish, "stop_reason": None}]
    return sse(
        {
            "id": "chatcmpl-0d3f3a7e4c9b4c6f9e2f1a3b5c7d9e1f",
            "object": "chat.completion.chunk",
            "created": 1741570999,
            "model": "meta-llama/Llama-3.1-8B-Instruct",
            "choices": choices,
            "usage": {"prompt_tokens": 31, "total_tokens": 31 + completion, "completion_tokens": completion},
        }
    )


VLLM_STREAM = b"".join(
    [
        vllm_chunk("", 0),
        vllm_chunk("Über", 1),
        vllm_chunk(" the", 2),
        vllm_chunk(" rainbow ñ", 4),
        vllm_chunk("", 5, finish="stop"),
        DONE,
    ]
)


# ================================================================ Anthropic


def test_anthropic_stream_message_delta_overwrites_output() -> None:
    u = parse(ANTHROPIC_STREAM, SSE)
    assert u == Usage(
        input_tokens=472,
        output_tokens=87,  # not 2 + 87
        cache_creation_input_tokens=1536,
        cache_read_input_tokens=20480,
        estimated=False,
        source="anthropic",
    )
    assert u.total_tokens == 472 + 87 + 1536 + 20480
    assert u.all_input_tokens == 472 + 1536 + 20480


def test_anthropic_last_message_delta_wins_and_non_null_fields_override_start() -> None:
    stream = b"".join(
        [
            a_start(),
            a_block_start(),
            a_text("Let me check."),
            a_block_stop(),
            # A first cumulative delta, then a later one: the last one wins, nothing is added.
            a_delta(
                {
                    "input_tokens": 480,
                    "cache_creation_input_tokens": None,
                    "cache_read_input_tokens": 20480,
                    "output_tokens": 40,
                },
                stop_reason="pause_turn",
            ),
            a_delta(
                {
                    "input_tokens": None,
                    "cache_creation_input_tokens": 1600,
                    "cache_read_input_tokens": None,
                    "output_tokens": 95,
                    "server_tool_use": {"web_search_requests": 1},
                }
            ),
            A_STOP,
        ]
    )
    assert parse(stream, SSE) == Usage(
        input_tokens=480,  # from the first delta; the second's null does not reset it
        output_tokens=95,  # the last delta, not 2 + 40 + 95
        cache_creation_input_tokens=1600,  # start's 1536 overridden by the last delta
        cache_read_input_tokens=20480,  # not doubled
        estimated=False,
        source="anthropic",
    )


def test_anthropic_pings_and_unknown_events_are_ignored() -> None:
    noisy = b"".join(
        [
            b": keep-alive comment\n\n",
            a_start(),
            A_PING,
            sse({"type": "some_future_event", "detail": {"x": 1}}, "some_future_event"),
            a_block_start(),
            a_text("Hi"),
            A_PING,
            # An event the parser does not know, even one carrying a "usage" object, changes nothing.
            sse(
                {"type": "message_usage_preview", "usage": {"input_tokens": 1, "output_tokens": 1}},
                "message_usage_preview",
            ),
            a_block_stop(),
            a_delta({"output_tokens": 87}),
            A_STOP,
        ]
    )
    assert parse(noisy, SSE) == parse(ANTHROPIC_STREAM, SSE)


def test_anthropic_error_event_mid_stream_keeps_real_input_and_estimates_output() -> None:
    stream = b"".join(
        [
            a_start(),
            a_block_start(),
            A_PING,
            a_text("Partial "),
            a_text("answer "),
            a_text("…"),
            sse({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}, "error"),
        ]
    )
    u = parse(stream, SSE, request_bytes=90_000)
    # 7 events carried data (start, block start, ping, 3 deltas, error): output estimate 7 > start's 2.
    assert u == Usage(
        input_tokens=472,
        output_tokens=7,
        cache_creation_input_tokens=1536,
        cache_read_input_tokens=20480,
        estimated=True,
        source="anthropic",
    )


def test_anthropic_start_output_kept_when_larger_than_chunks_seen() -> None:
    start = dict(ANTHROPIC_START_USAGE, output_tokens=50)
    u = parse(a_start(start) + a_block_start(), SSE)
    assert (u.output_tokens, u.estimated, u.input_tokens) == (50, True, 472)


def test_anthropic_stream_without_trailing_blank_line() -> None:
    cut = ANTHROPIC_STREAM[: -len(A_STOP)].rstrip(b"\n")  # ends right after the message_delta's data line
    assert parse(cut, SSE) == parse(ANTHROPIC_STREAM, SSE)


def test_anthropic_non_streaming_body() -> None:
    body = dumps(
        {
            "id": "msg_013Zva2CMHLNnXjNJJKqJ2EF",
            "type": "message",
            "role": "assistant",
            "model": "claude-sonnet-4-5-20250929",
            "content": [{"type": "text", "text": "Hi! My name is Claude. ✓"}],
            "stop_reason": "end_turn",
            "stop_sequence": None,
            "usage": {
                "input_tokens": 2095,
                "cache_creation_input_tokens": 0,
                "cache_read_input_tokens": 12288,
                "output_tokens": 503,
            },
        }
    ).encode()
    expected = Usage(2095, 503, 0, 12288, False, "anthropic")
    assert parse(body, JSON) == expected
    assert parse(body, "application/json; charset=utf-8") == expected
    assert parse(body, None) == expected  # sniffed


# ================================================================ OpenAI chat


def test_openai_chat_stream_final_usage_chunk() -> None:
    u = parse(CHAT_STREAM_WITH_USAGE, SSE, request_bytes=50_000)
    # prompt_tokens includes the cached part; reported disjoint.
    assert u == Usage(
        input_tokens=1117 - 1024,
        output_tokens=46,
        cache_creation_input_tokens=0,
        cache_read_input_tokens=1024,
        estimated=False,
        source="openai_chat",
    )
    assert u.total_tokens == 1163


def test_openai_chat_stream_without_include_usage_is_estimated() -> None:
    u = parse(CHAT_STREAM_NO_USAGE, SSE, request_bytes=4099)
    # input = 4099 // 4; output = the 5 data chunks ([DONE] not counted).
    assert u == Usage(input_tokens=1024, output_tokens=5, estimated=True, source="estimate")


def test_openai_chat_mid_stream_error_is_estimated() -> None:
    stream = b"".join(chat_body_chunks(True)[:3]) + sse(
        {"error": {"message": "The server had an error while processing your request.", "type": "server_error", "param": None, "code": None}}
    )
    assert parse(stream, SSE, request_bytes=400) == Usage(100, 4, 0, 0, True, "estimate")


def test_openai_chat_non_streaming_body() -> None:
    body = dumps(
        {
            "id": CHAT_ID,
            "object": "chat.completion",
            "created": 1741570283,
            "model": "gpt-4o-2024-08-06",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "Bonjour ! 👋", "refusal": None, "annotations": []},
                    "logprobs": None,
                    "finish_reason": "stop",
                }
            ],
            "usage": {
                "prompt_tokens": 19,
                "completion_tokens": 10,
                "total_tokens": 29,
                "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
                "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0},
            },
            "service_tier": "default",
            "system_fingerprint": "fp_6ec83003ad",
        }
    ).encode()
    assert parse(body, JSON) == Usage(19, 10, 0, 0, False, "openai_chat")


def test_non_streaming_body_without_usage_is_estimated_from_bytes() -> None:
    body = b'{"id":"x","object":"chat.completion","choices":[]}' + b" " * 50  # 100 bytes
    assert len(body) == 100
    assert parse(body, JSON, request_bytes=81) == Usage(20, 25, 0, 0, True, "estimate")


def test_json_lines_sent_as_application_json() -> None:
    assert parse(OLLAMA_STREAM, JSON) == Usage(26, 282, 0, 0, False, "ollama")


# ================================================================ OpenAI Responses


def test_responses_stream_completed() -> None:
    u = parse(RESPONSES_STREAM, SSE)
    assert u == Usage(
        input_tokens=5321 - 4864,
        output_tokens=212,
        cache_creation_input_tokens=0,
        cache_read_input_tokens=4864,
        estimated=False,
        source="openai_responses",
    )
    assert u.total_tokens == 5533


@pytest.mark.parametrize(
    ("terminal", "status"), [("response.incomplete", "incomplete"), ("response.failed", "failed")]
)
def test_responses_stream_incomplete_and_failed_carry_usage(terminal: str, status: str) -> None:
    usage = {"input_tokens": 900, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": 4096, "total_tokens": 4996}
    assert parse(responses_stream(terminal, status, usage), SSE) == Usage(900, 4096, 0, 0, False, "openai_responses")


def test_responses_stream_cut_before_terminal_event_is_estimated() -> None:
    cut = RESPONSES_STREAM[: RESPONSES_STREAM.index(b"event: response.completed")]
    # The non-terminal events' "usage": null is not usage; 6 events seen.
    assert parse(cut, SSE, request_bytes=2000) == Usage(500, 6, 0, 0, True, "estimate")


def test_responses_non_streaming_body() -> None:
    body = dumps(resp_obj("completed", RESP_USAGE)).encode()
    assert parse(body, JSON) == Usage(457, 212, 0, 4864, False, "openai_responses")


# ================================================================ Ollama


def test_ollama_ndjson_done_line() -> None:
    assert parse(OLLAMA_STREAM, NDJSON, request_bytes=1000) == Usage(26, 282, 0, 0, False, "ollama")


def test_ollama_generate_stream_and_missing_prompt_count() -> None:
    final = {k: v for k, v in OLLAMA_FINAL.items() if k not in ("message", "prompt_eval_count")}
    stream = b"".join(
        [
            ollama_line({"model": "llama3.2", "created_at": "2025-03-09T22:49:02Z", "response": "Hé", "done": False}),
            ollama_line(dict(final, response="", context=[1, 2, 3])),
        ]
    )
    assert parse(stream, NDJSON) == Usage(0, 282, 0, 0, False, "ollama")


def test_ollama_stream_cut_before_done_is_estimated() -> None:
    cut = OLLAMA_STREAM[: OLLAMA_STREAM.rindex(b'{"model"')]
    assert parse(cut, NDJSON, request_bytes=403) == Usage(100, 3, 0, 0, True, "estimate")


def test_ollama_non_streaming_body() -> None:
    body = dumps(OLLAMA_FINAL).encode()
    assert parse(body, JSON) == Usage(26, 282, 0, 0, False, "ollama")


# ================================================================ vLLM


def test_vllm_continuous_usage_takes_the_last_value() -> None:
    u = parse(VLLM_STREAM, SSE)
    # Cumulative on every chunk: the last (31, 5), never the sum.
    assert u == Usage(31, 5, 0, 0, False, "openai_chat")


def test_vllm_continuous_usage_with_final_usage_chunk() -> None:
    stream = VLLM_STREAM[: -len(DONE)] + vllm_chunk(None, 5) + DONE
    assert parse(stream, SSE) == Usage(31, 5, 0, 0, False, "openai_chat")


# ================================================================ usage available while streaming


def test_result_is_available_mid_stream() -> None:
    p = UsageParser(SSE, request_bytes=8)
    assert p.result() == Usage(2, 0, 0, 0, True, "estimate")
    p.feed(a_start())
    assert p.result() == Usage(472, 2, 1536, 20480, True, "anthropic")
    p.feed(a_block_start() + a_text("x") + a_block_stop())
    assert p.result().output_tokens == 4  # estimate: 4 events seen
    p.feed(a_delta({"output_tokens": 87}))
    assert p.result() == Usage(472, 87, 1536, 20480, False, "anthropic")
    final = p.finish()
    p.feed(a_delta({"output_tokens": 999}))  # after finish: ignored
    assert p.finish() is final and p.result() is final


# ================================================================ compression

FORMATS = {
    "anthropic": (ANTHROPIC_STREAM, SSE, Usage(472, 87, 1536, 20480, False, "anthropic")),
    "anthropic_crlf": (crlf(ANTHROPIC_STREAM), SSE, Usage(472, 87, 1536, 20480, False, "anthropic")),
    "openai_chat": (CHAT_STREAM_WITH_USAGE, SSE, Usage(93, 46, 0, 1024, False, "openai_chat")),
    "openai_chat_estimate": (CHAT_STREAM_NO_USAGE, SSE, Usage(250, 5, 0, 0, True, "estimate")),
    "responses": (RESPONSES_STREAM, SSE, Usage(457, 212, 0, 4864, False, "openai_responses")),
    "responses_crlf": (crlf(RESPONSES_STREAM), SSE, Usage(457, 212, 0, 4864, False, "openai_responses")),
    "ollama": (OLLAMA_STREAM, NDJSON, Usage(26, 282, 0, 0, False, "ollama")),
    "ollama_crlf": (crlf(OLLAMA_STREAM), NDJSON, Usage(26, 282, 0, 0, False, "ollama")),
    "vllm": (VLLM_STREAM, SSE, Usage(31, 5, 0, 0, False, "openai_chat")),
    "anthropic_body": (
        dumps({"type": "message", "content": [{"type": "text", "text": "¡Hola! ✓"}], "usage": {"input_tokens": 12, "output_tokens": 7}}).encode(),
        JSON,
        Usage(12, 7, 0, 0, False, "anthropic"),
    ),
    # No content type: sniffed, with a UTF-8 byte order mark in front.
    "sniffed_bom_sse": (b"\xef\xbb\xbf" + ANTHROPIC_STREAM, None, Usage(472, 87, 1536, 20480, False, "anthropic")),
    "sniffed_bom_json": (
        b"\xef\xbb\xbf" + dumps(resp_obj("completed", RESP_USAGE)).encode(),
        None,
        Usage(457, 212, 0, 4864, False, "openai_responses"),
    ),
}
REQUEST_BYTES = 1000


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_formats_table_is_right(name: str) -> None:
    data, ctype, expected = FORMATS[name]
    assert parse(data, ctype, request_bytes=REQUEST_BYTES) == expected


def _zstd_frames(data: bytes) -> bytes:
    # Several frames, as a streaming server that flushes a frame per event would send.
    cctx = zstandard.ZstdCompressor()
    half = len(data) // 2
    return cctx.compress(data[:half]) + cctx.compress(data[half:])


def _gzip_sync_flushed(data: bytes) -> bytes:
    # How a server compresses a stream on the fly: a sync flush after every write.
    c = zlib.compressobj(6, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    out = b"".join(c.compress(data[i : i + 64]) + c.flush(zlib.Z_SYNC_FLUSH) for i in range(0, len(data), 64))
    return out + c.flush()


def _raw_deflate(data: bytes) -> bytes:
    c = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    return c.compress(data) + c.flush()


ENCODERS = {
    "gzip": ("gzip", gzip.compress),
    "x-gzip": ("x-gzip", gzip.compress),
    "gzip_sync_flushed": ("gzip", _gzip_sync_flushed),
    "gzip_multi_member": ("gzip", lambda d: gzip.compress(d[:100]) + gzip.compress(d[100:])),
    "deflate_zlib": ("deflate", zlib.compress),
    "deflate_raw": ("deflate", _raw_deflate),
    "br": ("br", brotli.compress),
    "zstd": ("zstd", lambda d: zstandard.ZstdCompressor().compress(d)),
    "zstd_frames": ("zstd", _zstd_frames),
    # Applied in the order listed: deflate first, then gzip.
    "deflate_then_gzip": ("deflate, gzip", lambda d: gzip.compress(zlib.compress(d))),
    "br_then_zstd_upper": ("BR, Zstd", lambda d: zstandard.ZstdCompressor().compress(brotli.compress(d))),
    "identity": ("identity", lambda d: d),
}


@pytest.mark.parametrize("fmt", ["anthropic", "openai_chat", "responses", "ollama", "anthropic_body"])
@pytest.mark.parametrize("enc", sorted(ENCODERS))
@pytest.mark.parametrize("piece", [1, 7, 4096])
def test_compressed_bodies_give_the_same_usage(fmt: str, enc: str, piece: int) -> None:
    data, ctype, expected = FORMATS[fmt]
    header, compress = ENCODERS[enc]
    raw = compress(data)
    if enc != "identity":
        assert raw != data
    meter = UsageMeter(ctype, header, request_bytes=REQUEST_BYTES)
    for i in range(0, len(raw), piece):
        meter.feed(raw[i : i + piece])
    assert meter.finish() == expected
    assert meter.raw_bytes == len(raw)
    assert not meter.decoder.failed


def test_compressed_stream_usage_visible_before_end() -> None:
    # A server compressing SSE on the fly sync-flushes after each event.
    c = zlib.compressobj(6, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    events = [ev + b"\n\n" for ev in ANTHROPIC_STREAM.split(b"\n\n")[:-1]]
    flushed = [c.compress(ev) + c.flush(zlib.Z_SYNC_FLUSH) for ev in events]
    meter = UsageMeter(SSE, "gzip")
    meter.feed(flushed[0])  # message_start only
    assert meter.result() == Usage(472, 2, 1536, 20480, True, "anthropic")
    for piece in flushed[1:-1]:
        meter.feed(piece)  # up to the message_delta
    assert meter.result() == Usage(472, 87, 1536, 20480, False, "anthropic")
    meter.feed(flushed[-1] + c.flush())
    assert meter.finish() == Usage(472, 87, 1536, 20480, False, "anthropic")


@pytest.mark.parametrize(
    ("header", "raw"),
    [
        ("gzip", b"\x1f\x8b\x08\x00garbage that is not deflate data at all" * 3),
        ("br", b"\xff\xfe not brotli " * 10),
        ("zstd", b"not a zstd frame" * 5),
        ("compress", ANTHROPIC_STREAM),  # an encoding it cannot undo
        ("gzip", ANTHROPIC_STREAM),  # labelled gzip but plain
    ],
)
def test_undecodable_body_gives_an_estimate(header: str, raw: bytes) -> None:
    meter = UsageMeter(SSE, header, request_bytes=4000)
    for i in range(0, len(raw), 13):
        meter.feed(raw[i : i + 13])
    u = meter.finish()
    assert u.estimated and u.source == "estimate"
    assert u.input_tokens == 1000
    assert meter.decoder.failed


def test_gzip_trailing_junk_keeps_what_was_decoded() -> None:
    raw = gzip.compress(ANTHROPIC_STREAM) + b"\x00\x01junk after the member"
    meter = UsageMeter(SSE, "gzip")
    meter.feed(raw)
    assert meter.finish() == Usage(472, 87, 1536, 20480, False, "anthropic")


def test_decoder_bomb_limit() -> None:
    d = Decoder("gzip", max_output=1000)
    out = d.decode(gzip.compress(b"a" * 10_000))
    assert out == b"" and d.failed
    assert d.decode(gzip.compress(b"b")) == b""
    assert Decoder(None).identity and Decoder(b"identity").identity and not Decoder("gzip").identity


# ================================================================ chunking independence

CHUNK_CASES = sorted(FORMATS)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from(CHUNK_CASES), data=st.data())
def test_any_chunking_gives_the_same_usage(name: str, data: st.DataObject) -> None:
    body, ctype, expected = FORMATS[name]
    cuts = data.draw(st.lists(st.integers(0, len(body)), max_size=60), label="cuts")
    pieces = split_at(body, cuts)
    assert b"".join(pieces) == body
    assert parse(body, ctype, pieces, request_bytes=REQUEST_BYTES) == expected


@settings(max_examples=40, deadline=None)
@given(name=st.sampled_from(["anthropic", "responses", "ollama", "openai_chat"]), enc=st.sampled_from(["gzip", "br", "zstd", "deflate_raw"]), data=st.data())
def test_any_chunking_of_compressed_bytes_gives_the_same_usage(name: str, enc: str, data: st.DataObject) -> None:
    body, ctype, expected = FORMATS[name]
    header, compress = ENCODERS[enc]
    raw = compress(body)
    cuts = data.draw(st.lists(st.integers(0, len(raw)), max_size=40), label="cuts")
    meter = UsageMeter(ctype, header, request_bytes=REQUEST_BYTES)
    for piece in split_at(raw, cuts):
        meter.feed(piece)
    assert meter.finish() == expected


@pytest.mark.parametrize("name", CHUNK_CASES)
def test_every_two_piece_split_and_byte_at_a_time(name: str) -> None:
    """Exhaustive: each cut point, so every mid-UTF-8-character and mid-CRLF cut is tried."""
    body, ctype, expected = FORMATS[name]
    for i in range(len(body) + 1):
        assert parse(body, ctype, [body[:i], body[i:]], request_bytes=REQUEST_BYTES) == expected, i
    assert parse(body, ctype, [body[i : i + 1] for i in range(len(body))], request_bytes=REQUEST_BYTES) == expected


def test_cases_do_contain_tricky_cut_points() -> None:
    body = FORMATS["anthropic_crlf"][0]
    assert b"\r\n" in body
    assert any(b >= 0xC0 for b in body)  # UTF-8 lead bytes (multi-byte characters)
    assert "🚀".encode() in body  # a 4-byte character


# Streams with a line longer than max_line: the line is dropped whatever the chunking.
SMALL_MAX_LINE = 600
LONG_TEXT = "x" * 700 + "é" * 50
LONG_LINE_CASES = {
    "anthropic": (
        b"".join([a_start(), a_block_start(), a_text(LONG_TEXT), a_text("short"), a_block_stop(), a_delta({"output_tokens": 87}), A_STOP]),
        SSE,
        Usage(472, 87, 1536, 20480, False, "anthropic"),
    ),
    # The usage line itself is too long: dropped, so the result is an estimate (5 lines seen).
    "ollama_long_final": (
        b"".join([ollama_chunk("a"), ollama_chunk("b"), ollama_line(dict(OLLAMA_FINAL, context=list(range(200))))]),
        NDJSON,
        Usage(250, 2, 0, 0, True, "estimate"),
    ),
    "ollama_long_middle": (
        b"".join([ollama_chunk("a"), ollama_chunk(LONG_TEXT), ollama_chunk("b"), ollama_line(OLLAMA_FINAL)]),
        NDJSON,
        Usage(26, 282, 0, 0, False, "ollama"),
    ),
    "chat_long_crlf": (
        crlf(b"".join([chat_chunk({"content": LONG_TEXT}), CHAT_USAGE_CHUNK, DONE])),
        SSE,
        Usage(93, 46, 0, 1024, False, "openai_chat"),
    ),
}


@pytest.mark.parametrize("name", sorted(LONG_LINE_CASES))
def test_long_line_cases_are_what_they_claim(name: str) -> None:
    body, ctype, expected = LONG_LINE_CASES[name]
    lines = body.split(b"\n")
    assert max(len(line) for line in lines) > SMALL_MAX_LINE
    assert parse(body, ctype, request_bytes=REQUEST_BYTES, max_line=SMALL_MAX_LINE) == expected
    # With the default limit nothing is dropped.
    assert not parse(body, ctype, request_bytes=REQUEST_BYTES).estimated


@settings(max_examples=60, deadline=None)
@given(name=st.sampled_from(sorted(LONG_LINE_CASES)), data=st.data())
def test_long_lines_dropped_whatever_the_chunking(name: str, data: st.DataObject) -> None:
    body, ctype, expected = LONG_LINE_CASES[name]
    cuts = data.draw(st.lists(st.integers(0, len(body)), max_size=60), label="cuts")
    pieces = split_at(body, cuts)
    assert parse(body, ctype, pieces, request_bytes=REQUEST_BYTES, max_line=SMALL_MAX_LINE) == expected


# ================================================================ robustness


def test_empty_body_is_an_estimate() -> None:
    for ctype in (SSE, NDJSON, JSON, None, "text/html"):
        p = UsageParser(ctype, request_bytes=4003)
        p.feed(b"")
        assert p.finish() == Usage(1000, 0, 0, 0, True, "estimate")
    meter = UsageMeter(SSE, "gzip", request_bytes=8)
    assert meter.finish() == Usage(2, 0, 0, 0, True, "estimate")


def test_garbage_bytes_are_an_estimate() -> None:
    rng = random.Random(1234)
    junk = bytes(rng.randrange(256) for _ in range(20_000)).replace(b"{", b"(")
    for ctype in (SSE, NDJSON, JSON, None):
        u = parse(junk, ctype, request_bytes=400)
        assert u.estimated and u.source == "estimate" and u.input_tokens == 100


def test_html_error_page_with_json_content_type() -> None:
    body = b"<html><body><h1>504 Gateway Time-out</h1></body></html>\n"
    assert len(body) == 56
    assert parse(body, JSON, request_bytes=40) == Usage(10, 14, 0, 0, True, "estimate")


def test_truncated_non_streaming_body_is_estimated_from_its_bytes() -> None:
    # A long non-streaming generation cut off mid-body: not one JSON document,
    # so it is re-read as JSON lines, but the output estimate stays bytes / 4.
    full = dumps(
        {
            "id": CHAT_ID,
            "object": "chat.completion",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "mot " * 2000}}],
            "usage": {"prompt_tokens": 50, "completion_tokens": 2000, "total_tokens": 2050},
        }
    ).encode()
    cut = full[:8000]
    assert parse(cut, JSON, [cut[:3000], cut[3000:]], request_bytes=200) == Usage(50, 2000, 0, 0, True, "estimate")


def test_malformed_json_lines_are_skipped() -> None:
    stream = b"".join(
        [
            b'data: {"usage": {"prompt_tokens": 5, "completion_tokens"\n\n',  # truncated JSON
            b'data: {"usage": {"prompt_tokens": "many", "completion_tokens": -3}}\n\n',  # wrong types
            b'data: {"usage": {"prompt_tokens": true, "completion_tokens": 1.5}}\n\n',
            b'data: ["usage"]\n\n',  # not an object
            b"data: \xff\xfe\"usage\"\n\n",  # not UTF-8
            b'data: {"usage": 12}\n\n',
            b"data: [DONE]\n\n",
        ]
    )
    assert parse(stream, SSE, request_bytes=12) == Usage(3, 6, 0, 0, True, "estimate")
    # ... and a good usage chunk after them is still read.
    assert parse(stream[: -len(DONE)] + CHAT_USAGE_CHUNK + DONE, SSE) == Usage(93, 46, 0, 1024, False, "openai_chat")


def test_malformed_ndjson_lines_are_skipped() -> None:
    stream = b'{"done": true, "eval_count": 5\n{"done": "yes", "eval_count": 5}\nnot json "eval_count"\n' + ollama_line(OLLAMA_FINAL)
    assert parse(stream, NDJSON) == Usage(26, 282, 0, 0, False, "ollama")


def test_integral_float_counts_are_accepted() -> None:
    body = b'{"object":"chat.completion","usage":{"prompt_tokens":10.0,"completion_tokens":3}}'
    assert parse(body, JSON) == Usage(10, 3, 0, 0, False, "openai_chat")


def test_huge_line_beyond_default_max_line() -> None:
    huge = b'data: {"usage": {"prompt_tokens": 999999, "completion_tokens": 999999}, "pad": "' + b"z" * (MAX_LINE + 10) + b'"}\n\n'
    # The huge line is dropped (not parsed), the stream resynchronises after it.
    stream = b"".join(chat_body_chunks(False)[:2]) + huge + CHAT_USAGE_CHUNK + DONE
    pieces = [stream[i : i + 65536] for i in range(0, len(stream), 65536)]
    assert parse(stream, SSE, pieces) == Usage(93, 46, 0, 1024, False, "openai_chat")
    # Alone, it leaves only an estimate.
    assert parse(huge, SSE, request_bytes=40) == Usage(10, 0, 0, 0, True, "estimate")


def test_body_beyond_max_body_is_estimated() -> None:
    body = dumps({"object": "chat.completion", "usage": {"prompt_tokens": 10, "completion_tokens": 3}, "pad": "p" * 1000}).encode()
    u = parse(body, JSON, [body[:500], body[500:]], request_bytes=40, max_body=800)
    assert u == Usage(10, len(body) // 4, 0, 0, True, "estimate")


@settings(max_examples=200, deadline=None)
@given(
    body=st.binary(max_size=2000),
    ctype=st.sampled_from([SSE, NDJSON, JSON, None, "text/plain"]),
    encoding=st.sampled_from([None, "gzip", "deflate", "br", "zstd", "bogus"]),
    request_bytes=st.integers(0, 10**6),
    cuts=st.lists(st.integers(0, 2000), max_size=10),
)
def test_never_raises_on_arbitrary_bytes(body: bytes, ctype: str | None, encoding: str | None, request_bytes: int, cuts: list[int]) -> None:
    meter = UsageMeter(ctype, encoding, request_bytes=request_bytes)
    for piece in split_at(body, cuts):
        meter.feed(piece)
        meter.result()
    u = meter.finish()
    assert isinstance(u, Usage)
    assert min(u.input_tokens, u.output_tokens, u.cache_creation_input_tokens, u.cache_read_input_tokens) >= 0


@settings(max_examples=100, deadline=None)
@given(
    prefix=st.lists(st.sampled_from([b"data: {\n", b"\n", b"event: x\n", b'data: {"usage": {\n', b"\r\n", b": c\n", b"\xe2\x9c"]), max_size=8),
    name=st.sampled_from(["anthropic", "responses", "openai_chat", "vllm"]),
)
def test_junk_before_a_stream_does_not_hide_its_usage(prefix: list[bytes], name: str) -> None:
    body, ctype, expected = FORMATS[name]
    # Junk then a blank line (dispatches whatever the junk built up), then the real stream.
    assert parse(b"".join(prefix) + b"\n\n" + body, ctype, request_bytes=REQUEST_BYTES) == expected
