"""Outbox and inbox in a service's own PostgreSQL database.

A transaction is a real PostgreSQL transaction on a pooled connection: the service's
statements (``%s`` placeholders), the outbox rows it publishes and - for an inbox -
the id of the message it handles commit together. The inbox claims a message id with
``INSERT ... ON CONFLICT DO NOTHING`` first, so a concurrent redelivery of the same
message waits on the unique index and then finds it taken: applied once, even by two
consumers at the same moment.

Relay order: rows are read by ``seq``. Two transactions touching the same aggregate
serialise on its rows and so commit in ``seq`` order; unrelated rows may be relayed
in commit order rather than ``seq`` order, and nothing is ever skipped (pending rows
are found by ``sent_at IS NULL``, not by a position).
"""

from __future__ import annotations

import builtins
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import psycopg
from psycopg.pq import TransactionStatus

from seamwork._core.wakeup import Wakeup
from seamwork.errors import ConfigError, StoreError, StoreUnavailable
from seamwork.messaging._message import Message
from seamwork.messaging._outbox import (
    Inbox,
    Outbox,
    OutboxRecord,
    ParkedMessage,
    Transaction,
    UnreadableRow,
    check_ids,
    check_limit,
    check_open,
    id_taken,
    not_parked,
    outbox_row,
    parked_message,
    read_row,
    readable,
)
from seamwork.storage._pg import (
    UNDOABLE,
    AsyncConn,
    PgMigration,
    connect,
    deadline,
    make_pool,
    migrate,
    open_pool,
    past_dead_connections,
    pooled_transaction,
    timed,
    translate,
)
from seamwork.storage._schema import newer_schema

MESSAGING_MIGRATIONS = (
    PgMigration(
        "messaging",
        1,
        (
            """CREATE TABLE seamwork_outbox (
                seq bigserial PRIMARY KEY,
                id text NOT NULL UNIQUE,
                subject text NOT NULL,
                type text NOT NULL,
                data jsonb NOT NULL,
                correlation_id text,
                causation_id text,
                headers jsonb NOT NULL,
                created_at double precision NOT NULL,
                sent_at double precision
            )""",
            "CREATE INDEX seamwork_outbox_pending ON seamwork_outbox (seq) WHERE sent_at IS NULL",
            "CREATE INDEX seamwork_outbox_sent ON seamwork_outbox (sent_at) "
            "WHERE sent_at IS NOT NULL",
            """CREATE TABLE seamwork_inbox (
                id text PRIMARY KEY,
                type text NOT NULL,
                received_at double precision NOT NULL
            )""",
        ),
    ),
    # json keeps the text as written, as SQLite does; jsonb turned 1e16 into the int
    # 10000000000000000, reordered keys and refused a NUL character ("\u0000").
    PgMigration(
        "messaging",
        2,
        (
            "ALTER TABLE seamwork_outbox ALTER COLUMN data TYPE json USING data::json, "
            "ALTER COLUMN headers TYPE json USING headers::json",
        ),
    ),
    # a message the broker refuses for good is parked: kept, out of the pending ones
    PgMigration(
        "messaging",
        3,
        (
            "ALTER TABLE seamwork_outbox ADD COLUMN parked_at double precision, "
            "ADD COLUMN park_error text",
            "DROP INDEX seamwork_outbox_pending",
            "CREATE INDEX seamwork_outbox_pending ON seamwork_outbox (seq) "
            "WHERE sent_at IS NULL AND parked_at IS NULL",
            "CREATE INDEX seamwork_outbox_parked ON seamwork_outbox (seq) "
            "WHERE parked_at IS NOT NULL",
        ),
    ),
    # handled ids are recorded per consumer group: keyed by id alone, a second group of
    # the service on the same subject found the first group's record and applied nothing
    # (ids recorded before, under the group '' no broker gives, count for every group)
    PgMigration(
        "messaging",
        4,
        (
            "ALTER TABLE seamwork_inbox ADD COLUMN consumer_group text NOT NULL DEFAULT ''",
            "ALTER TABLE seamwork_inbox DROP CONSTRAINT seamwork_inbox_pkey, "
            "ADD PRIMARY KEY (id, consumer_group)",
        ),
    ),
)

