"""The proxy's own errors, each rendered in the provider's error format.

One hierarchy: every error the proxy itself answers with (as opposed to relaying
the upstream's) is a :class:`ProxyError`.  It knows its HTTP status, a kind per
error format, and renders itself as (status, headers, body) for the format of
the lane it happened on, so an SDK parses it like any error from its provider.
Lower-layer exceptions (httpx, OSError, h11) are translated in one place, the
forwarder, into these.
"""

from __future__ import annotations

import json
import secrets
from typing import ClassVar

# Error formats a profile can name.
ANTHROPIC = "anthropic"
OPENAI = "openai"
OLLAMA = "ollama"
PLAIN = "plain"
FORMATS = (ANTHROPIC, OPENAI, OLLAMA, PLAIN)

# Anthropic error "type" per status (PROTOCOLS.md).
_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    502: "api_error",
    503: "overloaded_error",
    504: "api_error",
    529: "overloaded_error",
}

# OpenAI error "type" per status.
_OPENAI_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    403: "invalid_request_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_exceeded",
    500: "server_error",
    502: "server_error",
    503: "server_error",
    504: "server_error",
}


def render_error(
    fmt: str,
    status: int,
    message: str,
    *,
    code: str | None = None,
    extra_headers: tuple[tuple[str, str], ...] = (),
) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """Return (status, headers, body) for an error in provider format ``fmt``."""
    if fmt == ANTHROPIC:
        body = {
            "type": "error",
            "error": {"type": _ANTHROPIC_TYPES.get(status, "api_error"), "message": message},
            "request_id": "req_hm_" + secrets.token_hex(12),
        }
    elif fmt == OPENAI:
        body = {
            "error": {
                "message": message,
                "type": _OPENAI_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error"),
                "param": None,
                "code": code,
            }
        }
    elif fmt == OLLAMA:
        body = {"error": message}
    else:
        body = {"error": {"message": message, "code": code}}
    raw = json.dumps(body, separators=(",", ":")).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(raw)).encode()),
    ]
    headers.extend((k.encode("latin-1"), v.encode("latin-1")) for k, v in extra_headers)
    return status, headers, raw


class ProxyError(Exception):
    """An error the proxy answers itself."""

    status: ClassVar[int] = 500
    code: ClassVar[str] = "proxy_error"

    def __init__(self, message: str, *, headers: tuple[tuple[str, str], ...] = ()) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers

    def render(self, fmt: str) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        return render_error(fmt, self.status, self.message, code=self.code, extra_headers=self.headers)


class BadRequest(ProxyError):
    status = 400
    code = "invalid_request"


class Forbidden(ProxyError):
    status = 403
    code = "forbidden"


class NotFound(ProxyError):
    status = 404
    code = "not_found"


class MethodNotAllowed(ProxyError):
    status = 405
    code = "method_not_allowed"


class BodyTooLarge(ProxyError):
    status = 413
    code = "request_too_large"


class UpstreamUnreachable(ProxyError):
    """Could not connect to, or lost, the upstream before any response."""

    status = 502
    code = "upstream_unreachable"
    # How the transport failed, as a ``core.retry.OutcomeKind`` value: the
    # scheduler's retry and backpressure decisions depend on it.
    transport_kind: str = "connect_error"


class UpstreamTimeout(ProxyError):
    status = 504
    code = "upstream_timeout"
    transport_kind: str = "timeout_before_headers"


class BudgetExhausted(ProxyError):
    """A token budget is spent: refused before any upstream call, never worth a retry."""

    status = 429
    code = "budget_exhausted"


class Overloaded(ProxyError):
    """Anthropic's way of saying "not now" (the proxy's queue timed out)."""

    status = 529
    code = "overloaded"


class Unavailable(ProxyError):
    """The proxy cannot take the request now (shutting down, queue timeout)."""

    status = 503
    code = "unavailable"


def stream_error_event(fmt: str, path: str, message: str) -> bytes:
    """A provider-format error *event*, for a stream that already answered 200.

    Used when the upstream breaks mid-stream: the client has complete events
    only (the relay holds back a partial trailing event), then this one, so its
    SDK raises a clean error instead of choking on half an event or silently
    ending a truncated answer.
    """
    if fmt == OLLAMA:
        return json.dumps({"error": message}).encode() + b"\n"
    if fmt == ANTHROPIC:
        data = {"type": "error", "error": {"type": "api_error", "message": message}}
        return b"event: error\ndata: " + json.dumps(data).encode() + b"\n\n"
    if "/responses" in path:
        data = {"type": "error", "code": "upstream_disconnected", "message": message, "param": None}
        return b"event: error\ndata: " + json.dumps(data).encode() + b"\n\n"
    data = {"error": {"message": message, "type": "server_error", "param": None, "code": "upstream_disconnected"}}
    return b"data: " + json.dumps(data).encode() + b"\n\n"
