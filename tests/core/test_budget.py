"""Token budgets: reservation and reconciliation (SPEC §5.5)."""

from __future__ import annotations

import attrs
import cattrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hivemind_trio.core.budget import (
    Budget,
    BudgetLimit,
    BudgetState,
    Price,
    Refusal,
    Reservation,
    period_key,
    price_for,
)

DAY1 = 1_704_067_200.0  # 2024-01-01T00:00:00Z


def test_period_keys_follow_wall_time() -> None:
    assert period_key("run", DAY1) == "run"
    assert period_key("day", DAY1 + 86399) == "2024-01-01"
    assert period_key("day", DAY1 + 86400) == "2024-01-02"
    assert period_key("hour", DAY1 + 3600 * 13 + 5) == "2024-01-01T13"
    # A local-time day boundary.
    assert period_key("day", DAY1 - 3600, utc_offset=3600) == "2024-01-01"
    with pytest.raises(ValueError, match="period"):
        period_key("week", DAY1)


def test_reserve_refuses_when_estimate_exceeds() -> None:
    b = Budget(limits=(BudgetLimit("run", tokens=1000),))
    r1 = b.reserve("a", 600, DAY1)
    assert isinstance(r1, Reservation)
    refused = b.reserve("a", 500, DAY1)
    assert isinstance(refused, Refusal)
    assert refused.unit == "tokens" and refused.reserved == 600 and refused.requested == 500
    assert "budget" in refused.message and "agent 'a'" in refused.message
    # Another agent has its own budget.
    assert isinstance(b.reserve("b", 500, DAY1), Reservation)


def test_reconcile_replaces_estimate_and_release_frees() -> None:
    b = Budget(limits=(BudgetLimit("run", tokens=1000),))
    r = b.reserve("a", 900, DAY1)
    assert isinstance(r, Reservation)
    charge = b.reconcile(r, 100, 50)
    assert charge is not None and charge.tokens == 150
    assert b.reconcile(r, 100, 50) is None  # idempotent
    assert b.remaining_tokens("a", DAY1) == 850
    r2 = b.reserve("a", 800, DAY1)
    assert isinstance(r2, Reservation)
    assert b.release(r2)
    assert not b.release(r2)
    assert b.remaining_tokens("a", DAY1) == 850


def test_warning_at_85_percent_and_refusal_at_100() -> None:
    b = Budget(limits=(BudgetLimit("run", tokens=1000, scope="global"),))
    r = b.reserve("a", 800, DAY1)
    assert isinstance(r, Reservation) and not r.warning
    r2 = b.reserve("b", 60, DAY1)
    assert isinstance(r2, Reservation) and r2.warning
    b.reconcile(r, 900, 100)  # went over: 1000 used + 60 reserved
    assert isinstance(b.reserve("c", 0, DAY1), Refusal)
    s = {c.key: c for c in b.statistics().counters}
    g = s["global|run|*"]
    assert g.exhausted and g.warning and g.limit_tokens == 1000


def test_day_budget_resets_at_day_boundary() -> None:
    b = Budget(limits=(BudgetLimit("day", tokens=100),))
    r = b.reserve("a", 100, DAY1 + 10)
    assert isinstance(r, Reservation)
    b.reconcile(r, 60, 40)
    assert isinstance(b.reserve("a", 1, DAY1 + 86399), Refusal)
    assert isinstance(b.reserve("a", 100, DAY1 + 86400), Reservation)


def test_reconcile_across_boundary_charges_start_period() -> None:
    b = Budget(limits=(BudgetLimit("day", tokens=100),))
    r = b.reserve("a", 50, DAY1 + 86399)
    assert isinstance(r, Reservation)
    b.reconcile(r, 30, 30)
    assert b.remaining_tokens("a", DAY1 + 86399) == 40
    assert b.remaining_tokens("a", DAY1 + 86400) == 100


def test_specific_agent_limit_replaces_default() -> None:
    b = Budget(
        limits=(
            BudgetLimit("day", tokens=100),
            BudgetLimit("day", tokens=10_000, agent="reviewer"),
        )
    )
    assert isinstance(b.reserve("reviewer", 5000, DAY1), Reservation)
    assert isinstance(b.reserve("other", 5000, DAY1), Refusal)


def test_usd_budget_with_price_table() -> None:
    prices = {"claude-sonnet-4-5": Price(3.0, 15.0), "gpt-4o": Price(2.5, 10.0)}
    assert price_for(prices, "claude-sonnet-4-5-20250929") == prices["claude-sonnet-4-5"]
    assert price_for(prices, "llama3") is None
    b = Budget(limits=(BudgetLimit("run", usd=1.0, scope="global"),), prices=prices)
    # 1M input tokens at $3 + 10k output at $15 = $3.15: too much.
    assert isinstance(b.reserve("a", 0, DAY1, model="claude-sonnet-4-5", est_input=1_000_000, est_output=10_000), Refusal)
    r = b.reserve("a", 100_000, DAY1, model="gpt-4o-mini", est_input=50_000, est_output=1000)
    assert isinstance(r, Reservation)
    assert r.usd == pytest.approx(0.135)
    charge = b.reconcile(r, 40_000, 500)
    assert charge is not None and charge.usd == pytest.approx(0.105)
    # Unpriced models are invisible to USD budgets.
    assert isinstance(b.reserve("a", 10**9, DAY1, model="llama3"), Reservation)


