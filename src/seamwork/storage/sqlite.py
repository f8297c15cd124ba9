"""SQLite adapters: the embedded ``SagaStore`` and the ``IdempotencyLedger``.

Both run on one connection and one thread per database file, group-committing
concurrent callers (see ``_sqlite_writer``), in WAL mode with ``synchronous=FULL``
unless ``synchronous="normal"`` is asked for by name.

One orchestrator process per saga database: ``attach`` takes an exclusive OS lock
on ``<path>.lock``, so a second orchestrator fails fast with ``StoreLocked`` and a
restarted one knows every lease in the file belongs to a dead process and can
resume at once (no lease expiry to wait out). Readers - the CLI, dashboards - need
no lock. Scale-out across processes is the PostgreSQL store's job.
"""

from __future__ import annotations

import builtins
import fcntl
import inspect
import os
import sqlite3
import time
from collections.abc import Callable, Collection, Sequence
from contextlib import suppress
from pathlib import Path
from typing import Any, TypeVar

from seamwork._core.codec import dumps, loads
from seamwork.errors import (
    ConfigError,
    InvalidSagaOperation,
    LeaseLost,
    StoreLocked,
)
from seamwork.saga import IdempotencyLedger
from seamwork.saga._idempotency import check_key, encode_result
from seamwork.saga._ports import ClaimResult, SagaKey
from seamwork.saga._state import SagaState, SagaStatus, StepEvent
from seamwork.storage._saga_rows import (
    COLUMNS,
    decode,
    decode_event,
    decode_or_none,
    insert_values,
    list_query,
    split_claimed,
    state_values,
    take_claimable,
)
from seamwork.storage._sqlite_writer import Migration, SQLiteWriter, Synchronous

T = TypeVar("T")

SAGA_MIGRATIONS = (
    Migration(
        "saga",
        1,
        (
            """CREATE TABLE seamwork_sagas (
                saga_id TEXT PRIMARY KEY,
                saga_name TEXT NOT NULL,
                saga_version INTEGER NOT NULL,
                status TEXT NOT NULL,
                current_step_index INTEGER NOT NULL,
                completed_steps TEXT NOT NULL,
                compensated_steps TEXT NOT NULL,
                uncertain_steps TEXT NOT NULL,
                skipped_steps TEXT NOT NULL,
                context TEXT NOT NULL,
                started_at REAL NOT NULL,
                updated_at REAL NOT NULL,
                deadline_at REAL,
                failure_reason TEXT,
                step_attempts TEXT NOT NULL,
                compensation_attempts TEXT NOT NULL,
                lease_owner TEXT,
                lease_expires_at REAL
            )""",
            "CREATE INDEX seamwork_sagas_by_status ON seamwork_sagas(status, updated_at)",
            "CREATE INDEX seamwork_sagas_by_update ON seamwork_sagas(updated_at)",
            """CREATE TABLE seamwork_saga_events (
                id INTEGER PRIMARY KEY,
                saga_id TEXT NOT NULL,
                at REAL NOT NULL,
                event TEXT NOT NULL,
                step TEXT,
                attempt INTEGER,
                detail TEXT
            )""",
            "CREATE INDEX seamwork_saga_events_by_saga ON seamwork_saga_events(saga_id, id)",
        ),
    ),
)

LEDGER_MIGRATIONS = (
    Migration(
        "idempotency",
        1,
        (
            """CREATE TABLE seamwork_idempotency (
                key TEXT PRIMARY KEY,
                result TEXT NOT NULL,
                created_at REAL NOT NULL
            )""",
        ),
    ),
)

_INSERT = (
    f"INSERT INTO seamwork_sagas ({COLUMNS}) VALUES ({', '.join('?' * 18)}) ON CONFLICT DO NOTHING"
)
_STATE_SET = (
    "status = ?, current_step_index = ?, completed_steps = ?, compensated_steps = ?, "
    "uncertain_steps = ?, skipped_steps = ?, context = ?, updated_at = ?, failure_reason = ?, "
    "step_attempts = ?, compensation_attempts = ?"
)
_SAVE_OWNED = f"UPDATE seamwork_sagas SET {_STATE_SET} WHERE saga_id = ? AND lease_owner = ?"
_SAVE_FINAL = (  # the lease the state carries: none, or a stuck saga's until its alert
    f"UPDATE seamwork_sagas SET {_STATE_SET}, lease_owner = ?, lease_expires_at = ? "
    "WHERE saga_id = ? AND lease_owner = ?"
)
_SAVE_STATUS = (
    f"UPDATE seamwork_sagas SET {_STATE_SET}, lease_owner = ?, lease_expires_at = ? "
    "WHERE saga_id = ? AND status = ?"
)
_INSERT_EVENT = (
    "INSERT INTO seamwork_saga_events (saga_id, at, event, step, attempt, detail) "
    "VALUES (?, ?, ?, ?, ?, ?)"
)
_ACTIVE = ("running", "compensating")
# Claimable: an active saga whose lease is free or expired, or a stuck one whose lease
# (kept until its alert went out) expired.
_CLAIM = (
    f"SELECT {COLUMNS} FROM seamwork_sagas WHERE status IN ('running', 'compensating', "
    "'stuck') AND (lease_expires_at < ? OR lease_owner IS NULL AND status <> 'stuck') "
    "AND (status = 'stuck' OR {keys}) AND saga_id NOT IN (SELECT value FROM json_each(?)) "
    "ORDER BY updated_at LIMIT ?"
)


