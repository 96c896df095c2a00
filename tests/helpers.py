"""Test helpers: real servers on ephemeral loopback ports."""

from __future__ import annotations

from contextlib import asynccontextmanager
from functools import partial

import hypercorn.config
import hypercorn.trio
import trio


@asynccontextmanager
async def serve_asgi(app):
    """Serve an ASGI app with Hypercorn (trio worker) on 127.0.0.1:0; yields its URL."""
    hc = hypercorn.config.Config()
    hc.bind = ["127.0.0.1:0"]
    hc.accesslog = None
    hc.graceful_timeout = 0.5
    shutdown = trio.Event()
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(partial(hypercorn.trio.serve, app, hc, shutdown_trigger=shutdown.wait))
        try:
            yield binds[0]
        finally:
            shutdown.set()
            nursery.cancel_scope.deadline = trio.current_time() + 2


async def read_http_response(stream: trio.SocketStream, limit: int = 1 << 20) -> bytes:
    """Read from a raw socket until the peer closes or ``limit`` bytes."""
    data = b""
    while len(data) < limit:
        chunk = await stream.receive_some(65536)
        if not chunk:
            break
        data += chunk
    return data


async def answer_lifespan(receive, send) -> None:
    """The lifespan half of a test upstream: start up, then shut down when told."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        else:
            await send({"type": "lifespan.shutdown.complete"})
            return
