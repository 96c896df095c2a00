#!/usr/bin/env python3
"""Take docs/dashboard.png: the dashboard of a proxy under load.

Starts the built-in mock provider (a tight request window, some latency and a
few 502s) and a proxy in front of it, all on loopback ephemeral ports, drives
traffic from several agents at different priorities on two lanes (two API
keys), forces a burst of 502s on the second lane so its breaker opens, and
screenshots ``/hivemind/`` with headless Chromium (Debian's ``chromium``,
driven by Playwright) while the load flows.  Stops by itself.

    .venv/bin/python scripts/dashboard_screenshot.py [--out docs/dashboard.png] [--seconds 20]

Needs the ``test`` extra (Playwright) and a Chromium binary (``chromium`` on
PATH, or ``HIVEMIND_CHROMIUM``).
"""

from __future__ import annotations

import argparse
import collections
import logging
import os
import shutil
import sys
from pathlib import Path

import httpx
import trio

from hivemind_trio import Config, ServerConfig, open_proxy
from hivemind_trio.config import BudgetConfig
from hivemind_trio.sim.mock import MockConfig, MockProvider, serve_mock

ROOT = Path(__file__).resolve().parent.parent

# (agent, priority, API key, workers, pause between requests in seconds)
AGENTS = [
    ("reviewer", "critical", "sk-team-a", 1, 0.8),
    ("planner", "high", "sk-team-a", 1, 0.3),
    ("coder-1", "normal", "sk-team-a", 2, 0.0),
    ("coder-2", "normal", "sk-team-a", 2, 0.1),
    ("indexer-a", "low", "sk-team-a", 4, 0.0),
    ("indexer-b", "low", "sk-team-a", 3, 0.0),
    ("batch-job", "low", "sk-team-b", 2, 0.2),
]


def find_chromium() -> str:
    for candidate in (os.environ.get("HIVEMIND_CHROMIUM"), shutil.which("chromium"),
                      shutil.which("chromium-browser"), "/usr/lib/chromium/chromium"):
        if candidate and Path(candidate).exists():
            return candidate
    sys.exit("no Chromium found: apt-get install chromium, or set HIVEMIND_CHROMIUM")


def body(n: int) -> dict:
    return {"model": "claude-sonnet-4-5", "max_tokens": 1024,
            "messages": [{"role": "user", "content": f"step {n}: " + "context " * 60}]}


async def agent_loop(url: str, name: str, priority: str, key: str, pause: float, stop: trio.Event) -> None:
    headers = {"x-api-key": key, "anthropic-version": "2023-06-01",
               "x-hivemind-agent": name, "x-hivemind-priority": priority}
    async with httpx.AsyncClient(base_url=url, timeout=60.0) as client:
        n = 0
        while not stop.is_set():
            n += 1
            try:
                r = await client.post("/v1/messages", json=body(n), headers=headers)
                failed = r.status_code >= 400
            except httpx.HTTPError:
                failed = True
            # A refused agent (spent budget) backs off instead of spinning.
            await trio.sleep(pause + (1.5 if failed else 0.0))


async def fault_burst(url: str, delay: float) -> None:
    """Six requests whose every attempt fails (502): the team-b lane's breaker opens."""
    await trio.sleep(delay)
    headers = {"x-api-key": "sk-team-b", "anthropic-version": "2023-06-01",
               "x-hivemind-agent": "flaky-tool", "x-hivemind-priority": "normal", "x-mock-fault": "502"}
    async with httpx.AsyncClient(base_url=url, timeout=60.0) as client, trio.open_nursery() as nursery:
        for i in range(6):
            nursery.start_soon(partial_post, client, headers, i)


async def partial_post(client: httpx.AsyncClient, headers: dict, n: int) -> None:
    try:
        await client.post("/v1/messages", json=body(n), headers=headers)
    except httpx.HTTPError:
        pass


def screenshot(page_url: str, out: Path, chromium: str, seconds: float) -> None:
    """Open the dashboard as the load starts (its req/s sparkline fills in) and
    take the picture ``seconds`` later."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1500, "height": 700}, device_scale_factor=1)
            page.goto(page_url)
            page.wait_for_timeout(seconds * 1000)
            page.wait_for_selector("tr[data-agent]")
            try:  # a lane pause (its countdown) in the picture, if one comes soon
                page.wait_for_selector(".lane .pause", timeout=8000)
            except PlaywrightTimeout:
                pass
            page.screenshot(path=str(out), full_page=True)
        finally:
            browser.close()


async def main(out: Path, seconds: float) -> None:
    chromium = find_chromium()
    provider = MockProvider(MockConfig(
        rpm=90, window=15.0, latency=0.7, jitter=0.25, output_mean=350, output_sd=120,
        error_rate=0.03, seed=7, stream_delay=0.0,
    ))
    stop = trio.Event()
    async with trio.open_nursery() as outer:
        port = await outer.start(serve_mock, provider)
        config = Config(
            upstream=f"http://127.0.0.1:{port}",
            server=ServerConfig(shutdown_grace=1.0, log_level="warning"),  # type: ignore[call-arg]
            budget=BudgetConfig(agent_tokens=18000, ledger="off"),
        )
        async with open_proxy(config) as proxy:
            with trio.fail_after(seconds + 60):
                async with trio.open_nursery() as load:
                    for name, priority, key, workers, pause in AGENTS:
                        for _ in range(workers):
                            load.start_soon(agent_loop, proxy.url, name, priority, key, pause, stop)
                    load.start_soon(fault_burst, proxy.url, max(0.0, seconds - 2.5))
                    await trio.to_thread.run_sync(screenshot, proxy.url.rstrip("/") + "/hivemind/", out, chromium, seconds)
                    async with httpx.AsyncClient() as client:
                        status = (await client.get(proxy.url.rstrip("/") + "/hivemind/status")).json()
                    stop.set()
                    load.cancel_scope.cancel()
        outer.cancel_scope.cancel()
    kinds = collections.Counter(e["kind"] for e in status["events"])
    print(f"wrote {out}; events: {dict(kinds)}; lanes: "
          + ", ".join(f"{lane['key']} breaker={lane['breaker']} paused_for={lane['paused_for']}" for lane in status["lanes"]))


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "dashboard.png")
    ap.add_argument("--seconds", type=float, default=20.0, help="load before the screenshot")
    args = ap.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    logging.disable(logging.WARNING)  # the proxy's per-request and budget lines
    trio.run(main, args.out, args.seconds)
