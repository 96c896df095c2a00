from __future__ import annotations

import json

import pytest

from hivemind_trio.core import errors


@pytest.mark.parametrize("status", [400, 404, 413, 429, 500, 502, 503, 529])
def test_anthropic_format(status):
    code, headers, body = errors.render_error(errors.ANTHROPIC, status, "boom")
    payload = json.loads(body)
    assert code == status
    assert payload["type"] == "error" and payload["error"]["message"] == "boom"
    assert payload["error"]["type"]
    assert dict(headers)[b"content-length"] == str(len(body)).encode()


def test_openai_and_ollama_formats():
    _, _, body = errors.render_error(errors.OPENAI, 413, "too big", code="request_too_large")
    assert json.loads(body)["error"] == {"message": "too big", "type": "invalid_request_error", "param": None, "code": "request_too_large"}
    _, _, body = errors.render_error(errors.OLLAMA, 502, "down")
    assert json.loads(body) == {"error": "down"}


def test_proxy_error_renders_with_its_status_and_headers():
    exc = errors.Unavailable("shutting down", headers=(("retry-after", "5"),))
    status, headers, body = exc.render(errors.ANTHROPIC)
    assert status == 503 and (b"retry-after", b"5") in headers
    assert json.loads(body)["error"]["type"] == "overloaded_error"
