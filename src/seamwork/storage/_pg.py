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
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

try:
    import psycopg
    from psycopg_pool import AsyncConnectionPool
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("PostgreSQL support needs: pip install 'seamwork[postgres]'") from exc

from seamwork.errors import SeamworkError, StoreError, StoreUnavailable

T = TypeVar("T")
Item = TypeVar("Item")
R = TypeVar("R")
log = logging.getLogger("seamwork.storage")
AsyncConn = psycopg.AsyncConnection[Any]
WriteFn = Callable[[AsyncConn], Awaitable[T]]


@dataclass(frozen=True, slots=True)
class PgMigration:
    """Schema step ``version`` of ``component``: statements run in one transaction."""

    component: str
    version: int
    statements: tuple[str, ...]


async def connect(dsn: str, *, autocommit: bool, what: str) -> AsyncConn:
    """Open a connection; an unreachable server is ``StoreUnavailable`` naming ``what``."""
    try:
        return await psycopg.AsyncConnection.connect(dsn, autocommit=autocommit)
    except (psycopg.OperationalError, psycopg.ProgrammingError) as exc:  # down, or a bad DSN
        raise StoreUnavailable(f"cannot connect the {what} to PostgreSQL: {exc}".strip()) from exc


def make_pool(dsn: str, *, size: int, name: str) -> AsyncConnectionPool[AsyncConn]:
    return AsyncConnectionPool(
        dsn,
        min_size=1,
        max_size=size,
        open=False,
        name=name,
        kwargs={"autocommit": True},
    )


async def open_pool(pool: AsyncConnectionPool[AsyncConn], what: str, wait: float = 10.0) -> None:
    try:
        await pool.open(wait=True, timeout=wait)
    except Exception as exc:
        await pool.close()
        raise StoreUnavailable(f"cannot connect the {what} to PostgreSQL: {exc}") from exc