_INSERT_OUTBOX = (
    "INSERT INTO seamwork_outbox (id, subject, type, data, correlation_id, causation_id, "
    "headers, created_at) VALUES (%s, %s, %s, %s::json, %s, %s, %s::json, %s)"
)
_PENDING = "sent_at IS NULL AND parked_at IS NULL"
"""Rows the relay has still to publish (the predicate of the pending index)."""
_ROW = "seq, id, subject, type, data::text, correlation_id, causation_id, headers::text"
"""An outbox row as ``read_row`` takes it: data and headers as the text stored (a row
no message can be built from is parked with it)."""
_CLAIM_ID = (
    b"INSERT INTO seamwork_inbox (id, consumer_group, type, received_at) "
    b"SELECT %s, %s, %s, %s WHERE NOT EXISTS (SELECT 1 FROM "
    b"seamwork_inbox WHERE id = %s AND consumer_group = '') "
    b"ON CONFLICT DO NOTHING RETURNING id"
)
"""Claim a message id for a consumer group; nothing if the group (or, before groups
were recorded, any consumer: group '') has it."""


class PostgresMessageStore:
    """The service database's connections, shared by its outbox and inbox.

    Args:
        dsn: a libpq connection string.
        pool_size: connections for transactions and the relay's statements.
        query_timeout: the application deadline, in seconds, of every statement: the
            relay's (``pending``, ``mark_sent``, ``purge_sent``, ``pending_count``,
            ``seen``) and each one inside a transaction block (BEGIN, the service's
            own, COMMIT; not the block as a whole): a server that stalls fails it with
            ``StoreUnavailable`` after this, so the relay backs off and carries on
            and a handler's message is retried, instead of waiting for good.
        create: create (migrate) the schema if needed; False for tools that must find
            an outbox there and change nothing else (the CLI).
    """

    def __init__(
        self, dsn: str, *, pool_size: int = 8, query_timeout: float = 5.0, create: bool = True
    ) -> None:
        if not dsn:
            raise ConfigError("a PostgreSQL outbox/inbox needs a DSN")
        if not query_timeout > 0:
            raise ConfigError(f"query_timeout must be > 0 seconds, got {query_timeout!r}")
        self.dsn = dsn
        self.query_timeout = query_timeout
        self.create = create
        self.pool = make_pool(dsn, size=pool_size, name="seamwork-messaging")
        self._attempts = pool_size + 1  # past every idle connection, to a new one
        self._opened = False
        self._wakeup = Wakeup()

    async def open(self) -> None:
        if self._opened:
            return
        conn = await connect(self.dsn, autocommit=False, what="outbox", within=self.query_timeout)
        try:
            if self.create:
                await migrate(conn, MESSAGING_MIGRATIONS)
            else:
                await _require_schema(conn)
        finally:
            await conn.close()
        self.pool = await open_pool(self.pool, "outbox")
        self._opened = True

    async def aclose(self) -> None:
        if self._opened:
            self._opened = False
            await self.pool.close()

    def notify(self) -> None:
        self._wakeup.notify()

    async def wait(self, max_wait: float) -> None:
        await self._wakeup.wait(max_wait)

    async def fetch(self, sql: str, params: Sequence[Any] = ()) -> builtins.list[Any]:
        """Run one statement under the deadline, on its own (autocommit)."""
        await self.open()
        conns: builtins.list[AsyncConn] = []
        try:
            async with deadline(self.query_timeout, conns), self.pool.connection() as conn:
                conns.append(conn)
                cursor = await conn.execute(sql.encode(), tuple(params))
                return await cursor.fetchall() if cursor.description else []
        except TimeoutError as exc:
            raise StoreUnavailable(
                f"outbox/inbox: PostgreSQL did not answer within {self.query_timeout:g}s"
            ) from exc
        except psycopg.Error as exc:
            raise translate(exc, "outbox/inbox") from exc

    async def read(self, sql: str, params: Sequence[Any] = ()) -> builtins.list[Any]:
        """``fetch`` for a statement safe to repeat (a read, an idempotent mark), tried
        again past pooled connections the server killed while idle."""
        return await past_dead_connections(self._attempts, lambda: self.fetch(sql, params))

    def transaction(self, what: str) -> AbstractAsyncContextManager[AsyncConn]:
        """A pooled connection in a transaction (``_pg.pooled_transaction``): a failure
        to get the connection or to commit is a ``StoreError``; an error of the
        caller's own statements passes through as it is (as on SQLite)."""
        return pooled_transaction(
            self.open, lambda: self.pool, self.query_timeout, attempts=self._attempts, what=what
        )


