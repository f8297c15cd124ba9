"""Listing RabbitMQ dead letters on a busy event loop (127.0.0.1:5672, guest/guest)."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator

import aio_pika
import pytest
from typer.testing import CliRunner

from seamwork.brokers import RabbitBroker
from seamwork.cli import app
from seamwork.messaging._ports import DLQ_SUBJECT
from shared_helpers import delete_rabbit


@pytest.fixture
async def exchange(rabbitmq_service: str) -> AsyncIterator[str]:
    name = f"seamwork-dlq-{uuid.uuid4().hex[:10]}"
    yield name
    await delete_rabbit(rabbitmq_service, name, [f"{name}.deadletter"])


class _HoldOnSecondDelivery(logging.Handler):
    """Sees a listing read letter 1 off the socket and has letter 2 filed then (from
    another thread); as letter 2 is read off the socket, holds the event loop for
    ``seconds``: other work in the process (a handler's blocking call, say) that
    takes the loop just then."""

    def __init__(self, seconds: float) -> None:
        super().__init__(logging.DEBUG)
        self.seconds = seconds
        self.deliveries = 0
        self.first = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if "Basic.Deliver" not in record.getMessage():
            return
        self.deliveries += 1
        if self.deliveries == 1:
            self.first.set()
        elif self.deliveries == 2:
            time.sleep(self.seconds)


async def _put(url: str, stream: str, id_: str) -> None:
    async with await aio_pika.connect(url) as connection:
        channel = await connection.channel()
        headers = {"Seamwork-Type": "T", "Seamwork-Id": id_, DLQ_SUBJECT: "a.b"}
        letter = aio_pika.Message(b"{}", headers=headers)
        await channel.default_exchange.publish(letter, stream)


@pytest.fixture
def hold() -> Iterator[_HoldOnSecondDelivery]:
    logger = logging.getLogger("aiormq.connection")
    handler, level = _HoldOnSecondDelivery(0.3), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(level)


async def test_a_listing_while_other_work_holds_the_loop_still_reads_every_letter(
    rabbitmq_service: str, exchange: str, hold: _HoldOnSecondDelivery
) -> None:
    """The loop held past the idle gap while a letter was on its way ended the listing
    (its gap counted in wall time) without it."""
    broker = RabbitBroker(rabbitmq_service, exchange=exchange)
    try:
        await broker.connect()
        await _put(rabbitmq_service, broker.dead_letter_queue, "m-1")

        def file_the_second() -> None:
            if hold.first.wait(5):
                asyncio.run(_put(rabbitmq_service, broker.dead_letter_queue, "m-2"))

        hold.deliveries = 0  # the listing's deliveries only
        filer = threading.Thread(target=file_the_second)
        filer.start()
        try:
            letters = await broker.dead_letters()
        finally:
            hold.first.set()
            await asyncio.to_thread(filer.join)
    finally:
        names = broker.declared_queues
        await broker.aclose()
        await delete_rabbit(rabbitmq_service, exchange, names)
    assert hold.deliveries == 2
    assert [x.message.id for x in letters] == ["m-1", "m-2"]


async def test_replaying_every_dead_letter_reads_the_stream_once_not_once_a_letter(
    rabbitmq_service: str, exchange: str
) -> None:
    """``seamwork dlq replay --all`` read the whole stream, and waited out its idle gap,
    for every letter: 40 letters took about 10 s, so a few hundred ran out of the
    command's time partway, reported as a broker that did not answer."""
    broker = RabbitBroker(rabbitmq_service, exchange=exchange)
    try:
        await broker.connect()
        await asyncio.gather(
            *(_put(rabbitmq_service, broker.dead_letter_queue, f"m-{i}") for i in range(40))
        )
        result = await asyncio.to_thread(
            CliRunner().invoke,
            app,
            [
                "dlq",
                "replay",
                "--all",
                "--rabbitmq",
                rabbitmq_service,
                "--timeout",
                "4",
                "--exchange",
                exchange,
            ],
        )
        left = await broker.dead_letters()
    finally:
        names = broker.declared_queues
        await broker.aclose()
        await delete_rabbit(rabbitmq_service, exchange, names)
    assert result.exit_code == 0, result.output
    assert "40 dead letter(s) replayed" in result.output
    assert left == []
