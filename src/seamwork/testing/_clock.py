"""A clock that moves only when a test moves it."""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager


class ManualClock:
    """A ``Clock`` whose time advances only through ``advance()``.

    Sleepers and timeouts fire when the clock passes their deadline, so a test of a
    30-second reset timeout runs in microseconds. With ``auto_advance=True`` every
    sleep jumps the clock forward by its own length instead of waiting.

    Args:
        start: the initial wall-clock reading (``now()``), seconds since the epoch.
        auto_advance: let ``sleep`` and ``sleep_blocking`` move time themselves.
    """

    def __init__(self, start: float = 1_700_000_000.0, *, auto_advance: bool = False) -> None:
        self._epoch = start
        self._elapsed = 0.0
        self._auto = auto_advance
        self._timers: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        self._cancelled: set[int] = set()

    def now(self) -> float:
        return self._epoch + self._elapsed

    def monotonic(self) -> float:
        return self._elapsed

    def advance(self, seconds: float) -> None:
        """Move time forward by ``seconds`` and fire every timer now due, in order."""
        if not seconds >= 0:  # NaN too: a NaN clock would never reach a deadline
            raise ValueError(f"a clock cannot go back or to NaN, got {seconds!r}")
        target = self._elapsed + seconds
        while self._timers and self._timers[0][0] <= target:
            when, seq, callback = heapq.heappop(self._timers)
            self._elapsed = max(self._elapsed, when)
            if seq not in self._cancelled:
                callback()
            self._cancelled.discard(seq)
        self._elapsed = target

    async def sleep(self, seconds: float) -> None:
        if self._auto:
            self.advance(seconds if seconds > 0 else 0.0)
            await asyncio.sleep(0)
            return
        if not seconds > 0:  # NaN too: on the timer heap it would block every later timer
            await asyncio.sleep(0)
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        seq = self._call_at(self._elapsed + seconds, lambda: _resolve(future))
        try:
            await future
        finally:
            if not future.done() or future.cancelled():  # a fired timer is gone already
                self._cancelled.add(seq)

    def sleep_blocking(self, seconds: float) -> None:
        self.advance(max(seconds, 0.0))

    def timeout(self, seconds: float | None) -> AbstractAsyncContextManager[asyncio.Timeout]:
        return self._timeout(seconds)

    @asynccontextmanager
    async def _timeout(self, seconds: float | None) -> AsyncIterator[asyncio.Timeout]:
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(None) as scope:
            if seconds is None:
                yield scope
                return
            if not seconds > 0:  # like asyncio.timeout(0) (and NaN): expired at the first await
                _expire(scope, loop)
                yield scope
                return
            fired = [False]
            # A real deadline no test reaches marks the manual one as in force: a holder
            # that reschedules the scope (to None: off; or to a time of its own) has
            # replaced it, as with asyncio.Timeout, and the manual timer leaves it be.
            armed = loop.time() + _FAR
            scope.reschedule(armed)

            def fire() -> None:
                fired[0] = True
                if scope.when() == armed:
                    _expire(scope, loop)

            seq = self._call_at(self._elapsed + seconds, fire)
            try:
                yield scope
            finally:
                if not fired[0]:
                    self._cancelled.add(seq)

    @property
    def pending_timers(self) -> int:
        """How many sleeps and timeouts are waiting for time to pass."""
        return sum(1 for _, seq, _ in self._timers if seq not in self._cancelled)

    def _call_at(self, when: float, callback: Callable[[], None]) -> int:
        seq = next(self._seq)
        heapq.heappush(self._timers, (when, seq, callback))
        return seq

    def __repr__(self) -> str:
        return f"ManualClock(monotonic={self._elapsed!r})"


_FAR = 10.0**9  # seconds of real time: about 32 years


def _expire(scope: asyncio.Timeout, loop: asyncio.AbstractEventLoop) -> None:
    if scope.expired():
        return
    when = scope.when()
    if when is None or when > loop.time():
        scope.reschedule(loop.time())


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
