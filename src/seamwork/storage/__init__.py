"""Storage adapters: SQLite (embedded default) and, with ``seamwork[postgres]``, PostgreSQL."""

from seamwork.storage.sqlite import SQLiteLedger, SQLiteStore

__all__ = ["SQLiteLedger", "SQLiteStore"]
