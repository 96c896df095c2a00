"""``hivemind-trio status`` (SPEC §7.2): the status of a running proxy as tables.

The rendering is a pure function of the status JSON, rendered here from a real
proxy's status and from a hand-made one with every state; the command itself
runs as a subprocess against a real proxy served by the test (and against an
address where nothing listens).
"""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import trio
from rich.console import Console

from hivemind_trio import Config, ServerConfig, open_proxy
from hivemind_trio.admin.status_cli import render_status, status_url
from hivemind_trio.config import BudgetConfig
from hivemind_trio.runtime.serve import Proxy
from hivemind_trio.sim.mock import MockConfig, MockProvider, serve_mock

HIVEMIND = Path(sys.executable).parent / "hivemind-trio"
GUARD = 30.0
MSG = {"model": "claude-test", "max_tokens": 64, "messages": [{"role": "user", "content": "hello there"}]}
HEADERS = {"x-api-key": "sk-test", "anthropic-version": "2023-06-01"}


def text_of(renderable, width: int = 220) -> str:
    console = Console(file=io.StringIO(), width=width, record=True, color_system=None)
    console.print(renderable)
    return console.export_text()


def cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HIVEMIND_") and k != "COLUMNS"}
    env.update(extra)
    return env


@asynccontextmanager
async def busy_proxy(**server: object) -> AsyncIterator[Proxy]:
    """The mock and a real proxy in front of it that has served two agents
    (one at high priority) and refused a third (a budget event)."""
    provider = MockProvider(MockConfig(latency=0.0, jitter=0.0, seed=2, stream_delay=0.0))
    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve_mock, provider)
        config = Config(upstream=f"http://127.0.0.1:{port}", server=ServerConfig(shutdown_grace=1.0, **server),  # type: ignore[arg-type]
                        budget=BudgetConfig(agent_tokens=2000, ledger="off"))
        async with open_proxy(config) as proxy:
            token = server.get("admin_token")
            async with httpx.AsyncClient(base_url=proxy.url) as client:
                for agent, priority in (("planner-1", "high"), ("coder-2", "low")):
                    r = await client.post("/v1/messages", json=MSG, headers=HEADERS | {
                        "x-hivemind-agent": agent, "x-hivemind-priority": priority})
                    assert r.status_code == 200, r.text
                r = await client.post("/v1/messages", json=MSG | {"max_tokens": 90_000},
                                      headers=HEADERS | {"x-hivemind-agent": "spender-3"})
                assert r.status_code == 429
                if token:
                    assert (await client.get("/hivemind/status")).status_code == 403
            yield proxy
        nursery.cancel_scope.cancel()


# ------------------------------------------------------------------ rendering


async def test_render_a_real_proxys_status() -> None:
    with trio.fail_after(GUARD):
        async with busy_proxy() as proxy:
            async with httpx.AsyncClient() as client:
                status = (await client.get(status_url(proxy.url))).json()
    [lane] = status["lanes"]
    out = text_of(render_status(status, url=proxy.url))
    assert f"hivemind_trio at {proxy.url}" in out
    assert "requests 3" in out
    for part in ("Lanes", lane["key"], "anthropic", "closed", "Agents", "planner-1", "coder-2", "spender-3",
                 "Recent events", "budget_refused", "agent=spender-3"):
        assert part in out, (part, out)
    agent_rows = {line.split()[0]: line.split() for line in out.splitlines() if line.strip().startswith(("planner-1", "coder-2", "spender-3"))}
    assert agent_rows["planner-1"][1] == "high"
    assert agent_rows["coder-2"][1] == "low"
    assert "200x1" in agent_rows["planner-1"]
    assert "429x1" in agent_rows["spender-3"]
    assert "refused)" in " ".join(agent_rows["spender-3"])


def test_render_every_state() -> None:
    status = {
        "upstreams": [{"route": "claude", "url": "https://api.anthropic.com", "profile": "anthropic", "match": "prefix /"}],
        "in_flight": 5, "requests": 1234, "by_status": {"200": 1200, "429": 34}, "uptime_s": 3725.0,
        "websockets": {"open": 1, "total": 3},
        "lanes": [{
            "key": "claude:0123456789abcdef", "route": "claude", "profile": "anthropic", "window": 4, "in_flight": 4,
            "queued": 7, "queue_by_priority": {"critical": 0, "high": 2, "normal": 5, "low": 0},
            "breaker": "open", "breaker_trips": 2, "paused_for": 12.5,
            "rate_limit": {"requests": {"limit": 50, "remaining": 3, "reset_in": 12.5},
                           "configured_tpm": {"limit": 100000, "remaining": 2500, "reset_in": None}},
            "retries": 9, "retry_budget": 1.5, "upstream_429": 34, "upstream_5xx": 2, "resets": 1, "admitted": 1200,
        }],
        "agents": {"reviewer-3": {
            "requests": 10, "in_flight": 2, "input_tokens": 123456, "output_tokens": 7890, "estimated_requests": 1,
            "retries": 3, "failures": 2, "queue_timeouts": 1, "budget_refusals": 0, "priority": "critical",
            "by_status": {"200": 8, "529": 2}, "budget_left": 50000,
        }},
        "events": [{"seq": i, "t": 1_700_000_000.0 + i, "kind": "pause", "lane": "claude:0123456789abcdef", "seconds": i}
                   for i in range(1, 16)] + [{"seq": 16, "t": 1_700_000_016.0, "kind": "breaker_open", "lane": "claude:0123456789abcdef"}],
    }
    out = text_of(render_status(status, events=3))
    for part in ("up 1h02m", "requests 1,234", "in flight 5", "statuses 200x1200 429x34", "websockets 1 open / 3",
                 "claude -> https://api.anthropic.com",
                 "7 (h2 n5)", "open (2 trips)", "12.5s", "requests 3/50 reset 12.5s", "configured_tpm 2,500/100,000",
                 "34/2/1", "1,200",
                 "reviewer-3", "critical", "123,456~", "7,890~", "50,000", "2 (1 timed out)", "200x8 529x2",
                 "breaker_open", "seconds=15"):
        assert part in out, (part, out)
    # Only the last three events.
    assert "seconds=13" not in out and "seconds=14" in out


