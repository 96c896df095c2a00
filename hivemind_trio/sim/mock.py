"""The mock provider: a real HTTP server standing in for Anthropic, OpenAI and Ollama.

Every later test and the bench talk to it over real sockets, so it is written
on raw Trio sockets + h11 (+ wsproto for the Responses WebSocket), which lets
it inject real TCP resets (SO_LINGER 0).  This module holds the public API,
the configuration and the provider's state and decisions (rate window,
concurrency cap, fault draws, the attempt log); ``mock_server`` does the I/O,
``mock_wire`` renders bodies and events, ``mock_limits`` is the sans-io
window.

All timing goes through ``provider.now()`` (``trio.current_time`` by default),
so a whole run works under ``trio.testing.MockClock``; all randomness comes
from one ``random.Random(seed)``.

Per-request test hooks (headers on the request): ``x-mock-fault`` forces
``429``/``529``/``502``/``reset``/``drop``/``stall``/``error``/``quota``;
``x-mock-encoding`` picks a response Content-Encoding (if Accept-Encoding
allows it); ``x-mock-echo: 1`` adds ``x-mock-request-headers`` (JSON) to the
response.  Control endpoints: ``GET /mock/log``, ``GET /mock/stats``,
``POST /mock/reset``, ``ANY /mock/echo/...``.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import secrets
import signal
import sys
import time
from collections import Counter
from typing import IO, Any, Callable

import attrs
import trio

from . import mock_wire as wire
from .mock_limits import BucketState, SlidingWindow, WindowEntry, go_duration, rfc3339

__all__ = [
    "Attempt",
    "MockConfig",
    "MockProvider",
    "MockStats",
    "add_mock_arguments",
    "run_mock_from_args",
    "serve_mock",
]

# Attempt outcomes.  "529" means "overloaded" whatever the status (OpenAI and
# Ollama paths answer 503 for it, as those providers do).
OK = "ok"
RATE_LIMITED = "429"
OVERLOADED = "529"
API_ERROR = "502"
RESET = "reset"
DROP = "drop"  # connection reset after a 200 and some events
STALL = "stall"  # stream went silent after some events
ERROR_EVENT = "error_event"  # provider error event after a 200
QUOTA = "quota"
TOO_LARGE = "too_large"
BAD_REQUEST = "400"
CLIENT_GONE = "client_gone"

FAULTS = ("429", "529", "502", "reset", "drop", "stall", "error", "quota")
_ENCODINGS = ("zstd", "br", "gzip")


def _non_negative(_inst: Any, attribute: attrs.Attribute, value: float) -> None:
    if value < 0:
        raise ValueError(f"MockConfig.{attribute.name} must be >= 0, got {value!r}")


def _fraction(_inst: Any, attribute: attrs.Attribute, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"MockConfig.{attribute.name} must be within [0, 1], got {value!r}")


def _compress_choice(_inst: Any, attribute: attrs.Attribute, value: str) -> None:
    if value not in ("", "auto", *_ENCODINGS):
        raise ValueError(f"MockConfig.{attribute.name} must be '', 'auto', 'gzip', 'br' or 'zstd', got {value!r}")


@attrs.frozen
class MockConfig:
    """The mock's knobs.  Rates are fractions of attempts; times are seconds."""

    rpm: int = attrs.field(default=0, validator=_non_negative)  # requests per window, 0 = unlimited
    tpm: int = attrs.field(default=0, validator=_non_negative)  # input+output tokens per window
    cap: int = attrs.field(default=0, validator=_non_negative)  # max in-flight attempts, 0 = none
    error_rate: float = attrs.field(default=0.0, validator=_fraction)  # 502 api_error
    reset_rate: float = attrs.field(default=0.0, validator=_fraction)  # TCP reset before any byte
    latency: float = attrs.field(default=0.08, validator=_non_negative)  # before first byte
    jitter: float = attrs.field(default=0.05, validator=_non_negative)  # Gaussian sd
    spike_rate: float = attrs.field(default=0.0, validator=_fraction)
    spike_factor: float = attrs.field(default=5.0, validator=_non_negative)
    output_mean: int = attrs.field(default=150, validator=_non_negative)
    output_sd: int = attrs.field(default=50, validator=_non_negative)
    window: float = attrs.field(default=60.0)
    seed: int | None = None
    reply_text: str = ""  # always contained in the assistant text when set
    pad_text: bool = True  # pad the text to about output_tokens words
    stream_delay: float = attrs.field(default=0.005, validator=_non_negative)  # between stream events
    stream_chunks: int = attrs.field(default=6, validator=_non_negative)  # text deltas per reply
    # Faults after a 200 (streams only), as fractions of streaming attempts.
    drop_rate: float = attrs.field(default=0.0, validator=_fraction)  # reset mid-stream
    stall_rate: float = attrs.field(default=0.0, validator=_fraction)  # go silent mid-stream
    stall_seconds: float = attrs.field(default=3600.0, validator=_non_negative)
    midstream_error_rate: float = attrs.field(default=0.0, validator=_fraction)  # error event mid-stream
    quota: bool = False  # every generation is refused: OpenAI 429 insufficient_quota etc.
    # Does an attempt answered by an injected 502 or reset still count
    # against the RPM/TPM window?  Yes by default (it was admitted, like a
    # provider that counts on arrival); False models a provider whose
    # failures happen in front of its rate limiter.
    charge_faults: bool = True
    compress: str = attrs.field(default="", validator=_compress_choice)  # '', 'auto' or an encoding
    model: str = "mock-model"  # when the request names none

    @window.validator
    def _check_window(self, attribute: attrs.Attribute, value: float) -> None:
        if not value > 0:
            raise ValueError(f"MockConfig.window must be > 0, got {value!r}")


