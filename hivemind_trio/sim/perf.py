"""``hivemind-trio perf``: SPEC §9's overhead, throughput and scale targets, measured.

Theory of operation
-------------------
Everything is real: the mock provider and the proxy each run as their own
process (``python -m hivemind_trio mock`` / ``serve``) on loopback ports, the
proxy with its defaults unless a mode says otherwise.  The mock answers at
once (latency 0, jitter 0, no limits, no faults), so whatever a proxied
request costs beyond a direct one is the proxy's.  Each mode starts its own
mock and proxy, so a process's peak RSS (``VmHWM``) belongs to that mode.

The load generator is this process: plain HTTP/1.1 over Trio sockets, framed
by h11, one keep-alive connection per simulated client.  Not httpx: its client
spends more CPU per request than the proxy does, and on two shared cores that
would measure the load generator.  Time stamps are ``time.perf_counter()``
taken right after the socket read that completed a response or an event.

Modes
-----
* ``overhead``: concurrency 1.  The same non-streaming request goes to every
  target (the mock directly, the proxy, optionally the paper's proxy),
  interleaved in rotating order (round i starts with target i mod n) so
  drift on a shared machine hits them alike; *added* latency is the
  proxied latency minus the direct one of the same round.  CPU per proxied
  request is the proxy process's utime+stime (``/proc/PID/stat``) over the
  non-streaming rounds divided by the rounds.  Then streaming requests, with
  the mock spacing its events ``--event-spacing`` apart: time to the first
  event (paired the same way), and batching: an event that the proxy held
  back until the next one arrived would reach the client in the same socket
  read as that next one, so every read that completes more than one event is
  counted.  The spacing (20 ms) is far above loopback and scheduling noise at
  concurrency 1, so a batched read means the proxy batched.
* ``throughput``: ``--clients`` concurrent clients, each sending its next
  request as soon as the last one ended, for ``--duration`` seconds after a
  warm-up; targets one after another.  The proxy, the mock and this load
  generator share the machine's cores, so each process's CPU use over the
  window is reported next to the rate.
* ``streams``: ``--streams`` streams held open at once through the proxy,
  the mock spacing ``--stream-events`` text deltas ``--stream-interval``
  apart; starts are spread evenly over a ramp so the streams' events do not
  all fall due in the same instant.  Per-event delay is measured against the
  mock's own schedule: event j of a stream is due ``j x interval`` after the
  stream's first event, and its *lateness* is how much later it arrived.
  The mock and this process add lateness of their own under load (the mock
  sleeps the interval after each event, so its overshoots accumulate along
  a stream), so a set of direct *probe* streams (one per ten) runs in the
  same ramp, through the same mock and the same client loop.  The proxy's
  added delay for event j of a stream is its lateness minus the lateness of
  event j of the probe that started nearest in time: paired like the
  overhead rounds, and conservative (the probe's own jitter widens the
  spread).  Errors, peak streams open at once, the proxy's peak RSS and the
  kernel's count of connections dropped by a full listen queue (a burst of
  connects beyond a server's backlog waits for SYN retransmissions: 1 s,
  3 s, 7 s, ...) are reported.  The default pace (1000 streams started over
  10 s, an event every 0.5 s: 2000 events/s at the peak) is what two shared
  cores can carry for the mock and the load generator; ``--stream-interval``
  and ``--ramp`` make it harsher.  The lane's concurrency window is set to
  hold every stream (a profile extending ``anthropic`` with
  ``window_initial = window_max = streams``) and the upstream pool to match;
  otherwise the proxy would rightly queue them.
* ``queue``: ``--queued`` requests held in the proxy's queue at once.  The
  lane's window is fixed small (``--queue-window``) and first filled by
  streaming requests the mock stalls (``x-mock-fault: stall``); then the
  queued requests arrive, each on its own connection, and wait while the
  queue depth is read from ``/hivemind/status``.  Closing the stalled streams
  frees the window and the queue drains; every queued request must succeed.

Figures are measurements on whatever machine runs them, never assertions.
``--compare-hivemind-scheduler PYTHON`` adds the paper's own proxy (PyPI
``hivemind-scheduler``, installed in another environment whose interpreter
is PYTHON) as a third target in the same runs; its rate limiter's pre-seeded
60 RPM for unknown upstreams is switched off (the mock has no limits), the
rest is as it ships.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import json
import math
import os
import platform
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import attrs
import h11
import httpx
import trio

__all__ = ["MODES", "PerfError", "PerfOptions", "add_perf_arguments", "run_perf", "run_perf_from_args"]

MODES = ("overhead", "throughput", "streams", "queue")
DIRECT, OURS, PAPER = "direct", "hivemind_trio", "hivemind-scheduler"

PROMPT = ("Summarise the change in one line. " * 6)[:200]
MAX_TOKENS = 1024  # above the mock's fixed reply length, so replies are not cut
REPLY_TOKENS = 100  # the mock's reply length (--output-mean, sd 0): about 700 bytes of JSON
REQUEST_TIMEOUT = 60.0  # a request that takes longer is an error, not a hang
START_TIMEOUT = 30.0  # for a service to answer its health check


# Which knobs each mode reads (for the printed command line).
MODE_OPTIONS = {
    "overhead": ("requests", "streaming_requests", "event_spacing"),
    "throughput": ("clients", "duration"),
    "streams": ("streams", "stream_events", "stream_interval", "ramp"),
    "queue": ("queued", "queue_window"),
}


class PerfError(Exception):
    """A run that cannot produce figures (a service did not start, bad arguments)."""


@attrs.frozen
class PerfOptions:
    """Every knob of a run; ``command()`` renders them back as the command line."""

    modes: tuple[str, ...] = MODES
    requests: int = 2000
    streaming_requests: int = 100
    event_spacing: float = 0.02
    clients: int = 50
    duration: float = 10.0
    streams: int = 1000
    stream_events: int = 30
    stream_interval: float = 0.5
    ramp: float = 10.0
    queued: int = 10_000
    queue_window: int = 50
    out: str = "perf-out"
    compare_python: str = ""
    quick: bool = False

    def command(self) -> str:
        """The command line that repeats this run: every knob of the selected modes spelt out."""
        argv = ["hivemind-trio", "perf", *self.modes]
        if self.quick:
            argv.append("--quick")
        for mode in self.modes:
            for name in MODE_OPTIONS[mode]:
                value = getattr(self, name)
                argv += ["--" + name.replace("_", "-"), str(value) if isinstance(value, int) else f"{value:g}"]
        argv += ["--out", self.out]
        if self.compare_python:
            argv += ["--compare-hivemind-scheduler", self.compare_python]
        return shlex.join(argv)


# ------------------------------------------------------------------ processes


@attrs.define
class Service:
    """A process under test, with the /proc readings the report needs."""

    name: str
    port: int
    proc: subprocess.Popen[bytes]
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def cpu_seconds(self) -> float:
        """utime + stime so far, from /proc (fields 14-15 of stat; the name may hold spaces)."""
        stat = Path(f"/proc/{self.proc.pid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2 :].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def memory_mb(self, key: str = "VmHWM") -> float:
        """A /proc status memory line in MB: VmHWM is the peak RSS, VmRSS the current one."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
        raise PerfError(f"{self.name}: no {key} in /proc/{self.proc.pid}/status")

    def stop(self) -> None:
        """SIGTERM (both servers drain and exit), then SIGKILL if it lingers."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def free_port() -> int:
    """A loopback port nobody holds right now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _child_env() -> dict[str, str]:
    """Our environment without HIVEMIND_* (a user's HIVEMIND_CONFIG must not reshape the proxy under test)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("HIVEMIND_")}


def _log_tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def start_service(name: str, argv: Sequence[str], port: int, health: str, log_dir: Path) -> Service:
    """Start ``argv`` and wait until GET ``health`` answers 200; PerfError (with its log) if it never does."""
    log_path = log_dir / f"{name}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                env=_child_env())
    service = Service(name, port, proc, log_path)
    deadline = time.monotonic() + START_TIMEOUT
    with httpx.Client(trust_env=False, timeout=1.0) as client:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise PerfError(f"{name} exited with status {proc.returncode} before answering; "
                                f"{log_path} ends:\n{_log_tail(log_path)}")
            with contextlib.suppress(httpx.HTTPError):
                if client.get(service.url + health).status_code == 200:
                    return service
            time.sleep(0.05)
    service.stop()
    raise PerfError(f"{name} did not answer {health} within {START_TIMEOUT:g} s; {log_path} ends:\n{_log_tail(log_path)}")


class Rig:
    """The processes of one mode; stops them all on exit, whatever happened."""

    def __init__(self, out: Path, mode: str) -> None:
        self.dir = out / mode
        self.dir.mkdir(parents=True, exist_ok=True)
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> Rig:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def _keep(self, service: Service) -> Service:
        self._stack.callback(service.stop)
        return service

    def mock(self, *, stream_delay: float = 0.0, stream_chunks: int = 6) -> Service:
        port = free_port()
        argv = [sys.executable, "-m", "hivemind_trio", "mock", "--port", str(port), "--latency", "0",
                "--jitter", "0", "--output-mean", str(REPLY_TOKENS), "--output-sd", "0", "--seed", "1",
                "--stream-delay", f"{stream_delay:g}", "--stream-chunks", str(stream_chunks)]
        return self._keep(start_service("mock", argv, port, "/mock/stats", self.dir))

    def proxy(self, mock: Service, *, window: int | None = None, pool: int | None = None) -> Service:
        """``hivemind-trio serve`` in front of ``mock``: defaults, or a fixed window (see the module doc)."""
        port = free_port()
        argv = [sys.executable, "-m", "hivemind_trio", "serve", "--port", str(port)]
        if window is None:
            argv += ["--upstream", mock.url]
        else:
            argv += ["--config", str(self._window_config(mock, window, pool or 512))]
        return self._keep(start_service(OURS, argv, port, "/hivemind/health", self.dir))

    def _window_config(self, mock: Service, window: int, pool: int) -> Path:
        profiles = self.dir / "profiles"
        profiles.mkdir(exist_ok=True)
        (profiles / "perf-window.toml").write_text(
            "# Written by hivemind-trio perf: Anthropic's profile with a fixed concurrency window.\n"
            'extends = "anthropic"\nhosts = []\n\n[detect]\norder = 1000\n\n'
            f"[limits]\nwindow_min = {window}\nwindow_initial = {window}\nwindow_max = {window}\n")
        config = self.dir / "proxy.toml"
        config.write_text(
            f'[server]\nmax_connections = {pool}\nprofiles_dir = "{profiles}"\n\n'
            f'[[routes]]\nname = "mock"\nurl = "{mock.url}"\nprefix = "/"\nprofile = "perf-window"\n')
        return config

    def paper_proxy(self, python: str, mock: Service, *, concurrency: int) -> Service:
        """The paper's proxy (hivemind-scheduler) under ``python``, via a launcher written next to its log."""
        port = free_port()
        launcher = self.dir / "hivemind_scheduler_launcher.py"
        launcher.write_text(PAPER_LAUNCHER)
        argv = [python, str(launcher), "127.0.0.1", str(port), mock.url, str(concurrency),
                str(self.dir / "hivemind-scheduler.db")]
        return self._keep(start_service(PAPER, argv, port, "/_health", self.dir))


