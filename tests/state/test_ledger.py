"""The SQLite budget ledger: counters survive a restart, run counters do not."""

from __future__ import annotations

import time

from hivemind_trio.core.budget import Budget, BudgetLimit, Refusal, Reservation
from hivemind_trio.state.ledger import Ledger


def _budget() -> Budget:
    return Budget(limits=(BudgetLimit(period="day", tokens=1000), BudgetLimit(period="run", tokens=10_000)))


def _spend(budget: Budget, ledger: Ledger, agent: str, tokens: int) -> None:
    res = budget.reserve(agent, tokens, time.time())
    assert isinstance(res, Reservation)
    budget.reconcile(res, tokens, 0)
    ledger.mark(res.keys)


def test_daily_budget_does_not_refill_on_restart(tmp_path) -> None:
    path = tmp_path / "ledger.sqlite3"
    before = _budget()
    ledger = Ledger(path)
    _spend(before, ledger, "a", 600)
    _spend(before, ledger, "b", 100)
    assert ledger.flush(before) > 0
    ledger.close()

    after = _budget()
    reopened = Ledger(path)
    assert reopened.load_into(after) > 0
    now = time.time()
    # The day's 600 are still spent; the run budget started afresh.
    assert after.remaining_tokens("a", now) == 400
    assert after.remaining_tokens("b", now) == 900
    refused = after.reserve("a", 500, now)
    assert isinstance(refused, Refusal) and refused.period == "day"
    assert not any(k.split("|")[1] == "run" for k in after.state.counters if after.state.counters[k].used_tokens)
    reopened.close()


def test_flush_writes_only_dirty_counters_and_updates_in_place(tmp_path) -> None:
    budget = _budget()
    ledger = Ledger(tmp_path / "l.sqlite3")
    assert ledger.flush(budget) == 0
    _spend(budget, ledger, "a", 10)
    written = ledger.flush(budget)
    # The agent's day counter; run counters are never stored.
    assert written == 1
    assert not ledger.dirty
    _spend(budget, ledger, "a", 15)
    ledger.close(budget)  # close flushes what is left

    fresh = _budget()
    Ledger(tmp_path / "l.sqlite3").load_into(fresh)
    assert fresh.remaining_tokens("a", time.time()) == 1000 - 25


def test_past_periods_stay_on_disk_but_not_in_memory(tmp_path) -> None:
    path = tmp_path / "l.sqlite3"
    budget = _budget()
    ledger = Ledger(path)
    yesterday = time.time() - 86_400
    res = budget.reserve("a", 700, yesterday)
    assert isinstance(res, Reservation)
    budget.reconcile(res, 700, 0)
    ledger.mark(res.keys)
    ledger.close(budget)

    fresh = _budget()
    assert Ledger(path).load_into(fresh) == 1
    # Yesterday's spend does not count against today.
    assert fresh.remaining_tokens("a", time.time()) == 1000
