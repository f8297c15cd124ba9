"""The ``EventStore`` on PostgreSQL, with a gap-safe ``$all`` and no table lock.

Gap safety. A position taken from a sequence is assigned when a row is inserted but
becomes visible when its transaction commits, so a reader can see position 12
before 11 commits - and a subscriber that checkpointed 12 never sees 11. Here each
row's position is ``(transaction id << 20) + index within the transaction``
(``pg_current_xact_id()``), and readers only read below ``pg_snapshot_xmin`` of the
current snapshot - the oldest transaction still open. Every transaction below that
is finished, and every later one gets a larger id, so once a position is readable
nothing can ever appear before it. The price: a long-open transaction anywhere in the
cluster holds subscribers back until it ends (nothing is skipped, only delayed).

Appends are one round trip each (the ``seamwork_append_events`` function checks the
expected version under the stream row's lock - as the condition of the UPDATE that
bumps it -, computes versions and positions, and inserts). Concurrent appends are
group-committed by a ``PgBatcher``: the queued appends go to ``seamwork_append_batch``
in ONE statement on an autocommit connection, which runs each in its own
subtransaction (an exception block: a conflict rolls back only its own append) - one
round trip and one WAL flush for the whole batch.
An append's events travel as one JSON text (jsonb), built on the client with the C
encoder: psycopg's per-element array dumping cost more than the rest of an append.
Subscribers are woken by ``LISTEN seamwork_events``; ``poll_interval`` bounds the wait
when the notification was for events not yet below the horizon. A listening connection
that dies is reopened (and the subscribers woken once, for what it may have missed).
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import logging
import time
from collections.abc import Mapping, Sequence
from json.encoder import encode_basestring as _quote
from typing import Any, NamedTuple

import psycopg

from seamwork._core.checks import check_seconds
from seamwork.errors import (
    ConfigError,
    EventStoreError,
    SeamworkError,
    StoreError,
    StoreUnavailable,
    WrongExpectedVersion,
)
from seamwork.events._model import (
    ANY,
    AppendResult,
    ExpectedVersion,
    NewEvent,
    RecordedEvent,
    StreamInfo,
    check_expected_version,
    check_stream_name,
    encode_event,
    encode_json,
    encode_stream_metadata,
)
from seamwork.events._store import EventStore, check_snapshot_key
from seamwork.events._upcast import Upcasters
from seamwork.storage._pg import (
    AsyncConn,
    AsyncCursor,
    PgBatcher,
    PgMigration,
    PgWriter,
    connect,
    deadline,
    make_pool,
    open_pool,
    past_dead_connections,
    stalled,
    translate,
)

# The append's position offset within its transaction: the caller's ``p_seq`` (an
# autocommit append knows it: 0 alone, the running total in a batch), or - NULL, from
# ``append_in``, which may append several times in one transaction of the caller's -
# the ``seamwork.seq`` setting of the transaction, carried forward here.
# The stream row is bumped by one UPDATE whose condition is the expectation; only a
# missing stream or an unmet expectation takes the slow path (lock, look, create or
# refuse with the actual version).
_APPEND_EVENTS_FUNCTION = r"""
CREATE OR REPLACE FUNCTION seamwork_append_events(
    p_stream text, p_expected text, p_events jsonb, p_at double precision, p_seq int
) RETURNS TABLE (new_version bigint, last_position bigint) LANGUAGE plpgsql AS $$
DECLARE
    cur bigint;
    del boolean;
    visible bigint;
    n int := jsonb_array_length(p_events);
    seq int := p_seq;
    last bigint;
    base bigint;
