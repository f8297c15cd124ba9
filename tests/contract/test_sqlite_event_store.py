"""The EventStore contract on SQLite."""

from __future__ import annotations

from pathlib import Path

from seamwork.events import EventStore, Upcasters
from seamwork.testing.event_store import EventStoreContract


class TestSQLiteEventStore(EventStoreContract):
    async def make_store(self, tmp_path: Path, upcasters: Upcasters | None = None) -> EventStore:
        return EventStore.sqlite(tmp_path / "events.db", upcasters=upcasters)