async def _require_schema(conn: AsyncConn) -> None:
    """Refuse a database that holds no messaging schema of this version (nothing is
    created in it)."""
    latest = MESSAGING_MIGRATIONS[-1].version
    try:
        cursor = await conn.execute(
            "SELECT version FROM seamwork_migrations WHERE component = 'messaging'"
        )
        row = await cursor.fetchone()
    except psycopg.errors.UndefinedTable:
        row = None
    except psycopg.Error as exc:
        raise translate(exc, "outbox") from exc
    if row is None:
        raise StoreUnavailable("this database holds no seamwork outbox (nothing was created)")
    problem = newer_schema({"messaging": row[0]}, [("messaging", latest)])
    if problem is not None:
        raise StoreUnavailable(f"cannot open the outbox: {problem}")
    if row[0] < latest:
        raise StoreUnavailable(
            f"this database holds a seamwork outbox of an older version (messaging schema "
            f"v{row[0]}, this version needs v{latest}): open it with the service once to "
            "upgrade it"
        )


class _Transaction:
    """``Transaction`` on an open PostgreSQL transaction; published messages are
    inserted just before it commits. Each statement runs under the store's deadline.
    ``cause``: the message an inbox handler is handling (its follow-ups join its flow)."""

    def __init__(self, conn: AsyncConn, seconds: float, cause: Message | None = None) -> None:
        self.conn = conn
        self.seconds = seconds
        self.cause = cause
        self.rows: list[tuple[Any, ...]] = []
        self.ended = False

    async def execute(self, sql: str, params: Sequence[Any] = ()) -> builtins.list[tuple[Any, ...]]:
        check_open(self.ended)
        try:
            rows: builtins.list[tuple[Any, ...]] = await timed(
                self.conn, self.seconds, sql.encode(), params, what="outbox/inbox"
            )
        except psycopg.OperationalError as exc:
            if self.conn.broken:  # the store's failure, not the statement's
                raise translate(exc, "outbox/inbox: the connection was lost") from exc
            raise
        return rows

    async def publish(self, subject: str, message: Message) -> None:
        check_open(self.ended)
        self.rows.append(outbox_row(subject, message, self.cause))

    async def flush(self) -> None:
        """Insert the published messages, last; a transaction a failed statement
        aborted is refused here, for its COMMIT would roll back without an error."""
        if self.conn.info.transaction_status == TransactionStatus.INERROR:
            raise StoreError(
                "a failed statement aborted the transaction and the block went on: "
                "PostgreSQL commits nothing of it, so it is rolled back (to ignore an "
                "error, run the statement in its own SAVEPOINT and ROLLBACK TO it)"
            )
        if not self.rows:
            return
        try:
            async with deadline(self.seconds, [self.conn]), self.conn.cursor() as cursor:
                await cursor.executemany(_INSERT_OUTBOX, self.rows)
        except TimeoutError as exc:
            raise StoreUnavailable(
                f"outbox: writing its messages: PostgreSQL did not answer within {self.seconds:g}s"
            ) from exc
        except psycopg.errors.UniqueViolation as exc:  # the server names the key
            detail = exc.diag.message_detail or ""
            taken = next((r[0] for r in self.rows if f"=({r[0]})" in detail), None)
            if taken is None:
                raise translate(exc, "outbox: writing its messages") from exc
            raise StoreError(id_taken(taken)) from exc
        except psycopg.Error as exc:
            raise translate(exc, "outbox: writing its messages") from exc


