"""The Broker contract on NATS JetStream: the embedded nats-server and the service on 4222."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from seamwork.brokers import EmbeddedNats, NatsBroker
from seamwork.messaging import Broker
from seamwork.testing.broker import BrokerContract


class TestEmbeddedNatsBroker(BrokerContract):
    """A fresh embedded nats-server (2.12+: atomic batches) per test."""

    @pytest.fixture(autouse=True)
    async def _server(self) -> AsyncIterator[None]:
        async with EmbeddedNats() as server:
            self.url = server.url
            yield

    async def make_broker(self) -> Broker:
        return NatsBroker(self.url)


class TestServiceNatsBroker(BrokerContract):
    """The NATS service on 4222 (older servers publish batches pipelined, not atomic)."""

    @pytest.fixture(autouse=True)
    def _server(self, nats_service: str) -> None:
        self.url = nats_service

    async def make_broker(self) -> Broker:
        return NatsBroker(self.url)
