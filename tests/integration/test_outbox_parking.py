"""A message the broker refuses for good is parked; the outbox's other messages go on.

On SQLite and PostgreSQL outboxes, through a real (embedded) nats-server whose
``max_payload`` is small, so a refused message is cheap to write.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import nats.js.errors
import psycopg
import pytest
from typer.testing import CliRunner, Result

from seamwork.brokers import EmbeddedNats, NatsBroker, RabbitBroker
from seamwork.brokers.nats import stream_for
from seamwork.cli import app
from seamwork.errors import BrokerUnavailable, ConfigError, MessagingError, StoreError
from seamwork.messaging import Delivery, Message, Outbox, OutboxRelay
from seamwork.storage import postgres_messaging, sqlite_messaging
from seamwork.storage._pg import migrate
from seamwork.storage._sqlite_writer import SQLiteWriter
from seamwork.testing.broker import eventually, until
from shared_helpers import delete_rabbit

LIMIT = 64 * 1024
"""The small server's max_payload."""


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def outbox(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Outbox]:
    if request.param == "sqlite":
        box = Outbox.sqlite(tmp_path / "orders.db")
    else:
        box = Outbox.postgres(request.getfixturevalue("pg_dsn"))
    async with box:
        yield box


@pytest.fixture
async def broker() -> AsyncIterator[NatsBroker]:
    async with EmbeddedNats(max_payload=LIMIT) as server:
        broker = NatsBroker(server.url)
        yield broker
        await broker.aclose()


def subject() -> str:
    return f"p{uuid.uuid4().hex[:10]}.created"


def too_big(n: int) -> Message:
    return Message("Big", {"n": n, "s": "x" * LIMIT})


async def write(outbox: Outbox, to: str, *messages: Message) -> None:
    for message in messages:  # one transaction each, as a service writes them
        async with outbox.transaction() as tx:
            await tx.publish(to, message)


async def stored(broker: NatsBroker, to: str) -> list[str]:
    """The ids the stream of ``to`` holds, in stream order."""
    _, js = await broker._context()
    try:
        info = await js.stream_info(stream_for(to))
    except nats.js.errors.NotFoundError:
        return []
    ids = []
    if not info.state.messages:  # a stream just made: first_seq 0, which get_msg refuses
        return ids
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        raw = await js.get_msg(stream_for(to), seq)
        assert raw.headers is not None
        ids.append(raw.headers["Nats-Msg-Id"])
    return ids


@pytest.mark.parametrize("page_size", [500, 2], ids=["one-page", "small-pages"])
async def test_a_message_the_broker_refuses_is_parked_and_the_ones_after_it_are_published(
    outbox: Outbox, broker: NatsBroker, page_size: int, caplog: pytest.LogCaptureFixture
) -> None:
    to = subject()
    before = [Message("Small", {"n": n}) for n in range(3)]
    bad = too_big(3)
    after = [Message("Small", {"n": n}) for n in range(4, 9)]
    await write(outbox, to, *before, bad, *after)
    started = time.time()
    relay = OutboxRelay(outbox, broker, page_size=page_size)
    with caplog.at_level(logging.ERROR, logger="seamwork.messaging"):
        assert await relay.drain() == 8
    assert await stored(broker, to) == [m.id for m in [*before, *after]]
    assert await outbox.pending_count() == 0
    (parked,) = await outbox.parked()
    assert (parked.id, parked.subject, parked.message.type) == (bad.id, to, "Big")
    assert parked.message.data == bad.data
    assert "max_payload" in parked.error
    assert started <= parked.parked_at <= time.time()
    (alert,) = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert bad.id in alert.getMessage()
    assert to in alert.getMessage()
    assert "max_payload" in alert.getMessage()
    assert (relay.published, relay.parked) == (8, 1)  # a mixed page, counted as it went
    assert await relay.drain() == 0  # parked stays parked: no retry loop on it
    assert (relay.published, relay.parked) == (8, 1)


