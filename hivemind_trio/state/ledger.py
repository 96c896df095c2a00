"""The budget ledger: usage counters that survive a restart (SPEC §5.5).

A daily budget must not refill because the proxy restarted, so the counters of
calendar periods (hour, day) are written to an embedded SQLite database and
read back at start-up.  "run" counters are this process's by definition and
are never stored; reservations are in-flight estimates and are never stored
either (a request in flight when the process died never completed).

Writes are batched: settling a request marks its counters dirty, and
:meth:`Ledger.flush` writes every dirty counter in one transaction.  The
scheduler flushes once a second and at shutdown, so the hot path never
waits for the disk and a crash loses at most the last second of accounting.
"""

from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path

from ..core.budget import Budget, Counter

__all__ = ["Ledger", "default_ledger_path"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS counters (
    key TEXT PRIMARY KEY,
    used_tokens INTEGER NOT NULL,
    used_usd REAL NOT NULL,
    requests INTEGER NOT NULL
)
"""


def default_ledger_path() -> Path:
    """``$XDG_STATE_HOME/hivemind-trio/budget.sqlite3`` (``~/.local/state`` by default)."""
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(base) / "hivemind-trio" / "budget.sqlite3"


def _persistent(key: str) -> bool:
    # Keys are "scope|period_key|agent"; the run period is process-local.
    return key.split("|", 2)[1] != "run"


class Ledger:
    """SQLite persistence for a :class:`Budget`'s counters."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(_SCHEMA)
        self._dirty: set[str] = set()

    def load_into(self, budget: Budget) -> int:
        """Add the stored counters to ``budget``'s; returns how many were read."""
        rows = self._db.execute("SELECT key, used_tokens, used_usd, requests FROM counters").fetchall()
        counters = budget.state.counters
        for key, used_tokens, used_usd, requests in rows:
            c = counters.setdefault(key, Counter())
            c.used_tokens += int(used_tokens)
            c.used_usd += float(used_usd)
            c.requests += int(requests)
        # Past periods are history, not budgets: keep them on disk, not in memory.
        budget.prune(time.time())
        return len(rows)

    def mark(self, keys: tuple[str, ...] | list[str]) -> None:
        self._dirty.update(k for k in keys if _persistent(k))

    @property
    def dirty(self) -> bool:
        return bool(self._dirty)

    def flush(self, budget: Budget) -> int:
        """Write every dirty counter; returns how many rows were written."""
        if not self._dirty:
            return 0
        rows = []
        for key in sorted(self._dirty):
            c = budget.state.counters.get(key)
            if c is not None:
                rows.append((key, c.used_tokens, c.used_usd, c.requests))
        self._dirty.clear()
        with self._db:
            self._db.execute("BEGIN")
            self._db.executemany(
                "INSERT INTO counters (key, used_tokens, used_usd, requests) VALUES (?, ?, ?, ?) "
                "ON CONFLICT(key) DO UPDATE SET used_tokens=excluded.used_tokens, "
                "used_usd=excluded.used_usd, requests=excluded.requests",
                rows,
            )
        return len(rows)

    def close(self, budget: Budget | None = None) -> None:
        if budget is not None:
            self.flush(budget)
        self._db.close()
