"""SPEC §7.3: one log line per request (agent, lane, priority, queue ms,
attempts, status, tokens), human-readable by default, JSON lines with
``--log-json`` / ``server.log_json``, under ``hivemind-trio serve`` and under a
bare ``hypercorn -k trio hivemind_trio:app``.

The formatter and the set-up functions are tested directly; the per-request
line through a real proxy in this process (caplog); the two entry points as
real subprocesses whose stderr is read line by line.
"""

from __future__ import annotations

import io
import json
import logging
import sys
from pathlib import Path

import httpx
import pytest
import trio

from hivemind_trio import Config, ServerConfig, open_proxy
from hivemind_trio.config import BudgetConfig
from hivemind_trio.logs import JsonFormatter, adopt_server_logging, configure_logging
from hivemind_trio.sim.mock import MockConfig, MockProvider, serve_mock
from tests.e2e.test_entrypoints import (
    ANTHROPIC_HEADERS,
    HIVEMIND,
    HYPERCORN_APP,
    HYPERCORN_RUNNING,
    MSG,
    PROXY_LISTENING,
    Child,
    child_env,
    quiet_mock,
    spawn,
)

GUARD = 30.0
REQUEST_FIELDS = {"agent", "lane", "priority", "queue_ms", "attempts", "status", "input_tokens", "output_tokens"}


# ------------------------------------------------------------------ the formatter


def _record(msg: str, *args: object, level: int = logging.INFO, **extra: object) -> logging.LogRecord:
    logger = logging.getLogger("hivemind_trio.test")
    record = logger.makeRecord(logger.name, level, __file__, 1, msg, args, None, extra=extra or None)
    return record


def test_json_formatter_writes_one_object_with_the_extra_fields() -> None:
    line = JsonFormatter().format(_record("hello %s", "world", agent="a-1", lane="r:ab", queue_ms=1.5, odd=object()))
    assert "\n" not in line
    out = json.loads(line)
    assert out["msg"] == "hello world"
    assert out["level"] == "info"
    assert out["logger"] == "hivemind_trio.test"
    assert out["ts"].endswith("Z") and "T" in out["ts"]
    assert (out["agent"], out["lane"], out["queue_ms"]) == ("a-1", "r:ab", 1.5)
    assert out["odd"].startswith("<object object")  # not JSON: written as its str
    for standard in ("args", "levelno", "pathname", "msecs", "exc_info"):
        assert standard not in out


