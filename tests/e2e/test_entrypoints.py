"""SPEC §2 and §7.4 end to end: the documented ways of running the proxy, each
as a real subprocess on a real loopback port, reached by real HTTP clients.

- ``hypercorn -k trio hivemind_trio:app`` configured by ``HIVEMIND_UPSTREAM``
  or a ``HIVEMIND_CONFIG`` file, in front of the mock provider served by the
  test itself (so the test can read the mock's attempt log);
- ``hivemind-trio serve --mock`` and ``hivemind-trio serve --upstream``;
- ``hivemind-trio mock`` on its own;
- strict configuration at start: a bad value or an unknown key stops the
  process with a message naming the key and the value, under the CLI and
  under Hypercorn.

Every process binds port 0 and the test learns the port from the line the
process prints; nothing sleeps waiting for readiness, output is polled.  Every
process is killed (its whole process group: Hypercorn runs its app in a
worker process) when its test ends, whatever happens.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anthropic
import httpx
import pytest
import trio

from hivemind_trio.sim.mock import MockConfig, MockProvider, serve_mock

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals and process groups")

BIN = Path(sys.executable).parent
HYPERCORN = BIN / "hypercorn"
HIVEMIND = BIN / "hivemind-trio"
HYPERCORN_APP = [HYPERCORN, "-k", "trio", "hivemind_trio:app", "--bind", "127.0.0.1:0"]

GUARD = 30.0  # seconds: only ever reached when something is broken
REPLY = "ENTRYPOINT-E2E-REPLY-7e2a"
MSG = {"model": "claude-test", "max_tokens": 64, "messages": [{"role": "user", "content": "hello there"}]}
ANTHROPIC_HEADERS = {"x-api-key": "sk-test", "anthropic-version": "2023-06-01"}

# Where each process announces its port (Hypercorn logs to stderr, ours print to stdout).
HYPERCORN_RUNNING = r"Running on (http://127\.0\.0\.1:\d+)"
PROXY_LISTENING = r"hivemind_trio proxy listening on (http://127\.0\.0\.1:\d+)"
MOCK_LISTENING = r"mock provider listening on (http://127\.0\.0\.1:\d+)"
MOCK_ARGV = [HIVEMIND, "mock", "--port", "0", "--latency", "0", "--jitter", "0", "--reply-text", REPLY]


# ------------------------------------------------------------------ processes


def child_env(**extra: str) -> dict[str, str]:
    """The test's environment without any HIVEMIND_* variable, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HIVEMIND_")}
    env.update(extra)
    return env


class Child:
    """A subprocess whose stdout and stderr are collected as they arrive."""

    def __init__(self, process: trio.Process) -> None:
        self.process = process
        self._data = {"stdout": bytearray(), "stderr": bytearray()}
        self._closed: set[str] = set()
        self._changed = trio.Event()

    def text(self, name: str) -> str:
        return self._data[name].decode("utf-8", "replace")

    def describe(self) -> str:
        return (
            f"exit status {self.process.returncode}\n"
            f"--- stdout ---\n{self.text('stdout')}\n--- stderr ---\n{self.text('stderr')}"
        )

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def _drain(self, name: str, stream: trio.abc.ReceiveStream) -> None:
        async for chunk in stream:
            self._data[name] += chunk
            self._wake()
        self._closed.add(name)
        self._wake()

    async def wait_for(self, pattern: str, name: str) -> re.Match[str]:
        """The first match of ``pattern`` in the output ``name``, once it is there."""
        rx = re.compile(pattern)
        while True:
            m = rx.search(self.text(name))
            if m is not None:
                return m
            if name in self._closed:
                raise AssertionError(f"{name} ended without matching {pattern!r}\n{self.describe()}")
            await self._changed.wait()

    async def wait_exit(self) -> int:
        """The exit status, once the process has exited and its output is complete."""
        status = await self.process.wait()
        while len(self._closed) < 2:
            await self._changed.wait()
        return status


