"""The real agent CLIs (Claude Code, Codex) through the real proxy (Hypercorn on
a real loopback port) against the mock provider.

Each test starts the mock and the proxy in the test's Trio nursery, runs one
CLI as a subprocess with an isolated HOME / config dir and a fake key, and
checks that the mock's answer is what the CLI printed, and that the mock saw
the request as the proxy should forward it (no ``x-hivemind-*`` header).

The CLIs come from PATH or from ``<repo>/.tools/node_modules/.bin`` (where
``.ci/run`` installs them).  A missing CLI skips the test, except with
``CI=true``, where it fails: CI must run these tests.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import signal
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import attrs
import httpx
import pytest
import trio

from hivemind_trio import Config, Proxy, open_proxy
from hivemind_trio.sim import mock_wire as wire
from hivemind_trio.sim.mock import Attempt, MockConfig, MockProvider, serve_mock

pytestmark = pytest.mark.cli

REPO_ROOT = Path(__file__).resolve().parents[2]
TOOLS_BIN = REPO_ROOT / ".tools" / "node_modules" / ".bin"
CLI_TIMEOUT = 120.0  # seconds of wall clock per CLI run; generous, never asserted on

# Environment variables handed through to the CLIs; everything else (real API
# keys, base URLs, *_PROXY settings, the developer's CLAUDE_*/CODEX_* config)
# stays out so the run is isolated and offline.
_PASS_THROUGH = ("PATH", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TMPDIR", "SYSTEMROOT")


# ---------------------------------------------------------------- helpers


def find_cli(name: str) -> str:
    """The CLI's path: PATH first, then the repo's .tools; skip (fail under CI) if absent."""
    found = shutil.which(name) or shutil.which(name, path=str(TOOLS_BIN))
    if found:
        return found
    reason = (f"the {name!r} CLI is neither on PATH nor in {TOOLS_BIN} "
              "(install it with .ci/run or `npm install --prefix .tools @anthropic-ai/claude-code @openai/codex`)")
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason}; CI=true, so the CLI end-to-end tests must run, not skip")
    pytest.skip(reason)


# Sync fixtures, not calls inside the async tests: pytest-trio drops the
# reason of a skip raised in an async test (python-trio/pytest-trio#151).
@pytest.fixture
def claude() -> str:
    return find_cli("claude")


@pytest.fixture
def codex() -> str:
    return find_cli("codex")


def base_env(home: Path) -> dict[str, str]:
    env = {k: os.environ[k] for k in _PASS_THROUGH if k in os.environ}
    home.mkdir(parents=True, exist_ok=True)
    env.update(
        HOME=str(home),
        XDG_CONFIG_HOME=str(home / ".config"),
        XDG_CACHE_HOME=str(home / ".cache"),
        XDG_DATA_HOME=str(home / ".local" / "share"),
        XDG_STATE_HOME=str(home / ".local" / "state"),
        NO_PROXY="127.0.0.1,localhost",
        no_proxy="127.0.0.1,localhost",
        NO_COLOR="1",
        TERM="dumb",
    )
    return env


@attrs.frozen
class CliRun:
    argv: list[str]
    returncode: int
    stdout: str
    stderr: str

    def describe(self) -> str:
        return (f"command: {self.argv!r}\nexit code: {self.returncode}\n"
                f"--- stdout ---\n{self.stdout[-4000:]}\n--- stderr ---\n{self.stderr[-8000:]}")


async def _kill_group(process: trio.Process) -> None:
    """On timeout kill the CLI's whole process group (Codex's node launcher has a native child)."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


async def run_cli(argv: list[str], *, env: dict[str, str], cwd: Path, logs: Path) -> CliRun:
    """Run a CLI to completion with stdin closed; stdout/stderr go to files so
    that a timeout still reports what the CLI had said."""
    logs.mkdir(parents=True, exist_ok=True)
    out_path, err_path = logs / "stdout.txt", logs / "stderr.txt"
    returncode: int | None = None
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        with trio.move_on_after(CLI_TIMEOUT):
            process = await trio.run_process(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=env, cwd=str(cwd),
                check=False, start_new_session=True, deliver_cancel=_kill_group,
            )
            returncode = process.returncode
    run = CliRun(argv, -1 if returncode is None else returncode,
                 out_path.read_text(errors="replace"), err_path.read_text(errors="replace"))
    if returncode is None:
        pytest.fail(f"{Path(argv[0]).name} did not finish within {CLI_TIMEOUT:.0f} s\n{run.describe()}")
    return run


