"""``GET /hivemind/``: the live dashboard (SPEC §7.1), in headless Chromium.

The browser is the system's Chromium (Debian's ``chromium`` package, which
``.ci/run`` installs) driven by Playwright's sync API in a worker thread
(``trio.to_thread.run_sync``) while the proxy, the mock provider and the test
traffic run in the Trio loop; Playwright's own browser downloads are never
used.  Without Playwright or Chromium these tests skip, except under
``CI=true``, where they fail: CI must run them.

* Live: a real proxy in front of the mock, agents sending requests in the
  background; the page loads without a console error, page error or dialog,
  its figures (an agent's request count, a lane's admissions, the header's
  total) go up while the traffic flows, a burst of 502s on a second API key
  shows that lane's breaker open and a ``breaker open`` event, and an agent
  named with HTML is shown as text.
* Rendering: the page served by a real proxy with its status request answered
  by the test (``page.route``) with a hand-made status holding every state: a
  pause that counts down between polls, every breaker state, rate-limit and
  budget bars, queue counts by priority, repeated events folded into one line,
  and markup in every client-controlled string, shown as text.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from hivemind_trio import Config, ServerConfig, open_proxy
from hivemind_trio.admin.dashboard import dashboard_page
from hivemind_trio.config import BudgetConfig
from hivemind_trio.runtime.serve import Proxy
from hivemind_trio.sim.mock import MockConfig, MockProvider, serve_mock

GUARD = 60.0  # seconds: only ever reached when something is broken
MSG = {"model": "claude-test", "max_tokens": 64, "messages": [{"role": "user", "content": "hello there"}]}
# An agent name that is markup: it must appear as these characters, never as an element.
EVIL = '<img src=x onerror="window.__pwned=1"><b>mallory</b>'


# ------------------------------------------------------------------ the browser


def _chromium_path() -> str | None:
    for candidate in (os.environ.get("HIVEMIND_CHROMIUM"), shutil.which("chromium"),
                      shutil.which("chromium-browser"), "/usr/lib/chromium/chromium"):
        if candidate and Path(candidate).exists():
            return candidate
    return None


@pytest.fixture
def chromium() -> str:
    """The Chromium binary; skip (fail under CI) without it or without Playwright."""
    reason = None
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        reason = "Playwright is not installed (pip install -e '.[test]')"
    path = _chromium_path()
    if reason is None and path is None:
        reason = "no Chromium binary (apt-get install chromium, or set HIVEMIND_CHROMIUM)"
    if reason is not None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{reason}; CI=true, so the dashboard browser tests must run, not skip")
        pytest.skip(reason)
    assert path is not None
    return path


class Browser:
    """One headless Chromium page, used from a worker thread (sync API), that
    records every console error or warning, page error and dialog."""

    def __init__(self, executable: str) -> None:
        from playwright.sync_api import sync_playwright

        self._pw = sync_playwright().start()
        try:
            self._browser = self._pw.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        except BaseException:
            self._pw.stop()
            raise
        self.problems: list[str] = []
        self.page = self._browser.new_page(viewport={"width": 1400, "height": 900})
        self.page.set_default_timeout(20_000)
        self.page.on("console", self._console)
        self.page.on("pageerror", lambda exc: self.problems.append(f"page error: {exc}"))
        self.page.on("dialog", self._dialog)

    def _console(self, msg) -> None:
        if msg.type in ("error", "warning", "assert"):
            self.problems.append(f"console {msg.type}: {msg.text}")

    def _dialog(self, dialog) -> None:
        self.problems.append(f"dialog {dialog.type}: {dialog.message}")
        dialog.dismiss()

    def close(self) -> None:
        try:
            self._browser.close()
        finally:
            self._pw.stop()

    def number(self, selector: str) -> int:
        """The integer shown by the first element matching ``selector``."""
        text = self.page.text_content(selector) or ""
        digits = re.sub(r"[^\d]", "", text)
        assert digits, f"no number in {selector!r}: {text!r}"
        return int(digits)

    def wait_until_above(self, selector: str, value: int) -> int:
        self.page.wait_for_function(
            "([sel, n]) => { const e = document.querySelector(sel);"
            " return e !== null && Number(e.textContent.replace(/[^0-9]/g, '')) > n; }",
            arg=[selector, value],
        )
        return self.number(selector)


async def in_browser(executable: str, fn: Callable[[Browser], Any]) -> Any:
    """Run ``fn`` with a fresh browser in a worker thread (the Trio loop keeps
    serving the proxy and the traffic meanwhile)."""

    def run() -> Any:
        browser = Browser(executable)
        try:
            return fn(browser)
        finally:
            browser.close()

    with trio.fail_after(GUARD):
        return await trio.to_thread.run_sync(run)


# ------------------------------------------------------------------ the proxy


@asynccontextmanager
async def mock_behind_proxy(**budget: Any) -> AsyncIterator[tuple[MockProvider, Proxy]]:
    provider = MockProvider(MockConfig(latency=0.05, jitter=0.0, seed=5, stream_delay=0.0))
    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve_mock, provider)
        config = Config(upstream=f"http://127.0.0.1:{port}", server=ServerConfig(shutdown_grace=1.0),
                        budget=BudgetConfig(ledger="off", **budget))
        async with open_proxy(config) as proxy:
            yield provider, proxy
        nursery.cancel_scope.cancel()


def _headers(agent: str, *, key: str = "sk-test", priority: str = "normal", **extra: str) -> dict[str, str]:
    return {"x-api-key": key, "anthropic-version": "2023-06-01", "x-hivemind-agent": agent,
            "x-hivemind-priority": priority, **extra}


async def traffic(url: str, agent: str, priority: str, stop: trio.Event, *, pause: float = 0.15) -> None:
    """Requests one after another until ``stop`` (bounded: at most 2000)."""
    async with httpx.AsyncClient(base_url=url, timeout=30.0) as client:
        for _ in range(2000):
            if stop.is_set():
                return
            r = await client.post("/v1/messages", json=MSG, headers=_headers(agent, priority=priority))
            assert r.status_code == 200, r.text
            await trio.sleep(pause)


async def fault_burst(url: str) -> None:
    """Requests on their own API key (their own lane) whose every attempt the
    mock answers 502: enough failures in a row to open that lane's breaker."""
    headers = _headers("flaky-tool", key="sk-other", **{"x-mock-fault": "502"})
    async with httpx.AsyncClient(base_url=url, timeout=30.0) as client, trio.open_nursery() as nursery:
        for _ in range(3):
            nursery.start_soon(partial(client.post, "/v1/messages", json=MSG, headers=headers))