@asynccontextmanager
async def spawn(*argv: object, env: dict[str, str], cwd: Path) -> AsyncIterator[Child]:
    """Run ``argv`` in its own process group; kill the group on the way out."""
    process = await trio.lowlevel.open_process(
        [str(a) for a in argv],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        cwd=cwd,
        start_new_session=True,
    )
    assert process.stdout is not None and process.stderr is not None
    child = Child(process)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(child._drain, "stdout", process.stdout)
            nursery.start_soon(child._drain, "stderr", process.stderr)
            try:
                yield child
            finally:
                with trio.CancelScope(shield=True):
                    # Not yet reaped, so the pid (and the group it leads) is still ours.
                    if process.returncode is None:
                        try:
                            os.killpg(process.pid, signal.SIGKILL)
                        except ProcessLookupError:
                            pass
                    await process.wait()
                # With the group gone the pipes reach EOF; never hang on them.
                nursery.cancel_scope.deadline = trio.current_time() + 5
    finally:
        with trio.CancelScope(shield=True):
            await process.stdout.aclose()
            await process.stderr.aclose()


# ------------------------------------------------------------------- helpers


def quiet_mock() -> MockProvider:
    return MockProvider(
        MockConfig(latency=0.0, jitter=0.0, seed=7, stream_delay=0.0, reply_text=REPLY)  # type: ignore[arg-type]
    )


async def post_message(base_url: str) -> httpx.Response:
    async with httpx.AsyncClient(base_url=base_url) as client:
        return await client.post("/v1/messages", json=MSG, headers=ANTHROPIC_HEADERS)


async def get_json(url: str) -> object:
    async with httpx.AsyncClient() as client:
        r = await client.get(url)
    assert r.status_code == 200, r.text
    return r.json()


async def assert_health(proxy_url: str) -> None:
    async with httpx.AsyncClient(base_url=proxy_url) as client:
        r = await client.get("/hivemind/health")
    assert r.status_code == 200
    assert r.json() == {"status": "ok"}


async def assert_exits_cleanly(child: Child, signum: signal.Signals) -> None:
    child.process.send_signal(signum)
    status = await child.wait_exit()
    assert status == 0, child.describe()
    assert "Traceback" not in child.text("stderr"), child.describe()


# --------------------------------------------------------- hypercorn, module app


@pytest.mark.parametrize("source", ["HIVEMIND_UPSTREAM", "HIVEMIND_CONFIG"])
async def test_hypercorn_module_app_serves_in_front_of_the_mock(source: str, tmp_path: Path) -> None:
    provider = quiet_mock()
    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery:
            port = await nursery.start(serve_mock, provider)
            upstream = f"http://127.0.0.1:{port}"
            if source == "HIVEMIND_UPSTREAM":
                env = child_env(HIVEMIND_UPSTREAM=upstream)
            else:
                config = tmp_path / "hivemind.toml"
                config.write_text(f'upstream = "{upstream}"\n\n[server]\nshutdown_grace = 1.0\n')
                env = child_env(HIVEMIND_CONFIG=str(config))
            async with spawn(*HYPERCORN_APP, env=env, cwd=tmp_path) as child:
                url = (await child.wait_for(HYPERCORN_RUNNING, "stderr"))[1]

                async with anthropic.AsyncAnthropic(base_url=url, api_key="sk-test", max_retries=0) as client:
                    raw = await client.messages.with_raw_response.create(**MSG)
                    msg = await raw.parse()
                assert REPLY in msg.content[0].text
                assert msg.model == "claude-test"
                # The mock served it, once, and its answer came back unchanged.
                assert [(a.method, a.path, a.status, a.outcome) for a in provider.attempts] == [
                    ("POST", "/v1/messages", 200, "ok")
                ]
                assert raw.headers["request-id"] == provider.attempts[0].request_id
                assert msg.usage.output_tokens == provider.attempts[0].output_tokens

                await assert_health(url)
                status = await get_json(f"{url}/hivemind/status")
                assert [u["url"] for u in status["upstreams"]] == [upstream]  # type: ignore[index]

                await assert_exits_cleanly(child, signal.SIGTERM)
            nursery.cancel_scope.cancel()


