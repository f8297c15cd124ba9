"""RetryPolicy: the drivers that run a ``Retry`` schedule.

``Retry`` (``seamwork._core.retry``) is the pure part, shared with saga steps: it
says whether an attempt gets another and how long to wait. These drivers call,
consult it, ask its budget, sleep, and call again; nothing else.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable
from typing import ParamSpec, TypeVar

from seamwork._core.clock import Clock, SystemClock
from seamwork._core.retry import Retry
from seamwork.errors import ConfigError, RetryBudgetExhausted
from seamwork.resilience._policy import Policy

P = ParamSpec("P")
R = TypeVar("R")


class RetryPolicy(Policy):
    """Run calls under a ``Retry`` schedule; ``Pipeline`` builds one from a ``Retry``.

    A refused retry (``retry.budget`` spent) raises ``RetryBudgetExhausted`` chained
    to the last error. Only ``Exception`` subclasses are retried, never cancellation.

    Args:
        retry: the schedule: attempts, backoff, jitter, retry_on, budget.
        clock: time source for the sleeps; ``SystemClock()`` by default.
        rng: random source for jitter; the ``random`` module by default.
    """

    __slots__ = ("_clock", "_rng", "retry")

    def __init__(
        self, retry: Retry, *, clock: Clock | None = None, rng: random.Random | None = None
    ) -> None:
        if not isinstance(retry, Retry):
            raise ConfigError(f"retry must be a Retry, got {retry!r}")
        self.retry, self._clock, self._rng = retry, clock or SystemClock(), rng

    async def call(self, fn: Callable[P, Awaitable[R]], /, *args: P.args, **kwargs: P.kwargs) -> R:
        if self.retry.budget is not None:
            self.retry.budget.record_call()
        attempt = 1
        while True:
            try:
                return await fn(*args, **kwargs)
            except Exception as error:
                delay = self._plan(attempt, error)
                if delay is None:
                    raise
            await self._clock.sleep(delay)
            attempt += 1

    def call_sync(self, fn: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> R:
        if self.retry.budget is not None:
            self.retry.budget.record_call()
        attempt = 1
        while True:
            try:
                return fn(*args, **kwargs)
            except Exception as error:
                delay = self._plan(attempt, error)
                if delay is None:
                    raise
            self._clock.sleep_blocking(delay)
            attempt += 1

    def _plan(self, attempt: int, error: Exception) -> float | None:
        """Seconds before the next attempt; None to give up with ``error``."""
        retry = self.retry
        if not retry.should_retry(attempt, error):
            return None
        if retry.budget is not None and not retry.budget.try_spend():
            raise RetryBudgetExhausted(
                f"retry budget spent after attempt {attempt}; last error: {error!r}"
            ) from error
        return retry.delay(attempt, self._rng)

    def __repr__(self) -> str:
        return f"RetryPolicy({self.retry!r})"
