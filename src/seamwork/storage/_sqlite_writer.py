"""One SQLite connection, one thread, group commit.

SQLite allows one writer at a time; many connections fighting through
``busy_timeout`` waste the disk's time. So each store owns ONE connection on ONE
thread. Callers on the event loop hand it small functions; the thread drains
whatever has queued up, runs each function inside its own SAVEPOINT of one shared
transaction, commits once, and only then resolves every caller's future. A function
that raises is rolled back to its savepoint alone; the others commit. Each caller
still waits for its own commit, so durability is exactly that of one commit per
call, at the cost of one fsync per batch.

Writers whose functions may safely run twice (``rerun_safe=True``) skip the two
savepoint statements per call: the batch runs without them, a function that raises
without having changed a row is simply reported, and only one that raises after
changing rows makes the writer roll the batch back and run it again with a
savepoint per call. ``on_begin`` / ``on_rollback`` let a store keep caches coherent
with the file (``PRAGMA data_version`` tells whether another connection committed).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import sqlite3
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

from seamwork.errors import ConfigError, SeamworkError, StoreError, StoreUnavailable
from seamwork.storage._schema import newer_schema

T = TypeVar("T")
Synchronous = Literal["full", "normal"]
log = logging.getLogger("seamwork.storage")


@dataclass(frozen=True, slots=True)
class Migration:
    """Schema step ``version`` of ``component``: statements run in one transaction."""

    component: str
    version: int
    statements: tuple[str, ...]


_MIGRATIONS_TABLE = (
    "CREATE TABLE IF NOT EXISTS seamwork_migrations ("
    " component TEXT PRIMARY KEY, version INTEGER NOT NULL)"
)


class _Op:
    __slots__ = ("fn", "future", "loop", "write")

    def __init__(
        self,
        fn: Callable[[sqlite3.Connection], Any],
        future: asyncio.Future[Any],
        loop: asyncio.AbstractEventLoop,
        write: bool,
    ) -> None:
        self.fn = fn
        self.future = future
        self.loop = loop
        self.write = write


_STOP = object()
_COALESCE_CHUNK = 32


class SQLiteWriter:
    """Runs functions against one SQLite connection on a dedicated thread.

    Args:
        path: the database file (``":memory:"`` for a private in-memory database).
        synchronous: ``"full"`` (default): a commit survives power loss.
            ``"normal"``: faster, but in WAL mode the last commits can be lost on
            power loss (not on a process crash) - an explicit, named opt-in.
        migrations: schema steps applied at start, once, under the write lock.
        max_batch: most functions committed together.
        create: create the file and migrate the schema; with False the file must
            already hold this component's schema (nothing is created or changed).
        readonly: open the file read-only (implies ``create=False``).
        rerun_safe: the functions given to ``write`` have no effect outside the
            connection before they return, so a batch may be rolled back and run
            again; saves a SAVEPOINT and a RELEASE per call.
        on_begin: called on the writer thread after each write transaction began
            (the write lock is held).
        on_rollback: called on the writer thread after a whole write transaction
            was rolled back.
        coalesce: hand the thread every call made during one event-loop iteration
            as one item, at the end of that iteration (when many tasks are woken by
            one commit, their next calls then form one batch and cost one thread
            wake-up, instead of the thread starting a batch with the first of them
            and committing the rest separately).
    """

    def __init__(
        self,
        path: str | Path,
        *,
        synchronous: Synchronous = "full",
        migrations: Sequence[Migration] = (),
        max_batch: int = 512,
        name: str = "sqlite",
        create: bool = True,
        readonly: bool = False,
        rerun_safe: bool = False,
        on_begin: Callable[[sqlite3.Connection], None] | None = None,
        on_rollback: Callable[[], None] | None = None,
        coalesce: bool = False,
    ) -> None:
        if synchronous not in ("full", "normal"):
            raise ConfigError(f"synchronous must be 'full' or 'normal', got {synchronous!r}")
        if not str(path):
            raise ConfigError(f"a {name} store needs a database path, got {path!r}")
        self.path = str(path)
        self.synchronous = synchronous
        self._migrations = tuple(migrations)
        self._create = create and not readonly
        self._readonly = readonly
        self._max_batch = max_batch
        self._name = name
        self._rerun_safe = rerun_safe
        self._on_begin = on_begin
        self._on_rollback = on_rollback
        self._coalesce = coalesce
        self._pending: list[_Op] | None = None
        self._pending_lock = threading.Lock()
        self._queue: queue.SimpleQueue[_Op | list[_Op] | object] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._stopping: threading.Thread | None = None  # the thread the last close stopped
        self._conn: sqlite3.Connection | None = None
        self.commits = 0
        self.calls = 0

    @property
    def running(self) -> bool:
        return self._thread is not None

    async def start(self) -> None:
        """Open the connection on the writer thread and migrate the schema."""
        if self._thread is not None:
            return
        loop = asyncio.get_running_loop()
        ready: asyncio.Future[None] = loop.create_future()
        self._thread = threading.Thread(
            target=self._main, args=(loop, ready), name=f"seamwork-{self._name}", daemon=True
        )
        self._thread.start()
        try:
            await ready
        except BaseException as exc:  # the open failed, or a cancel came while it ran
            # a thread whose open succeeded after all serves until it reads the stop
            await self.close()
            # one whose open failed never read it: the next thread must not, and the
            # calls other tasks made meanwhile (the thread looked started) must fail
            unserved, self._queue = self._queue, queue.SimpleQueue()
            self._fail_unserved(unserved, exc)
            raise

    def _fail_unserved(self, unserved: queue.SimpleQueue[Any], exc: BaseException) -> None:
        """Settle the calls a thread that never opened left queued, with the reason."""
        cause = exc if isinstance(exc, Exception) else None
        reason = str(cause or "") or f"{self._name} store at {self.path} did not open"
        ops: list[_Op] = []
        while True:
            try:
                item = unserved.get_nowait()
            except queue.Empty:
                break
            _add(ops, item)
        for op in ops:
            error = StoreUnavailable(reason)
            error.__cause__ = cause
            _deliver([(op, None, error)])

    async def close(self) -> None:
        """Finish queued work, close the connection and stop the thread."""
        with self._pending_lock:  # every call accepted so far is queued before the stop
            thread, self._thread = self._thread, None
            if thread is None:  # closed, or closing: a second close waits for the first
                thread = self._stopping
                if thread is None or not thread.is_alive():
                    return
            else:
                self._stopping = thread
                pending, self._pending = self._pending, None
                if pending:
                    self._queue.put(pending)
                self._queue.put(_STOP)
        await asyncio.to_thread(thread.join)

    def write(self, fn: Callable[[sqlite3.Connection], T]) -> asyncio.Future[T]:
        """Run ``fn(conn)`` in a write transaction; the future resolves after its commit."""
        return self._submit(fn, True)

    def read(self, fn: Callable[[sqlite3.Connection], T]) -> asyncio.Future[T]:
        """Run ``fn(conn)`` in a read transaction (a consistent snapshot)."""
        return self._submit(fn, False)

    def _submit(self, fn: Callable[[sqlite3.Connection], T], write: bool) -> asyncio.Future[T]:
        if self._thread is None:
            raise StoreError(f"{self._name} store at {self.path} is not open")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        op = _Op(fn, future, loop, write)
        with self._pending_lock:  # against close() on another thread: accepted means run
            if self._thread is None:
                raise StoreError(f"{self._name} store at {self.path} closed")
            if not self._coalesce:
                self._queue.put(op)
                return future
            pending = self._pending
            if pending is None:
                self._pending = [op]
                loop.call_soon(self._flush)
            elif pending[0].loop is loop:
                pending.append(op)
                if len(pending) >= _COALESCE_CHUNK:  # let the thread start on these
                    self._pending = None
                    self._queue.put(pending)
            else:  # another event loop: not worth coalescing
                self._queue.put(op)
        return future

    def _flush(self) -> None:
        with self._pending_lock:  # queued under the lock: never after close()'s stop
            pending, self._pending = self._pending, None
            if pending:
                self._queue.put(pending)

    # --- the writer thread ----------------------------------------------------------

    def _main(self, loop: asyncio.AbstractEventLoop, ready: asyncio.Future[None]) -> None:
        try:
            self._conn = self._connect()
        except BaseException as exc:
            loop.call_soon_threadsafe(settle, ready, None, exc)
            return
        loop.call_soon_threadsafe(settle, ready, None, None)
        try:
            self._serve()
        finally:
            self._conn.close()
            self._conn = None

    def _serve(self) -> None:
        get, get_nowait = self._queue.get, self._queue.get_nowait
        while True:
            first = get()
            if first is _STOP:
                return
            batch: list[_Op] = []
            stop = _add(batch, first)
            while not stop and len(batch) < self._max_batch:
                try:
                    item = get_nowait()
                except queue.Empty:
                    break
                stop = _add(batch, item)
            for start in range(0, len(batch), self._max_batch):
                self._run_batch(batch[start : start + self._max_batch])
            if stop:
                return

    def _run_batch(self, batch: list[_Op], *, in_savepoints: bool = False) -> None:
        """One transaction for ``batch``; ``in_savepoints`` forces a savepoint per call
        (a rerun-safe batch that failed after changing rows runs again that way).
        Whatever goes wrong, every call of the batch gets an outcome and the thread
        serves on."""
        conn = self._conn
        assert conn is not None
        write = any(op.write for op in batch)
        try:
            results = self._transaction(conn, batch, write, in_savepoints)
        except Exception as exc:  # the driver, or a hook (on_begin, on_rollback)
            if conn.in_transaction:
                try:
                    self._rollback(conn, write)
                except Exception:
                    log.exception("%s store at %s: rollback failed", self._name, self.path)
            reason = f"commit failed: {exc}" if isinstance(exc, sqlite3.Error) else f"{exc}"
            error = StoreError(f"{self._name} store at {self.path}: {reason}")
            error.__cause__ = exc
            results = [(op, None, error) for op in batch]
        if results is not None:
            _deliver(results)

    def _transaction(
        self, conn: sqlite3.Connection, batch: list[_Op], write: bool, in_savepoints: bool
    ) -> list[tuple[_Op, Any, BaseException | None]] | None:
        """Run and commit ``batch``: the results to deliver, or None if they were."""
        results: list[tuple[_Op, Any, BaseException | None]]
        conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
        if write and self._on_begin is not None:
            self._on_begin(conn)
        if len(batch) == 1 and not in_savepoints:
            op = batch[0]
            try:
                results = [(op, op.fn(conn), None)]
            except BaseException as exc:
                error = self._translate(exc)
                self._rollback(conn, write)
                _deliver([(op, None, error)])
                return None
        elif self._rerun_safe and not in_savepoints:
            plain = self._run_plain(conn, batch)
            if plain is None:
                self._rollback(conn, write)
                self._run_batch(batch, in_savepoints=True)
                return None
            results = plain
        else:
            results = [self._run_in_savepoint(conn, op) for op in batch]
        conn.execute("COMMIT")
        self.commits += 1
        self.calls += len(batch)
        return results

    def _run_plain(
        self, conn: sqlite3.Connection, batch: list[_Op]
    ) -> list[tuple[_Op, Any, BaseException | None]] | None:
        """Run each call without a savepoint; None if one failed after changing rows."""
        results: list[tuple[_Op, Any, BaseException | None]] = []
        for op in batch:
            changes = conn.total_changes
            try:
                results.append((op, op.fn(conn), None))
            except BaseException as exc:
                if conn.total_changes != changes:
                    return None
                results.append((op, None, self._translate(exc)))
        return results

    def _rollback(self, conn: sqlite3.Connection, write: bool) -> None:
        conn.execute("ROLLBACK")
        if write and self._on_rollback is not None:
            self._on_rollback()

    def _run_in_savepoint(
        self, conn: sqlite3.Connection, op: _Op
    ) -> tuple[_Op, Any, BaseException | None]:
        conn.execute("SAVEPOINT op")
        try:
            value = op.fn(conn)
        except BaseException as exc:
            conn.execute("ROLLBACK TO op")
            conn.execute("RELEASE op")
            return (op, None, self._translate(exc))
        conn.execute("RELEASE op")
        return (op, value, None)

    def _translate(self, exc: BaseException) -> BaseException:
        if isinstance(exc, SeamworkError) or not isinstance(exc, sqlite3.Error):
            return exc
        error = StoreError(f"{self._name} store at {self.path}: {exc}")
        error.__cause__ = exc
        return error

    def _connect(self) -> sqlite3.Connection:
        target = Path(self.path)
        if self.path != ":memory:" and not target.parent.is_dir():
            raise StoreUnavailable(
                f"cannot open {self._name} store {self.path}: "
                f"directory {target.parent} does not exist"
            )
        if not self._create and not target.is_file():
            raise StoreUnavailable(f"{self._name} store {self.path} does not exist")
        try:
            conn = sqlite3.connect(
                f"file:{target.resolve()}?mode={'ro' if self._readonly else 'rw'}"
                if not self._create
                else self.path,
                isolation_level=None,
                check_same_thread=False,
                timeout=10.0,
                uri=not self._create,
            )
            if not self._create:  # before WAL is set: a foreign file is refused unchanged
                self._require_schema(conn)
            if not self._readonly:
                mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
                if self.path != ":memory:" and mode != "wal":
                    raise StoreUnavailable(f"{self.path}: WAL mode refused (journal_mode={mode})")
                conn.execute(f"PRAGMA synchronous={self.synchronous.upper()}")
            conn.execute("PRAGMA foreign_keys=ON")
            if self._create:
                self._migrate(conn)
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"cannot open {self._name} store {self.path}: {exc}") from exc
        return conn

    def _require_schema(self, conn: sqlite3.Connection) -> None:
        try:
            applied = dict(conn.execute("SELECT component, version FROM seamwork_migrations"))
        except sqlite3.DatabaseError:
            applied = {}
        try:
            self._refuse_newer(applied)
        except StoreUnavailable:
            conn.close()
            raise
        for migration in self._migrations:
            version = applied.get(migration.component, 0)
            if version >= migration.version:
                continue
            conn.close()
            if version == 0:
                raise StoreUnavailable(f"{self.path} is not a seamwork {self._name} store")
            raise StoreUnavailable(
                f"{self.path} holds a seamwork {self._name} store of an older version "
                f"(schema v{version}, this version needs v{self._migrations[-1].version}): "
                "open it with the service once to upgrade it"
            )

    def _refuse_newer(self, applied: dict[str, int]) -> None:
        """Refuse a file whose schema a newer seamwork wrote (``newer_schema``)."""
        problem = newer_schema(applied, ((m.component, m.version) for m in self._migrations))
        if problem is not None:
            raise StoreUnavailable(f"{self.path}: {problem}")

    def _migrate(self, conn: sqlite3.Connection) -> None:
        if not self._migrations:
            return
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute(_MIGRATIONS_TABLE)
            applied = dict(conn.execute("SELECT component, version FROM seamwork_migrations"))
            self._refuse_newer(applied)
            for migration in self._migrations:
                if applied.get(migration.component, 0) >= migration.version:
                    continue
                for statement in migration.statements:
                    conn.execute(statement)
                conn.execute(
                    "INSERT INTO seamwork_migrations(component, version) VALUES (?, ?) "
                    "ON CONFLICT(component) DO UPDATE SET version = excluded.version",
                    (migration.component, migration.version),
                )
                applied[migration.component] = migration.version
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise


def _add(batch: list[_Op], item: object) -> bool:
    """Add a queued item (one call or a coalesced list) to ``batch``; True on stop."""
    if item is _STOP:
        return True
    if isinstance(item, list):
        batch.extend(item)
    else:
        assert isinstance(item, _Op)
        batch.append(item)
    return False


def _deliver(results: list[tuple[_Op, Any, BaseException | None]]) -> None:
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Op, Any, BaseException | None]]] = {}
    for item in results:
        by_loop.setdefault(item[0].loop, []).append(item)
    for loop, items in by_loop.items():
        try:
            loop.call_soon_threadsafe(_settle_all, items)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            log.debug("dropping %d results for a closed event loop", len(items))


def _settle_all(items: list[tuple[_Op, Any, BaseException | None]]) -> None:
    for op, value, error in items:
        settle(op.future, value, error)


def settle(future: asyncio.Future[Any], value: Any, error: BaseException | None) -> None:
    """Resolve ``future`` with ``value`` or ``error`` unless its caller gave up on it
    (call it on the future's loop: ``loop.call_soon_threadsafe(settle, ...)``)."""
    if future.done():
        return
    if isinstance(error, StopIteration):  # a Future refuses it (it would end a coroutine)
        wrapped = RuntimeError(f"the function raised StopIteration: {error}")
        wrapped.__cause__ = error
        error = wrapped
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(value)