BEGIN
    IF seq IS NULL THEN
        seq := coalesce(nullif(current_setting('seamwork.seq', true), ''), '0')::int;
        PERFORM set_config('seamwork.seq', (seq + n)::text, true);
    END IF;
    base := (pg_current_xact_id()::text::bigint << 20) + seq;
    UPDATE seamwork_streams s SET version = s.version + n, deleted = false,
            last_position = base + n - 1
        WHERE s.stream = p_stream AND (p_expected = 'any'
            OR p_expected = (CASE WHEN s.deleted THEN -1 ELSE s.version END)::text
            OR (p_expected = 'no_stream' AND (s.deleted OR s.version = -1))
            OR (p_expected = 'stream_exists' AND NOT s.deleted AND s.version >= 0))
            AND (s.last_position IS NULL OR s.last_position < base)
        RETURNING s.version - n INTO cur;
    IF NOT FOUND THEN
        SELECT s.version, s.deleted, s.last_position INTO cur, del, last
            FROM seamwork_streams s WHERE s.stream = p_stream FOR UPDATE;
        IF NOT FOUND THEN
            INSERT INTO seamwork_streams (stream, version) VALUES (p_stream, -1)
                ON CONFLICT DO NOTHING;
            SELECT s.version, s.deleted, s.last_position INTO cur, del, last
                FROM seamwork_streams s WHERE s.stream = p_stream FOR UPDATE;
        END IF;
        visible := CASE WHEN del THEN -1 ELSE cur END;
        IF NOT (p_expected = 'any' OR p_expected = visible::text
                OR (p_expected = 'no_stream' AND visible = -1)
                OR (p_expected = 'stream_exists' AND visible >= 0)) THEN
            RAISE EXCEPTION USING ERRCODE = 'SW001', MESSAGE = visible::text;
        END IF;
        IF last >= base THEN  -- a younger transaction appended first: $all would invert them
            RAISE EXCEPTION USING ERRCODE = '40001', MESSAGE = format(
                'stream %s was appended to by a transaction that began after this one; '
                'retry the transaction (its events would come before those in $all)', p_stream);
        END IF;
        UPDATE seamwork_streams SET version = cur + n, deleted = false,
                last_position = base + n - 1
            WHERE stream = p_stream;
    END IF;
    IF seq + n > 1048576 THEN  -- past it, positions would be the next transaction's
        RAISE EXCEPTION USING ERRCODE = 'SW002', MESSAGE = (seq + n)::text;
    END IF;
    INSERT INTO seamwork_events
        (position, stream, version, id, type, schema_version, data, metadata, recorded_at)
    SELECT base + e.i - 1, p_stream, cur + e.i, e.ev->>0, e.ev->>1, (e.ev->>2)::int,
           e.ev->3, nullif(e.ev->4, 'null'::jsonb), p_at
    FROM jsonb_array_elements(p_events) WITH ORDINALITY AS e(ev, i);
    PERFORM pg_notify('seamwork_events', '');
    new_version := cur + n;
    last_position := base + n - 1;
    RETURN NEXT;
END $$
"""

_APPEND_EVENTS_V4_SIGNATURE = r"""
CREATE OR REPLACE FUNCTION seamwork_append_events(
    p_stream text, p_expected text, p_events jsonb, p_at double precision
) RETURNS TABLE (new_version bigint, last_position bigint) LANGUAGE sql AS $$
    SELECT * FROM seamwork_append_events(p_stream, p_expected, p_events, p_at, NULL::int)
$$
"""

# Each append in its own subtransaction, at the offset the appends before it that
# succeeded have reached (one that failed rolled its rows back).
_APPEND_BATCH_FUNCTION = r"""
CREATE OR REPLACE FUNCTION seamwork_append_batch(p_appends jsonb, p_at double precision)
RETURNS TABLE (out_version bigint, out_position bigint, out_code text, out_detail text)
LANGUAGE plpgsql AS $$
DECLARE
    item jsonb;
    seq int := 0;
BEGIN
    FOR item IN SELECT value FROM jsonb_array_elements(p_appends) LOOP
        BEGIN
            SELECT a.new_version, a.last_position, NULL, NULL
                INTO out_version, out_position, out_code, out_detail
                FROM seamwork_append_events(item->>0, item->>1, item->2, p_at, seq) a;
            seq := seq + jsonb_array_length(item->2);
        EXCEPTION WHEN OTHERS THEN
            out_version := NULL;
            out_position := NULL;
            out_code := SQLSTATE;
            out_detail := SQLERRM;
        END;
        RETURN NEXT;
    END LOOP;