async def test_a_running_relay_parks_the_refused_message_and_does_not_retry_the_page(
    outbox: Outbox, broker: NatsBroker, caplog: pytest.LogCaptureFixture
) -> None:
    to = subject()
    first, bad, last = Message("Small", {"n": 1}), too_big(2), Message("Small", {"n": 3})
    with caplog.at_level(logging.WARNING, logger="seamwork.messaging"):
        async with OutboxRelay(outbox, broker, poll_interval=0.05) as relay:
            await write(outbox, to, first, bad, last)
            assert await until(lambda: _published(broker, to, 2)) == [first.id, last.id]
            assert relay.parked == 1
    assert [r.levelname for r in caplog.records] == ["ERROR"]  # no "retrying" warning
    assert [p.id for p in await outbox.parked()] == [bad.id]


async def _published(broker: NatsBroker, to: str, n: int) -> list[str] | None:
    ids = await stored(broker, to)
    return ids if len(ids) >= n else None


async def test_a_requeued_message_is_published_once_the_cause_is_fixed(
    outbox: Outbox, broker: NatsBroker
) -> None:
    to = subject()
    messages = [Message("Small", {"n": 0}), too_big(1), Message("Small", {"n": 2}), too_big(3)]
    await write(outbox, to, *messages)
    assert await OutboxRelay(outbox, broker).drain() == 2
    assert [p.id for p in await outbox.parked()] == [messages[1].id, messages[3].id]
    assert [p.id for p in await outbox.parked(limit=1)] == [messages[1].id]

    later = Message("Small", {"n": 4})
    await write(outbox, to, later)
    assert await outbox.requeue([messages[3].id, messages[1].id]) == 2
    assert await outbox.parked() == []
    assert await outbox.pending_count() == 3
    # requeued messages keep their place: the oldest pending go first
    assert [r.message.id for r in await outbox.pending(10)] == [
        messages[1].id,
        messages[3].id,
        later.id,
    ]
    async with EmbeddedNats() as roomier:  # the cause fixed: a server that takes them
        fixed = NatsBroker(roomier.url)
        try:
            assert await OutboxRelay(outbox, fixed).drain() == 3
            assert await stored(fixed, to) == [messages[1].id, messages[3].id, later.id]
        finally:
            await fixed.aclose()
    assert await outbox.pending_count() == 0
    assert await outbox.parked() == []


async def test_ids_that_are_not_parked_are_refused_by_name_and_nothing_changes(
    outbox: Outbox, broker: NatsBroker
) -> None:
    to = subject()
    bad, pending = too_big(0), Message("Small", {"n": 1})
    await write(outbox, to, bad)
    await OutboxRelay(outbox, broker).drain()
    await write(outbox, to, pending)
    for act in (outbox.requeue, outbox.discard):
        with pytest.raises(MessagingError, match="no parked message with id 'nope'"):
            await act([bad.id, "nope"])
        with pytest.raises(MessagingError, match=f"no parked message with id '{pending.id}'"):
            await act([pending.id])  # pending, not parked
        with pytest.raises(ConfigError, match="collection of message ids"):
            await act(bad.id)  # type: ignore[arg-type]  # a lone string
        with pytest.raises(ConfigError, match="message ids are strings"):
            await act([1])  # type: ignore[list-item]
        assert await act([]) == 0
    with pytest.raises(ConfigError, match="limit"):
        await outbox.parked(limit=0)
    assert [p.id for p in await outbox.parked()] == [bad.id]
    assert [r.message.id for r in await outbox.pending(10)] == [pending.id]

    assert await outbox.discard([bad.id, bad.id]) == 1
    assert await outbox.parked() == []
    assert [r.message.id for r in await outbox.pending(10)] == [pending.id]


async def test_a_broker_that_cannot_be_reached_parks_nothing(outbox: Outbox) -> None:
    async with EmbeddedNats() as server:
        url = server.url
    to = subject()
    await write(outbox, to, Message("Small"), too_big(1))
    gone = NatsBroker(url, publish_timeout=0.5)
    try:
        with pytest.raises(BrokerUnavailable):
            await OutboxRelay(outbox, gone).drain()
    finally:
        await gone.aclose()
    assert await outbox.parked() == []
    assert await outbox.pending_count() == 2


