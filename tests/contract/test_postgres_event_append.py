"""The PostgreSQL append function on each of its paths: alone (autocommit), in a
group-committed batch, and in the caller's own transaction (``append_in``)."""

from __future__ import annotations

import asyncio
from typing import Any

import psycopg
import pytest

from seamwork.errors import EventStoreError, StoreError, WrongExpectedVersion
from seamwork.events import ANY, NO_STREAM, STREAM_EXISTS, ExpectedVersion, NewEvent
from seamwork.storage import postgres_events
from seamwork.storage._pg import migrate

pytestmark = pytest.mark.postgres

# A stream in each state an append can find: none, metadata only (version -1), live at
# version 1, soft-deleted at version 1 (reads as -1; its versions go on from 2).
STATES = ("missing", "metadata", "live", "deleted")
EXPECTATIONS: tuple[ExpectedVersion, ...] = (ANY, NO_STREAM, STREAM_EXISTS, 0, 1)
VISIBLE = {"missing": -1, "metadata": -1, "live": 1, "deleted": -1}
STORED = {"missing": -1, "metadata": -1, "live": 1, "deleted": 1}


def _admits(expected: ExpectedVersion, visible: int) -> bool:
    if expected == ANY:
        return True
    if expected == NO_STREAM:
        return visible == -1
    if expected == STREAM_EXISTS:
        return visible >= 0
    return expected == visible


async def _prepare(store: postgres_events.PostgresEventStore, stream: str, state: str) -> None:
    if state in ("metadata", "live", "deleted"):
        await store.set_stream_metadata(stream, {"owner": state})
    if state in ("live", "deleted"):
        await store.append(stream, [NewEvent("A"), NewEvent("B")])
    if state == "deleted":
        await store.delete_stream(stream)


async def _append_in(
    store: postgres_events.PostgresEventStore, dsn: str, stream: str, expected: ExpectedVersion
) -> Any:
    conn = await psycopg.AsyncConnection.connect(dsn)
    async with conn, conn.transaction():
        return await store.append_in(conn, stream, [NewEvent("C")], expected_version=expected)


@pytest.mark.parametrize("path", ["alone", "batch", "append_in"])
async def test_every_expectation_against_every_stream_state(pg_dsn: str, path: str) -> None:
    """Admitted appends continue the stored versions and clear a deletion, refused ones
    name the visible version; neither touches the stream's metadata."""
    async with postgres_events.PostgresEventStore(pg_dsn) as store:
        cases = [(state, expected) for state in STATES for expected in EXPECTATIONS]
        names = [f"{state}-{expected}" for state, expected in cases]
        for name, (state, _) in zip(names, cases, strict=True):
            await _prepare(store, name, state)
        appends = [
            _append_in(store, pg_dsn, name, expected)
            if path == "append_in"
            else store.append(name, [NewEvent("C")], expected_version=expected)
            for name, (_, expected) in zip(names, cases, strict=True)
        ]
        if path == "alone":
            results = [await _settled(append) for append in appends]
        else:  # the batcher takes what queued together in one statement
            results = await asyncio.gather(*appends, return_exceptions=True)
        for name, (state, expected), result in zip(names, cases, results, strict=True):
            info = await store.stream_info(name)
            metadata = {} if state == "missing" else {"owner": state}
            if _admits(expected, VISIBLE[state]):
                assert not isinstance(result, BaseException), (name, result)
                assert result.version == STORED[state] + 1
                assert info is not None
                assert (info.version, info.deleted, info.metadata) == (
                    STORED[state] + 1,
                    False,
                    metadata,
                )
                kept = ["A", "B"] if state == "live" else []
                assert [e.type for e in await store.read_stream(name)] == [*kept, "C"]
            else:
                assert isinstance(result, WrongExpectedVersion), (name, result)
                assert (result.expected, result.actual) == (expected, VISIBLE[state])
                if state == "missing":
                    assert info is None or info.version == -1
                else:
                    assert info is not None
                    assert (info.version, info.metadata) == (VISIBLE[state], metadata)


