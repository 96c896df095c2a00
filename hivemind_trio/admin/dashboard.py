"""The live dashboard served at ``GET /hivemind/`` (SPEC §7.1).

One self-contained HTML page (inline CSS and vanilla JavaScript, no build
step, nothing fetched from elsewhere) kept beside this module as
``dashboard.html`` and shipped in the wheel as package data.  The page polls
``<its own path>/status`` every second and draws, from that JSON alone, each
lane (window vs in flight, queue by priority, breaker, rate-limit remaining,
pause countdown), each agent (tokens, budget, retries, failures, priority) and
the recent scheduler events.  Agent names and lane keys come from clients, so
the script inserts data with ``textContent``/``setAttribute`` only.
"""

from __future__ import annotations

import functools
from importlib import resources

__all__ = ["dashboard_page"]


@functools.cache
def dashboard_page() -> bytes:
    """The dashboard's HTML (UTF-8), read once from the package."""
    return resources.files(__package__).joinpath("dashboard.html").read_bytes()
