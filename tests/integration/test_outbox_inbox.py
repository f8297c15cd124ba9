"""Outbox, relay and inbox on real SQLite files and a real (embedded) nats-server."""

from __future__ import annotations

import asyncio
import contextlib
import re
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import aio_pika
import nats
import pytest

from seamwork.brokers import EmbeddedNats, NatsBroker, RabbitBroker
from seamwork.errors import ConfigError, InvalidMessage, StoreError
from seamwork.messaging import (
    Broker,
    DeadLetter,
    Delivery,
    Flow,
    FlowMonitor,
    Inbox,
    Message,
    Outbox,
    OutboxRelay,
    PoisonMessage,
    Transaction,
)
from seamwork.testing.broker import eventually, until


class RelayCrashed(Exception):
    """Stands for the relay process dying right after the broker acknowledged."""


class CrashAfterAck:
    """A broker that stores the batch, then 'dies' before the relay marks it sent."""

    def __init__(self, broker: NatsBroker) -> None:
        self.broker = broker

    async def publish_batch(self, items: Sequence[tuple[str, Message]]) -> None:
        await self.broker.publish_batch(items)
        raise RelayCrashed


@pytest.fixture
async def server() -> AsyncIterator[EmbeddedNats]:
    async with EmbeddedNats() as embedded:
        yield embedded


@pytest.fixture
async def broker(server: EmbeddedNats) -> AsyncIterator[NatsBroker]:
    broker = NatsBroker(server.url)
    yield broker
    await broker.aclose()


@pytest.fixture
async def outbox(tmp_path: Path) -> AsyncIterator[Outbox]:
    async with Outbox.sqlite(tmp_path / "orders.db") as box:
        async with box.transaction() as tx:
            await tx.execute("CREATE TABLE orders (id INTEGER PRIMARY KEY)")
        yield box


@pytest.fixture
async def inbox(tmp_path: Path) -> AsyncIterator[Inbox]:
    async with Inbox.sqlite(tmp_path / "payments.db") as box:
        async with box._transaction(Message("Setup")) as tx:
            assert tx is not None
            await tx.execute("CREATE TABLE effects (n INTEGER, message_id TEXT)")
        yield box


def subject(name: str = "created") -> str:
    return f"t{uuid.uuid4().hex[:10]}.{name}"


def rows(path: Path, sql: str) -> list[tuple[object, ...]]:
    with sqlite3.connect(path) as conn:
        return conn.execute(sql).fetchall()


async def record_effect(message: Message, tx: Transaction) -> None:
    await tx.execute(
        "INSERT INTO effects (n, message_id) VALUES (?, ?)", (message.data["n"], message.id)
    )


async def stored(broker: NatsBroker, subject: str) -> int:
    _, js = await broker._context()
    info = await js.stream_info(await broker.ensure_stream(subject))
    return int(info.state.messages)


async def dead_letter_of(broker: Broker, subject: str) -> DeadLetter:
    async def probe() -> DeadLetter | None:
        return next((x for x in await broker.dead_letters() if x.subject == subject), None)

    return await until(probe)


# --- outbox -----------------------------------------------------------------------------


async def test_an_outbox_row_commits_with_the_services_own_write(
    outbox: Outbox, tmp_path: Path
) -> None:
    async with outbox.transaction() as tx:
        await tx.execute("INSERT INTO orders (id) VALUES (?)", (42,))
        await tx.publish("orders.created", Message("OrderCreated", {"order_id": 42}))
    assert rows(tmp_path / "orders.db", "SELECT id FROM orders") == [(42,)]
    assert await outbox.pending_count() == 1
    (record,) = await outbox.pending(10)
    assert (record.subject, record.message.type) == ("orders.created", "OrderCreated")