@attrs.frozen
class Attempt:
    """One attempt as the server saw it (rejected ones included)."""

    t: float  # start, provider clock
    method: str
    path: str
    status: int  # 0 for a reset before any response
    outcome: str
    agent: str
    input_tokens: int
    output_tokens: int
    stream: bool
    api: str = ""
    model: str = ""
    request_id: str = ""
    t_end: float = 0.0
    transport: str = "http"  # or "ws"


@attrs.frozen
class MockStats:
    attempts: int
    by_outcome: dict[str, int]
    by_status: dict[int, int]
    input_tokens: int  # over admitted attempts
    output_tokens: int  # delivered
    in_flight: int
    peak_in_flight: int
    window_requests: int
    window_tokens: int
    connections: int = 0

    @property
    def ok(self) -> int:
        return self.by_outcome.get(OK, 0)

    def to_json(self) -> dict[str, Any]:
        data = attrs.asdict(self)
        data["by_status"] = {str(k): v for k, v in self.by_status.items()}
        data["ok"] = self.ok
        return data


@attrs.define
class Admission:
    """The provider's decision on one attempt (internal to the mock)."""

    t: float
    verdict: str  # OK (admitted), RATE_LIMITED, OVERLOADED, QUOTA, TOO_LARGE
    wait: float = 0.0  # for RATE_LIMITED: seconds until it would fit
    fault: str | None = None  # for admitted: "502", "reset", "drop", "stall", "error"
    latency: float = 0.0
    output_tokens: int = 0
    entry: WindowEntry | None = None
    released: bool = True
    request_id: str = ""


_FILLER = (
    "the mock model streams plausible tokens so schedulers proxies and agents "
    "can be measured under load without spending a cent"
).split()


