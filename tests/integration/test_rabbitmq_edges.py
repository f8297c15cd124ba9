"""``RabbitBroker`` edge cases on the RabbitMQ service (127.0.0.1:5672, guest/guest).

Stopping a member mid-backlog, attempts across restarts, a read-only dead-letter
listing, and a retry or dead-letter queue deleted under a running subscription.
Each test uses its own exchange and deletes what it declared.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import aio_pika
import pytest
from typer.testing import CliRunner

from seamwork.brokers import RabbitBroker
from seamwork.cli import app
from seamwork.errors import BrokerUnavailable, ConfigError, MessagingError
from seamwork.messaging import DeadLetter, Delivery, Message, PoisonMessage
from seamwork.messaging._ports import DLQ_SUBJECT
from seamwork.testing.broker import eventually, until
from shared_helpers import delete_rabbit


@pytest.fixture
async def exchange(rabbitmq_service: str) -> AsyncIterator[str]:
    name = f"seamwork-edge-{uuid.uuid4().hex[:10]}"
    yield name
    await delete_rabbit(rabbitmq_service, name, [f"{name}.deadletter"])


async def test_a_dead_letter_stream_deleted_under_a_subscription_loses_no_message(
    rabbitmq_service: str, exchange: str
) -> None:
    broker = RabbitBroker(rabbitmq_service, exchange=exchange)
    subject = f"edge{uuid.uuid4().hex[:6]}.poison"
    calls: list[int] = []

    async def poisoned(delivery: Delivery) -> None:
        calls.append(delivery.attempt)
        raise PoisonMessage("cannot be handled")

    try:
        await broker.subscribe(subject, "g", poisoned, retry_delay=0.05)
        connection = await aio_pika.connect(rabbitmq_service)
        async with connection:
            channel = await connection.channel()
            await channel.queue_delete(broker.dead_letter_queue)
        message = Message("T", {"i": 1})
        await broker.publish(subject, message)
        # Returned by the broker (no stream), requeued, then dead-lettered into the
        # stream declared again - not acknowledged into nowhere.
        await eventually(lambda: len(calls) >= 2)
        letters = await until(broker.dead_letters)
        assert [x.message.id for x in letters] == [message.id]
    finally:
        names = broker.declared_queues
        await broker.aclose()
        await delete_rabbit(rabbitmq_service, exchange, names)


async def test_messages_handed_back_by_stopped_members_have_not_failed(
    rabbitmq_service: str, exchange: str
) -> None:
    """Three graceful restarts return prefetched messages; none of that is a failure."""
    broker = RabbitBroker(rabbitmq_service, exchange=exchange)
    subject = f"edge{uuid.uuid4().hex[:6]}.restart"
    first_attempt: dict[int, int] = {}
    started = asyncio.Event()

    async def hold(delivery: Delivery) -> None:
        first_attempt.setdefault(delivery.message.data["i"], delivery.attempt)
        started.set()
        await asyncio.sleep(0.2)

    try:
        for restart in range(3):
            started.clear()
            subscription = await broker.subscribe(subject, "g", hold, max_deliver=3)
            if restart == 0:
                for i in range(10):
                    await broker.publish(subject, Message("T", {"i": i}))
            await started.wait()
            await subscription.stop()
        assert 9 not in first_attempt  # prefetched and handed back, never handled
        failures: list[int] = []
        handled: list[int] = []

        async def fails_once(delivery: Delivery) -> None:
            i = delivery.message.data["i"]
            if i == 9 and not failures:
                failures.append(delivery.attempt)
                raise RuntimeError("transient")
            handled.append(i)

        await broker.subscribe(subject, "g", fails_once, max_deliver=3, retry_delay=0.05)
        await eventually(lambda: 9 in handled)
        assert failures == [1]
        assert await broker.dead_letters() == []
    finally:
        names = broker.declared_queues
        await broker.aclose()
        await delete_rabbit(rabbitmq_service, exchange, names)


async def test_a_message_that_keeps_coming_back_unsettled_is_dead_lettered_unhandled(
    rabbitmq_service: str, exchange: str
) -> None:
    broker = RabbitBroker(rabbitmq_service, exchange=exchange, crash_limit=2)
    subject = f"edge{uuid.uuid4().hex[:6]}.crash"
    calls: list[Delivery] = []

    async def handler(delivery: Delivery) -> None:
        calls.append(delivery)

    try:
        await (await broker.subscribe(subject, "g", handler)).stop()  # the group's queue
        message = Message("T", {"i": 1})
        await broker.publish(subject, message)
        connection = await aio_pika.connect(rabbitmq_service)
        async with connection:
            for _ in range(2):  # a consumer that dies holding the message, twice
                channel = await connection.channel()
                queue = await channel.get_queue(f"g.{subject}", ensure=False)
                assert await queue.get(no_ack=False, timeout=5) is not None
                await channel.close()
        await broker.subscribe(subject, "g", handler)
        (letter,) = await until(broker.dead_letters)
        assert letter.message.id == message.id
        assert letter.error == "delivered 2 times without an outcome (consumer crash loop)"
        assert calls == []
    finally:
        names = broker.declared_queues
        await broker.aclose()
        await delete_rabbit(rabbitmq_service, exchange, names)


async def test_a_group_queue_declared_without_a_delivery_limit_still_subscribes(
    rabbitmq_service: str, exchange: str
) -> None:
    broker = RabbitBroker(rabbitmq_service, exchange=exchange)
    subject = f"edge{uuid.uuid4().hex[:6]}.old"
    got: list[str] = []

    async def handler(delivery: Delivery) -> None:
        got.append(delivery.message.id)

    connection = await aio_pika.connect(rabbitmq_service)
    try:
        channel = await connection.channel()
        await channel.declare_queue(
            f"g.{subject}", durable=True, arguments={"x-queue-type": "quorum"}
        )
        await broker.subscribe(subject, "g", handler)
        message = Message("T", {"i": 1})
        await broker.publish(subject, message)
        await eventually(lambda: got == [message.id])
    finally:
        await connection.close()
        names = (*broker.declared_queues, f"g.{subject}")
        await broker.aclose()
        await delete_rabbit(rabbitmq_service, exchange, names)


async def _exists(url: str, *, exchange: str | None = None, queue: str | None = None) -> bool:
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        try:
            if exchange is not None:
                await channel.get_exchange(exchange, ensure=True)
            if queue is not None:
                await channel.declare_queue(queue, passive=True)
        except aio_pika.exceptions.ChannelNotFoundEntity:
            return False
    return True


async def _stream_length(url: str, name: str) -> int:
    """Every message in stream ``name`` (read until 0.5 s pass without one)."""
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=100)
        queue = await channel.get_queue(name, ensure=False)
        got: list[int] = []

        async def take(msg: aio_pika.abc.AbstractIncomingMessage) -> None:
            await msg.ack()
            got.append(1)

        await queue.consume(take, arguments={"x-stream-offset": "first"})
        seen = -1
        while seen != len(got):
            seen = len(got)
            await asyncio.sleep(0.5)
        return seen


async def test_listing_an_exchange_that_does_not_exist_creates_nothing(
    rabbitmq_service: str, exchange: str
) -> None:
    typo = f"{exchange}-typo"
    broker = RabbitBroker(rabbitmq_service, exchange=typo)
    try:
        with pytest.raises(BrokerUnavailable, match=f"no seamwork exchange '{typo}'"):
            await broker.dead_letters()
    finally:
        await broker.aclose()
    result = await asyncio.to_thread(
        CliRunner().invoke,
        app,
        ["dlq", "list", "--rabbitmq", rabbitmq_service, "--exchange", typo],
        env={"COLUMNS": "200"},
    )
    try:
        assert result.exit_code == 1, result.output
        assert f"no seamwork exchange '{typo}' on the broker" in result.output
        assert not await _exists(rabbitmq_service, exchange=typo)
        assert not await _exists(rabbitmq_service, queue=f"{typo}.deadletter")
    finally:
        await delete_rabbit(rabbitmq_service, typo, [f"{typo}.deadletter"])


async def test_listing_dead_letters_writes_nothing_to_the_stream(
    rabbitmq_service: str, exchange: str
) -> None:
    broker = RabbitBroker(rabbitmq_service, exchange=exchange)
    subject = f"edge{uuid.uuid4().hex[:6]}.list"

    async def poisoned(delivery: Delivery) -> None:
        raise PoisonMessage("no")

    try:
        await broker.subscribe(subject, "g", poisoned)
        message = Message("T", {"i": 1})
        await broker.publish(subject, message)
        await until(broker.dead_letters)
        before = await _stream_length(rabbitmq_service, broker.dead_letter_queue)
        assert before == 1
        reader = RabbitBroker(rabbitmq_service, exchange=exchange)  # connects read-only
        try:
            for lister in (broker, reader, reader):
                assert [x.message.id for x in await lister.dead_letters()] == [message.id]
        finally:
            await reader.aclose()
        assert reader.declared_queues == ()
        assert await _stream_length(rabbitmq_service, broker.dead_letter_queue) == before
    finally:
        names = broker.declared_queues
        await broker.aclose()
        await delete_rabbit(rabbitmq_service, exchange, names)


async def test_a_missing_dead_letter_stream_lists_as_empty_and_stays_missing(
    rabbitmq_service: str, exchange: str
) -> None:
    connection = await aio_pika.connect(rabbitmq_service)
    async with connection:
        channel = await connection.channel()
        await channel.declare_exchange(exchange, aio_pika.ExchangeType.TOPIC, durable=True)
    broker = RabbitBroker(rabbitmq_service, exchange=exchange)
    try:
        assert await broker.dead_letters() == []
    finally:
        await broker.aclose()
    assert not await _exists(rabbitmq_service, queue=f"{exchange}.deadletter")


async def test_a_wildcard_group_gets_every_matching_subject_with_its_own_subject(
    rabbitmq_service: str, exchange: str
) -> None:
    broker = RabbitBroker(rabbitmq_service, exchange=exchange)
    prefix = f"edge{uuid.uuid4().hex[:6]}"
    got: dict[str, list[str]] = {"one": [], "all": []}

    def collect(name: str) -> Callable[[Delivery], Awaitable[None]]:
        async def handler(delivery: Delivery) -> None:
            got[name].append(delivery.subject)

        return handler

    try:
        await broker.subscribe(f"{prefix}.*", "g", collect("one"))
        await broker.subscribe(f"{prefix}.>", "g", collect("all"))
        await broker.publish(f"{prefix}.a", Message("T"))
        await broker.publish(f"{prefix}.b.c", Message("T"))
        await eventually(lambda: len(got["all"]) == 2 and len(got["one"]) == 1)
        assert got == {"one": [f"{prefix}.a"], "all": [f"{prefix}.a", f"{prefix}.b.c"]}
        assert set(broker.declared_queues) >= {f"g.{prefix}..any", f"g.{prefix}..all"}
    finally:
        names = broker.declared_queues
        await broker.aclose()
        await delete_rabbit(rabbitmq_service, exchange, names)


@pytest.mark.parametrize("group", ["café", "a" * 250])
async def test_a_group_that_cannot_name_a_queue_is_refused_before_anything_is_declared(
    rabbitmq_service: str, exchange: str, group: str
) -> None:
    broker = RabbitBroker(rabbitmq_service, exchange=exchange)

    async def handler(delivery: Delivery) -> None:
        raise AssertionError("nothing is delivered to a refused subscription")

    with pytest.raises(ConfigError, match="cannot name a RabbitMQ queue"):
        await broker.subscribe("orders.created", group, handler)
    await broker.aclose()
    assert not await _exists(rabbitmq_service, exchange=exchange)


async def test_a_message_with_a_blank_type_is_dead_lettered_at_once_and_listed(
    rabbitmq_service: str, exchange: str
) -> None:
    """Sent by another producer: RabbitMQ carries a type of spaces as it is."""
    broker = RabbitBroker(rabbitmq_service, exchange=exchange)
    subject = f"edge{uuid.uuid4().hex[:6]}.blank"
    calls: list[int] = []

    async def handler(delivery: Delivery) -> None:
        calls.append(delivery.attempt)

    try:
        await broker.subscribe(subject, "g", handler, max_deliver=3, retry_delay=0.05)
        connection = await aio_pika.connect(rabbitmq_service)
        async with connection:
            channel = await connection.channel()
            target = await channel.get_exchange(exchange)
            raw = aio_pika.Message(b"{}", headers={"Seamwork-Type": "  "}, message_id="m-1")
            await target.publish(raw, routing_key=subject)
        (letter,) = await until(broker.dead_letters)
    finally:
        names = broker.declared_queues
        await broker.aclose()
        await delete_rabbit(rabbitmq_service, exchange, names)
    assert calls == []
    assert (letter.subject, letter.attempts) == (subject, 1)
    assert letter.error.startswith("InvalidMessage")
    assert letter.message.data == {"raw": "{}"}


@pytest.mark.parametrize("named", ["", "p.*", "p.>", "p..x", "p x"])
async def test_a_dead_letter_that_names_no_subject_is_refused_by_key_on_replay(
    rabbitmq_service: str, exchange: str, named: str
) -> None:
    """Filed by hand or by another tool: a letter whose Seamwork-DLQ-Subject is not a
    subject was replayed with it as routing key (a wildcard reaching every group bound
    to a matching pattern, ``p.*`` here) and then tombstoned."""
    broker = RabbitBroker(rabbitmq_service, exchange=exchange)
    prefix = f"edge{uuid.uuid4().hex[:6]}"
    got: list[str] = []

    async def handler(delivery: Delivery) -> None:
        got.append(delivery.subject)

    try:
        await broker.subscribe(f"{prefix}.*", "g", handler)
        headers = {DLQ_SUBJECT: named.replace("p", prefix, 1)}
        connection = await aio_pika.connect(rabbitmq_service)
        async with connection:
            channel = await connection.channel()
            letter = aio_pika.Message(b"{}", headers={"Seamwork-Type": "T", **headers})
            await channel.default_exchange.publish(letter, routing_key=broker.dead_letter_queue)
        (filed,) = await until(broker.dead_letters)
        with pytest.raises(MessagingError, match=f"dead letter {filed.key} names no subject"):
            await broker.replay_dead_letter(filed.key)
        await asyncio.sleep(0.3)
        left = await broker.dead_letters()
    finally:
        names = broker.declared_queues
        await broker.aclose()
        await delete_rabbit(rabbitmq_service, exchange, names)
    assert got == []
    assert [x.key for x in left] == [filed.key]  # kept, not lost


async def test_header_values_sent_as_bytes_are_read_as_utf8_and_other_types_refused(
    rabbitmq_service: str, exchange: str
) -> None:
    """Another client's headers may arrive as AMQP byte arrays (bytearray here, what
    aio-pika sends as one); those are text, and a
    value that is not text (a number, bytes that are not UTF-8) makes the message
    invalid instead of being dropped or spelt ``"b'...'"``."""
    broker = RabbitBroker(rabbitmq_service, exchange=exchange)
    subject = f"edge{uuid.uuid4().hex[:6]}.created"
    got: list[Delivery] = []

    async def handler(delivery: Delivery) -> None:
        got.append(delivery)

    def raw(id_: str, **odd: object) -> aio_pika.Message:
        headers = {
            "Seamwork-Type": bytearray(b"OrderCreated"),
            "Seamwork-Id": bytearray(id_.encode()),
            "Seamwork-Subject": bytearray(subject.encode()),
            "traceparent": bytearray(b"00-abc-def-01"),
            **odd,
        }
        return aio_pika.Message(b'{"n": 1}', headers=headers, message_id=id_)  # type: ignore[arg-type]

    try:
        await broker.subscribe(subject, "g", handler)
        connection = await aio_pika.connect(rabbitmq_service)
        async with connection:
            channel = await connection.channel()
            target = await channel.get_exchange(exchange)
            await target.publish(raw("m-1"), routing_key=subject)
            await target.publish(raw("m-2", note=7), routing_key=subject)
            await target.publish(raw("m-3", note=bytearray(b"\xff\xfe")), routing_key=subject)
        await eventually(lambda: len(got) == 1)
        letters = await until(lambda: _at_least(broker.dead_letters(), 2))
        await asyncio.sleep(0.3)
    finally:
        names = broker.declared_queues
        await broker.aclose()
        await delete_rabbit(rabbitmq_service, exchange, names)
    (delivery,) = got
    assert (delivery.message.type, delivery.message.id, delivery.subject) == (
        "OrderCreated",
        "m-1",
        subject,
    )
    assert delivery.message.data == {"n": 1}
    assert delivery.message.headers == {"traceparent": "00-abc-def-01"}
    by_id = {letter.message.id: letter for letter in letters}
    assert sorted(by_id) == ["m-2", "m-3"]
    assert "header 'note' must be text, got int" in by_id["m-2"].error
    assert "header 'note' is not UTF-8" in by_id["m-3"].error
    assert all(letter.subject == subject for letter in letters)


async def _at_least(letters: Awaitable[list[DeadLetter]], count: int) -> list[DeadLetter] | None:
    found = await letters
    return found if len(found) >= count else None


async def test_a_tail_wildcard_queue_bound_by_an_earlier_version_stops_taking_the_bare_prefix(
    rabbitmq_service: str, exchange: str
) -> None:
    broker = RabbitBroker(rabbitmq_service, exchange=exchange)
    prefix = f"edge{uuid.uuid4().hex[:6]}"
    got: list[str] = []

    async def handler(delivery: Delivery) -> None:
        got.append(delivery.subject)

    connection = await aio_pika.connect(rabbitmq_service)
    try:
        await broker.connect()
        channel = await connection.channel()
        arguments = {"x-queue-type": "quorum", "x-delivery-limit": 1000}
        queue = await channel.declare_queue(f"g.{prefix}..all", durable=True, arguments=arguments)
        await queue.bind(exchange, routing_key=f"{prefix}.#")  # as earlier versions bound it
        await broker.subscribe(f"{prefix}.>", "g", handler)
        await broker.publish(prefix, Message("T"))
        await broker.publish(f"{prefix}.a", Message("T"))
        await eventually(lambda: got == [f"{prefix}.a"])
        await asyncio.sleep(0.3)
        assert got == [f"{prefix}.a"]
    finally:
        await connection.close()
        names = broker.declared_queues
        await broker.aclose()
        await delete_rabbit(rabbitmq_service, exchange, names)


async def test_a_dotted_group_shares_no_queue_with_another_group_and_subject(
    rabbitmq_service: str, exchange: str
) -> None:
    """``billing`` on ``<t>.created`` and ``billing.<t>`` on ``created`` once both
    named the queue ``billing.<t>.created``: each group got half of the other's
    subject."""
    broker = RabbitBroker(rabbitmq_service, exchange=exchange)
    token = f"edge{uuid.uuid4().hex[:6]}"
    got: dict[str, list[tuple[str, int]]] = {"billing": [], "dotted": []}

    def handler(name: str) -> Callable[[Delivery], Awaitable[None]]:
        async def handle(delivery: Delivery) -> None:
            got[name].append((delivery.subject, delivery.message.data["i"]))

        return handle

    try:
        await broker.subscribe(f"{token}.created", "billing", handler("billing"))
        await broker.subscribe("created", f"billing.{token}", handler("dotted"))
        for i in range(4):
            await broker.publish(f"{token}.created", Message("T", {"i": i}))
        await broker.publish("created", Message("T", {"i": 9}))
        await eventually(lambda: len(got["billing"]) + len(got["dotted"]) >= 5)
        await asyncio.sleep(0.3)  # nothing more arrives
        assert got["billing"] == [(f"{token}.created", i) for i in range(4)]
        assert got["dotted"] == [("created", 9)]
    finally:
        names = broker.declared_queues
        await broker.aclose()
        await delete_rabbit(rabbitmq_service, exchange, names)


async def _stuck(
    broker: RabbitBroker, subjects: list[str], taken: list[str]
) -> list[asyncio.Task[None]]:
    """A subscription of group g per subject (ack_wait 1 s) whose handler holds a
    message, stuck; the ids it took go to ``taken``. Returns the consumers' tasks."""
    consumers: list[asyncio.Task[None]] = []
    for subject in subjects:

        async def stuck(delivery: Delivery) -> None:
            taken.append(delivery.message.id)
            await asyncio.Event().wait()

        subscription = await broker.subscribe(subject, "g", stuck, ack_wait=1)
        assert subscription._task is not None
        consumers.append(subscription._task)
        await broker.publish(subject, Message("T"))
    await eventually(lambda: len(taken) == len(subjects), 5)
    return consumers


