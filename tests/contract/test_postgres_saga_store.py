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