class MockProvider:
    """The mock's configuration, state and attempt log; serve it with :func:`serve_mock`.

    ``config`` may be replaced at run time (``provider.config = attrs.evolve(...)``).
    """

    def __init__(
        self,
        config: MockConfig | None = None,
        *,
        clock: Callable[[], float] = trio.current_time,
        log_file: IO[str] | None = None,
        verbose: bool = False,
    ) -> None:
        self.verbose = verbose  # print every request line and its headers to stderr
        self.config = config or MockConfig()
        self._clock = clock
        self._log_file = log_file
        self.rng = random.Random(self.config.seed)
        self.window = SlidingWindow(self.config.window)
        self.attempts: list[Attempt] = []
        self.in_flight = 0
        self.peak_in_flight = 0
        self.connections = 0  # TCP connections accepted (keep-alive shows as fewer than attempts)
        self._anchor: tuple[float, float] | None = None  # (clock, wall) at start

    # ----------------------------------------------------------------- time

    def now(self) -> float:
        t = self._clock()
        if self._anchor is None:
            self._anchor = (t, time.time())
        return t

    def wall(self, t: float) -> float:
        """Map a provider-clock time to wall-clock seconds (anchored at first use)."""
        if self._anchor is None:
            self.now()
        assert self._anchor is not None
        return self._anchor[1] + (t - self._anchor[0])

    # ------------------------------------------------------------- control

    def reset(self) -> None:
        """Forget the log, the window and the counters; reseed the random source."""
        self.attempts.clear()
        self.window = SlidingWindow(self.config.window)
        self.rng = random.Random(self.config.seed)
        self.peak_in_flight = self.in_flight
        self.connections = 0

    def statistics(self) -> MockStats:
        outcomes = Counter(a.outcome for a in self.attempts)
        statuses = Counter(a.status for a in self.attempts)
        requests, tokens = self.window.usage(self.now())
        return MockStats(
            attempts=len(self.attempts),
            by_outcome=dict(outcomes),
            by_status=dict(statuses),
            input_tokens=sum(a.input_tokens for a in self.attempts if a.outcome not in _REJECTED),
            output_tokens=sum(a.output_tokens for a in self.attempts),
            in_flight=self.in_flight,
            peak_in_flight=self.peak_in_flight,
            window_requests=requests,
            window_tokens=tokens,
            connections=self.connections,
        )

    # ----------------------------------------------------------- decisions

    def admit(self, *, input_tokens: int, stream: bool, forced: str | None = None) -> Admission:
        """Decide an attempt: rejected now, or admitted (counted in flight) with its plan."""
        cfg = self.config
        if self.window.window != cfg.window:
            self.window.window = cfg.window
        now = self.now()
        rid = "req_" + secrets.token_hex(12)
        if cfg.quota or forced == "quota":
            return Admission(now, QUOTA, request_id=rid)
        if forced == "429":
            return Admission(now, RATE_LIMITED, wait=1.0, request_id=rid)
        if forced == "529":
            return Admission(now, OVERLOADED, request_id=rid)
        output_tokens = max(1, round(self.rng.gauss(cfg.output_mean, cfg.output_sd))) if cfg.output_sd else max(1, cfg.output_mean)
        wait = self.window.wait_time(now, tokens=input_tokens + output_tokens, rpm=cfg.rpm, tpm=cfg.tpm)
        if math.isinf(wait):
            return Admission(now, TOO_LARGE, request_id=rid)
        if wait > 0:
            return Admission(now, RATE_LIMITED, wait=wait, request_id=rid)
        if cfg.cap and self.in_flight >= cfg.cap:
            return Admission(now, OVERLOADED, request_id=rid)
        entry = self.window.record(now, input_tokens + output_tokens)
        self.in_flight += 1
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        latency = max(0.0, self.rng.gauss(cfg.latency, cfg.jitter)) if cfg.jitter else cfg.latency
        if cfg.spike_rate and self.rng.random() < cfg.spike_rate:
            latency *= cfg.spike_factor
        fault = forced if forced in ("502", "reset", "drop", "stall", "error") else self._draw_fault(stream)
        if fault in ("502", "reset") and not cfg.charge_faults:
            self.window.discard(entry)
            entry = None
        return Admission(
            now, OK, fault=fault, latency=latency, output_tokens=output_tokens,
            entry=entry, released=False, request_id=rid,
        )

    def _draw_fault(self, stream: bool) -> str | None:
        cfg = self.config
        r = self.rng.random()
        for rate, fault in ((cfg.reset_rate, "reset"), (cfg.error_rate, "502")):
            if r < rate:
                return fault
            r -= rate
        if stream:
            for rate, fault in (
                (cfg.drop_rate, "drop"),
                (cfg.stall_rate, "stall"),
                (cfg.midstream_error_rate, "error"),
            ):
                if r < rate:
                    return fault
                r -= rate
        return None

    def release(self, adm: Admission) -> None:
        if not adm.released:
            adm.released = True
            self.in_flight -= 1

    def settle(self, adm: Admission, input_tokens: int, output_tokens: int) -> None:
        """Charge the window with what the attempt really consumed."""
        if adm.entry is not None:
            self.window.settle(adm.entry, input_tokens + output_tokens)

    def record(self, attempt: Attempt) -> Attempt:
        self.attempts.append(attempt)
        if self._log_file is not None:
            self._log_file.write(json.dumps(attrs.asdict(attempt)) + "\n")
            self._log_file.flush()
        return attempt

    # ----------------------------------------------------------- rendering

    def buckets(self) -> tuple[BucketState, BucketState]:
        cfg = self.config
        return self.window.buckets(self.now(), rpm=cfg.rpm, tpm=cfg.tpm)

    def rate_headers(self, fmt: str, *, exhausted: str | None = None) -> list[tuple[str, str]]:
        """Rate-limit headers in a provider's style; ``exhausted`` forces remaining 0.

        ``exhausted`` is "requests", "tokens" or "all" on a 429.  The mock has a
        single token budget, so Anthropic's input- and output-token buckets
        report that same budget.
        """
        now = self.now()
        req, tok = self.buckets()
        out: list[tuple[str, str]] = []
        for name, bucket in (("requests", req), ("tokens", tok)):
            if not bucket.limit:
                continue
            remaining = 0 if exhausted in (name, "all") else bucket.remaining
            reset_at = max(bucket.reset_at, now)
            if fmt == "anthropic":
                names = ("requests",) if name == "requests" else ("tokens", "input-tokens", "output-tokens")
                for n in names:
                    out += [
                        (f"anthropic-ratelimit-{n}-limit", str(bucket.limit)),
                        (f"anthropic-ratelimit-{n}-remaining", str(remaining)),
                        (f"anthropic-ratelimit-{n}-reset", rfc3339(self.wall(reset_at))),
                    ]
            elif fmt == "openai":
                out += [
                    (f"x-ratelimit-limit-{name}", str(bucket.limit)),
                    (f"x-ratelimit-remaining-{name}", str(remaining)),
                    (f"x-ratelimit-reset-{name}", go_duration(reset_at - now)),
                ]
        return out

    def reply_text(self, output_tokens: int) -> str:
        head = self.config.reply_text or "Hello from the mock provider."
        if not self.config.pad_text:
            return head
        n = max(0, output_tokens - len(head) // 4)
        return head + "".join(" " + _FILLER[i % len(_FILLER)] for i in range(n))

    def split_deltas(self, text: str) -> tuple[str, ...]:
        n = max(1, min(self.config.stream_chunks, len(text)))
        size = math.ceil(len(text) / n)
        return tuple(text[i : i + size] for i in range(0, len(text), size)) or ("",)


_REJECTED = frozenset({RATE_LIMITED, OVERLOADED, QUOTA, TOO_LARGE, BAD_REQUEST})


# ---------------------------------------------------------------------- serving


async def serve_mock(
    provider: MockProvider,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``provider`` on ``host:port`` until cancelled; ``started(actual_port)``."""
    from .mock_server import serve

    await serve(provider, host, port, task_status=task_status)


# -------------------------------------------------------------------------- CLI


def add_mock_arguments(parser: argparse.ArgumentParser) -> None:
    d = MockConfig()
    a = parser.add_argument
    a("--host", default="127.0.0.1", help="address to bind (default %(default)s)")
    a("--port", type=int, default=8766, help="port to bind, 0 = any (default %(default)s)")
    a("--rpm", type=int, default=d.rpm, help="requests per window, 0 = unlimited")
    a("--tpm", type=int, default=d.tpm, help="tokens (input+output) per window, 0 = unlimited")
    a("--cap", type=int, default=d.cap, help="max concurrent attempts before 529, 0 = none")
    a("--error-rate", type=float, default=d.error_rate, help="fraction answered 502 api_error")
    a("--reset-rate", type=float, default=d.reset_rate, help="fraction answered by a TCP reset")
    a("--drop-rate", type=float, default=d.drop_rate, help="fraction of streams reset after some events")
    a("--stall-rate", type=float, default=d.stall_rate, help="fraction of streams that go silent")
    a("--midstream-error-rate", type=float, default=d.midstream_error_rate,
      help="fraction of streams ending in a provider error event")
    a("--latency", type=float, default=d.latency, help="base latency, seconds")
    a("--jitter", type=float, default=d.jitter, help="latency Gaussian sd, seconds")
    a("--spike-rate", type=float, default=d.spike_rate, help="fraction of attempts with a latency spike")
    a("--spike-factor", type=float, default=d.spike_factor, help="latency multiplier of a spike")
    a("--output-mean", type=int, default=d.output_mean, help="mean output tokens")
    a("--output-sd", type=int, default=d.output_sd, help="output tokens sd")
    a("--window", type=float, default=d.window, help="rate window, seconds")
    a("--stream-delay", type=float, default=d.stream_delay, help="seconds between stream events")
    a("--stream-chunks", type=int, default=d.stream_chunks, help="text deltas per streamed reply (at most one per character)")
    a("--seed", type=int, default=None, help="random seed")
    a("--reply-text", default=d.reply_text, help="text every reply contains")
    a("--no-pad", action="store_true", help="reply with exactly the reply text (no filler words)")
    a("--quota", action="store_true", help="refuse every generation as out of quota")
    a("--uncharged-faults", action="store_true",
      help="injected 502s and resets do not count against the rate window (default: they do)")
    a("--compress", default=d.compress, choices=["", "auto", *_ENCODINGS],
      help="compress responses the client accepts ('auto' = best accepted)")
    a("-v", "--verbose", action="store_true", help="print every request (method, path, headers) to stderr")
    a("--log", metavar="FILE", default=None, help="append every attempt as a JSON line")


def config_from_args(args: argparse.Namespace) -> MockConfig:
    return MockConfig(
        rpm=args.rpm, tpm=args.tpm, cap=args.cap, error_rate=args.error_rate, reset_rate=args.reset_rate,
        drop_rate=args.drop_rate, stall_rate=args.stall_rate, midstream_error_rate=args.midstream_error_rate,
        latency=args.latency, jitter=args.jitter, spike_rate=args.spike_rate, spike_factor=args.spike_factor,
        output_mean=args.output_mean, output_sd=args.output_sd, window=args.window,
        stream_delay=args.stream_delay, stream_chunks=args.stream_chunks, seed=args.seed, reply_text=args.reply_text,
        pad_text=not args.no_pad, quota=args.quota, compress=args.compress,
        charge_faults=not args.uncharged_faults,
    )


def run_mock_from_args(args: argparse.Namespace) -> int:
    """Run the mock until interrupted; returns the process exit code."""
    try:
        config = config_from_args(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    log_file = open(args.log, "a", encoding="utf-8") if args.log else None  # noqa: SIM115

    async def main() -> None:
        provider = MockProvider(config, log_file=log_file, verbose=getattr(args, "verbose", False))
        async with trio.open_nursery() as nursery:
            # SIGINT and SIGTERM end the run cleanly (exit 0), like `serve`;
            # caught from before the "listening" line, which callers wait for.
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                port = await nursery.start(serve_mock, provider, args.host, args.port)
                print(f"mock provider listening on http://{args.host}:{port}", flush=True)
                async for _ in signals:
                    break
            nursery.cancel_scope.cancel()

    try:
        trio.run(main)
    except KeyboardInterrupt:
        return 0
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        if log_file is not None:
            log_file.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hivemind_trio.sim.mock", description="Run the mock provider.")
    add_mock_arguments(parser)
    return run_mock_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