async def test_an_exception_in_the_transaction_leaves_neither_the_row_nor_the_message(
    outbox: Outbox, broker: NatsBroker, tmp_path: Path
) -> None:
    topic = subject()

    async def place_order_then_fail() -> None:
        async with outbox.transaction() as tx:
            await tx.execute("INSERT INTO orders (id) VALUES (?)", (42,))
            await tx.publish(topic, Message("OrderCreated", {"order_id": 42}))
            raise ZeroDivisionError

    with pytest.raises(ZeroDivisionError):
        await place_order_then_fail()
    assert rows(tmp_path / "orders.db", "SELECT id FROM orders") == []
    assert await outbox.pending_count() == 0
    assert await OutboxRelay(outbox, broker).drain() == 0
    assert await stored(broker, topic) == 0


@pytest.mark.parametrize("value", ["a" * 20_000, "é" * 5_000], ids=["ascii", "two-byte"])
async def test_a_message_with_oversized_headers_is_refused_inside_the_transaction(
    outbox: Outbox, value: str
) -> None:
    async def place_order() -> None:
        async with outbox.transaction() as tx:
            await tx.execute("INSERT INTO orders (id) VALUES (1)")
            await tx.publish("orders.created", Message("Big", headers={"x": value}))

    with pytest.raises(InvalidMessage, match="headers"):  # 5,000 characters, 10,000 bytes
        await place_order()
    assert await outbox.pending_count() == 0


@pytest.mark.parametrize(
    ("message", "named"),
    [
        (Message("Created", headers={"bad key": "v"}), "header name 'bad key'"),
        (Message("Created", headers={"k:v": "v"}), "header name 'k:v'"),
        (Message("Created", headers={"k": "v\r\nSeamwork-Type: Forged"}), "line break"),
        (Message("Created", headers={"k": " padded "}), "surrounding whitespace"),
        (Message("Created\n"), "type"),
        (Message("Created", id="id\r\nX: y"), "id"),
        (Message("Created", correlation_id="flow "), "correlation_id"),
        # a lone surrogate (argv or a file name's bytes that are not UTF-8): no JSON,
        # no database and no broker takes it; it was a UnicodeEncodeError
        (Message("Created\udcff"), "type"),
        (Message("Created", id="id\udcff"), "id"),
        (Message("Created", causation_id="c\udcff"), "causation_id"),
        (Message("Created", headers={"k": "v\udcff"}), "header 'k'"),
        (Message("Created", {"note": "caf\udcff"}), "data"),
        (Message("Created", {"n\udcff": 1}), "data"),
    ],
)
async def test_a_message_no_broker_carries_unchanged_is_refused_inside_the_transaction(
    outbox: Outbox, broker: NatsBroker, message: Message, named: str
) -> None:
    async def place_order() -> None:
        async with outbox.transaction() as tx:
            await tx.execute("INSERT INTO orders (id) VALUES (1)")
            await tx.publish("orders.created", message)

    with pytest.raises(InvalidMessage, match=re.escape(named)):
        await place_order()
    assert await outbox.pending_count() == 0
    with pytest.raises(InvalidMessage, match=re.escape(named)):
        await broker.publish(subject(), message)


@pytest.mark.parametrize(
    "name",
    [
        "Nats-Msg-Id",  # NATS dropped every later message with the same value
        "Nats-Expected-Last-Sequence",  # refused by the stream: the relay stuck on it
        "nats-rollup",
        "Seamwork-Deliveries",  # RabbitMQ: the message arrived as its 8th attempt
        "Seamwork-Subject",
        "Seamwork-DLQ-Error",
        "x-delivery-count",  # RabbitMQ: dead-lettered unhandled as a crash loop
        "x-death",
        "x-first-death-queue",
    ],
)
async def test_a_header_name_a_broker_keeps_for_itself_is_refused_inside_the_transaction(
    outbox: Outbox, broker: NatsBroker, name: str
) -> None:
    message = Message("Created", headers={name: "1"})

    async def place_order() -> None:
        async with outbox.transaction() as tx:
            await tx.execute("INSERT INTO orders (id) VALUES (1)")
            await tx.publish("orders.created", message)

    with pytest.raises(InvalidMessage, match=f"header {name!r} is kept by the broker"):
        await place_order()
    assert await outbox.pending_count() == 0
    with pytest.raises(InvalidMessage, match="kept by the broker"):
        await broker.publish(subject(), message)


