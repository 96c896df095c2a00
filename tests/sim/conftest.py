from __future__ import annotations

from typing import Awaitable, Callable

import pytest
import trio

from hivemind_trio.sim.mock import MockConfig, MockProvider, serve_mock

StartMock = Callable[..., Awaitable[tuple[MockProvider, str]]]


@pytest.fixture
def start_mock(nursery: trio.Nursery) -> StartMock:
    """Start a real mock server on port 0; returns (provider, base_url "http://127.0.0.1:PORT").

    Defaults suit socket tests on the real clock: no latency, no jitter, a fixed seed.
    """

    async def start(**overrides: object) -> tuple[MockProvider, str]:
        settings: dict[str, object] = {"latency": 0.0, "jitter": 0.0, "seed": 7, "stream_delay": 0.0}
        settings.update(overrides)
        provider = MockProvider(MockConfig(**settings))  # type: ignore[arg-type]
        port = await nursery.start(serve_mock, provider)
        return provider, f"http://127.0.0.1:{port}"

    return start