def test_json_formatter_keeps_a_traceback_on_one_line() -> None:
    try:
        raise ValueError("boom\nsecond line")
    except ValueError:
        record = logging.getLogger("x").makeRecord("x", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    line = JsonFormatter().format(record)
    assert "\n" not in line
    out = json.loads(line)
    assert out["level"] == "error"
    assert "ValueError: boom" in out["exc"] and "Traceback" in out["exc"]


def test_configure_logging_json_lines_for_every_logger() -> None:
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    stream = io.StringIO()
    try:
        configure_logging("debug", json_lines=True, stream=stream)
        logging.getLogger("hypercorn.error").info("Running on %s", "http://x")
        logging.getLogger("hivemind_trio.requests").info("POST /v1/messages", extra={"agent": "a", "status": 200})
        logging.getLogger("httpx").debug("debug line")
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [(x["logger"], x["msg"]) for x in lines] == [
        ("hypercorn.error", "Running on http://x"),
        ("hivemind_trio.requests", "POST /v1/messages"),
        ("httpx", "debug line"),
    ]
    assert (lines[1]["agent"], lines[1]["status"]) == ("a", 200)


def test_adopt_server_logging_only_when_nobody_configured_logging() -> None:
    logger = logging.getLogger("hivemind_trio")
    root = logging.getLogger()
    saved = (logger.handlers[:], logger.level, root.handlers[:])
    try:
        # Someone (pytest here, `hypercorn --log-config` in production) has a handler: left alone.
        assert root.handlers
        assert adopt_server_logging(Config(server=ServerConfig(log_json=True))) is None
        assert logger.handlers == saved[0]
        # Nobody has: the proxy's loggers get one, at server.log_level, in JSON.
        root.handlers[:] = []
        logger.handlers[:] = []
        stream = io.StringIO()
        handler = adopt_server_logging(Config(server=ServerConfig(log_json=True, log_level="warning")), stream=stream)
        assert handler is not None and logger.handlers == [handler]
        assert logger.level == logging.WARNING
        logging.getLogger("hivemind_trio.scheduler").warning("event %s", "breaker_open")
        logging.getLogger("hivemind_trio.requests").info("not at this level")
        assert [json.loads(x)["msg"] for x in stream.getvalue().splitlines()] == ["event breaker_open"]
    finally:
        logger.handlers[:] = saved[0]
        logger.setLevel(saved[1])
        root.handlers[:] = saved[2]


# ------------------------------------------------------------------ through a real proxy


async def test_one_structured_line_per_request(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="hivemind_trio")
    provider = MockProvider(MockConfig(latency=0.0, jitter=0.0, seed=3, stream_delay=0.0, output_sd=0, output_mean=42))
    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery:
            port = await nursery.start(serve_mock, provider)
            config = Config(upstream=f"http://127.0.0.1:{port}", server=ServerConfig(shutdown_grace=1.0),
                            budget=BudgetConfig(agent_tokens=1000, ledger="off"))
            async with open_proxy(config) as proxy, httpx.AsyncClient(base_url=proxy.url) as client:
                ok = await client.post("/v1/messages", json=MSG, headers=ANTHROPIC_HEADERS | {
                    "x-hivemind-agent": "logger-1", "x-hivemind-priority": "high"})
                assert ok.status_code == 200, ok.text
                refused = await client.post("/v1/messages", json=MSG | {"max_tokens": 50_000}, headers=ANTHROPIC_HEADERS | {
                    "x-hivemind-agent": "logger-2"})
                assert refused.status_code == 429, refused.text
                lane = proxy.app.runtime.status()["lanes"][0]["key"]
            nursery.cancel_scope.cancel()

    lines = [r for r in caplog.records if r.name == "hivemind_trio.requests"]
    assert [r.agent for r in lines] == ["logger-1", "logger-2"]  # type: ignore[attr-defined]
    first, second = lines
    # The human line says it all...
    text = first.getMessage()
    for part in ("POST /v1/messages", "agent=logger-1", f"lane={lane}", "priority=high", "queue_ms=", "attempts=1",
                 "status=200", f"tokens={provider.attempts[0].input_tokens}/42"):
        assert part in text, (part, text)
    # ...and the JSON line carries the same as fields.
    out = json.loads(JsonFormatter().format(first))
    assert REQUEST_FIELDS <= out.keys()
    assert (out["event"], out["agent"], out["lane"], out["priority"], out["attempts"], out["status"]) == (
        "request", "logger-1", lane, "high", 1, 200)
    assert (out["input_tokens"], out["output_tokens"], out["tokens_estimated"]) == (provider.attempts[0].input_tokens, 42, False)
    assert isinstance(out["queue_ms"], float) and out["total_ms"] >= out["queue_ms"]
    # The budget refusal: no upstream attempt, the proxy's own 429.
    out = json.loads(JsonFormatter().format(second))
    assert (out["agent"], out["status"], out["attempts"], out["input_tokens"]) == ("logger-2", 429, 0, None)
    assert "status=429" in second.getMessage() and "attempts=0" in second.getMessage()


# ------------------------------------------------------------------ the entry points


def _json_lines(child: Child) -> list[dict]:
    out = []
    for line in child.text("stderr").splitlines():
        if line.strip():
            try:
                out.append(json.loads(line))
            except ValueError:
                raise AssertionError(f"not a JSON line: {line!r}\n{child.describe()}") from None
    return out


async def _request_and_wait_for_line(child: Child, url: str, agent: str) -> None:
    async with httpx.AsyncClient(base_url=url) as client:
        r = await client.post("/v1/messages", json=MSG, headers=ANTHROPIC_HEADERS | {"x-hivemind-agent": agent})
    assert r.status_code == 200, r.text
    await child.wait_for(rf"agent={agent} lane=\S+ priority=normal .*status=200", "stderr")


@pytest.mark.parametrize("entry", ["serve", "hypercorn"])
@pytest.mark.parametrize("json_lines", [True, False], ids=["json", "human"])
async def test_entry_points_log_one_line_per_request(entry: str, json_lines: bool, tmp_path: Path) -> None:
    """`hivemind-trio serve [--log-json]` and `hypercorn -k trio hivemind_trio:app`
    (HIVEMIND_LOG_JSON): the request line reaches stderr (under bare Hypercorn it
    used to be dropped: nobody had configured a handler), in JSON when asked."""
    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery:
            port = await nursery.start(serve_mock, quiet_mock())
            upstream = f"http://127.0.0.1:{port}"
            if entry == "serve":
                argv = [HIVEMIND, "serve", "--port", "0", "--upstream", upstream] + (["--log-json"] if json_lines else [])
                env = child_env()
            else:
                argv = list(HYPERCORN_APP)
                env = child_env(HIVEMIND_UPSTREAM=upstream, HIVEMIND_LOG_JSON="true" if json_lines else "false")
            async with spawn(*argv, env=env, cwd=tmp_path) as child:
                if entry == "serve":
                    url = (await child.wait_for(PROXY_LISTENING, "stdout"))[1]
                else:
                    url = (await child.wait_for(HYPERCORN_RUNNING, "stderr"))[1]
                await _request_and_wait_for_line(child, url, "entry-agent")
                if json_lines:
                    lines = _json_lines(child)
                    [req] = [x for x in lines if x["logger"] == "hivemind_trio.requests"]
                    assert REQUEST_FIELDS <= req.keys(), req
                    assert (req["agent"], req["status"], req["attempts"]) == ("entry-agent", 200, 1)
                    # Hypercorn's own lines are JSON too.
                    assert any(x["logger"] == "hypercorn.error" and "Running on" in x["msg"] for x in lines), lines
                else:
                    stderr = child.text("stderr")
                    assert "INFO hivemind_trio.requests: POST /v1/messages agent=entry-agent" in stderr, child.describe()
                    assert not stderr.lstrip().startswith("{"), child.describe()
            nursery.cancel_scope.cancel()
