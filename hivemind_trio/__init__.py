"""hivemind_trio: a transparent scheduling proxy for fleets of LLM agents.

Run it as ``hypercorn -k trio hivemind_trio:app`` or ``hivemind-trio serve``;
embed it with ``async with hivemind_trio.open_proxy(config) as proxy:``, or
schedule an httpx client in-process with ``SchedulingTransport`` (the official
SDKs, built on httpx2, take ``SchedulingTransport2``).
"""

from __future__ import annotations

from .config import Config, ConfigError, Route, ServerConfig, load_config
from .core.identity import Priority
from .runtime.app import ProxyApp, default_app
from .runtime.serve import Proxy, open_proxy
from .runtime.transport import SchedulingTransport, SchedulingTransport2

__version__ = "0.1.0"


def create_app(config: Config | None = None, *, transport=None) -> ProxyApp:
    """A new ASGI app; ``config=None`` reads the environment at start-up."""
    return ProxyApp(config, transport=transport)


#: The module-level ASGI app for ``hypercorn -k trio hivemind_trio:app``.
app = default_app()

__all__ = [
    "Config",
    "ConfigError",
    "Priority",
    "Proxy",
    "ProxyApp",
    "Route",
    "SchedulingTransport",
    "SchedulingTransport2",
    "ServerConfig",
    "app",
    "create_app",
    "load_config",
    "open_proxy",
]