async def test_header_names_only_like_a_brokers_own_arrive_as_sent(broker: NatsBroker) -> None:
    headers = {"x-trace": "1", "Natsume": "2", "seamwork": "3", "x-deaths-total": "4"}
    got: list[Delivery] = []

    async def handler(delivery: Delivery) -> None:
        got.append(delivery)

    topic = subject()
    await broker.subscribe(topic, "g", handler)
    await broker.publish(topic, Message("Created", headers=headers))
    await eventually(lambda: len(got) == 1)
    assert got[0].message.headers == headers


@pytest.mark.parametrize("field", ["correlation_id", "causation_id"])
def test_a_correlation_or_causation_id_that_is_not_a_string_is_refused_by_name(
    field: str,
) -> None:
    with pytest.raises(ConfigError, match=field):
        Message("Created", **{field: 42})  # type: ignore[arg-type]


def test_a_follow_up_with_bad_data_or_its_own_flow_ids_is_refused_by_name() -> None:
    created = Message("Created", {"n": 1}, correlation_id="order-1")
    for data in ([], 0, ""):  # were taken as no data at all
        with pytest.raises(ConfigError, match=r"message 'Next': data must be a mapping"):
            created.caused("Next", data)  # type: ignore[arg-type]
    for field in ("correlation_id", "causation_id"):  # a TypeError of Message()'s
        with pytest.raises(ConfigError, match=rf"caused\(\) sets {field} itself"):
            created.caused("Next", {}, **{field: "other"})
    with pytest.raises(ConfigError, match=r"message 'Next': headers must be a mapping"):
        created.caused("Next", headers=None)  # was a TypeError from dict.update
    follow_up = created.caused("Next", None, headers={"x-tenant": "t1"})
    assert (follow_up.correlation_id, follow_up.causation_id) == ("order-1", created.id)
    assert (follow_up.data, follow_up.headers) == ({}, {"x-tenant": "t1"})


@pytest.mark.parametrize(
    ("bad", "named"),
    [
        ("orders..created", "empty token"),
        ("orders.created.", "empty token"),
        ("orders.a\tb", "whitespace"),
        ("orders.*", "wildcards"),
        (">", "wildcards"),
        ("orders.caf\udcff", "not valid Unicode"),
    ],
)
async def test_a_subject_the_relay_could_never_send_is_refused_inside_the_transaction(
    outbox: Outbox, tmp_path: Path, bad: str, named: str
) -> None:
    async def place_order() -> None:
        async with outbox.transaction() as tx:
            await tx.execute("INSERT INTO orders (id) VALUES (1)")
            await tx.publish(bad, Message("OrderCreated"))

    with pytest.raises(ConfigError, match=named):
        await place_order()
    assert rows(tmp_path / "orders.db", "SELECT id FROM orders") == []
    assert await outbox.pending_count() == 0


async def test_the_relay_publishes_in_order_and_marks_rows_sent(
    outbox: Outbox, broker: NatsBroker
) -> None:
    topic = subject()
    got: list[int] = []

    async def collect(delivery: Delivery) -> None:
        got.append(delivery.message.data["n"])

    await broker.subscribe(topic, "ordered", collect)
    for start in range(0, 60, 20):
        async with outbox.transaction() as tx:
            for n in range(start, start + 20):
                await tx.publish(topic, Message("N", {"n": n}))
    assert await outbox.pending_count() == 60
    assert await OutboxRelay(outbox, broker, page_size=25).drain() == 60
    assert await outbox.pending_count() == 0
    await eventually(lambda: len(got) == 60)
    assert got == list(range(60))


