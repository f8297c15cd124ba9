"""Interactive transactions on a ``SQLiteWriter``: ``async with session(writer) as s``.

A service's handler needs to read and write in ONE transaction across ``await``s
(check stock, then reserve it and queue an event). The session submits a function to
the writer thread that holds the transaction open and serves the coroutine's
statements one by one until the block ends; then it commits with the rest of its
batch (or rolls back to its savepoint alone if the block raised). While a session is
open the writer serves nothing else, so keep sessions short; a session idle longer
than ``idle_timeout`` is rolled back.

``Session.run_here`` runs a function on the caller's thread instead: while a
session is open the writer thread is parked waiting for its next command, so the
connection is never used by two threads at once, and a short statement costs
microseconds instead of two thread hops. Use it for short statements only: it
blocks the event loop while it runs (and while a statement another task sent with
``run`` finishes on the writer thread: the two never share the connection).
"""

from __future__ import annotations

import asyncio
import contextvars
import queue
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager, suppress
from typing import Any, TypeVar

from seamwork.errors import StoreError
from seamwork.storage._sqlite_writer import SQLiteWriter, settle

T = TypeVar("T")
_END = object()
_ABORT = object()
_active: contextvars.ContextVar[SQLiteWriter | None] = contextvars.ContextVar(
    "seamwork_sqlite_session", default=None
)


class _Aborted(Exception):
    """The coroutine side left the block with an error: roll the session back."""


class Session:
    """Statements of one open transaction, run on the writer thread."""

    def __init__(
        self,
        commands: queue.SimpleQueue[Any],
        loop: asyncio.AbstractEventLoop,
        opening: Any,
        conn: sqlite3.Connection,
        state: _State,
        committed: asyncio.Future[None],
    ) -> None:
        self._commands = commands
        self._loop = loop
        self._conn = conn
        self._state = state
        self._committed = committed
        self.opening = opening
        """What ``on_open(conn)`` returned when the transaction began."""

    def run_here(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn(conn)`` inside the transaction on this thread (the writer thread
        is parked in this session); for short statements only."""
        with self._state.gate:  # the thread may be giving the session up right now
            if self._state.dead:
                raise StoreError("the transaction was rolled back (idle); nothing was applied")
            if self._state.ended:
                raise StoreError("the transaction has ended; nothing was applied")
            self._state.active_at = time.monotonic()
            return fn(self._conn)

    async def run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn(conn)`` inside the transaction and return its result."""
        future: asyncio.Future[T] = self._loop.create_future()
        self._commands.put((fn, future))
        waiting: set[asyncio.Future[Any]] = {future, self._committed}
        await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        if not future.done():  # the writer ended the session (idle, or it failed)
            future.cancel()
            self._committed.result()
            raise StoreError("the transaction ended before the statement ran")
        return future.result()

    async def execute(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """Execute one statement; returns its rows (empty for writes)."""
        return await self.run(lambda conn: conn.execute(sql, tuple(params)).fetchall())


def in_session(writer: SQLiteWriter) -> bool:
    """True inside an open session on ``writer`` (using the writer then would deadlock)."""
    return _active.get() is writer


@asynccontextmanager
async def session(
    writer: SQLiteWriter,
    *,
    on_open: Callable[[sqlite3.Connection], Any] | None = None,
    on_commit: Callable[[sqlite3.Connection], None] | None = None,
    idle_timeout: float = 30.0,
) -> AsyncIterator[Session]:
    """Open an interactive transaction. ``on_open(conn)`` runs first, inside it, and its
    result is ``Session.opening``; ``on_commit(conn)`` runs last, inside it. Both save
    a round trip to the writer thread."""
    if in_session(writer):
        raise StoreError("a transaction is already open on this database in this task")
    loop = asyncio.get_running_loop()
    commands: queue.SimpleQueue[Any] = queue.SimpleQueue()
    opened: asyncio.Future[Any] = loop.create_future()
    state = _State()

    def serve(conn: sqlite3.Connection) -> None:
        try:
            _serve(conn)
        finally:
            with state.gate:  # the connection is the writer's again: run_here must not use it
                state.ended = True

    def _serve(conn: sqlite3.Connection) -> None:
        opening = on_open(conn) if on_open is not None else None
        loop.call_soon_threadsafe(settle, opened, (opening, conn), None)
        while True:
            try:
                command = commands.get(timeout=idle_timeout)
            except queue.Empty:
                with state.gate:
                    if time.monotonic() - state.active_at < idle_timeout:
                        continue
                    state.dead = True  # run_here must not touch the connection any more
                raise StoreError(f"transaction idle for {idle_timeout}s; rolled back") from None
            if command is _END or command is _ABORT:
                with state.gate:  # before on_commit: run_here must not race it on conn
                    state.ended = True
            if command is _END:
                if on_commit is not None:
                    on_commit(conn)
                return
            if command is _ABORT:
                raise _Aborted
            fn, future = command
            try:
                with state.gate:  # run_here from another task waits, never shares conn
                    value = fn(conn)
            except Exception as exc:
                loop.call_soon_threadsafe(settle, future, None, exc)
            else:
                loop.call_soon_threadsafe(settle, future, value, None)

    committed = writer.write(serve)
    try:
        await asyncio.wait({opened, committed}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:  # cancelled while queued: the session must not park the writer
        commands.put(_ABORT)
        committed.add_done_callback(_consume)
        raise
    if committed.done():
        committed.result()  # the writer refused the session: raise why
    token = _active.set(writer)
    try:
        opening, conn = opened.result()
        yield Session(commands, loop, opening, conn, state, committed)
    except BaseException:
        commands.put(_ABORT)
        with suppress(_Aborted):
            await committed
        raise
    finally:
        _active.reset(token)
    commands.put(_END)
    await committed


class _State:
    """What the writer thread and ``run_here`` share about a session."""

    __slots__ = ("active_at", "dead", "ended", "gate")

    def __init__(self) -> None:
        self.gate = threading.Lock()
        self.active_at = time.monotonic()
        self.dead = False
        self.ended = False


def _consume(future: asyncio.Future[Any]) -> None:
    """Retrieve an abandoned session's outcome so asyncio does not log it as lost."""
    if not future.cancelled():
        future.exception()