def test_validation_messages() -> None:
    with pytest.raises(ValueError, match="period"):
        BudgetLimit("week", tokens=1)
    with pytest.raises(ValueError, match="tokens or usd"):
        BudgetLimit("day")
    with pytest.raises(ValueError, match="tokens"):
        BudgetLimit("day", tokens=-5)
    with pytest.raises(ValueError, match="agent can only"):
        BudgetLimit("day", tokens=5, scope="global", agent="x")
    with pytest.raises(ValueError, match="warn_ratio"):
        Budget(warn_ratio=1.5)


def test_state_round_trips_through_cattrs() -> None:
    b = Budget(limits=(BudgetLimit("day", tokens=1000),))
    r = b.reserve("a", 100, DAY1)
    assert isinstance(r, Reservation)
    conv = cattrs.Converter()
    raw = conv.unstructure(b.state)
    again = Budget(limits=b.limits, state=conv.structure(raw, BudgetState))
    assert again.state == b.state
    assert again.reconcile(r, 10, 10) is not None


def test_prune_forgets_past_periods_but_not_in_flight() -> None:
    b = Budget(limits=(BudgetLimit("hour", tokens=1000),))
    r = b.reserve("a", 10, DAY1)
    done = b.reserve("b", 10, DAY1)
    assert isinstance(r, Reservation) and isinstance(done, Reservation)
    b.reconcile(done, 5, 5)
    gone = b.prune(DAY1 + 7200)
    assert gone == ["agent|2024-01-01T00|b"]
    assert all(k in b.state.counters for k in r.keys)


# ------------------------------------------------------------- properties


ops = st.lists(
    st.one_of(
        st.tuples(st.just("reserve"), st.sampled_from("abc"), st.integers(0, 400), st.integers(0, 3 * 3600)),
        st.tuples(st.just("reconcile"), st.integers(0, 50), st.integers(0, 500), st.integers(0, 500)),
        st.tuples(st.just("release"), st.integers(0, 50)),
    ),
    max_size=120,
)


@settings(max_examples=250, deadline=None)
@given(ops=ops, agent_limit=st.integers(0, 2000), global_limit=st.integers(0, 3000), usd=st.floats(0.001, 0.05))
def test_budget_invariants_under_any_interleaving(ops: list[tuple], agent_limit: int, global_limit: int, usd: float) -> None:
    limits = (
        BudgetLimit("hour", tokens=agent_limit),
        BudgetLimit("run", tokens=global_limit, usd=usd, scope="global"),
    )
    b = Budget(limits=limits, prices={"m": Price(3.0, 15.0)})
    open_: list[Reservation] = []
    overshoot: dict[str, float] = {}
    overshoot_usd: dict[str, float] = {}
    for op in ops:
        if op[0] == "reserve":
            out = b.reserve(op[1], op[2], DAY1 + op[3], model="m")
            if isinstance(out, Reservation):
                open_.append(out)
        elif op[0] == "reconcile" and open_:
            r = open_.pop(op[1] % len(open_))
            charge = b.reconcile(r, op[2], op[3])
            assert charge is not None
            for k in r.keys:
                overshoot[k] = overshoot.get(k, 0) + max(0, charge.tokens - r.tokens)
                overshoot_usd[k] = overshoot_usd.get(k, 0) + max(0.0, charge.usd - r.usd)
        elif op[0] == "release" and open_:
            r = open_.pop(op[1] % len(open_))
            assert b.release(r)
        # Invariants after every step.
        by_key = b._limits_by_key()
        for key, c in b.state.counters.items():
            in_flight = [r for r in open_ if key in r.keys]
            assert c.reserved_tokens == sum(r.tokens for r in in_flight)
            assert c.reserved_usd == pytest.approx(sum(r.usd for r in in_flight), abs=1e-9)
            for lim in by_key[key]:
                if lim.tokens is not None:
                    assert c.used_tokens + c.reserved_tokens <= lim.tokens + overshoot.get(key, 0)
                if lim.usd is not None:
                    assert c.used_usd + c.reserved_usd <= lim.usd + overshoot_usd.get(key, 0) + 1e-9
    # Totals add up: the global run counter is the sum of the agents' run counters.
    cs = b.state.counters
    agents = [k for k in cs if k.startswith("agent|run|")]
    g = cs.get("global|run|*")
    if g is not None:
        assert g.used_tokens == sum(cs[k].used_tokens for k in agents)
        assert g.reserved_tokens == sum(cs[k].reserved_tokens for k in agents)
        assert g.requests == sum(cs[k].requests for k in agents)
    for c in cs.values():
        assert c.reserved_tokens >= 0 and c.reserved_usd >= 0


def test_statistics_frozen() -> None:
    s = Budget().statistics()
    assert s.counters == () and s.outstanding == 0
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        s.refusals = 2  # type: ignore[misc]
