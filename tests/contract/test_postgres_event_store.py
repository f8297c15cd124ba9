"""The EventStore contract on PostgreSQL (each test in its own schema)."""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
import uuid
from pathlib import Path
from typing import NoReturn

import psycopg
import pytest

from seamwork.errors import EventStoreError, StoreError, StoreUnavailable
from seamwork.events import EventStore, NewEvent, RecordedEvent, Upcasters
from seamwork.events import _model as events_model
from seamwork.storage import postgres_events
from seamwork.testing.event_store import EventStoreContract
from seamwork.testing.read_model import readable

pytestmark = pytest.mark.postgres


class TestPostgresEventStore(EventStoreContract):
    @pytest.fixture(autouse=True)
    def _dsn(self, pg_dsn: str) -> None:
        self.dsn = pg_dsn

    async def make_store(self, tmp_path: Path, upcasters: Upcasters | None = None) -> EventStore:
        return EventStore.postgres(self.dsn, upcasters=upcasters)


async def _connections(dsn: str, application: str) -> int:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        cursor = await conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s", (application,)
        )
        row = await cursor.fetchone()
        assert row is not None
        return int(row[0])


async def _no_connection_left(dsn: str, application: str) -> None:
    async with asyncio.timeout(5):
        while await _connections(dsn, application):  # closed backends go away soon
            await asyncio.sleep(0.05)


async def test_subscribers_going_live_together_leave_no_connection_after_aclose(
    pg_dsn: str,
) -> None:
    application = f"seamwork-test-{uuid.uuid4().hex[:12]}"
    store = EventStore.postgres(f"{pg_dsn} application_name={application}")

    async def first_event() -> RecordedEvent:
        async for event in store.subscribe():
            return event
        raise AssertionError("a subscription does not end")

    async with store:
        subscribers = [asyncio.create_task(first_event()) for _ in range(3)]
        await asyncio.sleep(0.3)  # all three are waiting for events now
        await store.append("s", [NewEvent("A")])
        seen = await asyncio.wait_for(asyncio.gather(*subscribers), 5)
        assert [e.type for e in seen] == ["A", "A", "A"]
    await _no_connection_left(pg_dsn, application)


