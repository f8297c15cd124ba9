"""Retry schedules: how many attempts, how long between them, and which errors count.

``Retry`` is pure configuration plus a pure schedule (``delay``). Saga steps take one
(``Step(..., retry=Retry(3))``) and the resilience pipeline drives one; neither copy
of the logic exists twice. Backoff is exponential, capped, with jitter:

* ``"full"`` (default): uniform in ``[0, min(cap, base * 2**n)]`` - spreads a herd best;
* ``"equal"``: half fixed, half random;
* ``"none"``: the plain exponential.

A ``Retry`` may also carry a *budget* (``seamwork.resilience.RetryBudget``): before
each retry the driver asks the budget, so under sustained failure retries stay a set
fraction of recent calls instead of multiplying the load on a dependency.
"""

from __future__ import annotations

import math
import random as _random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

from seamwork.errors import ConfigError

Jitter = Literal["full", "equal", "none"]
RetryOn = Callable[[BaseException], bool] | tuple[type[BaseException], ...]


@runtime_checkable
class RetryBudgetLike(Protocol):
    """What a retry driver needs from a budget (``seamwork.resilience.RetryBudget``)."""

    def record_call(self) -> None:
        """Count one first attempt (a deposit)."""
        ...

    def try_spend(self) -> bool:
        """Take one retry from the budget; False when it is spent."""
        ...


@dataclass(frozen=True, slots=True)
class Retry:
    """Retry up to ``max_attempts`` attempts in all (1 means no retry).

    Args:
        max_attempts: attempts including the first; at least 1.
        backoff: base delay in seconds before the first retry.
        max_backoff: cap on any single delay, in seconds.
        jitter: ``"full"``, ``"equal"`` or ``"none"`` (see the module docstring).
        retry_on: exception types, or a predicate on the exception, that are worth
            another attempt; by default every ``Exception``.
        budget: an optional retry budget shared by the calls it guards; a retry it
            refuses ends the call with ``RetryBudgetExhausted``.
    """

    max_attempts: int = 3
    backoff: float = 0.1
    max_backoff: float = 10.0
    jitter: Jitter = "full"
    retry_on: RetryOn = (Exception,)
    budget: RetryBudgetLike | None = None

    def __post_init__(self) -> None:
        attempts = self.max_attempts
        if isinstance(attempts, bool) or not isinstance(attempts, int) or attempts < 1:
            raise ConfigError(f"Retry.max_attempts must be an int >= 1, got {attempts!r}")
        if not _is_seconds(self.backoff) or self.backoff == math.inf:
            raise ConfigError(
                f"Retry.backoff must be a finite number of seconds >= 0, got {self.backoff!r}"
            )
        if not _is_seconds(self.max_backoff):
            raise ConfigError(
                f"Retry.max_backoff must be a number of seconds >= 0, got {self.max_backoff!r}"
            )
        if self.max_backoff < self.backoff:
            raise ConfigError(
                f"Retry.max_backoff ({self.max_backoff!r}) must be >= backoff ({self.backoff!r})"
            )
        if self.jitter not in ("full", "equal", "none"):
            raise ConfigError(
                f"Retry.jitter must be 'full', 'equal' or 'none', got {self.jitter!r}"
            )
        retry_on = self.retry_on
        if not callable(retry_on) and not (
            isinstance(retry_on, tuple)
            and all(isinstance(t, type) and issubclass(t, BaseException) for t in retry_on)
        ):
            raise ConfigError(
                f"Retry.retry_on must be a tuple of exception types or a predicate, "
                f"got {retry_on!r}"
            )
        if self.budget is not None and not isinstance(self.budget, RetryBudgetLike):
            raise ConfigError(f"Retry.budget must be a RetryBudget, got {self.budget!r}")

    def should_retry(self, attempt: int, error: BaseException) -> bool:
        """Whether attempt number ``attempt`` (1-based) that raised ``error`` gets another."""
        if attempt >= self.max_attempts:
            return False
        if isinstance(self.retry_on, tuple):
            return isinstance(error, self.retry_on)
        return bool(self.retry_on(error))

    def delay(self, attempt: int, rng: _random.Random | None = None) -> float:
        """Seconds to wait after failed attempt ``attempt`` (1-based) before the next."""
        ceiling = float(min(self.max_backoff, self.backoff * 2.0 ** min(attempt - 1, 1023)))
        if self.jitter == "none":
            return ceiling
        draw: float = (rng or _random).random()
        if self.jitter == "full":
            return ceiling * draw
        return ceiling / 2 + ceiling / 2 * draw


def _is_seconds(value: object) -> bool:
    """A number (not a bool, not NaN) >= 0."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    return value >= 0  # False for NaN too
