"""Running the app: Hypercorn configuration, ``open_proxy`` and ``serve``."""

from __future__ import annotations

import logging
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial

import attrs
import httpx
import hypercorn.config
import hypercorn.trio
import trio

from ..config import Config
from .app import ProxyApp

log = logging.getLogger("hivemind_trio")


def hypercorn_config(config: Config, *, host: str | None = None, port: int | None = None) -> hypercorn.config.Config:
    s = config.server
    hc = hypercorn.config.Config()
    h = host if host is not None else s.host
    p = port if port is not None else s.port
    hc.bind = [f"[{h}]:{p}" if ":" in h else f"{h}:{p}"]
    # read_timeout applies to every read, also while a response streams: a
    # ten-minute generation must not be cut (SPEC §3.5), so it stays off.
    hc.read_timeout = None
    hc.h11_max_incomplete_size = s.max_header_bytes
    hc.graceful_timeout = s.shutdown_grace
    hc.accesslog = None  # the proxy logs one line per request itself
    # Relayed responses carry the upstream's own Date and Server; Hypercorn
    # adding its own would send both twice.  The proxy's own answers add a
    # Date themselves (app._respond).
    hc.include_date_header = False
    hc.include_server_header = False
    hc.errorlog = logging.getLogger("hypercorn.error")
    hc.websocket_max_message_size = 64 * 1024 * 1024
    # Idle keep-alive connections of agents: generous, agents pool connections.
    hc.keep_alive_timeout = 75
    return hc


@attrs.frozen
class Proxy:
    """A proxy running inside the caller's Trio program."""

    url: str
    app: ProxyApp

    @property
    def port(self) -> int:
        return httpx.URL(self.url).port or 80


@asynccontextmanager
async def open_proxy(
    config: Config | None = None,
    *,
    transport: httpx.AsyncBaseTransport | None = None,
    host: str = "127.0.0.1",
    port: int = 0,
) -> AsyncIterator[Proxy]:
    """Serve the proxy on ``host:port`` (default: an ephemeral loopback port)
    for the duration of the ``async with`` block::

        async with hivemind_trio.open_proxy(config) as proxy:
            client = anthropic.AsyncAnthropic(base_url=proxy.url)
    """
    config = config if config is not None else Config()
    app = ProxyApp(config, transport=transport)
    hc = hypercorn_config(config, host=host, port=port)
    shutdown = trio.Event()
    # The configuration is checked and the lanes' dispatchers run here, in the
    # caller's task tree: a crash in one propagates out of this block.
    rt = app.prepare()
    async with trio.open_nursery() as outer:
        rt.scheduler.attach(outer)
        await rt.scheduler.start_shared(outer)
        async with trio.open_nursery() as server:
            binds = await server.start(partial(hypercorn.trio.serve, app, hc, shutdown_trigger=partial(_trigger, app, shutdown)))
            try:
                yield Proxy(url=binds[0], app=app)
            finally:
                shutdown.set()
        # Hypercorn has drained: the dispatchers are no longer needed.
        outer.cancel_scope.cancel()


async def _trigger(app: ProxyApp, shutdown: trio.Event) -> None:
    """Hypercorn's shutdown trigger: queued requests are told to retry at once
    (they would otherwise sit out the grace period and then lose their
    connection); requests already upstream finish within the grace."""
    await shutdown.wait()
    app.begin_shutdown()


async def serve(config: Config, *, mock_port: int | None = None) -> None:
    """Serve until SIGINT/SIGTERM (``hivemind-trio serve``).

    With ``mock_port`` the built-in mock provider is started on that port in
    the same process and becomes the one upstream (``serve --mock``).
    """
    shutdown = trio.Event()

    async def on_signals(task_status=trio.TASK_STATUS_IGNORED) -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            task_status.started()
            async for _ in signals:
                log.info("shutting down")
                shutdown.set()
                return

    async with trio.open_nursery() as nursery:
        await nursery.start(on_signals)
        if mock_port is not None:
            from ..sim.mock import MockConfig, MockProvider, serve_mock

            port = await nursery.start(serve_mock, MockProvider(MockConfig()), "127.0.0.1", mock_port)
            mock_url = f"http://127.0.0.1:{port}"
            print(f"mock provider listening on {mock_url}", flush=True)
            config = attrs.evolve(config, upstream=mock_url, routes=())
        app = ProxyApp(config)
        rt = app.prepare()
        # Lane dispatchers here: a crash ends trio.run, and the process with it.
        rt.scheduler.attach(nursery)
        await rt.scheduler.start_shared(nursery)
        hc = hypercorn_config(config)
        async with trio.open_nursery() as server:
            binds = await server.start(partial(hypercorn.trio.serve, app, hc, shutdown_trigger=partial(_trigger, app, shutdown)))
            for b in binds:
                print(f"hivemind_trio proxy listening on {b}", flush=True)
        # Hypercorn has drained (within shutdown_grace); the mock and the
        # dispatchers go with the nursery.
        nursery.cancel_scope.cancel()