END $$
"""

# One step, idempotent: the schema before the first release went through three
# versions (array-argument functions, then jsonb ones); a database at any of them, or
# a fresh one, ends up the same.
EVENT_MIGRATIONS = (
    PgMigration(
        "events",
        3,
        (
            """CREATE TABLE IF NOT EXISTS seamwork_events (
                position bigint PRIMARY KEY,
                stream text NOT NULL,
                version bigint NOT NULL,
                id text NOT NULL UNIQUE,
                type text NOT NULL,
                schema_version integer NOT NULL,
                data jsonb NOT NULL,
                metadata jsonb,
                recorded_at double precision NOT NULL,
                UNIQUE (stream, version)
            )""",
            """CREATE TABLE IF NOT EXISTS seamwork_streams (
                stream text PRIMARY KEY,
                version bigint NOT NULL,
                truncate_before bigint NOT NULL DEFAULT 0,
                deleted boolean NOT NULL DEFAULT false,
                metadata jsonb NOT NULL DEFAULT '{}'
            )""",
            """CREATE TABLE IF NOT EXISTS seamwork_snapshots (
                stream text NOT NULL,
                name text NOT NULL,
                version bigint NOT NULL,
                state jsonb NOT NULL,
                PRIMARY KEY (stream, name, version)
            )""",
            _APPEND_EVENTS_FUNCTION,
            _APPEND_BATCH_FUNCTION,
            "DROP FUNCTION IF EXISTS seamwork_append_many(text[], text[], int[], text[], "
            "text[], int[], text[], text[], double precision)",
            "DROP FUNCTION IF EXISTS seamwork_append(text, text, text[], text[], int[], "
            "text[], text[], double precision)",
        ),
    ),
    # The append refuses a transaction past 2**20 events (SW002).
    PgMigration("events", 4, (_APPEND_EVENTS_FUNCTION,)),
    # The offset within the transaction comes as an argument (p_seq), and the stream
    # row is bumped by one UPDATE. The four-argument append stays, as the new one with
    # the offset taken from the transaction: a process of the version before, still
    # running while another upgrades the schema, goes on appending.
    PgMigration(
        "events",
        5,
        (_APPEND_EVENTS_FUNCTION, _APPEND_BATCH_FUNCTION, _APPEND_EVENTS_V4_SIGNATURE),
    ),
    # A stream row keeps its last event's position: an append whose transaction began
    # before the one that wrote it would go below it in $all (the stream's versions out
    # of order there), and is refused as a serialization failure (a batch retries it
    # alone, in a new transaction).
    PgMigration(
        "events",
        6,
        (
            "ALTER TABLE seamwork_streams ADD COLUMN IF NOT EXISTS last_position bigint",
            _APPEND_EVENTS_FUNCTION,
        ),
    ),
)

_RELISTEN_FIRST_DELAY = 0.05  # seconds before a lost listener connects again, doubling
_RELISTEN_MAX_DELAY = 2.0
log = logging.getLogger("seamwork.storage")

_APPEND_SQL = (
    b"SELECT * FROM seamwork_append_events(%b::text, %b::text, %b::jsonb, %b::float8, %b::int4)"
)
_APPEND_BATCH_SQL = b"SELECT * FROM seamwork_append_batch(%b::jsonb, %b::float8)"
_COLUMNS = "position, stream, version, type, data, metadata, recorded_at, id, schema_version"
_HORIZON = "(pg_snapshot_xmin(pg_current_snapshot())::text::bigint << 20)"


class PostgresEventStore(EventStore):
    """``EventStore`` in PostgreSQL.

    Args:
        dsn: a libpq connection string; tables go to the connection's schema.
        upcasters: applied on read; with ``known_types``, checked on append.
        poll_interval: longest wait of a live subscription between looks.
        pool_size: connections for reads.
        query_timeout: the application deadline of every append, write and read, in
            seconds: a server that stalls (it never answers) fails the call with
            ``StoreUnavailable`` after this - an append's outcome then unknown - and
            its connection is replaced; nothing waits on it for good.
    """

    def __init__(
        self,
        dsn: str,
        *,
        upcasters: Upcasters | None = None,
        poll_interval: float = 0.05,
        pool_size: int = 4,
        query_timeout: float = 5.0,
    ) -> None:
        super().__init__(upcasters=upcasters)
        check_seconds("poll_interval", poll_interval)  # (NaN: a busy loop, or a ValueError)
        if not query_timeout > 0:
            raise ConfigError(f"query_timeout must be > 0 seconds, got {query_timeout!r}")
        self._dsn = dsn
        self._deadline = query_timeout
        self._writer = PgWriter(dsn, name="event", deadline=query_timeout)
        self._appender: PgBatcher[AppendParams, AppendResult] = PgBatcher(
            dsn, _append_batch, name="event-append", deadline=query_timeout
        )
        self._pool = make_pool(dsn, size=pool_size, name="seamwork-events")
        self._read_attempts = pool_size + 1  # past every idle connection, to a new one
        self._poll = poll_interval
        self._listener: AsyncConn | None = None
        self._listen_task: asyncio.Task[None] | None = None
        self._notified: asyncio.Event | None = None  # set, and dropped, by each wake-up
        self._wake_count = 0
        self._listen_lock = asyncio.Lock()
        self._opened = False

    def __repr__(self) -> str:
        return "PostgresEventStore(...)"

    @property
    def commits(self) -> int:
        return self._writer.commits + self._appender.commits

    async def open(self) -> None:
        if self._opened:
            return
        await self._writer.start(EVENT_MIGRATIONS)
        try:
            await self._appender.start()
            try:
                self._pool = await open_pool(self._pool, "event store")
            except BaseException:
                await self._appender.close()
                raise
        except BaseException:
            await self._writer.close()
            raise
        self._opened = self._used = True

    async def aclose(self) -> None:
        self._used = True
        # First: a subscriber woken by the listener's end must not start another one
        opened, self._opened = self._opened, False
        if self._listen_task is not None:
            self._listen_task.cancel()
            await asyncio.gather(self._listen_task, return_exceptions=True)
            self._listen_task = None
        if self._listener is not None:
            await self._listener.close()
            self._listener = None
        if opened:
            await self._pool.close()
            await self._appender.close()
            await self._writer.close()

    # --- writing ---------------------------------------------------------------------

    async def append(
        self,
        stream: str,
        events: Sequence[NewEvent],
        *,
        expected_version: ExpectedVersion = ANY,
    ) -> AppendResult:
        params = self._append_params(stream, events, expected_version)
        if not self._used:
            await self._open_on_first_use()
        return await self._appender.submit(AppendParams(params, expected_version))

    async def append_in(
        self,
        conn: AsyncConn,
        stream: str,
        events: Sequence[NewEvent],
        *,
        expected_version: ExpectedVersion = ANY,
    ) -> AppendResult:
        """Append inside the caller's own transaction on ``conn`` (with other writes of
        the service, atomically). The events are visible when that transaction commits;
        ``$all`` stays gap-safe however long it stays open."""
        params = self._append_params(stream, events, expected_version)
        if not self._used:  # the schema (its append function) is made by open()
            await self._open_on_first_use()
        return await _append(conn.cursor(), params, expected_version, None)

    def _append_params(
        self, stream: str, events: Sequence[NewEvent], expected_version: ExpectedVersion
    ) -> tuple[Any, ...]:
        self._check_append(stream, events)
        check_expected_version(expected_version)
        return (stream, str(expected_version), _events_json(events), time.time())

    async def set_stream_metadata(self, stream: str, metadata: Mapping[str, Any]) -> None:
        text = encode_stream_metadata(stream, metadata)

        async def update(conn: AsyncConn) -> None:
            await conn.execute(
                "INSERT INTO seamwork_streams (stream, version, metadata) VALUES (%s, -1, %s) "
                "ON CONFLICT (stream) DO UPDATE SET metadata = excluded.metadata",
                (stream, text),
            )

        if not self._used:
            await self._open_on_first_use()
        await self._writer.write(update)

    async def delete_stream(self, stream: str, *, expected_version: ExpectedVersion = ANY) -> None:
        check_stream_name(stream)
        check_expected_version(expected_version)

        async def delete(conn: AsyncConn) -> None:
            cursor = await conn.execute(
                "SELECT version, deleted FROM seamwork_streams WHERE stream = %s FOR UPDATE",
                (stream,),
            )
            row = await cursor.fetchone()
            visible = -1 if row is None or row[1] else int(row[0])
            if not _satisfied(expected_version, visible):
                raise WrongExpectedVersion(stream, expected_version, visible)
            if visible >= 0:
                await conn.execute(
                    "UPDATE seamwork_streams SET deleted = true, truncate_before = version + 1 "
                    "WHERE stream = %s",
                    (stream,),
                )

        if not self._used:
            await self._open_on_first_use()
        await self._writer.write(delete)

    async def stream_info(self, stream: str) -> StreamInfo | None:
        check_stream_name(stream)
        row = await self._fetchone(
            "SELECT version, metadata, deleted FROM seamwork_streams WHERE stream = %s", (stream,)
        )
        if row is None:
            return None
        return StreamInfo(stream, -1 if row[2] else int(row[0]), dict(row[1]), bool(row[2]))

    async def save_snapshot(self, stream: str, name: str, version: int, state: Any) -> None:
        check_snapshot_key(stream, name, "version", version)
        text = encode_json(state, f"snapshot {name!r} of {stream!r}")

        async def save(conn: AsyncConn) -> None:
            await conn.execute(
                "INSERT INTO seamwork_snapshots (stream, name, version, state) "
                "VALUES (%s, %s, %s, %s) "
                "ON CONFLICT (stream, name, version) DO UPDATE SET state = excluded.state",
                (stream, name, version, text),
            )

        if not self._used:
            await self._open_on_first_use()
        await self._writer.write(save)

    async def load_snapshot(
        self, stream: str, name: str, max_version: int
    ) -> tuple[int, Any] | None:
        check_snapshot_key(stream, name, "max_version", max_version)
        row = await self._fetchone(
            "SELECT s.version, s.state FROM seamwork_snapshots s "
            "JOIN seamwork_streams t ON t.stream = s.stream "
            "WHERE s.stream = %s AND s.name = %s AND s.version <= %s "
            "AND s.version >= t.truncate_before AND s.version <= t.version "
            "ORDER BY s.version DESC LIMIT 1",
            (stream, name, max_version),
        )
        return None if row is None else (int(row[0]), row[1])

    # --- raw reads -------------------------------------------------------------------

    async def _read_stream(
        self,
        stream: str,
        from_version: int,
        to_version: int | None,
        backwards: bool,
        limit: int | None,
    ) -> builtins.list[RecordedEvent]:
        order = "DESC" if backwards else "ASC"
        sql = (
            f"SELECT {_COLUMNS} FROM seamwork_events WHERE stream = %s AND version >= %s "
            "AND version <= %s AND version >= (SELECT coalesce(max(truncate_before), 0) "
            "FROM seamwork_streams WHERE stream = %s) "
            f"ORDER BY version {order} LIMIT %s"
        )
        upper = to_version if to_version is not None else 2**62
        return await self._fetch_events(sql, (stream, from_version, upper, stream, limit))

    async def _read_all(self, from_position: int, limit: int) -> builtins.list[RecordedEvent]:
        sql = (
            f"SELECT {_COLUMNS} FROM seamwork_events WHERE position > %s "
            f"AND position < {_HORIZON} ORDER BY position LIMIT %s"
        )
        return await self._fetch_events(sql, (from_position, limit))

    def _is_closed(self) -> bool:
        return self._used and not self._opened

    async def _commit_bound(self) -> int:
        # every transaction that committed so far has an id below the snapshot's xmax
        row = await self._fetchone(
            "SELECT pg_snapshot_xmax(pg_current_snapshot())::text::bigint << 20", ()
        )
        return int(row[0])

    async def _horizon(self) -> int:
        row = await self._fetchone(f"SELECT {_HORIZON}", ())
        return int(row[0])

    async def _version_at(self, stream: str, when: float) -> int:
        row = await self._fetchone(
            "SELECT max(version) FROM seamwork_events WHERE stream = %s AND recorded_at <= %s",
            (stream, when),
        )
        return -1 if row is None or row[0] is None else int(row[0])

    def _wakes(self) -> int:
        return self._wake_count

    def _wake(self) -> None:
        """Wake every waiting reader, and tell the busy ones (``_wakes`` moved on): a
        shared event that a woken reader cleared would hide the news from them."""
        self._wake_count += 1
        notified, self._notified = self._notified, None
        if notified is not None:
            notified.set()

    async def _wait_for_events(self, after_position: int, wakes: int) -> None:
        if not self._opened:  # woken by aclose, or never opened: no listener to start
            raise StoreError("the event store is closed")
        if self._listen_task is None or self._listen_task.done():
            async with self._listen_lock:  # subscribers going live together: one listener
                if self._listen_task is None or self._listen_task.done():
                    await self._listen()
        if self._wake_count != wakes:
            return  # notified while this reader read or handled events
        if self._notified is None:
            self._notified = asyncio.Event()
        notified = self._notified
        try:
            async with asyncio.timeout(self._poll):
                await notified.wait()
        except TimeoutError:
            return

    async def _listen(self) -> None:
        """Start the listener, or start it again if its relay ended (it only ends on
        an error it cannot take as a lost connection: that is logged)."""
        ended, self._listen_task = self._listen_task, None
        if ended is not None:
            error = None if ended.cancelled() else ended.exception()
            log.error(
                "event listener stopped (%s); starting it again",
                f"{type(error).__name__}: {error}" if error else "cancelled",
                exc_info=error,
            )
        stale, self._listener = self._listener, None
        if stale is not None:
            with contextlib.suppress(Exception):
                await stale.close()
        if not self._opened:  # closed while this waited for the lock
            raise StoreError("the event store is closed")
        listener = await self._open_listener()
        if not self._opened:  # closed while it connected
            await listener.close()
            raise StoreError("the event store is closed")
        self._listener = listener
        self._listen_task = asyncio.create_task(
            self._relay_notifications(), name="seamwork-event-listener"
        )
        self._wake()  # what committed between the reader's read and LISTEN was notified to nobody

    async def _open_listener(self) -> AsyncConn:
        try:  # a stalled server would hold the handshake, and the subscriber, for good
            async with asyncio.timeout(self._deadline):
                conn = await connect(self._dsn, autocommit=True, what="event listener")
        except TimeoutError as exc:
            raise StoreUnavailable(
                f"cannot connect the event listener to PostgreSQL: no answer within "
                f"{self._deadline:g}s"
            ) from exc
        try:
            async with deadline(self._deadline, [conn]):
                await conn.execute("LISTEN seamwork_events")
        except BaseException as exc:
            await conn.close()
            if isinstance(exc, TimeoutError):
                raise translate(stalled(exc, self._deadline), "event listener") from exc
            raise
        return conn

    async def _relay_notifications(self) -> None:
        """Wake subscribers on each notification; when the listening connection dies,
        open another (subscribers would otherwise only find events by polling)."""
        try:
            await self._relay()
        finally:  # ended by an error it cannot take as a lost connection (or aclose):
            self._wake()  # the subscribers look again, and start a listener again

    async def _relay(self) -> None:
        """The loss of the connection is logged once, and so is its recovery: the
        attempts in between (one every 2 s while the server is down) log at debug."""
        delay = _RELISTEN_FIRST_DELAY
        while True:
            try:
                if self._listener is None:
                    self._listener = await self._open_listener()
                    log.warning("event listener is listening again")
                    delay = _RELISTEN_FIRST_DELAY
                    self._wake()  # events may have been appended while it was away
                async for _ in self._listener.notifies():
                    self._wake()
                raise psycopg.OperationalError("the notification stream ended")
            except (psycopg.Error, StoreUnavailable) as exc:
                if self._listener is not None:  # connected until now
                    log.warning("event listener lost its connection (%s); reconnecting", exc)
                else:
                    log.debug("event listener cannot reconnect yet (%s)", exc)
                lost, self._listener = self._listener, None
                if lost is not None:
                    await lost.close()
                await asyncio.sleep(delay)
                delay = min(delay * 2, _RELISTEN_MAX_DELAY)

    async def _fetch_events(
        self, sql: str, params: tuple[Any, ...]
    ) -> builtins.list[RecordedEvent]:
        rows = await self._fetch(sql, params)
        return [RecordedEvent(r[1], r[2], r[0], r[3], r[4], r[5], r[6], r[7], r[8]) for r in rows]

    async def _fetchone(self, sql: str, params: tuple[Any, ...]) -> Any:
        rows = await self._fetch(sql, params)
        return rows[0] if rows else None

    async def _fetch(self, sql: str, params: tuple[Any, ...]) -> builtins.list[Any]:
        """A read, tried again at once on a connection that broke: the pool hands out
        connections that died while idle (a terminated backend, a failover) and drops
        each after its failure, so one more try than the pool holds reaches a new one.
        (Every ``_fetch`` is a read; writes are never retried: their outcome would be
        unknown.)"""
        if not self._used:
            await self._open_on_first_use()
        return await past_dead_connections(
            self._read_attempts, lambda: self._fetch_once(sql, params)
        )

    async def _fetch_once(self, sql: str, params: tuple[Any, ...]) -> builtins.list[Any]:
        """Run a read under the deadline (a stalled server fails it, never hangs it)."""
        conns: builtins.list[AsyncConn] = []
        try:
            async with deadline(self._deadline, conns), self._pool.connection() as conn:
                conns.append(conn)
                cursor = await conn.execute(sql.encode(), params)
                return await cursor.fetchall()
        except (psycopg.Error, TimeoutError) as exc:
            raise translate(stalled(exc, self._deadline), "event store read") from exc


async def _append(
    cursor: AsyncCursor, params: tuple[Any, ...], expected: ExpectedVersion, seq: int | None
) -> AppendResult:
    """One append: at offset ``seq`` of its transaction, or - ``None``, in a transaction
    of the caller's - after the transaction's earlier appends."""
    try:
        await cursor.execute(_APPEND_SQL, (*params, seq))
    except psycopg.Error as exc:
        raise _append_error(exc, params[0], expected) from exc
    row = await cursor.fetchone()
    assert row is not None
    return AppendResult(int(row[0]), int(row[1]))


class AppendParams(NamedTuple):
    """One queued append: ``seamwork_append_events``'s arguments and the caller's
    expectation."""

    params: tuple[Any, ...]
    expected: ExpectedVersion


# Lost a lock race with another store's batch (each append's subtransaction took its
# stream's row lock): by the time the batch has committed, the winner's locks are gone.
# Or the batch's transaction ran out of positions (SW002): alone, the append has its own.
_RETRY_ALONE = frozenset({"40P01", "40001", "SW002"})
# Alone, an append still meets these now and then: a deadlock, or a transaction that
# began after its own appended to the stream first (40001: its events would come before
# that one's in $all). A new transaction - a new, later id - is all it takes.
_RETRY_AGAIN = frozenset({"40P01", "40001"})
_ALONE_ATTEMPTS = 5
_MAX_EVENTS_PER_TRANSACTION = 1 << 20


async def _append_alone(cursor: AsyncCursor, item: AppendParams) -> AppendResult:
    """``item`` in an autocommit transaction of its own, tried again in a new one (up
    to ``_ALONE_ATTEMPTS`` in all) while it fails for a reason a new one removes."""
    for _ in range(_ALONE_ATTEMPTS - 1):
        try:
            return await _append(cursor, item.params, item.expected, 0)
        except SeamworkError as exc:
            cause = exc.__cause__
            if not (isinstance(cause, psycopg.Error) and cause.sqlstate in _RETRY_AGAIN):
                raise
    return await _append(cursor, item.params, item.expected, 0)


async def _append_batch(
    cursor: AsyncCursor, batch: builtins.list[AppendParams]
) -> builtins.list[AppendResult | BaseException]:
    """Run queued appends in one statement (autocommit: one transaction)."""
    if len(batch) == 1:
        try:
            return [await _append_alone(cursor, batch[0])]
        except EventStoreError as exc:
            return [exc]
    appends = ",".join(
        [f"[{_quote(i.params[0])},{_quote(i.params[1])},{i.params[2]}]" for i in batch]
    )
    await cursor.execute(_APPEND_BATCH_SQL, (f"[{appends}]", batch[0].params[3]))
    rows = await cursor.fetchall()
    results: builtins.list[AppendResult | BaseException] = []
    for item, row in zip(batch, rows, strict=True):
        if row[2] not in _RETRY_ALONE:
            results.append(_batch_result(item, row))
            continue
        try:  # the batch is committed: report, never raise, from here on
            results.append(await _append_alone(cursor, item))
        except SeamworkError as exc:
            results.append(exc)
    return results


def _batch_result(item: AppendParams, row: tuple[Any, ...]) -> AppendResult | BaseException:
    version, position, code, detail = row
    if code is None:
        return AppendResult(int(version), int(position))
    stream = item.params[0]
    if code == "SW001":
        return WrongExpectedVersion(stream, item.expected, int(detail))
    if code == "SW002":
        return _too_many(stream, detail)
    if code == "23505":
        return EventStoreError(
            f"append to {stream!r} refused: an event id was already stored ({detail})"
        )
    return translate(_driver_error(code, detail), f"append to {stream!r}")


def _driver_error(code: str, detail: str) -> psycopg.Error:
    """The exception psycopg raises for ``code``, rebuilt from a batch row, so an append
    that failed inside a batch is translated exactly as one that ran alone."""
    try:
        cls = psycopg.errors.lookup(code)
    except KeyError:
        cls = psycopg.DatabaseError
    return cls(f"[{code}] {detail}")


def _events_json(events: Sequence[NewEvent]) -> str:
    """``[[id, type, schema_version, data, metadata], ...]`` as JSON text."""
    return "[" + ",".join([_event_json(e) for e in events]) + "]"


def _event_json(e: NewEvent) -> str:
    data, meta = encode_event(e)
    return f"[{_quote(e.id)},{_quote(e.type)},{e.schema_version},{data},{meta or 'null'}]"


def _satisfied(expected: ExpectedVersion, visible: int) -> bool:
    if expected == "any":
        return True
    if expected == "no_stream":
        return visible == -1
    if expected == "stream_exists":
        return visible >= 0
    return expected == visible


def _append_error(exc: psycopg.Error, stream: str, expected: ExpectedVersion) -> BaseException:
    if exc.sqlstate == "SW001":
        actual = int(exc.diag.message_primary or "-1")
        return WrongExpectedVersion(stream, expected, actual)
    if exc.sqlstate == "SW002":
        return _too_many(stream, exc.diag.message_primary)
    if isinstance(exc, psycopg.errors.UniqueViolation):
        return EventStoreError(
            f"append to {stream!r} refused: an event id was already stored ({exc})"
        )
    return translate(exc, f"append to {stream!r}")


def _too_many(stream: str, total: str | None) -> EventStoreError:
    return EventStoreError(
        f"append to {stream!r} refused: one PostgreSQL transaction holds at most "
        f"{_MAX_EVENTS_PER_TRANSACTION:,} events (positions are the transaction id << 20 "
        f"plus an index), and this append would bring it to {total}; split it"
    )
