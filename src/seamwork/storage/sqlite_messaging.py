"""Outbox and inbox in a service's own SQLite database.

Both live in the service's file beside its tables and share one writer, so a
handler's effects, the id of the message it handled and the messages it sends next
commit together. Transactions are interactive sessions on the writer thread (see
``_sqlite_session``); the inbox check and the final inserts ride on the session's
first and last round trip.

A batch of inbox messages shares one session: the ids already handled are read
when it opens, each message runs inside a savepoint opened by its first statement
(released by the next message's first statement, or at commit), and the handled
ids and queued messages are inserted by the last round trip. The handlers'
statements run on the event loop's thread while the writer thread is parked in the
session (``Session.run_here``): a batch costs two round trips, not two per message.
"""

from __future__ import annotations

import builtins
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from seamwork._core.wakeup import Wakeup
from seamwork.errors import StoreError
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
from seamwork.storage._sqlite_session import Session, in_session, session
from seamwork.storage._sqlite_writer import Migration, SQLiteWriter, Synchronous

MESSAGING_MIGRATIONS = (
    Migration(
        "messaging",
        1,
        (
            """CREATE TABLE seamwork_outbox (
                seq INTEGER PRIMARY KEY,
                id TEXT NOT NULL UNIQUE,
                subject TEXT NOT NULL,
                type TEXT NOT NULL,
                data TEXT NOT NULL,
                correlation_id TEXT,
                causation_id TEXT,
                headers TEXT NOT NULL,
                created_at REAL NOT NULL,
                sent_at REAL
            )""",
            "CREATE INDEX seamwork_outbox_pending ON seamwork_outbox(seq) WHERE sent_at IS NULL",
            "CREATE INDEX seamwork_outbox_sent ON seamwork_outbox(sent_at) "
            "WHERE sent_at IS NOT NULL",
            """CREATE TABLE seamwork_inbox (
                id TEXT PRIMARY KEY,
                type TEXT NOT NULL,
                received_at REAL NOT NULL
            ) WITHOUT ROWID""",
        ),
    ),
    # a message the broker refuses for good is parked: kept, out of the pending ones
    Migration(
        "messaging",
        2,
        (
            "ALTER TABLE seamwork_outbox ADD COLUMN parked_at REAL",
            "ALTER TABLE seamwork_outbox ADD COLUMN park_error TEXT",
            "DROP INDEX seamwork_outbox_pending",
            "CREATE INDEX seamwork_outbox_pending ON seamwork_outbox(seq) "
            "WHERE sent_at IS NULL AND parked_at IS NULL",
            "CREATE INDEX seamwork_outbox_parked ON seamwork_outbox(seq) "
            "WHERE parked_at IS NOT NULL",
        ),
    ),
    # handled ids are recorded per consumer group: keyed by id alone, a second group of
    # the service on the same subject found the first group's record and applied nothing
    # (ids recorded before, under the group '' no broker gives, count for every group)
    Migration(
        "messaging",
        3,
        (
            """CREATE TABLE seamwork_inbox_v3 (
                id TEXT NOT NULL,
                consumer_group TEXT NOT NULL,
                type TEXT NOT NULL,
                received_at REAL NOT NULL,
                PRIMARY KEY (id, consumer_group)
            ) WITHOUT ROWID""",
            "INSERT INTO seamwork_inbox_v3 (id, consumer_group, type, received_at) "
            "SELECT id, '', type, received_at FROM seamwork_inbox",
            "DROP TABLE seamwork_inbox",
            "ALTER TABLE seamwork_inbox_v3 RENAME TO seamwork_inbox",
        ),
    ),
)

_INSERT_INBOX = (
    "INSERT INTO seamwork_inbox (id, consumer_group, type, received_at) VALUES (?, ?, ?, ?)"
)
_OF_GROUP = "consumer_group IN (?, '')"
"""Ids handled by a group (``?``): its own, and those recorded before groups were."""
_IDS_PER_STATEMENT = 500  # under every SQLite build's parameter limit (999 at the least)
_INSERT_OUTBOX = (
    "INSERT INTO seamwork_outbox (id, subject, type, data, correlation_id, causation_id, "
    "headers, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
)
_PENDING = "sent_at IS NULL AND parked_at IS NULL"
"""Rows the relay has still to publish (the predicate of the pending index)."""
_ROW = "seq, id, subject, type, data, correlation_id, causation_id, headers"
"""An outbox row as ``read_row`` takes it."""
_CHUNK = 500
"""Ids per ``IN (...)`` (SQLite's default limit of host parameters is far above)."""
Row = tuple[Any, ...]


