"""``IdempotencyLedger`` on a service's own PostgreSQL database.

``once(key, effect)`` first *claims* the key (``INSERT ... ON CONFLICT DO NOTHING``)
in the transaction that will carry the effect: a concurrent call with the same key
waits on the unique index until the first one commits, then finds the key taken and
returns its result - applied once however the calls race. (It waits for at most
``query_timeout``, the deadline of each of the ledger's statements, then fails with
``StoreUnavailable``: the caller tries again, as after any outage.) If the effect raises, the
whole transaction rolls back, claim included. The result is kept as ``json`` (the
text as written), so a repeat reads back exactly what the first call returned.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
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
    deadline,
    make_pool,
    migrate,
    open_pool,
    past_dead_connections,
    pooled_transaction,
    stalled,
    timed,
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

    Args:
        dsn: a libpq connection string.
        pool_size: connections for ``once``, ``result`` and ``transaction``.
        query_timeout: the application deadline, in seconds, of each of the ledger's
            own statements (BEGIN, the claim, the recorded result, COMMIT, ``result``):
            a server that stalls fails it with ``StoreUnavailable`` after this (a
            COMMIT's outcome then unknown) and the connection is replaced. The
            effect's statements on ``conn`` are its own.
    """

    def __init__(self, dsn: str, *, pool_size: int = 4, query_timeout: float = 5.0) -> None:
        if not dsn:
            raise ConfigError("PostgresLedger needs a DSN")
        if not query_timeout > 0:
            raise ConfigError(f"query_timeout must be > 0 seconds, got {query_timeout!r}")
        self._dsn = dsn
        self._deadline = query_timeout
        self._pool = make_pool(dsn, size=pool_size, name="seamwork-ledger")
        self._attempts = pool_size + 1  # past every idle connection, to a new one
        self._opened = False

    def __repr__(self) -> str:
        return "PostgresLedger(...)"

    async def open(self) -> None:
        if self._opened:
            return
        conn = await connect(
            self._dsn, autocommit=False, what="idempotency ledger", within=self._deadline
        )
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

    def _transaction(self, what: str) -> AbstractAsyncContextManager[AsyncConn]:
        return pooled_transaction(
            self.open, lambda: self._pool, self._deadline, attempts=self._attempts, what=what
        )

    async def once(self, key: str, effect: Callable[[Any], T]) -> T:
        check_key(key)
        what = f"idempotency ledger, key {key!r}"
        try:
            async with self._transaction(what) as conn:
                claimed = await timed(conn, self._deadline, _CLAIM, (key, time.time()), what=what)
                if not claimed:
                    return await self._recorded(conn, key, what)  # type: ignore[no-any-return]
                value = effect(conn)
                if inspect.isawaitable(value):
                    value = await value
                text = encode_result(value, key)
                await timed(conn, self._deadline, _RECORD, (text, key), what=what)
                return loads(text)  # type: ignore[no-any-return]  # as a repeat will return it
        except psycopg.Error as exc:  # the effect's statements or the ledger's own
            raise translate(exc, what) from exc

    async def result(self, key: str) -> Any | None:
        check_key(key)
        await self.open()
        return await past_dead_connections(self._attempts, lambda: self._result(key))

    async def _result(self, key: str) -> Any | None:
        what = f"idempotency ledger, key {key!r}"
        conns: list[AsyncConn] = []
        try:
            async with deadline(self._deadline, conns), self._pool.connection() as conn:
                conns.append(conn)
                cursor = await conn.execute(_RESULT, (key,))
                row = await cursor.fetchone()
                return None if row is None else row[0]
        except (psycopg.Error, TimeoutError) as exc:
            raise translate(stalled(exc, self._deadline), what) from exc

    async def transaction(self, work: Callable[[Any], T]) -> T:
        what = "idempotency ledger transaction"
        try:
            async with self._transaction(what) as conn:
                value = work(conn)
                if inspect.isawaitable(value):
                    value = await value
                return value
        except psycopg.Error as exc:
            raise translate(exc, what) from exc

    async def _recorded(self, conn: AsyncConn, key: str, what: str) -> Any:
        rows = await timed(conn, self._deadline, _RESULT, (key,), what=what)
        return rows[0][0] if rows else None


_CLAIM = (
    b"INSERT INTO seamwork_idempotency (key, created_at) VALUES (%s, %s) "
    b"ON CONFLICT DO NOTHING RETURNING key"
)
_RECORD = b"UPDATE seamwork_idempotency SET result = %s::json WHERE key = %s"
_RESULT = b"SELECT result FROM seamwork_idempotency WHERE key = %s"
