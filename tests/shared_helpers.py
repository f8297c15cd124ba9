"""Helpers several test modules share (importable because ``tests/`` holds the
root ``conftest.py``, which pytest puts on ``sys.path``)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable


async def delete_rabbit(url: str, exchange: str, queues: Iterable[str]) -> None:
    """Delete a test's queues and exchange from the RabbitMQ at ``url``."""
    import aio_pika

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


def open_sockets() -> int:
    """How many sockets this process holds open."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{fd}").startswith("socket:")
        except OSError:  # the listing's own descriptor, closed by now
            continue
    return count
