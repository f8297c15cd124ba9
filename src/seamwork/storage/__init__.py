"""Storage adapters: SQLite (embedded default) and, with ``seamwork[postgres]``, PostgreSQL."""

from seamwork.storage.sqlite import SQLiteLedger, SQLiteStore
from seamwork.storage.sqlite_events import SQLiteEventStore
from seamwork.storage.sqlite_readmodel import SQLiteReadModel

__all__ = ["SQLiteEventStore", "SQLiteLedger", "SQLiteReadModel", "SQLiteStore"]