# ------------------------------------------------------------- the CLI: serve


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
async def test_cli_serve_mock_on_port_zero_then_signal(signum: signal.Signals, tmp_path: Path) -> None:
    with trio.fail_after(GUARD):
        argv = [HIVEMIND, "serve", "--port", "0", "--mock", "--mock-port", "0"]
        async with spawn(*argv, env=child_env(), cwd=tmp_path) as child:
            mock_url = (await child.wait_for(MOCK_LISTENING, "stdout"))[1]
            url = (await child.wait_for(PROXY_LISTENING, "stdout"))[1]
            assert url != mock_url

            r = await post_message(url)
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["type"] == "message"
            assert body["model"] == "claude-test"
            assert body["content"][0]["text"]
            # The answer is the built-in mock's: its own log has this request.
            log = await get_json(f"{mock_url}/mock/log")
            assert [(a["path"], a["status"], a["request_id"]) for a in log] == [  # type: ignore[union-attr,index]
                ("/v1/messages", 200, r.headers["request-id"])
            ]

            await assert_health(url)
            status = await get_json(f"{url}/hivemind/status")
            assert [u["url"] for u in status["upstreams"]] == [mock_url]  # type: ignore[index]

            await assert_exits_cleanly(child, signum)


async def test_cli_mock_alone_then_serve_upstream_in_front_of_it(tmp_path: Path) -> None:
    with trio.fail_after(GUARD):
        async with spawn(*MOCK_ARGV, env=child_env(), cwd=tmp_path) as mock:
            mock_url = (await mock.wait_for(MOCK_LISTENING, "stdout"))[1]

            # The mock on its own answers like the provider it imitates.
            direct = await post_message(mock_url)
            assert direct.status_code == 200, direct.text
            assert REPLY in direct.json()["content"][0]["text"]

            argv = [HIVEMIND, "serve", "--port", "0", "--upstream", mock_url]
            async with spawn(*argv, env=child_env(HIVEMIND_SHUTDOWN_GRACE="1"), cwd=tmp_path) as proxy:
                url = (await proxy.wait_for(PROXY_LISTENING, "stdout"))[1]
                r = await post_message(url)
                assert r.status_code == 200, r.text
                assert REPLY in r.json()["content"][0]["text"]
                await assert_health(url)
                await assert_exits_cleanly(proxy, signal.SIGINT)

            log = await get_json(f"{mock_url}/mock/log")
            assert [(a["path"], a["status"], a["request_id"]) for a in log] == [  # type: ignore[union-attr,index]
                ("/v1/messages", 200, direct.headers["request-id"]),
                ("/v1/messages", 200, r.headers["request-id"]),
            ]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
async def test_cli_mock_exits_cleanly_on_signal(tmp_path: Path, sig: signal.Signals) -> None:
    with trio.fail_after(GUARD):
        async with spawn(*MOCK_ARGV, env=child_env(), cwd=tmp_path) as mock:
            await mock.wait_for(MOCK_LISTENING, "stdout")
            await assert_exits_cleanly(mock, sig)


# ------------------------------------------------- strict configuration at start

# (environment, TOML file content or None, what stderr must name)
BAD_CONFIGS = {
    "env-not-an-int": ({"HIVEMIND_PORT": "abc"}, None, ["server.port", '"abc"', "HIVEMIND_PORT"]),
    "env-unknown-var": ({"HIVEMIND_PROT": "8765"}, None, ["HIVEMIND_PROT", "HIVEMIND_PORT"]),
    "file-unknown-key": ({}, "[server]\nprot = 8765\n", ["server.prot", "unknown key", "{file}"]),
    "file-string-for-bool": ({}, '[server]\ninfo_headers = "false"\n', ["server.info_headers", '"false"', "{file}"]),
}


