"""The read-model contract on PostgreSQL (each test in its own schema)."""

from __future__ import annotations

import asyncio
import uuid

import psycopg
import pytest

from seamwork.errors import StoreUnavailable
from seamwork.events import EventStore, ProjectionRunner, ReadModelStore
from seamwork.storage.postgres_readmodel import PostgresReadModel
from seamwork.testing.read_model import ReadModelContract, added

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

    async def test_calls_go_past_a_connection_the_server_killed_while_idle(self) -> None:
        """The read model's connection, killed by the server while idle (a failover, an
        idle timeout), failed the next call - a page, a query - with StoreUnavailable
        though the server was fine; the call now connects again at its BEGIN, before
        anything of it ran."""
        application = f"sw-idle-{uuid.uuid4().hex[:8]}"
        model = PostgresReadModel(f"{self.dsn} application_name={application}")
        projection = self.totals_projection()

        async def kill_idle_connection() -> None:
            async with await psycopg.AsyncConnection.connect(self.dsn, autocommit=True) as admin:
                cursor = await admin.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE application_name = %s AND state = 'idle'",
                    (application,),
                )
                assert len(await cursor.fetchall()) == 1
            await asyncio.sleep(0.1)

        async with self.make_store() as store:
            await store.append("s", added(2))
            await model.open()
            try:
                runner = ProjectionRunner(store, projection, model)
                await kill_idle_connection()
                await runner.catch_up()
                await kill_idle_connection()
                assert await model.query("SELECT stream, total FROM totals") == [
                    {"stream": "s", "total": 2}
                ]
                await kill_idle_connection()
                assert await model.parked(projection.name) == []
            finally:
                await model.aclose()


async def test_a_bad_dsn_is_a_store_error_naming_it_not_the_drivers() -> None:
    """A DSN libpq cannot parse raised psycopg's ProgrammingError from open(), where
    the outbox, ledger and event store raise StoreUnavailable naming the problem."""
    with pytest.raises(StoreUnavailable, match=r'read model.*invalid connection option "nonsense"'):
        await PostgresReadModel("nonsense=1").open()
