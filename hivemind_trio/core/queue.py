"""Priority + fair queue ordering (SPEC §5.6), sans-io.

Theory of operation
-------------------
The queue only decides *order*; waiting is the runtime's job.  Items are
opaque ids with an agent, a priority class (critical=3, high=2, normal=1,
low=0) and a cost (estimated tokens).

*Flows.*  Items are grouped into flows, one per (priority class, agent), each
FIFO, with retries kept in a separate FIFO served first.  A flow's
*level* is its class promoted by waiting: ``min(3, class + floor(age /
aging_interval))`` where ``age`` is how long its oldest item has waited.  So a
low item waiting ``3 × aging_interval`` competes as critical: low never
starves.  Without aging (``aging_interval=inf``) priority is strict.

*Which level.*  :meth:`FairQueue.pop` serves the highest level present.
Within that level, flows holding retries go first (a retry re-enters ahead of
new work of its class, SPEC §5.7).

*Which flow: deficit round robin.*  Flows of the chosen level take turns in a
fixed ring order (creation order), one ring position remembered per level.
A flow starting its turn earns ``quantum`` tokens of credit (deficit) and is
served while its head item's cost fits in the credit; when it does not, the
turn passes on and the credit is kept for next time.  A flow that empties
forgets its credit.  Over time each backlogged flow of a level gets the same
number of *tokens* served, so one chatty agent cannot starve the others, and
an agent sending huge requests gets fewer of them.  Instead of spinning round
the ring when every head is bigger than one quantum, :meth:`pop` computes how
many full rounds nobody could be served in and grants those quanta at once.

Cancelled waiters are removed lazily (marked, skipped at the head), so
``remove`` is O(1) however long the flow.  ``pop`` is O(number of flows).

Per-flow deques of opaque ids are process-local by nature (the waiters live
in this process); counters are plain data.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Hashable
from typing import Any

import attrs

__all__ = ["CRITICAL", "HIGH", "NORMAL", "LOW", "PRIORITIES", "FairQueue", "QueueStatistics"]

LOW, NORMAL, HIGH, CRITICAL = 0, 1, 2, 3
PRIORITIES = (CRITICAL, HIGH, NORMAL, LOW)


@attrs.define(eq=False)
class _Item:
    item_id: Hashable
    agent: str
    priority: int
    cost: int
    enqueued_at: float
    retry: bool
    removed: bool = False


@attrs.define(eq=False)
class _Flow:
    seq: int
    priority: int
    agent: str
    retries: deque[_Item] = attrs.field(factory=deque)
    fresh: deque[_Item] = attrs.field(factory=deque)
    deficit: int = 0
    live: int = 0

    def clean(self) -> None:
        for dq in (self.retries, self.fresh):
            while dq and dq[0].removed:
                dq.popleft()

    def head(self) -> _Item:
        return self.retries[0] if self.retries else self.fresh[0]

    def oldest(self) -> float:
        times = [dq[0].enqueued_at for dq in (self.retries, self.fresh) if dq]
        return min(times)


@attrs.frozen
class QueueStatistics:
    depth: int
    # Items by their own class, highest first: (critical, high, normal, low).
    depth_by_priority: tuple[int, int, int, int]
    flows: int
    pushed: int
    popped: int
    removed: int
    # Pops served above their own class thanks to aging.
    promoted: int
    oldest_enqueued_at: float | None


def _positive(_inst: Any, attribute: attrs.Attribute[Any], value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or value <= 0:
        raise ValueError(f"{attribute.name} must be a positive number (inf disables), got {value!r}")


def _quantum(_inst: Any, attribute: attrs.Attribute[Any], value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{attribute.name} must be an integer >= 1, got {value!r}")


@attrs.define
class FairQueue:
    """Strict priority classes with aging; deficit round robin across agents within a class."""

    # Seconds of waiting that promote a flow by one class.
    aging_interval: float = attrs.field(default=10.0, validator=_positive)
    # Tokens of credit a flow earns per turn.
    quantum: int = attrs.field(default=1000, validator=_quantum)

    _flows: dict[tuple[int, str], _Flow] = attrs.field(factory=dict, init=False)
    _items: dict[Hashable, _Item] = attrs.field(factory=dict, init=False)
    _depth: list[int] = attrs.field(factory=lambda: [0, 0, 0, 0], init=False)
    _next_seq: int = attrs.field(default=0, init=False)
    # Per level: the flow whose turn is running, and the ring position last served.
    _active: dict[int, _Flow | None] = attrs.field(factory=dict, init=False)
    _last_seq: dict[int, int] = attrs.field(factory=dict, init=False)
    _pushed: int = attrs.field(default=0, init=False)
    _popped: int = attrs.field(default=0, init=False)
    _removed: int = attrs.field(default=0, init=False)
    _promoted: int = attrs.field(default=0, init=False)

    # -- mutations -----------------------------------------------------------

    def push(
        self,
        item_id: Hashable,
        agent: str,
        priority: int,
        cost: int,
        now: float,
        retry: bool = False,
    ) -> None:
        if item_id in self._items:
            raise ValueError(f"item_id {item_id!r} is already queued")
        if isinstance(priority, bool) or not isinstance(priority, int) or priority not in (0, 1, 2, 3):
            raise ValueError(f"priority must be 0..3 (low..critical), got {priority!r}")
        if not isinstance(now, (int, float)) or not math.isfinite(now):
            raise ValueError(f"now must be a finite number, got {now!r}")
        priority = int(priority)
        # Zero-cost items still take a turn; costs are whole tokens.
        cost = max(1, int(cost)) if isinstance(cost, (int, float)) and math.isfinite(cost) else 1
        key = (priority, agent)
        flow = self._flows.get(key)
        if flow is None:
            flow = _Flow(seq=self._next_seq, priority=priority, agent=agent)
            self._next_seq += 1
            self._flows[key] = flow
        item = _Item(item_id, agent, priority, cost, float(now), bool(retry))
        (flow.retries if retry else flow.fresh).append(item)
        flow.live += 1
        self._items[item_id] = item
        self._depth[priority] += 1
        self._pushed += 1

    def remove(self, item_id: Hashable) -> bool:
        """Forget a queued item (its waiter was cancelled).  False if not queued."""
        item = self._items.pop(item_id, None)
        if item is None:
            return False
        item.removed = True
        self._depth[item.priority] -= 1
        self._removed += 1
        flow = self._flows[(item.priority, item.agent)]
        flow.live -= 1
        if flow.live == 0:
            self._drop(flow)
        return True

    def _drop(self, flow: _Flow) -> None:
        del self._flows[(flow.priority, flow.agent)]
        for level, active in self._active.items():
            if active is flow:
                self._active[level] = None

    # -- ordering --------------------------------------------------------------

    def level(self, flow: _Flow, now: float) -> int:
        if math.isinf(self.aging_interval):
            return flow.priority
        age = max(0.0, now - flow.oldest())
        steps = age / self.aging_interval
        if steps >= 3:
            return CRITICAL
        return min(CRITICAL, flow.priority + int(steps))

    def pop(self, now: float) -> Hashable | None:
        """The id to admit next, or None when empty."""
        if not self._items:
            return None
        best = -1
        cands: list[_Flow] = []
        for flow in self._flows.values():
            flow.clean()
            lvl = self.level(flow, now)
            if lvl > best:
                best, cands = lvl, [flow]
            elif lvl == best:
                cands.append(flow)
        with_retries = [f for f in cands if f.retries]
        if with_retries:
            cands = with_retries
        chosen = self._drr(best, cands)
        item = chosen.retries.popleft() if chosen.retries else chosen.fresh.popleft()
        chosen.deficit -= item.cost
        chosen.live -= 1
        del self._items[item.item_id]
        self._depth[item.priority] -= 1
        self._popped += 1
        if best > item.priority:
            self._promoted += 1
        if chosen.live == 0:
            self._drop(chosen)
        else:
            chosen.clean()
        return item.item_id

    def _drr(self, level: int, cands: list[_Flow]) -> _Flow:
        active = self._active.get(level)
        if active is not None and any(f is active for f in cands) and active.deficit >= active.head().cost:
            return active
        # The running turn (if any) is over: go round the ring from after the
        # last flow served at this level.  dicts keep insertion order, but a
        # flow can be re-created, so order by ring position explicitly.
        cands.sort(key=lambda f: f.seq)
        last = self._last_seq.get(level, -1)
        order = [f for f in cands if f.seq > last] + [f for f in cands if f.seq <= last]
        q = self.quantum
        rounds = min(max(1, -(-(f.head().cost - f.deficit) // q)) for f in order)
        if rounds > 1:
            # Nobody could be served in the first rounds - 1 sweeps: grant them at once.
            for f in order:
                f.deficit += (rounds - 1) * q
        for f in order:
            f.deficit += q
            if f.deficit >= f.head().cost:
                self._active[level] = f
                self._last_seq[level] = f.seq
                return f
        raise AssertionError("DRR sweep served nobody")  # pragma: no cover

    # -- reading -----------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, item_id: object) -> bool:
        return item_id in self._items

    def depth_by_priority(self) -> dict[int, int]:
        """Queued items by their own class, highest first."""
        return {p: self._depth[p] for p in PRIORITIES}

    def statistics(self) -> QueueStatistics:
        oldest = None
        for flow in self._flows.values():
            flow.clean()
            t = flow.oldest()
            oldest = t if oldest is None else min(oldest, t)
        return QueueStatistics(
            depth=len(self._items),
            depth_by_priority=tuple(self._depth[p] for p in PRIORITIES),  # type: ignore[arg-type]
            flows=len(self._flows),
            pushed=self._pushed,
            popped=self._popped,
            removed=self._removed,
            promoted=self._promoted,
            oldest_enqueued_at=oldest,
        )
