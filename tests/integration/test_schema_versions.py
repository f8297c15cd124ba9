"""A store whose schema a newer seamwork wrote (its version above the newest this
code knows) is refused at open, naming it, and left as it is: the old code would
read and write it by its own older rules."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from seamwork.errors import StoreUnavailable
from seamwork.events import EventStore
from seamwork.messaging import Outbox
from seamwork.saga import IdempotencyLedger
from seamwork.storage import SQLiteStore
from seamwork.storage.postgres import PostgresStore

SQLITE: dict[str, tuple[Callable[[Path], Any], str]] = {
    "saga store": (SQLiteStore, "saga"),
    "event store": (EventStore.sqlite, "events"),
    "outbox": (Outbox.sqlite, "messaging"),
    "ledger": (IdempotencyLedger.sqlite, "idempotency"),
}
POSTGRES: dict[str, tuple[Callable[[str], Any], str]] = {
    "saga store": (PostgresStore, "saga"),
    "event store": (EventStore.postgres, "events"),
    "outbox": (Outbox.postgres, "messaging"),
    "ledger": (IdempotencyLedger.postgres, "idempotency"),
}


async def _opened_once(store: Any) -> None:
    await store.open()
    await store.aclose()


@pytest.mark.parametrize("kind", sorted(SQLITE))
async def test_a_sqlite_store_of_a_newer_schema_is_refused_and_left_alone(
    tmp_path: Path, kind: str
) -> None:
    make, component = SQLITE[kind]
    path = tmp_path / "service.db"
    await _opened_once(make(path))
    with sqlite3.connect(path) as db:
        db.execute("UPDATE seamwork_migrations SET version = 99 WHERE component = ?", (component,))
    with pytest.raises(StoreUnavailable, match=rf"{component} schema v99 .*newer seamwork"):
        await make(path).open()
    with sqlite3.connect(path) as db:
        row = db.execute(
            "SELECT version FROM seamwork_migrations WHERE component = ?", (component,)
        ).fetchone()
    assert row == (99,)


@pytest.mark.postgres
@pytest.mark.parametrize("kind", sorted(POSTGRES))
async def test_a_postgres_store_of_a_newer_schema_is_refused_and_left_alone(
    pg_dsn: str, kind: str
) -> None:
    import psycopg

    make, component = POSTGRES[kind]
    await _opened_once(make(pg_dsn))
    with psycopg.connect(pg_dsn, autocommit=True) as db:
        db.execute("UPDATE seamwork_migrations SET version = 99 WHERE component = %s", (component,))
    with pytest.raises(StoreUnavailable, match=rf"{component} schema v99 .*newer seamwork"):
        await make(pg_dsn).open()
    with psycopg.connect(pg_dsn, autocommit=True) as db:
        row = db.execute(
            "SELECT version FROM seamwork_migrations WHERE component = %s", (component,)
        ).fetchone()
    assert row == (99,)