def bad_config_env(case: str, tmp_path: Path) -> tuple[dict[str, str], list[str]]:
    extra, toml, expected = BAD_CONFIGS[case]
    env = child_env(**extra)
    file = tmp_path / "hivemind.toml"
    if toml is not None:
        file.write_text(toml)
        env["HIVEMIND_CONFIG"] = str(file)
    return env, [e.replace("{file}", str(file)) for e in expected]


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
async def test_cli_serve_refuses_bad_config_at_start(case: str, tmp_path: Path) -> None:
    env, expected = bad_config_env(case, tmp_path)
    with trio.fail_after(GUARD):
        async with spawn(HIVEMIND, "serve", env=env, cwd=tmp_path) as child:
            status = await child.wait_exit()
    assert status == 2, child.describe()
    err = child.text("stderr")
    assert err.startswith("hivemind-trio: invalid configuration: "), child.describe()
    for needle in expected:
        assert needle in err, f"{needle!r} not in stderr\n{child.describe()}"
    assert "Traceback" not in err
    assert "listening" not in child.text("stdout")


@pytest.mark.parametrize("workers", [None, "0"], ids=["worker-process", "in-process"])
@pytest.mark.parametrize("case", ["env-not-an-int", "file-unknown-key"])
async def test_hypercorn_module_app_refuses_bad_config_at_start(case: str, workers: str | None, tmp_path: Path) -> None:
    """The app fails its lifespan start-up, so Hypercorn stops by itself.

    Hypercorn logs "Running on ..." just before the failure stops it (its
    worker binds once the lifespan task has finished, however it finished),
    so that line is no sign of success; the exit is.
    """
    env, expected = bad_config_env(case, tmp_path)
    argv = [*HYPERCORN_APP, *(["--workers", workers] if workers is not None else [])]
    with trio.fail_after(GUARD):
        async with spawn(*argv, env=env, cwd=tmp_path) as child:
            status = await child.wait_exit()
    err = child.text("stderr")
    m = re.search(r"^hivemind_trio cannot start: (.*)$", err, re.MULTILINE)
    assert m is not None, child.describe()
    for needle in expected:
        assert needle in m[1], f"{needle!r} not in {m[0]!r}\n{child.describe()}"
    if workers is None and status == 0:
        # Hypercorn 0.18's supervisor (hypercorn/run.py) records the worker's
        # exit status 1, then overwrites it with a second _join_exited() over
        # the already emptied process list: the failure exits 0.  Upstream:
        # pgjones/hypercorn#269 (fix proposed in #372).  `--workers 0` runs
        # the app in-process and does exit non-zero.
        pytest.xfail("hypercorn supervisor loses the worker's failure status (pgjones/hypercorn#269)")
    assert status != 0, child.describe()


# ------------------------------------------------- several workers (SPEC §7.5)


async def test_hypercorn_workers_without_shared_state_are_refused(tmp_path: Path) -> None:
    """N workers, each with its own scheduler, would send N x the upstream's limit."""
    env = child_env(HIVEMIND_UPSTREAM="http://127.0.0.1:9")
    with trio.fail_after(GUARD):
        async with spawn(*HYPERCORN_APP, "--workers", "2", env=env, cwd=tmp_path) as child:
            await child.wait_exit()
    err = child.text("stderr")
    assert re.search(r"hivemind_trio cannot start: 2 worker processes but no shared state", err), child.describe()
    assert 'state = "redis://' in err


async def test_hypercorn_workers_with_shared_state_serve(redis_server, tmp_path: Path) -> None:
    provider = quiet_mock()
    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery:
            port = await nursery.start(serve_mock, provider)
            env = child_env(HIVEMIND_UPSTREAM=f"http://127.0.0.1:{port}", HIVEMIND_STATE=redis_server.url)
            async with spawn(*HYPERCORN_APP, "--workers", "2", env=env, cwd=tmp_path) as child:
                url = (await child.wait_for(HYPERCORN_RUNNING, "stderr"))[1]
                for _ in range(4):
                    assert (await post_message(url)).status_code == 200
                status = await get_json(f"{url}/hivemind/status")
                assert status["state"]["backend"] == "redis" and status["state"]["connected"] is True  # type: ignore[index]
                assert "cannot start" not in child.text("stderr")
            nursery.cancel_scope.cancel()