async def migrate(conn: AsyncConn, migrations: Sequence[PgMigration]) -> None:
    """Apply pending migrations once, even when several processes start together."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext('seamwork_migrations'))")
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS seamwork_migrations ("
            " component TEXT PRIMARY KEY, version INTEGER NOT NULL)"
        )
        cursor = await conn.execute("SELECT component, version FROM seamwork_migrations")
        applied = {row[0]: row[1] for row in await cursor.fetchall()}
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


class _Op:
    __slots__ = ("fn", "future")

    def __init__(self, fn: WriteFn[Any], future: asyncio.Future[Any]) -> None:
        self.fn = fn
        self.future = future


class PgWriter:
    """One connection, one task, group commit (see the module docstring)."""

    def __init__(self, dsn: str, *, name: str, max_batch: int = 256) -> None:
        self._dsn = dsn
        self._name = name
        self._max_batch = max_batch
        self._queue: asyncio.Queue[_Op] = asyncio.Queue()
        self._conn: AsyncConn | None = None
        self._task: asyncio.Task[None] | None = None
        self.commits = 0

    @property
    def running(self) -> bool:
        return self._task is not None

    async def start(self, migrations: Sequence[PgMigration] = ()) -> None:
        if self._task is not None:
            return
        self._conn = await connect(self._dsn, autocommit=False, what=f"{self._name} writer")
        try:
            await migrate(self._conn, migrations)
        except BaseException:
            await self._conn.close()
            self._conn = None
            raise
        self._task = asyncio.create_task(self._serve(), name=f"seamwork-{self._name}-writer")

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        while not self._queue.empty():
            op = self._queue.get_nowait()
            if not op.future.done():
                op.future.set_exception(StoreError(f"{self._name} store closed"))
        if self._conn is not None:
            await self._conn.close()
            self._conn = None

    def write(self, fn: WriteFn[T]) -> asyncio.Future[T]:
        """Run ``fn(conn)`` in a transaction; the future resolves after its commit."""
        if self._task is None:
            raise StoreError(f"{self._name} store is not open")
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Op(fn, future))
        return future

    async def _serve(self) -> None:
        while True:
            batch = [await self._queue.get()]
            while len(batch) < self._max_batch and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            try:
                await self._run_batch(batch)
            except asyncio.CancelledError:  # closed mid-batch: nobody may wait forever
                _abandon([op.future for op in batch], self._name)
                raise

    async def _run_batch(self, batch: list[_Op]) -> None:
        conn = self._conn
        assert conn is not None
        results: list[tuple[_Op, Any, BaseException | None]] = []
        try:
            async with conn.transaction():
                if len(batch) == 1:
                    results.append((batch[0], await batch[0].fn(conn), None))
                else:
                    for op in batch:
                        results.append(await self._run_in_savepoint(conn, op))
            self.commits += 1
        except Exception as exc:
            if len(batch) == 1 and not isinstance(exc, psycopg.OperationalError):
                results = [(batch[0], None, translate(exc, f"{self._name} store"))]
            else:
                failure = translate(exc, f"{self._name} store: commit failed")
                results = [(op, None, failure) for op in batch]
                await self._reconnect_if_broken()
        for op, value, error in results:
            if op.future.done():
                continue
            if error is not None:
                op.future.set_exception(error)
            else:
                op.future.set_result(value)

    async def _run_in_savepoint(
        self, conn: AsyncConn, op: _Op
    ) -> tuple[_Op, Any, BaseException | None]:
        try:
            async with conn.transaction():
                return (op, await op.fn(conn), None)
        except psycopg.OperationalError:
            raise
        except Exception as exc:
            return (op, None, translate(exc, f"{self._name} store"))

    async def _reconnect_if_broken(self) -> None:
        if self._conn is not None and not self._conn.closed:
            return
        log.warning("%s writer lost its connection; reconnecting", self._name)
        try:
            self._conn = await connect(self._dsn, autocommit=False, what=f"{self._name} writer")
        except StoreUnavailable:
            log.exception(
                "%s writer could not reconnect; the next write will try again", self._name
            )


RunBatch = Callable[[AsyncConn, list[Item]], Awaitable[list[R | BaseException]]]


class PgBatcher(Generic[Item, R]):
    """One autocommit connection, one task: ``run(conn, items)`` handles every queued
    item in one statement and returns a result or an exception per item, in order.

    Args:
        max_batch: most items per statement. Each item usually runs in a server-side
            subtransaction; PostgreSQL caches 64 subtransaction ids per backend, and
            past that every snapshot in the cluster gets slower, so stay at 64.
    """

    def __init__(self, dsn: str, run: RunBatch[Item, R], *, name: str, max_batch: int = 64) -> None:
        self._dsn = dsn
        self._run = run
        self._name = name
        self._max_batch = max_batch
        self._queue: asyncio.Queue[tuple[Item, asyncio.Future[R]]] = asyncio.Queue()
        self._conn: AsyncConn | None = None
        self._task: asyncio.Task[None] | None = None
        self.commits = 0

    async def start(self) -> None:
        if self._task is not None:
            return
        self._conn = await connect(self._dsn, autocommit=True, what=f"{self._name} writer")
        self._task = asyncio.create_task(self._serve(), name=f"seamwork-{self._name}-batcher")

    async def close(self) -> None:
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

    def submit(self, item: Item) -> asyncio.Future[R]:
        """Queue ``item``; the future resolves after the commit of its batch."""
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
            results = await self._run(conn, [item for item, _ in batch])
            self.commits += 1
        except Exception as exc:
            failure = translate(exc, f"{self._name} store")
            results = [failure] * len(batch)
            await self._reconnect_if_broken()
        for (_, future), result in zip(batch, results, strict=True):
            if future.done():
                continue
            if isinstance(result, BaseException):
                future.set_exception(result)
            else:
                future.set_result(result)

    async def _reconnect_if_broken(self) -> None:
        if self._conn is not None and not self._conn.closed:
            return
        log.warning("%s writer lost its connection; reconnecting", self._name)
        try:
            self._conn = await connect(self._dsn, autocommit=True, what=f"{self._name} writer")
        except StoreUnavailable:
            log.exception(
                "%s writer could not reconnect; the next write will try again", self._name
            )


def _abandon(futures: list[asyncio.Future[Any]], name: str) -> None:
    for future in futures:
        if not future.done():
            future.set_exception(StoreUnavailable(f"{name} store closed; the outcome is unknown"))