@attrs.define
class Stack:
    provider: MockProvider
    proxy: Proxy
    reply: str

    @property
    def counters(self):
        runtime = self.proxy.app.runtime
        assert runtime is not None, "the proxy never started its runtime"
        return runtime.counters

    def generations(self, api: str) -> list[Attempt]:
        return [a for a in self.provider.attempts if a.api == api]

    def log(self) -> str:
        return "\n".join(f"  {a.transport} {a.method} {a.path} -> {a.status} {a.outcome} agent={a.agent!r}"
                         for a in self.provider.attempts) or "  (no attempts)"


@pytest.fixture
async def stack(nursery: trio.Nursery) -> AsyncIterator[Stack]:
    """The mock on an ephemeral port, and the real proxy (Hypercorn) in front of it."""
    reply = "HIVEMIND-E2E-" + secrets.token_hex(4).upper()
    provider = MockProvider(MockConfig(latency=0.0, jitter=0.0, stream_delay=0.001, seed=11,
                                       reply_text=reply, pad_text=False))
    port = await nursery.start(serve_mock, provider)
    async with open_proxy(Config(upstream=f"http://127.0.0.1:{port}")) as proxy:
        yield Stack(provider, proxy, reply)


# ---------------------------------------------------------------- Claude Code


async def test_claude_code_print_mode_through_proxy(claude: str, stack: Stack, tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.INFO, logger="hivemind_trio")
    home = tmp_path / "home"
    work = tmp_path / "work"
    work.mkdir()
    env = base_env(home) | {
        "CLAUDE_CONFIG_DIR": str(home / ".claude"),
        "ANTHROPIC_BASE_URL": stack.proxy.url,
        "ANTHROPIC_API_KEY": "sk-ant-api03-fake-e2e-key",
        # The proxy's own header must be read by the proxy and stripped; the
        # mock records x-hivemind-agent as the agent, else x-agent-id, so the
        # control header shows the custom headers did reach the mock.
        "ANTHROPIC_CUSTOM_HEADERS": "x-hivemind-agent: reviewer-3\nx-agent-id: control-7",
        "DISABLE_TELEMETRY": "1",
        "DISABLE_ERROR_REPORTING": "1",
        "DISABLE_AUTOUPDATER": "1",
        "DISABLE_BUG_COMMAND": "1",
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
        "CLAUDE_CODE_MAX_RETRIES": "0",  # a refused request shows as itself, not as retries
    }
    run = await run_cli([claude, "-p", "Reply with a short greeting."], env=env, cwd=work, logs=tmp_path / "claude")

    context = f"{run.describe()}\nmock attempts:\n{stack.log()}"
    assert run.returncode == 0, context
    assert stack.reply in run.stdout, context
    messages = stack.generations(wire.ANTHROPIC)
    assert messages, f"no /v1/messages reached the mock\n{context}"
    for a in messages:
        assert (a.method, a.path, a.status, a.outcome) == ("POST", "/v1/messages", 200, "ok"), context
        assert a.agent == "control-7", f"x-hivemind-agent was forwarded upstream (mock saw {a.agent!r})\n{context}"
    assert any(a.stream for a in messages), context
    assert stack.counters.requests >= len(messages)
    proxied = [r.getMessage() for r in caplog.records if r.name == "hivemind_trio.requests" and "/v1/messages" in r.getMessage()]
    assert proxied and all("agent=reviewer-3" in line for line in proxied), proxied


class HeaderLog(httpx.AsyncBaseTransport):
    """The proxy's upstream transport, recording the headers of every request
    it sends to the mock (exactly what goes on the wire)."""

    def __init__(self) -> None:
        self.inner = httpx.AsyncHTTPTransport(retries=0)
        self.sent: list[tuple[str, str, list[tuple[bytes, bytes]]]] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.sent.append((request.method, request.url.path, list(request.headers.raw)))
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()


@pytest.fixture
async def recorded_stack(nursery: trio.Nursery) -> AsyncIterator[tuple[Stack, HeaderLog]]:
    """Like ``stack``, with the proxy's upstream requests recorded."""
    reply = "HIVEMIND-E2E-" + secrets.token_hex(4).upper()
    provider = MockProvider(MockConfig(latency=0.0, jitter=0.0, stream_delay=0.001, seed=11,
                                       reply_text=reply, pad_text=False))
    port = await nursery.start(serve_mock, provider)
    log = HeaderLog()
    try:
        async with open_proxy(Config(upstream=f"http://127.0.0.1:{port}"), transport=log) as proxy:
            yield Stack(provider, proxy, reply), log
    finally:
        await log.aclose()