# ------------------------------------------------------------------ without a browser


async def test_page_is_served_self_contained_at_both_paths() -> None:
    page = dashboard_page()
    assert page.startswith(b"<!doctype html>")
    # Self-contained: no script, style, image or font from anywhere else.
    assert not re.search(rb"""(src|href)\s*=\s*["']?(https?:)?//""", page, re.I)
    assert not re.search(rb"@import|url\(\s*['\"]?(https?:)?//", page, re.I)
    # Data goes into the page as text only.
    assert b"innerHTML" not in page.replace(b"no innerHTML anywhere", b"")
    assert b"outerHTML" not in page and b"insertAdjacentHTML" not in page and b"document.write" not in page
    async with mock_behind_proxy() as (_, proxy):
        async with httpx.AsyncClient(base_url=proxy.url) as client:
            for path in ("/hivemind", "/hivemind/"):
                r = await client.get(path)
                assert r.status_code == 200
                assert r.headers["content-type"] == "text/html; charset=utf-8"
                assert r.content == page


# ------------------------------------------------------------------ live


async def test_dashboard_live_under_traffic(chromium: str) -> None:
    async with mock_behind_proxy() as (provider, proxy):
        stop = trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(traffic, proxy.url, "alice", "high", stop)
            nursery.start_soon(traffic, proxy.url, "bob", "low", stop)
            async with httpx.AsyncClient(base_url=proxy.url, timeout=30.0) as client:
                r = await client.post("/v1/messages", json=MSG, headers=_headers(EVIL))
                assert r.status_code == 200

            def watch(b: Browser) -> dict[str, Any]:
                page = b.page
                # No trailing slash: the status URL is still /hivemind/status.
                page.goto(proxy.url + "/hivemind")
                page.wait_for_selector('tr[data-agent="alice"] td.requests')
                seen: dict[str, Any] = {}
                alice = b.number('tr[data-agent="alice"] td.requests')
                admitted = b.number("#lanes .lane .c-admitted")
                total = b.number("#k-requests")
                seen["alice"] = (alice, b.wait_until_above('tr[data-agent="alice"] td.requests', alice))
                seen["bob_priority"] = page.text_content('tr[data-agent="bob"] td.priority')
                seen["admitted"] = (admitted, b.wait_until_above("#lanes .lane .c-admitted", admitted))
                seen["total"] = (total, b.wait_until_above("#k-requests", total))
                seen["live"] = page.text_content("#live-text")

                # A second lane whose breaker opens: its card, its badge, an event.
                trio.from_thread.run_sync(nursery.start_soon, fault_burst, proxy.url)
                page.wait_for_selector(".lane.open .breaker.b-open")
                page.wait_for_selector('#events li[data-kind="breaker_open"]')
                seen["lanes"] = page.locator("#lanes .lane").count()
                seen["event"] = page.text_content('#events li[data-kind="breaker_open"]')

                # The agent named with markup: its text, no element, no script run.
                seen["names"] = page.eval_on_selector_all("td.agent", "tds => tds.map(td => td.textContent)")
                seen["injected"] = page.evaluate(
                    "() => document.querySelectorAll('#agents img, #agents b').length + (window.__pwned ? 100 : 0)")

                # And with a trailing slash.
                page.goto(proxy.url + "/hivemind/")
                page.wait_for_selector('tr[data-agent="alice"] td.requests')
                again = b.number('tr[data-agent="alice"] td.requests')
                seen["again"] = (again, b.wait_until_above('tr[data-agent="alice"] td.requests', again))
                seen["problems"] = list(b.problems)
                return seen

            seen = await in_browser(chromium, watch)
            # The burst's requests wait for the open breaker: end everything.
            stop.set()
            nursery.cancel_scope.cancel()
        assert seen["problems"] == []
        for name in ("alice", "admitted", "total", "again"):
            before, after = seen[name]
            assert after > before, (name, before, after)
        assert seen["bob_priority"] == "low"
        assert seen["live"].startswith("live")
        assert seen["lanes"] == 2
        assert "upstream:" in seen["event"]
        assert EVIL in seen["names"]
        assert seen["injected"] == 0


