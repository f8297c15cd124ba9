"""``Wakeup``: let a waiting loop (a relay, a subscriber) know there is new work.

``notify()`` wakes every current waiter; a ``wait(max_wait)`` that begins after it
waits for the next one, or ``max_wait`` seconds (the poll interval that catches
work from other processes). One event per round, replaced on notify, so a waiter
never sees a stale signal.
"""

from __future__ import annotations

import asyncio


class Wakeup:
    """A re-armed ``asyncio.Event``: ``notify()`` from producers, ``wait()`` in a loop."""

    __slots__ = ("_event",)

    def __init__(self) -> None:
        self._event: asyncio.Event | None = None

    def notify(self) -> None:
        event, self._event = self._event, None
        if event is not None:
            event.set()

    async def wait(self, max_wait: float) -> None:
        """Return on the next ``notify()``, or after ``max_wait`` seconds."""
        if self._event is None:
            self._event = asyncio.Event()
        event = self._event
        try:
            async with asyncio.timeout(max_wait):
                await event.wait()
        except TimeoutError:
            return
