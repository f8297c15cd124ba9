"""Cancels that a broker's driver does not take well, kept at the broker's edge."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")


async def to_the_end(awaitable: Awaitable[T]) -> T:
    """Await ``awaitable`` to its end even if a cancel lands meanwhile; the cancel is
    raised after (a second one stops the wait, not ``awaitable``).

    For steps a cancel must not cut in half: aiormq answers a cancel that lands as the
    broker answers a Channel.Close with a second Channel.Close, which RabbitMQ takes as
    a protocol error (504 CHANNEL_ERROR) and closes the whole connection for.
    """
    running = asyncio.ensure_future(awaitable)
    try:
        return await asyncio.shield(running)
    except asyncio.CancelledError:
        await asyncio.wait({running})
        if running.done() and not running.cancelled():
            running.exception()  # seen: the cancel is what the caller gets
        raise


__all__ = ["to_the_end"]
