"""Bulkhead: cap the calls in flight to one dependency, with a bounded, timed queue.

``Admission`` is the pure core: counts, a FIFO of opaque waiters, and hand-over. A
call that leaves gives its slot straight to the oldest waiter (no barging: a newcomer
never overtakes the queue). The drivers park waiters (an asyncio future, or a
``threading.Event`` for plain callers) and bound their wait with ``max_wait``.

The async driver waits with the injected clock (``ManualClock`` in tests); the sync
driver waits on a real ``threading.Event``, so its ``max_wait`` is wall time.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Generic, ParamSpec, TypeVar

from seamwork._core.clock import Clock, SystemClock
from seamwork.errors import BulkheadFullError, ConfigError
from seamwork.resilience import _validate as check
from seamwork.resilience._policy import Policy

P = ParamSpec("P")
R = TypeVar("R")
W = TypeVar("W")


class Admission(Generic[W]):
    """Pure admission control: ``max_concurrent`` slots, ``max_queue`` waiters.

    Invariants: ``0 <= active <= max_concurrent``, ``len(queue) <= max_queue``, and a
    waiter is queued only while every slot is taken.
    """

    __slots__ = ("active", "admitted", "max_concurrent", "max_queue", "queue", "rejected")

    def __init__(self, max_concurrent: int, max_queue: int) -> None:
        self.max_concurrent, self.max_queue = max_concurrent, max_queue
        self.active = self.admitted = self.rejected = 0
        self.queue: deque[W] = deque()

    def try_enter(self) -> bool:
        """Take a free slot now (only if nobody is queued ahead)."""
        if self.active < self.max_concurrent and not self.queue:
            self.active += 1
            self.admitted += 1
            return True
        return False

    def enqueue(self, waiter: W) -> bool:
        """Queue ``waiter`` for the next free slot; False (rejected) if the queue is full."""
        if len(self.queue) < self.max_queue:
            self.queue.append(waiter)
            return True
        self.rejected += 1
        return False

    def leave(self) -> W | None:
        """Free a slot; returns the waiter it was handed to, if any."""
        if self.queue:
            self.admitted += 1
            return self.queue.popleft()
        self.active -= 1
        return None

    def abandon(self, waiter: W) -> bool:
        """Withdraw a waiter; False if it was already handed a slot (it must leave)."""
        try:
            self.queue.remove(waiter)
        except ValueError:
            return False
        self.rejected += 1
        return True


@dataclass(frozen=True, slots=True)
class BulkheadStats:
    """A snapshot for metrics: slots in use, waiters, and lifetime counters."""

    name: str
    active: int
    queued: int
    max_concurrent: int
    max_queue: int
    admitted_total: int
    rejected_total: int


class _AsyncWaiter:
    __slots__ = ("future", "loop", "passed_on")

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.future: asyncio.Future[None] = self.loop.create_future()
        self.passed_on = False  # the slot it was handed went to the next waiter

    def wake(self) -> bool:
        """Hand over the slot; False if the waiter's loop is closed (nobody can take it)."""
        try:
            self.loop.call_soon_threadsafe(_resolve, self.future)
        except RuntimeError:
            return False
        return True


class _SyncWaiter:
    __slots__ = ("event", "passed_on")

    def __init__(self) -> None:
        self.event = threading.Event()
        self.passed_on = False

    def wake(self) -> bool:
        self.event.set()
        return True