async def test_an_open_that_fails_part_way_leaves_no_connection(
    pg_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    application = f"seamwork-test-{uuid.uuid4().hex[:12]}"
    store = EventStore.postgres(f"{pg_dsn} application_name={application}")

    async def refuse(*args: object, **kwargs: object) -> NoReturn:
        raise StoreUnavailable("cannot connect the event store to PostgreSQL: refused")

    # the writer and the appender connect for real; the read pool is the one that fails
    monkeypatch.setattr(postgres_events, "open_pool", refuse)
    with pytest.raises(StoreUnavailable, match="refused"):
        await store.open()
    await store.aclose()
    await _no_connection_left(pg_dsn, application)


async def test_a_driver_failure_is_the_same_error_alone_and_in_a_batch(
    pg_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a stream name too long for the primary key's index entry: the server refuses it
    # (seamwork refuses one over MAX_KEY_BYTES first; lifted here to reach the server)
    monkeypatch.setattr(events_model, "MAX_KEY_BYTES", 10**6)
    too_long = secrets.token_hex(8000)
    async with postgres_events.PostgresEventStore(pg_dsn) as store:
        with pytest.raises(StoreError) as alone:
            await store.append(too_long, [NewEvent("A")])
        commits = store.commits
        results = await asyncio.gather(
            store.append("ok-1", [NewEvent("A")]),
            store.append(too_long, [NewEvent("A")]),
            store.append("ok-2", [NewEvent("A")]),
            return_exceptions=True,
        )
        assert store.commits == commits + 1  # the three went in one batch
        in_batch = results[1]
        assert isinstance(in_batch, StoreError)
        assert type(in_batch) is type(alone.value)
        assert not isinstance(in_batch, EventStoreError)
        assert str(in_batch).startswith(f"append to '{too_long[:20]}")
        assert [type(r).__name__ for r in (results[0], results[2])] == ["AppendResult"] * 2
        assert [e.stream for e in await store.read_all()] == ["ok-1", "ok-2"]


async def _listening(store: postgres_events.PostgresEventStore) -> None:
    """Wait until a subscriber has gone live and the store's listener is connected."""
    async with asyncio.timeout(5):
        while store._listener is None:
            await asyncio.sleep(0.01)


async def _terminate_listener(dsn: str, application: str) -> None:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        cursor = await conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE application_name = %s AND query = 'LISTEN seamwork_events'",
            (application,),
        )
        assert [row[0] for row in await cursor.fetchall()] == [True]


async def test_a_live_subscriber_is_woken_by_notifications_again_after_the_listener_dies(
    pg_dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    application = f"seamwork-test-{uuid.uuid4().hex[:12]}"
    poll = 30.0  # a subscriber left to polling would wait this long
    store = EventStore.postgres(f"{pg_dsn} application_name={application}", poll_interval=poll)
    seen: asyncio.Queue[str] = asyncio.Queue()

    async def follow() -> None:
        async for event in store.subscribe():
            seen.put_nowait(event.type)

    async def lag(type_: str) -> float:
        started = time.monotonic()
        await store.append("s", [NewEvent(type_)])
        assert await asyncio.wait_for(seen.get(), poll / 3) == type_
        return time.monotonic() - started

    async with store:
        subscriber = asyncio.create_task(follow())
        try:
            await _listening(store)
            assert await lag("Before") < 2.0
            with caplog.at_level(logging.WARNING, logger="seamwork.storage"):
                await _terminate_listener(pg_dsn, application)
                assert await lag("Right after") < 5.0
                assert await lag("Later") < 2.0
            assert any("listener" in r.getMessage() for r in caplog.records)
        finally:
            subscriber.cancel()
            await asyncio.gather(subscriber, return_exceptions=True)


async def test_a_listener_that_ended_on_an_unexpected_error_is_started_again(
    pg_dsn: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    application = f"seamwork-test-{uuid.uuid4().hex[:12]}"
    poll = 30.0  # a subscriber left to polling would wait this long
    store = postgres_events.PostgresEventStore(
        f"{pg_dsn} application_name={application}", poll_interval=poll
    )
    seen: asyncio.Queue[str] = asyncio.Queue()
    reopen = store._open_listener

    async def broken() -> NoReturn:
        monkeypatch.setattr(store, "_open_listener", reopen)  # fails this once only
        raise RuntimeError("not a connection error")

    async def follow() -> None:
        async for event in store.subscribe():
            seen.put_nowait(event.type)

    async with store:
        subscriber = asyncio.create_task(follow())
        try:
            await _listening(store)
            await store.append("s", [NewEvent("Before")])
            assert await asyncio.wait_for(seen.get(), 2) == "Before"
            monkeypatch.setattr(store, "_open_listener", broken)
            relay = store._listen_task
            assert relay is not None
            with caplog.at_level(logging.WARNING, logger="seamwork.storage"):
                await _terminate_listener(pg_dsn, application)
                async with asyncio.timeout(5):
                    while not relay.done():  # it dies on the RuntimeError
                        await asyncio.sleep(0.02)
                await _listening(store)  # its subscriber woke and started another
                await store.append("s", [NewEvent("After")])
                assert await asyncio.wait_for(seen.get(), 2) == "After"  # notified, not polled
            stopped = [r for r in caplog.records if "listener stopped" in r.getMessage()]
            assert len(stopped) == 1
            assert "RuntimeError: not a connection error" in stopped[0].getMessage()
        finally:
            subscriber.cancel()
            await asyncio.gather(subscriber, return_exceptions=True)


async def test_a_listener_kept_from_its_server_logs_the_loss_and_the_recovery_once(
    pg_dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    application = f"seamwork-test-{uuid.uuid4().hex[:12]}"
    store = postgres_events.PostgresEventStore(
        f"{pg_dsn} application_name={application}", poll_interval=30.0
    )
    seen: asyncio.Queue[str] = asyncio.Queue()

    async def follow() -> None:
        async for event in store.subscribe():
            seen.put_nowait(event.type)

    def listener_logs(level: int | None = None) -> list[tuple[int, str]]:
        return [
            (r.levelno, r.getMessage())
            for r in caplog.records
            if r.name == "seamwork.storage" and "listener" in r.getMessage()
            if level is None or r.levelno == level
        ]

    async with store:
        subscriber = asyncio.create_task(follow())
        try:
            await _listening(store)
            dsn = store._dsn
            store._dsn = "host=127.0.0.1 port=1 connect_timeout=1"  # no server there
            with caplog.at_level(logging.DEBUG, logger="seamwork.storage"):
                await _terminate_listener(pg_dsn, application)
                async with asyncio.timeout(10):  # the loss, then reconnects after 0.05,
                    while len(listener_logs()) < 5:  # 0.1, 0.2 and 0.4 s: all fail
                        await asyncio.sleep(0.02)
                store._dsn = dsn
                async with postgres_events.PostgresEventStore(pg_dsn) as other_process:
                    await other_process.append("s", [NewEvent("Back")])  # a NOTIFY wakes it
                assert await asyncio.wait_for(seen.get(), 5) == "Back"
            above_debug = [m for level, m in listener_logs() if level > logging.DEBUG]
            assert len(above_debug) == 2, above_debug
            assert "lost its connection" in above_debug[0]
            assert "listening again" in above_debug[1]
            assert len(listener_logs(logging.DEBUG)) >= 4
        finally:
            subscriber.cancel()
            await asyncio.gather(subscriber, return_exceptions=True)


async def test_appends_from_another_store_wake_a_live_subscriber_without_polling(
    pg_dsn: str,
) -> None:
    reader = postgres_events.PostgresEventStore(pg_dsn, poll_interval=30.0)
    seen: asyncio.Queue[str] = asyncio.Queue()

    async def follow() -> None:
        async for event in reader.subscribe():
            seen.put_nowait(event.type)

    async with reader, postgres_events.PostgresEventStore(pg_dsn) as writer:
        subscriber = asyncio.create_task(follow())
        try:
            await _listening(reader)
            await writer.append("s", [NewEvent("Appended")])  # notified after its commit
            assert await asyncio.wait_for(seen.get(), 5) == "Appended"
            conn = await psycopg.AsyncConnection.connect(pg_dsn)
            async with conn, conn.transaction():  # the caller's own transaction notifies
                await writer.append_in(conn, "s", [NewEvent("InTransaction")])
            assert await asyncio.wait_for(seen.get(), 5) == "InTransaction"
        finally:
            subscriber.cancel()
            await asyncio.gather(subscriber, return_exceptions=True)


async def test_a_transaction_past_2_to_the_20_events_is_refused_not_overlapped(
    pg_dsn: str,
) -> None:
    """Positions are (transaction id << 20) + index: a transaction holding more than
    1,048,576 events would take positions of the next transaction id, colliding with
    its events or sorting after them in $all. Such an append is refused, naming the
    limit, and nothing of it is written. (The transaction here has already used all but
    one position, as after 1,048,575 events; appending two more crossed into the next
    transaction's positions.)"""
    async with postgres_events.PostgresEventStore(pg_dsn) as store:

        async def crossing() -> None:
            conn = await psycopg.AsyncConnection.connect(pg_dsn)
            async with conn, conn.transaction():
                await conn.execute("SELECT set_config('seamwork.seq', '1048575', true)")
                await store.append_in(conn, "big", [NewEvent("A"), NewEvent("B")])

        with pytest.raises(EventStoreError, match="1,048,576 events"):
            await crossing()
        assert await store.read_stream("big") == []
        assert await store.append("big", [NewEvent("A"), NewEvent("B")]) is not None


async def test_closing_the_store_ends_a_waiting_subscription_and_leaves_no_listener(
    pg_dsn: str,
) -> None:
    application = f"seamwork-test-{uuid.uuid4().hex[:12]}"
    store = postgres_events.PostgresEventStore(f"{pg_dsn} application_name={application}")

    async def follow() -> None:
        async for _ in store.subscribe():
            pass

    await store.open()
    subscriber = asyncio.create_task(follow())
    await asyncio.sleep(0.3)  # caught up, listening, waiting for the next event
    await store.aclose()
    with pytest.raises(StoreError):
        await asyncio.wait_for(subscriber, 5)
    assert store._listen_task is None
    await _no_connection_left(pg_dsn, application)


async def test_a_subscriber_busy_when_another_takes_the_notification_is_still_woken_by_it(
    pg_dsn: str,
) -> None:
    """Two subscribers share the listener. One is handling an event when the next
    append is notified; the other, waiting, wakes first. The busy one must still learn
    of it when it comes back to wait, not only when its poll interval ends."""
    poll = 30.0  # a subscriber left to polling would wait this long
    store = postgres_events.PostgresEventStore(pg_dsn, poll_interval=poll)
    seen: dict[str, asyncio.Queue[float]] = {"busy": asyncio.Queue(), "idle": asyncio.Queue()}

    async def follow(name: str) -> None:
        async for event in store.subscribe():
            seen[name].put_nowait(time.monotonic())
            if name == "busy" and event.type == "First":
                await asyncio.sleep(0.5)  # the next append is notified meanwhile

    async with store:
        await store.append("s", [NewEvent("First")])
        await readable(store, 1)
        subscribers = [asyncio.create_task(follow(name)) for name in seen]
        try:
            for queue in seen.values():
                await asyncio.wait_for(queue.get(), 5)  # caught up
            await asyncio.sleep(0.2)  # "idle" waits; "busy" is still handling First
            await store.append("s", [NewEvent("Second")])
            idle = await asyncio.wait_for(seen["idle"].get(), poll * 2)
            busy = await asyncio.wait_for(seen["busy"].get(), poll * 2)
            # both wait out the poll if a transaction elsewhere holds the event back
            assert busy - idle < 2.0
        finally:
            for subscriber in subscribers:
                subscriber.cancel()
            await asyncio.gather(*subscribers, return_exceptions=True)


async def test_an_event_committed_before_the_listener_listens_is_not_left_to_polling(
    pg_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A subscriber going live reads, then starts the listener: an append that commits
    in between is notified to nobody. The subscriber must look again once it listens."""
    poll = 30.0  # a subscriber left to polling would wait this long
    reader = postgres_events.PostgresEventStore(pg_dsn, poll_interval=poll)
    seen: asyncio.Queue[str] = asyncio.Queue()
    listen = reader._open_listener

    async def appended_first() -> psycopg.AsyncConnection[object]:
        async with postgres_events.PostgresEventStore(pg_dsn) as writer:
            await writer.append("s", [NewEvent("Early")])
            await readable(writer, 1)
        return await listen()

    async def follow() -> None:
        async for event in reader.subscribe():
            seen.put_nowait(event.type)

    monkeypatch.setattr(reader, "_open_listener", appended_first)
    async with reader:
        subscriber = asyncio.create_task(follow())
        try:
            assert await asyncio.wait_for(seen.get(), 5) == "Early"
        finally:
            subscriber.cancel()
            await asyncio.gather(subscriber, return_exceptions=True)


async def test_reads_go_past_pooled_connections_the_server_killed_while_idle(
    pg_dsn: str,
) -> None:
    """The server terminated the pool's idle connections (a failover, an idle timeout,
    an operator): the next read failed with StoreUnavailable though the server was
    fine, which ended a subscribe() loop; reads now try again past each dead one, as
    the saga store's do (writes are never retried: their outcome would be unknown)."""
    application = f"sw-idle-{uuid.uuid4().hex[:8]}"
    store = EventStore.postgres(f"{pg_dsn} application_name={application}", pool_size=3)
    async with store:
        await store.append("s", [NewEvent("A")])
        await asyncio.gather(*(store.read_stream("s") for _ in range(6)))  # pool filled
        async with await psycopg.AsyncConnection.connect(pg_dsn, autocommit=True) as admin:
            cursor = await admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE application_name = %s AND state = 'idle' AND query NOT LIKE 'LISTEN%%'",
                (application,),
            )
            assert len(await cursor.fetchall()) >= 1
        await asyncio.sleep(0.1)
        assert [e.type for e in await store.read_stream("s")] == ["A"]
        assert (await store.stream_info("s")) is not None