PAPER_LAUNCHER = '''\
"""Start hivemind-scheduler's proxy for hivemind-trio perf: host port upstream concurrency db."""
import sys

from hivemind.proxy import server
from hivemind.storage.models import HiveMindConfig

host, port, upstream, concurrency, db = sys.argv[1:6]
_build = server._build_proxy


def _unthrottled(config):
    # Its "generic" profile (any upstream it does not recognise) pre-seeds a
    # 60 RPM / 100k TPM limiter; the mock has no limits, so that limiter would
    # be what is measured.  Everything else stays as it ships.
    proxy = _build(config)
    proxy.rate_limiter._rpm_limit = None
    proxy.rate_limiter._tpm_limit = None
    return proxy


server._build_proxy = _unthrottled
server.run_proxy(HiveMindConfig(proxy_host=host, proxy_port=int(port), upstream_url=upstream,
                                max_concurrency=int(concurrency), db_path=db))
'''


def check_paper_python(python: str) -> None:
    """Refuse early, with the reason, an interpreter that cannot import hivemind-scheduler."""
    try:
        done = subprocess.run([python, "-c", "import hivemind.proxy.server, hivemind.storage.models"],
                              capture_output=True, text=True, timeout=60, env=_child_env())
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise PerfError(f"--compare-hivemind-scheduler: cannot run {python!r}: {exc}") from None
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise PerfError(f"--compare-hivemind-scheduler: {python!r} cannot import hivemind-scheduler "
                        f"(pip install hivemind-scheduler into that environment): {last}")