class Bulkhead(Policy):
    """At most ``max_concurrent`` calls at once; up to ``max_queue`` more wait.

    Args:
        name: identifies the bulkhead in errors and metrics.
        max_concurrent: calls allowed to run at once (>= 1).
        max_queue: callers allowed to wait for a slot (>= 0); the rest are rejected
            with ``BulkheadFullError`` at once.
        max_wait: seconds a queued caller waits before ``BulkheadFullError``
            (None: until a slot frees).
        clock: time source for the async wait; ``SystemClock()`` by default.
    """

    __slots__ = ("_admission", "_clock", "_lock", "max_wait", "name")

    def __init__(
        self,
        name: str,
        max_concurrent: int = 10,
        *,
        max_queue: int = 0,
        max_wait: float | None = None,
        clock: Clock | None = None,
    ) -> None:
        if not isinstance(name, str) or not name:
            raise ConfigError(f"name must be a non-empty str, got {name!r}")
        check.count("max_concurrent", max_concurrent)
        check.count("max_queue", max_queue, minimum=0)
        check.seconds("max_wait", max_wait, allow_zero=True)
        self.name, self.max_wait = name, max_wait
        self._clock = clock or SystemClock()
        self._admission: Admission[_AsyncWaiter | _SyncWaiter] = Admission(
            max_concurrent, max_queue
        )
        self._lock = threading.Lock()

    async def call(self, fn: Callable[P, Awaitable[R]], /, *args: P.args, **kwargs: P.kwargs) -> R:
        lock = self._lock
        lock.acquire()  # explicit acquire/release: half the cost of `with` on CPython 3.11
        try:
            entered = self._admission.try_enter()
        finally:
            lock.release()
        if not entered:
            await self._wait_async()
        try:
            return await fn(*args, **kwargs)
        finally:
            lock.acquire()  # leave and hand over, inlined: half the cost of a call
            successor = self._admission.leave()
            lock.release()
            if successor is not None and not successor.wake():
                self._pass_on(successor)

    def call_sync(self, fn: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> R:
        lock = self._lock
        lock.acquire()  # explicit acquire/release: half the cost of `with` on CPython 3.11
        try:
            entered = self._admission.try_enter()
        finally:
            lock.release()
        if not entered:
            self._wait_sync()
        try:
            return fn(*args, **kwargs)
        finally:
            lock.acquire()  # leave and hand over, inlined: half the cost of a call
            successor = self._admission.leave()
            lock.release()
            if successor is not None and not successor.wake():
                self._pass_on(successor)

    async def _wait_async(self) -> None:
        waiter = self._enqueue(_AsyncWaiter())
        try:
            async with self._clock.timeout(self.max_wait):
                await waiter.future
        except BaseException as error:
            timed_out = isinstance(error, TimeoutError)
            if self._withdraw(waiter):
                if timed_out:
                    raise self._full("timed out in the queue") from None
                raise
            if timed_out:  # handed a slot just as the wait ran out: use it
                return
            self._pass_on(waiter)  # cancelled while handed a slot (or its loop closed)
            raise

    def _wait_sync(self) -> None:
        waiter = self._enqueue(_SyncWaiter())
        limit = self.max_wait
        if limit is not None and limit > threading.TIMEOUT_MAX:  # inf: the thread's "forever"
            limit = None
        try:
            woken = waiter.event.wait(limit)
        except BaseException:  # KeyboardInterrupt, or whatever a signal handler raises
            if not self._withdraw(waiter):
                self._pass_on(waiter)  # interrupted while handed a slot
            raise
        if not woken and self._withdraw(waiter):
            raise self._full("timed out in the queue")

    def _enqueue(self, waiter: W) -> W:
        with self._lock:
            queued = self._admission.enqueue(waiter)  # type: ignore[arg-type]
        if not queued:
            raise self._full("no free slot and the queue is full")
        return waiter

    def _withdraw(self, waiter: _AsyncWaiter | _SyncWaiter) -> bool:
        with self._lock:
            return self._admission.abandon(waiter)

    def _pass_on(self, waiter: _AsyncWaiter | _SyncWaiter) -> None:
        """Give the slot ``waiter`` was handed but will not use to the next waiter.

        Exactly once per waiter: a waiter whose loop closed is passed over by the caller
        that woke it, and later its coroutine is closed (GeneratorExit) and lands here too.
        """
        while True:
            with self._lock:
                if waiter.passed_on:
                    return
                waiter.passed_on = True
                successor = self._admission.leave()
            if successor is None or successor.wake():
                return
            waiter = successor

    def _full(self, why: str) -> BulkheadFullError:
        return BulkheadFullError(f"bulkhead {self.name!r}: {why}")

    def stats(self) -> BulkheadStats:
        """A consistent snapshot of the slots, the queue and the counters."""
        a = self._admission
        with self._lock:
            return BulkheadStats(
                self.name, a.active, len(a.queue), a.max_concurrent, a.max_queue,
                a.admitted, a.rejected,
            )  # fmt: skip

    def __repr__(self) -> str:
        a = self._admission
        return (
            f"Bulkhead({self.name!r}, max_concurrent={a.max_concurrent}, max_queue={a.max_queue})"
        )


class Bulkheads(Mapping[str, Bulkhead]):
    """One bulkhead per dependency: ``Bulkheads({"payments": 10, "catalog": 20})``.

    Args:
        limits: dependency name -> ``max_concurrent`` (or a ready ``Bulkhead`` of that
            name: its errors and stats name it, so the key must agree).
        max_queue, max_wait, clock: applied to every bulkhead built from an int.
    """

    def __init__(
        self,
        limits: Mapping[str, int | Bulkhead],
        *,
        max_queue: int = 0,
        max_wait: float | None = None,
        clock: Clock | None = None,
    ) -> None:
        if not isinstance(limits, Mapping) or not limits:
            raise ConfigError("limits must be a non-empty mapping of name -> max_concurrent")
        for name, limit in limits.items():
            if isinstance(limit, Bulkhead) and limit.name != name:
                raise ConfigError(
                    f"limits[{name!r}] is a Bulkhead named {limit.name!r}: a ready bulkhead "
                    "must be listed under its own name"
                )
        self._pools = {
            name: limit
            if isinstance(limit, Bulkhead)
            else Bulkhead(name, limit, max_queue=max_queue, max_wait=max_wait, clock=clock)
            for name, limit in limits.items()
        }

    def __getitem__(self, name: str) -> Bulkhead:
        return self._pools[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._pools)

    def __len__(self) -> int:
        return len(self._pools)

    def stats(self) -> dict[str, BulkheadStats]:
        """Every pool's snapshot, by name."""
        return {name: pool.stats() for name, pool in self._pools.items()}


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
