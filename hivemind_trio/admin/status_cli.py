"""``hivemind-trio status``: a running proxy's ``/hivemind/status`` as terminal tables.

:func:`render_status` is a pure function from the status JSON to a ``rich``
renderable (lanes, agents, recent scheduler events), so it can be tested
without a terminal; :func:`run_status` fetches and prints it, once or, with
``watch``, refreshing in place (``rich.live``).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Mapping
from typing import Any

import httpx
from rich import box
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

__all__ = ["DEFAULT_URL", "StatusError", "fetch_status", "render_status", "run_status", "status_url"]

DEFAULT_URL = "http://127.0.0.1:8765"

_BREAKER_STYLE = {"closed": "green", "open": "bold red", "half_open": "yellow"}
_PRIORITIES = ("critical", "high", "normal", "low")


class StatusError(Exception):
    """The status could not be fetched; the message says why, for a person."""


# ------------------------------------------------------------------ fetching


def status_url(url: str) -> str:
    """The status endpoint of the proxy at ``url`` (its base URL, or the endpoint itself)."""
    url = url.strip()
    if "://" not in url:
        url = "http://" + url
    base = url.rstrip("/")
    if base.endswith("/hivemind/status"):
        return base
    return base + "/hivemind/status"


def fetch_status(url: str, *, token: str | None = None, timeout: float = 5.0) -> dict[str, Any]:
    """GET ``/hivemind/status``; :class:`StatusError` with a readable message on any failure.

    Environment proxy settings are ignored (``trust_env=False``): the proxy is
    addressed directly, usually on loopback.
    """
    endpoint = status_url(url)
    headers = {"accept": "application/json"}
    if token:
        headers["authorization"] = f"Bearer {token}"
    try:
        with httpx.Client(timeout=timeout, trust_env=False) as client:
            response = client.get(endpoint, headers=headers)
    except httpx.InvalidURL as exc:
        raise StatusError(f"invalid URL {url!r}: {exc}") from None
    except httpx.TimeoutException:
        raise StatusError(f"the proxy at {endpoint} did not answer within {timeout:g} s") from None
    except (httpx.TransportError, OSError) as exc:
        raise StatusError(f"cannot reach the proxy at {endpoint}: {exc or type(exc).__name__} (is `hivemind-trio serve` running there?)") from None
    if response.status_code == 403:
        raise StatusError(f"{endpoint} refused the request (403): pass the admin token with --token or $HIVEMIND_ADMIN_TOKEN")
    if response.status_code != 200:
        raise StatusError(f"{endpoint} answered {response.status_code}: {response.text[:200].strip()}")
    try:
        payload = response.json()
    except ValueError:
        raise StatusError(f"{endpoint} did not answer JSON; is it a hivemind_trio proxy?") from None
    if not isinstance(payload, dict) or "lanes" not in payload:
        raise StatusError(f"{endpoint} did not answer a hivemind_trio status (no 'lanes')")
    return payload


# ------------------------------------------------------------------ rendering


def _int(n: Any) -> str:
    if n is None:
        return "-"
    if isinstance(n, float) and not n.is_integer():
        return f"{n:,.1f}"
    try:
        return f"{int(n):,}"
    except (TypeError, ValueError):
        return str(n)


def _secs(s: Any) -> str:
    try:
        s = float(s)
    except (TypeError, ValueError):
        return "-"
    if s <= 0:
        return "-"
    if s < 60:
        return f"{s:.1f}s"
    if s < 3600:
        return f"{int(s // 60)}m{int(s % 60):02d}s"
    return f"{int(s // 3600)}h{int(s % 3600 // 60):02d}m"


def _uptime(s: Any) -> str:
    try:
        s = float(s)
    except (TypeError, ValueError):
        return "?"
    return _secs(s) if s > 0 else "0s"


def _statuses(by_status: Mapping[str, Any] | None) -> str:
    if not by_status:
        return "-"
    return " ".join(f"{code}x{n}" for code, n in sorted(by_status.items()))


def _queued(lane: Mapping[str, Any]) -> Text:
    total = lane.get("queued") or 0
    by = lane.get("queue_by_priority") or {}
    parts = [f"{p[0]}{by[p]}" for p in _PRIORITIES if by.get(p)]
    text = Text(_int(total), style="bold yellow" if total else "")
    if parts:
        text.append(" (" + " ".join(parts) + ")", style="dim")
    return text


def _rate_limits(rate: Mapping[str, Any] | None) -> str:
    if not rate:
        return "-"
    out = []
    for name, r in rate.items():
        if not isinstance(r, Mapping):
            continue
        limit, remaining, reset = r.get("limit"), r.get("remaining"), r.get("reset_in")
        s = f"{name} {_int(remaining)}/{_int(limit)}"
        if reset:
            s += f" reset {_secs(reset)}"
        out.append(s)
    return "\n".join(out) or "-"


def _lanes_table(lanes: list[Mapping[str, Any]]) -> Table:
    t = Table(title="Lanes", title_justify="left", box=box.SIMPLE_HEAD, expand=False)
    t.add_column("lane", overflow="fold", style="bold")
    t.add_column("profile")
    t.add_column("window", justify="right")
    t.add_column("in flight", justify="right")
    t.add_column("queued", justify="right")
    t.add_column("breaker")
    t.add_column("paused", justify="right")
    t.add_column("rate limits", overflow="fold")
    t.add_column("retries", justify="right")
    t.add_column("429/5xx/reset", justify="right")
    t.add_column("admitted", justify="right")
    for lane in lanes:
        breaker = str(lane.get("breaker", "?"))
        trips = lane.get("breaker_trips") or 0
        t.add_row(
            str(lane.get("key", "?")),
            str(lane.get("profile", "")),
            _int(lane.get("window")),
            _int(lane.get("in_flight")),
            _queued(lane),
            Text(breaker + (f" ({trips} trips)" if trips else ""), style=_BREAKER_STYLE.get(breaker, "")),
            Text(_secs(lane.get("paused_for")), style="bold red" if (lane.get("paused_for") or 0) > 0 else ""),
            _rate_limits(lane.get("rate_limit")),
            _int(lane.get("retries")),
            f"{_int(lane.get('upstream_429'))}/{_int(lane.get('upstream_5xx'))}/{_int(lane.get('resets'))}",
            _int(lane.get("admitted")),
        )
    return t


def _agents_table(agents: Mapping[str, Mapping[str, Any]]) -> Table:
    t = Table(title="Agents", title_justify="left", box=box.SIMPLE_HEAD, expand=False)
    t.add_column("agent", overflow="fold", style="bold")
    t.add_column("priority")
    t.add_column("requests", justify="right")
    t.add_column("in flight", justify="right")
    t.add_column("tokens in", justify="right")
    t.add_column("tokens out", justify="right")
    t.add_column("budget left", justify="right")
    t.add_column("retries", justify="right")
    t.add_column("failures", justify="right")
    t.add_column("statuses", overflow="fold")
    for name, a in agents.items():
        estimated = a.get("estimated_requests") or 0
        failures = a.get("failures") or 0
        extra = []
        if a.get("queue_timeouts"):
            extra.append(f"{a['queue_timeouts']} timed out")
        if a.get("budget_refusals"):
            extra.append(f"{a['budget_refusals']} refused")
        t.add_row(
            name,
            str(a.get("priority", "")),
            _int(a.get("requests")),
            _int(a.get("in_flight")),
            _int(a.get("input_tokens")) + ("~" if estimated else ""),
            _int(a.get("output_tokens")) + ("~" if estimated else ""),
            _int(a.get("budget_left")) if a.get("budget_left") is not None else "unlimited",
            _int(a.get("retries")),
            Text(_int(failures) + (f" ({', '.join(extra)})" if extra else ""), style="red" if failures else ""),
            _statuses(a.get("by_status")),
        )
    return t


def _events_table(events: list[Mapping[str, Any]]) -> Table:
    t = Table(title="Recent events", title_justify="left", box=box.SIMPLE_HEAD, expand=False)
    t.add_column("time")
    t.add_column("event", style="bold")
    t.add_column("details", overflow="fold")
    for e in events:
        ts = e.get("t")
        when = time.strftime("%H:%M:%S", time.localtime(ts)) if isinstance(ts, (int, float)) else "?"
        details = " ".join(f"{k}={v}" for k, v in e.items() if k not in ("seq", "t", "kind"))
        kind = str(e.get("kind", "?"))
        style = "red" if kind in ("breaker_open", "budget_refused", "queue_timeout") else ""
        t.add_row(when, Text(kind, style=style), details)
    return t


def render_status(status: Mapping[str, Any], *, url: str | None = None, events: int = 10) -> RenderableType:
    """The status JSON of ``GET /hivemind/status`` as a rich renderable: a summary
    line, the lanes table, the agents table and the last ``events`` scheduler events."""
    upstreams = ", ".join(
        f"{u.get('route')} -> {u.get('url')}" for u in status.get("upstreams") or [] if isinstance(u, Mapping)
    )
    head = Text()
    head.append("hivemind_trio", style="bold")
    if url:
        head.append(f" at {url}")
    head.append(f"  up {_uptime(status.get('uptime_s'))}")
    head.append(f"  requests {_int(status.get('requests'))}")
    head.append(f"  in flight {_int(status.get('in_flight'))}")
    by_status = status.get("by_status")
    if by_status:
        head.append(f"  statuses {_statuses(by_status)}")
    ws = status.get("websockets") or {}
    if ws.get("total"):
        head.append(f"  websockets {_int(ws.get('open'))} open / {_int(ws.get('total'))}")
    parts: list[RenderableType] = [head]
    if upstreams:
        parts.append(Text(f"upstreams: {upstreams}", style="dim"))
    state = status.get("state")
    if isinstance(state, Mapping) and state.get("backend") == "redis":
        # SPEC §7.5: say loudly when this instance schedules on its own.
        if state.get("connected"):
            parts.append(Text(f"shared state: {state.get('url')} connected", style="dim"))
        else:
            parts.append(Text(f"shared state: {state.get('url')} UNREACHABLE, on local state ({state.get('last_error')})", style="bold red"))
    lanes = [lane for lane in status.get("lanes") or [] if isinstance(lane, Mapping)]
    parts.append(_lanes_table(lanes) if lanes else Text("\nLanes: none yet (no request has been proxied)", style="dim"))
    agents = {k: v for k, v in (status.get("agents") or {}).items() if isinstance(v, Mapping)}
    parts.append(_agents_table(agents) if agents else Text("Agents: none yet", style="dim"))
    recent = [e for e in status.get("events") or [] if isinstance(e, Mapping)][-events:] if events > 0 else []
    parts.append(_events_table(recent) if recent else Text("Recent events: none", style="dim"))
    return Group(*parts)


# ------------------------------------------------------------------ the command


def _console(file=None) -> Console:
    out = file if file is not None else sys.stdout
    # Piped output (not a terminal, no $COLUMNS) would be cut at rich's 80
    # columns; a log file or `grep` is better served by whole lines.
    isatty = getattr(out, "isatty", None)
    width = None if (isatty is not None and isatty()) or os.environ.get("COLUMNS") else 200
    return Console(file=out, width=width)


def run_status(
    url: str = DEFAULT_URL,
    *,
    token: str | None = None,
    watch: float | None = None,
    events: int = 10,
    as_json: bool = False,
    console: Console | None = None,
) -> int:
    """Print the status once (or every ``watch`` seconds until Ctrl-C); the exit code."""
    console = console if console is not None else _console()
    err = Console(stderr=True)
    try:
        status = fetch_status(url, token=token)
    except StatusError as exc:
        err.print(f"hivemind-trio status: {exc}", style="red", markup=False, highlight=False, soft_wrap=True)
        return 1
    if as_json:
        console.print_json(json.dumps(status))
        return 0
    if watch is None:
        console.print(render_status(status, url=url, events=events))
        return 0
    try:
        if not console.is_terminal:
            return _watch_lines(console, status, url, token=token, watch=watch, events=events)
        with Live(render_status(status, url=url, events=events), console=console, auto_refresh=False, screen=False) as live:
            while True:
                time.sleep(watch)
                try:
                    status = fetch_status(url, token=token)
                    view = render_status(status, url=url, events=events)
                except StatusError as exc:
                    # Keep watching: a restarting proxy comes back.
                    view = Group(
                        Text(f"{time.strftime('%H:%M:%S')} {exc}; retrying every {watch:g} s", style="red"),
                        render_status(status, url=url, events=events),
                    )
                live.update(view, refresh=True)
    except KeyboardInterrupt:
        return 0


def _watch_lines(console: Console, status: dict[str, Any], url: str, *, token: str | None, watch: float, events: int) -> int:
    """``--watch`` into a pipe or a file: a snapshot every ``watch`` seconds, one
    after the other (there is no screen to redraw)."""
    current: dict[str, Any] | None = status
    while True:
        if current is not None:
            console.rule(time.strftime("%Y-%m-%d %H:%M:%S"))
            console.print(render_status(current, url=url, events=events))
        console.file.flush()
        time.sleep(watch)
        try:
            current = fetch_status(url, token=token)
        except StatusError as exc:
            current = None
            console.print(f"{time.strftime('%H:%M:%S')} {exc}; retrying every {watch:g} s", markup=False, highlight=False)
