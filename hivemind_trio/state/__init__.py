"""State backends: the budget ledger (SQLite); the shared Redis backend comes later."""
