"""The read-model contract on PostgreSQL (each test in its own schema)."""

from __future__ import annotations

import psycopg
import pytest

from seamwork.events import EventStore, ReadModelStore
from seamwork.storage.postgres_readmodel import PostgresReadModel
from seamwork.testing.read_model import ReadModelContract

pytestmark = pytest.mark.postgres


class TestPostgresReadModel(ReadModelContract):
    placeholder = "%s"
    failed_statement_aborts_the_transaction = True

    @pytest.fixture(autouse=True)
    def _dsn(self, pg_dsn: str) -> None:
        self.dsn = pg_dsn

    def make_store(self) -> EventStore:
        return EventStore.postgres(self.dsn)

    def make_read_model(self) -> ReadModelStore:
        return PostgresReadModel(self.dsn)

    async def drift(self, model: ReadModelStore) -> None:
        async with await psycopg.AsyncConnection.connect(self.dsn, autocommit=True) as conn:
            await conn.execute("UPDATE totals SET total = -1")
