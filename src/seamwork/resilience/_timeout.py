"""Timeout: bound how long a call may take.

Async calls are *cancelled* at the deadline: the awaited coroutine receives
``CancelledError`` at its current ``await`` and the caller gets ``CallTimeout``.

A plain (sync) function cannot be interrupted safely from outside the thread that
runs it: Python offers no way to stop a running function, and a thread cannot be
killed. ``call_sync`` therefore lets the function finish, and if it overran the
deadline discards the result and raises ``CallTimeout``, so an outer retry or breaker
sees the timeout as it would for an async call. Blocking I/O inside such a function
should carry its own timeout (socket, database or HTTP client settings); that is
the only thing that actually shortens the wait.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from asyncio import BaseEventLoop
from collections.abc import Awaitable, Callable
from typing import Any, ParamSpec, TypeVar

from seamwork._core.clock import Clock, SystemClock
from seamwork.errors import CallTimeout
from seamwork.resilience import _validate as check
from seamwork.resilience._policy import Policy, monotonic_reader

P = ParamSpec("P")
R = TypeVar("R")


async def run_with_timeout(
    clock: Clock, seconds: float, fn: Callable[..., Awaitable[R]], args: Any, kwargs: Any
) -> R:
    """Await ``fn(*args, **kwargs)``, cancelling it after ``seconds`` (``CallTimeout``).

    A ``TimeoutError`` raised by ``fn`` itself before the deadline passes unchanged.
    """
    deadline = clock.monotonic() + seconds
    try:
        async with clock.timeout(seconds):
            return await fn(*args, **kwargs)
    except TimeoutError:
        if clock.monotonic() < deadline:
            raise
        raise CallTimeout(f"call did not finish within {seconds} s") from None


def check_overrun(clock: Clock, seconds: float, started: float) -> None:
    """Raise ``CallTimeout`` if a sync call that began at ``started`` overran."""
    if clock.monotonic() - started >= seconds:
        raise CallTimeout(f"call took longer than {seconds} s (it was not interrupted)")


class _Deadlines:
    """One ``Timeout``'s calls in flight on one event loop, under a single timer.

    ``asyncio.timeout`` schedules (and cancels) a timer per call, which costs more than
    a whole pipeline should. A ``Timeout`` gives every call the same ``seconds``, so
    deadlines come in start order: a dict in insertion order is a queue sorted by
    deadline. A call adds itself and removes itself (O(1)); one ``call_at`` timer, armed
    only when none is, wakes at the oldest deadline, cancels the calls that are due
    (exactly as ``asyncio.timeout`` does: ``task.cancel()``, then ``uncancel()`` when the
    call unwinds) and re-arms for the next live deadline. Only the loop's thread
    touches it.
    """

    __slots__ = ("armed", "inflight", "loop", "seconds", "time")

    def __init__(self, loop: asyncio.AbstractEventLoop, seconds: float) -> None:
        self.loop, self.seconds = loop, seconds
        # the loop's clock; asyncio's own loops read time.monotonic, so call it directly
        self.time = time.monotonic if type(loop).time is BaseEventLoop.time else loop.time
        self.inflight: dict[int, tuple[float, asyncio.Task[Any]]] = {}
        self.armed = False

    def arm(self, when: float) -> None:
        self.armed = True
        self.loop.call_at(when, self._fire)

    def _fire(self) -> None:
        self.armed = False
        inflight, now = self.inflight, self.time()
        while inflight:
            key = next(iter(inflight))
            deadline, task = inflight[key]
            if deadline > now:
                self.arm(deadline)
                return
            del inflight[key]  # absent from inflight while pending: the call timed out
            task.cancel()


class Timeout(Policy):
    """Give each call at most ``seconds``.

    Args:
        seconds: the limit, > 0.
        clock: time source; ``SystemClock()`` by default.

    See the module docstring for what is (async) and is not (sync) interrupted.
    """

    __slots__ = ("_book", "_clock", "_keys", "_monotonic", "_system", "seconds")

    def __init__(self, seconds: float, *, clock: Clock | None = None) -> None:
        check.seconds("Timeout.seconds", seconds)
        self.seconds = seconds
        self._clock = clock or SystemClock()
        self._monotonic = monotonic_reader(self._clock)
        self._keys = itertools.count()
        # (loop, its deadlines), swapped as one tuple so a thread never pairs its loop
        # with another loop's book. An injected clock runs its own timeouts instead.
        self._book: tuple[asyncio.AbstractEventLoop, _Deadlines] | None = None
        self._system = type(self._clock) is SystemClock

    async def call(self, fn: Callable[P, Awaitable[R]], /, *args: P.args, **kwargs: P.kwargs) -> R:
        if not self._system:
            return await run_with_timeout(self._clock, self.seconds, fn, args, kwargs)
        loop = asyncio.get_running_loop()
        book = self._book
        deadlines = book[1] if book is not None and book[0] is loop else self._new_book(loop)
        task = asyncio.current_task(loop)
        if task is None:
            raise RuntimeError("Timeout.call must run inside a task")
        cancelling, key = task.cancelling(), next(self._keys)
        inflight, deadline = deadlines.inflight, deadlines.time() + self.seconds
        inflight[key] = (deadline, task)
        if not deadlines.armed:
            deadlines.arm(deadline)
        try:
            result = await fn(*args, **kwargs)
        except BaseException as error:
            if inflight.pop(key, None) is None and _expired(task, cancelling, error):
                raise CallTimeout(f"call did not finish within {self.seconds} s") from None
            raise
        if inflight.pop(key, None) is None:  # it was cancelled but finished anyway
            task.uncancel()
        return result

    def _new_book(self, loop: asyncio.AbstractEventLoop) -> _Deadlines:
        deadlines = _Deadlines(loop, self.seconds)
        self._book = (loop, deadlines)
        return deadlines

    def call_sync(self, fn: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> R:
        started = self._monotonic()
        result = fn(*args, **kwargs)
        if self._monotonic() - started >= self.seconds:
            check_overrun(self._clock, self.seconds, started)
        return result

    def __repr__(self) -> str:
        return f"Timeout({self.seconds!r})"


def _expired(task: asyncio.Task[Any], cancelling: int, error: BaseException) -> bool:
    """After our timer cancelled ``task``: True if the cancellation was ours alone."""
    return task.uncancel() <= cancelling and isinstance(error, asyncio.CancelledError)
