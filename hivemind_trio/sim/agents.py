"""Simulated agents for the bench (SCENARIOS.md, "The agents").

An agent runs ``turns`` sequential turns: a 200-character prompt to
``/v1/messages``, the reply read whole, ``think`` seconds of thinking, the
next turn.  It names itself with ``x-hivemind-agent`` (read by the proxy,
never forwarded) and ``x-agent-id`` (forwarded untouched, so the mock's
attempt log can attribute every attempt to its agent through the proxy too).

Two kinds:

* ``raw`` -- plain httpx, no retries: the first non-200 answer or transport
  error kills the agent (the paper's agents);
* ``sdk`` -- the official ``anthropic`` SDK (``AsyncAnthropic``) with its
  default retries (2 retries, exponential backoff, honouring ``retry-after``
  and ``x-should-retry``); it dies when the SDK finally raises.

Every clock read and every sleep goes through Trio (the SDK sleeps through
anyio, which follows Trio's clock), so agents run under a ``MockClock``
exactly as under the real one.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from typing import Any

import attrs
import httpx
import trio

__all__ = ["AGENT_KINDS", "AgentResult", "make_prompt", "run_agent"]

AGENT_KINDS = ("raw", "sdk")
PROMPT_CHARS = 200
MODEL = "claude-bench"
API_KEY = "sk-bench-not-a-key"
ANTHROPIC_VERSION = "2023-06-01"
TIMEOUT = 600.0  # seconds, the SDK's default; the raw agents use the same

_WORDS = (
    "refactor the parser module and keep the public interface stable while adding "
    "tests for every edge case found in the failing build log of the nightly run "
    "then summarise the diff for review and list the risks"
).split()


def make_prompt(rng: random.Random, chars: int = PROMPT_CHARS) -> str:
    """A prompt of exactly ``chars`` characters of plausible words."""
    words: list[str] = []
    length = 0
    while length < chars:
        w = rng.choice(_WORDS)
        words.append(w)
        length += len(w) + 1
    return " ".join(words)[:chars]


@attrs.define
class AgentResult:
    """What one agent did, from its own side (the mock's log is the other side)."""

    name: str
    kind: str
    turns: int  # planned
    turns_done: int = 0
    requests_sent: int = 0  # HTTP requests that left the agent (SDK retries included)
    died: str | None = None  # why, when it died
    latencies: list[float] = attrs.field(factory=list)  # per successful turn, seconds
    started: float = 0.0
    finished: float = 0.0

    @property
    def alive(self) -> bool:
        return self.died is None

    def to_json(self) -> dict[str, Any]:
        return attrs.asdict(self)


def _body(prompt: str, max_tokens: int, stream: bool) -> dict[str, Any]:
    body: dict[str, Any] = {"model": MODEL, "max_tokens": max_tokens, "messages": [{"role": "user", "content": prompt}]}
    if stream:
        body["stream"] = True
    return body


def _stream_complete(text: str) -> bool:
    """A whole Anthropic SSE stream: ends with message_stop and carries no error event."""
    return "event: message_stop" in text and "event: error" not in text


async def _raw_turn(client: httpx.AsyncClient, res: AgentResult, headers: dict[str, str], body: dict[str, Any]) -> str | None:
    """One turn; returns why the agent dies, or None."""
    res.requests_sent += 1
    try:
        if body.get("stream"):
            async with client.stream("POST", "/v1/messages", json=body, headers=headers) as r:
                text = (await r.aread()).decode("utf-8", "replace")
            if r.status_code != 200:
                return f"HTTP {r.status_code}"
            if not _stream_complete(text):
                return "stream error"
            return None
        r = await client.post("/v1/messages", json=body, headers=headers)
        if r.status_code != 200:
            return f"HTTP {r.status_code}"
        data = r.json()
        if data.get("type") != "message":
            return "bad reply"
        return None
    except httpx.HTTPError as exc:
        return type(exc).__name__
    except (json.JSONDecodeError, UnicodeDecodeError):
        return "bad reply"


async def _run_raw(base_url: str, res: AgentResult, prompts: list[str], *, think: float, max_tokens: int,
                   stream: bool, on_turn: Callable[[bool], None]) -> None:
    headers = {
        "x-api-key": API_KEY, "anthropic-version": ANTHROPIC_VERSION, "content-type": "application/json",
        "x-hivemind-agent": res.name, "x-agent-id": res.name,
    }
    async with httpx.AsyncClient(base_url=base_url, timeout=httpx.Timeout(TIMEOUT, connect=5.0)) as client:
        for i, prompt in enumerate(prompts):
            if i:
                await trio.sleep(think)
            t0 = trio.current_time()
            why = await _raw_turn(client, res, headers, _body(prompt, max_tokens, stream))
            if why is not None:
                res.died = why
                return
            res.latencies.append(trio.current_time() - t0)
            res.turns_done += 1
            on_turn(True)


async def _run_sdk(base_url: str, res: AgentResult, prompts: list[str], *, think: float, max_tokens: int,
                   stream: bool, on_turn: Callable[[bool], None]) -> None:
    import anthropic

    async def count(_request: Any) -> None:
        res.requests_sent += 1

    http_client = anthropic.DefaultAsyncHttpxClient(event_hooks={"request": [count]})
    client = anthropic.AsyncAnthropic(
        base_url=base_url, api_key=API_KEY, http_client=http_client,
        default_headers={"x-hivemind-agent": res.name, "x-agent-id": res.name},
    )
    async with client:
        for i, prompt in enumerate(prompts):
            if i:
                await trio.sleep(think)
            t0 = trio.current_time()
            try:
                messages = [{"role": "user", "content": prompt}]
                if stream:
                    async with client.messages.stream(model=MODEL, max_tokens=max_tokens, messages=messages) as s:
                        await s.get_final_message()
                else:
                    await client.messages.create(model=MODEL, max_tokens=max_tokens, messages=messages)
            except anthropic.APIStatusError as exc:
                res.died = f"HTTP {exc.status_code}"
                return
            except anthropic.APIError as exc:
                res.died = type(exc).__name__
                return
            res.latencies.append(trio.current_time() - t0)
            res.turns_done += 1
            on_turn(True)


async def run_agent(
    kind: str,
    base_url: str,
    name: str,
    turns: int,
    *,
    rng: random.Random,
    think: float = 0.05,
    max_tokens: int = 1024,
    stream: bool = False,
    on_turn: Callable[[bool], None] = lambda ok: None,
    result: AgentResult | None = None,
) -> AgentResult:
    """Run one agent to its end (all turns done, or dead); never raises for an
    HTTP failure.  ``result`` (filled in as it goes) is the one returned, so a
    caller that cancels the agent still has what it did."""
    if kind not in AGENT_KINDS:
        raise ValueError(f"agent kind must be one of {', '.join(AGENT_KINDS)}, got {kind!r}")
    res = result if result is not None else AgentResult(name=name, kind=kind, turns=turns)
    res.started = trio.current_time()
    prompts = [make_prompt(rng) for _ in range(turns)]
    runner = _run_raw if kind == "raw" else _run_sdk
    try:
        await runner(base_url, res, prompts, think=think, max_tokens=max_tokens, stream=stream, on_turn=on_turn)
    finally:
        res.finished = trio.current_time()
    return res