# ------------------------------------------------------------------ rendering


def _status(paused_for: float) -> dict[str, Any]:
    """A hand-made status with every state."""
    return {
        "upstreams": [{"route": "upstream", "url": "http://127.0.0.1:9", "profile": "anthropic", "match": "prefix /"}],
        "in_flight": 5, "requests": 1234, "by_status": {"200": 1200, "429": 34},
        "client_disconnects": 0, "pool": {"in_use": 3, "size": 512}, "websockets": {"open": 0, "total": 0},
        "uptime_s": 99.0,
        "lanes": [
            {"key": "paused:<i>lane</i>", "route": "upstream", "profile": "anthropic", "window": 8, "in_flight": 3,
             "queued": 6, "queue_by_priority": {"critical": 1, "high": 2, "normal": 0, "low": 3},
             "breaker": "half_open", "breaker_trips": 2, "paused_for": paused_for,
             "rate_limit": {"requests": {"limit": 50, "remaining": 10, "reset_in": 20.0},
                            "tokens": {"limit": 1000, "remaining": 900, "reset_in": None}},
             "retries": 4, "retry_budget": 1.0, "upstream_429": 3, "upstream_5xx": 1, "resets": 0, "admitted": 77},
            {"key": "open:lane", "route": "upstream", "profile": "openai", "window": 40, "in_flight": 20, "queued": 0,
             "queue_by_priority": {"critical": 0, "high": 0, "normal": 0, "low": 0}, "breaker": "open",
             "breaker_trips": 1, "paused_for": 0.0, "rate_limit": {}, "retries": 0, "retry_budget": 1.0,
             "upstream_429": 0, "upstream_5xx": 9, "resets": 2, "admitted": 9},
        ],
        "agents": {
            EVIL: {"requests": 7, "in_flight": 1, "input_tokens": 1500, "output_tokens": 2500, "estimated_requests": 0,
                   "retries": 1, "failures": 2, "queue_timeouts": 0, "budget_refusals": 3, "priority": "critical",
                   "by_status": {"200": 5, "429": 2}, "budget_left": 1000},
            "zed": {"requests": 1, "in_flight": 0, "input_tokens": 10, "output_tokens": 20, "estimated_requests": 1,
                    "retries": 0, "failures": 0, "queue_timeouts": 0, "budget_refusals": 0, "priority": "low",
                    "by_status": {"200": 1}, "budget_left": None},
        },
        "events": [
            {"seq": 1, "t": time.time() - 5, "kind": "pause", "lane": "paused:<i>lane</i>", "seconds": 30.0, "status": 429},
            {"seq": 2, "t": time.time() - 4, "kind": "budget_refused", "agent": EVIL, "lane": "x", "period": "day"},
            {"seq": 3, "t": time.time() - 3, "kind": "budget_refused", "agent": EVIL, "lane": "x", "period": "day"},
            {"seq": 4, "t": time.time() - 2, "kind": "budget_refused", "agent": EVIL, "lane": "x", "period": "day"},
            {"seq": 5, "t": time.time() - 1, "kind": "<script>alert(1)</script>", "note": "<b>x</b>"},
        ],
    }


