"""PostgreSQL plumbing shared by the PostgreSQL adapters: connecting with clear errors,
migrations under an advisory lock, and a group-commit writer.

The writer is the PostgreSQL twin of the SQLite one in spirit, not in code: an
asyncio task owns ONE connection, drains whatever writes have queued, runs each in
its own SAVEPOINT of one transaction, commits once, then resolves every caller. A
failing write rolls back to its savepoint alone. One commit (one WAL flush) serves
the whole batch, and each caller still waits for its own commit.

``PgBatcher`` is the hot-path variant: queued items go to the server in ONE
statement on an autocommit connection (one round trip and one commit per batch,
where a savepoint per write costs three round trips each). The statement - a
server-side function - isolates the items from each other itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

try:
    import psycopg
    from psycopg.pq import TransactionStatus
    from psycopg_pool import AsyncConnectionPool
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("PostgreSQL support needs: pip install 'seamwork[postgres]'") from exc

from seamwork.errors import ConfigError, SeamworkError, StoreError, StoreUnavailable
from seamwork.storage._dsn import without_password
from seamwork.storage._schema import newer_schema

T = TypeVar("T")
Item = TypeVar("Item")
R = TypeVar("R")
log = logging.getLogger("seamwork.storage")
AsyncConn = psycopg.AsyncConnection[Any]
AsyncCursor = psycopg.AsyncCursor[Any]
WriteFn = Callable[[AsyncConn], Awaitable[T]]


@dataclass(frozen=True, slots=True)
class PgMigration:
    """Schema step ``version`` of ``component``: statements run in one transaction."""

    component: str
    version: int
    statements: tuple[str, ...]


async def connect(
    dsn: str, *, autocommit: bool, what: str, within: float | None = None
) -> AsyncConn:
    """Open a connection; an unreachable server is ``StoreUnavailable`` naming ``what``,
    and so is one that does not answer within ``within`` seconds (a stalled server
    would hold the handshake for good)."""
    try:
        async with asyncio.timeout(within):
            return await psycopg.AsyncConnection.connect(dsn, autocommit=autocommit)
    except (psycopg.OperationalError, psycopg.ProgrammingError) as exc:  # down, or a bad DSN
        reason = without_password(str(exc), dsn)
        raise StoreUnavailable(
            f"cannot connect the {what} to PostgreSQL: {reason}".strip()
        ) from exc
    except TimeoutError as exc:
        raise StoreUnavailable(
            f"cannot connect the {what} to PostgreSQL: no answer within {within:g}s"
        ) from exc


def make_pool(dsn: str, *, size: int, name: str) -> AsyncConnectionPool[AsyncConn]:
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ConfigError(f"pool_size must be a whole number >= 1, got {size!r}")
    return AsyncConnectionPool(
        dsn,
        min_size=1,
        max_size=size,
        open=False,
        name=name,
        kwargs={"autocommit": True},
    )


async def open_pool(
    pool: AsyncConnectionPool[AsyncConn], what: str, wait: float = 10.0
) -> AsyncConnectionPool[AsyncConn]:
    """Open a pool like ``pool`` and return it: a new one each time, because a closed
    psycopg pool cannot be opened again, and a store may be (``open()`` after ``aclose()``)."""
    fresh: AsyncConnectionPool[AsyncConn] = AsyncConnectionPool(
        pool.conninfo,
        min_size=pool.min_size,
        max_size=pool.max_size,
        open=False,
        name=pool.name,
        kwargs=pool.kwargs,
    )
    try:
        await fresh.open(wait=True, timeout=wait)
    except Exception as exc:
        await fresh.close()
        conninfo = pool.conninfo if isinstance(pool.conninfo, str) else ""
        reason = without_password(str(exc), conninfo)
        raise StoreUnavailable(f"cannot connect the {what} to PostgreSQL: {reason}") from exc
    return fresh


async def migrate(conn: AsyncConn, migrations: Sequence[PgMigration]) -> None:
    """Apply pending migrations once, even when several processes start together; a
    failure (no privilege to create tables, say) is a ``StoreError`` naming it."""
    try:
        await _migrate(conn, migrations)
    except psycopg.Error as exc:
        names = ", ".join(sorted({m.component for m in migrations}))
        kind = StoreUnavailable if isinstance(exc, psycopg.OperationalError) else StoreError
        reason = exc.diag.message_primary or str(exc).strip()
        raise kind(f"cannot create the {names} schema: {reason}") from exc


async def _migrate(conn: AsyncConn, migrations: Sequence[PgMigration]) -> None:
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext('seamwork_migrations'))")
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS seamwork_migrations ("
            " component TEXT PRIMARY KEY, version INTEGER NOT NULL)"
        )
        cursor = await conn.execute("SELECT component, version FROM seamwork_migrations")
        applied = {row[0]: row[1] for row in await cursor.fetchall()}
        problem = newer_schema(applied, ((m.component, m.version) for m in migrations))
        if problem is not None:
            raise StoreUnavailable(f"cannot open the store: {problem}")
        for migration in migrations:
            if applied.get(migration.component, 0) >= migration.version:
                continue
            for statement in migration.statements:
                await conn.execute(statement.encode())
            await conn.execute(
                "INSERT INTO seamwork_migrations (component, version) VALUES (%s, %s) "
                "ON CONFLICT (component) DO UPDATE SET version = excluded.version",
                (migration.component, migration.version),
            )
            applied[migration.component] = migration.version


def translate(exc: BaseException, what: str) -> BaseException:
    """A seamwork error for a driver error (seamwork errors pass through)."""
    if isinstance(exc, SeamworkError) or not isinstance(exc, psycopg.Error):
        return exc
    if isinstance(exc, psycopg.OperationalError):
        error: StoreError = StoreUnavailable(f"{what}: {exc}")
    else:
        error = StoreError(f"{what}: {exc}")
    error.__cause__ = exc
    return error


_BACKSTOP = 0.25  # seconds past the deadline before a severed statement is cancelled


@contextlib.asynccontextmanager
async def deadline(seconds: float, conns: Sequence[AsyncConn]) -> AsyncIterator[None]:
    """The application deadline: at ``seconds`` the connections in use are severed.

    Not a plain ``asyncio.timeout``: psycopg answers a cancelled query by asking the
    server to cancel it and waiting for that (up to 10 s), so on a stalled server a
    cancellation would hold the deadline hostage. A shut-down socket makes the pending
    read fail at once; the timeout stays as a backstop (waiting for a pooled
    connection, say), and either way the caller sees ``TimeoutError`` (also when the
    code inside already translated the driver's error into ``StoreUnavailable``).
    """
    severed: list[bool] = []
    sever = asyncio.get_running_loop().call_later(seconds, _sever, conns, severed)
    try:
        async with asyncio.timeout(seconds + _BACKSTOP):
            yield
    except (psycopg.OperationalError, StoreUnavailable) as exc:
        if severed:
            raise TimeoutError(f"no answer within {seconds:g}s") from exc
        raise
    finally:
        sever.cancel()


def _sever(conns: Sequence[AsyncConn], severed: list[bool]) -> None:
    if sever(conns):
        severed.append(True)


def sever(conns: Sequence[psycopg.BaseConnection[Any]]) -> bool:
    """Shut the connections' sockets down (a pending read fails at once); any cut?"""
    cut = False
    for conn in conns:
        # Through a duplicate descriptor: the connection's own stays valid (its number
        # is not reused under psycopg's feet) while the socket itself is shut down.
        with contextlib.suppress(Exception), socket.socket(fileno=os.dup(conn.pgconn.socket)) as s:
            s.shutdown(socket.SHUT_RDWR)
            cut = True
    return cut


async def past_dead_connections(attempts: int, call: Callable[[], Awaitable[T]]) -> T:
    """``call()``, tried again at once while it fails on a connection that broke: a pool
    hands out connections that died while idle (a terminated backend, a failover) and
    drops each after its failure, so ``attempts`` - one more than the pool holds -
    reaches a new one. Only for calls safe to repeat (a read; a statement that never
    reached the server); a deadline that passed is not tried again (no time left)."""
    for _ in range(attempts - 1):
        try:
            return await call()
        except StoreUnavailable as exc:
            if not isinstance(exc.__cause__, psycopg.OperationalError):
                raise
    return await call()


def stalled(exc: BaseException, seconds: float) -> BaseException:
    """``StoreUnavailable`` for a deadline that passed (``exc`` a ``TimeoutError``)."""
    if isinstance(exc, TimeoutError):
        error = StoreUnavailable(f"PostgreSQL did not answer within {seconds:g}s")
        error.__cause__ = exc
        return error
    return exc


UNDOABLE = (TransactionStatus.INTRANS, TransactionStatus.INERROR)  # ROLLBACK (TO) ends it


@contextlib.asynccontextmanager
async def pooled_transaction(
    open_store: Callable[[], Awaitable[None]],
    pool_of: Callable[[], AsyncConnectionPool[AsyncConn]],
    seconds: float,
    *,
    attempts: int,
    what: str,
) -> AsyncIterator[AsyncConn]:
    """A pooled connection in a transaction, for a block of the caller's statements.

    The BEGIN goes past pooled connections that died while idle (nothing of the
    caller's has run on them yet). BEGIN, COMMIT and ROLLBACK each run under the
    deadline (``timed``; not the block as a whole): a stalled server fails them with
    ``StoreUnavailable``, the connection is closed - the server rolls back - and the
    pool replaces it. A failure to get the connection or to commit is a ``StoreError``
    naming ``what``; a COMMIT the connection was lost under has an unknown outcome,
    and says so. A failing (or cancelled) block is rolled back, its error raised."""
    await open_store()
    pool = pool_of()  # (after the open: opening a store replaces its pool)
    conn = await past_dead_connections(attempts, lambda: _begin(pool, seconds, what))
    try:
        try:
            yield conn
        except BaseException:
            await _roll_back(conn, seconds, what)
            raise
        try:
            await timed(conn, seconds, b"COMMIT", what=what)
        except psycopg.Error as exc:
            if not conn.broken:
                raise translate(exc, f"{what}: commit failed") from exc
            unknown: Exception = exc
        except StoreUnavailable as exc:
            unknown = exc
        else:
            return
        raise StoreUnavailable(
            f"{what}: the connection was lost during COMMIT ({unknown}); the outcome "
            "is unknown (the transaction may have committed)"
        ) from unknown
    finally:
        await pool.putconn(conn)  # closed, if it broke: the pool drops it


async def _begin(pool: AsyncConnectionPool[AsyncConn], seconds: float, what: str) -> AsyncConn:
    conns: list[AsyncConn] = []
    try:
        async with deadline(seconds, conns):
            conn = await pool.getconn()
            conns.append(conn)
            await conn.execute(b"BEGIN")
            return conn
    except BaseException as exc:
        if conns:
            await pool.putconn(conns[0])
        if isinstance(exc, psycopg.Error | TimeoutError):
            raise translate(stalled(exc, seconds), what) from exc
        raise


async def timed(
    conn: AsyncConn, seconds: float, sql: bytes, params: Sequence[Any] = (), *, what: str
) -> Any:
    """One statement of an open transaction (its rows, if any) under the deadline: on a
    stalled server it fails with ``StoreUnavailable`` and the connection is severed,
    so the transaction ends with it. The driver's own errors pass through."""
    try:
        async with deadline(seconds, [conn]):
            cursor = await conn.execute(sql, tuple(params))
            return await cursor.fetchall() if cursor.description else []
    except TimeoutError as exc:
        raise StoreUnavailable(f"{what}: PostgreSQL did not answer within {seconds:g}s") from exc


async def _roll_back(conn: AsyncConn, seconds: float, what: str) -> None:
    """End ``conn``'s transaction after a failure: ROLLBACK, or - mid-statement (a
    cancelled caller), broken or stalled - close it, which the server rolls back."""
    if conn.info.transaction_status in UNDOABLE:
        try:
            await timed(conn, seconds, b"ROLLBACK", what=what)
            return
        except Exception:
            pass
    await conn.close()


class _QueueOwner(Generic[Item, R]):
    """What both writers share: one connection and one task that drains a queue of
    ``(item, future)`` pairs a batch at a time, reconnecting when the connection broke.
    A subclass says how a batch runs (``_results``: one result or error per item).

    With a ``deadline`` (seconds), each batch and each (re)connection runs under it: a
    stalled server fails the batch with ``StoreUnavailable`` (its outcome unknown) and
    its connection is replaced, instead of holding every later write behind it.

    The batches' deadline is kept by one watchdog timer rather than a timer or two per
    batch (as ``deadline`` sets: a tenth of a small append's client time): a batch notes
    when it started, and the timer, when it fires, sleeps on until the batch then in
    hand is due, severs its connection when it is, and ends it ``_BACKSTOP`` later if
    the cut did not; it stops while no batch runs and the next batch starts it again."""

    _autocommit: bool

    def __init__(
        self, dsn: str, *, name: str, max_batch: int, deadline: float | None = None
    ) -> None:
        self._dsn = dsn
        self._name = name
        self._max_batch = max_batch
        self._write_deadline = deadline
        self._queue: asyncio.Queue[tuple[Item, asyncio.Future[R]]] = asyncio.Queue()
        self._conn: AsyncConn | None = None
        self._task: asyncio.Task[None] | None = None
        self.commits = 0
        self._batch_started: float | None = None  # loop time; None while no batch runs
        self._batch_overdue = False
        self._backstop: asyncio.Timeout | None = None
        self._watchdog: asyncio.TimerHandle | None = None

    @property
    def running(self) -> bool:
        return self._task is not None

    async def _start(self, migrations: Sequence[PgMigration] | None = None) -> None:
        if self._task is not None:
            return
        self._conn = await self._connect()
        try:
            if migrations is not None:
                await migrate(self._conn, migrations)
        except BaseException:
            await self._conn.close()
            self._conn = None
            raise
        self._task = asyncio.create_task(self._serve(), name=f"seamwork-{self._name}-writer")

    async def close(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        while not self._queue.empty():
            _, future = self._queue.get_nowait()
            if not future.done():
                future.set_exception(StoreError(f"{self._name} store closed"))
        if self._conn is not None:
            await self._conn.close()
            self._conn = None

    def _enqueue(self, item: Item) -> asyncio.Future[R]:
        if self._task is None:
            raise StoreError(f"{self._name} store is not open")
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((item, future))
        return future

    async def _serve(self) -> None:
        queue = self._queue
        while True:
            batch = [await queue.get()]
            while len(batch) < self._max_batch and not queue.empty():
                batch.append(queue.get_nowait())
            try:
                await self._run_batch(batch)
            except asyncio.CancelledError:  # closed mid-batch: nobody may wait forever
                _abandon([future for _, future in batch], self._name)
                raise

    async def _run_batch(self, batch: list[tuple[Item, asyncio.Future[R]]]) -> None:
        conn = self._conn
        results: list[R | BaseException]
        try:
            if conn is None or conn.closed:
                raise StoreUnavailable(f"{self._name} writer has no connection")
            results = await self._timed_results(conn, [item for item, _ in batch])
            if any(not isinstance(result, BaseException) for result in results):
                self.commits += 1
        except Exception as exc:
            failure = translate(exc, f"{self._name} store: commit failed")
            results = [failure] * len(batch)
        for (_, future), result in zip(batch, results, strict=True):
            if future.done():
                continue
            if isinstance(result, BaseException):
                future.set_exception(result)
            else:
                future.set_result(result)
        await self._reconnect_if_broken()  # after the callers know: none waits on it

    async def _results(self, conn: AsyncConn, items: list[Item]) -> list[R | BaseException]:
        raise NotImplementedError

    async def _timed_results(self, conn: AsyncConn, items: list[Item]) -> list[R | BaseException]:
        seconds = self._write_deadline
        if seconds is None:
            return await self._results(conn, items)
        loop = asyncio.get_running_loop()
        self._batch_started = started = loop.time()
        self._batch_overdue = False
        if self._watchdog is None:
            self._watchdog = loop.call_at(started + seconds, self._watch, seconds)
        try:
            async with asyncio.timeout(None) as self._backstop:
                return await self._results(conn, items)
        except (psycopg.OperationalError, StoreUnavailable, TimeoutError) as exc:
            if not self._batch_overdue:
                raise
            with contextlib.suppress(Exception):
                await conn.close()  # replaced before the next batch
            raise StoreUnavailable(
                f"{self._name} store: PostgreSQL did not answer within {seconds:g}s; "
                "the outcome is unknown (the write may still commit)"
            ) from exc
        finally:
            self._batch_started = self._backstop = None

    def _watch(self, seconds: float) -> None:
        """The watchdog's round (see the class docstring)."""
        self._watchdog = None
        started = self._batch_started
        if started is None:
            return
        loop = asyncio.get_running_loop()
        due = started + seconds
        if loop.time() < due:  # a later batch than the one it was set for
            self._watchdog = loop.call_at(due, self._watch, seconds)
        elif not self._batch_overdue:
            self._batch_overdue = True
            if self._conn is not None:
                sever([self._conn])  # the pending read fails at once
            self._watchdog = loop.call_at(due + _BACKSTOP, self._watch, seconds)
        elif self._backstop is not None:
            self._backstop.reschedule(loop.time())  # the batch ends with TimeoutError

    async def _connect(self) -> AsyncConn:
        what = f"{self._name} writer"
        return await connect(
            self._dsn, autocommit=self._autocommit, what=what, within=self._write_deadline
        )

    async def _reconnect_if_broken(self) -> None:
        if self._conn is not None and not self._conn.closed:
            return
        log.warning("%s writer lost its connection; reconnecting", self._name)
        try:
            self._conn = await self._connect()
        except StoreUnavailable:
            log.exception(
                "%s writer could not reconnect; the next write will try again", self._name
            )


class PgWriter(_QueueOwner[WriteFn[Any], Any]):
    """One connection, one task, group commit (see the module docstring)."""

    _autocommit = False

    def __init__(
        self, dsn: str, *, name: str, max_batch: int = 256, deadline: float | None = None
    ) -> None:
        super().__init__(dsn, name=name, max_batch=max_batch, deadline=deadline)

    async def start(self, migrations: Sequence[PgMigration] = ()) -> None:
        await self._start(migrations)

    def write(self, fn: WriteFn[T]) -> asyncio.Future[T]:
        """Run ``fn(conn)`` in a transaction; the future resolves after its commit."""
        return self._enqueue(fn)

    async def _results(self, conn: AsyncConn, fns: list[WriteFn[Any]]) -> list[Any]:
        if len(fns) > 1:  # a SAVEPOINT each: a failing write rolls back alone
            async with conn.transaction():
                return [await self._in_savepoint(conn, fn) for fn in fns]
        try:
            async with conn.transaction():
                return [await fns[0](conn)]
        except psycopg.OperationalError:
            raise
        except Exception as exc:  # its own failure, not the connection's
            return [translate(exc, f"{self._name} store")]

    async def _in_savepoint(self, conn: AsyncConn, fn: WriteFn[Any]) -> Any:
        try:
            async with conn.transaction():
                return await fn(conn)
        except psycopg.OperationalError:
            raise
        except Exception as exc:
            return translate(exc, f"{self._name} store")


RunBatch = Callable[[AsyncCursor, list[Item]], Awaitable[list[R | BaseException]]]


class PgBatcher(_QueueOwner[Item, R]):
    """One autocommit connection, one task: ``run(cursor, items)`` handles every queued
    item in one statement and returns a result or an exception per item, in order.
    The cursor is the connection's one, kept from batch to batch (making one for each
    statement cost about a tenth of a small append's client CPU time).

    Args:
        max_batch: most items per statement. Each item usually runs in a server-side
            subtransaction; PostgreSQL caches 64 subtransaction ids per backend, and
            past that every snapshot in the cluster gets slower, so stay at 64.
    """

    _autocommit = True

    def __init__(
        self,
        dsn: str,
        run: RunBatch[Item, R],
        *,
        name: str,
        max_batch: int = 64,
        deadline: float | None = None,
    ) -> None:
        super().__init__(dsn, name=name, max_batch=max_batch, deadline=deadline)
        self._run = run
        self._cursor: AsyncCursor | None = None

    async def start(self) -> None:
        await self._start()

    def submit(self, item: Item) -> asyncio.Future[R]:
        """Queue ``item``; the future resolves after the commit of its batch."""
        return self._enqueue(item)

    async def _results(self, conn: AsyncConn, items: list[Item]) -> list[R | BaseException]:
        cursor = self._cursor
        if cursor is None or cursor.connection is not conn:  # a new connection
            cursor = self._cursor = conn.cursor()
        return await self._run(cursor, items)


def _abandon(futures: list[asyncio.Future[Any]], name: str) -> None:
    for future in futures:
        if not future.done():
            future.set_exception(StoreUnavailable(f"{name} store closed; the outcome is unknown"))
