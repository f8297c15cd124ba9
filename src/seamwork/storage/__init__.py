"""Storage adapters: SQLite (embedded default) and, with ``seamwork[postgres]``, PostgreSQL.

The PostgreSQL adapters are imported on first use, so ``import seamwork.storage``
needs no driver.
"""

from __future__ import annotations

import importlib
from typing import Any

from seamwork.storage.sqlite import SQLiteLedger, SQLiteStore
from seamwork.storage.sqlite_events import SQLiteEventStore
from seamwork.storage.sqlite_readmodel import SQLiteReadModel

_LAZY = {
    "PostgresEventStore": "seamwork.storage.postgres_events",
    "PostgresLedger": "seamwork.storage.postgres_ledger",
    "PostgresReadModel": "seamwork.storage.postgres_readmodel",
    "PostgresStore": "seamwork.storage.postgres",
}

__all__ = [
    "PostgresEventStore",
    "PostgresLedger",
    "PostgresReadModel",
    "PostgresStore",
    "SQLiteEventStore",
    "SQLiteLedger",
    "SQLiteReadModel",
    "SQLiteStore",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'seamwork.storage' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