async def test_a_drain_while_the_relay_runs_publishes_each_message_once(
    outbox: Outbox, rabbitmq_service: str
) -> None:
    """RabbitMQ keeps every copy (no de-duplication by id), so a page published by two
    drains at once would reach the group twice."""
    broker = RabbitBroker(rabbitmq_service, exchange=f"seamwork-relay-{uuid.uuid4().hex[:10]}")
    topic = subject()
    got: list[str] = []

    async def collect(delivery: Delivery) -> None:
        got.append(delivery.message.id)

    try:
        await broker.subscribe(topic, "once", collect)
        async with outbox.transaction() as tx:
            for n in range(30):
                await tx.publish(topic, Message("N", {"n": n}))
        relay = OutboxRelay(outbox, broker, poll_interval=0.05)
        async with relay:
            counts = await asyncio.gather(relay.drain(), relay.drain())
            await eventually(lambda: len(got) >= 30)
            await asyncio.sleep(0.5)
        assert len(got) == len(set(got)) == 30
        assert sum(counts) <= 30
        assert relay.published == 30
    finally:
        names = broker.declared_queues
        await broker.aclose()
        await _delete_rabbit(rabbitmq_service, broker.exchange_name, names)


async def _delete_rabbit(url: str, exchange: str, queues: Sequence[str]) -> None:
    connection = await aio_pika.connect(url)
    async with connection:
        for name in queues:
            channel = await connection.channel()
            with contextlib.suppress(aio_pika.exceptions.AMQPError):
                await channel.queue_delete(name)
        channel = await connection.channel()
        with contextlib.suppress(aio_pika.exceptions.AMQPError):
            await channel.exchange_delete(exchange)


async def test_a_relay_killed_between_ack_and_mark_sent_resends_and_the_copy_is_dropped(
    outbox: Outbox, broker: NatsBroker, inbox: Inbox, tmp_path: Path
) -> None:
    topic = subject()
    async with outbox.transaction() as tx:
        for n in range(10):
            await tx.publish(topic, Message("N", {"n": n}))
    with pytest.raises(RelayCrashed):
        await OutboxRelay(outbox, CrashAfterAck(broker)).drain()  # type: ignore[arg-type]
    assert await outbox.pending_count() == 10  # stored by the broker, not marked sent
    async with outbox.transaction() as tx:
        for n in range(10, 15):
            await tx.publish(topic, Message("N", {"n": n}))
    assert await OutboxRelay(outbox, broker).drain() == 15
    assert await stored(broker, topic) == 15  # the ten re-sent were dropped by id
    await broker.subscribe(topic, "effects", inbox.handler(record_effect))
    db = tmp_path / "payments.db"
    await eventually(lambda: len(rows(db, "SELECT n FROM effects")) == 15)
    assert rows(db, "SELECT n FROM effects ORDER BY rowid") == [(n,) for n in range(15)]


async def test_purge_sent_deletes_old_sent_rows_and_resend_since_replays_them(
    outbox: Outbox, broker: NatsBroker
) -> None:
    topic = subject()
    async with outbox.transaction() as tx:
        for n in range(5):
            await tx.publish(topic, Message("N", {"n": n}))
    before = time.time()
    await OutboxRelay(outbox, broker).drain()
    async with outbox.transaction() as tx:
        await tx.publish(topic, Message("N", {"n": 5}))
    assert await outbox.resend_since(before) == 5  # after broker data loss
    assert await outbox.pending_count() == 6
    assert await OutboxRelay(outbox, broker).drain() == 6
    assert await stored(broker, topic) == 6
    assert await outbox.purge_sent(before) == 0  # sent after `before`: kept
    assert await outbox.purge_sent(time.time() + 1) == 6
    assert await outbox.resend_since(0) == 0
    assert await outbox.pending_count() == 0


async def test_a_tx_used_after_its_block_is_refused_and_no_message_is_lost_silently(
    outbox: Outbox,
) -> None:
    async with outbox.transaction() as tx:
        stale = tx
    with pytest.raises(StoreError, match="transaction has ended"):
        await stale.publish("orders.created", Message("OrderCreated"))
    with pytest.raises(StoreError, match="ended"):
        await stale.execute("INSERT INTO orders (id) VALUES (?)", (1,))
    assert await outbox.pending_count() == 0