def _insert_outbox(conn: sqlite3.Connection, rows: Sequence[Row]) -> None:
    """Insert outbox rows; a message id the outbox holds already is named."""
    changes = conn.total_changes
    try:
        conn.executemany(_INSERT_OUTBOX, rows)
    except sqlite3.IntegrityError as exc:  # the rows before the failing one went in
        failing = rows[min(conn.total_changes - changes, len(rows) - 1)]
        raise StoreError(id_taken(failing[0])) from exc


class SQLiteMessageStore:
    """The service database's writer, shared by its outbox and inbox."""

    def __init__(
        self, path: str | Path, *, synchronous: Synchronous = "full", create: bool = True
    ) -> None:
        self.path = str(path)
        self.writer = SQLiteWriter(
            path,
            synchronous=synchronous,
            migrations=MESSAGING_MIGRATIONS,
            name="messaging",
            create=create,
        )
        self._wakeup = Wakeup()

    async def open(self) -> None:
        await self.writer.start()

    async def aclose(self) -> None:
        await self.writer.close()

    async def ensure_open(self) -> None:
        if not self.writer.running:
            await self.open()

    def notify(self) -> None:
        self._wakeup.notify()

    async def wait(self, max_wait: float) -> None:
        await self._wakeup.wait(max_wait)

    def check_free(self) -> None:
        if in_session(self.writer):
            raise StoreError(
                f"{self.path}: use the open transaction (tx) here, not the outbox or inbox"
            )


class _Transaction:
    """``Transaction`` on an open session: statements go through, messages are queued
    and inserted by the session's last round trip. ``cause``: the message an inbox
    handler is handling (its follow-ups join its flow)."""

    def __init__(self, session: Session, cause: Message | None = None) -> None:
        self._session = session
        self.cause = cause
        self.rows: list[Row] = []
        self.ended = False

    async def execute(self, sql: str, params: Sequence[Any] = ()) -> builtins.list[Row]:
        check_open(self.ended)
        return await self._session.execute(sql, params)

    async def publish(self, subject: str, message: Message) -> None:
        check_open(self.ended)
        self.rows.append(outbox_row(subject, message, self.cause))