async def _handled_again(url: str, exchange: str, subjects: list[str]) -> set[str]:
    """The ids group g gets on ``subjects`` from a fresh broker (what was not acked)."""
    again: list[str] = []

    async def note(delivery: Delivery) -> None:
        again.append(delivery.message.id)

    broker = RabbitBroker(url, exchange=exchange)
    try:
        for subject in subjects:
            await broker.subscribe(subject, "g", note)
        await eventually(lambda: len(again) >= len(subjects), 5)
    finally:
        await broker.aclose()
    return set(again)


async def test_closing_a_broker_stops_its_subscriptions_together(
    rabbitmq_service: str, exchange: str
) -> None:
    """aclose() stopped one subscription after the other: each waited its own grace for
    the handler in hand (two stuck handlers took 2 s of 1 s graces), and the others went
    on taking messages meanwhile."""
    base = f"edge{uuid.uuid4().hex[:6]}"
    stuck_on, quick_on = [f"{base}.a", f"{base}.b"], f"{base}.c"
    broker = RabbitBroker(rabbitmq_service, exchange=exchange)
    publisher = RabbitBroker(rabbitmq_service, exchange=exchange)
    taken: list[str] = []
    late = Message("T")
    try:
        await _stuck(broker, stuck_on, taken)
        await broker.subscribe(quick_on, "g", lambda d: _record(taken, d))
        began = time.perf_counter()
        closing = asyncio.create_task(broker.aclose())
        await publisher.publish(quick_on, late)  # while the stuck handlers are waited for
        await closing
        took = time.perf_counter() - began
        assert 0.9 < took < 1.6
        assert late.id not in taken  # the quick subscription took nothing more
        # neither the unfinished messages nor the untaken one were acknowledged
        assert await _handled_again(rabbitmq_service, exchange, [*stuck_on, quick_on]) == {
            *taken,
            late.id,
        }
    finally:
        names = broker.declared_queues
        await broker.aclose()
        await publisher.aclose()
        await delete_rabbit(rabbitmq_service, exchange, names)