class PostgresOutbox(Outbox):
    """``Outbox`` in PostgreSQL; ``Outbox.postgres(dsn)`` builds one."""

    def __init__(self, store: PostgresMessageStore) -> None:
        self.store = store

    @classmethod
    def open_dsn(cls, dsn: str, **options: Any) -> PostgresOutbox:
        return cls(PostgresMessageStore(dsn, **options))

    def __repr__(self) -> str:
        return "PostgresOutbox(...)"

    def inbox(self) -> PostgresInbox:
        return PostgresInbox(self.store)

    async def open(self) -> None:
        await self.store.open()

    async def aclose(self) -> None:
        await self.store.aclose()

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Transaction]:
        async with self.store.transaction("outbox") as conn:
            tx = _Transaction(conn, self.store.query_timeout)
            try:
                yield tx
            finally:
                tx.ended = True
            await tx.flush()
        if tx.rows:
            self.store.notify()

    async def pending(self, limit: int) -> builtins.list[OutboxRecord]:
        return readable(await self._pending_rows(limit))

    async def _pending_rows(self, limit: int) -> builtins.list[OutboxRecord | UnreadableRow]:
        rows = await self.store.read(
            f"SELECT {_ROW} FROM seamwork_outbox WHERE {_PENDING} ORDER BY seq LIMIT %s",
            (limit,),
        )
        return [read_row(row) for row in rows]

    async def mark_sent(self, seqs: Collection[int]) -> None:
        if seqs:
            await self.store.read(
                "UPDATE seamwork_outbox SET sent_at = %s, parked_at = NULL, park_error = NULL "
                "WHERE seq = ANY(%s)",
                (time.time(), builtins.list(seqs)),
            )

    async def pending_count(self) -> int:
        rows = await self.store.read(f"SELECT count(*) FROM seamwork_outbox WHERE {_PENDING}")
        return int(rows[0][0])

    async def purge_sent(self, older_than: float) -> int:
        rows = await self.store.fetch(
            "DELETE FROM seamwork_outbox WHERE sent_at IS NOT NULL AND sent_at < %s RETURNING seq",
            (older_than,),
        )
        return len(rows)

    async def resend_since(self, since: float) -> int:
        rows = await self.store.fetch(
            "UPDATE seamwork_outbox SET sent_at = NULL WHERE sent_at >= %s RETURNING seq", (since,)
        )
        self.store.notify()
        return len(rows)

    async def wait_for_messages(self, max_wait: float) -> None:
        await self.store.wait(max_wait)

    async def park(self, seq: int, error: str) -> None:
        await self.store.fetch(
            "UPDATE seamwork_outbox SET parked_at = %s, park_error = %s "
            "WHERE seq = %s AND sent_at IS NULL",
            (time.time(), error, seq),
        )

    async def parked(self, *, limit: int = 100) -> builtins.list[ParkedMessage]:
        check_limit(limit)
        rows = await self.store.read(
            f"SELECT {_ROW}, park_error, parked_at FROM seamwork_outbox "
            "WHERE parked_at IS NOT NULL ORDER BY seq LIMIT %s",
            (limit,),
        )
        return [parked_message(row) for row in rows]

    async def requeue(self, ids: Collection[str]) -> int:
        count = await self._on_parked(
            ids,
            "UPDATE seamwork_outbox SET parked_at = NULL, park_error = NULL "
            "WHERE parked_at IS NOT NULL AND id = ANY(%s)",
        )
        if count:
            self.store.notify()
        return count

    async def discard(self, ids: Collection[str]) -> int:
        return await self._on_parked(
            ids, "DELETE FROM seamwork_outbox WHERE parked_at IS NOT NULL AND id = ANY(%s)"
        )

    async def _on_parked(self, ids: Collection[str], statement: str) -> int:
        """Run ``statement`` on the parked messages ``ids`` in one transaction, or on
        none if one of them is not parked."""
        wanted = check_ids(ids)
        if not wanted:
            return 0
        seconds = self.store.query_timeout
        async with self.store.transaction("outbox") as conn:
            try:
                rows = await timed(
                    conn,
                    seconds,
                    b"SELECT id FROM seamwork_outbox WHERE parked_at IS NOT NULL "
                    b"AND id = ANY(%s) FOR UPDATE",
                    ([i for i in wanted if "\x00" not in i],),  # text holds no NUL: not parked
                    what="outbox",
                )
                found = {row[0] for row in rows}
                if len(found) < len(wanted):
                    raise not_parked(wanted, found)
                await timed(conn, seconds, statement.encode(), (wanted,), what="outbox")
            except psycopg.Error as exc:
                raise translate(exc, "outbox: parked messages") from exc
        return len(found)


