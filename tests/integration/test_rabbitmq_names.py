"""``RabbitBroker`` queue names on the RabbitMQ service (127.0.0.1:5672, guest/guest)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import aio_pika
import pytest

from seamwork.brokers import RabbitBroker
from seamwork.errors import InvalidMessage
from seamwork.messaging import Delivery, Message, PoisonMessage
from seamwork.testing.broker import eventually, until
from shared_helpers import delete_rabbit


@pytest.fixture
async def exchange(rabbitmq_service: str) -> AsyncIterator[str]:
    name = f"seamwork-names-{uuid.uuid4().hex[:10]}"
    yield name
    await delete_rabbit(rabbitmq_service, name, [f"{name}.deadletter"])


@pytest.mark.parametrize("tail", ["a", "*"])
async def test_a_retry_queue_is_no_group_queue_of_another_subject(
    rabbitmq_service: str, exchange: str, tail: str
) -> None:
    """Group ``g`` on ``<t>.a`` retried through ``g.<t>.a.retry.500``, the very queue
    of group ``g`` on the subject ``<t>.a.retry.500``."""
    broker = RabbitBroker(rabbitmq_service, exchange=exchange)
    token = f"names{uuid.uuid4().hex[:6]}"
    got: dict[str, list[tuple[str, int]]] = {"plain": [], "retry": []}

    def handler(name: str, *, fail_first: bool) -> Callable[[Delivery], Awaitable[None]]:
        async def handle(delivery: Delivery) -> None:
            got[name].append((delivery.subject, delivery.attempt))
            if fail_first and delivery.attempt == 1:
                raise RuntimeError("once")

        return handle

    try:
        await broker.subscribe(f"{token}.{tail}", "g", handler("plain", fail_first=True))
        await broker.subscribe(f"{token}.{tail}.retry.500", "g", handler("retry", fail_first=False))
        await broker.publish(f"{token}.a", Message("T"))
        await eventually(lambda: len(got["plain"]) >= 2, 5)
        await broker.publish(f"{token}.a.retry.500", Message("T"))
        await eventually(lambda: len(got["retry"]) >= 1, 5)
        await asyncio.sleep(0.3)  # nothing more arrives
    finally:
        names = broker.declared_queues
        await broker.aclose()
        await delete_rabbit(rabbitmq_service, exchange, names)
    assert got["plain"] == [(f"{token}.a", 1), (f"{token}.a", 2)]
    assert got["retry"] == [(f"{token}.a.retry.500", 1)]


async def test_a_group_queue_deleted_under_a_running_member_comes_back_and_is_consumed(
    rabbitmq_service: str, exchange: str
) -> None:
    """The broker cancels the member's consumer; the member consumed nothing after that
    (and its subscription looked alive), and with no queue bound every later message
    on the subject went nowhere."""
    broker = RabbitBroker(rabbitmq_service, exchange=exchange)
    subject = f"names{uuid.uuid4().hex[:6]}.created"
    got: list[str] = []

    async def handler(delivery: Delivery) -> None:
        got.append(delivery.message.id)

    async def queue_is_back() -> bool:
        async with await aio_pika.connect(rabbitmq_service) as connection:
            channel = await connection.channel()
            try:
                await channel.declare_queue(f"g.{subject}", passive=True)
            except aio_pika.exceptions.ChannelNotFoundEntity:
                return False
        return True

    try:
        await broker.subscribe(subject, "g", handler)
        first = Message("T")
        await broker.publish(subject, first)
        await eventually(lambda: got == [first.id], 5)
        async with await aio_pika.connect(rabbitmq_service) as connection:
            channel = await connection.channel()
            await channel.queue_delete(f"g.{subject}")
        # declared again by the member's recovery: at once, or (when its first try
        # meets the queue still being deleted) after that try's 5 s timeout
        await until(queue_is_back, 10)
        # declared comes before bound again: a message published in between goes
        # nowhere (a topic exchange with no queue bound), so publish until one gets
        # through to the member - then every later one does
        later: list[str] = []

        async def consumed_again() -> bool:
            probe = Message("T")
            later.append(probe.id)
            await broker.publish(subject, probe)
            deadline = asyncio.get_running_loop().time() + 0.5
            while probe.id not in got and asyncio.get_running_loop().time() < deadline:
                await asyncio.sleep(0.02)
            return probe.id in got

        await until(consumed_again, 10)
        last = Message("T")
        await broker.publish(subject, last)
        await eventually(lambda: last.id in got, 5)
        assert got[0] == first.id
        assert set(got) <= {first.id, last.id, *later}
    finally:
        names = broker.declared_queues
        await broker.aclose()
        await delete_rabbit(rabbitmq_service, exchange, names)


async def test_a_message_over_the_brokers_size_limit_is_refused_and_fails_no_other(
    rabbitmq_service: str, exchange: str
) -> None:
    """RabbitMQ closes the channel for a body over its max_message_size (128 MiB by
    default), which failed every publish in flight on it too (and the frames aiormq
    still sent on the closed channel closed the whole connection)."""
    broker = RabbitBroker(rabbitmq_service, exchange=exchange)
    subject = f"names{uuid.uuid4().hex[:6]}.created"
    got: list[str] = []

    async def handler(delivery: Delivery) -> None:
        got.append(delivery.message.id)

    big = Message("T", {"pad": "x" * (128 * 1024 * 1024)})
    small = [Message("T", {"i": i}) for i in range(3)]
    try:
        await broker.subscribe(subject, "g", handler)
        results = await asyncio.gather(
            broker.publish(subject, big),
            *(broker.publish(subject, m) for m in small),
            return_exceptions=True,
        )
        with pytest.raises(InvalidMessage, match="over the broker's max_message_size"):
            raise results[0]
        assert results[1:] == [None, None, None]
        await eventually(lambda: sorted(got) == sorted(m.id for m in small), 5)
    finally:
        names = broker.declared_queues
        await broker.aclose()
        await delete_rabbit(rabbitmq_service, exchange, names)


async def test_a_dead_letter_of_another_producers_message_keeps_and_replays_its_id(
    rabbitmq_service: str, exchange: str
) -> None:
    """Sent with only AMQP's message_id (no Seamwork-Id header): it was delivered with
    that id, but its dead letter was listed as ``dlq-<offset>`` and replayed with no
    id at all, so the replay arrived under a new id (and a second replay under
    another one: nothing an Inbox could tell apart)."""
    broker = RabbitBroker(rabbitmq_service, exchange=exchange)
    subject = f"names{uuid.uuid4().hex[:6]}.created"
    ids: list[str] = []

    async def handler(delivery: Delivery) -> None:
        ids.append(delivery.message.id)
        if len(ids) == 1:
            raise PoisonMessage("not yet")

    try:
        await broker.subscribe(subject, "g", handler)
        async with await aio_pika.connect(rabbitmq_service) as connection:
            channel = await connection.channel()
            target = await channel.get_exchange(exchange)
            raw = aio_pika.Message(b"{}", headers={"Seamwork-Type": "T"}, message_id="m-1")
            await target.publish(raw, routing_key=subject)
        (letter,) = await until(broker.dead_letters, 5)
        assert letter.message.id == "m-1"
        await broker.replay_dead_letter(letter.key)
        await eventually(lambda: len(ids) == 2, 5)
    finally:
        names = broker.declared_queues
        await broker.aclose()
        await delete_rabbit(rabbitmq_service, exchange, names)
    assert ids == ["m-1", "m-1"]
