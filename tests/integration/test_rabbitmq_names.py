"""``RabbitBroker`` queue names on the RabbitMQ service (127.0.0.1:5672, guest/guest)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from seamwork.brokers import RabbitBroker
from seamwork.messaging import Delivery, Message
from seamwork.testing.broker import eventually
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