# ------------------------------------------------------------ load generator


@attrs.frozen
class Request:
    """A request ready to send: the h11 head and the body (reused for every send)."""

    head: h11.Request
    body: bytes


def make_request(port: int, *, stream: bool, agent: str, extra: Sequence[tuple[str, str]] = ()) -> Request:
    """An Anthropic Messages request, as an agent sends it."""
    body = json.dumps({
        "model": "claude-perf", "max_tokens": MAX_TOKENS, "stream": stream,
        "messages": [{"role": "user", "content": PROMPT}],
    }, separators=(",", ":")).encode()
    headers = [
        ("host", f"127.0.0.1:{port}"), ("x-api-key", "sk-perf"), ("anthropic-version", "2023-06-01"),
        ("content-type", "application/json"), ("content-length", str(len(body))),
        ("x-hivemind-agent", agent), *extra,
    ]
    return Request(h11.Request(method="POST", target="/v1/messages", headers=headers), body)


@attrs.define
class Reply:
    """One response as the client saw it; times are perf_counter seconds."""

    sent: float = 0.0
    status: int = 0
    end: float = 0.0
    event_times: list[float] = attrs.Factory(list)  # when the read completing each SSE event returned
    event_reads: int = 0  # reads that completed at least one event
    batched_reads: int = 0  # reads that completed more than one
    body: bytes = b""
    error: str = ""

    @property
    def ok(self) -> bool:
        return not self.error and self.status == 200 and bool(self.body)

    @property
    def stream_complete(self) -> bool:
        return self.ok and b"event: message_stop" in self.body

    @property
    def latency(self) -> float:
        return self.end - self.sent

    @property
    def first_event(self) -> float | None:
        return self.event_times[0] - self.sent if self.event_times else None


class _Closed(Exception):
    """The server closed the connection before the response ended."""


class Client:
    """One keep-alive HTTP/1.1 connection, as an agent's HTTP client holds one."""

    def __init__(self, port: int) -> None:
        self.port = port
        self._stream: trio.SocketStream | None = None
        self._h11 = h11.Connection(h11.CLIENT)

    async def connect(self) -> None:
        """Open the connection now (else the first ``send`` does); OSError if refused."""
        if self._stream is None:
            self._stream = await trio.open_tcp_stream("127.0.0.1", self.port)
            self._h11 = h11.Connection(h11.CLIENT)

    async def aclose(self) -> None:
        stream, self._stream = self._stream, None
        if stream is not None:
            with trio.CancelScope(shield=True):
                await stream.aclose()

    async def send(self, request: Request, timeout: float = REQUEST_TIMEOUT) -> Reply:
        """Send and read the whole response; failures come back as ``Reply.error``, never raised."""
        reply = Reply()
        try:
            with trio.fail_after(timeout):
                await self._exchange(request, reply)
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError, _Closed,
                trio.TooSlowError) as exc:
            reply.error = f"{type(exc).__name__}: {exc}"
        finally:
            if not reply.end:  # cut short (error or cancel): the connection is unusable
                await self.aclose()
        return reply

    async def _exchange(self, request: Request, reply: Reply) -> None:
        await self.connect()
        conn, stream = self._h11, self._stream
        assert stream is not None
        data = conn.send(request.head) + conn.send(h11.Data(data=request.body)) + conn.send(h11.EndOfMessage())
        reply.sent = time.perf_counter()
        await stream.send_all(data)
        parts: list[bytes] = []
        last = b""
        while True:
            received = await stream.receive_some(65536)
            now = time.perf_counter()
            conn.receive_data(received)
            chunk, done = self._drain(conn, reply)
            if chunk:
                _count_events(reply, last + chunk, now)
                parts.append(chunk)
                last = chunk[-1:]
            if done:
                break
        reply.end = now
        reply.body = b"".join(parts)
        if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
            conn.start_next_cycle()
        else:
            await self.aclose()

    @staticmethod
    def _drain(conn: h11.Connection, reply: Reply) -> tuple[bytes, bool]:
        """Every h11 event the bytes read so far complete: (body bytes, response ended?)."""
        chunk = bytearray()
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                return bytes(chunk), False
            if isinstance(event, h11.Response):
                reply.status = event.status_code
            elif isinstance(event, h11.Data):
                chunk += event.data
            elif isinstance(event, h11.EndOfMessage):
                return bytes(chunk), True
            elif isinstance(event, h11.ConnectionClosed):
                raise _Closed("connection closed before the response ended")


def _count_events(reply: Reply, data: bytes, now: float) -> None:
    """SSE events end with a blank line; ``data`` starts with the previous read's last byte."""
    n = data.count(b"\n\n")
    if n:
        reply.event_times.extend([now] * n)
        reply.event_reads += 1
        reply.batched_reads += n > 1