def test_render_an_idle_proxy() -> None:
    out = text_of(render_status({"lanes": [], "agents": {}, "events": [], "requests": 0, "uptime_s": 1.0}))
    assert "none yet" in out and "Recent events: none" in out


def test_status_url() -> None:
    assert status_url("http://127.0.0.1:8765") == "http://127.0.0.1:8765/hivemind/status"
    assert status_url("http://h:1/") == "http://h:1/hivemind/status"
    assert status_url("h:1") == "http://h:1/hivemind/status"
    assert status_url("http://h:1/hivemind/status") == "http://h:1/hivemind/status"
    assert status_url("http://h:1/proxy") == "http://h:1/proxy/hivemind/status"


# ------------------------------------------------------------------ the command


async def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
    return await trio.run_process([str(HIVEMIND), "status", *args], capture_stdout=True, capture_stderr=True,
                                  check=False, env=env if env is not None else cli_env())


async def test_cli_prints_the_running_proxys_tables() -> None:
    with trio.fail_after(GUARD):
        async with busy_proxy() as proxy:
            run = await run_cli("--url", proxy.url)
            lane = proxy.app.runtime.status()["lanes"][0]["key"]
            as_json = await run_cli("--url", proxy.url, "--json")
    out, err = run.stdout.decode(), run.stderr.decode()
    assert run.returncode == 0, (out, err)
    for part in ("Lanes", lane, "Agents", "planner-1", "coder-2", "spender-3", "budget_refused"):
        assert part in out, (part, out)
    assert "\x1b[" not in out  # not a terminal: no colour codes
    assert as_json.returncode == 0
    assert set(json.loads(as_json.stdout)["agents"]) == {"planner-1", "coder-2", "spender-3"}


async def test_cli_sends_the_admin_token() -> None:
    with trio.fail_after(GUARD):
        async with busy_proxy(admin_token="s3cret-admin") as proxy:
            refused = await run_cli("--url", proxy.url)
            by_flag = await run_cli("--url", proxy.url, "--token", "s3cret-admin")
            by_env = await run_cli("--url", proxy.url, env=cli_env(HIVEMIND_ADMIN_TOKEN="s3cret-admin"))
    assert refused.returncode == 1
    assert b"403" in refused.stderr and b"--token" in refused.stderr and b"Traceback" not in refused.stderr
    assert by_flag.returncode == 0 and b"planner-1" in by_flag.stdout, by_flag.stderr
    assert by_env.returncode == 0 and b"planner-1" in by_env.stdout, by_env.stderr


async def test_cli_unreachable_proxy_is_a_message_not_a_traceback() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # Bound, never listening: connections are refused.
    run = await run_cli("--url", f"http://127.0.0.1:{port}")
    err = run.stderr.decode()
    assert run.returncode == 1, (run.stdout, err)
    assert f"cannot reach the proxy at http://127.0.0.1:{port}/hivemind/status" in err, err
    assert "Traceback" not in err and run.stdout == b""
    bad = await run_cli("--url", "http://127.0.0.1:1", "--watch", "0")
    assert bad.returncode == 2 and b"--watch" in bad.stderr


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


async def test_cli_watch_refreshes_until_interrupted() -> None:
    """--watch into a pipe: a snapshot per interval (a terminal gets rich.live
    redrawing in place); Ctrl-C ends it with status 0."""
    with trio.fail_after(GUARD):
        async with busy_proxy() as proxy:
            # Ctrl-C reaches the CLI with SIGINT's default disposition, as in a
            # terminal: a test run started in the background (`cmd &` in a
            # non-interactive shell) inherits SIGINT ignored, and Python then
            # never raises KeyboardInterrupt.
            process = await trio.lowlevel.open_process([str(HIVEMIND), "status", "--url", proxy.url, "--watch", "0.2"],
                                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=cli_env(),
                                                       preexec_fn=_default_sigint)
            assert process.stdout is not None and process.stderr is not None
            out = rest = err = b""
            try:
                while out.count(b"planner-1") < 2:
                    chunk = await process.stdout.receive_some()
                    assert chunk, out
                    out += chunk
                # A request in between shows in a later snapshot.
                async with httpx.AsyncClient(base_url=proxy.url) as client:
                    r = await client.post("/v1/messages", json=MSG, headers=HEADERS | {"x-hivemind-agent": "late-4"})
                    assert r.status_code == 200
                while b"late-4" not in out:
                    chunk = await process.stdout.receive_some()
                    assert chunk, out
                    out += chunk
                process.send_signal(signal.SIGINT)
                while chunk := await process.stdout.receive_some():
                    rest += chunk
                while chunk := await process.stderr.receive_some():
                    err += chunk
                code = await process.wait()
            finally:
                if process.returncode is None:
                    process.kill()
                    await process.wait()
                await process.stdout.aclose()
                await process.stderr.aclose()
    assert code == 0, (out + rest, err)
    assert b"Traceback" not in err
