"""The stop protocol both brokers' subscriptions share.

``stop()`` takes no message after it is called and lets the one in hand finish and
settle, waiting at most ``grace`` seconds (the subscription's ``ack_wait``: by then
the broker hands the message to another member anyway). Called by the subscription's
own handler it returns at once: that handler's message settles when it returns, and
the consumer then ends without taking another. The consumer loop clears ``_idle``
while a message is in hand and stops taking messages once ``_stopping`` is set.
"""

from __future__ import annotations

import asyncio
import logging

from seamwork.messaging._ports import SubscriptionStats

log = logging.getLogger("seamwork.brokers")


class GracefulStop:
    """Base of ``NatsSubscription`` and ``RabbitSubscription`` (see the module)."""

    def __init__(self, grace: float) -> None:
        self.stats = SubscriptionStats()
        self._task: asyncio.Task[None] | None = None
        self._grace = grace
        self._idle = asyncio.Event()
        self._idle.set()
        self._stopping = False

    def _stopped_by_own_handler(self) -> bool:
        """Take no more messages; True if the caller is the consumer itself (a handler
        stopping its own subscription: it ends once that message is settled)."""
        self._stopping = True
        return self._task is not None and self._task is asyncio.current_task()

    async def _wait_for_hand(self, then: str) -> None:
        """Wait, at most ``grace``, for the message in hand to settle."""
        try:
            async with asyncio.timeout(self._grace):
                await self._idle.wait()
        except TimeoutError:
            log.warning(
                "subscription stopped with its handler still running after %gs: "
                "cancelled, its message is %s",
                self._grace,
                then,
            )
