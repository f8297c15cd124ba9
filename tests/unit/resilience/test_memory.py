"""Rejections do not accumulate memory (no shared exception growing a traceback)."""

import asyncio
import contextlib
import gc
import tracemalloc

from seamwork.resilience import CircuitBreaker, CircuitOpenError, RateLimiter
from seamwork.testing import ManualClock

ROUNDS = 100_000
BOUND = 200_000  # bytes: noise from tracemalloc and the interpreter, not growth per call


def _measure(reject_once: object) -> int:
    for _ in range(1_000):  # warm caches (interned strings, code objects)
        reject_once()  # type: ignore[operator]
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        for _ in range(ROUNDS):
            reject_once()  # type: ignore[operator]
        gc.collect()
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    return sum(stat.size_diff for stat in after.compare_to(before, "filename"))


def test_100k_breaker_rejections_keep_memory_bounded() -> None:
    breaker = CircuitBreaker("m", clock=ManualClock())
    breaker.isolate()

    def reject_once() -> None:
        with contextlib.suppress(CircuitOpenError):
            breaker.call_sync(int)

    assert _measure(reject_once) < BOUND
    assert breaker.stats().rejections_total == ROUNDS + 1_000


def test_100k_async_breaker_and_limiter_rejections_keep_memory_bounded() -> None:
    breaker = CircuitBreaker("m", clock=ManualClock())
    breaker.isolate()
    limiter = RateLimiter(1.0, clock=ManualClock())
    limiter.try_acquire()
    loop = asyncio.new_event_loop()

    async def reject_batch() -> None:
        for _ in range(100):
            for policy in (breaker, limiter):
                with contextlib.suppress(Exception):
                    await policy.call(asyncio.sleep, 0)

    try:
        growth = _measure_batches(lambda: loop.run_until_complete(reject_batch()))
    finally:
        loop.close()
    assert growth < BOUND
    assert limiter.stats().rejected_total > ROUNDS // 2


def _measure_batches(run_batch: object) -> int:
    gc.collect()
    run_batch()  # type: ignore[operator]
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        for _ in range(ROUNDS // 200):
            run_batch()  # type: ignore[operator]
        gc.collect()
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    return sum(stat.size_diff for stat in after.compare_to(before, "filename"))
