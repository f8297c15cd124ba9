"""The read-model contract on SQLite (a read database beside the event store's)."""

from __future__ import annotations

import sqlite3
from contextlib import closing
from pathlib import Path

import pytest

from seamwork.events import EventStore, ReadModelStore
from seamwork.storage import SQLiteReadModel
from seamwork.testing.read_model import ReadModelContract


class TestSQLiteReadModel(ReadModelContract):
    placeholder = "?"

    @pytest.fixture(autouse=True)
    def _directory(self, tmp_path: Path) -> None:
        self.directory = tmp_path

    def make_store(self) -> EventStore:
        return EventStore.sqlite(self.directory / "events.db")

    def make_read_model(self) -> ReadModelStore:
        return SQLiteReadModel(self.directory / "read.db")

    async def drift(self, model: ReadModelStore) -> None:
        with closing(sqlite3.connect(self.directory / "read.db")) as conn, conn:
            conn.execute("UPDATE totals SET total = -1")