class SQLiteOutbox(Outbox):
    """``Outbox`` in a SQLite file; ``Outbox.sqlite(path)`` builds one."""

    def __init__(self, store: SQLiteMessageStore) -> None:
        self.store = store

    @classmethod
    def open_path(
        cls, path: str | Path, *, synchronous: Synchronous = "full", create: bool = True
    ) -> SQLiteOutbox:
        """``create=False``: the file must hold the outbox and inbox already (nothing
        is created or changed - for tools such as the CLI)."""
        return cls(SQLiteMessageStore(path, synchronous=synchronous, create=create))

    def __repr__(self) -> str:
        return f"SQLiteOutbox({self.store.path!r})"

    def inbox(self) -> SQLiteInbox:
        return SQLiteInbox(self.store)

    async def open(self) -> None:
        await self.store.open()

    async def aclose(self) -> None:
        await self.store.aclose()

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[_Transaction]:
        await self.store.ensure_open()
        holder: list[_Transaction] = []

        def insert(conn: sqlite3.Connection) -> None:
            if holder and holder[0].rows:
                _insert_outbox(conn, holder[0].rows)

        async with session(self.store.writer, on_commit=insert) as open_session:
            tx = _Transaction(open_session)
            holder.append(tx)
            try:
                yield tx
            finally:
                tx.ended = True
        if tx.rows:
            self.store.notify()

    async def pending(self, limit: int) -> builtins.list[OutboxRecord]:
        return readable(await self._pending_rows(limit))

    async def _pending_rows(self, limit: int) -> builtins.list[OutboxRecord | UnreadableRow]:
        self.store.check_free()
        await self.store.ensure_open()
        rows = await self.store.writer.read(
            lambda conn: conn.execute(
                f"SELECT {_ROW} FROM seamwork_outbox WHERE {_PENDING} ORDER BY seq LIMIT ?",
                (limit,),
            ).fetchall()
        )
        return [read_row(row) for row in rows]

    async def mark_sent(self, seqs: Collection[int]) -> None:
        self.store.check_free()
        ordered = sorted(seqs)
        if not ordered:
            return
        now = time.time()

        def mark(conn: sqlite3.Connection) -> None:
            # in chunks: a page past the build's parameter limit (32,766 in some) was
            # published, then never marked, and sent again at every drain
            for start in range(0, len(ordered), _IDS_PER_STATEMENT):
                chunk = ordered[start : start + _IDS_PER_STATEMENT]
                conn.execute(
                    "UPDATE seamwork_outbox SET sent_at = ?, parked_at = NULL, park_error = NULL "
                    f"WHERE seq BETWEEN ? AND ? AND seq IN ({','.join('?' * len(chunk))})",
                    (now, chunk[0], chunk[-1], *chunk),
                )

        await self.store.writer.write(mark)

    async def pending_count(self) -> int:
        self.store.check_free()
        await self.store.ensure_open()
        row = await self.store.writer.read(
            lambda conn: conn.execute(
                f"SELECT count(*) FROM seamwork_outbox WHERE {_PENDING}"
            ).fetchone()
        )
        return int(row[0])

    async def purge_sent(self, older_than: float) -> int:
        self.store.check_free()
        cursor = await self.store.writer.write(
            lambda conn: conn.execute(
                "DELETE FROM seamwork_outbox WHERE sent_at IS NOT NULL AND sent_at < ?",
                (older_than,),
            )
        )
        return int(cursor.rowcount)

    async def resend_since(self, since: float) -> int:
        self.store.check_free()
        cursor = await self.store.writer.write(
            lambda conn: conn.execute(
                "UPDATE seamwork_outbox SET sent_at = NULL WHERE sent_at >= ?", (since,)
            )
        )
        self.store.notify()
        return int(cursor.rowcount)

    async def wait_for_messages(self, max_wait: float) -> None:
        await self.store.wait(max_wait)

    async def park(self, seq: int, error: str) -> None:
        self.store.check_free()
        await self.store.ensure_open()
        await self.store.writer.write(
            lambda conn: conn.execute(
                "UPDATE seamwork_outbox SET parked_at = ?, park_error = ? "
                "WHERE seq = ? AND sent_at IS NULL",
                (time.time(), error, seq),
            )
        )

    async def parked(self, *, limit: int = 100) -> builtins.list[ParkedMessage]:
        check_limit(limit)
        self.store.check_free()
        await self.store.ensure_open()
        rows = await self.store.writer.read(
            lambda conn: conn.execute(
                f"SELECT {_ROW}, park_error, parked_at FROM seamwork_outbox "
                "WHERE parked_at IS NOT NULL ORDER BY seq LIMIT ?",
                (limit,),
            ).fetchall()
        )
        return [parked_message(row) for row in rows]

    async def requeue(self, ids: Collection[str]) -> int:
        count = await self._on_parked(
            ids,
            "UPDATE seamwork_outbox SET parked_at = NULL, park_error = NULL "
            "WHERE parked_at IS NOT NULL AND id IN",
        )
        if count:
            self.store.notify()
        return count

    async def discard(self, ids: Collection[str]) -> int:
        return await self._on_parked(
            ids, "DELETE FROM seamwork_outbox WHERE parked_at IS NOT NULL AND id IN"
        )

    async def _on_parked(self, ids: Collection[str], statement: str) -> int:
        """Run ``statement (ids)`` on the parked messages ``ids`` in one transaction,
        or on none if one of them is not parked."""
        wanted = check_ids(ids)
        self.store.check_free()
        await self.store.ensure_open()
        if not wanted:
            return 0
        chunks = [wanted[i : i + _CHUNK] for i in range(0, len(wanted), _CHUNK)]

        def run(conn: sqlite3.Connection) -> int:
            found: set[str] = set()
            for chunk in chunks:
                marks = ",".join("?" * len(chunk))
                found.update(
                    row[0]
                    for row in conn.execute(
                        "SELECT id FROM seamwork_outbox "
                        f"WHERE parked_at IS NOT NULL AND id IN ({marks})",
                        chunk,
                    )
                )
            if len(found) < len(wanted):
                raise not_parked(wanted, found)
            for chunk in chunks:
                conn.execute(f"{statement} ({','.join('?' * len(chunk))})", chunk)
            return len(found)

        return await self.store.writer.write(run)


