"""The Broker contract on the RabbitMQ service (127.0.0.1:5672, guest/guest).

Each test gets its own exchange (and so its own dead-letter stream); subjects are
unique per test already. Everything a test's brokers declared is deleted after it.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest

from seamwork.brokers import RabbitBroker
from seamwork.messaging import Broker
from seamwork.testing.broker import BrokerContract
from shared_helpers import delete_rabbit


class TestRabbitBroker(BrokerContract):
    """Quorum queues per group, retry queues per delay, a dead-letter stream."""

    @pytest.fixture(autouse=True)
    async def _server(self, rabbitmq_service: str) -> AsyncIterator[None]:
        self.url = rabbitmq_service
        self.exchange = f"seamwork-test-{uuid.uuid4().hex[:10]}"
        self.made: list[RabbitBroker] = []
        yield
        made = (name for broker in self.made for name in broker.declared_queues)
        await delete_rabbit(self.url, self.exchange, made)

    async def make_broker(self) -> Broker:
        broker = RabbitBroker(self.url, exchange=self.exchange)
        self.made.append(broker)
        return broker