def claude_env(home: Path, proxy_url: str) -> dict[str, str]:
    return base_env(home) | {
        "CLAUDE_CONFIG_DIR": str(home / ".claude"),
        "ANTHROPIC_BASE_URL": proxy_url,
        "ANTHROPIC_API_KEY": "sk-ant-api03-fake-e2e-key",
        "DISABLE_TELEMETRY": "1",
        "DISABLE_ERROR_REPORTING": "1",
        "DISABLE_AUTOUPDATER": "1",
        "DISABLE_BUG_COMMAND": "1",
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
        "CLAUDE_CODE_MAX_RETRIES": "0",
    }


async def proxy_status(proxy: Proxy) -> dict:
    """GET /hivemind/status, as an operator would."""
    async with httpx.AsyncClient(base_url=proxy.url) as client:
        r = await client.get("/hivemind/status")
    assert r.status_code == 200, r.text
    return r.json()


async def test_claude_code_custom_headers_set_agent_and_priority(claude: str, recorded_stack: tuple[Stack, HeaderLog], tmp_path: Path) -> None:
    """docs/agents.md, Claude Code: ANTHROPIC_CUSTOM_HEADERS names the agent and
    its priority; the proxy attributes the requests to it and strips both
    headers (the mock never sees an x-hivemind-* header)."""
    stack, upstream = recorded_stack
    work = tmp_path / "work"
    work.mkdir()
    env = claude_env(tmp_path / "home", stack.proxy.url) | {
        "ANTHROPIC_CUSTOM_HEADERS": "x-hivemind-agent: reviewer-3\nx-hivemind-priority: high\nx-agent-id: control-7",
    }
    run = await run_cli([claude, "-p", "Reply with a short greeting."], env=env, cwd=work, logs=tmp_path / "claude")

    status = await proxy_status(stack.proxy)
    context = f"{run.describe()}\nmock attempts:\n{stack.log()}\nstatus agents: {status['agents']}"
    assert run.returncode == 0, context
    assert stack.reply in run.stdout, context
    messages = stack.generations(wire.ANTHROPIC)
    assert messages and all(a.status == 200 for a in messages), context
    # The custom headers did reach the mock (the control one)...
    assert all(a.agent == "control-7" for a in messages), context
    # ...but none of the proxy's own.
    assert upstream.sent, context
    for method, path, headers in upstream.sent:
        own = [(k, v) for k, v in headers if k.lower().startswith(b"x-hivemind-")]
        assert own == [], f"{method} {path} went upstream with {own}\n{context}"
    # Every request was attributed to reviewer-3, at high priority.
    agent = status["agents"].get("reviewer-3")
    assert agent is not None, context
    assert agent["priority"] == "high", context
    assert agent["requests"] >= len(messages), context
    assert agent["by_status"].get("200", 0) >= len(messages), context
    # Claude Code also sends a connectivity check, `HEAD /` (User-Agent Bun/...),
    # without the key or the custom headers: the proxy can only name it by the
    # client address.  Nothing else goes unattributed.
    others = {name: a for name, a in status["agents"].items() if name != "reviewer-3"}
    assert all(name.startswith("addr-") for name in others), context
    heads = [path for method, path, _ in upstream.sent if method == "HEAD"]
    assert sum(a["requests"] for a in others.values()) == len(heads), context


async def test_many_claude_script_runs_three_named_sessions(claude: str, stack: Stack, tmp_path: Path) -> None:
    """scripts/many_claude.sh -n 3: three Claude Code sessions at once, three agents in the status."""
    work = tmp_path / "work"
    work.mkdir()
    out = tmp_path / "out"
    env = claude_env(tmp_path / "home", stack.proxy.url) | {"CLAUDE": claude}
    argv = ["bash", str(REPO_ROOT / "scripts" / "many_claude.sh"), "-n", "3", "-u", stack.proxy.url,
            "-a", "swarm", "-p", "low", "-o", str(out), "Reply with a short greeting, agent {i}."]
    run = await run_cli(argv, env=env, cwd=work, logs=tmp_path / "many")

    status = await proxy_status(stack.proxy)
    outputs = {p.name: p.read_text(errors="replace") for p in sorted(out.glob("*.out"))} if out.exists() else {}
    context = f"{run.describe()}\noutputs: {outputs}\nmock attempts:\n{stack.log()}\nstatus agents: {status['agents']}"
    assert run.returncode == 0, context
    assert sorted(outputs) == ["swarm-1.out", "swarm-2.out", "swarm-3.out"], context
    assert all(stack.reply in text for text in outputs.values()), context
    # Besides each session's `HEAD /` connectivity check (no key, no custom
    # headers: named by the client address, see the test above).
    named = {name: a for name, a in status["agents"].items() if not name.startswith("addr-")}
    assert sorted(named) == ["swarm-1", "swarm-2", "swarm-3"], context
    for name, agent in named.items():
        assert agent["priority"] == "low" and agent["requests"] >= 1 and agent["failures"] == 0, (name, context)
    assert all(a.status == 200 for a in stack.generations(wire.ANTHROPIC)), context