def _event_rows(events: Sequence[StepEvent]) -> Sequence[tuple[Any, ...]]:
    return events  # a StepEvent is a tuple in the columns' order


def _decode(row: Sequence[Any]) -> SagaState:
    return decode(row, loads)


def _decode_or_none(row: Sequence[Any]) -> SagaState | None:
    return decode_or_none(row, loads)


def _keys_clause(keys: Collection[SagaKey]) -> tuple[str, list[Any]]:
    if not keys:
        return "(saga_name, saga_version) IN (VALUES (NULL, NULL))", []
    values = ", ".join("(?, ?)" for _ in keys)
    params: list[Any] = [v for key in keys for v in key]
    return f"(saga_name, saga_version) IN (VALUES {values})", params


class SQLiteStore:
    """The embedded ``SagaStore``: one SQLite file, one orchestrator process.

    Args:
        path: the database file; its directory must exist.
        synchronous: ``"full"`` (default, durable on power loss) or ``"normal"``
            (faster; WAL may lose the last commits on power loss) - opt in by name.
        create: create the file and schema if needed (False: it must be a saga store
            already, and nothing is created - for tools such as the CLI).
        readonly: open read-only (listing and showing sagas).
    """

    def __init__(
        self,
        path: str | Path,
        *,
        synchronous: Synchronous = "full",
        create: bool = True,
        readonly: bool = False,
    ) -> None:
        if not str(path):
            raise ConfigError("SQLiteStore needs a database path")
        self.path = str(path)
        self._writer = SQLiteWriter(
            path,
            synchronous=synchronous,
            migrations=SAGA_MIGRATIONS,
            name="saga",
            create=create,
            readonly=readonly,
            rerun_safe=True,  # every call is plain SQL, safe to run again after a rollback
            coalesce=True,  # sagas woken by one commit send their next transitions together
        )
        self._lock_fd: int | None = None

    def __repr__(self) -> str:
        return f"SQLiteStore({self.path!r})"

    @property
    def commits(self) -> int:
        """Transactions committed by this store since it opened (for benchmarks)."""
        return self._writer.commits

    async def open(self) -> None:
        await self._writer.start()

    async def aclose(self) -> None:
        try:
            await self._writer.close()
        finally:  # a close cut short too: the thread has its stop and ends on its own
            if self._lock_fd is not None:
                _unlock(self._lock_fd)
                self._lock_fd = None

    async def attach(self, owner: str) -> None:
        if self.path != ":memory:" and self._lock_fd is None:
            self._lock_fd = _lock_exclusively(self.path)

        def release(conn: sqlite3.Connection) -> None:
            conn.execute(
                "UPDATE seamwork_sagas SET lease_owner = NULL, lease_expires_at = NULL "
                "WHERE lease_owner IS NOT NULL AND status IN (?, ?)",
                _ACTIVE,
            )
            conn.execute(  # alerts a dead process owed: due now
                "UPDATE seamwork_sagas SET lease_expires_at = 0 "
                "WHERE lease_owner IS NOT NULL AND status = 'stuck'"
            )

        await self._writer.write(release)

    async def create(self, state: SagaState, events: Sequence[StepEvent]) -> bool:
        row = insert_values(state)
        rows = _event_rows(events)

        def insert(conn: sqlite3.Connection) -> bool:
            if conn.execute(_INSERT, row).rowcount == 0:
                return False
            conn.executemany(_INSERT_EVENT, rows)
            return True

        return await self._writer.write(insert)

    async def save(
        self,
        state: SagaState,
        events: Sequence[StepEvent],
        *,
        owner: str | None = None,
        expect_status: SagaStatus | None = None,
    ) -> None:
        if (owner is None) == (expect_status is None):
            raise ConfigError("save() is fenced on exactly one of owner or expect_status")
        saga_id = state.saga_id

        def update(conn: sqlite3.Connection) -> None:
            values = state_values(state)
            if state.terminal and owner is not None:
                lease = (state.lease_owner, state.lease_expires_at)
                cursor = conn.execute(_SAVE_FINAL, (*values, *lease, saga_id, owner))
            elif owner is not None:
                cursor = conn.execute(_SAVE_OWNED, (*values, saga_id, owner))
            else:
                assert expect_status is not None
                params = (*values, state.lease_owner, state.lease_expires_at)
                cursor = conn.execute(_SAVE_STATUS, (*params, saga_id, expect_status.value))
            if cursor.rowcount != 1:
                if owner is not None:
                    raise LeaseLost(f"saga {saga_id!r} is not leased to {owner}")
                raise InvalidSagaOperation(f"saga {saga_id!r} is no longer {expect_status}")
            conn.executemany(_INSERT_EVENT, _event_rows(events))

        await self._writer.write(update)

    async def get(self, saga_id: str) -> SagaState | None:
        def select(conn: sqlite3.Connection) -> tuple[Any, ...] | None:
            row: tuple[Any, ...] | None = conn.execute(
                f"SELECT {COLUMNS} FROM seamwork_sagas WHERE saga_id = ?", (saga_id,)
            ).fetchone()
            return row

        row = await self._writer.read(select)
        return None if row is None else _decode(row)

    async def list(
        self,
        *,
        status: SagaStatus | None = None,
        name: str | None = None,
        limit: int = 100,
    ) -> builtins.list[SagaState]:
        sql, params = list_query(status, name, limit, "?")
        rows = await self._writer.read(lambda conn: conn.execute(sql, params).fetchall())
        return [state for state in map(_decode_or_none, rows) if state is not None]

    async def timeline(self, saga_id: str) -> builtins.list[StepEvent]:
        sql = (
            "SELECT saga_id, at, event, step, attempt, detail FROM seamwork_saga_events "
            "WHERE saga_id = ? ORDER BY id"
        )
        rows = await self._writer.read(lambda conn: conn.execute(sql, (saga_id,)).fetchall())
        return [decode_event(row) for row in rows]

    async def claim(
        self,
        owner: str,
        runnable: Collection[SagaKey],
        *,
        now: float,
        lease_seconds: float,
        limit: int,
    ) -> ClaimResult:
        keys, key_params = _keys_clause(runnable)
        sql = _CLAIM.format(keys=keys)

        def claim(conn: sqlite3.Connection) -> ClaimResult:
            found = ClaimResult()
            seen: list[str] = []  # ids read: the next page reads past them
            page = limit
            while page:
                rows = conn.execute(sql, (now, *key_params, dumps(seen), page)).fetchall()
                page = take_claimable(found, rows, limit, seen, page, loads)
            expires = now + lease_seconds
            conn.executemany(
                "UPDATE seamwork_sagas SET lease_owner = ?, lease_expires_at = ? WHERE saga_id = ?",
                [(owner, expires, s.saga_id) for s in found.claimed],
            )
            return split_claimed(found, owner, expires)

        return await self._writer.write(claim)

    async def renew(
        self, owner: str, saga_ids: Collection[str], *, now: float, lease_seconds: float
    ) -> set[str]:
        ids = list(saga_ids)

        def renew(conn: sqlite3.Connection) -> set[str]:
            kept: set[str] = set()
            for chunk in _chunks(ids, 500):
                marks = ", ".join("?" * len(chunk))
                conn.execute(
                    f"UPDATE seamwork_sagas SET lease_expires_at = ? "
                    f"WHERE lease_owner = ? AND saga_id IN ({marks})",
                    (now + lease_seconds, owner, *chunk),
                )
                rows = conn.execute(
                    f"SELECT saga_id FROM seamwork_sagas WHERE lease_owner = ? "
                    f"AND saga_id IN ({marks})",
                    (owner, *chunk),
                )
                kept.update(row[0] for row in rows)
            return kept

        return await self._writer.write(renew)

    async def release(
        self, owner: str, saga_ids: Collection[str], *, status: SagaStatus | None = None
    ) -> None:
        ids = list(saga_ids)
        only = "" if status is None else " AND status = ?"
        fence = () if status is None else (status.value,)

        def release(conn: sqlite3.Connection) -> None:
            for chunk in _chunks(ids, 500):
                marks = ", ".join("?" * len(chunk))
                conn.execute(
                    "UPDATE seamwork_sagas SET lease_owner = NULL, lease_expires_at = NULL "
                    f"WHERE lease_owner = ? AND saga_id IN ({marks}){only}",
                    (owner, *chunk, *fence),
                )

        await self._writer.write(release)

    async def stranded(self, runnable: Collection[SagaKey]) -> builtins.list[SagaState]:
        keys, key_params = _keys_clause(runnable)
        sql = (
            f"SELECT {COLUMNS} FROM seamwork_sagas WHERE status IN (?, ?) "
            f"AND NOT {keys} ORDER BY updated_at"
        )
        rows = await self._writer.read(
            lambda conn: conn.execute(sql, (*_ACTIVE, *key_params)).fetchall()
        )
        return [state for state in map(_decode_or_none, rows) if state is not None]


