"""RateLimiter: GCRA, the token bucket computed from one timestamp.

``Gcra`` is the pure core. It keeps the *theoretical arrival time* (TAT): when the
bucket would be full again if no more calls came. A call of cost ``n`` moves the TAT
by ``n`` emission intervals (``1 / rate``); it is admitted if the new TAT is at most
``burst`` intervals ahead of now (plus what the caller agrees to wait). This admits
at most ``rate * t + burst`` calls in any interval of length ``t``, exactly like a
token bucket of capacity ``burst`` refilled at ``rate`` per second, in O(1) time and
one float of state. A caller that agrees to wait *reserves* its place: the TAT moves
at once and the caller sleeps the difference, so waiters are served in order. A waiter
cancelled while it sleeps gives its place back when nobody reserved after it (the TAT
is still the one it set); behind later waiters, its place stays spent: moving them
forward would break the promise made to each about when it runs.

The TAT is kept as a clock reading plus an offset (how far ahead of that reading it
is), re-based on each reservation. Monotonic readings grow with the host's uptime, and
an absolute TAT there loses the low bits of every interval added to it: after a year
of uptime a limiter of 10/s refused the first call from idle.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import ParamSpec, TypeVar

from seamwork._core.clock import Clock, SystemClock
from seamwork.errors import ConfigError, RateLimitedError
from seamwork.resilience import _validate as check
from seamwork.resilience._policy import Policy

P = ParamSpec("P")
R = TypeVar("R")

_EPSILON = 1e-9  # float slack (per second of bucket) so exactly `burst` calls fit from idle


class Gcra:
    """Pure GCRA decisions for ``rate`` calls per second with bursts of ``burst``."""

    __slots__ = ("_ahead", "_base", "_slack", "burst", "interval", "rate")

    def __init__(self, rate: float, burst: int) -> None:
        self.rate, self.burst = rate, burst
        self.interval = 1.0 / rate
        # The TAT is _base + _ahead: _base a clock reading, _ahead small (see the
        # module docstring), so no arithmetic below loses the bits of an interval.
        self._base, self._ahead = 0.0, -math.inf
        self._slack = _EPSILON * max(1.0, burst * self.interval)

    def reserve(self, now: float, cost: int = 1, max_wait: float = 0.0) -> float | None:
        """Seconds to wait before proceeding (0: now), or None: refused, nothing taken."""
        ahead = (self._base - now) + self._ahead  # the TAT's lead on now
        new_ahead = (ahead if ahead > 0.0 else 0.0) + cost * self.interval
        wait = new_ahead - self.burst * self.interval
        if wait > max_wait + self._slack:
            return None
        self._base, self._ahead = now, new_ahead
        return wait if wait > 0.0 else 0.0

    @property
    def tat(self) -> float:
        """The theoretical arrival time: when the bucket is full again if no call comes."""
        return self._base + self._ahead

    def cancel(self, tat: float, cost: int) -> bool:
        """Give back a reservation that moved the TAT to ``tat``, if it is the latest."""
        if self.tat != tat:
            return False
        self._ahead -= cost * self.interval
        return True

    def available(self, now: float) -> float:
        """Tokens in the bucket at ``now`` (fractional), in ``[0, burst]``.

        Waiters' reservations move the TAT past ``burst`` intervals ahead; the tokens
        they were promised are not in the bucket, but the bucket holds no fewer than 0.
        """
        ahead = (self._base - now) + self._ahead
        return max(self.burst - (ahead / self.interval if ahead > 0.0 else 0.0), 0.0)


@dataclass(frozen=True, slots=True)
class RateLimiterStats:
    """A snapshot for metrics: tokens left now (0 to ``burst``; 0 while waiters hold
    reservations) and lifetime counters."""

    name: str
    available: float
    admitted_total: int
    rejected_total: int


class RateLimiter(Policy):
    """Admit at most ``rate`` calls per second on average, bursts of ``burst``.

    Args:
        rate: sustained calls per second (> 0).
        burst: calls admitted at once from idle (>= 1); the bucket's capacity.
        max_wait: seconds a call may wait for its token in ``call``/``acquire``
            before ``RateLimitedError``; 0 (default) rejects at once.
        name: identifies the limiter in errors and metrics.
        clock: time source; ``SystemClock()`` by default.
    """

    __slots__ = ("_admitted", "_clock", "_core", "_lock", "_rejected", "max_wait", "name")

    def __init__(
        self,
        rate: float,
        burst: int = 1,
        *,
        max_wait: float = 0.0,
        name: str = "rate-limiter",
        clock: Clock | None = None,
    ) -> None:
        if not isinstance(name, str) or not name:
            raise ConfigError(f"name must be a non-empty str, got {name!r}")
        check.positive("rate", rate)
        check.count("burst", burst)
        check.seconds("max_wait", max_wait, allow_zero=True)
        self.name, self.max_wait = name, max_wait
        self._core = Gcra(rate, burst)
        self._clock = clock or SystemClock()
        self._lock = threading.Lock()
        self._admitted = self._rejected = 0

    def try_acquire(self, cost: int = 1) -> bool:
        """Take ``cost`` tokens now if they are there; never waits."""
        return self._reserve(cost, 0.0) is not None

    async def acquire(self, cost: int = 1, max_wait: float | None = None) -> None:
        """Take ``cost`` tokens, sleeping up to ``max_wait`` (default: the limiter's).
        Cancelled while it sleeps, it gives its place back if no one queued behind it."""
        wait, tat = self._reserve_or_raise(cost, self._max_wait(max_wait))
        if wait:
            try:
                await self._clock.sleep(wait)
            except BaseException:
                self._cancel(tat, cost)
                raise

    def acquire_sync(self, cost: int = 1, max_wait: float | None = None) -> None:
        """``acquire`` for plain callers: blocks the thread while it waits."""
        wait, tat = self._reserve_or_raise(cost, self._max_wait(max_wait))
        if wait:
            try:
                self._clock.sleep_blocking(wait)
            except BaseException:
                self._cancel(tat, cost)
                raise

    async def call(self, fn: Callable[P, Awaitable[R]], /, *args: P.args, **kwargs: P.kwargs) -> R:
        await self.acquire(1, self.max_wait)
        return await fn(*args, **kwargs)

    def call_sync(self, fn: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> R:
        self.acquire_sync(1, self.max_wait)
        return fn(*args, **kwargs)

    def _max_wait(self, max_wait: float | None) -> float:
        if max_wait is None:
            return self.max_wait
        check.seconds("max_wait", max_wait, allow_zero=True)
        return max_wait

    def _reserve(self, cost: int, max_wait: float) -> float | None:
        return self._reserve_at(cost, max_wait)[0]

    def _reserve_at(self, cost: int, max_wait: float) -> tuple[float | None, float]:
        """Seconds to wait (None: refused) and the TAT the reservation set."""
        if cost != 1 and (not isinstance(cost, int) or not 1 <= cost <= self._core.burst):
            raise ConfigError(f"cost must be an int in [1, burst={self._core.burst}]")
        core, lock = self._core, self._lock
        lock.acquire()  # explicit acquire/release: half the cost of `with` on CPython 3.11
        try:
            # Read under the lock: readings then reach the core in time order. A
            # reading taken before another thread's reservation would be judged after
            # it, as if time went back, and refuse (or delay) a call that fits.
            wait = core.reserve(self._clock.monotonic(), cost, max_wait)
            if wait is None:
                self._rejected += 1
            else:
                self._admitted += 1
            return wait, core.tat
        finally:
            lock.release()

    def _reserve_or_raise(self, cost: int, max_wait: float) -> tuple[float, float]:
        """Seconds to wait and the TAT this reservation set (to cancel it by)."""
        wait, tat = self._reserve_at(cost, max_wait)
        if wait is None:
            raise RateLimitedError(f"{self.name!r}: over {self._core.rate}/s")
        return wait, tat

    def _cancel(self, tat: float, cost: int) -> None:
        with self._lock:
            self._admitted -= 1  # it never ran
            self._core.cancel(tat, cost)

    def stats(self) -> RateLimiterStats:
        """Tokens available now and the admitted/rejected counters."""
        with self._lock:
            available = self._core.available(self._clock.monotonic())
            return RateLimiterStats(self.name, available, self._admitted, self._rejected)

    def __repr__(self) -> str:
        return f"RateLimiter({self._core.rate!r}, burst={self._core.burst})"
