"""The Broker contract on the RabbitMQ service (127.0.0.1:5672, guest/guest).

Each test gets its own exchange (and so its own dead-letter stream); subjects are
unique per test already. Everything a test's brokers declared is deleted after it.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator

import aio_pika
import pytest

from seamwork.brokers import RabbitBroker
from seamwork.messaging import Broker
from seamwork.testing.broker import BrokerContract


class TestRabbitBroker(BrokerContract):
    """Quorum queues per group, retry queues per delay, a dead-letter stream."""

    @pytest.fixture(autouse=True)
    async def _server(self, rabbitmq_service: str) -> AsyncIterator[None]:
        self.url = rabbitmq_service
        self.exchange = f"seamwork-test-{uuid.uuid4().hex[:10]}"
        self.made: list[RabbitBroker] = []
        yield
        await _delete(self.url, self.exchange, self.made)

    async def make_broker(self) -> Broker:
        broker = RabbitBroker(self.url, exchange=self.exchange)
        self.made.append(broker)
        return broker


async def _delete(url: str, exchange: str, brokers: list[RabbitBroker]) -> None:
    queues = {name for broker in brokers for name in broker.declared_queues}
    connection = await aio_pika.connect(url)
    async with connection:
        for name in sorted(queues):
            channel = await connection.channel()
            with contextlib.suppress(aio_pika.exceptions.AMQPError):
                await channel.queue_delete(name)
            with contextlib.suppress(Exception):
                await channel.close()
        channel = await connection.channel()
        with contextlib.suppress(aio_pika.exceptions.AMQPError):
            await channel.exchange_delete(exchange)
