"""Shared state in Redis (SPEC §7.5): one upstream limit for N proxy instances.

Theory of operation
-------------------
Each instance keeps its whole local scheduler (window, pacer, breaker,
budgets) and adds Redis as one more gate, so Redis only ever makes an
instance *more* careful:

- Admission: before the lane dispatcher grants a ticket that passed every
  local gate, it runs the ``acquire`` script (:mod:`.scripts`) for it.  The
  script checks, atomically and on the server's clock, the lane's shared
  window (live leases < window), the shared rpm/tpm log, a shared pause
  (retry-after) and a shared open breaker; it grants by adding a lease (with
  an expiry) and a log entry, or answers how long to wait.  A lease is
  renewed while its request runs (long streams) and removed when it ends; a
  crashed instance's leases expire after ``lease_ttl``.
- Outcomes: pauses, learned request limits, breaker trips and closes are
  published to the lane's gate hash; 429/529 answers take their log entry
  back, others move it to when the provider counted them (as the local
  tracker does).  These writes are fire-and-forget: they queue up and a
  flusher task sends them in one pipelined batch.
- Budgets: a reservation is one ``budget_reserve`` script over every counter
  the request charges; settling it is a delta queued like the writes above.

Degraded mode: any failure (connect, timeout, reset, error reply) marks the
backend down, logs one warning and records one scheduler event per outage;
every call then fails at once with :class:`SharedUnavailable` and the callers
go on with local state.  A background task reconnects with back-off; on
success it replays the budget deltas settled meanwhile (so usage during the
outage is not lost), logs the recovery and shared mode resumes.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import math
import secrets
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import attrs
import trio

from .redis import Connection, ConnectionLost, RedisURL, Script
from .resp import RedisError
from . import scripts

__all__ = ["SharedState", "SharedUnavailable", "StateStatistics", "lane_id"]

log = logging.getLogger("hivemind_trio.state")

# Budget deltas kept for replay while Redis is away; beyond this the oldest go.
_REPLAY_MAX = 100_000


@attrs.frozen
class StateStatistics:
    """The shared state as status shows it (``backend`` is always "redis")."""

    url: str
    connected: bool
    instance: str
    outages: int
    last_error: str | None
    calls: int  # awaited Redis calls (admissions, budget reservations)
    mean_call_ms: float | None
    leases_held: int
    reservations_held: int
    pending_replay: int  # budget updates waiting for Redis to come back
    backend: str = "redis"


class SharedUnavailable(Exception):
    """Redis is not reachable now: go on with local state."""


def lane_id(lane_key: str) -> str:
    """The Redis name of a lane: a hash of its key (route + credential fingerprint)."""
    return hashlib.blake2b(lane_key.encode("utf-8"), digest_size=12).hexdigest()


def _f(value: Any) -> float:
    return float(value.decode() if isinstance(value, bytes) else value)


class SharedState:
    """The Redis backend of one proxy instance."""

    def __init__(self, url: RedisURL, *, emit: Callable[..., None] | None = None) -> None:
        self.url = url
        self.emit = emit or (lambda kind, **detail: None)
        # Names this instance's leases (and its half-open probes).
        self.instance = secrets.token_hex(8)
        self.up = False
        self.started = False
        self._conn: Connection | None = None
        self._down = trio.Event()
        self._connected = trio.Event()
        self._ops: list[tuple[Script, list[Any], list[Any], bool]] = []
        self._ops_ready = trio.Event()
        # Writes queued / written (or given up): flushed() waits for the gap to close.
        self._queued = 0
        self._done = 0
        self._progress = trio.Event()
        self._replay: deque[tuple[Script, list[Any], list[Any]]] = deque(maxlen=_REPLAY_MAX)
        # lane id -> lease ids held by this instance (renewed by the heartbeat).
        self.leases: dict[str, set[str]] = {}
        # Budget reservation member -> its ZSETs (renewed by the heartbeat).
        self.reservations: dict[str, list[str]] = {}
        self._reservation_ids = itertools.count(1)
        # Called on recovery: the requests in flight that were admitted on
        # local state, per lane: (lane id, [(lease id, tokens, set server time)]).
        self.in_flight_hook: Callable[[], list[tuple[str, list[tuple[str, int, Callable[[float], None]]]]]] | None = None
        self.outages = 0
        self.last_error = ""
        self.calls = 0
        self.call_seconds = 0.0

    # -- names ------------------------------------------------------------------

    def key(self, lane: str, name: str) -> str:
        return f"{self.url.prefix}:{{{lane}}}:{name}"

    def budget_key(self, counter: str) -> str:
        return f"{self.url.prefix}:budget:{counter}"

    def salt(self) -> bytes:
        """The salt of credential fingerprints when instances share state: the
        same in every instance (or lanes and agents would not match across
        them), keyed by the Redis password when there is one."""
        secret = (self.url.password or "").encode("utf-8")
        return hashlib.blake2b(b"hivemind-trio shared fingerprints v1|" + self.url.prefix.encode(), key=secret[:64]).digest()

    # -- connection management -----------------------------------------------------

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Keep a connection (reconnecting with back-off), flush queued writes,
        renew leases.  ``started`` once the first connection attempt is over,
        so a proxy starts in a known mode."""
        self.started = True
        try:
            await self._run(task_status)
        finally:
            conn, self._conn = self._conn, None
            up, self.up = self.up, False
            if conn is not None:
                if up:
                    await self._last_words(conn)
                await conn.aclose()

    async def _last_words(self, conn: Connection) -> None:
        """On the way out: send the writes still queued and hand back any
        lease still held, so the fleet gets this instance's share back now
        rather than after ``lease_ttl``.  Bounded by the command timeout."""
        ops = [("EVALSHA", s.sha, len(k), *k, *a) for s, k, a, _ in self._ops]
        self._ops = []
        for lane, held in self.leases.items():
            if held:
                ops.append(("EVALSHA", scripts.RELEASE.sha, 1, self.key(lane, "leases"), *sorted(held)))
        if not ops:
            return
        with trio.CancelScope(shield=True):
            try:
                await conn.pipeline(ops)
            except ConnectionLost:
                pass

    async def _run(self, task_status: Any) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._flusher)
            nursery.start_soon(self._heartbeat)
            first = True
            backoff = 0.1
            while True:
                try:
                    conn = await Connection.open(self.url)
                    replies = await conn.pipeline([("SCRIPT", "LOAD", s.source) for s in scripts.ALL])
                    bad = [r for r in replies if isinstance(r, RedisError)]
                    if bad:
                        await conn.aclose()
                        raise ConnectionLost(f"{self.url.describe()} refused the scripts: {bad[0]}")
                except ConnectionLost as exc:
                    self._fail(str(exc))
                    if first:
                        first = False
                        task_status.started()
                    await trio.sleep(backoff * (0.5 + secrets.randbelow(1000) / 1000))
                    backoff = min(backoff * 2, 5.0)
                    continue
                was_out = self.outages > 0
                self._conn = conn
                self._down = trio.Event()
                self.up = True
                self._connected.set()
                replayed = await self._resync(conn)
                if was_out and self.up:
                    log.warning("shared state %s is back: shared mode resumed (%d budget updates replayed)", self.url.describe(), replayed)
                    self.emit("shared_state_up", backend=self.url.describe(), replayed=replayed)
                elif self.up:
                    log.info("shared state %s connected (instance %s)", self.url.describe(), self.instance)
                if first:
                    first = False
                    task_status.started()
                connected_at = trio.current_time()
                await self._down.wait()
                await conn.aclose()
                if trio.current_time() - connected_at < 10.0:
                    # A Redis that accepts connections and then fails at once
                    # (flapping): back off as if it had refused, so the log
                    # gets a warning per back-off, not a stream of them.
                    await trio.sleep(backoff)
                    backoff = min(backoff * 2, 5.0)
                else:
                    backoff = 0.1

    def _fail(self, reason: str, conn: Connection | None = None) -> None:
        """Redis failed: local state from now on, one warning per outage.
        (A late failure of a connection already replaced is no news.)"""
        if conn is not None and conn is not self._conn:
            return
        self.last_error = reason
        # The connection itself is closed by run(), which wakes up now.
        self._conn = None
        if self.up or self.outages == 0:
            self.outages += 1
            log.warning("shared state %s unreachable (%s): serving on local state until it is back", self.url.describe(), reason)
            self.emit("shared_state_down", backend=self.url.describe(), error=reason)
        self.up = False
        self._down.set()
        if self._connected.is_set():
            self._connected = trio.Event()

    async def wait_connected(self) -> None:
        """Return once shared mode is on (at once if it is)."""
        while not self.up:
            await self._connected.wait()

    async def _resync(self, conn: Connection) -> int:
        """Replay the budget deltas settled while Redis was away, and put the
        requests admitted on local state and still in flight on the books."""
        if self.in_flight_hook is not None:
            for lane, held in self.in_flight_hook():
                if not held:
                    continue
                args: list[Any] = [self.url.lease_ttl]
                for lease, tokens, _ in held:
                    args += [lease, max(0, int(tokens))]
                try:
                    now = _f(await conn.eval(scripts.ADOPT, [self.key(lane, "leases"), self.key(lane, "log"), self.key(lane, "gate")], args))
                except (ConnectionLost, RedisError) as exc:
                    self._fail(str(exc), conn)
                    return 0
                mine = self.leases.setdefault(lane, set())
                for lease, _, adopted in held:
                    mine.add(lease)
                    adopted(now)
        n = 0
        while self._replay and self.up:
            batch = [self._replay.popleft() for _ in range(min(len(self._replay), 500))]
            try:
                await conn.pipeline([("EVALSHA", s.sha, len(k), *k, *a) for s, k, a in batch])
            except ConnectionLost as exc:
                self._replay.extendleft(reversed(batch))
                self._fail(str(exc), conn)
                break
            n += len(batch)
        return n

    async def eval(self, script: Script, keys: list[Any], args: list[Any]) -> Any:
        conn = self._conn
        if not self.up or conn is None:
            raise SharedUnavailable(self.last_error or "not connected")
        t0 = time.perf_counter()
        try:
            return await conn.eval(script, keys, args)
        except (ConnectionLost, RedisError) as exc:
            self._fail(str(exc), conn)
            raise SharedUnavailable(str(exc)) from None
        finally:
            self.calls += 1
            self.call_seconds += time.perf_counter() - t0

    def _queue(self, script: Script, keys: list[Any], args: list[Any], *, replay: bool = False) -> None:
        """A write that nobody waits for.  ``replay``: keep it for after an
        outage (budget deltas); lane writes are moot by then and are dropped."""
        if not self.up:
            if replay:
                self._replay.append((script, keys, args))
            return
        self._ops.append((script, keys, args, replay))
        self._queued += 1
        self._ops_ready.set()

    async def flushed(self) -> None:
        """Wait until every write queued so far has gone out (or failed)."""
        target = self._queued
        while self._done < target:
            await self._progress.wait()

    def _advance(self, n: int) -> None:
        self._done += n
        self._progress.set()
        self._progress = trio.Event()

    async def _flusher(self) -> None:
        while True:
            await self._ops_ready.wait()
            self._ops_ready = trio.Event()
            ops, self._ops = self._ops, []
            if not ops:
                continue
            conn = self._conn
            if not self.up or conn is None:
                self._replay.extend((s, k, a) for s, k, a, r in ops if r)
                self._advance(len(ops))
                continue
            try:
                replies = await conn.pipeline([("EVALSHA", s.sha, len(k), *k, *a) for s, k, a, _ in ops])
            except ConnectionLost as exc:
                # Some may have been applied: replaying a budget delta twice
                # over-counts, which errs on the safe side.
                self._replay.extend((s, k, a) for s, k, a, r in ops if r)
                self._fail(str(exc), conn)
                self._advance(len(ops))
                continue
            retried = 0
            for (s, k, a, r), reply in zip(ops, replies):
                if isinstance(reply, RedisError):
                    if reply.kind == "NOSCRIPT":
                        retried += 1
                        self._ops.append((s, k, a, r))
                        try:
                            await conn.command("SCRIPT", "LOAD", s.source)
                        except (ConnectionLost, RedisError) as exc:
                            self._fail(str(exc), conn)
                            self._ops_ready.set()
                            break
                        self._ops_ready.set()
                    else:
                        log.error("shared state write failed: %s", reply)
            self._advance(len(ops) - retried)

    async def _heartbeat(self) -> None:
        """Renew the leases of requests still running (long streams)."""
        while True:
            await trio.sleep(self.url.lease_ttl / 3)
            if not self.up:
                continue
            for lane, held in list(self.leases.items()):
                if held:
                    self._queue(scripts.RENEW, [self.key(lane, "leases")], [self.url.lease_ttl, *sorted(held)])
                else:
                    del self.leases[lane]
            for member, zsets in list(self.reservations.items()):
                self._queue(scripts.BUDGET_RENEW, zsets, [self.url.lease_ttl, member])

    # -- lanes ------------------------------------------------------------------------

    async def acquire(
        self,
        lane: str,
        lease: str,
        *,
        window: int,
        rpm: float,
        tpm: float,
        tokens: int,
        rate_window: float,
        check_rate: bool,
        check_breaker: bool,
    ) -> tuple[float, float]:
        """``(0, server time)`` when granted, else ``(seconds to wait, nan)``."""
        reply = await self.eval(
            scripts.ACQUIRE,
            [self.key(lane, "leases"), self.key(lane, "log"), self.key(lane, "gate")],
            [lease, self.url.lease_ttl, window, int(rpm or 0), int(tpm or 0), max(0, int(tokens)), rate_window,
             self.instance, int(check_rate), int(check_breaker), self.url.poll],
        )
        if int(reply[0]) == 1:
            self.leases.setdefault(lane, set()).add(lease)
            return 0.0, _f(reply[1])
        return max(1e-6, _f(reply[1])), math.nan

    def release(self, lane: str, lease: str, *, member: str | None = None) -> None:
        """The request is over (``member``: and it never reached the provider,
        so its log entry goes too)."""
        held = self.leases.get(lane)
        if held is not None:
            held.discard(lease)
        if not self.up:
            return
        self._queue(scripts.RELEASE, [self.key(lane, "leases")], [lease])
        if member is not None:
            self._queue(scripts.SETTLE, [self.key(lane, "log"), self.key(lane, "gate")], [member, "uncount", 0, 0])

    def settle(self, lane: str, member: str, *, counted: bool, admitted_at: float, bound: float) -> None:
        self._queue(
            scripts.SETTLE,
            [self.key(lane, "log"), self.key(lane, "gate")],
            [member, "recount" if counted else "uncount", repr(admitted_at), bound],
        )

    def pause(self, lane: str, seconds: float) -> None:
        if seconds > 0 and math.isfinite(seconds):
            self._queue(scripts.GATE, [self.key(lane, "gate")], ["pause", repr(seconds), 0, self.instance])

    def learned(self, lane: str, rpm: int) -> None:
        self._queue(scripts.GATE, [self.key(lane, "gate")], ["learned", int(rpm), 0, self.instance])

    def trip(self, lane: str, cooldown: float) -> None:
        self._queue(scripts.GATE, [self.key(lane, "gate")], ["trip", repr(max(0.0, cooldown)), self.url.lease_ttl, self.instance])

    def close_breaker(self, lane: str) -> None:
        self._queue(scripts.GATE, [self.key(lane, "gate")], ["close", 0, 0, self.instance])

    # -- budgets ----------------------------------------------------------------------

    def _budget_keys(self, counters: list[str]) -> list[str]:
        hashes = [self.budget_key(c) for c in counters]
        return hashes + [h + ":res" for h in hashes]

    async def budget_reserve(
        self, counters: list[str], checks: list[tuple[int, str, float]], tokens: int, usd: float, ttls: list[int]
    ) -> tuple[bool, list[Any], str]:
        """``(True, [(used_t, reserved_t, used_usd, reserved_usd, requests)...], member)``
        or ``(False, [key index, unit, used, reserved], "")``.  A granted
        reservation is a lease (``member``), renewed by the heartbeat until
        :meth:`budget_settle`."""
        member = f"{self.instance}:{next(self._reservation_ids)}|{max(0, int(tokens))}|{float(usd)!r}"
        args: list[Any] = [len(checks)]
        for idx, unit, limit in checks:
            args += [idx + 1, unit, repr(float(limit))]
        args += [int(tokens), repr(float(usd)), member, self.url.lease_ttl, *ttls]
        keys = self._budget_keys(counters)
        reply = await self.eval(scripts.BUDGET_RESERVE, keys, args)
        if int(reply[0]) == 0:
            return False, [int(reply[1]) - 1, reply[2].decode(), _f(reply[3]), _f(reply[4])], ""
        self.reservations[member] = keys[len(counters):]
        vals = reply[1:]
        rows = []
        for i in range(len(counters)):
            u_t, r_t, u_u, r_u, req = vals[5 * i : 5 * i + 5]
            rows.append((int(_f(u_t)), int(_f(r_t)), _f(u_u), _f(r_u), int(_f(req))))
        return True, rows, member

    def budget_settle(
        self, counters: list[str], member: str, *, used_tokens: int, used_usd: float, requests: int, ttls: list[int],
    ) -> None:
        """Settle a reservation (``member``; "" for one made while Redis was
        away): its amounts leave ``reserved`` if it is still there, the usage
        is added.  Kept for replay while Redis is unreachable."""
        self.reservations.pop(member, None)
        self._queue(
            scripts.BUDGET_SETTLE,
            self._budget_keys(counters),
            [member, int(used_tokens), repr(float(used_usd)), int(requests), *ttls],
            replay=True,
        )

    # -- reading ----------------------------------------------------------------------

    def statistics(self) -> StateStatistics:
        return StateStatistics(
            url=self.url.describe(),
            connected=self.up,
            instance=self.instance,
            outages=self.outages,
            last_error=self.last_error or None,
            calls=self.calls,
            mean_call_ms=round(1000 * self.call_seconds / self.calls, 3) if self.calls else None,
            leases_held=sum(len(v) for v in self.leases.values()),
            reservations_held=len(self.reservations),
            pending_replay=len(self._replay),
        )