# ------------------------------------------------------------------- figures


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear-interpolated percentile (q in [0, 1]); None for no values."""
    if not values:
        return None
    s = sorted(values)
    k = (len(s) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def ms_summary(seconds: Sequence[float]) -> dict[str, float | int | None]:
    """p50 / p99 / mean / max in milliseconds, and how many values."""
    def ms(v: float | None) -> float | None:
        return None if v is None else round(v * 1000, 3)

    return {
        "n": len(seconds), "p50": ms(percentile(seconds, 0.5)), "p99": ms(percentile(seconds, 0.99)),
        "mean": ms(sum(seconds) / len(seconds)) if seconds else None, "max": ms(max(seconds, default=None)),
    }


def _errors(replies: Sequence[Reply]) -> dict[str, int]:
    """Failed replies by cause (the status, or the exception's type)."""
    out: dict[str, int] = {}
    for r in replies:
        if not r.ok:
            out[_cause(r)] = out.get(_cause(r), 0) + 1
    return out


def _cause(reply: Reply) -> str:
    """Why a reply failed: the exception's type, the status, or a 200 that carried nothing."""
    if reply.error:
        return reply.error.split(":")[0]
    return f"status {reply.status}" if reply.status != 200 else "200, empty body"


@attrs.define
class Target:
    """Where requests go (``port``) and which process pays for them (``service``)."""

    name: str
    port: int
    service: Service


def rotated(items: Sequence[Target], i: int) -> list[Target]:
    """Round ``i``'s order: every target leads equally often (alternating for two)."""
    k = i % len(items)
    return [*items[k:], *items[:k]]


# ------------------------------------------------------------------- overhead


async def _paired_rounds(targets: Sequence[Target], rounds: int, make: Callable[[Target], Request],
                         clients: dict[str, Client]) -> dict[str, list[Reply]]:
    """``rounds`` rounds, each one request per target in rotating order, at concurrency 1."""
    replies: dict[str, list[Reply]] = {t.name: [] for t in targets}
    requests = {t.name: make(t) for t in targets}
    for i in range(rounds):
        for t in rotated(targets, i):
            replies[t.name].append(await clients[t.name].send(requests[t.name]))
    return replies


def _added(proxied: Sequence[Reply], direct: Sequence[Reply], value: Callable[[Reply], float | None]) -> list[float]:
    """Per round, the proxied value minus the direct one (rounds where either failed are left out)."""
    out = []
    for p, d in zip(proxied, direct, strict=True):
        vp, vd = value(p), value(d)
        if vp is not None and vd is not None:
            out.append(vp - vd)
    return out


def _stream_figures(replies: Sequence[Reply]) -> dict[str, Any]:
    """Events, the reads that carried them, and the smallest gap between two events of one stream."""
    gaps = [b - a for r in replies for a, b in zip(r.event_times, r.event_times[1:])]
    return {
        "streams_complete": sum(r.stream_complete for r in replies),
        "events": sum(len(r.event_times) for r in replies),
        "event_reads": sum(r.event_reads for r in replies),
        "batched_reads": sum(r.batched_reads for r in replies),
        "min_event_gap_ms": round(min(gaps) * 1000, 3) if gaps else None,
    }


def _request_for(target: Target, *, stream: bool) -> Request:
    return make_request(target.port, stream=stream, agent="perf-overhead")


async def measure_overhead(targets: Sequence[Target], opts: PerfOptions) -> dict[str, Any]:
    """Paired latency, CPU per request, first-event latency and batching (see the module doc)."""
    clients = {t.name: Client(t.port) for t in targets}
    plain = partial(_request_for, stream=False)
    streamed = partial(_request_for, stream=True)
    await _paired_rounds(targets, max(10, opts.requests // 20), plain, clients)  # warm-up: pools, caches
    cpu0 = {t.name: t.service.cpu_seconds() for t in targets}
    replies = await _paired_rounds(targets, opts.requests, plain, clients)
    cpu1 = {t.name: t.service.cpu_seconds() for t in targets}
    streams = await _paired_rounds(targets, opts.streaming_requests, streamed, clients)
    for c in clients.values():
        await c.aclose()
    direct = targets[0].name
    out: dict[str, Any] = {"requests": opts.requests, "streaming_requests": opts.streaming_requests,
                           "event_spacing_ms": opts.event_spacing * 1000, "targets": {}}
    for t in targets:
        fig: dict[str, Any] = {
            "ok": sum(r.ok for r in replies[t.name]), "errors": _errors(replies[t.name] + streams[t.name]),
            "latency_ms": ms_summary([r.latency for r in replies[t.name] if r.ok]),
            "first_event_ms": ms_summary([r.first_event for r in streams[t.name] if r.first_event is not None]),
            **_stream_figures(streams[t.name]),
        }
        # The mock serves every target's requests, a proxy only its own.
        served = opts.requests * (len(targets) if t.name == direct else 1)
        fig["cpu_ms_per_request"] = round((cpu1[t.name] - cpu0[t.name]) * 1000 / served, 3)
        if t.name != direct:
            fig["added_ms"] = ms_summary(_added(replies[t.name], replies[direct], lambda r: r.latency if r.ok else None))
            fig["first_event_added_ms"] = ms_summary(_added(streams[t.name], streams[direct], lambda r: r.first_event))
        out["targets"][t.name] = fig
    return out


# ----------------------------------------------------------------- throughput


async def _client_loop(client: Client, request: Request, stop_at: float, replies: list[Reply]) -> None:
    while time.perf_counter() < stop_at:
        replies.append(await client.send(request))
    await client.aclose()


async def measure_throughput(target: Target, others: Sequence[Service], opts: PerfOptions) -> dict[str, Any]:
    """``opts.clients`` closed-loop clients for warm-up + ``opts.duration`` s; only the window is counted."""
    warmup = min(2.0, max(0.5, opts.duration / 5))
    start = time.perf_counter()
    t0, t1 = start + warmup, start + warmup + opts.duration
    replies: list[Reply] = []
    cpu: dict[str, float] = {}
    services = {target.service.name: target.service, **{s.name: s for s in others}}

    async def read_cpu() -> None:
        await trio.sleep(max(0.0, t0 - time.perf_counter()))
        cpu.update({n: -s.cpu_seconds() for n, s in services.items()} | {"load generator": -time.process_time()})
        await trio.sleep(max(0.0, t1 - time.perf_counter()))
        for n, s in services.items():
            cpu[n] += s.cpu_seconds()
        cpu["load generator"] += time.process_time()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read_cpu)
        for i in range(opts.clients):
            request = make_request(target.port, stream=False, agent=f"perf-client-{i}")
            nursery.start_soon(_client_loop, Client(target.port), request, t1, replies)
    counted = [r for r in replies if t0 <= r.end < t1]
    ok = sum(r.ok for r in counted)
    windows = await _lane_windows(target.port) if target.name == OURS else None
    return {
        "lane_windows_at_end": windows,
        "clients": opts.clients, "duration_s": opts.duration, "warmup_s": warmup,
        "ok": ok, "errors": _errors(counted), "requests_per_s": round(ok / opts.duration, 1),
        "latency_ms": ms_summary([r.latency for r in counted if r.ok]),
        "cpu_cores": {n: round(v / opts.duration, 2) for n, v in cpu.items()},
    }


# -------------------------------------------------------------------- streams


def stream_lateness(reply: Reply, interval: float) -> list[float]:
    """How late each event after the first came against the mock's schedule (j x interval after the first)."""
    times = reply.event_times
    return [(t - times[0]) - j * interval for j, t in enumerate(times) if j]


@attrs.define
class _OpenCount:
    now: int = 0
    peak: int = 0

    def change(self, by: int) -> None:
        self.now += by
        self.peak = max(self.peak, self.now)


async def _one_stream(port: int, start_at: float, agent: str, open_count: _OpenCount, out: list[Reply]) -> None:
    """One stream on its own connection, started at ``start_at`` (trio clock)."""
    await trio.sleep_until(start_at)
    client = Client(port)
    request = make_request(port, stream=True, agent=agent)
    open_count.change(+1)
    try:
        out.append(await client.send(request, timeout=REQUEST_TIMEOUT * 5))
    finally:
        open_count.change(-1)
        await client.aclose()


async def measure_streams(proxy: Target, direct: Target, opts: PerfOptions) -> dict[str, Any]:
    """``opts.streams`` proxied streams and one direct probe per ten, started evenly over the ramp."""
    probes = max(5, opts.streams // 10)
    total = opts.streams + probes
    probe_slots = {int((j + 0.5) * total / probes) for j in range(probes)}
    proxied: list[Reply] = []
    direct_replies: list[Reply] = []
    opened = _OpenCount()
    overflows0 = _listen_overflows()
    base_rss = proxy.service.memory_mb("VmRSS")
    cpu0 = _cpu_now(proxy, direct)
    begin = trio.current_time()
    async with trio.open_nursery() as nursery:
        for i in range(total):
            start_at = begin + opts.ramp * i / total
            if i in probe_slots:
                nursery.start_soon(_one_stream, direct.port, start_at, f"perf-probe-{i}", _OpenCount(), direct_replies)
            else:
                nursery.start_soon(_one_stream, proxy.port, start_at, f"perf-stream-{i}", opened, proxied)
    wall = trio.current_time() - begin
    cpu = {name: (seconds - cpu0[name]) / max(wall, 1e-9) for name, seconds in _cpu_now(proxy, direct).items()}
    late_p = [x for r in proxied if r.stream_complete for x in stream_lateness(r, opts.stream_interval)]
    late_d = [x for r in direct_replies if r.stream_complete for x in stream_lateness(r, opts.stream_interval)]
    added = paired_event_delays(proxied, direct_replies, opts.stream_interval)
    expected = _events_per_stream(direct_replies)
    return {
        "streams": len(proxied), "probes": len(direct_replies), "events_per_stream": expected,
        "interval_ms": opts.stream_interval * 1000, "ramp_s": opts.ramp, "wall_s": round(wall, 2),
        "peak_open": opened.peak, "events_per_s_at_peak": round(opened.peak / opts.stream_interval),
        "complete": sum(r.stream_complete and len(r.event_times) == expected for r in proxied),
        "errors": _errors(proxied) | {"incomplete": sum(r.ok and not r.stream_complete for r in proxied)},
        "probe_errors": _errors(direct_replies),
        "first_event_ms": ms_summary([r.first_event for r in proxied if r.first_event is not None]),
        "probe_first_event_ms": ms_summary([r.first_event for r in direct_replies if r.first_event is not None]),
        "lateness_ms": ms_summary(late_p), "probe_lateness_ms": ms_summary(late_d),
        "added_delay_ms": ms_summary(added),
        "batched_reads": sum(r.batched_reads for r in proxied), "event_reads": sum(r.event_reads for r in proxied),
        "rss_start_mb": round(base_rss, 1), "rss_peak_mb": round(proxy.service.memory_mb("VmHWM"), 1),
        "cpu_cores": {name: round(cores, 2) for name, cores in cpu.items()},
        "listen_overflows": _listen_overflows() - overflows0,
    }


def _cpu_now(proxy: Target, direct: Target) -> dict[str, float]:
    """CPU seconds so far of the proxy, the mock and this load generator."""
    return {proxy.name: proxy.service.cpu_seconds(), "mock": direct.service.cpu_seconds(),
            "load generator": time.process_time()}


def _listen_overflows() -> int:
    """The kernel's count of connections dropped because a listen queue was full (TcpExt ListenOverflows).

    Machine-wide: other programs' overflows count too.  A burst of new
    connections larger than a server's backlog shows here, and as connects
    that wait for SYN retransmissions (1 s, 3 s, 7 s, ...).
    """
    try:
        lines = Path("/proc/net/netstat").read_text().splitlines()
    except OSError:
        return 0
    for names, values in zip(lines[::2], lines[1::2]):
        if names.startswith("TcpExt:"):
            table = dict(zip(names.split()[1:], values.split()[1:]))
            return int(table.get("ListenOverflows", 0))
    return 0


def _events_per_stream(replies: Sequence[Reply]) -> int:
    """The mock's own event count per stream, as the direct probes received it (the most common count)."""
    counts = [len(r.event_times) for r in replies if r.stream_complete]
    return max(set(counts), key=counts.count) if counts else 0


def paired_event_delays(proxied: Sequence[Reply], probes: Sequence[Reply], interval: float) -> list[float]:
    """Per event of each complete proxied stream: its lateness minus that of the same event of the
    complete direct probe that started nearest in time (see the module doc)."""
    baseline = sorted((p.sent, stream_lateness(p, interval)) for p in probes if p.stream_complete)
    if not baseline:
        return []
    starts = [t for t, _ in baseline]
    out: list[float] = []
    for r in proxied:
        if not r.stream_complete:
            continue
        i = bisect.bisect_left(starts, r.sent)
        near = min((k for k in (i - 1, i) if 0 <= k < len(starts)), key=lambda k: abs(starts[k] - r.sent))
        out += [p - d for p, d in zip(stream_lateness(r, interval), baseline[near][1])]
    return out


# ---------------------------------------------------------------------- queue


async def _proxy_status(port: int) -> dict[str, Any]:
    async with httpx.AsyncClient(trust_env=False, timeout=10.0) as client:
        return dict((await client.get(f"http://127.0.0.1:{port}/hivemind/status")).json())


async def _lane_windows(port: int) -> list[int]:
    """The lanes' concurrency windows (AIMD) now: whether the window, not the CPU, was the limit."""
    return [int(lane["window"]) for lane in (await _proxy_status(port)).get("lanes", [])]


async def _queued_depth(port: int) -> int:
    """Requests waiting for admission, summed over the proxy's lanes (GET /hivemind/status)."""
    return sum(int(lane.get("queued", 0)) for lane in (await _proxy_status(port)).get("lanes", []))


async def _watch_queue(port: int, peak: list[int], stop: trio.Event) -> None:
    """Poll the queue depth every 0.25 s, keeping the peak in ``peak[0]``."""
    while not stop.is_set():
        with contextlib.suppress(httpx.HTTPError):
            peak[0] = max(peak[0], await _queued_depth(port))
        with trio.move_on_after(0.25):
            await stop.wait()


async def measure_queue(proxy: Target, opts: PerfOptions) -> dict[str, Any]:
    """Fill the window with stalled streams, queue ``opts.queued`` requests behind them, then release."""
    stalled = make_request(proxy.port, stream=True, agent="perf-blocker", extra=[("x-mock-fault", "stall")])
    plain = [make_request(proxy.port, stream=False, agent=f"perf-queued-{i % 100}") for i in range(100)]
    replies: list[Reply] = []
    peak = [0]
    release, stop_watch = trio.Event(), trio.Event()
    connect_limit = trio.CapacityLimiter(256)

    async def blocker() -> None:
        """A stream the mock stalls: it holds one window slot until ``release``."""
        async with trio.open_nursery() as n:
            n.start_soon(Client(proxy.port).send, stalled, 3600.0)
            await release.wait()
            n.cancel_scope.cancel()

    async def queued(i: int) -> None:
        client = Client(proxy.port)
        try:
            async with connect_limit:  # Hypercorn's listen backlog is 100
                await client.connect()
        except OSError as exc:
            replies.append(Reply(error=f"connect: {exc}"))
            return
        replies.append(await client.send(plain[i % 100], timeout=600.0))
        await client.aclose()

    async with trio.open_nursery() as nursery:
        for _ in range(opts.queue_window):
            nursery.start_soon(blocker)
        await _wait_in_flight(proxy.port, opts.queue_window)
        nursery.start_soon(_watch_queue, proxy.port, peak, stop_watch)
        t_start = time.perf_counter()
        for i in range(opts.queued):
            nursery.start_soon(queued, i)
        queued_at = await _wait_queued(peak, opts.queued, t_start)
        held_rss = proxy.service.memory_mb("VmRSS")
        release.set()
        t_release = time.perf_counter()
        while len(replies) < opts.queued:
            await trio.sleep(0.05)
        drained = time.perf_counter() - t_release
        stop_watch.set()
    return {
        "queued": opts.queued, "window": opts.queue_window, "peak_queued": peak[0],
        "all_queued_after_s": queued_at, "drain_s": round(drained, 2),
        "ok": sum(r.ok for r in replies), "errors": _errors(replies),
        "rss_held_mb": round(held_rss, 1), "rss_peak_mb": round(proxy.service.memory_mb("VmHWM"), 1),
    }


async def _wait_in_flight(port: int, n: int, timeout: float = 60.0) -> None:
    """Until ``n`` requests are upstream (the stalled streams hold the window)."""
    with trio.fail_after(timeout):
        while sum(int(lane.get("in_flight", 0)) for lane in (await _proxy_status(port)).get("lanes", [])) < n:
            await trio.sleep(0.1)


async def _wait_queued(peak: list[int], n: int, t_start: float, timeout: float = 300.0) -> float | None:
    """Seconds until the watched peak reaches ``n`` (None if it never did within ``timeout``)."""
    with trio.move_on_after(timeout):
        while peak[0] < n:
            await trio.sleep(0.05)
        return round(time.perf_counter() - t_start, 2)
    return None


# ------------------------------------------------------------------ the modes


def _targets(rig: Rig, mock: Service, opts: PerfOptions, *, concurrency: int,
             window: int | None = None, pool: int | None = None) -> list[Target]:
    targets = [Target(DIRECT, mock.port, mock)]
    proxy = rig.proxy(mock, window=window, pool=pool)
    targets.append(Target(OURS, proxy.port, proxy))
    if opts.compare_python:
        paper = rig.paper_proxy(opts.compare_python, mock, concurrency=concurrency)
        targets.append(Target(PAPER, paper.port, paper))
    return targets


def run_overhead(out: Path, opts: PerfOptions) -> dict[str, Any]:
    with Rig(out, "overhead") as rig:
        mock = rig.mock(stream_delay=opts.event_spacing)
        targets = _targets(rig, mock, opts, concurrency=8)
        return trio.run(measure_overhead, targets, opts)


def run_throughput(out: Path, opts: PerfOptions) -> dict[str, Any]:
    with Rig(out, "throughput") as rig:
        mock = rig.mock()
        targets = _targets(rig, mock, opts, concurrency=max(64, opts.clients))
        results = {}
        for t in targets:
            others = [mock] if t.service is not mock else []
            results[t.name] = trio.run(measure_throughput, t, others, opts)
        return {"targets": results}


def run_streams(out: Path, opts: PerfOptions) -> dict[str, Any]:
    with Rig(out, "streams") as rig:
        mock = rig.mock(stream_delay=opts.stream_interval, stream_chunks=opts.stream_events)
        window = opts.streams + 16
        targets = _targets(rig, mock, opts, concurrency=window, window=window, pool=window)
        return {"targets": {t.name: trio.run(measure_streams, t, targets[0], opts) for t in targets[1:]}}


def run_queue(out: Path, opts: PerfOptions) -> dict[str, Any]:
    with Rig(out, "queue") as rig:
        mock = rig.mock()
        proxy = rig.proxy(mock, window=opts.queue_window, pool=opts.queue_window + 16)
        return trio.run(measure_queue, Target(OURS, proxy.port, proxy), opts)


RUNNERS: dict[str, Callable[[Path, PerfOptions], dict[str, Any]]] = {
    "overhead": run_overhead, "throughput": run_throughput, "streams": run_streams, "queue": run_queue,
}


def _raise_fd_limit(needed: int) -> None:
    """Many sockets at once (streams, queue): lift the soft fd limit to the hard one, for us and the children."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed if hard == resource.RLIM_INFINITY else min(hard, needed), hard))


def run_perf(opts: PerfOptions) -> dict[str, Any]:
    """Run the selected modes; the report (also written to ``opts.out``/perf.json)."""
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    if opts.compare_python:
        check_paper_python(opts.compare_python)
    _raise_fd_limit(2 * max(opts.streams, opts.queued) + 1024)
    report: dict[str, Any] = {
        "command": opts.command(), "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "loadavg_start": os.getloadavg(), "python": platform.python_version(),
                    "platform": platform.platform()},
        "load_generator": "h11 on Trio sockets, one keep-alive connection per client",
        "compared": bool(opts.compare_python),
    }
    for mode in opts.modes:
        started = time.monotonic()
        print(f"perf: {mode} ...", file=sys.stderr, flush=True)
        report[mode] = RUNNERS[mode](out, opts)
        print(f"perf: {mode} done in {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)
    report["machine"]["loadavg_end"] = os.getloadavg()
    (out / "perf.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return report


# ---------------------------------------------------------------------- table


def _fmt(value: Any, unit: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        value = f"{value:.2f}" if abs(value) < 100 else f"{value:.0f}"
    return f"{value}{unit}"


def _pair(summary: dict[str, Any] | None) -> str:
    """'p50 / p99' of a ms summary."""
    return "-" if not summary else f"{_fmt(summary.get('p50'))} / {_fmt(summary.get('p99'))}"


def _error_count(errors: dict[str, int]) -> int:
    return sum(errors.values())


def markdown_table(report: dict[str, Any]) -> str:
    """One row per figure, one column per target, and SPEC §9's target beside it."""
    names = [DIRECT, OURS] + ([PAPER] if report.get("compared") else [])
    rows: list[tuple[str, dict[str, str], str]] = []
    for mode, rowmaker in (("overhead", _overhead_rows), ("throughput", _throughput_rows),
                           ("streams", _streams_rows), ("queue", _queue_rows)):
        if mode in report:
            rows += rowmaker(report[mode])
    head = ["figure", *names, "target"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for figure, cells, target in rows:
        lines.append("| " + " | ".join([figure, *(cells.get(n, "") for n in names), target]) + " |")
    return "\n".join(lines)


Row = tuple[str, dict[str, str], str]


def _overhead_rows(o: dict[str, Any]) -> list[Row]:
    t = o["targets"]

    def each(f: Callable[[dict[str, Any]], str], *, proxies_only: bool = False) -> dict[str, str]:
        return {n: f(v) for n, v in t.items() if not (proxies_only and n == DIRECT)}

    n, m = o["requests"], o["streaming_requests"]
    return [
        (f"latency p50 / p99, ms (non-streaming, concurrency 1, {n} each)", each(lambda v: _pair(v["latency_ms"])), ""),
        ("added latency p50 / p99, ms (paired with direct)", each(lambda v: _pair(v["added_ms"]), proxies_only=True),
         "<= 1 / <= 3"),
        ("CPU per request, ms (mock: per request it served)", each(lambda v: _fmt(v["cpu_ms_per_request"])),
         "half the paper's"),
        (f"first event p50 / p99, ms (streaming, {m} each)", each(lambda v: _pair(v["first_event_ms"])), ""),
        ("first event added p50 / p99, ms", each(lambda v: _pair(v["first_event_added_ms"]), proxies_only=True),
         "<= 1"),
        (f"reads carrying > 1 event (events {o['event_spacing_ms']:g} ms apart)",
         each(lambda v: f"{v['batched_reads']} of {v['event_reads']}"), "0 (never batches)"),
        ("errors (overhead)", each(lambda v: str(_error_count(v["errors"]))), "0"),
    ]


def _throughput_rows(o: dict[str, Any]) -> list[Row]:
    t = o["targets"]
    any_run = next(iter(t.values()))
    return [
        (f"requests/s, {any_run['clients']} clients, {any_run['duration_s']:g} s", {n: _fmt(v["requests_per_s"]) for n, v in t.items()},
         ">= 1000"),
        ("latency p50 / p99 under that load, ms", {n: _pair(v["latency_ms"]) for n, v in t.items()}, ""),
        ("CPU cores used: proxy / mock / load generator", {n: _cores(n, v["cpu_cores"]) for n, v in t.items()}, ""),
        ("errors (throughput)", {n: str(_error_count(v["errors"])) for n, v in t.items()}, "0"),
        ("lane window (AIMD) at the end", {n: ", ".join(map(str, v["lane_windows_at_end"]))
                                           for n, v in t.items() if v.get("lane_windows_at_end")}, ""),
    ]


def _cores(name: str, cores: dict[str, float]) -> str:
    proxy = "-" if name == DIRECT else _fmt(cores.get(name))
    return f"{proxy} / {_fmt(cores.get('mock'))} / {_fmt(cores.get('load generator'))}"


def _streams_rows(o: dict[str, Any]) -> list[Row]:
    t = o["targets"]
    v0 = next(iter(t.values()))
    return [
        (f"streams open at once, peak ({v0['streams']} started over {v0['ramp_s']:g} s; "
         f"{v0['events_per_stream']} events {v0['interval_ms']:g} ms apart)",
         {n: str(v["peak_open"]) for n, v in t.items()}, "1000"),
        ("streams complete / errors", {n: f"{v['complete']} / {_error_count(v['errors'])}" for n, v in t.items()}, "no errors"),
        ("event lateness p50 / p99, ms (direct: probe streams in the same run)",
         {DIRECT: _pair(v0["probe_lateness_ms"]), **{n: _pair(v["lateness_ms"]) for n, v in t.items()}}, ""),
        ("added per-event delay p50 / p99, ms", {n: _pair(v["added_delay_ms"]) for n, v in t.items()}, "p99 <= 10"),
        ("first event p50 / p99, ms",
         {DIRECT: _pair(v0["probe_first_event_ms"]), **{n: _pair(v["first_event_ms"]) for n, v in t.items()}}, ""),
        ("events per s at the peak; CPU cores: proxy / mock / load generator",
         {n: f"{v['events_per_s_at_peak']}; {_cores(n, v['cpu_cores'])}" for n, v in t.items()}, ""),
        ("connections dropped by a full listen queue (machine-wide)",
         {n: str(v["listen_overflows"]) for n, v in t.items()}, ""),
        ("peak RSS, MB", {n: _fmt(v["rss_peak_mb"]) for n, v in t.items()}, "< 300"),
    ]


def _queue_rows(o: dict[str, Any]) -> list[Row]:
    return [
        (f"requests queued at once, peak (window {o['window']})", {OURS: str(o["peak_queued"])}, f"{o['queued']}"),
        ("queued requests ok / errors", {OURS: f"{o['ok']} / {_error_count(o['errors'])}"}, "no failure"),
        ("drain after release, s / peak RSS, MB", {OURS: f"{_fmt(o['drain_s'])} / {_fmt(o['rss_peak_mb'])}"}, ""),
    ]


# ------------------------------------------------------------------------ CLI


def _positive(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
        return value

    return parse


QUICK = {"requests": 200, "streaming_requests": 10, "duration": 2.0, "streams": 100, "stream_events": 20,
         "stream_interval": 0.1, "ramp": 1.0, "queued": 500, "queue_window": 20}


def add_perf_arguments(parser: argparse.ArgumentParser) -> None:
    d = PerfOptions()
    a = parser.add_argument
    a("modes", nargs="*", metavar="MODE", help=f"what to measure: {', '.join(MODES)} (default: all)")
    a("--quick", action="store_true",
      help="small sizes for a smoke run: " + ", ".join(f"{k.replace('_', '-')} {v:g}" for k, v in QUICK.items()))
    a("--requests", type=_positive(int), help=f"overhead: non-streaming requests per target (default {d.requests})")
    a("--streaming-requests", type=_positive(int),
      help=f"overhead: streaming requests per target (default {d.streaming_requests})")
    a("--event-spacing", type=_positive(float),
      help=f"overhead: seconds between the mock's stream events (default {d.event_spacing:g})")
    a("--clients", type=_positive(int), help=f"throughput: concurrent clients (default {d.clients})")
    a("--duration", type=_positive(float), help=f"throughput: counted seconds per target (default {d.duration:g})")
    a("--streams", type=_positive(int), help=f"streams: concurrent streams through the proxy (default {d.streams})")
    a("--stream-events", type=_positive(int), help=f"streams: text deltas per stream (default {d.stream_events})")
    a("--stream-interval", type=_positive(float),
      help=f"streams: seconds between a stream's events (default {d.stream_interval:g})")
    a("--ramp", type=_positive(float), help=f"streams: seconds over which the streams start (default {d.ramp:g})")
    a("--queued", type=_positive(int), help=f"queue: requests held in the queue at once (default {d.queued})")
    a("--queue-window", type=_positive(int), help=f"queue: the lane's fixed window (default {d.queue_window})")
    a("--out", default=d.out, metavar="DIR", help=f"where perf.json and the processes' logs go (default {d.out}/)")
    a("--compare-hivemind-scheduler", metavar="PYTHON", default="",
      help="also measure the paper's proxy: a Python interpreter with PyPI hivemind-scheduler installed "
           "(e.g. a separate venv's bin/python)")


def options_from_args(args: argparse.Namespace) -> PerfOptions:
    """Defaults, then --quick's sizes, then explicit flags; PerfError on an unknown mode."""
    modes = tuple(args.modes) or MODES
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise PerfError(f"unknown mode {unknown[0]!r}; choose from {', '.join(MODES)}")
    values: dict[str, Any] = dict(QUICK) if args.quick else {}
    for field in attrs.fields(PerfOptions):
        given = getattr(args, field.name, None)
        if given is not None and field.name not in ("modes", "quick", "out", "compare_python"):
            values[field.name] = given
    return PerfOptions(modes=tuple(dict.fromkeys(modes)), out=args.out, quick=args.quick,
                       compare_python=args.compare_hivemind_scheduler, **values)


def run_perf_from_args(args: argparse.Namespace) -> int:
    try:
        opts = options_from_args(args)
        print(f"command: {opts.command()}", flush=True)
        report = run_perf(opts)
    except PerfError as exc:
        print(f"hivemind-trio perf: {exc}", file=sys.stderr)
        return 2
    print(f"\nload generator: {report['load_generator']}; {report['machine']['cpus']} CPUs, "
          f"load average {report['machine']['loadavg_start'][0]:.2f} at start, "
          f"{report['machine']['loadavg_end'][0]:.2f} at end\n")
    print(markdown_table(report))
    print(f"\nwritten: {Path(opts.out) / 'perf.json'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hivemind_trio.sim.perf", description=__doc__.split("\n")[0])
    add_perf_arguments(parser)
    return run_perf_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