def _chunks(items: list[str], size: int) -> builtins.list[list[str]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


# The lock descriptors this process holds. An flock lock belongs to the open file,
# which a forked child shares (multiprocessing forks by default on Linux): a child
# living on after the orchestrator died kept the file locked, and the restarted
# orchestrator was refused. So a child closes its copies as it starts.
_held_locks: set[int] = set()
_fork_hook: list[bool] = []


def _close_locks_in_child() -> None:
    for fd in _held_locks:
        with suppress(OSError):
            os.close(fd)
    _held_locks.clear()


def _unlock(fd: int) -> None:
    if fd in _held_locks:  # not in a forked child, which closed its copy already
        _held_locks.discard(fd)
        os.close(fd)


def _lock_exclusively(database: str) -> int:
    if not _fork_hook:  # registered on first use: nothing runs at import time
        os.register_at_fork(after_in_child=_close_locks_in_child)
        _fork_hook.append(True)
    # named after the file itself: a symbolic link to it must find the same lock
    path = os.path.realpath(database) + ".lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise StoreLocked(
            f"{database} is in use by another orchestrator (pid {holder}); "
            "SQLite runs one orchestrator per file - use PostgresStore to scale out"
        ) from None
    _held_locks.add(fd)
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    return fd


_SYNC_EFFECT = (
    "the SQLite ledger runs its effect on the database's writer thread, in the "
    "transaction: pass a plain function of the sqlite3 connection, not an async one"
)