async def _settled(append: Any) -> Any:
    try:
        return await append
    except Exception as exc:
        return exc


async def test_a_batch_gives_each_append_the_offsets_after_those_that_succeeded(
    pg_dsn: str,
) -> None:
    async with postgres_events.PostgresEventStore(pg_dsn) as store:
        await store.append("taken", [NewEvent("A")])
        commits = store.commits
        results = await asyncio.gather(
            store.append("a", [NewEvent("A1"), NewEvent("A2")]),
            store.append("taken", [NewEvent("X")], expected_version=NO_STREAM),
            store.append("b", [NewEvent("B1"), NewEvent("B2"), NewEvent("B3")]),
            return_exceptions=True,
        )
        assert store.commits == commits + 1  # one batch, one transaction
        assert isinstance(results[1], WrongExpectedVersion)
        stored = [e for e in await store.read_all() if e.stream in ("a", "b")]
        assert len({e.position >> 20 for e in stored}) == 1
        assert [(e.type, e.position & 0xFFFFF) for e in stored] == [
            ("A1", 0),
            ("A2", 1),
            ("B1", 2),
            ("B2", 3),
            ("B3", 4),
        ]


async def test_appends_in_one_transaction_of_the_callers_take_consecutive_offsets(
    pg_dsn: str,
) -> None:
    async with postgres_events.PostgresEventStore(pg_dsn) as store:
        conn = await psycopg.AsyncConnection.connect(pg_dsn)
        async with conn, conn.transaction():
            await store.append_in(conn, "a", [NewEvent("A1"), NewEvent("A2")])
            await store.append_in(conn, "b", [NewEvent("B1")])
            await store.append_in(conn, "a", [NewEvent("A3")])
        stored = await store.read_all()
        assert len({e.position >> 20 for e in stored}) == 1
        assert [(e.type, e.position & 0xFFFFF) for e in stored] == [
            ("A1", 0),
            ("A2", 1),
            ("B1", 2),
            ("A3", 3),
        ]


async def test_an_offset_argument_past_2_to_the_20_events_is_refused(pg_dsn: str) -> None:
    """The offset a batch passes is checked as the one append_in carries is."""
    async with postgres_events.PostgresEventStore(pg_dsn) as store:
        async with await psycopg.AsyncConnection.connect(pg_dsn, autocommit=True) as conn:
            params = ("big", "any", '[["e1","A",1,{},null],["e2","B",1,{},null]]', 0.0)
            with pytest.raises(EventStoreError, match="1,048,576 events"):
                await postgres_events._append(conn.cursor(), params, ANY, (1 << 20) - 1)
            last = await postgres_events._append(conn.cursor(), params, ANY, (1 << 20) - 2)
        assert last.position & 0xFFFFF == (1 << 20) - 1
        assert [e.id for e in await store.read_stream("big")] == ["e1", "e2"]


async def test_a_database_at_events_schema_v4_is_upgraded_in_place(pg_dsn: str) -> None:
    """The offset-argument append joins v4's four-argument one, which becomes a call of
    it (a process of the version before, still running, appends on); the events
    already stored stay, and every path appends."""
    async with await psycopg.AsyncConnection.connect(pg_dsn, autocommit=True) as conn:
        await migrate(conn, postgres_events.EVENT_MIGRATIONS[:2])
        for statement in (_V4_DROP, _V4_APPEND_EVENTS, _V4_APPEND_BATCH):
            await conn.execute(statement.encode())
        await conn.execute(
            "SELECT * FROM seamwork_append_events('old', 'any', '[[\"e0\",\"A\",1,{},null]]', 0)"
        )
    async with postgres_events.PostgresEventStore(pg_dsn) as store:
        async with await psycopg.AsyncConnection.connect(pg_dsn, autocommit=True) as conn:
            cursor = await conn.execute(
                "SELECT pg_get_function_identity_arguments(p.oid) FROM pg_proc p "
                "WHERE p.proname = 'seamwork_append_events' "
                "AND p.pronamespace = current_schema()::regnamespace"
            )
            assert sorted(row[0] for row in await cursor.fetchall()) == [
                "p_stream text, p_expected text, p_events jsonb, p_at double precision",
                "p_stream text, p_expected text, p_events jsonb, p_at double precision, "
                "p_seq integer",
            ]
            cursor = await conn.execute(
                "SELECT version FROM seamwork_migrations WHERE component = 'events'"
            )
            assert await cursor.fetchall() == [(postgres_events.EVENT_MIGRATIONS[-1].version,)]
        await store.append("old", [NewEvent("B")], expected_version=0)
        await asyncio.gather(*(store.append("old", [NewEvent("C")]) for _ in range(3)))
        await _append_in(store, pg_dsn, "old", 4)
        # a process of the version before, still running, appends as it did
        async with await psycopg.AsyncConnection.connect(pg_dsn, autocommit=True) as conn:
            await conn.execute(
                "SELECT * FROM seamwork_append_events('old', '5', '[[\"e9\",\"D\",1,{},null]]', 0)"
            )
        assert [e.version for e in await store.read_stream("old")] == [0, 1, 2, 3, 4, 5, 6]


