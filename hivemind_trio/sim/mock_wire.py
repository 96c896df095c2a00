"""What the mock provider says, per API: bodies, stream events and error shapes.

Pure functions from a :class:`ReplyPlan` to JSON-able frames; the server
module does the I/O.  A *frame* is ``(event_name | None, data)`` where data is
a dict (JSON) or a literal string (``[DONE]``); SSE APIs name their events,
Chat Completions does not, Ollama frames are NDJSON lines.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any

import attrs

# API identifiers (also the error format family they belong to).
ANTHROPIC = "anthropic"
OPENAI_CHAT = "openai.chat"
OPENAI_RESPONSES = "openai.responses"
OLLAMA_CHAT = "ollama.chat"
OLLAMA_GENERATE = "ollama.generate"

Frame = tuple[str | None, Any]


def error_format(api: str) -> str:
    """The error body family of an API: "anthropic", "openai" or "ollama"."""
    if api == ANTHROPIC:
        return "anthropic"
    if api.startswith("ollama"):
        return "ollama"
    return "openai"


@attrs.frozen
class ReplyPlan:
    """Everything needed to render one successful reply."""

    api: str
    model: str
    text: str
    deltas: tuple[str, ...]
    input_tokens: int
    output_tokens: int
    msg_id: str
    item_id: str
    created: int  # unix seconds (wall)
    include_usage: bool = False  # chat: stream_options.include_usage
    generate: bool = True  # responses: False is Codex's warm-up (no output)
    request: Any = None  # the parsed request body (echoed where the real API echoes)
    truncated: bool = False  # stopped at the request's output cap (max_tokens & co.)


def output_cap(api: str, body: Any) -> int | None:
    """The request's own limit on output tokens, in the field its API names it.

    Anthropic ``max_tokens``; chat ``max_completion_tokens`` (or the older
    ``max_tokens``); Responses ``max_output_tokens``; Ollama
    ``options.num_predict`` (negative = no limit).  Garbage is ignored: the
    mock is not the place that validates these.
    """
    if not isinstance(body, dict):
        return None
    if api == ANTHROPIC:
        value = body.get("max_tokens")
    elif api == OPENAI_CHAT:
        value = body.get("max_completion_tokens", body.get("max_tokens"))
    elif api == OPENAI_RESPONSES:
        value = body.get("max_output_tokens")
    else:
        options = body.get("options")
        value = options.get("num_predict") if isinstance(options, dict) else None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        return None
    return value


# --------------------------------------------------------------------- Anthropic


def _anthropic_usage(plan: ReplyPlan, output_tokens: int) -> dict[str, Any]:
    return {
        "input_tokens": plan.input_tokens,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
        "output_tokens": output_tokens,
    }


def _anthropic_stop(plan: ReplyPlan) -> str:
    return "max_tokens" if plan.truncated else "end_turn"


def anthropic_message(plan: ReplyPlan) -> dict[str, Any]:
    return {
        "id": plan.msg_id,
        "type": "message",
        "role": "assistant",
        "model": plan.model,
        "content": [{"type": "text", "text": plan.text}],
        "stop_reason": _anthropic_stop(plan),
        "stop_sequence": None,
        "usage": _anthropic_usage(plan, plan.output_tokens),
    }


def anthropic_frames(plan: ReplyPlan) -> list[Frame]:
    start = anthropic_message(plan) | {
        "content": [],
        "stop_reason": None,
        "usage": _anthropic_usage(plan, 1),
    }
    frames: list[Frame] = [
        ("message_start", {"type": "message_start", "message": start}),
        (
            "content_block_start",
            {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        ),
        ("ping", {"type": "ping"}),
    ]
    for delta in plan.deltas:
        frames.append(
            (
                "content_block_delta",
                {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": delta}},
            )
        )
    frames += [
        ("content_block_stop", {"type": "content_block_stop", "index": 0}),
        (
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": _anthropic_stop(plan), "stop_sequence": None},
                "usage": _anthropic_usage(plan, plan.output_tokens),
            },
        ),
        ("message_stop", {"type": "message_stop"}),
    ]
    return frames


# ------------------------------------------------------------ OpenAI chat


def _chat_usage(plan: ReplyPlan) -> dict[str, Any]:
    return {
        "prompt_tokens": plan.input_tokens,
        "completion_tokens": plan.output_tokens,
        "total_tokens": plan.input_tokens + plan.output_tokens,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


def chat_completion(plan: ReplyPlan) -> dict[str, Any]:
    return {
        "id": plan.msg_id,
        "object": "chat.completion",
        "created": plan.created,
        "model": plan.model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": plan.text, "refusal": None, "annotations": []},
                "logprobs": None,
                "finish_reason": "length" if plan.truncated else "stop",
            }
        ],
        "usage": _chat_usage(plan),
        "service_tier": "default",
        "system_fingerprint": None,
    }


def chat_frames(plan: ReplyPlan) -> list[Frame]:
    def chunk(delta: dict[str, Any], finish: str | None) -> Frame:
        data: dict[str, Any] = {
            "id": plan.msg_id,
            "object": "chat.completion.chunk",
            "created": plan.created,
            "model": plan.model,
            "service_tier": "default",
            "system_fingerprint": None,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        }
        if plan.include_usage:
            data["usage"] = None
        return (None, data)

    frames = [chunk({"role": "assistant", "content": "", "refusal": None}, None)]
    frames += [chunk({"content": d}, None) for d in plan.deltas]
    frames.append(chunk({}, "length" if plan.truncated else "stop"))
    if plan.include_usage:
        last = dict(frames[0][1], choices=[], usage=_chat_usage(plan))
        frames.append((None, last))
    frames.append((None, "[DONE]"))
    return frames


# ------------------------------------------------------- OpenAI Responses


def _responses_usage(plan: ReplyPlan, output_tokens: int) -> dict[str, Any]:
    return {
        "input_tokens": plan.input_tokens,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": output_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": plan.input_tokens + output_tokens,
    }


def _message_item(plan: ReplyPlan, status: str, text: str | None) -> dict[str, Any]:
    content = [] if text is None else [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]
    return {"id": plan.item_id, "type": "message", "status": status, "role": "assistant", "content": content}


def responses_object(plan: ReplyPlan, status: str) -> dict[str, Any]:
    req = plan.request if isinstance(plan.request, dict) else {}
    done = status in ("completed", "incomplete")
    output: list[Any] = []
    if done and plan.generate:
        output = [_message_item(plan, status, plan.text)]
    return {
        "id": plan.msg_id,
        "object": "response",
        "created_at": plan.created,
        "status": status,
        "background": False,
        "error": None,
        "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
        "instructions": req.get("instructions"),
        "max_output_tokens": req.get("max_output_tokens"),
        "model": plan.model,
        "output": output,
        "parallel_tool_calls": bool(req.get("parallel_tool_calls", True)),
        "previous_response_id": req.get("previous_response_id"),
        "reasoning": {"effort": None, "summary": None},
        "store": bool(req.get("store", True)),
        "temperature": 1.0,
        "text": {"format": {"type": "text"}},
        "tool_choice": req.get("tool_choice", "auto"),
        "tools": [],
        "top_p": 1.0,
        "truncation": "disabled",
        "usage": _responses_usage(plan, plan.output_tokens if plan.generate else 0) if done else None,
        "metadata": {},
    }


def _responses_final(plan: ReplyPlan) -> str:
    return "incomplete" if plan.truncated else "completed"


def responses_frames(plan: ReplyPlan) -> list[Frame]:
    """The event sequence of a streamed response; ``sequence_number`` counts from 0."""
    events: list[dict[str, Any]] = [
        {"type": "response.created", "response": responses_object(plan, "in_progress")},
        {"type": "response.in_progress", "response": responses_object(plan, "in_progress")},
    ]
    if plan.generate:
        where = {"item_id": plan.item_id, "output_index": 0, "content_index": 0}
        part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        events += [
            {"type": "response.output_item.added", "output_index": 0, "item": _message_item(plan, "in_progress", None)},
            {"type": "response.content_part.added", **where, "part": part},
        ]
        events += [{"type": "response.output_text.delta", **where, "delta": d, "logprobs": []} for d in plan.deltas]
        events += [
            {"type": "response.output_text.done", **where, "text": plan.text, "logprobs": []},
            {"type": "response.content_part.done", **where, "part": part | {"text": plan.text}},
            {
                "type": "response.output_item.done",
                "output_index": 0,
                "item": _message_item(plan, _responses_final(plan), plan.text),
            },
        ]
    final = _responses_final(plan)
    events.append({"type": f"response.{final}", "response": responses_object(plan, final)})
    return [(ev["type"], ev | {"sequence_number": n}) for n, ev in enumerate(events)]


# ------------------------------------------------------------------ Ollama


def _ollama_time(created: int) -> str:
    return datetime.fromtimestamp(created, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000000000Z")


def _ollama_final(plan: ReplyPlan, duration_ns: int) -> dict[str, Any]:
    return {
        "done": True,
        "done_reason": "length" if plan.truncated else "stop",
        "total_duration": duration_ns,
        "load_duration": 1_000_000,
        "prompt_eval_count": plan.input_tokens,
        "prompt_eval_duration": duration_ns // 4,
        "eval_count": plan.output_tokens,
        "eval_duration": duration_ns - duration_ns // 4,
    }


def ollama_reply(plan: ReplyPlan, duration_ns: int) -> dict[str, Any]:
    base: dict[str, Any] = {"model": plan.model, "created_at": _ollama_time(plan.created)}
    if plan.api == OLLAMA_CHAT:
        base["message"] = {"role": "assistant", "content": plan.text}
    else:
        base["response"] = plan.text
        base["context"] = [1, 2, 3]
    return base | _ollama_final(plan, duration_ns)


def ollama_frames(plan: ReplyPlan, duration_ns: int) -> list[Frame]:
    def line(text: str) -> dict[str, Any]:
        data: dict[str, Any] = {"model": plan.model, "created_at": _ollama_time(plan.created)}
        if plan.api == OLLAMA_CHAT:
            data["message"] = {"role": "assistant", "content": text}
        else:
            data["response"] = text
        return data

    frames: list[Frame] = [(None, line(d) | {"done": False}) for d in plan.deltas]
    last = line("") | _ollama_final(plan, duration_ns)
    if plan.api == OLLAMA_GENERATE:
        last["context"] = [1, 2, 3]
    frames.append((None, last))
    return frames


# ----------------------------------------------------------------- dispatch


def reply_body(plan: ReplyPlan, duration_ns: int) -> dict[str, Any]:
    if plan.api == ANTHROPIC:
        return anthropic_message(plan)
    if plan.api == OPENAI_CHAT:
        return chat_completion(plan)
    if plan.api == OPENAI_RESPONSES:
        return responses_object(plan, _responses_final(plan))
    return ollama_reply(plan, duration_ns)


def reply_frames(plan: ReplyPlan, duration_ns: int) -> list[Frame]:
    if plan.api == ANTHROPIC:
        return anthropic_frames(plan)
    if plan.api == OPENAI_CHAT:
        return chat_frames(plan)
    if plan.api == OPENAI_RESPONSES:
        return responses_frames(plan)
    return ollama_frames(plan, duration_ns)


def stream_content_type(api: str) -> str:
    return "application/x-ndjson" if api.startswith("ollama") else "text/event-stream; charset=utf-8"


def encode_frame(api: str, frame: Frame) -> bytes:
    event, data = frame
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    if api.startswith("ollama"):
        return payload.encode() + b"\n"
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {payload}\n\n".encode()


def midstream_error_frame(api: str, plan: ReplyPlan, sequence_number: int) -> Frame:
    """The provider's own way of failing a stream that already answered 200."""
    message = "Overloaded" if api == ANTHROPIC else "The server had an error while processing your request."
    if api == ANTHROPIC:
        return ("error", {"type": "error", "error": {"type": "overloaded_error", "message": message}})
    if api == OPENAI_CHAT:
        return (None, {"error": {"message": message, "type": "server_error", "param": None, "code": None}})
    if api == OPENAI_RESPONSES:
        failed = responses_object(plan, "failed") | {"error": {"code": "server_error", "message": message}}
        return (
            "response.failed",
            {"type": "response.failed", "sequence_number": sequence_number, "response": failed},
        )
    return (None, {"error": message})


# ------------------------------------------------------------------- errors

_ANTHROPIC_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    502: "api_error",
    529: "overloaded_error",
}


def error_body(fmt: str, status: int, message: str, *, request_id: str, kind: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    """An error body in a provider's format; ``kind`` overrides the type field."""
    if fmt == "anthropic":
        etype = kind or _ANTHROPIC_ERROR_TYPES.get(status, "api_error")
        return {"type": "error", "error": {"type": etype, "message": message}, "request_id": request_id}
    if fmt == "ollama":
        return {"error": message}
    etype = kind or ("server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": etype, "param": None, "code": code}}
