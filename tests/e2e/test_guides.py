"""docs/agents.md, checked: each client set up as the guide says (by argument
and by environment variable) talks to a real proxy in front of the mock, is
attributed to the agent and priority its headers name, and the provider never
sees an ``x-hivemind-*`` header.

The Claude Code and Codex guides are checked in test_agent_clis.py (real
CLIs); aider only runs here when it is on PATH (it is not a test dependency).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anthropic
import attrs
import httpx
import ollama
import openai
import pytest
import trio

from hivemind_trio import Config, ServerConfig, open_proxy
from hivemind_trio.runtime.serve import Proxy
from hivemind_trio.sim.mock import MockConfig, MockProvider, serve_mock
from tests.e2e.test_agent_clis import HeaderLog

REPLY = "GUIDE-E2E-REPLY-91f3"
GUARD = 60.0
QUESTION = "hello there"


@attrs.define
class Guide:
    provider: MockProvider
    proxy: Proxy
    upstream: HeaderLog

    @property
    def url(self) -> str:
        return self.proxy.url

    async def status(self) -> dict[str, Any]:
        async with httpx.AsyncClient(base_url=self.url) as client:
            r = await client.get("/hivemind/status")
        assert r.status_code == 200, r.text
        return r.json()

    async def check(self, agent: str, priority: str, requests: int = 1) -> None:
        """The proxy attributed ``requests`` successful requests to ``agent`` at
        ``priority``, and nothing of its own went upstream."""
        status = await self.status()
        a = status["agents"].get(agent)
        assert a is not None, (agent, status["agents"])
        assert (a["priority"], a["requests"], a["by_status"]) == (priority, requests, {"200": requests}), (agent, a)
        assert self.upstream.sent, "nothing went upstream"
        for method, path, headers in self.upstream.sent:
            own = [k for k, _ in headers if k.lower().startswith(b"x-hivemind-")]
            assert own == [], f"{method} {path} went upstream with {own}"


@asynccontextmanager
async def guide() -> AsyncIterator[Guide]:
    provider = MockProvider(MockConfig(latency=0.0, jitter=0.0, seed=9, stream_delay=0.0, reply_text=REPLY))  # type: ignore[arg-type]
    upstream = HeaderLog()
    try:
        with trio.fail_after(GUARD):
            async with trio.open_nursery() as nursery:
                port = await nursery.start(serve_mock, provider)
                config = Config(upstream=f"http://127.0.0.1:{port}", server=ServerConfig(shutdown_grace=1.0))
                async with open_proxy(config, transport=upstream) as proxy:
                    yield Guide(provider, proxy, upstream)
                nursery.cancel_scope.cancel()
    finally:
        await upstream.aclose()


async def in_thread(fn: Callable[[], Any]) -> Any:
    return await trio.to_thread.run_sync(fn)


# ------------------------------------------------------------------ the SDKs


async def test_anthropic_sdk(monkeypatch: pytest.MonkeyPatch) -> None:
    async with guide() as g:

        def by_argument() -> str:
            with anthropic.Anthropic(base_url=g.url, api_key="sk-ant-guide", max_retries=0,
                                     default_headers={"x-hivemind-agent": "summariser", "x-hivemind-priority": "low"}) as c:
                msg = c.messages.create(model="claude-test", max_tokens=64, messages=[{"role": "user", "content": QUESTION}])
            return msg.content[0].text  # type: ignore[union-attr]

        assert REPLY in await in_thread(by_argument)
        await g.check("summariser", "low")

        # ANTHROPIC_BASE_URL, and a per-request priority over the default one.
        monkeypatch.setenv("ANTHROPIC_BASE_URL", g.url)

        def by_env() -> str:
            with anthropic.Anthropic(api_key="sk-ant-guide", max_retries=0,
                                     default_headers={"x-hivemind-agent": "summariser-env", "x-hivemind-priority": "low"}) as c:
                msg = c.messages.create(model="claude-test", max_tokens=64, messages=[{"role": "user", "content": QUESTION}],
                                        extra_headers={"x-hivemind-priority": "high"})
            return msg.content[0].text  # type: ignore[union-attr]

        assert REPLY in await in_thread(by_env)
        await g.check("summariser-env", "high")


async def test_openai_sdk(monkeypatch: pytest.MonkeyPatch) -> None:
    async with guide() as g:

        def by_argument() -> str:
            with openai.OpenAI(base_url=f"{g.url}/v1", api_key="sk-guide", max_retries=0,
                               default_headers={"x-hivemind-agent": "crawler-2"}) as c:
                r = c.chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": QUESTION}])
            return r.choices[0].message.content or ""

        assert REPLY in await in_thread(by_argument)
        await g.check("crawler-2", "normal")

        monkeypatch.setenv("OPENAI_BASE_URL", f"{g.url}/v1")

        def by_env() -> str:
            with openai.OpenAI(api_key="sk-guide", max_retries=0,
                               default_headers={"x-hivemind-agent": "crawler-env", "x-hivemind-priority": "critical"}) as c:
                r = c.responses.create(model="gpt-test", input=QUESTION)
            return r.output_text

        assert REPLY in await in_thread(by_env)
        await g.check("crawler-env", "critical")


# ------------------------------------------------------------------ LangChain


async def test_langchain_chat_models(monkeypatch: pytest.MonkeyPatch) -> None:
    langchain_anthropic = pytest.importorskip("langchain_anthropic")
    langchain_openai = pytest.importorskip("langchain_openai")
    monkeypatch.delenv("LANGSMITH_TRACING", raising=False)
    monkeypatch.delenv("LANGCHAIN_TRACING_V2", raising=False)
    async with guide() as g:
        claude = langchain_anthropic.ChatAnthropic(
            model="claude-test", base_url=g.url, api_key="sk-ant-guide", max_retries=0, max_tokens=64,
            default_headers={"x-hivemind-agent": "lc-planner"})
        gpt = langchain_openai.ChatOpenAI(
            model="gpt-test", base_url=f"{g.url}/v1", api_key="sk-guide", max_retries=0,
            default_headers={"x-hivemind-agent": "lc-writer", "x-hivemind-priority": "low"})
        assert REPLY in (await in_thread(lambda: claude.invoke(QUESTION))).text
        await g.check("lc-planner", "normal")
        assert REPLY in (await in_thread(lambda: gpt.invoke(QUESTION))).text
        await g.check("lc-writer", "low")

        # The environment variables the guide names.
        monkeypatch.setenv("ANTHROPIC_BASE_URL", g.url)
        monkeypatch.delenv("ANTHROPIC_API_URL", raising=False)
        monkeypatch.setenv("OPENAI_API_BASE", f"{g.url}/v1")
        claude_env = langchain_anthropic.ChatAnthropic(
            model="claude-test", api_key="sk-ant-guide", max_retries=0, max_tokens=64,
            default_headers={"x-hivemind-agent": "lc-planner-env", "x-hivemind-priority": "high"})
        gpt_env = langchain_openai.ChatOpenAI(
            model="gpt-test", api_key="sk-guide", max_retries=0, default_headers={"x-hivemind-agent": "lc-writer-env"})
        assert REPLY in (await in_thread(lambda: claude_env.invoke(QUESTION))).text
        assert REPLY in (await in_thread(lambda: gpt_env.invoke(QUESTION))).text
        await g.check("lc-planner-env", "high")
        await g.check("lc-writer-env", "normal")


# ------------------------------------------------------------------ Ollama


async def test_ollama_client(monkeypatch: pytest.MonkeyPatch) -> None:
    async with guide() as g:

        def by_argument() -> str:
            with ollama.Client(host=g.url, headers={"x-hivemind-agent": "local-batch", "x-hivemind-priority": "low"}) as c:
                r = c.chat(model="llama3", messages=[{"role": "user", "content": QUESTION}], stream=False)
            return r.message.content or ""

        assert REPLY in await in_thread(by_argument)
        await g.check("local-batch", "low")

        monkeypatch.setenv("OLLAMA_HOST", g.url)

        def by_env() -> str:
            with ollama.Client(headers={"x-hivemind-agent": "local-env"}) as c:
                return "".join(part.message.content or "" for part in c.chat(
                    model="llama3", messages=[{"role": "user", "content": QUESTION}], stream=True))

        assert REPLY in await in_thread(by_env)
        await g.check("local-env", "normal")


# ------------------------------------------------------------------ aider (when installed)


@pytest.mark.skipif(shutil.which("aider") is None,
                    reason="aider is not on PATH (not a test dependency: `pip install aider-chat` in its own venv)")
async def test_aider(tmp_path: Path) -> None:
    aider = shutil.which("aider")
    assert aider is not None
    work = tmp_path / "work"
    work.mkdir()
    (work / ".aider.model.settings.yml").write_text(
        "- name: aider/extra_params\n  extra_params:\n    extra_headers:\n"
        "      x-hivemind-agent: aider-1\n      x-hivemind-priority: low\n")
    base = {k: os.environ[k] for k in ("PATH", "LANG", "TMPDIR") if k in os.environ}
    base |= {"HOME": str(tmp_path / "home"), "LITELLM_LOCAL_MODEL_COST_MAP": "True", "NO_COLOR": "1", "TERM": "dumb"}
    argv = [aider, "--message", "Reply with a short greeting.", "--yes-always", "--no-git", "--no-show-model-warnings",
            "--no-check-update", "--analytics-disable", "--no-pretty"]
    async with guide() as g:
        runs = (
            (["--model", "openai/gpt-test"], {"OPENAI_API_BASE": f"{g.url}/v1", "OPENAI_API_KEY": "sk-guide"}),
            (["--model", "anthropic/claude-test"], {"ANTHROPIC_API_BASE": g.url, "ANTHROPIC_API_KEY": "sk-ant-guide"}),
        )
        for n, (extra, env) in enumerate(runs, 1):
            with trio.fail_after(120):
                run = await trio.run_process(argv + extra, cwd=work, env=base | env, stdin=subprocess.DEVNULL,
                                             capture_stdout=True, capture_stderr=True, check=False)
            out = run.stdout.decode(errors="replace")
            assert run.returncode == 0, (out, run.stderr.decode(errors="replace"))
            assert REPLY in out, out  # the mock's answer was printed
            status = await g.status()
            assert status["agents"]["aider-1"]["priority"] == "low"
            assert status["agents"]["aider-1"]["requests"] >= n
        await g.check("aider-1", "low", requests=status["agents"]["aider-1"]["requests"])