@pytest.mark.parametrize("store", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def test_an_outbox_of_the_release_before_parking_upgrades_and_parks(
    store: str, request: pytest.FixtureRequest, tmp_path: Path, broker: NatsBroker
) -> None:
    to = subject()
    ok, bad = Message("Small", {"n": 0}), too_big(1)
    rows = [(m.id, to, m.type, json.dumps(dict(m.data)), m.id, "{}") for m in (ok, bad)]
    if store == "sqlite":
        path = tmp_path / "old.db"
        writer = SQLiteWriter(path, migrations=sqlite_messaging.MESSAGING_MIGRATIONS[:1])
        await writer.start()
        await writer.write(
            lambda conn: conn.executemany(
                "INSERT INTO seamwork_outbox (id, subject, type, data, correlation_id, headers, "
                "created_at) VALUES (?, ?, ?, ?, ?, ?, 0)",
                rows,
            )
        )
        await writer.close()
        outbox = Outbox.sqlite(path)
    else:
        dsn = request.getfixturevalue("pg_dsn")
        async with await psycopg.AsyncConnection.connect(dsn) as conn:
            await migrate(conn, postgres_messaging.MESSAGING_MIGRATIONS[:2])
            async with conn.cursor() as cursor:
                await cursor.executemany(
                    "INSERT INTO seamwork_outbox (id, subject, type, data, correlation_id, "
                    "headers, created_at) VALUES (%s, %s, %s, %s::json, %s, %s::json, 0)",
                    rows,
                )
            await conn.commit()
        outbox = Outbox.postgres(dsn)
    where = ["--db", str(path)] if store == "sqlite" else ["--postgres", dsn]
    old = await asyncio.to_thread(CliRunner().invoke, app, ["outbox", "parked", *where])
    assert old.exit_code == 1  # the CLI upgrades nothing: the service does
    assert "older version" in old.output
    async with outbox:
        assert await outbox.pending_count() == 2
        assert await OutboxRelay(outbox, broker).drain() == 1
        assert [p.id for p in await outbox.parked()] == [bad.id]
        assert await outbox.pending_count() == 0
    assert await stored(broker, to) == [ok.id]


async def test_a_subject_too_long_for_a_rabbitmq_routing_key_is_parked_and_the_rest_flow(
    outbox: Outbox, rabbitmq_service: str
) -> None:
    exchange = f"seamwork-park-{uuid.uuid4().hex[:10]}"
    broker = RabbitBroker(rabbitmq_service, exchange=exchange)
    to = f"park{uuid.uuid4().hex[:6]}.created"
    too_long = f"{to}.{'x' * 250}"  # an AMQP routing key holds 255 bytes
    got: list[str] = []

    async def handler(delivery: Delivery) -> None:
        got.append(delivery.message.id)

    first, bad, last = Message("A"), Message("B"), Message("C")
    try:
        await broker.subscribe(to, "g", handler)
        await write(outbox, to, first)
        await write(outbox, too_long, bad)
        await write(outbox, to, last)
        with pytest.raises(ConfigError, match="255"):
            await broker.publish(too_long, bad)
        assert await OutboxRelay(outbox, broker).drain() == 2
        await eventually(lambda: len(got) == 2)
        assert got == [first.id, last.id]
        (parked,) = await outbox.parked()
        assert (parked.id, parked.subject) == (bad.id, too_long)
        assert "routing key" in parked.error
    finally:
        names = broker.declared_queues
        await broker.aclose()
        await delete_rabbit(rabbitmq_service, exchange, [*names, f"{exchange}.deadletter"])


async def test_a_subject_too_long_for_a_nats_control_line_is_parked_and_the_rest_flow(
    outbox: Outbox, broker: NatsBroker
) -> None:
    to = subject()
    too_long = f"{to}.{'x' * 5000}"  # nats-server closes a connection over 4096 bytes a line
    first, bad, last = Message("A"), Message("B"), Message("C")
    await write(outbox, to, first)
    await write(outbox, too_long, bad)
    await write(outbox, to, last)
    with pytest.raises(ConfigError, match="too long"):
        await broker.publish(too_long, bad)
    assert await OutboxRelay(outbox, broker).drain() == 2
    assert await stored(broker, to) == [first.id, last.id]
    (parked,) = await outbox.parked()
    assert (parked.id, parked.subject) == (bad.id, too_long)


async def test_the_cli_lists_requeues_and_discards_parked_messages(
    tmp_path: Path, broker: NatsBroker
) -> None:
    path = tmp_path / "orders.db"
    to = subject()
    first, second = too_big(0), too_big(1)
    async with Outbox.sqlite(path) as outbox:
        await write(outbox, to, first, second)
        await OutboxRelay(outbox, broker).drain()

    def cli(*args: str) -> Result:
        return CliRunner().invoke(app, ["outbox", *args], env={"COLUMNS": "200"})

    listed = await asyncio.to_thread(cli, "parked", "--db", str(path), "--json")
    assert listed.exit_code == 0, listed.output
    rows = json.loads(listed.stdout)
    assert [(r["id"], r["subject"], r["type"]) for r in rows] == [
        (first.id, to, "Big"),
        (second.id, to, "Big"),
    ]
    assert all("max_payload" in r["error"] and r["parked_at"] > 0 for r in rows)
    table = await asyncio.to_thread(cli, "parked", "--db", str(path))
    assert first.id in table.stdout
    assert "2 parked message(s)" in table.stdout

    unknown = await asyncio.to_thread(cli, "requeue", "nope", first.id, "--db", str(path))
    assert unknown.exit_code == 1
    assert "no parked message with id 'nope'" in unknown.output
    requeued = await asyncio.to_thread(cli, "requeue", first.id, "--db", str(path))
    assert requeued.exit_code == 0, requeued.output
    assert "1 parked message(s) requeued" in requeued.stdout
    discarded = await asyncio.to_thread(cli, "discard", second.id, "--db", str(path))
    assert discarded.exit_code == 0, discarded.output
    async with Outbox.sqlite(path) as outbox:
        assert await outbox.parked() == []
        assert [r.message.id for r in await outbox.pending(10)] == [first.id]
    missing = await asyncio.to_thread(cli, "parked", "--db", str(tmp_path / "nothing.db"))
    assert missing.exit_code == 2
    assert "no database at" in missing.output


async def test_a_message_another_relay_published_is_not_left_parked(
    outbox: Outbox, broker: NatsBroker
) -> None:
    to = subject()
    bad = too_big(0)
    await write(outbox, to, bad)
    page = await outbox.pending(10)  # a relay with a roomier broker reads the page...
    assert await OutboxRelay(outbox, broker).drain() == 0  # ...this one parks it meanwhile
    async with EmbeddedNats() as roomier:
        other = NatsBroker(roomier.url)
        try:
            await other.publish_batch([(r.subject, r.message) for r in page])
            await outbox.mark_sent([r.seq for r in page])  # ...and marks it sent
            assert await stored(other, to) == [bad.id]
        finally:
            await other.aclose()
    assert await outbox.parked() == []  # published: there is nothing to requeue or discard
    assert await outbox.pending_count() == 0

    later = Message("Small")  # the other way round: marked sent first, then parked
    await write(outbox, to, later)
    (record,) = await outbox.pending(10)
    await outbox.mark_sent([record.seq])
    await outbox.park(record.seq, "InvalidMessage: too late")
    assert await outbox.parked() == []
    assert await outbox.purge_sent(time.time() + 1) == 2  # sent rows, purged as such


@pytest.mark.parametrize("store", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def test_the_cli_refuses_a_database_without_an_outbox_and_creates_nothing_in_it(
    store: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    if store == "sqlite":
        path = tmp_path / "billing.db"  # another service's database, say
        with sqlite3.connect(path) as conn:
            conn.execute("CREATE TABLE invoices (id INTEGER PRIMARY KEY)")
        conn.close()
        where = ["--db", str(path)]
    else:
        dsn = request.getfixturevalue("pg_dsn")
        where = ["--postgres", dsn]
    for args in (["parked"], ["requeue", "x"], ["discard", "x"]):
        result = await asyncio.to_thread(CliRunner().invoke, app, ["outbox", *args, *where])
        assert result.exit_code == 1, result.output
        assert "seamwork" in result.output
        assert "no seamwork outbox" in result.output or "not a seamwork messaging" in result.output
    if store == "sqlite":
        with sqlite3.connect(path) as conn:
            tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
        conn.close()
        assert tables == {"invoices"}
    else:
        async with await psycopg.AsyncConnection.connect(dsn) as conn:
            cursor = await conn.execute("SELECT to_regclass('seamwork_outbox') IS NULL")
            assert await cursor.fetchone() == (True,)

    unreachable = await asyncio.to_thread(
        CliRunner().invoke, app, ["outbox", "parked", "--postgres", "postgresql://127.0.0.1:1/x"]
    )
    assert unreachable.exit_code == 1
    assert "cannot connect the outbox to PostgreSQL" in unreachable.output


async def test_the_cli_leaves_the_journal_mode_of_a_database_without_an_outbox(
    tmp_path: Path,
) -> None:
    path = tmp_path / "billing.db"  # another service's database, in rollback-journal mode
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE invoices (id INTEGER PRIMARY KEY)")
    conn.close()
    for args in (["parked"], ["requeue", "x"], ["discard", "x"]):
        result = await asyncio.to_thread(outbox_cli, path, *args)
        assert result.exit_code == 1, result.output
        assert "not a seamwork messaging store" in result.output
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("delete",)
    conn.close()


async def test_the_id_of_a_parked_message_is_freed_by_discarding_it(
    outbox: Outbox, broker: NatsBroker
) -> None:
    to = subject()
    bad = too_big(0)
    await write(outbox, to, bad)
    assert await OutboxRelay(outbox, broker).drain() == 0
    fixed = Message("Small", {"n": 0}, id=bad.id)  # the same message, made to fit
    with pytest.raises(StoreError, match=r"parked message keeps its id.*outbox.discard"):
        await write(outbox, to, fixed)
    assert [p.id for p in await outbox.parked()] == [bad.id]  # as it was
    assert await outbox.discard([bad.id]) == 1
    await write(outbox, to, fixed)
    assert await OutboxRelay(outbox, broker).drain() == 1
    assert await stored(broker, to) == [fixed.id]


async def parked_by_hand(path: Path, to: str, *messages: Message, error: str) -> None:
    """Messages written and parked with ``error`` as a relay parks them, with no broker."""
    async with Outbox.sqlite(path) as outbox:
        await write(outbox, to, *messages)
        for record in await outbox.pending(len(messages)):
            await outbox.park(record.seq, error)


def outbox_cli(path: Path, *args: str, columns: int = 200) -> Result:
    return CliRunner().invoke(
        app, ["outbox", *args, "--db", str(path)], env={"COLUMNS": str(columns)}
    )


async def test_the_cli_shows_control_characters_of_a_parked_message_escaped(
    tmp_path: Path,
) -> None:
    path, to = tmp_path / "orders.db", subject()
    message = Message("Order\x1b[8m", {"n": 1}, id="m\x1b[1A")
    await parked_by_hand(path, to, message, error="InvalidMessage: peer said \x1b]0;owned\x07 no")

    table = await asyncio.to_thread(outbox_cli, path, "parked")
    assert table.exit_code == 0, table.output
    assert "\x1b" not in table.output
    assert "\x07" not in table.output
    for text in ("m\\x1b[1A", "Order\\x1b[8m", "peer said \\x1b]0;owned\\x07 no"):
        assert text in table.output
    listed = await asyncio.to_thread(outbox_cli, path, "parked", "--json")  # JSON escapes
    assert [row["type"] for row in json.loads(listed.stdout)] == ["Order\x1b[8m"]


async def test_the_cli_on_a_narrow_terminal_shows_long_ids_subjects_and_errors_whole(
    tmp_path: Path,
) -> None:
    path = tmp_path / "orders.db"
    to = f"p{uuid.uuid4().hex}.created.in.the.eu-west-region"
    message = Message("OrderCreatedWithALongName", {"n": 1}, id="order-" + "7f" * 20)
    error = "InvalidMessage: refused by https://broker.example/api/v1/" + "b7" * 40
    await parked_by_hand(path, to, message, error=error)

    table = await asyncio.to_thread(outbox_cli, path, "parked", columns=80)
    assert table.exit_code == 0, table.output
    assert "…" not in table.output
    rows = [line.split("│") for line in table.output.splitlines() if line.startswith("│")]
    assert "".join(row[1].strip() for row in rows) == message.id
    assert "".join(row[2].strip() for row in rows) == to
    assert "".join(row[3].strip() for row in rows) == message.type
    assert "".join("".join(row[4].split()) for row in rows) == "".join(error.split())


async def test_the_cli_says_when_more_messages_are_parked_than_limit_shows(
    tmp_path: Path,
) -> None:
    path, to = tmp_path / "orders.db", subject()
    messages = [Message("Big", {"n": n}) for n in range(3)]
    await parked_by_hand(path, to, *messages, error="InvalidMessage: too big")

    cut = await asyncio.to_thread(outbox_cli, path, "parked", "--limit", "2")
    assert cut.exit_code == 0, cut.output
    assert "2 parked message(s); more are parked: raise --limit to see them" in cut.output
    assert messages[2].id not in cut.output
    whole = await asyncio.to_thread(outbox_cli, path, "parked", "--limit", "3")
    assert whole.output.splitlines()[0].rstrip() == "3 parked message(s)"
    assert "more are parked" not in whole.output
    listed = await asyncio.to_thread(outbox_cli, path, "parked", "--limit", "2", "--json")
    assert listed.exit_code == 0, listed.output
    assert [row["id"] for row in json.loads(listed.stdout)] == [m.id for m in messages[:2]]
    assert "more messages are parked" in listed.stderr
    most = await asyncio.to_thread(outbox_cli, path, "parked", "--limit", str(2**63 - 1))
    assert most.exit_code == 0, most.output
    assert most.output.splitlines()[0].rstrip() == "3 parked message(s)"


NOT_UTF8 = b"m-\xffid".decode("utf-8", "surrogateescape")  # argv bytes Python cannot decode


@pytest.mark.parametrize(
    ("args", "where"),
    [
        (["requeue", "ok", NOT_UTF8], "ids"),
        (["discard", NOT_UTF8], "ids"),
        (["parked", "--postgres", f"host=127.0.0.1 application_name={NOT_UTF8}"], "--postgres"),
    ],
)
async def test_an_argument_that_is_not_utf8_is_a_usage_error_and_changes_nothing(
    tmp_path: Path, args: list[str], where: str
) -> None:
    path = tmp_path / "orders.db"
    message = Message("Big", {"n": 1})
    await parked_by_hand(path, subject(), message, error="InvalidMessage: too big")
    db = [] if "--postgres" in args else ["--db", str(path)]
    result = await asyncio.to_thread(CliRunner().invoke, app, ["outbox", *args, *db])
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    said = " ".join(result.stderr.replace("│", " ").split())
    assert f"Invalid value for '{where}'" in said
    assert "is not valid UTF-8" in said
    async with Outbox.sqlite(path) as outbox:
        assert [p.id for p in await outbox.parked()] == [message.id]


@pytest.mark.parametrize("limit", [True, 2**63, 1.5], ids=["bool", "past-bigint", "float"])
async def test_a_parked_limit_no_store_can_take_is_refused_by_name(
    outbox: Outbox, limit: object
) -> None:
    with pytest.raises(ConfigError, match=rf"limit must be an int 1\.\.{2**63 - 1}, got"):
        await outbox.parked(limit=limit)  # type: ignore[arg-type]
    assert await outbox.parked(limit=2**63 - 1) == []


async def test_an_id_no_store_can_hold_is_refused_by_name_and_nothing_changes(
    outbox: Outbox,
) -> None:
    message = Message("Big", {"n": 1})
    await write(outbox, subject(), message)
    (record,) = await outbox.pending(1)
    await outbox.park(record.seq, "InvalidMessage: too big")
    for act in (outbox.requeue, outbox.discard):
        with pytest.raises(ConfigError, match=r"message id 'm\\udcff' is not valid Unicode"):
            await act([message.id, "m\udcff"])  # (argv bytes that are not UTF-8)
        with pytest.raises(MessagingError, match=r"no parked message with id 'm\\x00id'"):
            await act([message.id, "m\x00id"])  # (PostgreSQL's text cannot hold NUL)
    assert [p.id for p in await outbox.parked()] == [message.id]


async def test_a_page_past_sqlites_parameter_limit_is_marked_sent(tmp_path: Path) -> None:
    # mark_sent put a whole page's ids in one statement: a page_size past the build's
    # parameter limit (250,000 here, 32,766 in others) was published, then never
    # marked, and sent again at every drain
    async with Outbox.sqlite(tmp_path / "big.db") as box:
        limit = sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER
        await box.store.writer.write(lambda conn: conn.setlimit(limit, 600))  # type: ignore[attr-defined]
        async with box.transaction() as tx:
            for i in range(1300):
                await tx.publish("orders.created", Message("M", {"i": i}))
        page = await box.pending(2000)
        await box.mark_sent([record.seq for record in page])
        assert await box.pending_count() == 0
