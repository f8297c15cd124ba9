"""``RabbitBroker`` edge cases on the RabbitMQ service (127.0.0.1:5672, guest/guest).

Stopping a member mid-backlog, attempts across restarts, a read-only dead-letter
listing, and a retry or dead-letter queue deleted under a running subscription.
Each test uses its own exchange and deletes what it declared.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator

import aio_pika
import pytest

from seamwork.brokers import RabbitBroker
from seamwork.messaging import Delivery, Message, PoisonMessage
from seamwork.testing.broker import eventually, until


@pytest.fixture
async def exchange(rabbitmq_service: str) -> AsyncIterator[str]:
    name = f"seamwork-edge-{uuid.uuid4().hex[:10]}"
    yield name
    await _delete(rabbitmq_service, name, [f"{name}.deadletter"])


async def _delete(url: str, exchange: str, queues: list[str] | tuple[str, ...]) -> None:
    connection = await aio_pika.connect(url)
    async with connection:
        for name in sorted(set(queues)):
            channel = await connection.channel()
            with contextlib.suppress(aio_pika.exceptions.AMQPError):
                await channel.queue_delete(name)
            with contextlib.suppress(Exception):
                await channel.close()
        channel = await connection.channel()
        with contextlib.suppress(aio_pika.exceptions.AMQPError):
            await channel.exchange_delete(exchange)


async def test_stop_lets_the_message_in_hand_finish_and_starts_no_other(
    rabbitmq_service: str, exchange: str
) -> None:
    broker = RabbitBroker(rabbitmq_service, exchange=exchange)
    subject = f"edge{uuid.uuid4().hex[:6]}.stop"
    events: list[str] = []
    first_started = asyncio.Event()

    async def handler(delivery: Delivery) -> None:
        i = delivery.message.data["i"]
        events.append(f"start {i}")
        first_started.set()
        try:
            await asyncio.sleep(0.3)
        except asyncio.CancelledError:
            events.append(f"CANCELLED {i}")
            raise
        events.append(f"done {i}")

    try:
        subscription = await broker.subscribe(subject, "g", handler)
        for i in range(5):
            await broker.publish(subject, Message("T", {"i": i}))
        await first_started.wait()
        await subscription.stop()
        assert events == ["start 0", "done 0"]
        rest: list[int] = []

        async def collect(delivery: Delivery) -> None:
            rest.append(delivery.message.data["i"])

        await broker.subscribe(subject, "g", collect)
        await eventually(lambda: sorted(rest) == [1, 2, 3, 4])
    finally:
        names = broker.declared_queues
        await broker.aclose()
        await _delete(rabbitmq_service, exchange, names)


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
        await _delete(rabbitmq_service, exchange, names)
