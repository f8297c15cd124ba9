"""Time as an injected dependency.

Every component that waits, times out or stamps a record takes a ``Clock``. The
default, ``SystemClock``, reads the real clocks and uses asyncio's timers; tests pass
``seamwork.testing.ManualClock`` so a 30-second reset timeout takes microseconds.
"""

from __future__ import annotations

import asyncio
import time
from contextlib import AbstractAsyncContextManager
from typing import Protocol, runtime_checkable


@runtime_checkable
class Clock(Protocol):
    """What components need from time."""

    def now(self) -> float:
        """Wall-clock time in seconds since the epoch (for stored timestamps)."""
        ...

    def monotonic(self) -> float:
        """A clock that never goes back (for durations, windows and deadlines)."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Wait ``seconds`` without blocking the event loop."""
        ...

    def sleep_blocking(self, seconds: float) -> None:
        """Wait ``seconds`` in a plain (non-async) caller."""
        ...

    def timeout(self, seconds: float | None) -> AbstractAsyncContextManager[asyncio.Timeout]:
        """Cancel the block after ``seconds`` and raise ``TimeoutError`` (None: no limit).

        The context manager yields the ``asyncio.Timeout`` behind it, so a caller can
        end the block early with ``scope.reschedule(loop.time())``.
        """
        ...


class SystemClock:
    """The real clocks: ``time.time``, ``time.monotonic`` and asyncio's timers."""

    __slots__ = ()

    def now(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    def sleep_blocking(self, seconds: float) -> None:
        time.sleep(seconds)

    def timeout(self, seconds: float | None) -> AbstractAsyncContextManager[asyncio.Timeout]:
        return asyncio.timeout(seconds)

    def __repr__(self) -> str:
        return "SystemClock()"
