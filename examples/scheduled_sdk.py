"""Concurrent Anthropic SDK calls, scheduled in-process by hivemind_trio.

The program starts the built-in mock provider on a loopback port, limited to a
few requests per second like a rate-limited API, and fires several concurrent
``messages.create`` calls through one ``SchedulingTransport2`` (the httpx2
flavour: the official SDKs take only ``httpx2`` clients).  The SDK's own
retries are off (``max_retries=0``): every call still succeeds, because the
transport paces the lane from the provider's rate-limit headers and retries a
429 transparently before the SDK sees it.

    python examples/scheduled_sdk.py [--calls 8] [--rpm 4] [--window 1.0]
"""

from __future__ import annotations

import argparse

import anthropic
import httpx2
import trio

from hivemind_trio import SchedulingTransport2
from hivemind_trio.sim.mock import MockConfig, MockProvider, serve_mock


async def ask(client: anthropic.AsyncAnthropic, i: int, answers: dict[int, str]) -> None:
    raw = await client.messages.with_raw_response.create(
        model="claude-example",
        max_tokens=64,
        messages=[{"role": "user", "content": f"Question number {i}?"}],
    )
    message = await raw.parse()
    text = message.content[0].text
    answers[i] = text
    print(
        f"call {i}: {text[:48]!r} "
        f"(attempts={raw.headers.get('x-hivemind-attempts')}, queued {raw.headers.get('x-hivemind-queue-ms')} ms, "
        f"{message.usage.output_tokens} output tokens)",
        flush=True,
    )


async def main(calls: int, rpm: int, window: float) -> None:
    provider = MockProvider(MockConfig(rpm=rpm, window=window, latency=0.02, jitter=0.0, seed=7, reply_text="Answer from the mock."))
    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve_mock, provider)
        print(f"mock provider on 127.0.0.1:{port}: {rpm} requests per {window:g} s", flush=True)
        answers: dict[int, str] = {}
        # The dispatchers of the transport's lanes live in this block.
        async with SchedulingTransport2(agent="example") as transport:
            http = httpx2.AsyncClient(transport=transport, timeout=600)
            async with anthropic.AsyncAnthropic(
                base_url=f"http://127.0.0.1:{port}", api_key="sk-example", http_client=http, max_retries=0
            ) as client:
                async with trio.open_nursery() as calls_nursery:
                    for i in range(calls):
                        calls_nursery.start_soon(ask, client, i, answers)
            stats = transport.statistics()
        for lane in stats["lanes"]:
            print(
                f"lane {lane['route']} ({lane['profile']}): admitted={lane['admitted']} "
                f"upstream_429={lane['upstream_429']} retries={lane['retries']}",
                flush=True,
            )
        agent = stats["agents"]["example"]
        print(f"agent example: {agent['requests']} requests, {agent['output_tokens']} output tokens", flush=True)
        print(f"{len(answers)}/{calls} calls answered", flush=True)
        nursery.cancel_scope.cancel()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=8)
    parser.add_argument("--rpm", type=int, default=4, help="requests the mock admits per window")
    parser.add_argument("--window", type=float, default=1.0, help="the mock's rate window, seconds")
    args = parser.parse_args()
    trio.run(main, args.calls, args.rpm, args.window)
