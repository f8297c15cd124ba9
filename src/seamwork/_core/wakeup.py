"""``Wakeup``: let a waiting loop (a relay, a subscriber) know there is new work.

``notify()`` wakes every current waiter; with none waiting (the loop is busy with the
work it found), it is kept for the next ``wait``, which then returns at once: a relay
draining while a commit notified would otherwise miss it and leave the message for the
poll interval. A ``wait(max_wait)`` otherwise waits for the next notify, or
``max_wait`` seconds (the poll interval that catches work from other processes). One
event per round, replaced on notify, so a waiter never sees a signal twice.
"""

from __future__ import annotations

import asyncio


class Wakeup:
    """A re-armed ``asyncio.Event``: ``notify()`` from producers, ``wait()`` in a loop."""

    __slots__ = ("_event", "_missed")

    def __init__(self) -> None:
        self._event: asyncio.Event | None = None
        self._missed = False  # a notify came while nobody waited

    def notify(self) -> None:
        event, self._event = self._event, None
        if event is not None:
            event.set()
        else:
            self._missed = True

    async def wait(self, max_wait: float) -> None:
        """Return on the next ``notify()`` (at once if one came while nobody waited),
        or after ``max_wait`` seconds."""
        if self._missed:
            self._missed = False
            return
        if self._event is None:
            self._event = asyncio.Event()
        event = self._event
        try:
            async with asyncio.timeout(max_wait):
                await event.wait()
        except TimeoutError:
            return