# --- inbox ------------------------------------------------------------------------------


async def test_the_inbox_applies_a_redelivered_message_once(
    inbox: Inbox, broker: NatsBroker, tmp_path: Path
) -> None:
    topic = subject()
    handler = inbox.handler(record_effect)
    message = Message("N", {"n": 7})
    delivery = Delivery(message, topic, "g")
    await handler(delivery)
    await handler(Delivery(message, topic, "g", attempt=2))
    assert await handler.batch([delivery, delivery]) == [None, None]
    # the broker delivers two copies (stored twice under different broker ids)
    await broker.subscribe(topic, "g", handler)
    await broker.publish(topic, message, headers={"Nats-Msg-Id": "copy-1"})
    await broker.publish(topic, message, headers={"Nats-Msg-Id": "copy-2"})
    await broker.publish(topic, Message("N", {"n": 8}))
    db = tmp_path / "payments.db"
    await eventually(lambda: len(rows(db, "SELECT n FROM effects")) == 2)
    assert rows(db, "SELECT n FROM effects ORDER BY rowid") == [(7,), (8,)]
    assert await inbox.seen(message.id)


async def test_a_handlers_tx_used_after_it_returned_is_refused_not_run_in_the_next_message(
    inbox: Inbox, tmp_path: Path
) -> None:
    kept: list[Transaction] = []
    late: list[BaseException] = []

    async def apply(message: Message, tx: Transaction) -> None:
        if kept:  # the first handler's tx, used while this message is applied
            try:
                await kept[0].execute("INSERT INTO effects (n, message_id) VALUES (99, 'late')")
            except StoreError as exc:
                late.append(exc)
        kept.append(tx)
        await record_effect(message, tx)

    batch = [Delivery(Message("N", {"n": n}), "s", "g") for n in (1, 2)]
    assert await inbox.handler(apply).batch(batch) == [None, None]
    assert [str(e) for e in late] == [
        "the transaction has ended: use tx only inside its block (nothing was applied)"
    ]
    assert rows(tmp_path / "payments.db", "SELECT n FROM effects ORDER BY rowid") == [(1,), (2,)]


async def test_a_failing_message_in_a_batch_rolls_back_alone(inbox: Inbox, tmp_path: Path) -> None:
    async def apply(message: Message, tx: Transaction) -> None:
        await record_effect(message, tx)
        if message.data["n"] == 2:
            raise ConnectionError("downstream busy")

    handler = inbox.handler(apply)
    batch = [Delivery(Message("N", {"n": n}), "s", "g") for n in range(1, 4)]
    outcomes = await handler.batch(batch)
    assert outcomes[0] is None
    assert isinstance(outcomes[1], ConnectionError)
    assert outcomes[2] is None
    db = tmp_path / "payments.db"
    assert rows(db, "SELECT n FROM effects ORDER BY rowid") == [(1,), (3,)]
    assert not await inbox.seen(batch[1].message.id)
    assert await inbox.handler(record_effect).batch([batch[1], batch[0]]) == [None, None]
    assert rows(db, "SELECT n FROM effects ORDER BY rowid") == [(1,), (3,), (2,)]


def test_types_given_as_one_string_are_refused_not_read_as_letters(inbox: Inbox) -> None:
    with pytest.raises(ConfigError, match="types must be a collection"):
        inbox.handler(record_effect, types="OrderCreated")  # would dead-letter OrderCreated


