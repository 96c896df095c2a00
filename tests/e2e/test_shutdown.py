"""Graceful shutdown (SPEC §8.4): queued requests are told to retry at once."""

from __future__ import annotations

import httpx
import pytest
import trio

from hivemind_trio import Config, ServerConfig, open_proxy
from tests.helpers import answer_lifespan, serve_asgi

GUARD = 20.0


async def test_queued_and_backing_off_requests_get_529_with_retry_after_on_shutdown() -> None:
    calls = 0

    async def limited(scope, receive, send):
        nonlocal calls
        if scope["type"] == "lifespan":
            await answer_lifespan(receive, send)
            return
        calls += 1
        await send({"type": "http.response.start", "status": 429, "headers": [
            (b"content-type", b"application/json"), (b"retry-after", b"30")]})
        await send({"type": "http.response.body",
                    "body": b'{"type":"error","error":{"type":"rate_limit_error","message":"slow down"}}'})

    results: list[httpx.Response] = []
    headers = {"anthropic-version": "2023-06-01", "x-api-key": "sk-test", "content-type": "application/json"}
    async with serve_asgi(limited) as url, httpx.AsyncClient(timeout=GUARD) as client:
        with trio.fail_after(GUARD):
            async with trio.open_nursery() as clients:
                async with open_proxy(Config(upstream=url, server=ServerConfig(shutdown_grace=5.0))) as proxy:

                    async def one() -> None:
                        results.append(await client.post(proxy.url + "/v1/messages", content=b"{}", headers=headers))

                    # The first gets a 429 with retry-after 30 and backs off;
                    # the second then waits in the paused lane's queue.
                    clients.start_soon(one)
                    while calls < 1:
                        await trio.sleep(0.01)
                    clients.start_soon(one)
                    rt = proxy.app.runtime
                    assert rt is not None
                    while sum(lane.statistics().queued for lane in rt.scheduler.lanes.values()) < 1:
                        await trio.sleep(0.01)
                # Leaving open_proxy shut it down: both are answered now, not
                # after the 30 s retry-after (the guard would fire first).
    assert calls == 1
    assert len(results) == 2
    for r in results:
        assert r.status_code == 529
        assert r.json()["error"]["type"] == "overloaded_error"
        assert "shutting down" in r.json()["error"]["message"]
        assert r.headers["retry-after"] == "1"


async def test_a_crashed_dispatcher_stops_the_embedded_proxy(monkeypatch) -> None:
    """SPEC §8.4: a proxy whose scheduler died must not go on serving without it."""
    from hivemind_trio.runtime import scheduler

    def broken(self, now):
        raise RuntimeError("dispatcher bug")

    monkeypatch.setattr(scheduler.Lane, "_dispatch", broken)

    async def ok(scope, receive, send):  # never reached: nothing is admitted
        raise AssertionError("a request went upstream without the scheduler")

    async with serve_asgi(ok) as url:
        with trio.fail_after(GUARD), pytest.RaisesGroup(
            pytest.RaisesExc(RuntimeError, match="dispatcher bug"), flatten_subgroups=True
        ):
            async with open_proxy(Config(upstream=url)) as proxy, httpx.AsyncClient(timeout=GUARD) as client:
                try:
                    await client.post(proxy.url + "/v1/messages", content=b"{}",
                                      headers={"anthropic-version": "2023-06-01", "x-api-key": "k"})
                except httpx.TransportError:
                    pass  # the connection may go down with the server
                await trio.sleep_forever()
