"""Shared state in Redis (SPEC §7.5), end to end: several real proxy
instances (``open_proxy``, each on its own port, each with its own scheduler)
share one real redis-server and one real mock provider.

Every count comes from the mock's own attempt log, never from the proxies'
account of themselves.  Each scenario that shows sharing at work is paired
with the same setup *without* Redis, which overshoots: proof that the
assertion can fail.  The rate window is shrunk from 60 s to ``W`` seconds
(the mock's ``window`` and the proxy's ``ratelimit.WINDOW``) so a scenario
takes seconds; Redis keeps real time, so these tests run on the real clock,
but nothing asserts on a duration: ``trio.fail_after`` guards are reached
only when something is broken.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

import attrs
import httpx
import pytest
import trio

from hivemind_trio import Config, open_proxy
from hivemind_trio.config import BudgetConfig, Route, SchedulerConfig, ServerConfig
from hivemind_trio.core import ratelimit as rl
from hivemind_trio.runtime.serve import Proxy
from hivemind_trio.sim.mock import MockConfig, MockProvider, serve_mock
from hivemind_trio.state.redis import Connection, parse_redis_url
from hivemind_trio.state.shared import SharedState

W = 2.0  # the rate window, scaled down from 60 s
GUARD = 60.0
HEADERS = {"anthropic-version": "2023-06-01", "x-api-key": "sk-fleet-test", "content-type": "application/json"}


@pytest.fixture
def short_window(monkeypatch) -> None:
    monkeypatch.setattr(rl, "WINDOW", W)


@asynccontextmanager
async def fleet(n: int, state: str, *, rpm: int = 0, mock: dict | None = None, scheduler: dict | None = None,
                budget: BudgetConfig | None = None) -> AsyncIterator[tuple[MockProvider, list[Proxy]]]:
    """The mock, and ``n`` proxy instances in front of it sharing ``state``."""
    settings = {"latency": 0.02, "jitter": 0.0, "seed": 7, "output_mean": 100, "output_sd": 0, **(mock or {})}
    provider = MockProvider(MockConfig(**settings))
    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve_mock, provider)
        cfg = Config(
            state=state,
            routes=(Route(name="mock", url=f"http://127.0.0.1:{port}", profile="anthropic", rpm=rpm),),
            server=ServerConfig(shutdown_grace=1.0),
            scheduler=SchedulerConfig(**(scheduler or {})),
            budget=budget or BudgetConfig(ledger="off"),
        )
        async with AsyncExitStack() as stack:
            proxies = [await stack.enter_async_context(open_proxy(cfg)) for _ in range(n)]
            yield provider, proxies
        nursery.cancel_scope.cancel()


async def ask(proxy: Proxy, agent: str, *, max_tokens: int = 64, **headers: str) -> httpx.Response:
    body = {"model": "claude-test", "max_tokens": max_tokens, "messages": [{"role": "user", "content": "status?"}]}
    async with httpx.AsyncClient(base_url=proxy.url, timeout=GUARD) as client:
        return await client.post("/v1/messages", headers={**HEADERS, "x-hivemind-agent": agent, "x-agent-id": agent, **headers}, json=body)


async def burst(proxies: list[Proxy], per_proxy: int) -> list[httpx.Response]:
    out: list[httpx.Response] = []

    async def one(p: Proxy, name: str) -> None:
        out.append(await ask(p, name))

    async with trio.open_nursery() as nursery:
        for i, p in enumerate(proxies):
            for k in range(per_proxy):
                nursery.start_soon(one, p, f"agent-{i}-{k}")
    return out


def most_in_any_window(times: list[float], window: float) -> int:
    """The largest number of ``times`` inside any half-open window of that length."""
    times = sorted(times)
    best = 0
    j = 0
    for i, t in enumerate(times):
        while times[j] <= t - window:
            j += 1
        best = max(best, i - j + 1)
    return best


async def get_status(proxy: Proxy) -> dict:
    async with httpx.AsyncClient(base_url=proxy.url) as client:
        return (await client.get("/hivemind/status")).json()


def shared(proxy: Proxy) -> SharedState:
    assert proxy.app.runtime is not None and proxy.app.runtime.scheduler.shared is not None
    return proxy.app.runtime.scheduler.shared


def lanes(proxy: Proxy):
    assert proxy.app.runtime is not None
    return list(proxy.app.runtime.scheduler.lanes.values())


# -- 1. one rate limit -------------------------------------------------------------------

RPM = 5


async def test_instances_sharing_redis_respect_one_rpm(redis_server, short_window) -> None:
    with trio.fail_after(GUARD):
        async with fleet(3, redis_server.url, rpm=RPM, mock={"rpm": RPM, "window": W}) as (provider, proxies):
            results = await burst(proxies, 4)
    admitted = [a.t for a in provider.attempts if a.status == 200]
    print(f"\nshared: attempts={len(provider.attempts)} most in a window={most_in_any_window(admitted, W)}")
    assert [r.status_code for r in results] == [200] * 12  # every agent served...
    assert not [a for a in provider.attempts if a.status == 429]  # ...without a single upstream 429
    assert most_in_any_window(admitted, W) <= RPM
    assert sum(lane.shared_waits for p in proxies for lane in lanes(p)) > 0  # some had to wait for the fleet


async def test_without_shared_state_the_same_fleet_overshoots(short_window) -> None:
    # The control: each instance paces to the whole limit on its own.
    with trio.fail_after(GUARD):
        async with fleet(3, "", rpm=RPM, mock={"rpm": RPM, "window": W}, scheduler={"retry": False}) as (provider, proxies):
            await burst(proxies, RPM)
    assert len(provider.attempts) > RPM
    assert most_in_any_window([a.t for a in provider.attempts], W) > RPM
    assert [a for a in provider.attempts if a.status == 429]


# -- 2. one window -------------------------------------------------------------------------


@pytest.mark.parametrize("with_redis", [True, False])
async def test_instances_share_one_concurrency_window(redis_server, with_redis: bool) -> None:
    # AIMD off: the window stays at the profile's initial size (8 for anthropic).
    with trio.fail_after(GUARD):
        async with fleet(3, redis_server.url if with_redis else "", mock={"latency": 0.2}, scheduler={"aimd": False}) as (provider, proxies):
            results = await burst(proxies, 10)
            window = lanes(proxies[0])[0].window.limit
    assert [r.status_code for r in results] == [200] * 30
    print(f"\nwith_redis={with_redis} window={window} peak_in_flight={provider.peak_in_flight}")
    if with_redis:
        assert provider.peak_in_flight <= window
    else:
        assert provider.peak_in_flight > window


# -- 3. one budget ---------------------------------------------------------------------------


async def test_budget_spent_through_one_instance_is_refused_by_another(redis_server) -> None:
    budget = BudgetConfig(agent_tokens=1200, ledger="off")
    with trio.fail_after(GUARD):
        async with fleet(2, redis_server.url, budget=budget) as (provider, (a, b)):
            for _ in range(20):
                r = await ask(a, "spender", max_tokens=300)
                if r.status_code == 429:
                    break
                assert r.status_code == 200
            assert r.status_code == 429 and "budget" in r.text
            attempts = len(provider.attempts)
            refused = await ask(b, "spender", max_tokens=300)
            other = await ask(b, "someone-else", max_tokens=300)
            status = await get_status(b)
    assert refused.status_code == 429 and "budget" in refused.text
    assert refused.headers["x-should-retry"] == "false"
    assert other.status_code == 200  # a per-agent budget: others go on
    assert len(provider.attempts) == attempts + 1
    # B's status shows the fleet's usage of the agent, not its own (zero) share.
    assert status["agents"]["spender"]["budget_left"] < 1200


# -- 4. one breaker --------------------------------------------------------------------------


async def test_breaker_trip_on_one_instance_holds_the_others(redis_server) -> None:
    with trio.fail_after(GUARD):
        async with fleet(2, redis_server.url, scheduler={"retry": False}) as (provider, (a, b)):
            for _ in range(5):  # the breaker's consecutive-failure threshold
                r = await ask(a, "a", **{"x-mock-fault": "502"})
                assert r.status_code == 502
            assert lanes(a)[0].breaker.state.value == "open"
            await shared(a).flushed()
            # B's own breaker never saw a failure; the shared one holds it
            # (a 2 s client deadline, shorter than the 5 s cool-down).
            held = await ask(b, "b", **{"x-stainless-timeout": "2"})
    assert lanes(b)[0].breaker.state.value == "closed"
    assert held.status_code == 529 and held.json()["error"]["type"] == "overloaded_error"
    assert int(held.headers["retry-after"]) >= 2  # when the fleet's breaker lets requests out again
    assert not [x for x in provider.attempts if x.agent == "b"]


# -- 5. leases of a crashed instance expire ----------------------------------------------


@pytest.mark.parametrize("crash", [True, False], ids=["crash", "clean-exit"])
async def test_a_crashed_instances_leases_expire_and_capacity_returns(redis_server, crash: bool) -> None:
    crashed_url = redis_server.url + "?lease_ttl=1"
    with trio.fail_after(GUARD):
        async with fleet(1, redis_server.url, scheduler={"aimd": False}) as (provider, (p,)):
            assert (await ask(p, "warm-up")).status_code == 200
            lane = lanes(p)[0]
            leases = f"hivemind:{{{lane.shared_id}}}:leases"
            # Another instance takes the whole window, then goes away.
            async with trio.open_nursery() as nursery:
                ghost = SharedState(parse_redis_url(crashed_url))
                await nursery.start(ghost.run)
                for i in range(lane.window.limit):
                    wait, _ = await ghost.acquire(lane.shared_id, f"ghost:{i}", window=lane.window.limit, rpm=0, tpm=0,
                                                  tokens=1, rate_window=rl.WINDOW, check_rate=True, check_breaker=True)
                    assert wait == 0
                if crash:
                    # No goodbye: its heartbeat stops and nothing is released.
                    ghost.leases.clear()
                nursery.cancel_scope.cancel()
            conn = await Connection.open(parse_redis_url(redis_server.url))
            try:
                left = await conn.command("ZCARD", leases)
            finally:
                await conn.aclose()
            r = await ask(p, "after")
    assert r.status_code == 200
    if crash:
        assert left == lane.window.limit
        assert lane.shared_waits > 0  # it waited for the ghost's leases to expire
    else:
        assert left == 0  # a clean exit hands its leases back at once
        assert lane.shared_waits == 0


# -- 6. Redis goes away and comes back -------------------------------------------------------


async def test_redis_outage_falls_back_to_local_state_and_recovers(redis_server, caplog) -> None:
    caplog.set_level(logging.WARNING, logger="hivemind_trio.state")
    budget = BudgetConfig(agent_tokens=1_000_000, ledger="off")
    with trio.fail_after(GUARD):
        async with fleet(2, redis_server.url, budget=budget) as (provider, (a, b)):
            assert (await ask(a, "x")).status_code == 200
            redis_server.stop()
            during = [await ask(p, "x") for p in (a, b, a, b, a)]
            status = (await get_status(a))["state"]
            async with httpx.AsyncClient(base_url=a.url) as client:
                metrics = (await client.get("/hivemind/metrics")).text
            redis_server.start()  # empty: it lost everything
            await shared(a).wait_connected()
            await shared(b).wait_connected()
            calls = shared(a).calls
            after = await ask(a, "x")
            await shared(a).flushed()
            await shared(b).flushed()
            events = [e["kind"] for e in a.app.runtime.scheduler.events]
    assert [r.status_code for r in during] == [200] * 5
    assert status["backend"] == "redis" and status["connected"] is False
    assert "hivemind_state_connected 0.0" in metrics and "hivemind_state_outages_total 1.0" in metrics
    down = [r for r in caplog.records if "unreachable" in r.getMessage()]
    assert len(down) == 2  # once per instance, not once per request
    assert all("serving on local state" in r.getMessage() for r in down)
    assert [r for r in caplog.records if "is back" in r.getMessage()]
    assert "shared_state_down" in events and "shared_state_up" in events
    assert after.status_code == 200 and shared(a).calls > calls  # shared mode again
    # The usage settled during the outage was replayed into the empty Redis.
    conn = await Connection.open(parse_redis_url(redis_server.url))
    try:
        used = int(await conn.command("HGET", "hivemind:budget:agent|run|x", "used_tokens"))
    finally:
        await conn.aclose()
    assert used > 0


# -- 5b. a long stream keeps its lease alive -----------------------------------------------


async def test_long_streams_renew_their_leases(redis_server) -> None:
    # Leases live 1 s without a heartbeat; the streams run about 3 s.  Were
    # they not renewed, the other instance would see a free window after
    # 1 s and the mock a ninth request in flight.
    url = redis_server.url + "?lease_ttl=1"
    body = {"model": "claude-test", "max_tokens": 64, "stream": True, "messages": [{"role": "user", "content": "go"}]}
    with trio.fail_after(GUARD):
        async with fleet(2, url, mock={"stream_delay": 0.5, "stream_chunks": 6}, scheduler={"aimd": False}) as (provider, (a, b)):
            window = lanes(a)[0].window.limit if lanes(a) else 8
            started = trio.Semaphore(0)

            async def stream(i: int) -> None:
                async with httpx.AsyncClient(base_url=a.url, timeout=GUARD) as client:
                    async with client.stream("POST", "/v1/messages", json=body,
                                             headers={**HEADERS, "x-hivemind-agent": f"s{i}", "x-agent-id": f"s{i}"}) as r:
                        assert r.status_code == 200
                        started.release()
                        async for _ in r.aiter_raw():
                            pass

            async with trio.open_nursery() as nursery:
                for i in range(window):
                    nursery.start_soon(stream, i)
                for _ in range(window):
                    await started.acquire()
                late = await ask(b, "late")
            assert lanes(a)[0].window.limit == window
    assert late.status_code == 200
    assert provider.peak_in_flight <= window


# -- 3b. budget reservations of a crashed instance expire ----------------------------------


@pytest.mark.parametrize("ghost_ttl", [30.0, 0.001], ids=["ghost-alive", "ghost-expired"])
async def test_a_crashed_instances_budget_reservations_expire(redis_server, ghost_ttl: float) -> None:
    budget = BudgetConfig(agent_tokens=5000, ledger="off")
    with trio.fail_after(GUARD):
        async with fleet(1, redis_server.url, budget=budget) as (provider, (p,)):
            sched = p.app.runtime.scheduler
            keys, checks, usd = sched.budget.plan("x", 4900, time.time())
            # Another instance reserves nearly all of x's budget for a request
            # in flight, then dies: no settle, no heartbeat.
            async with trio.open_nursery() as nursery:
                ghost = SharedState(attrs.evolve(parse_redis_url(redis_server.url), lease_ttl=ghost_ttl))
                await nursery.start(ghost.run)
                ok, _, _ = await ghost.budget_reserve(list(keys), checks, 4900, usd, [3600] * len(keys))
                assert ok
                nursery.cancel_scope.cancel()
            r = await ask(p, "x", max_tokens=300)
            await shared(p).flushed()
            conn = await Connection.open(parse_redis_url(redis_server.url))
            try:
                reserved = int(await conn.command("HGET", f"hivemind:budget:{keys[2]}", "reserved_tokens"))
            finally:
                await conn.aclose()
    if ghost_ttl > 1:
        assert r.status_code == 429 and "budget" in r.text  # the ghost's reservation still counts...
        assert reserved == 4900
    else:
        assert r.status_code == 200  # ...until it expires: then it is gone for good
        assert reserved == 0


async def test_requests_admitted_during_an_outage_are_put_on_the_books_on_recovery(redis_server) -> None:
    body = {"model": "claude-test", "max_tokens": 64, "stream": True, "messages": [{"role": "user", "content": "go"}]}
    with trio.fail_after(GUARD):
        async with fleet(1, redis_server.url, mock={"stream_delay": 0.3, "stream_chunks": 6}) as (provider, (p,)):
            assert (await ask(p, "warm-up")).status_code == 200
            lane = lanes(p)[0]
            leases = f"hivemind:{{{lane.shared_id}}}:leases"
            redis_server.stop()
            started = trio.Event()
            release = trio.Event()

            async def stream() -> None:
                async with httpx.AsyncClient(base_url=p.url, timeout=GUARD) as client:
                    async with client.stream("POST", "/v1/messages", json=body, headers={**HEADERS, "x-hivemind-agent": "s"}) as r:
                        assert r.status_code == 200
                        started.set()
                        await release.wait()
                        async for _ in r.aiter_raw():
                            pass

            async with trio.open_nursery() as nursery:
                nursery.start_soon(stream)
                await started.wait()  # admitted on local state: Redis is down
                redis_server.start()
                await shared(p).wait_connected()
                conn = await Connection.open(parse_redis_url(redis_server.url))
                try:
                    during = await conn.command("ZCARD", leases)
                    release.set()
                finally:
                    await conn.aclose()
            await shared(p).flushed()
            conn = await Connection.open(parse_redis_url(redis_server.url))
            try:
                after = await conn.command("ZCARD", leases)
            finally:
                await conn.aclose()
    assert during == 1  # the stream still running holds its lease in the fleet's window
    assert after == 0  # and gives it back when it ends


# -- the in-process transport shares too ---------------------------------------------------


async def test_scheduling_transports_in_two_programs_respect_one_rpm(redis_server, short_window) -> None:
    from hivemind_trio import SchedulingTransport

    provider = MockProvider(MockConfig(latency=0.02, jitter=0.0, seed=7, rpm=RPM, window=W))
    config = Config(state=redis_server.url, budget=BudgetConfig(ledger="off"))
    statuses: list[int] = []
    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery:
            port = await nursery.start(serve_mock, provider)
            body = {"model": "claude-test", "max_tokens": 64, "messages": [{"role": "user", "content": "hi"}]}

            async def program(name: str) -> None:
                async with SchedulingTransport(httpx.AsyncHTTPTransport(), config=config, rpm=RPM) as t:
                    async with httpx.AsyncClient(transport=t, base_url=f"http://127.0.0.1:{port}", timeout=GUARD) as client:
                        await t.scheduler.shared.wait_connected()

                        async def one(k: int) -> None:
                            r = await client.post("/v1/messages", json=body, headers={**HEADERS, "x-agent-id": f"{name}{k}"})
                            statuses.append(r.status_code)

                        async with trio.open_nursery() as calls:
                            for k in range(5):
                                calls.start_soon(one, k)

            async with trio.open_nursery() as programs:
                programs.start_soon(program, "a")
                programs.start_soon(program, "b")
            nursery.cancel_scope.cancel()
    assert statuses == [200] * 10
    assert not [a for a in provider.attempts if a.status == 429]
    assert most_in_any_window([a.t for a in provider.attempts if a.status == 200], W) <= RPM


async def test_an_instance_started_while_redis_is_down_serves_and_joins_later(redis_server, caplog) -> None:
    caplog.set_level(logging.WARNING, logger="hivemind_trio.state")
    redis_server.stop()
    with trio.fail_after(GUARD):
        async with fleet(1, redis_server.url) as (provider, (p,)):
            first = [await ask(p, "early") for _ in range(3)]
            assert not shared(p).up
            redis_server.start()
            await shared(p).wait_connected()
            calls = shared(p).calls
            later = await ask(p, "late")
    assert [r.status_code for r in first] == [200] * 3
    assert later.status_code == 200 and shared(p).calls > calls
    down = [r for r in caplog.records if "unreachable" in r.getMessage()]
    assert len(down) == 1


# -- the scripts are atomic across connections -------------------------------------------


@pytest.mark.parametrize("gate", ["window", "rpm", "tpm"])
async def test_concurrent_acquires_from_many_instances_never_overshoot(redis_server, gate: str) -> None:
    """Eight instances race 40 acquires each for one lane: exactly the limit is granted."""
    limit = 7
    granted: list[str] = []
    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery:
            instances = []
            for _ in range(8):
                s = SharedState(parse_redis_url(redis_server.url))
                await nursery.start(s.run)
                instances.append(s)

            async def race(s: SharedState) -> None:
                for i in range(40):
                    wait, _ = await s.acquire(
                        "race", f"{s.instance}:{i}", window=limit if gate == "window" else 0,
                        rpm=limit if gate == "rpm" else 0, tpm=limit * 100 if gate == "tpm" else 0, tokens=100,
                        rate_window=60.0, check_rate=True, check_breaker=True)
                    if wait == 0:
                        granted.append(f"{s.instance}:{i}")

            async with trio.open_nursery() as racers:
                for s in instances:
                    racers.start_soon(race, s)
            nursery.cancel_scope.cancel()
    assert len(granted) == limit
