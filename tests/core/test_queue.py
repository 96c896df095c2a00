"""Priority + fair queue ordering (SPEC §5.6)."""

from __future__ import annotations

import math
from collections import Counter

import attrs
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from hivemind_trio.core.queue import CRITICAL, HIGH, LOW, NORMAL, FairQueue

STRICT = math.inf


def drain(q: FairQueue, now: float = 0.0) -> list:
    out = []
    while (x := q.pop(now)) is not None:
        out.append(x)
    return out


def test_empty() -> None:
    q = FairQueue()
    assert q.pop(0.0) is None
    assert len(q) == 0
    assert q.depth_by_priority() == {3: 0, 2: 0, 1: 0, 0: 0}


def test_strict_priority_and_fifo_within_agent() -> None:
    q = FairQueue(aging_interval=STRICT)
    q.push("l1", "a", LOW, 10, 0.0)
    q.push("n1", "a", NORMAL, 10, 0.0)
    q.push("c1", "a", CRITICAL, 10, 0.0)
    q.push("h1", "a", HIGH, 10, 0.0)
    q.push("n2", "a", NORMAL, 10, 0.0)
    assert q.depth_by_priority() == {3: 1, 2: 1, 1: 2, 0: 1}
    assert drain(q) == ["c1", "h1", "n1", "n2", "l1"]


def test_retry_goes_ahead_of_new_work_of_its_class() -> None:
    q = FairQueue(aging_interval=STRICT)
    for i in range(3):
        q.push(f"new-{i}", f"agent{i}", NORMAL, 10, 0.0)
    q.push("retry", "agent9", NORMAL, 10, 1.0, retry=True)
    q.push("crit", "agent5", CRITICAL, 10, 1.0)
    assert drain(q, 1.0)[:2] == ["crit", "retry"]


def test_aging_promotes_low() -> None:
    q = FairQueue(aging_interval=10.0)
    q.push("low", "batch", LOW, 10, 0.0)
    q.push("norm", "chat", NORMAL, 10, 15.0)
    # At t=15 low has aged to normal (level 1): tie broken by ring order.
    # At t=25 low is at level 2 and beats the fresh normal.
    assert q.pop(25.0) == "low"
    assert q.statistics().promoted == 1


def test_low_never_starves_under_critical_flood() -> None:
    q = FairQueue(aging_interval=1.0, quantum=100)
    q.push("low", "batch", LOW, 100, 0.0)
    t = 0.0
    n = 0
    for step in range(10_000):
        t += 0.1
        # Five agents keep the critical class backlogged.
        for a in range(5):
            q.push(n, f"c{a}", CRITICAL, 100, t)
            n += 1
        if q.pop(t) == "low":
            break
    else:
        pytest.fail("low starved")
    # Promoted to critical after 3 s (30 pops), then one turn among 6 flows.
    assert step <= 30 + 6 + 2


def test_drr_fairness_by_tokens() -> None:
    q = FairQueue(aging_interval=STRICT, quantum=1000)
    for i in range(100):
        q.push(("big", i), "big", NORMAL, 1000, 0.0)
        q.push(("small", i), "small", NORMAL, 100, 0.0)
    tokens: Counter[str] = Counter()
    for _ in range(110):
        who, _i = q.pop(0.0)
        tokens[who] += 1000 if who == "big" else 100
    # Both got about the same tokens, not the same number of requests.
    assert abs(tokens["big"] - tokens["small"]) <= 1000 + 1000


def test_chatty_agent_cannot_starve_others() -> None:
    q = FairQueue(aging_interval=STRICT, quantum=500)
    for i in range(1000):
        q.push(("chatty", i), "chatty", NORMAL, 500, 0.0)
    q.push(("quiet", 0), "quiet", NORMAL, 500, 0.0)
    first = [q.pop(0.0) for _ in range(3)]
    assert ("quiet", 0) in first


def test_huge_item_is_served_without_spinning() -> None:
    q = FairQueue(aging_interval=STRICT, quantum=1)
    q.push("huge", "a", NORMAL, 10**12, 0.0)
    q.push("small", "b", NORMAL, 10, 0.0)
    assert set(drain(q)) == {"huge", "small"}


def test_remove_cancelled_waiters() -> None:
    q = FairQueue()
    for i in range(5):
        q.push(i, "a", NORMAL, 1, 0.0)
    assert q.remove(0) and q.remove(3)
    assert not q.remove(3) and not q.remove(99)
    assert len(q) == 3 and 3 not in q
    assert drain(q) == [1, 2, 4]
    s = q.statistics()
    assert (s.pushed, s.popped, s.removed, s.flows) == (5, 3, 2, 0)


def test_push_validation() -> None:
    q = FairQueue()
    q.push("x", "a", NORMAL, 1, 0.0)
    with pytest.raises(ValueError, match="item_id 'x'"):
        q.push("x", "a", NORMAL, 1, 0.0)
    with pytest.raises(ValueError, match="priority"):
        q.push("y", "a", 7, 1, 0.0)
    with pytest.raises(ValueError, match="aging_interval"):
        FairQueue(aging_interval=0)
    with pytest.raises(ValueError, match="quantum"):
        FairQueue(quantum=0)