class SQLiteInbox(Inbox):
    """``Inbox`` in a SQLite file; ``Inbox.sqlite(path)`` or ``Inbox.of(outbox)``."""

    def __init__(self, store: SQLiteMessageStore) -> None:
        self.store = store

    @classmethod
    def open_path(
        cls, path: str | Path, *, synchronous: Synchronous = "full", create: bool = True
    ) -> SQLiteInbox:
        """``create=False``: the file must hold the outbox and inbox already (nothing
        is created or changed - for tools such as the CLI)."""
        return cls(SQLiteMessageStore(path, synchronous=synchronous, create=create))

    def __repr__(self) -> str:
        return f"SQLiteInbox({self.store.path!r})"

    async def open(self) -> None:
        await self.store.open()

    async def aclose(self) -> None:
        await self.store.aclose()

    async def seen(self, message_id: str) -> bool:
        self.store.check_free()
        await self.store.ensure_open()
        row = await self.store.writer.read(
            lambda conn: conn.execute(
                "SELECT 1 FROM seamwork_inbox WHERE id = ?", (message_id,)
            ).fetchone()
        )
        return row is not None

    @asynccontextmanager
    async def _transaction(
        self, message: Message, group: str = ""
    ) -> AsyncIterator[_Transaction | None]:
        await self.store.ensure_open()
        holder: list[_Transaction] = []

        def seen(conn: sqlite3.Connection) -> bool:
            query = f"SELECT 1 FROM seamwork_inbox WHERE id = ? AND {_OF_GROUP}"
            return conn.execute(query, (message.id, group)).fetchone() is not None

        def record(conn: sqlite3.Connection) -> None:
            if not holder:
                return
            conn.execute(_INSERT_INBOX, (message.id, group, message.type, time.time()))
            if holder[0].rows:
                _insert_outbox(conn, holder[0].rows)

        async with session(self.store.writer, on_open=seen, on_commit=record) as open_session:
            if open_session.opening:
                yield None  # handled before: apply nothing, ack again
                return
            tx = _Transaction(open_session, message)
            holder.append(tx)
            try:
                yield tx
            finally:
                tx.ended = True
        if tx.rows:
            self.store.notify()

    @asynccontextmanager
    async def _batch(
        self, messages: Sequence[Message], group: str = ""
    ) -> AsyncIterator[_InboxBatch]:
        await self.store.ensure_open()
        ids = [m.id for m in messages]
        holder: list[_InboxBatch] = []

        def seen(conn: sqlite3.Connection) -> set[str]:
            found: set[str] = set()
            for start in range(0, len(ids), 500):
                chunk = ids[start : start + 500]
                marks = ",".join("?" * len(chunk))
                query = f"SELECT id FROM seamwork_inbox WHERE {_OF_GROUP} AND id IN ({marks})"
                found.update(row[0] for row in conn.execute(query, (group, *chunk)))
            return found

        def record(conn: sqlite3.Connection) -> None:
            if holder:
                holder[0].finish(conn)

        async with session(self.store.writer, on_open=seen, on_commit=record) as open_session:
            batch = _InboxBatch(open_session, open_session.opening, group)
            holder.append(batch)
            yield batch
        if batch.outbox_rows:
            self.store.notify()


class _InboxBatch:
    """``InboxBatch`` on an open session: one savepoint per applied message."""

    def __init__(self, session: Session, seen: set[str], group: str) -> None:
        self._session = session
        self._seen = seen
        self._group = group
        self._savepoint = False
        """A savepoint of an earlier message is still open (released lazily)."""
        self.inbox_rows: list[Row] = []
        self.outbox_rows: list[Row] = []

    async def apply(
        self, message: Message, fn: Callable[[Message, Transaction], Awaitable[None]]
    ) -> BaseException | None:
        if message.id in self._seen:
            return None
        tx = _SavepointTransaction(self, message)
        try:
            await fn(message, tx)
        except Exception as exc:
            if tx.opened:
                self._session.run_here(_rollback_savepoint)
                self._savepoint = False
            return exc
        finally:
            tx.ended = True  # a task it left running must not write into the next message
        self._seen.add(message.id)
        self.inbox_rows.append((message.id, self._group, message.type, time.time()))
        self.outbox_rows.extend(tx.rows)
        return None

    async def first(self, sql: str, params: Sequence[Any]) -> builtins.list[Row]:
        """A message's first statement, opening its savepoint in the same round trip."""
        release = self._savepoint
        self._savepoint = True

        def run(conn: sqlite3.Connection) -> builtins.list[Row]:
            if release:
                conn.execute("RELEASE seamwork_message")
            conn.execute("SAVEPOINT seamwork_message")
            return conn.execute(sql, tuple(params)).fetchall()

        return self._session.run_here(run)

    async def execute(self, sql: str, params: Sequence[Any]) -> builtins.list[Row]:
        return self._session.run_here(lambda conn: conn.execute(sql, tuple(params)).fetchall())

    def finish(self, conn: sqlite3.Connection) -> None:
        """On the writer thread, last: release the savepoint, record ids and messages."""
        if self._savepoint:
            conn.execute("RELEASE seamwork_message")
        if self.inbox_rows:
            conn.executemany(_INSERT_INBOX, self.inbox_rows)
        if self.outbox_rows:
            _insert_outbox(conn, self.outbox_rows)


class _SavepointTransaction(_Transaction):
    """The ``tx`` of one message in a batch: its first statement opens its savepoint."""

    def __init__(self, batch: _InboxBatch, cause: Message) -> None:
        self.cause = cause
        self.rows: list[Row] = []
        self.ended = False
        self._batch = batch
        self.opened = False

    async def execute(self, sql: str, params: Sequence[Any] = ()) -> builtins.list[Row]:
        check_open(self.ended)
        if self.opened:
            return await self._batch.execute(sql, params)
        self.opened = True
        return await self._batch.first(sql, params)


def _rollback_savepoint(conn: sqlite3.Connection) -> None:
    conn.execute("ROLLBACK TO seamwork_message")
    conn.execute("RELEASE seamwork_message")
