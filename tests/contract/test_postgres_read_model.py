"""The read-model contract on PostgreSQL (each test in its own schema)."""

from __future__ import annotations

import asyncio
import threading
import uuid
from typing import Any

import psycopg
import pytest

from seamwork.errors import StoreUnavailable
from seamwork.events import (
    EventStore,
    NewEvent,
    ProjectionRunner,
    ReadModelStore,
    RecordedEvent,
    handles,
)
from seamwork.storage.postgres_readmodel import PostgresReadModel
from seamwork.testing.read_model import (
    Fixed,
    ReadModelContract,
    Totals,
    added,
    readable,
    totals,
)

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

    async def test_a_replay_waits_for_a_page_of_another_replica_in_flight(self) -> None:
        """A replica's page that read the parked streams before a replay (in another
        process) unparked them, and committed after it, parked its new event of the
        stream behind nothing, with no error: the stream was stuck until the next
        replay. A replay now locks the checkpoint row first, as pages do, so it waits
        for that page and replays what it parked."""
        entered, release = threading.Event(), threading.Event()

        class Slow(Fixed):
            @handles("Added")
            def added(self, event: RecordedEvent, conn: Any) -> None:
                if event.data.get("hold"):
                    entered.set()  # inside the replica's page, the stream's event parked
                    release.wait(10)
                super().added(event, conn)

        application = f"sw-replay-{uuid.uuid4().hex[:8]}"
        async with self.make_store() as store:
            await store.append("s", added(5, poison=True))
            await store.append("s", added(1))
            await readable(store, 2)
            model = PostgresReadModel(f"{self.dsn} application_name={application}")
            replica = PostgresReadModel(self.dsn)
            try:
                await ProjectionRunner(store, self.totals_projection(), model).catch_up()
                other = ProjectionRunner(store, Slow(self.placeholder), replica)
                await other.catch_up()  # set up, at the same checkpoint
                await store.append("s", added(2))
                await store.append("t", [NewEvent("Added", {"n": 0, "hold": True})])
                await readable(store, 4)
                paging = asyncio.create_task(other.catch_up())
                assert await asyncio.to_thread(entered.wait, 10)
                fixed = ProjectionRunner(store, Fixed(self.placeholder), model)
                replaying = asyncio.create_task(fixed.replay("s"))
                async with (
                    await psycopg.AsyncConnection.connect(self.dsn, autocommit=True) as admin,
                    asyncio.timeout(10),
                ):
                    while not replaying.done():  # it has finished, or waits for the page
                        cursor = await admin.execute(
                            "SELECT count(*) FROM pg_stat_activity "
                            "WHERE application_name = %s AND wait_event_type = 'Lock'",
                            (application,),
                        )
                        row = await cursor.fetchone()
                        if row is not None and row[0]:
                            break
                        await asyncio.sleep(0.01)
                release.set()
                await paging
                assert await replaying == 3
                assert await fixed.parked() == []  # before: the third, stuck
                assert await totals(model) == {"s": 8, "t": 0}
            finally:
                release.set()
                await replica.aclose()
                await model.aclose()

    async def test_a_page_waiting_for_another_replicas_longer_page_is_not_cut(self) -> None:
        """A page waits on the checkpoint row while another replica's page holds it. The
        stall watch took that wait (a statement in progress, nothing on the socket) for
        a server that does not answer: past query_timeout the waiting replica's page
        failed with StoreUnavailable and its connection was replaced, on every try for
        as long as the other's pages took longer than the deadline."""
        entered, release = threading.Event(), threading.Event()

        class Slow(Totals):
            @handles("Added")
            def added(self, event: RecordedEvent, conn: Any) -> None:
                if event.data.get("hold"):
                    entered.set()
                    release.wait(10)
                super().added(event, conn)

        async with self.make_store() as store:
            first = PostgresReadModel(self.dsn, query_timeout=1)
            second = PostgresReadModel(self.dsn, query_timeout=1)
            try:
                long_pages = ProjectionRunner(store, Slow(self.placeholder), first)
                waiting = ProjectionRunner(store, self.totals_projection(), second)
                await long_pages.catch_up()
                await waiting.catch_up()  # both set up
                await store.append("s", [NewEvent("Added", {"n": 1, "hold": True})])
                await readable(store, 1)
                holding = asyncio.create_task(long_pages.catch_up())
                assert await asyncio.to_thread(entered.wait, 10)
                paging = asyncio.create_task(waiting.catch_up())
                await asyncio.wait({paging}, timeout=2)  # twice the deadline
                release.set()
                await holding
                assert await paging == long_pages.checkpoint  # StoreUnavailable before
                assert await totals(first) == {"s": 1}
            finally:
                release.set()
                await first.aclose()
                await second.aclose()


async def test_a_bad_dsn_is_a_store_error_naming_it_not_the_drivers() -> None:
    """A DSN libpq cannot parse raised psycopg's ProgrammingError from open(), where
    the outbox, ledger and event store raise StoreUnavailable naming the problem."""
    with pytest.raises(StoreUnavailable, match=r'read model.*invalid connection option "nonsense"'):
        await PostgresReadModel("nonsense=1").open()


class TestCatchUpSeesWhatWasCommittedBeforeIt:
    """An event committed before ``catch_up()`` was skipped when a transaction that was
    open at the time (anywhere on the server) kept it below the gap-safe horizon:
    append, then catch_up, and the read model did not have it."""

    @pytest.fixture(autouse=True)
    def _dsn(self, pg_dsn: str) -> None:
        self.dsn = pg_dsn

    async def _open_writer(self) -> psycopg.AsyncConnection[Any]:
        other = await psycopg.AsyncConnection.connect(self.dsn)
        await other.execute("SELECT pg_current_xact_id()")  # an xid: holds the horizon
        return other

    async def test_an_event_behind_a_transaction_that_ends_soon_is_applied(self) -> None:
        model = PostgresReadModel(self.dsn)
        async with EventStore.postgres(self.dsn) as store, model:
            runner = ProjectionRunner(store, Totals("%s"), model)
            other = await self._open_writer()
            try:
                await store.append("s", added(2))
                ends = asyncio.get_running_loop().call_later(
                    0.3, lambda: asyncio.ensure_future(other.commit())
                )
                await runner.catch_up()
                ends.cancel()
            finally:
                await other.close()
            assert await totals(model) == {"s": 2}

    async def test_a_transaction_left_open_holds_catch_up_only_for_its_wait(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        model = PostgresReadModel(self.dsn)
        async with EventStore.postgres(self.dsn) as store, model:
            runner = ProjectionRunner(store, Totals("%s"), model)
            other = await self._open_writer()
            try:
                await store.append("s", added(2))
                loop = asyncio.get_running_loop()
                began = loop.time()
                await runner.catch_up(wait=0.5)
                assert 0.5 <= loop.time() - began < 3
                assert await totals(model) == {}
                assert "still open" in caplog.text
            finally:
                await other.close()
            await runner.catch_up()
            assert await totals(model) == {"s": 2}
