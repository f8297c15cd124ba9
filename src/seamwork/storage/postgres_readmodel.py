"""Read models in PostgreSQL: a projection's tables, its checkpoint and its dead letters
in one database, written in one transaction per page of events (exactly-once effect).

Handlers are plain synchronous functions (``def on_created(self, event, conn)``), so
they get a synchronous ``psycopg.Connection`` and run on a worker thread, one page at
a time: ``conn.execute("INSERT ... VALUES (%s, %s)", (...))`` inside the transaction
that also moves the checkpoint. Each event runs in its own savepoint, so a failing
handler parks its stream without undoing the rest of the page.
"""

from __future__ import annotations

import asyncio
import builtins
import math
import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Collection, Sequence
from typing import Any, TypeVar

try:
    import psycopg
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("PostgreSQL support needs: pip install 'seamwork[postgres]'") from exc

from seamwork._core.lifecycle import OpenClose
from seamwork.errors import ConfigError, StoreUnavailable
from seamwork.events._model import RecordedEvent
from seamwork.events._projection import BatchResult, ParkedEvent, Projection
from seamwork.storage._dsn import without_password
from seamwork.storage._pg import sever, translate
from seamwork.storage._readmodel import PageSQL, apply_page, replay_stream

T = TypeVar("T")
SyncConn = psycopg.Connection[Any]

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS seamwork_checkpoints (
        projection text PRIMARY KEY,
        position bigint NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS seamwork_parked (
        projection text NOT NULL,
        stream text NOT NULL,
        position bigint NOT NULL,
        event_type text NOT NULL,
        error text,
        parked_at double precision NOT NULL,
        PRIMARY KEY (projection, stream, position)
    )""",
)
_SQL = PageSQL("%s", lock_checkpoint=" FOR UPDATE")  # replicas serialise on the row


class PostgresReadModel(OpenClose):
    """``ReadModelStore`` in PostgreSQL (tables go to the connection's schema).

    Args:
        dsn: a libpq connection string.
        query_timeout: the application deadline, in seconds, of each statement - the
            read model's own and the handlers' - and of connecting: a statement in
            progress on a connection where nothing moved, either way, for this long
            (a stalled server or network) is cut, the call fails with
            ``StoreUnavailable`` (a page then applied or not: the checkpoint says) and
            the connection is replaced. Seen through the socket's TCP counters, so on
            Linux over TCP; elsewhere only connecting is bounded.
    """

    def __init__(self, dsn: str, *, query_timeout: float = 5.0) -> None:
        if not query_timeout > 0:
            raise ConfigError(f"query_timeout must be > 0 seconds, got {query_timeout!r}")
        self._dsn = dsn
        self._deadline = query_timeout
        self._conn: SyncConn | None = None
        self._lock = threading.Lock()
        self._cut = False  # the watch cut the connection of the transaction in flight

    def __repr__(self) -> str:
        return "PostgresReadModel(...)"

    async def open(self) -> None:
        if self._conn is None:
            self._conn = await asyncio.to_thread(self._connect)

    async def aclose(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            await asyncio.to_thread(conn.close)

    async def query(self, sql: str, params: Sequence[object] = ()) -> builtins.list[dict[str, Any]]:
        """Run a read-only query against the read model (rows as dicts)."""

        def run(conn: SyncConn) -> builtins.list[dict[str, Any]]:
            cursor = conn.execute(sql.encode(), tuple(params))
            names = [column.name for column in cursor.description or ()]
            return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]

        return await self._run(run)

    async def setup(self, projection: Projection) -> tuple[int, set[str]]:
        name = projection.name

        def setup(conn: SyncConn) -> tuple[int, set[str]]:
            # Replicas may start together: DDL under one lock, then a checkpoint row
            # that every page locks (FOR UPDATE) so two never apply the same events.
            conn.execute("SELECT pg_advisory_xact_lock(hashtext('seamwork.readmodel'))")
            for statement in _SCHEMA:
                conn.execute(statement.encode())
            projection.setup(conn)
            conn.execute(
                "INSERT INTO seamwork_checkpoints (projection, position) VALUES (%s, 0) "
                "ON CONFLICT DO NOTHING",
                (name,),
            )
            row = conn.execute(
                "SELECT position FROM seamwork_checkpoints WHERE projection = %s", (name,)
            ).fetchone()
            parked = conn.execute(
                "SELECT DISTINCT stream FROM seamwork_parked WHERE projection = %s", (name,)
            ).fetchall()
            return (0 if row is None else int(row[0]), {r[0] for r in parked})

        return await self._run(setup)

    async def apply_batch(
        self,
        projection: Projection,
        events: Sequence[RecordedEvent],
        parked: Collection[str],
        *,
        after: int | None = None,
    ) -> BatchResult:
        now = time.time()

        def page(conn: SyncConn) -> BatchResult:
            self._wait_for_checkpoint(conn, projection.name)
            return apply_page(conn, _SQL, _apply_in_savepoint, projection, events, now, after)

        return await self._run(page)

    async def reset(self, projection: Projection) -> None:
        name = projection.name

        def reset(conn: SyncConn) -> None:
            # First: the checkpoint row is what pages lock (fence on), so a page in
            # flight commits before the read model is emptied. It is kept, at 0.
            self._wait_for_checkpoint(conn, name)
            conn.execute(_SQL.reset_checkpoint, (name,))
            projection.reset(conn)
            conn.execute("DELETE FROM seamwork_parked WHERE projection = %s", (name,))

        await self._run(reset)

    async def parked(self, projection: str) -> builtins.list[ParkedEvent]:
        def read(conn: SyncConn) -> builtins.list[ParkedEvent]:
            rows = conn.execute(
                "SELECT projection, stream, position, event_type, error, parked_at "
                "FROM seamwork_parked WHERE projection = %s ORDER BY stream, position",
                (projection,),
            ).fetchall()
            return [ParkedEvent(*row) for row in rows]

        return await self._run(read)

    async def replay(
        self, projection: Projection, stream: str, events: Sequence[RecordedEvent]
    ) -> int:
        def replay(conn: SyncConn) -> int:
            self._wait_for_checkpoint(conn, projection.name)
            return replay_stream(conn, _SQL, _apply_in_savepoint, projection, stream, events)

        return await self._run(replay)

    # --- plumbing ----------------------------------------------------------------------

    def _wait_for_checkpoint(self, conn: SyncConn, name: str) -> None:
        """Lock the projection's checkpoint row, waiting for as long as another
        replica's page holds it, in rounds of a quarter of the deadline: a lock wait
        is quiet on the socket, and the stall watch would take one longer than the
        deadline for a server that does not answer and cut it."""
        rounds = max(1, math.ceil(self._deadline * 250))  # ms
        while True:
            try:
                with conn.transaction():
                    conn.execute(f"SET LOCAL lock_timeout = {rounds}".encode())
                    conn.execute(_SQL.checkpoint.encode(), (name,))
            except psycopg.errors.LockNotAvailable:
                continue  # the other page goes on: wait another round
            conn.execute(b"SET LOCAL lock_timeout TO DEFAULT")
            return

    def _connect(self) -> SyncConn:
        # a stalled server would hold the handshake, and the read model, for good
        timeout = max(2, math.ceil(self._deadline))  # libpq's: whole seconds, at least 2
        try:
            return psycopg.connect(self._dsn, autocommit=True, connect_timeout=timeout)
        except (psycopg.OperationalError, psycopg.ProgrammingError) as exc:  # down, a bad DSN
            reason = without_password(str(exc), self._dsn)
            raise StoreUnavailable(
                f"cannot connect the read model to PostgreSQL: {reason}"
            ) from exc

    async def _run(self, fn: Callable[[SyncConn], T]) -> T:
        """Run ``fn`` in one transaction on the worker thread, watched: every quarter of
        the deadline, a connection whose statement has had nothing move for the whole
        deadline is cut (its socket shut down: the blocked call fails at once)."""
        if self._conn is None:
            await self.open()
        work = asyncio.ensure_future(asyncio.to_thread(self._transact, fn))
        while not (await asyncio.wait({work}, timeout=self._deadline / 4))[0]:
            conn = self._conn
            if conn is not None and _stalled(conn, self._deadline):
                self._cut = True
                sever([conn])
        return work.result()

    def _transact(self, fn: Callable[[SyncConn], T]) -> T:
        """``fn`` in one transaction. A connection the server killed while idle (a
        failover, an idle timeout) fails the BEGIN, before anything of ``fn`` ran: the
        transaction then starts again on a new connection, once."""
        with self._lock:  # one transaction at a time on the connection
            for again in (True, False):
                self._cut = False
                conn = self._conn
                if conn is None or conn.closed:
                    conn = self._conn = self._connect()
                begun = False
                try:
                    with conn.transaction():
                        begun = True
                        return fn(conn)
                except psycopg.Error as exc:
                    if self._cut:
                        conn.close()
                        raise StoreUnavailable(
                            f"read model: PostgreSQL did not answer within {self._deadline:g}s; "
                            "the connection is replaced (a page's outcome is unknown)"
                        ) from exc
                    if again and not begun and conn.closed:
                        continue
                    raise translate(exc, "read model") from exc
            raise AssertionError("unreachable")  # pragma: no cover


def _stalled(conn: SyncConn, seconds: float) -> bool:
    """A statement is in progress on ``conn`` and nothing has moved on its socket, either
    way, for ``seconds`` (Linux ``TCP_INFO``; False where that cannot be seen)."""
    option = getattr(socket, "TCP_INFO", None)
    if option is None or conn.closed:
        return False
    if conn.pgconn.transaction_status != psycopg.pq.TransactionStatus.ACTIVE:
        return False
    try:
        with socket.socket(fileno=os.dup(conn.pgconn.socket)) as sock:
            info = sock.getsockopt(socket.IPPROTO_TCP, option, 64)
    except (OSError, psycopg.Error):  # not TCP (a Unix socket), or closed meanwhile
        return False
    if len(info) < 56:
        return False
    # struct tcp_info: tcpi_last_data_sent at byte 44, tcpi_last_data_recv at 52 (ms)
    sent, _, received = struct.unpack_from("=III", info, 44)
    return bool(min(sent, received) >= seconds * 1000)


class _WentOnAfterError(Exception):
    """A handler caught a database error and returned: PostgreSQL refuses every later
    statement of the transaction, so the event cannot be applied as the handler meant."""


def _apply_in_savepoint(conn: SyncConn, projection: Projection, event: RecordedEvent) -> str | None:
    """Apply one event; on error roll back just its writes and say why."""
    try:
        with conn.transaction():
            projection.apply(event, conn)
            if conn.info.transaction_status == psycopg.pq.TransactionStatus.INERROR:
                # left as is, the savepoint's release - and the whole page - would fail,
                # on every retry: the projection would stop for good
                raise _WentOnAfterError(
                    "the handler went on after a database error, which aborts the "
                    "transaction on PostgreSQL; its writes are rolled back (catch such "
                    "an error inside its own savepoint: `with conn.transaction():`)"
                )
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None