# ---------------------------------------------------------------------- Codex


def _codex_argv(codex: str, tmp_path: Path, *extra: str) -> list[str]:
    return [
        codex, "exec", "--skip-git-repo-check", "--ephemeral", "--color", "never",
        "--sandbox", "read-only", "-o", str(tmp_path / "last-message.txt"),
        *extra, "Reply with a short greeting.",
    ]


def _codex_home(tmp_path: Path, config: str) -> Path:
    codex_home = tmp_path / "codex-home"
    codex_home.mkdir()
    common = 'check_for_update_on_startup = false\n'
    (codex_home / "config.toml").write_text(common + config + "\n[analytics]\nenabled = false\n")
    return codex_home


async def test_codex_exec_custom_provider_http_stream(codex: str, stack: Stack, tmp_path: Path) -> None:
    """A [model_providers.X] table: the Responses API over HTTP POST streaming."""
    work = tmp_path / "work"
    work.mkdir()
    codex_home = _codex_home(tmp_path, f"""\
model = "gpt-5-codex"
model_provider = "hm"

[model_providers.hm]
name = "hivemind e2e"
base_url = "{stack.proxy.url}/v1"
env_key = "HM_E2E_KEY"
wire_api = "responses"
http_headers = {{ "x-hivemind-agent" = "codex-batch", "x-agent-id" = "codex-control" }}
""")
    env = base_env(tmp_path / "home") | {"CODEX_HOME": str(codex_home), "HM_E2E_KEY": "sk-fake-e2e-key"}
    run = await run_cli(_codex_argv(codex, tmp_path), env=env, cwd=work, logs=tmp_path / "codex")

    context = f"{run.describe()}\nmock attempts:\n{stack.log()}"
    assert run.returncode == 0, context
    assert stack.reply in run.stdout, context
    assert stack.reply in (tmp_path / "last-message.txt").read_text(), context
    responses = stack.generations(wire.OPENAI_RESPONSES)
    assert responses, f"no /v1/responses reached the mock\n{context}"
    for a in responses:
        assert (a.transport, a.method, a.path, a.status, a.outcome) == ("http", "POST", "/v1/responses", 200, "ok"), context
        assert a.stream, context
        assert a.agent == "codex-control", f"x-hivemind-agent was forwarded upstream (mock saw {a.agent!r})\n{context}"
    assert stack.counters.websockets_total == 0


async def test_codex_exec_builtin_provider_websocket(codex: str, stack: Stack, tmp_path: Path) -> None:
    """The built-in provider via openai_base_url: the Responses API over a WebSocket."""
    work = tmp_path / "work"
    work.mkdir()
    codex_home = _codex_home(tmp_path, "")
    env = base_env(tmp_path / "home") | {"CODEX_HOME": str(codex_home), "CODEX_API_KEY": "sk-fake-e2e-key"}
    argv = _codex_argv(codex, tmp_path, "-c", f'openai_base_url="{stack.proxy.url}/v1"')
    run = await run_cli(argv, env=env, cwd=work, logs=tmp_path / "codex")

    context = f"{run.describe()}\nmock attempts:\n{stack.log()}\nproxy: {stack.proxy.app.runtime.status()}"
    assert run.returncode == 0, context
    assert stack.reply in run.stdout, context
    assert stack.reply in (tmp_path / "last-message.txt").read_text(), context
    responses = stack.generations(wire.OPENAI_RESPONSES)
    over_ws = [a for a in responses if a.transport == "ws"]
    assert over_ws, f"Codex never used the WebSocket through the proxy\n{context}"
    assert all((a.method, a.path, a.outcome) == ("WS", "/v1/responses", "ok") for a in over_ws), context
    # No fallback to HTTP: the upgrade went through the proxy every time.
    assert [a for a in responses if a.transport != "ws"] == [], context
    assert stack.counters.websockets_total >= 1, context
