"""The SagaStore contract on PostgreSQL (each test in its own schema)."""

from __future__ import annotations

from pathlib import Path

import psycopg
import pytest

from seamwork.saga import SagaStore
from seamwork.storage import PostgresStore
from seamwork.testing.saga_store import SagaStoreContract

pytestmark = pytest.mark.postgres


class TestPostgresSagaStore(SagaStoreContract):
    @pytest.fixture(autouse=True)
    def _dsn(self, pg_dsn: str) -> None:
        self.dsn = pg_dsn

    async def make_store(self, tmp_path: Path) -> SagaStore:
        return PostgresStore(self.dsn)

    async def reopen(self, store: SagaStore, tmp_path: Path) -> SagaStore:
        return PostgresStore(self.dsn)

    async def corrupt(self, store: SagaStore, saga_id: str) -> None:
        async with await psycopg.AsyncConnection.connect(self.dsn, autocommit=True) as conn:
            await conn.execute(
                "UPDATE seamwork_sagas SET context = '\"not an object\"' WHERE saga_id = %s",
                (saga_id,),
            )


async def test_closing_the_store_fails_a_queued_write_instead_of_stranding_it(
    pg_dsn: str,
) -> None:
    import asyncio

    from seamwork.errors import StoreError
    from seamwork.testing.saga_store import saga_state

    store = PostgresStore(pg_dsn)
    await store.open()
    pending = asyncio.ensure_future(store.create(saga_state("x"), []))
    await asyncio.sleep(0)
    await store.aclose()
    try:
        async with asyncio.timeout(3):
            created = await pending
    except StoreError:
        return  # a clear error: fine
    assert created is True  # or it landed before the close


async def test_an_open_that_fails_half_way_leaves_no_connection_behind(pg_dsn: str) -> None:
    import asyncio
    import uuid

    from seamwork.errors import StoreUnavailable

    role = f"seamwork_one_{uuid.uuid4().hex[:8]}"
    schema = pg_dsn.split("search_path=")[1].rstrip("'")
    with psycopg.connect(pg_dsn, autocommit=True) as admin:
        # Room for the read pool's connection, none for the writer's: open() fails
        # after the pool is up.
        admin.execute(f"CREATE ROLE {role} LOGIN CONNECTION LIMIT 1".encode())
        admin.execute(f'GRANT ALL ON SCHEMA "{schema}" TO {role}'.encode())
    try:
        store = PostgresStore(f"{pg_dsn} user={role}")
        with pytest.raises(StoreUnavailable, match="saga writer"):
            await store.open()
        left = -1
        for _ in range(50):  # a closed connection's backend takes a moment to go
            with psycopg.connect(pg_dsn, autocommit=True) as admin:
                row = admin.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE usename = %s", (role,)
                ).fetchone()
            left = row[0] if row else -1
            if left == 0:
                break
            await asyncio.sleep(0.05)
        assert left == 0
    finally:
        with psycopg.connect(pg_dsn, autocommit=True) as admin:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s",
                (role,),
            )
            admin.execute(f"DROP OWNED BY {role}".encode())
            admin.execute(f"DROP ROLE {role}".encode())


@pytest.mark.parametrize("seconds", [0, -1.0, float("nan")])
def test_a_query_timeout_that_is_not_positive_is_refused(seconds: float) -> None:
    """NaN too, as by the other PostgreSQL stores: it passed ``<= 0`` and left every
    statement without a deadline (a stalled server was waited on for good)."""
    from seamwork.errors import ConfigError

    with pytest.raises(ConfigError, match="query_timeout"):
        PostgresStore("dbname=unused", query_timeout=seconds)


@pytest.mark.parametrize("size", [0, -1, 2.5, True])
def test_a_pool_size_that_is_not_a_whole_number_from_1_is_refused(size: object) -> None:
    """By every PostgreSQL store, naming the setting: it reached psycopg's pool as
    given, which raised a bare ValueError (or took 2.5)."""
    from seamwork.errors import ConfigError
    from seamwork.events import EventStore
    from seamwork.messaging import Outbox
    from seamwork.saga import IdempotencyLedger

    for make in (
        lambda: PostgresStore("dbname=unused", pool_size=size),
        lambda: EventStore.postgres("dbname=unused", pool_size=size),
        lambda: Outbox.postgres("dbname=unused", pool_size=size),
        lambda: IdempotencyLedger.postgres("dbname=unused", pool_size=size),
    ):
        with pytest.raises(ConfigError, match="pool_size"):
            make()