class SQLiteLedger(IdempotencyLedger):
    """``IdempotencyLedger`` on a service's own SQLite database.

    ``once(key, effect)`` runs ``effect(conn)`` and records ``key`` with its result in
    the same transaction; a second call with the same key returns the first result
    and runs nothing. ``effect`` runs on the ledger's writer thread: plain, blocking
    ``sqlite3`` calls are right there.
    """

    def __init__(self, path: str | Path, *, synchronous: Synchronous = "full") -> None:
        self.path = str(path)
        self._writer = SQLiteWriter(
            path, synchronous=synchronous, migrations=LEDGER_MIGRATIONS, name="ledger"
        )

    def __repr__(self) -> str:
        return f"SQLiteLedger({self.path!r})"

    async def open(self) -> None:
        await self._writer.start()

    async def aclose(self) -> None:
        await self._writer.close()

    async def once(self, key: str, effect: Callable[[Any], T]) -> T:
        check_key(key)
        if inspect.iscoroutinefunction(effect):
            raise ConfigError(_SYNC_EFFECT)
        if not self._writer.running:
            await self.open()

        def run(conn: sqlite3.Connection) -> Any:
            row = conn.execute(
                "SELECT result FROM seamwork_idempotency WHERE key = ?", (key,)
            ).fetchone()
            if row is not None:
                return loads(row[0])
            value = effect(conn)
            if inspect.iscoroutine(value):  # (a lambda around an async function)
                value.close()
                raise ConfigError(_SYNC_EFFECT)
            text = encode_result(value, key)
            conn.execute(
                "INSERT INTO seamwork_idempotency (key, result, created_at) VALUES (?, ?, ?)",
                (key, text, time.time()),
            )
            return loads(text)  # as a repeat will return it

        result: T = await self._writer.write(run)
        return result

    async def result(self, key: str) -> Any | None:
        check_key(key)
        if not self._writer.running:
            await self.open()
        row = await self._writer.read(
            lambda conn: conn.execute(
                "SELECT result FROM seamwork_idempotency WHERE key = ?", (key,)
            ).fetchone()
        )
        return None if row is None else loads(row[0])

    async def transaction(self, work: Callable[[Any], T]) -> T:
        if not self._writer.running:
            await self.open()
        return await self._writer.write(work)
