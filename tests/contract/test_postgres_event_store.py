"""The EventStore contract on PostgreSQL (each test in its own schema)."""

from __future__ import annotations

from pathlib import Path

import pytest

from seamwork.events import EventStore, Upcasters
from seamwork.testing.event_store import EventStoreContract

pytestmark = pytest.mark.postgres


class TestPostgresEventStore(EventStoreContract):
    @pytest.fixture(autouse=True)
    def _dsn(self, pg_dsn: str) -> None:
        self.dsn = pg_dsn

    async def make_store(self, tmp_path: Path, upcasters: Upcasters | None = None) -> EventStore:
        return EventStore.postgres(self.dsn, upcasters=upcasters)