async def test_an_undeclared_message_type_is_dead_lettered_and_the_rest_flow(
    inbox: Inbox, broker: NatsBroker, tmp_path: Path
) -> None:
    topic = subject()
    handler = inbox.handler(record_effect, types={"N"})
    await broker.subscribe(topic, "typed", handler)
    stray = Message("Surprise", {"n": 0})
    await broker.publish_batch([(topic, Message("N", {"n": 1})), (topic, stray)])
    await broker.publish(topic, Message("N", {"n": 2}))
    letter = await dead_letter_of(broker, topic)
    assert letter.message.id == stray.id
    assert "no handler for message type 'Surprise'" in letter.error
    assert letter.attempts == 1
    db = tmp_path / "payments.db"
    await eventually(lambda: len(rows(db, "SELECT n FROM effects")) == 2)
    assert not await inbox.seen(stray.id)


async def test_a_body_that_is_not_json_is_dead_lettered_with_its_bytes_and_the_rest_flow(
    inbox: Inbox, broker: NatsBroker, server: EmbeddedNats, tmp_path: Path
) -> None:
    topic = subject()
    await broker.subscribe(topic, "json", inbox.handler(record_effect))
    raw = await nats.connect(server.url)
    try:
        js = raw.jetstream()
        headers = {"Seamwork-Type": "N", "Seamwork-Id": "bad-1", "Nats-Msg-Id": "bad-1"}
        await js.publish(topic, b"{not json", headers=headers)
    finally:
        await raw.close()
    await broker.publish_batch([(topic, Message("N", {"n": n})) for n in range(3)])
    letter = await dead_letter_of(broker, topic)
    assert "not valid JSON" in letter.error
    assert letter.message.data == {"raw": "{not json"}  # nothing lost: the bytes are kept
    db = tmp_path / "payments.db"
    await eventually(lambda: len(rows(db, "SELECT n FROM effects")) == 3)


async def test_a_follow_up_published_by_a_handler_is_sent_only_if_the_handler_commits(
    outbox: Outbox,
) -> None:
    inbox = Inbox.of(outbox)

    async def charge(message: Message, tx: Transaction) -> None:
        await tx.execute("INSERT INTO orders (id) VALUES (?)", (message.data["order_id"],))
        await tx.publish("payments.done", message.caused("PaymentProcessed", {"ok": True}))
        if message.data["order_id"] == 2:
            raise ConnectionError("card processor down")

    handler = inbox.handler(charge)
    ok, failing = Message("OrderCreated", {"order_id": 1}), Message("OrderCreated", {"order_id": 2})
    with pytest.raises(ConnectionError):
        await handler(Delivery(failing, "orders.created", "payments"))
    assert await outbox.pending_count() == 0
    outcomes = await handler.batch(
        [Delivery(ok, "orders.created", "payments"), Delivery(failing, "orders.created", "p")]
    )
    assert outcomes[0] is None
    assert isinstance(outcomes[1], ConnectionError)
    (record,) = await outbox.pending(10)
    assert record.message.type == "PaymentProcessed"
    assert (record.message.correlation_id, record.message.causation_id) == (ok.id, ok.id)


TRACE = {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}


async def follow_ups(message: Message, tx: Transaction) -> None:
    """Publishes what a handler writes most naturally - a plain ``Message`` - and two
    that name a flow or a cause of their own."""
    n = message.data["n"]
    await tx.publish("payments.charged", Message("PaymentCharged", {"n": n}))
    await tx.publish("audit.opened", Message("AuditOpened", {"n": n}, correlation_id=f"audit-{n}"))
    await tx.publish("audit.noted", Message("AuditNoted", {"n": n}, causation_id="elsewhere"))
    await tx.publish("orders.forwarded", message)  # not its own cause


