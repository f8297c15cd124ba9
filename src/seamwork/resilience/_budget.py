"""RetryBudget: retries may be at most a set fraction of recent calls.

Per-call retry limits multiply load exactly when a dependency is weakest: with 3
attempts each, a failing service receives 3x its normal traffic. A budget (Finagle's
idea) caps retries across *all* calls sharing it: over the sliding window, retries
<= ``ratio`` x first attempts + ``min_retries`` (a floor so a quiet service can still
retry). ``BudgetCore`` is the pure part; ``RetryBudget`` adds the clock and a lock.
"""

from __future__ import annotations

import threading

from seamwork._core.clock import Clock, SystemClock
from seamwork.resilience import _validate as check
from seamwork.resilience._window import FAILURE, TimeWindow

_RETRY = FAILURE  # in the window, a retry is an entry with this bit; a first attempt has none


class BudgetCore:
    """Counts first attempts and retries over a bucketed window; pure."""

    __slots__ = ("min_retries", "ratio", "refused", "window")

    def __init__(self, ratio: float, min_retries: int, window: float, buckets: int) -> None:
        self.ratio, self.min_retries = ratio, min_retries
        self.window = TimeWindow(window, buckets)
        self.refused = 0

    def record_call(self, now: float) -> None:
        """A first attempt: a deposit into the budget."""
        self.window.record(now, 0)

    def try_spend(self, now: float) -> bool:
        """Take one retry if ``retries + 1 <= ratio * calls + min_retries``."""
        window = self.window
        window.refresh(now)
        retries = window.failures
        if retries + 1 > self.ratio * (window.calls - retries) + self.min_retries:
            self.refused += 1
            return False
        window.record(now, _RETRY)
        return True

    def counts(self, now: float) -> tuple[int, int]:
        """(first attempts, retries) currently in the window."""
        self.window.refresh(now)
        return self.window.calls - self.window.failures, self.window.failures


class RetryBudget:
    """A shared retry budget: ``Retry(3, budget=RetryBudget(0.2))``.

    Args:
        ratio: retries allowed per first attempt over the window, (0, 1].
        min_retries: retries always allowed per window, even with little traffic.
        window: seconds of history the budget considers.
        buckets: slices of the window (its eviction granularity).
        clock: time source; ``SystemClock()`` by default.
    """

    __slots__ = ("_clock", "_core", "_lock")

    def __init__(
        self,
        ratio: float = 0.2,
        *,
        min_retries: int = 10,
        window: float = 10.0,
        buckets: int = 10,
        clock: Clock | None = None,
    ) -> None:
        check.fraction("ratio", ratio)
        check.count("min_retries", min_retries, minimum=0)
        check.seconds("window", window)
        check.count("buckets", buckets)
        self._core = BudgetCore(ratio, min_retries, window, buckets)
        self._clock = clock or SystemClock()
        self._lock = threading.Lock()

    def record_call(self) -> None:
        """Count one first attempt."""
        with self._lock:
            self._core.record_call(self._clock.monotonic())

    def try_spend(self) -> bool:
        """Take one retry from the budget; False when it is spent."""
        with self._lock:
            return self._core.try_spend(self._clock.monotonic())

    @property
    def refused(self) -> int:
        """Retries refused so far (for metrics)."""
        return self._core.refused

    def counts(self) -> tuple[int, int]:
        """(first attempts, retries) in the current window."""
        with self._lock:
            return self._core.counts(self._clock.monotonic())

    def __repr__(self) -> str:
        return f"RetryBudget(ratio={self._core.ratio!r}, min_retries={self._core.min_retries})"
