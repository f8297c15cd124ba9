"""Sliding windows of call outcomes with O(1) updates (subtract-on-evict).

A window keeps running totals (calls, failures, slow calls). Recording an outcome
adds to the totals; an outcome that falls out of the window is subtracted from them
at that moment. A decision therefore reads three integers, never re-scans history.

* ``CountWindow(n)``: the last ``n`` outcomes, in a ring buffer of small ints.
* ``TimeWindow(seconds, buckets)``: outcomes of the last ``seconds``, in ``buckets``
  equal slices; a slice is dropped as a whole once it is older than the window, so
  the window covers between ``seconds * (buckets - 1) / buckets`` and ``seconds``.

``TimeWindow`` is also used to count plain events (the retry budget's calls and
retries): ``FAILURE`` and ``SLOW`` are just two independent tallies.
"""

from __future__ import annotations

import math
from math import floor
from typing import Protocol

FAILURE = 1
SLOW = 2


class Window(Protocol):
    """Totals over a sliding window; ``now`` is a monotonic reading in seconds."""

    calls: int
    failures: int
    slow: int

    def record(self, now: float, outcome: int) -> None: ...

    def refresh(self, now: float) -> None: ...

    def clear(self) -> None: ...

    def add_calls(self, calls: int) -> None: ...

    @property
    def slice_end(self) -> float: ...


class CountWindow:
    """The last ``size`` outcomes (``outcome`` is a bit set of ``FAILURE | SLOW``)."""

    __slots__ = ("_next", "_ring", "calls", "failures", "size", "slow")

    def __init__(self, size: int) -> None:
        self.size = size
        self._ring = bytearray(size)
        self.clear()

    def clear(self) -> None:
        """Forget every outcome."""
        self._next = 0
        self.calls = self.failures = self.slow = 0

    def refresh(self, now: float) -> None:
        """A count window does not age; present for the ``Window`` protocol."""

    @property
    def slice_end(self) -> float:
        """Every call may evict an outcome: no stretch of time is free of evictions."""
        return -math.inf

    def add_calls(self, calls: int) -> None:
        """Record ``calls`` plain successes."""
        for _ in range(calls):
            self.record(0.0, 0)

    def record(self, now: float, outcome: int) -> None:
        """Add one outcome, evicting the oldest once the window is full."""
        slot = self._next
        if self.calls == self.size:
            old = self._ring[slot]
            self.failures -= old & FAILURE
            self.slow -= (old & SLOW) >> 1
        else:
            self.calls += 1
        self._ring[slot] = outcome
        self.failures += outcome & FAILURE
        self.slow += (outcome & SLOW) >> 1
        self._next = slot + 1 if slot + 1 < self.size else 0


class TimeWindow:
    """Outcomes of the last ``seconds``, kept in ``buckets`` slices."""

    __slots__ = (
        "_b_calls",
        "_b_failures",
        "_b_slow",
        "_head",
        "_slot",
        "_width",
        "buckets",
        "calls",
        "failures",
        "seconds",
        "slow",
    )

    def __init__(self, seconds: float, buckets: int = 10) -> None:
        self.seconds = seconds
        self.buckets = buckets
        self._width = seconds / buckets
        self._b_calls = [0] * buckets
        self._b_failures = [0] * buckets
        self._b_slow = [0] * buckets
        self.clear()

    def clear(self) -> None:
        """Forget every outcome."""
        for series in (self._b_calls, self._b_failures, self._b_slow):
            series[:] = [0] * self.buckets
        self._head: float = -math.inf
        self._slot = 0
        self.calls = self.failures = self.slow = 0

    def slice_index(self, now: float) -> int:
        """The absolute index of the slice holding time ``now``."""
        return floor(now / self._width)

    def refresh(self, now: float) -> None:
        """Drop (and subtract) every slice that is now older than the window."""
        head = floor(now / self._width)
        if head > self._head:
            self._advance(head)

    def record(self, now: float, outcome: int) -> None:
        """Count one call at ``now`` with the given outcome bits."""
        head = floor(now / self._width)
        if head > self._head:
            self._advance(head)
        slot = self._slot
        self._b_calls[slot] += 1
        self.calls += 1
        if outcome:
            if outcome & FAILURE:
                self._b_failures[slot] += 1
                self.failures += 1
            if outcome & SLOW:
                self._b_slow[slot] += 1
                self.slow += 1

    @property
    def slice_end(self) -> float:
        """When the current slice ends (the next eviction can happen no earlier)."""
        return (self._head + 1) * self._width

    def add_calls(self, calls: int) -> None:
        """Count ``calls`` plain successes into the current slice (no clock reading)."""
        self._b_calls[self._slot] += calls
        self.calls += calls

    def _advance(self, head: int) -> None:
        if head - self._head >= self.buckets:
            self.clear()
        else:
            for index in range(int(self._head) + 1, head + 1):
                self._evict(index % self.buckets)
        self._head = head
        self._slot = head % self.buckets

    def _evict(self, slot: int) -> None:
        self.calls -= self._b_calls[slot]
        self.failures -= self._b_failures[slot]
        self.slow -= self._b_slow[slot]
        self._b_calls[slot] = self._b_failures[slot] = self._b_slow[slot] = 0