async def test_a_plain_follow_up_joins_the_flow_of_the_message_handled(outbox: Outbox) -> None:
    # a handler's Message(...) started a flow of its own: no correlation, no
    # causation, and the monitor lost the order there
    inbox = Inbox.of(outbox)
    handler = inbox.handler(follow_ups)
    started = Message("OrderCreated", {"n": 1}, headers=TRACE)  # starts its flow
    joined = Message("OrderCreated", {"n": 2}, correlation_id="order-2")
    await handler(Delivery(started, "orders.created", "payments"))  # one transaction
    assert await handler.batch([Delivery(joined, "orders.created", "payments")]) == [None]
    sent = {(r.message.type, r.message.data["n"]): r.message for r in await outbox.pending(10)}
    for n, cause, flow in ((1, started, started.id), (2, joined, "order-2")):
        charged = sent["PaymentCharged", n]
        assert (charged.correlation_id, charged.causation_id) == (flow, cause.id)
        own = sent["AuditOpened", n]  # given a flow of its own: a new flow, as written
        assert (own.correlation_id, own.causation_id) == (f"audit-{n}", None)
        noted = sent["AuditNoted", n]  # given a cause: left as written
        assert (noted.flow, noted.causation_id) == (noted.id, "elsewhere")
        forwarded = sent["OrderCreated", n]
        assert (forwarded.id, forwarded.causation_id) == (cause.id, None)
    assert sent["PaymentCharged", 1].headers == TRACE  # trace context, as caused() does
    assert sent["PaymentCharged", 2].headers == {}
    async with outbox.transaction() as tx:  # no message handled: nothing to join
        await tx.publish("orders.created", Message("OrderCreated", {"n": 3}))
    (created,) = [r.message for r in await outbox.pending(10) if r.message.data["n"] == 3]
    assert (created.flow, created.causation_id) == (created.id, None)


async def test_a_handlers_plain_follow_up_reaches_the_flow_monitor_in_its_flow(
    outbox: Outbox, broker: NatsBroker, tmp_path: Path
) -> None:
    prefix = f"t{uuid.uuid4().hex[:10]}"
    created_on, charged_on = f"{prefix}.orders.created", f"{prefix}.payments.charged"

    async def charge(message: Message, tx: Transaction) -> None:
        await tx.execute("INSERT INTO orders (id) VALUES (?)", (message.data["order_id"],))
        await tx.publish(charged_on, Message("PaymentCharged", dict(message.data)))

    monitor = FlowMonitor({"PaymentCharged": "charged"}, service_of=lambda s: s.split(".")[1])
    await monitor.watch(broker, [created_on, charged_on], group="monitor")
    await broker.subscribe(created_on, "payments", Inbox.of(outbox).handler(charge))
    created = Message("OrderCreated", {"order_id": 7})
    async with OutboxRelay(outbox, broker, poll_interval=0.05):
        async with outbox.transaction() as tx:
            await tx.publish(created_on, created)
        flow = await until(lambda: _settled(monitor, created.id), seconds=5)
    assert (flow.path, flow.status) == (
        [("OrderCreated", "orders"), ("PaymentCharged", "payments")],
        "charged",
    )
    assert flow.steps[1].causation_id == created.id
    stored = rows(
        tmp_path / "orders.db",
        "SELECT type, correlation_id, causation_id FROM seamwork_outbox ORDER BY seq",
    )
    assert stored == [
        ("OrderCreated", created.id, None),
        ("PaymentCharged", created.id, created.id),
    ]


async def _settled(monitor: FlowMonitor, correlation_id: str) -> Flow | None:
    flow = monitor.flow(correlation_id)
    return flow if flow is not None and flow.status != "in progress" else None


async def test_a_handler_returning_its_follow_up_is_poison_and_applies_nothing(
    outbox: Outbox,
) -> None:
    # returning the follow-up instead of tx.publish-ing it dropped it without a word:
    # the message was acknowledged and the flow stopped there
    inbox = Inbox.of(outbox)

    async def charge(message: Message, tx: Transaction) -> Message:
        await tx.execute("INSERT INTO orders (id) VALUES (?)", (message.data["order_id"],))
        return message.caused("PaymentProcessed", {"ok": True})

    handler = inbox.handler(charge)  # type: ignore[arg-type]
    created = Message("OrderCreated", {"order_id": 1})
    with pytest.raises(PoisonMessage, match=r"charge returned a Message .*tx\.publish"):
        await handler(Delivery(created, "orders.created", "payments"))
    (outcome,) = await handler.batch([Delivery(created, "orders.created", "payments")])
    assert isinstance(outcome, PoisonMessage)
    assert not await inbox.seen(created.id)  # dead-lettered whole: a replay applies it

    async def fan_out(message: Message, tx: Transaction) -> list[Message]:
        await tx.execute("INSERT INTO orders (id) VALUES (?)", (message.data["order_id"],))
        return [message.caused("Reserved"), message.caused("Charged")]

    with pytest.raises(PoisonMessage, match=r"fan_out returned a Message \(Reserved\)"):
        await inbox.handler(fan_out)(Delivery(created, "orders.created", "payments"))  # type: ignore[arg-type]
    async with outbox.transaction() as tx:
        assert await tx.execute("SELECT count(*) FROM orders") == [(0,)]
    assert await outbox.pending_count() == 0