async def _record(taken: list[str], delivery: Delivery) -> None:
    taken.append(delivery.message.id)


async def test_a_cancel_while_the_broker_waits_for_handlers_still_ends_every_consumer(
    rabbitmq_service: str, exchange: str
) -> None:
    """A cancel landing while aclose() waited for the handlers in hand is raised only
    once every consumer has ended and the connection is closed, within one grace."""
    base = f"edge{uuid.uuid4().hex[:6]}"
    subjects = [f"{base}.a", f"{base}.b"]
    broker = RabbitBroker(rabbitmq_service, exchange=exchange)
    taken: list[str] = []
    try:
        consumers = await _stuck(broker, subjects, taken)
        began = time.perf_counter()
        closing = asyncio.create_task(broker.aclose())
        await asyncio.sleep(0.1)  # any moment must do; this one is inside the grace
        closing.cancel()
        async with asyncio.timeout(5):
            await asyncio.wait({closing})
        took = time.perf_counter() - began
        assert closing.cancelled()
        assert all(consumer.done() for consumer in consumers)
        assert broker._connection is None
        assert took < 1.6
        assert await _handled_again(rabbitmq_service, exchange, subjects) == set(taken)
    finally:
        names = broker.declared_queues
        await broker.aclose()
        await delete_rabbit(rabbitmq_service, exchange, names)