class _Batch:
    """``InboxBatch`` on one PostgreSQL transaction: a savepoint per message."""

    def __init__(self, conn: AsyncConn, seconds: float, group: str) -> None:
        self.conn = conn
        self.seconds = seconds
        self.group = group
        self.published = False

    async def apply(
        self, message: Message, fn: Callable[[Message, Transaction], Awaitable[None]]
    ) -> BaseException | None:
        try:
            await self._run(b"SAVEPOINT seamwork_message")
            try:
                tx = await self._apply(message, fn)
            except BaseException:
                if self.conn.info.transaction_status in UNDOABLE:
                    await self._run(b"ROLLBACK TO SAVEPOINT seamwork_message")
                    await self._run(b"RELEASE SAVEPOINT seamwork_message")
                raise
            await self._run(b"RELEASE SAVEPOINT seamwork_message")
            self.published = self.published or bool(tx is not None and tx.rows)
        except Exception as exc:
            if self.conn.broken or self.conn.closed:
                raise  # the connection is gone: nothing commits, the batch fails whole
            return exc  # this message's own error (a lock timeout, say): its savepoint held it
        return None

    async def _run(self, sql: bytes) -> None:
        await timed(self.conn, self.seconds, sql, what="inbox")

    async def _apply(
        self, message: Message, fn: Callable[[Message, Transaction], Awaitable[None]]
    ) -> _Transaction | None:
        if not await _claim(self.conn, message, self.group, self.seconds):
            return None  # applied before
        tx = _Transaction(self.conn, self.seconds, message)
        try:
            await fn(message, tx)
        finally:
            tx.ended = True  # a task it left running must not write into the next
        await tx.flush()
        return tx


class PostgresInbox(Inbox):
    """``Inbox`` in PostgreSQL; ``Inbox.postgres(dsn)`` or ``Inbox.of(outbox)``."""

    def __init__(self, store: PostgresMessageStore) -> None:
        self.store = store

    @classmethod
    def open_dsn(cls, dsn: str, **options: Any) -> PostgresInbox:
        return cls(PostgresMessageStore(dsn, **options))

    def __repr__(self) -> str:
        return "PostgresInbox(...)"

    async def open(self) -> None:
        await self.store.open()

    async def aclose(self) -> None:
        await self.store.aclose()

    async def seen(self, message_id: str) -> bool:
        rows = await self.store.read("SELECT 1 FROM seamwork_inbox WHERE id = %s", (message_id,))
        return bool(rows)

    @asynccontextmanager
    async def _transaction(
        self, message: Message, group: str = ""
    ) -> AsyncIterator[Transaction | None]:
        async with self.store.transaction("inbox") as conn:
            if not await _claim(conn, message, group, self.store.query_timeout):
                yield None  # applied before: apply nothing, acknowledge again
                return
            tx = _Transaction(conn, self.store.query_timeout, message)
            try:
                yield tx
            finally:
                tx.ended = True
            await tx.flush()
        if tx.rows:
            self.store.notify()

    @asynccontextmanager
    async def _batch(self, messages: Sequence[Message], group: str = "") -> AsyncIterator[_Batch]:
        async with self.store.transaction("inbox") as conn:
            batch = _Batch(conn, self.store.query_timeout, group)
            yield batch
        if batch.published:
            self.store.notify()


async def _claim(conn: AsyncConn, message: Message, group: str, seconds: float) -> bool:
    """Record ``message``'s id for ``group`` in the open transaction; False if it was
    there before."""
    try:
        params = (message.id, group, message.type, time.time(), message.id)
        return bool(await timed(conn, seconds, _CLAIM_ID, params, what="inbox"))
    except psycopg.Error as exc:
        raise translate(exc, f"inbox: recording message {message.id}") from exc