async def test_an_inbox_without_batches_applies_a_batch_one_transaction_each(
    tmp_path: Path,
) -> None:
    from seamwork.storage.sqlite_messaging import SQLiteInbox

    class OneAtATime(SQLiteInbox):
        def _batch(self, messages: Sequence[Message], group: str = "") -> Any:
            raise NotImplementedError

    inbox = OneAtATime.open_path(tmp_path / "plain.db")
    async with inbox:
        async with inbox._transaction(Message("Setup")) as tx:
            assert tx is not None
            await tx.execute("CREATE TABLE effects (n INTEGER, message_id TEXT)")

        async def apply(message: Message, tx: Transaction) -> None:
            await record_effect(message, tx)
            if message.data["n"] == 2:
                raise ConnectionError("downstream busy")

        first = Delivery(Message("N", {"n": 1}), "s", "g")
        outcomes = await inbox.handler(apply).batch(
            [first, Delivery(Message("N", {"n": 2}), "s", "g"), first]
        )
    assert outcomes[0] is None
    assert isinstance(outcomes[1], ConnectionError)
    assert outcomes[2] is None
    assert rows(tmp_path / "plain.db", "SELECT n FROM effects") == [(1,)]


async def test_a_message_id_the_outbox_holds_already_is_named_and_nothing_is_written(
    outbox: Outbox,
) -> None:
    message = Message("OrderCreated", {"order_id": 1})
    async with outbox.transaction() as tx:
        await tx.publish("orders.created", message)

    async def again() -> None:
        async with outbox.transaction() as tx:
            await tx.execute("INSERT INTO orders (id) VALUES (?)", (2,))
            await tx.publish("orders.created", message)

    with pytest.raises(StoreError, match=f"message id '{message.id}' is in the outbox already"):
        await again()
    async with outbox.transaction() as tx:
        assert await tx.execute("SELECT count(*) FROM orders", ()) == [(0,)]
    assert await outbox.pending_count() == 1


async def test_one_message_id_published_twice_in_a_transaction_is_named(outbox: Outbox) -> None:
    message = Message("OrderCreated", {"order_id": 1})

    async def twice() -> None:
        async with outbox.transaction() as tx:
            await tx.publish("orders.created", message)
            await tx.publish("orders.audit", message)

    with pytest.raises(StoreError, match=f"message id '{message.id}' is in the outbox already"):
        await twice()
    assert await outbox.pending_count() == 0


@pytest.mark.parametrize(
    "option",
    [
        {"page_size": 2.5},  # SQLite: 'datatype mismatch' on every drain, nothing sent
        {"page_size": True},
        {"page_size": 0},
        {"poll_interval": float("nan")},  # never polls: other processes' rows wait
        {"poll_interval": float("inf")},
        {"poll_interval": 0},
        {"retention": float("nan")},  # never purges: sent rows pile up
        {"retention": -1},
    ],
)
def test_a_relay_setting_it_could_never_run_with_is_refused_by_name(
    outbox: Outbox, option: dict[str, Any]
) -> None:
    (name,) = option
    with pytest.raises(ConfigError, match=name):
        OutboxRelay(outbox, NatsBroker("nats://127.0.0.1:1"), **option)
