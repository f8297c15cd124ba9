"""A PostgreSQL store whose schema cannot be created (a role without the CREATE
privilege) fails to open with seamwork's ``StoreError`` naming the cause, never with
the driver's own exception."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from seamwork.errors import StoreError
from seamwork.events import EventStore
from seamwork.saga import IdempotencyLedger
from seamwork.storage.postgres import PostgresStore
from seamwork.storage.postgres_messaging import PostgresMessageStore
from seamwork.storage.postgres_readmodel import PostgresReadModel

pytestmark = pytest.mark.postgres


@pytest.fixture
def no_ddl_dsn(pg_dsn: str) -> Iterator[str]:
    """``pg_dsn`` as a role that may use its schema but not create tables in it."""
    import psycopg

    role = f"seamwork_noddl_{uuid.uuid4().hex[:10]}"
    schema = pg_dsn.split("search_path=")[1].rstrip("'")
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(f'CREATE ROLE "{role}" LOGIN'.encode())
        conn.execute(f'GRANT USAGE ON SCHEMA "{schema}" TO "{role}"'.encode())
    try:
        yield f"{pg_dsn} user={role}"
    finally:
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            conn.execute(f'DROP OWNED BY "{role}"'.encode())
            conn.execute(f'DROP ROLE "{role}"'.encode())


STORES: dict[str, Callable[[str], Any]] = {
    "saga store": PostgresStore,
    "event store": EventStore.postgres,
    "ledger": IdempotencyLedger.postgres,
    "messaging": PostgresMessageStore,
}


@pytest.mark.parametrize("kind", sorted(STORES))
async def test_a_store_that_cannot_create_its_schema_fails_with_store_error(
    no_ddl_dsn: str, kind: str
) -> None:
    store = STORES[kind](no_ddl_dsn)
    with pytest.raises(StoreError, match="permission denied"):
        await store.open()
    await store.aclose()  # nothing was opened: closing is a no-op


# DSNs libpq cannot parse, whose error quotes the piece holding the password
SECRET_DSNS = {
    "uri-bad-escape": "postgresql://postgres:s3cret%zz@127.0.0.1:1/db",
    "uri-space": "postgresql://postgres:s3cret here@127.0.0.1:1/db",
    "uri-bad-host": "postgresql://postgres:s3cret@[127.0.0.1:1/db",
    "uri-query": "postgresql://postgres@127.0.0.1:1/db?password=s3cret%zz",
    "key-value-space": "host=127.0.0.1 port=1 password=here s3cret",
}


@pytest.mark.parametrize("dsn", SECRET_DSNS.values(), ids=SECRET_DSNS.keys())
@pytest.mark.parametrize("kind", sorted({**STORES, "read model": PostgresReadModel}))
async def test_a_dsn_that_does_not_parse_is_named_without_its_password(kind: str, dsn: str) -> None:
    store = {**STORES, "read model": PostgresReadModel}[kind](dsn)
    with pytest.raises(StoreError) as raised:
        await store.open()
    assert "s3cret" not in str(raised.value)
    assert "PostgreSQL" in str(raised.value)
    assert '"***"' in str(raised.value)  # the piece libpq quoted, masked
    await store.aclose()