def test_statistics() -> None:
    q = FairQueue()
    q.push("a", "x", HIGH, 5, 3.0)
    q.push("b", "y", LOW, 5, 1.0)
    s = q.statistics()
    assert s.depth == 2 and s.depth_by_priority == (0, 1, 0, 1) and s.oldest_enqueued_at == 1.0
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        s.depth = 0  # type: ignore[misc]


# --------------------------------------------------------------- properties


ops = st.lists(
    st.one_of(
        st.tuples(
            st.just("push"),
            st.sampled_from(["a", "b", "c", "d"]),
            st.integers(0, 3),
            st.integers(0, 3000),
            st.booleans(),
        ),
        st.tuples(st.just("pop")),
        st.tuples(st.just("remove"), st.integers(0, 200)),
        st.tuples(st.just("tick"), st.floats(0, 8)),
    ),
    max_size=200,
)


def _model_levels(queued: dict, now: float, aging: float) -> dict[tuple[int, str], int]:
    oldest: dict[tuple[int, str], float] = {}
    for _iid, (agent, prio, t, _retry) in queued.items():
        k = (prio, agent)
        oldest[k] = min(oldest.get(k, math.inf), t)
    out = {}
    for (prio, agent), t in oldest.items():
        steps = (now - t) / aging if math.isfinite(aging) else 0
        out[(prio, agent)] = min(3, prio + int(min(steps, 3)))
    return out


@settings(max_examples=300, deadline=None)
@given(seq=ops, aging=st.sampled_from([STRICT, 5.0, 20.0]), quantum=st.integers(1, 2000))
@example(seq=[("push", "a", 1, 10, False), ("push", "b", 1, 10, True), ("pop",)], aging=STRICT, quantum=100)
@example(
    seq=[("push", "a", 0, 10, False), ("tick", 6.0), ("push", "b", 1, 10, False), ("pop",), ("pop",)],
    aging=5.0,
    quantum=100,
)
def test_queue_model(seq: list[tuple], aging: float, quantum: int) -> None:
    q = FairQueue(aging_interval=aging, quantum=quantum)
    queued: dict[int, tuple[str, int, float, bool]] = {}
    popped: list[int] = []
    pushed = 0
    now = 0.0
    for op in seq:
        if op[0] == "push":
            q.push(pushed, op[1], op[2], op[3], now, retry=op[4])
            queued[pushed] = (op[1], op[2], now, op[4])
            pushed += 1
        elif op[0] == "pop":
            levels = _model_levels(queued, now, aging)
            got = q.pop(now)
            if not queued:
                assert got is None
                continue
            assert got in queued
            agent, prio, _t, retry = queued.pop(got)
            popped.append(got)
            top = max(levels.values())
            # Strict priority, except by aging.
            assert levels[(prio, agent)] == top
            if not math.isfinite(aging):
                assert prio == max(p for _a, p, _t2, _r in list(queued.values()) + [(agent, prio, 0, retry)])
            # Retries first within the level.
            if not retry:
                assert not any(
                    r and levels[(p, a)] == top for a, p, _t2, r in queued.values()
                )
        elif op[0] == "remove":
            assert q.remove(op[1]) == (op[1] in queued)
            queued.pop(op[1], None)
        else:
            now += op[1]
        assert len(q) == len(queued)
        depth = q.depth_by_priority()
        for p in range(4):
            assert depth[p] == sum(1 for v in queued.values() if v[1] == p)
    rest = drain(q, now)
    # Every pushed item popped exactly once unless removed.
    assert sorted(rest) == sorted(queued)
    assert len(set(popped + rest)) == len(popped) + len(rest)


@settings(max_examples=100, deadline=None)
@given(
    costs=st.lists(st.integers(1, 2000), min_size=2, max_size=4),
    quantum=st.integers(100, 2000),
)
def test_drr_fairness_property(costs: list[int], quantum: int) -> None:
    """Backlogged agents of one class get equal tokens within quantum + max cost."""
    q = FairQueue(aging_interval=STRICT, quantum=quantum)
    agents = [f"agent{i}" for i in range(len(costs))]
    for i, (agent, cost) in enumerate(zip(agents, costs)):
        for j in range(400):
            q.push((agent, j), agent, NORMAL, cost, 0.0)
    served: Counter[str] = Counter()
    bound = quantum + max(costs)
    for _ in range(300):
        agent, _j = q.pop(0.0)
        served[agent] += costs[agents.index(agent)]
        # Each agent still has items left throughout (400 > 300).
        assert max(served[a] for a in agents) - min(served[a] for a in agents) <= 2 * bound


def test_pop_is_fast_with_many_items() -> None:
    q = FairQueue()
    for i in range(10_000):
        q.push(i, f"agent{i % 50}", i % 4, 500, 0.0)
    assert len(drain(q, 1.0)) == 10_000