async def test_dashboard_renders_every_state_as_text(chromium: str) -> None:
    async with mock_behind_proxy() as (_, proxy):

        def look(b: Browser) -> dict[str, Any]:
            page = b.page
            polls: list[str] = []
            started: list[float] = []

            def answer(route) -> None:
                # Like a real proxy: each poll tells the pause's time left then.
                polls.append(route.request.url)
                started.append(started[0] if started else time.monotonic())
                left = max(0.0, 30.0 - (time.monotonic() - started[0]))
                route.fulfill(status=200, content_type="application/json", body=json.dumps(_status(round(left, 3))))

            page.route("**/hivemind/status", answer)
            page.goto(proxy.url + "/hivemind/")
            page.wait_for_selector('.lane[data-lane="paused:<i>lane</i>"] .pause')
            seen: dict[str, Any] = {}
            lane = '.lane[data-lane="paused:<i>lane</i>"]'
            # Sampled every 100 ms for 1.5 s: polls come once a second, so
            # many distinct values mean the countdown ticks between them.
            samples = []
            for _ in range(15):
                samples.append(page.text_content(f"{lane} .pause"))
                page.wait_for_timeout(100)
            seen["pause"] = samples
            seen["breakers"] = page.eval_on_selector_all(".breaker", "bs => bs.map(b => b.textContent)")
            seen["queue"] = [page.text_content(f"{lane} .q-{p}") for p in ("critical", "high", "normal", "low")]
            seen["queued"] = page.text_content(f"{lane} .queued")
            seen["inflight"] = page.text_content(f"{lane} .inflight")
            seen["slots"] = page.eval_on_selector_all(f"{lane} .slots i.on", "s => s.length")
            seen["bars"] = page.eval_on_selector_all(f"{lane} .row .bar > i", "is => is.map(i => i.style.width)")
            seen["lane_keys"] = page.eval_on_selector_all(".lane-key", "ks => ks.map(k => k.textContent)")
            seen["open_lane"] = page.locator('.lane.open[data-lane="open:lane"]').count()
            seen["agents"] = page.eval_on_selector_all("td.agent", "tds => tds.map(td => td.textContent)")
            seen["budget"] = page.eval_on_selector_all("td.budget", "tds => tds.map(td => td.textContent)")
            seen["budget_width"] = page.eval_on_selector_all("td.budget .bar > i", "is => is.map(i => i.style.width)")
            seen["refusals"] = page.text_content("tr[data-agent] td.refusals")
            seen["events"] = page.eval_on_selector_all("#events li", "ls => ls.map(l => l.textContent)")
            seen["injected"] = page.evaluate("""() => {
                const all = Array.from(document.querySelectorAll('*'));
                return document.querySelectorAll('img').length + document.querySelectorAll('script').length - 1
                    + all.filter(e => e.tagName === 'B' && e.textContent === 'mallory').length
                    + all.filter(e => e.tagName === 'B' && e.textContent === 'x').length
                    + all.filter(e => e.tagName === 'I' && e.textContent === 'lane').length
                    + (window.__pwned ? 100 : 0); }""")
            seen["polls"] = polls
            seen["problems"] = list(b.problems)
            return seen

        seen = await in_browser(chromium, look)
    assert seen["problems"] == []
    assert all(url.endswith("/hivemind/status") for url in seen["polls"]) and len(seen["polls"]) >= 2
    # The pause counts down, between polls too.
    left = [float(re.fullmatch(r"paused ([\d.]+) s", t).group(1)) for t in seen["pause"]]  # type: ignore[union-attr]
    assert all(30.0 >= a >= b > 25.0 for a, b in zip(left, left[1:])), left
    assert len(set(left)) >= 8, left
    assert seen["breakers"] == ["breaker half-open", "breaker open"]
    assert seen["open_lane"] == 1
    assert seen["queue"] == ["1", "2", "0", "3"] and seen["queued"] == "6 waiting"
    assert seen["inflight"] == "3 / 8 in flight" and seen["slots"] == 3
    # requests 10 of 50 left, tokens 900 of 1000 (no reset known).
    assert seen["bars"] == ["20%", "90%"]
    assert seen["lane_keys"] == ["paused:<i>lane</i>", "open:lane"]
    assert seen["agents"] == [EVIL, "zed"]
    # 1000 left of 1000 + 4000 used; no budget for zed.
    assert seen["budget"] == ["1K", "unlimited"] and seen["budget_width"] == ["20%"]
    assert seen["refusals"] == "3"
    # Newest first; the three identical refusals are one line.
    assert len(seen["events"]) == 3
    assert "<script>alert(1)</script>" in seen["events"][0] and "<b>x</b>" in seen["events"][0]
    assert "×3" in seen["events"][1] and EVIL in seen["events"][1]
    assert "pause" in seen["events"][2] and "paused:<i>lane</i>" in seen["events"][2]
    assert seen["injected"] == 0
