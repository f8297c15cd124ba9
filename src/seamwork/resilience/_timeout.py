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

from collections.abc import Awaitable, Callable
from typing import Any, ParamSpec, TypeVar

from seamwork._core.clock import Clock, SystemClock
from seamwork.errors import CallTimeout
from seamwork.resilience import _validate as check
from seamwork.resilience._policy import Policy

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


class Timeout(Policy):
    """Give each call at most ``seconds``.

    Args:
        seconds: the limit, > 0.
        clock: time source; ``SystemClock()`` by default.

    See the module docstring for what is (async) and is not (sync) interrupted.
    """

    __slots__ = ("_clock", "seconds")

    def __init__(self, seconds: float, *, clock: Clock | None = None) -> None:
        check.seconds("Timeout.seconds", seconds)
        self.seconds = seconds
        self._clock = clock or SystemClock()

    async def call(self, fn: Callable[P, Awaitable[R]], /, *args: P.args, **kwargs: P.kwargs) -> R:
        return await run_with_timeout(self._clock, self.seconds, fn, args, kwargs)

    def call_sync(self, fn: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> R:
        started = self._clock.monotonic()
        result = fn(*args, **kwargs)
        check_overrun(self._clock, self.seconds, started)
        return result

    def __repr__(self) -> str:
        return f"Timeout({self.seconds!r})"