async def test_a_handler_that_closes_its_own_broker_is_not_left_waiting_for_itself(
    rabbitmq_service: str, exchange: str
) -> None:
    """aclose() called by a subscription's own handler waited the whole ack_wait for
    that handler to finish, then cancelled it, and the consumer and the close then
    waited for each other for good: the connection was never closed."""
    subject = f"edge{uuid.uuid4().hex[:6]}.self"
    broker = RabbitBroker(rabbitmq_service, exchange=exchange)
    publisher = RabbitBroker(rabbitmq_service, exchange=exchange)
    closed = asyncio.Event()
    message = Message("T")

    async def closes_its_broker(delivery: Delivery) -> None:
        await broker.aclose()
        closed.set()

    try:
        subscription = await broker.subscribe(subject, "g", closes_its_broker, ack_wait=5)
        consumer = subscription._task
        assert consumer is not None
        await publisher.publish(subject, message)
        async with asyncio.timeout(2):
            await closed.wait()
            await asyncio.wait({consumer})
        assert broker._connection is None
        # settled after the connection closed: not lost, it comes back
        assert await _handled_again(rabbitmq_service, exchange, [subject]) == {message.id}
    finally:
        names = broker.declared_queues
        await broker.aclose()
        await publisher.aclose()
        await delete_rabbit(rabbitmq_service, exchange, names)
