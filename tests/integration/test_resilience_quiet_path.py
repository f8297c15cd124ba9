"""The breaker's lock-free success path under real OS threads: no count is lost."""

from __future__ import annotations

import contextlib
import threading

from seamwork.resilience import BreakerState, CircuitBreaker

THREADS = 8
CALLS = 50_000


def work() -> int:
    return 1


def hammer(call: object, calls: int) -> None:
    barrier = threading.Barrier(THREADS)

    def run() -> None:
        barrier.wait()
        for _ in range(calls):
            call()  # type: ignore[operator]

    threads = [threading.Thread(target=run) for _ in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def test_eight_threads_lose_no_success_on_the_lock_free_path() -> None:
    breaker = CircuitBreaker("quiet", minimum_calls=10, window=3600.0)
    hammer(breaker(work), CALLS)
    stats = breaker.stats()
    assert stats.successes_total == THREADS * CALLS
    assert stats.window_calls == THREADS * CALLS
    assert stats.state is BreakerState.CLOSED


def test_after_a_threaded_quiet_run_the_breaker_opens_exactly_at_the_threshold() -> None:
    breaker = CircuitBreaker("quiet", failure_rate=0.5, minimum_calls=10, window=3600.0)
    hammer(breaker(work), 1_000)
    successes = THREADS * 1_000

    def fail() -> None:
        raise ConnectionError("down")

    failures = 0
    while breaker.state is BreakerState.CLOSED:
        with contextlib.suppress(ConnectionError):
            breaker.call_sync(fail)
        failures += 1
    assert failures == successes  # 8000 / 16000 is the first rate >= 0.5
    assert breaker.stats().opens_total == 1