# The events schema v4's functions, as it created them.
_V4_DROP = (
    "DROP FUNCTION IF EXISTS seamwork_append_events(text, text, jsonb, double precision, int)"
)
_V4_APPEND_EVENTS = r"""
CREATE OR REPLACE FUNCTION seamwork_append_events(
    p_stream text, p_expected text, p_events jsonb, p_at double precision
) RETURNS TABLE (new_version bigint, last_position bigint) LANGUAGE plpgsql AS $$
DECLARE
    cur bigint;
    del boolean;
    visible bigint;
    n int := jsonb_array_length(p_events);
    seq int;
    base bigint;
BEGIN
    SELECT s.version, s.deleted INTO cur, del FROM seamwork_streams s
        WHERE s.stream = p_stream FOR UPDATE;
    IF NOT FOUND THEN
        INSERT INTO seamwork_streams (stream, version) VALUES (p_stream, -1)
            ON CONFLICT DO NOTHING;
        SELECT s.version, s.deleted INTO cur, del FROM seamwork_streams s
            WHERE s.stream = p_stream FOR UPDATE;
    END IF;
    visible := CASE WHEN del THEN -1 ELSE cur END;
    IF NOT (p_expected = 'any' OR p_expected = visible::text
            OR (p_expected = 'no_stream' AND visible = -1)
            OR (p_expected = 'stream_exists' AND visible >= 0)) THEN
        RAISE EXCEPTION USING ERRCODE = 'SW001', MESSAGE = visible::text;
    END IF;
    seq := coalesce(nullif(current_setting('seamwork.seq', true), ''), '0')::int;
    IF seq + n > 1048576 THEN  -- past it, positions would be the next transaction's
        RAISE EXCEPTION USING ERRCODE = 'SW002', MESSAGE = (seq + n)::text;
    END IF;
    base := (pg_current_xact_id()::text::bigint << 20) + seq;
    PERFORM set_config('seamwork.seq', (seq + n)::text, true);
    INSERT INTO seamwork_events
        (position, stream, version, id, type, schema_version, data, metadata, recorded_at)
    SELECT base + e.i - 1, p_stream, cur + e.i, e.ev->>0, e.ev->>1, (e.ev->>2)::int,
           e.ev->3, nullif(e.ev->4, 'null'::jsonb), p_at
    FROM jsonb_array_elements(p_events) WITH ORDINALITY AS e(ev, i);
    UPDATE seamwork_streams SET version = cur + n, deleted = false WHERE stream = p_stream;
    PERFORM pg_notify('seamwork_events', '');
    new_version := cur + n;
    last_position := base + n - 1;
    RETURN NEXT;
END $$
"""
_V4_APPEND_BATCH = r"""
CREATE OR REPLACE FUNCTION seamwork_append_batch(p_appends jsonb, p_at double precision)
RETURNS TABLE (out_version bigint, out_position bigint, out_code text, out_detail text)
LANGUAGE plpgsql AS $$
DECLARE
    item jsonb;
BEGIN
    FOR item IN SELECT value FROM jsonb_array_elements(p_appends) LOOP
        BEGIN
            SELECT a.new_version, a.last_position, NULL, NULL
                INTO out_version, out_position, out_code, out_detail
                FROM seamwork_append_events(item->>0, item->>1, item->2, p_at) a;
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


def _in_version_order(events: list[Any], stream: str) -> list[int]:
    return [e.version for e in events if e.stream == stream]


async def test_an_append_in_an_older_transaction_than_the_streams_last_is_refused(
    pg_dsn: str,
) -> None:
    """A position is (transaction id << 20) + index: an append_in whose transaction got
    its id before another appended to the stream and committed took the next version
    at a position below that one's, so $all - a subscriber, a projection - delivered
    the stream's version 1 before its version 0. It is refused; the transaction, done
    again, appends after."""
    async with postgres_events.PostgresEventStore(pg_dsn) as store:
        conn = await psycopg.AsyncConnection.connect(pg_dsn)
        async with conn:
            await conn.execute("SELECT pg_current_xact_id()")  # the older transaction
            await store.append("s", [NewEvent("A")])
            with pytest.raises(StoreError, match="retry the transaction"):
                await store.append_in(conn, "s", [NewEvent("B")])
            await conn.rollback()
            async with conn.transaction():
                await store.append_in(conn, "s", [NewEvent("B")], expected_version=0)
        assert _in_version_order(await store.read_all(), "s") == [0, 1]


async def test_a_batch_older_than_the_streams_last_append_appends_that_one_again_alone(
    pg_dsn: str,
) -> None:
    """A batch got its transaction id at its first append, waited for another stream's
    lock, and meanwhile a younger transaction appended to a stream later in the batch:
    the batch's append there went below it in $all. It is appended again alone."""
    async with postgres_events.PostgresEventStore(pg_dsn) as store:
        await store.append("a", [NewEvent("A")])
        holder = await psycopg.AsyncConnection.connect(pg_dsn)
        younger = await psycopg.AsyncConnection.connect(pg_dsn)
        async with holder, younger:
            await store.append_in(holder, "a", [NewEvent("held")])  # holds a's row
            batch = asyncio.gather(
                store.append("a", [NewEvent("A2")]), store.append("s", [NewEvent("S")])
            )
            async with asyncio.timeout(10):
                while not await _waiting_for_a_lock(younger):
                    await asyncio.sleep(0.01)
            async with younger.transaction():
                await store.append_in(younger, "s", [NewEvent("first")])
            await holder.commit()
            await batch
        stored = await store.read_all()
        assert _in_version_order(stored, "s") == [0, 1]
        assert [e.type for e in stored if e.stream == "s"] == ["first", "S"]


async def _waiting_for_a_lock(conn: psycopg.AsyncConnection[Any]) -> bool:
    cursor = await conn.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
        "AND wait_event_type = 'Lock'"
    )
    row = await cursor.fetchone()
    await conn.rollback()
    return bool(row and row[0])


async def test_a_lone_append_refused_as_older_than_the_streams_last_is_tried_again(
    pg_dsn: str,
) -> None:
    """A lone append takes its transaction id just before it locks the stream's row: a
    transaction that began in between and appended there first makes it refused as the
    older one. A new transaction - a later id - appends it; here the stream's last
    position is set two transaction ids ahead, as such a race leaves it."""
    async with postgres_events.PostgresEventStore(pg_dsn) as store:
        await store.append("s", [NewEvent("A")])
        async with await psycopg.AsyncConnection.connect(pg_dsn, autocommit=True) as conn:
            await conn.execute(
                "UPDATE seamwork_streams SET last_position = "
                "(pg_current_xact_id()::text::bigint + 2) << 20 WHERE stream = 's'"
            )
        result = await store.append("s", [NewEvent("B")], expected_version=0)
        assert result.version == 1
        assert _in_version_order(await store.read_all(), "s") == [0, 1]
