"""``IdempotencyLedger`` on a service's own PostgreSQL database.

``once(key, effect)`` first *claims* the key (``INSERT ... ON CONFLICT DO NOTHING``)
in the transaction that will carry the effect: a concurrent call with the same key
waits on the unique index until the first one commits, then finds the key taken and
returns its result - applied once however the calls race. If the effect raises, the
whole transaction rolls back, claim included. The result is kept as ``json`` (the
text as written), so a repeat reads back exactly what the first call returned.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable
from typing import Any, TypeVar

import psycopg

from seamwork._core.codec import loads
from seamwork.errors import ConfigError
from seamwork.saga import IdempotencyLedger
from seamwork.saga._idempotency import check_key, encode_result
from seamwork.storage._pg import (
    AsyncConn,
    PgMigration,
    connect,
    make_pool,
    migrate,
    open_pool,
    translate,
)

T = TypeVar("T")

LEDGER_MIGRATIONS = (
    PgMigration(
        "idempotency",
        1,
        (
            """CREATE TABLE seamwork_idempotency (
                key text PRIMARY KEY,
                result jsonb,
                created_at double precision NOT NULL
            )""",
        ),
    ),
    # json keeps the text as written: jsonb turned 1e20 into 100000000000000000000
    # (an int when read back), -0.0 into 0.0, reordered keys and refused "\u0000"
    PgMigration(
        "idempotency",
        2,
        ("ALTER TABLE seamwork_idempotency ALTER COLUMN result TYPE json USING result::json",),
    ),
)


class PostgresLedger(IdempotencyLedger):
    """``IdempotencyLedger`` in PostgreSQL; ``IdempotencyLedger.postgres(dsn)``.

    ``effect(conn)`` gets the transaction's ``psycopg.AsyncConnection`` and may be a
    plain function or a coroutine function (its result is awaited).
    """

    def __init__(self, dsn: str, *, pool_size: int = 4) -> None:
        if not dsn:
            raise ConfigError("PostgresLedger needs a DSN")
        self._dsn = dsn
        self._pool = make_pool(dsn, size=pool_size, name="seamwork-ledger")
        self._opened = False

    def __repr__(self) -> str:
        return "PostgresLedger(...)"

    async def open(self) -> None:
        if self._opened:
            return
        conn = await connect(self._dsn, autocommit=False, what="idempotency ledger")
        try:
            await migrate(conn, LEDGER_MIGRATIONS)
        finally:
            await conn.close()
        self._pool = await open_pool(self._pool, "idempotency ledger")
        self._opened = True

    async def aclose(self) -> None:
        if self._opened:
            self._opened = False
            await self._pool.close()

    async def once(self, key: str, effect: Callable[[Any], T]) -> T:
        check_key(key)
        await self.open()
        try:
            return await self._once(key, effect)
        except psycopg.Error as exc:  # the effect's statements or the ledger's own
            raise translate(exc, f"idempotency ledger, key {key!r}") from exc

    async def _once(self, key: str, effect: Callable[[Any], T]) -> T:
        async with self._pool.connection() as conn, conn.transaction():
            claimed = await conn.execute(
                "INSERT INTO seamwork_idempotency (key, created_at) VALUES (%s, %s) "
                "ON CONFLICT DO NOTHING RETURNING key",
                (key, time.time()),
            )
            if await claimed.fetchone() is None:
                return await self._recorded(conn, key)  # type: ignore[no-any-return]
            value = effect(conn)
            if inspect.isawaitable(value):
                value = await value
            text = encode_result(value, key)
            await conn.execute(
                "UPDATE seamwork_idempotency SET result = %s::json WHERE key = %s", (text, key)
            )
            return loads(text)  # type: ignore[no-any-return]  # as a repeat will return it

    async def result(self, key: str) -> Any | None:
        check_key(key)
        await self.open()
        try:
            async with self._pool.connection() as conn:
                return await self._recorded(conn, key)
        except psycopg.Error as exc:
            raise translate(exc, f"idempotency ledger, key {key!r}") from exc

    async def transaction(self, work: Callable[[Any], T]) -> T:
        await self.open()
        try:
            async with self._pool.connection() as conn, conn.transaction():
                value = work(conn)
                if inspect.isawaitable(value):
                    value = await value
                return value
        except psycopg.Error as exc:
            raise translate(exc, "idempotency ledger transaction") from exc

    @staticmethod
    async def _recorded(conn: AsyncConn, key: str) -> Any:
        cursor = await conn.execute(
            "SELECT result FROM seamwork_idempotency WHERE key = %s", (key,)
        )
        row = await cursor.fetchone()
        return None if row is None else row[0]
