"""``PostgresStore``: the ``SagaStore`` on PostgreSQL, for many orchestrator processes.

Every transition is ONE statement - the fenced ``UPDATE`` and the timeline ``INSERT``
joined in a CTE, so the events are written only if the fence held - sent on an
autocommit connection: one round trip, one commit. Concurrent transitions are
group-committed: whatever queued while a commit was in flight goes out next as one
pipelined transaction. Claims take ``FOR UPDATE SKIP LOCKED`` so workers never wait
on each other's rows, and every write of a running saga is fenced on its lease
owner: a worker that lost its lease cannot overwrite the new owner's state.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
from collections.abc import Collection, Sequence
from typing import Any

import psycopg

from seamwork.errors import (
    ConfigError,
    InvalidSagaOperation,
    LeaseLost,
    StoreError,
    StoreUnavailable,
)
from seamwork.saga._ports import ClaimResult, SagaKey
from seamwork.saga._state import SagaState, SagaStatus, StepEvent
from seamwork.storage._pg import (
    AsyncConn,
    PgMigration,
    _QueueOwner,
    connect,
    deadline,
    make_pool,
    migrate,
    open_pool,
    past_dead_connections,
    stalled,
    translate,
)
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
from seamwork.storage._schema import newer_schema

SAGA_MIGRATIONS = (
    PgMigration(
        "saga",
        1,
        (
            """CREATE TABLE seamwork_sagas (
                saga_id text PRIMARY KEY,
                saga_name text NOT NULL,
                saga_version integer NOT NULL,
                status text NOT NULL,
                current_step_index integer NOT NULL,
                completed_steps jsonb NOT NULL,
                compensated_steps jsonb NOT NULL,
                uncertain_steps jsonb NOT NULL,
                skipped_steps jsonb NOT NULL,
                context jsonb NOT NULL,
                started_at double precision NOT NULL,
                updated_at double precision NOT NULL,
                deadline_at double precision,
                failure_reason text,
                step_attempts jsonb NOT NULL,
                compensation_attempts jsonb NOT NULL,
                lease_owner text,
                lease_expires_at double precision
            )""",
            "CREATE INDEX seamwork_sagas_by_status ON seamwork_sagas (status, updated_at)",
            "CREATE INDEX seamwork_sagas_by_update ON seamwork_sagas (updated_at)",
            """CREATE TABLE seamwork_saga_events (
                id bigserial PRIMARY KEY,
                saga_id text NOT NULL,
                at double precision NOT NULL,
                event text NOT NULL,
                step text,
                attempt integer,
                detail text
            )""",
            "CREATE INDEX seamwork_saga_events_by_saga ON seamwork_saga_events (saga_id, id)",
        ),
    ),
)

_EVENTS = (
    "INSERT INTO seamwork_saga_events (saga_id, at, event, step, attempt, detail) "
    "SELECT w.saga_id, e.at, e.event, e.step, e.attempt, e.detail FROM written w, "
    "unnest(%s::float8[], %s::text[], %s::text[], %s::int[], %s::text[]) "
    "AS e(at, event, step, attempt, detail)"
)
_STATE_SET = (
    "status = %s, current_step_index = %s, completed_steps = %s::jsonb, "
    "compensated_steps = %s::jsonb, uncertain_steps = %s::jsonb, skipped_steps = %s::jsonb, "
    "context = %s::jsonb, updated_at = %s, failure_reason = %s, step_attempts = %s::jsonb, "
    "compensation_attempts = %s::jsonb"
)
_CREATE = (
    f"WITH written AS (INSERT INTO seamwork_sagas ({COLUMNS}) VALUES "
    "(%s, %s, %s, %s, %s, %s::jsonb, %s::jsonb, %s::jsonb, %s::jsonb, %s::jsonb, %s, %s, %s, "
    "%s, %s::jsonb, %s::jsonb, %s, %s) ON CONFLICT DO NOTHING RETURNING saga_id), "
    f"events AS ({_EVENTS}) SELECT count(*) FROM written"
)
_SAVE_OWNED = (
    f"WITH written AS (UPDATE seamwork_sagas SET {_STATE_SET}{{lease}} "
    "WHERE saga_id = %s AND lease_owner = %s RETURNING saga_id), "
    f"events AS ({_EVENTS}) SELECT count(*) FROM written"
)
_SAVE_RUNNING = _SAVE_OWNED.format(lease="")
# The lease the state carries: none, or a stuck saga's until its alert is out.
_SAVE_FINAL = _SAVE_OWNED.format(lease=", lease_owner = %s, lease_expires_at = %s")
_SAVE_STATUS = (
    f"WITH written AS (UPDATE seamwork_sagas SET {_STATE_SET}, lease_owner = %s, "
    "lease_expires_at = %s WHERE saga_id = %s AND status = %s RETURNING saga_id), "
    f"events AS ({_EVENTS}) SELECT count(*) FROM written"
)
# Claimable: an active saga whose lease is free or expired, or a stuck one whose lease
# (kept until its alert went out) expired.
_CLAIM = (
    f"SELECT {COLUMNS} FROM seamwork_sagas WHERE status IN ('running', 'compensating', "
    "'stuck') AND (lease_expires_at < %s OR lease_owner IS NULL AND status <> 'stuck') AND "
    "(status = 'stuck' OR (saga_name, saga_version) IN "
    "(SELECT * FROM unnest(%s::text[], %s::int[]))) AND saga_id <> ALL(%s::text[]) "
    "ORDER BY updated_at LIMIT %s FOR UPDATE SKIP LOCKED"
)
_ACTIVE = ("running", "compensating")
# The rows of ``owner`` among ``saga_ids``, locked in saga id order (the order the
# writer's batches lock them in, so neither waits on the other in a cycle).
_OWNED_IN_ORDER = (
    "SELECT saga_id FROM seamwork_sagas WHERE lease_owner = %s AND saga_id = ANY(%s) "
    'ORDER BY saga_id COLLATE "C" FOR UPDATE'  # byte order: Python's sort of the ids
)


def _event_params(events: Sequence[StepEvent]) -> tuple[list[Any], ...]:
    return (
        [e.at for e in events],
        [e.event for e in events],
        [e.step for e in events],
        [e.attempt for e in events],
        [e.detail for e in events],
    )


def _keys(runnable: Collection[SagaKey]) -> tuple[list[str], list[int]]:
    return [k[0] for k in runnable], [k[1] for k in runnable]


Statement = tuple[str, tuple[Any, ...], str]
"""SQL, its parameters, and the id of the saga whose row it writes."""


class _GroupCommit(_QueueOwner[Statement, int]):
    """One autocommit connection: a lone statement is its own transaction (one round
    trip); statements that queued meanwhile go as one pipelined transaction. Each
    statement resolves to its row count (the ``SELECT count(*)`` of its CTE).

    Every batch runs under the store's deadline; a stalled or broken connection fails
    its batch with ``StoreUnavailable`` (the outcome is unknown: callers re-read their
    row) and is replaced before the next batch."""

    _autocommit = True

    def __init__(self, dsn: str, deadline: float) -> None:
        super().__init__(dsn, name="saga", max_batch=256)
        self._deadline = deadline

    async def start(self) -> None:
        await self._start()

    def run(self, sql: str, params: tuple[Any, ...], saga_id: str) -> asyncio.Future[int]:
        """Execute a single-row-count statement writing ``saga_id``'s row; resolves to
        its count after commit."""
        return self._enqueue((sql, params, saga_id))

    async def _results(
        self, conn: AsyncConn, statements: list[Statement]
    ) -> list[int | BaseException]:
        try:
            return list(await self._timed(conn, statements))
        except StoreUnavailable:
            raise  # the whole batch: its outcome is unknown
        except Exception as exc:
            if len(statements) == 1:
                return [translate(exc, "saga store")]
        # One statement spoiled the shared transaction (nothing committed): run each
        # alone, so only the culprit fails. If the connection goes meanwhile, what
        # committed keeps its count and only the rest is in doubt.
        results: list[int | BaseException] = []
        for statement in statements:
            try:
                (count,) = await self._timed(conn, [statement])
            except StoreUnavailable as lost:
                results += [lost] * (len(statements) - len(results))
                break
            except Exception as exc:
                results.append(translate(exc, "saga store"))
                continue
            results.append(count)
        committed = sum(not isinstance(result, BaseException) for result in results)
        self.commits += max(committed - 1, 0)  # the caller counts one
        return results

    async def _reconnect_if_broken(self) -> None:
        """Keep trying (backing off to 2 s) before the next batch: transitions queued
        meanwhile wait for the database to come back instead of failing one by one."""
        delay = 0.05
        while self._conn is None or self._conn.closed:
            try:
                async with asyncio.timeout(self._deadline):
                    self._conn = await self._connect()
            except (StoreError, TimeoutError):
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    async def _timed(self, conn: AsyncConn, statements: list[Statement]) -> list[int]:
        """Run ``statements`` under the deadline. A lost or stalled connection closes
        (it is replaced before the next batch) and raises ``StoreUnavailable``."""
        try:
            async with deadline(self._deadline, [conn]):
                return await _execute(conn, statements)
        except (psycopg.OperationalError, TimeoutError) as exc:
            with contextlib.suppress(Exception):
                await conn.close()
            lost = translate(stalled(exc, self._deadline), "saga store")
            assert isinstance(lost, StoreUnavailable)
            raise lost from exc


async def _require_schema(conn: AsyncConn) -> None:
    """Refuse a database that holds no saga store, or one a newer seamwork wrote (it
    would be read and written by older rules); nothing is created or changed."""
    cursor = await conn.execute(
        "SELECT to_regclass('seamwork_sagas') IS NOT NULL,"
        " to_regclass('seamwork_migrations') IS NOT NULL"
    )
    found = await cursor.fetchone()
    if not (found and found[0]):
        raise StoreUnavailable("this database holds no seamwork saga store")
    if found[1]:
        cursor = await conn.execute("SELECT component, version FROM seamwork_migrations")
        applied = {row[0]: row[1] for row in await cursor.fetchall()}
        problem = newer_schema(applied, ((m.component, m.version) for m in SAGA_MIGRATIONS))
        if problem is not None:
            raise StoreUnavailable(f"cannot open the saga store: {problem}")


async def _execute(conn: AsyncConn, statements: list[Statement]) -> list[int]:
    if len(statements) == 1:
        sql, params, _ = statements[0]
        row = await (await conn.execute(sql.encode(), params)).fetchone()
        return [int(row[0]) if row else 0]
    # Rows are locked in saga id order, as renew() and release() lock them: a batch
    # and a renewal of the same sagas never wait on each other in a cycle.
    order = sorted(range(len(statements)), key=lambda i: statements[i][2])
    cursors = {}
    async with conn.transaction(), conn.pipeline():
        for i in order:
            sql, params, _ = statements[i]
            cursors[i] = await conn.execute(sql.encode(), params)
    counts = []
    for i in range(len(statements)):
        row = await cursors[i].fetchone()
        counts.append(int(row[0]) if row else 0)
    return counts


class PostgresStore:
    """``SagaStore`` in PostgreSQL; any number of orchestrator processes may share it.

    Args:
        dsn: a libpq connection string (tables go to the connection's schema).
        pool_size: connections for reads and claims.
        query_timeout: the application deadline of every statement, in seconds; a
            server that stalls (it never answers) is noticed after this, never hung on.
        create: create (migrate) the schema if needed; False for tools that must find
            an existing store and change nothing.
    """

    def __init__(
        self, dsn: str, *, pool_size: int = 4, query_timeout: float = 5.0, create: bool = True
    ) -> None:
        if not dsn:
            raise ConfigError("PostgresStore needs a DSN")
        if not query_timeout > 0:  # (NaN too: it would leave every statement unbounded)
            raise ConfigError(f"query_timeout must be > 0 seconds, got {query_timeout!r}")
        self._dsn = dsn
        self._deadline = query_timeout
        self._create = create
        self._writer = _GroupCommit(dsn, query_timeout)
        self._pool = make_pool(dsn, size=pool_size, name="seamwork-sagas")
        self._read_attempts = pool_size + 1  # past every idle connection, to a new one
        self._opened = False

    def __repr__(self) -> str:
        return "PostgresStore(...)"

    @property
    def commits(self) -> int:
        return self._writer.commits

    async def open(self) -> None:
        if self._opened:
            return
        conn = await connect(self._dsn, autocommit=False, what="saga store", within=self._deadline)
        try:
            if self._create:
                await migrate(conn, SAGA_MIGRATIONS)
            else:
                await _require_schema(conn)
        finally:
            await conn.close()
        self._pool = await open_pool(self._pool, "saga store")
        try:
            await self._writer.start()
        except BaseException:
            await self._pool.close()  # not opened after all: leave no connection behind
            raise
        self._opened = True

    async def aclose(self) -> None:
        if not self._opened:
            return
        self._opened = False
        await self._writer.close()
        await self._pool.close()

    async def attach(self, owner: str) -> None:
        """Release the leases of this worker's earlier incarnations (it restarted; they
        are dead, and any write they still attempt is fenced off by the new owner id)."""
        worker = owner.split(":", 1)[0]
        await self._fetch(  # (on a stuck saga, the lease marks an alert owed: due now)
            "UPDATE seamwork_sagas SET "
            "lease_owner = CASE WHEN status = 'stuck' THEN lease_owner END, "
            "lease_expires_at = CASE WHEN status = 'stuck' THEN 0 END "
            "WHERE lease_owner LIKE %s AND lease_owner <> %s "
            "AND status IN ('running', 'compensating', 'stuck') RETURNING saga_id",
            (f"{_escape_like(worker)}:%", owner),
        )

    async def create(self, state: SagaState, events: Sequence[StepEvent]) -> bool:
        params = (*insert_values(state), *_event_params(events))
        return await self._writer.run(_CREATE, params, state.saga_id) == 1

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
        values = state_values(state)
        if owner is not None and state.terminal:
            sql = _SAVE_FINAL
            lease = (state.lease_owner, state.lease_expires_at)
            params = (*values, *lease, state.saga_id, owner, *_event_params(events))
        elif owner is not None:
            sql = _SAVE_RUNNING
            params = (*values, state.saga_id, owner, *_event_params(events))
        else:
            assert expect_status is not None
            sql = _SAVE_STATUS
            lease = (state.lease_owner, state.lease_expires_at)
            params = (*values, *lease, state.saga_id, expect_status.value, *_event_params(events))
        if await self._writer.run(sql, params, state.saga_id) != 1:
            if owner is not None:
                raise LeaseLost(f"saga {state.saga_id!r} is not leased to {owner}")
            raise InvalidSagaOperation(f"saga {state.saga_id!r} is no longer {expect_status}")

    async def get(self, saga_id: str) -> SagaState | None:
        rows = await self._read(
            f"SELECT {COLUMNS} FROM seamwork_sagas WHERE saga_id = %s", (saga_id,)
        )
        return decode(rows[0]) if rows else None

    async def list(
        self, *, status: SagaStatus | None = None, name: str | None = None, limit: int = 100
    ) -> builtins.list[SagaState]:
        rows = await self._read(*list_query(status, name, limit, "%s"))
        return [s for s in map(decode_or_none, rows) if s is not None]

    async def timeline(self, saga_id: str) -> builtins.list[StepEvent]:
        rows = await self._read(
            "SELECT saga_id, at, event, step, attempt, detail FROM seamwork_saga_events "
            "WHERE saga_id = %s ORDER BY id",
            (saga_id,),
        )
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
        # Tried again at once on a connection that broke, as reads are: after a database
        # restart the pool still holds dead idle connections, and a claim that failed on
        # each in turn cost a recovery round apiece. A claim is safe to repeat: rows a
        # commit in doubt did lease are not claimable again, and wait out that lease.
        return await past_dead_connections(
            self._read_attempts,
            lambda: self._claim(owner, runnable, now, lease_seconds, limit),
        )

    async def _claim(
        self,
        owner: str,
        runnable: Collection[SagaKey],
        now: float,
        lease_seconds: float,
        limit: int,
    ) -> ClaimResult:
        names, versions = _keys(runnable)
        result = ClaimResult()
        conns: builtins.list[AsyncConn] = []
        try:
            async with deadline(self._deadline, conns), self._pool.connection() as conn:
                conns.append(conn)
                async with conn.transaction():
                    seen: builtins.list[str] = []  # ids read: the next page reads past them
                    page = limit
                    while page:
                        cursor = await conn.execute(_CLAIM, (now, names, versions, seen, page))
                        page = take_claimable(result, await cursor.fetchall(), limit, seen, page)
                    expires = now + lease_seconds
                    ids = [s.saga_id for s in result.claimed]
                    if ids:
                        await conn.execute(
                            "UPDATE seamwork_sagas SET lease_owner = %s, lease_expires_at = %s "
                            "WHERE saga_id = ANY(%s)",
                            (owner, expires, ids),
                        )
        except (psycopg.Error, TimeoutError) as exc:
            raise translate(stalled(exc, self._deadline), "saga store claim") from exc
        return split_claimed(result, owner, now + lease_seconds)

    async def renew(
        self, owner: str, saga_ids: Collection[str], *, now: float, lease_seconds: float
    ) -> set[str]:
        rows = await self._repeatable(
            f"UPDATE seamwork_sagas SET lease_expires_at = %s WHERE saga_id IN ({_OWNED_IN_ORDER}) "
            "RETURNING saga_id",
            (now + lease_seconds, owner, builtins.list(saga_ids)),
        )
        return {row[0] for row in rows}

    async def release(
        self, owner: str, saga_ids: Collection[str], *, status: SagaStatus | None = None
    ) -> None:
        only = "" if status is None else " AND status = %s"
        fence = () if status is None else (status.value,)
        await self._repeatable(
            "UPDATE seamwork_sagas SET lease_owner = NULL, lease_expires_at = NULL "
            f"WHERE saga_id IN ({_OWNED_IN_ORDER}){only} RETURNING saga_id",
            (owner, builtins.list(saga_ids), *fence),
        )

    async def stranded(self, runnable: Collection[SagaKey]) -> builtins.list[SagaState]:
        names, versions = _keys(runnable)
        rows = await self._fetch(
            f"SELECT {COLUMNS} FROM seamwork_sagas WHERE status IN ('running', 'compensating') "
            "AND (saga_name, saga_version) NOT IN (SELECT * FROM unnest(%s::text[], %s::int[])) "
            "ORDER BY updated_at",
            (names, versions),
        )
        return [s for s in map(decode_or_none, rows) if s is not None]

    async def _fetch(self, sql: str, params: tuple[Any, ...]) -> builtins.list[Any]:
        conns: builtins.list[AsyncConn] = []
        try:
            async with deadline(self._deadline, conns), self._pool.connection() as conn:
                conns.append(conn)
                cursor = await conn.execute(sql.encode(), params)
                return await cursor.fetchall()
        except (psycopg.Error, TimeoutError) as exc:
            raise translate(stalled(exc, self._deadline), "saga store") from exc

    async def _read(self, sql: str, params: tuple[Any, ...]) -> builtins.list[Any]:
        """``_fetch`` for a read, tried again at once on a connection that broke (the
        pool hands out connections that died while idle - a terminated backend, a
        failover - and drops each after its failure; one more try than the pool holds
        reaches a new connection). Other writes than ``_repeatable``'s are never retried
        here: their outcome would be unknown."""
        return await past_dead_connections(self._read_attempts, lambda: self._fetch(sql, params))

    async def _repeatable(self, sql: str, params: tuple[Any, ...]) -> builtins.list[Any]:
        """``_read`` for a write whose repeat changes nothing more (a renewal sets the
        same expiry, a release clears a lease once): after a database restart the pool
        still holds dead idle connections, and a renewal failing on each in turn cost a
        recovery round apiece, long enough with a tight lease to stop its sagas."""
        return await self._read(sql, params)


def _escape_like(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
