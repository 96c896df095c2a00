"""SPEC §3.9: each ``response.create`` frame on a relayed WebSocket passes the
scheduler like an HTTP request."""

from __future__ import annotations

import json

import trio
import trio_websocket

from hivemind_trio import Config, Route, open_proxy
from hivemind_trio.config import BudgetConfig
from tests.e2e.test_transparency import Recorder
from tests.helpers import serve_asgi

GUARD = 20.0


class ResponsesOverWebSocket:
    """Answers each response.create with two deltas and a response.completed."""

    def __init__(self) -> None:
        self.creates = 0

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan":
            await Recorder()(scope, receive, send)
            return
        if scope["type"] != "websocket":
            return
        assert (await receive())["type"] == "websocket.connect"
        await send({"type": "websocket.accept"})
        while True:
            m = await receive()
            if m["type"] == "websocket.disconnect":
                return
            event = json.loads(m["text"])
            if event["type"] != "response.create":
                continue
            self.creates += 1
            n = self.creates
            for text in ("hel", "lo"):
                await send({"type": "websocket.send", "text": json.dumps({"type": "response.output_text.delta", "delta": text})})
            await send({"type": "websocket.send", "text": json.dumps({
                "type": "response.completed",
                "response": {"id": f"resp_{n}", "usage": {"input_tokens": 40, "output_tokens": 7, "total_tokens": 47}},
            })})


async def test_response_create_frames_are_admitted_and_accounted() -> None:
    up = ResponsesOverWebSocket()
    async with serve_asgi(up) as url, open_proxy(Config(upstream=url)) as proxy:
        async with trio_websocket.open_websocket(
            "127.0.0.1", proxy.port, "/v1/responses", use_ssl=False,
            extra_headers=[(b"authorization", b"Bearer sk-test"), (b"x-hivemind-agent", b"codex-ws")],
        ) as ws:
            with trio.fail_after(GUARD):
                for _ in range(2):
                    await ws.send_message(json.dumps({"type": "response.create", "model": "gpt-5", "input": "hi"}))
                    kinds = [json.loads(await ws.get_message())["type"] for _ in range(3)]
                    assert kinds == ["response.output_text.delta"] * 2 + ["response.completed"]
        status = proxy.app.runtime.status()
    agent = status["agents"]["codex-ws"]
    assert (agent["requests"], agent["in_flight"]) == (2, 0)
    assert (agent["input_tokens"], agent["output_tokens"]) == (80, 14)
    [lane] = status["lanes"]
    assert (lane["admitted"], lane["in_flight"]) == (2, 0)


async def test_a_paced_lane_holds_the_next_response_create() -> None:
    """One request per minute on this route: the second response.create is held
    by the proxy, not sent upstream."""
    up = ResponsesOverWebSocket()
    async with serve_asgi(up) as url:
        config = Config(routes=(Route(name="paced", url=url, prefix="/", rpm=1),))
        async with open_proxy(config) as proxy:
            async with trio_websocket.open_websocket(
                "127.0.0.1", proxy.port, "/v1/responses", use_ssl=False,
                extra_headers=[(b"authorization", b"Bearer sk-test"), (b"x-hivemind-agent", b"codex-ws")],
            ) as ws:
                with trio.fail_after(GUARD):
                    await ws.send_message(json.dumps({"type": "response.create", "model": "gpt-5", "input": "1"}))
                    for _ in range(3):
                        await ws.get_message()
                    await ws.send_message(json.dumps({"type": "response.create", "model": "gpt-5", "input": "2"}))
                    rt = proxy.app.runtime
                    while rt.status()["lanes"][0]["queued"] < 1:
                        await trio.sleep(0.01)
                # Held in the lane's queue (for most of a minute), never sent on.
                assert up.creates == 1
                assert rt.status()["agents"]["codex-ws"]["requests"] == 2


async def test_response_create_frames_take_budget_and_are_refused_once_it_is_spent() -> None:
    """Each turn reserves its estimate; the terminal event's usage replaces it;
    a turn over the agent's budget gets an error event and never goes upstream."""
    up = ResponsesOverWebSocket()
    # Reserved per turn: its estimate (input bytes / 4 + max_output_tokens 60);
    # used per turn: 47.  Two turns fit in 150, a third reservation does not.
    budget = BudgetConfig(agent_tokens=150, ledger="off")
    async with serve_asgi(up) as url, open_proxy(Config(upstream=url, budget=budget)) as proxy:
        async with trio_websocket.open_websocket(
            "127.0.0.1", proxy.port, "/v1/responses", use_ssl=False,
            extra_headers=[(b"authorization", b"Bearer sk-test"), (b"x-hivemind-agent", b"codex-ws")],
        ) as ws:
            create = json.dumps({"type": "response.create", "model": "gpt-5", "input": "hi", "max_output_tokens": 60})
            with trio.fail_after(GUARD):
                for _ in range(2):
                    await ws.send_message(create)
                    kinds = [json.loads(await ws.get_message())["type"] for _ in range(3)]
                    assert kinds[-1] == "response.completed"
                    status = proxy.app.runtime.status()
                    # Settled to the reported usage: nothing still reserved.
                    assert status["agents"]["codex-ws"]["in_flight"] == 0
                assert proxy.app.runtime.status()["agents"]["codex-ws"]["budget_left"] == 150 - 2 * 47
                await ws.send_message(create)
                refusal = json.loads(await ws.get_message())
        status = proxy.app.runtime.status()
    assert refusal["type"] == "error" and refusal["status"] == 429
    assert refusal["error"]["type"] == "insufficient_quota"
    assert "budget" in refusal["error"]["message"]
    assert up.creates == 2
    agent = status["agents"]["codex-ws"]
    assert (agent["requests"], agent["budget_refusals"]) == (3, 1)
