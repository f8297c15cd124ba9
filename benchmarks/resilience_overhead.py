"""Resilience overhead and half-open behaviour, seamwork next to its peers, one run.

Run: ``.venv/bin/python benchmarks/resilience_overhead.py`` (peers: ``pip install
'seamwork[bench]'``; a peer that is not installed is skipped, not faked).

Table 1: cost per successful call of a trivial function, wall and CPU ns, the ratio
to the bare call measured in the same run, and for seamwork's rows the issue's
target on this machine and whether the row meets it. Table 2: a breaker is tripped,
its reset timeout passes, then 100 callers race into HALF_OPEN against a function
that is still failing; the column says how many of them reached that function
(1 is the design: one probe, 99 rejected fast).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import threading
import time
from collections.abc import Awaitable, Callable
from datetime import timedelta

from seamwork.resilience import (
    Bulkhead,
    CircuitBreaker,
    Pipeline,
    RateLimiter,
    Retry,
    RetryPolicy,
    Timeout,
)

RACERS = 100
RESET = 0.05  # seconds: the peers' reset timeout, so the race starts quickly


def have(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def work() -> int:
    return 1


async def awork() -> int:
    return 1


# --- timing ---------------------------------------------------------------------------


def time_sync(fn: Callable[[], object], budget: float = 0.25) -> tuple[float, float]:
    """(wall ns, CPU ns) per call: best of 3 runs of ~``budget`` seconds each."""
    n = _calibrate(fn, budget)
    best = (float("inf"), float("inf"))
    for _ in range(3):
        w0, c0 = time.perf_counter_ns(), time.process_time_ns()
        for _ in range(n):
            fn()
        wall, cpu = (time.perf_counter_ns() - w0) / n, (time.process_time_ns() - c0) / n
        best = min(best, (wall, cpu))
    return best


def _calibrate(fn: Callable[[], object], budget: float) -> int:
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < budget / 10:
        fn()
        n += 1
    return max(n * 10, 1000)


def time_async(fn: Callable[[], Awaitable[object]], budget: float = 0.25) -> tuple[float, float]:
    """Like ``time_sync`` for a coroutine function, awaited inside one event loop."""

    async def run() -> tuple[float, float]:
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < budget / 10:
            await fn()
            n += 1
        n = max(n * 10, 1000)
        best = (float("inf"), float("inf"))
        for _ in range(3):
            w0, c0 = time.perf_counter_ns(), time.process_time_ns()
            for _ in range(n):
                await fn()
            wall, cpu = (time.perf_counter_ns() - w0) / n, (time.process_time_ns() - c0) / n
            best = min(best, (wall, cpu))
        return best

    return asyncio.run(run())


# --- the contestants ------------------------------------------------------------------


def ours_sync() -> list[tuple[str, str, Callable[[], object]]]:
    breaker = CircuitBreaker("bench")
    pipeline = Pipeline(Timeout(3.0), Retry(3), CircuitBreaker("bench-p"), Bulkhead("b", 10))
    limiter = RateLimiter(1e12, burst=1_000_000)
    return [
        ("seamwork", "breaker (closed)", breaker(work)),
        ("seamwork", "retry, 1st try succeeds", RetryPolicy(Retry(3))(work)),
        ("seamwork", "pipeline t+r+cb+bh", pipeline(work)),
        ("seamwork", "rate limiter decision", limiter.try_acquire),
    ]


def ours_async() -> list[tuple[str, str, Callable[[], Awaitable[object]]]]:
    breaker = CircuitBreaker("bench")
    pipeline = Pipeline(Timeout(3.0), Retry(3), CircuitBreaker("bench-p"), Bulkhead("b", 10))
    return [
        ("seamwork", "breaker (closed)", breaker(awork)),
        ("seamwork", "retry, 1st try succeeds", RetryPolicy(Retry(3))(awork)),
        ("seamwork", "pipeline t+r+cb+bh", pipeline(awork)),
    ]


def peers_sync() -> list[tuple[str, str, Callable[[], object]]]:
    rows: list[tuple[str, str, Callable[[], object]]] = []
    if have("pybreaker"):
        import pybreaker

        rows.append(("pybreaker", "breaker (closed)", pybreaker.CircuitBreaker()(work)))
    if have("circuitbreaker"):
        import circuitbreaker

        rows.append(("circuitbreaker", "breaker (closed)", circuitbreaker.circuit()(work)))
    if have("tenacity"):
        import tenacity

        retry = tenacity.retry(stop=tenacity.stop_after_attempt(3))
        rows.append(("tenacity", "retry, 1st try succeeds", retry(work)))
    if have("stamina"):
        import stamina

        rows.append(("stamina", "retry, 1st try succeeds", stamina.retry(on=Exception)(work)))
    return rows


def peers_async() -> list[tuple[str, str, Callable[[], Awaitable[object]]]]:
    rows: list[tuple[str, str, Callable[[], Awaitable[object]]]] = []
    if have("aiobreaker"):
        import aiobreaker

        rows.append(("aiobreaker", "breaker (closed)", aiobreaker.CircuitBreaker()(awork)))
    if have("purgatory"):
        import purgatory

        factory = purgatory.AsyncCircuitBreakerFactory()
        rows.append(("purgatory", "breaker (closed)", factory("bench")(awork)))
    if have("circuitbreaker"):
        import circuitbreaker

        rows.append(("circuitbreaker", "breaker (closed)", circuitbreaker.circuit()(awork)))
    if have("tenacity"):
        import tenacity

        retry = tenacity.retry(stop=tenacity.stop_after_attempt(3))
        rows.append(("tenacity", "retry, 1st try succeeds", retry(awork)))
    if have("stamina"):
        import stamina

        rows.append(("stamina", "retry, 1st try succeeds", stamina.retry(on=Exception)(awork)))
    return rows


# --- half-open race -----------------------------------------------------------------


async def race_async(call: Callable[[Callable[[], Awaitable[None]]], Awaitable[object]]) -> int:
    """Trip with one failure, wait out the reset, race 100 tasks; count who got in."""
    reached = [0]

    async def failing() -> None:
        reached[0] += 1
        await asyncio.sleep(0.02)
        raise ConnectionError("still down")

    for _ in range(10):  # enough failures to trip any default-ish threshold we set
        with contextlib.suppress(Exception):
            await call(failing)
    await asyncio.sleep(RESET * 2)
    reached[0] = 0
    await asyncio.gather(*(call(failing) for _ in range(RACERS)), return_exceptions=True)
    return reached[0]


def race_threads(call: Callable[[Callable[[], None]], object]) -> int:
    """The same race with 100 OS threads calling a sync breaker."""
    reached, lock, barrier = [0], threading.Lock(), threading.Barrier(RACERS)

    def failing() -> None:
        with lock:
            reached[0] += 1
        time.sleep(0.02)
        raise ConnectionError("still down")

    def racer() -> None:
        barrier.wait()
        with contextlib.suppress(Exception):
            call(failing)

    for _ in range(10):
        with contextlib.suppress(Exception):
            call(failing)
    time.sleep(RESET * 2)
    reached[0] = 0
    threads = [threading.Thread(target=racer) for _ in range(RACERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return reached[0]


def ours_breaker() -> CircuitBreaker:
    return CircuitBreaker("race", minimum_calls=1, window_calls=1, reset_timeout=RESET)


def async_races() -> list[tuple[str, Callable[[], Awaitable[int]]]]:
    races: list[tuple[str, Callable[[], Awaitable[int]]]] = [
        ("seamwork", lambda: race_async(ours_breaker().call)),
    ]
    if have("aiobreaker"):
        import aiobreaker

        def aio() -> Awaitable[int]:
            cb = aiobreaker.CircuitBreaker(fail_max=1, timeout_duration=timedelta(seconds=RESET))
            return race_async(cb.call_async)

        races.append(("aiobreaker", aio))
    if have("purgatory"):
        import purgatory

        def purg() -> Awaitable[int]:
            factory = purgatory.AsyncCircuitBreakerFactory(default_threshold=1, default_ttl=RESET)

            async def call(fn: Callable[[], Awaitable[None]]) -> None:
                async with await factory.get_breaker("race"):
                    await fn()

            return race_async(call)

        races.append(("purgatory", purg))
    if have("circuitbreaker"):
        import circuitbreaker

        def cbk() -> Awaitable[int]:
            cb = circuitbreaker.CircuitBreaker(failure_threshold=1, recovery_timeout=RESET)
            return race_async(lambda fn: cb.decorate(fn)())

        races.append(("circuitbreaker", cbk))
    return races


def thread_races() -> list[tuple[str, Callable[[], int]]]:
    races: list[tuple[str, Callable[[], int]]] = [
        ("seamwork", lambda: race_threads(ours_breaker().call_sync)),
    ]
    if have("pybreaker"):
        import pybreaker

        def pyb() -> int:
            return race_threads(pybreaker.CircuitBreaker(fail_max=1, reset_timeout=RESET).call)

        races.append(("pybreaker", pyb))
    if have("circuitbreaker"):
        import circuitbreaker

        def cbk() -> int:
            cb = circuitbreaker.CircuitBreaker(failure_threshold=1, recovery_timeout=RESET)
            return race_threads(lambda fn: cb.decorate(fn)())

        races.append(("circuitbreaker", cbk))
    return races


# --- report ---------------------------------------------------------------------------


# ns per call the issue sets for seamwork's rows, by (driver, what)
TARGETS = {
    ("sync", "breaker (closed)"): 400,
    ("async", "breaker (closed)"): 550,
    ("sync", "retry, 1st try succeeds"): 450,
    ("async", "retry, 1st try succeeds"): 450,
    ("sync", "pipeline t+r+cb+bh"): 2500,
    ("async", "pipeline t+r+cb+bh"): 2500,
    ("sync", "rate limiter decision"): 2000,
}


def target_cell(library: str, driver: str, what: str, wall: float) -> str:
    target = TARGETS.get((driver, what)) if library == "seamwork" else None
    if target is None:
        return ""
    return f"<= {target} {'met' if wall <= target else 'MISSED'}"


def overhead_rows() -> list[tuple[str, str, str, float, float, float]]:
    rows: list[tuple[str, str, str, float, float, float]] = []
    bare_wall, bare_cpu = time_sync(work)
    rows.append(("(bare call)", "sync", "work()", bare_wall, bare_cpu, 1.0))
    for library, what, fn in ours_sync() + peers_sync():
        wall, cpu = time_sync(fn)
        rows.append((library, "sync", what, wall, cpu, wall / bare_wall))
    bare_wall, bare_cpu = time_async(awork)
    rows.append(("(bare call)", "async", "await work()", bare_wall, bare_cpu, 1.0))
    for library, what, afn in ours_async() + peers_async():
        wall, cpu = time_async(afn)
        rows.append((library, "async", what, wall, cpu, wall / bare_wall))
    return rows


def main() -> None:
    print("Per-call cost on the success path (trivial function, best of 3)")
    header = (
        f"{'library':<16}{'driver':<7}{'what':<26}{'ns/call':>9}{'CPU ns':>9}{'x bare':>8}"
        f"  {'target (ns)'}"
    )
    print(header)
    print("-" * len(header))
    for library, driver, what, wall, cpu, ratio in overhead_rows():
        target = target_cell(library, driver, what, wall)
        line = f"{library:<16}{driver:<7}{what:<26}{wall:>9.0f}{cpu:>9.0f}{ratio:>8.1f}  {target}"
        print(line.rstrip())
    print()
    print(f"Half-open race: {RACERS} callers vs a still-failing function; how many reach it")
    header = f"{'library':<16}{'racers':<16}{'reached':>8}"
    print(header)
    print("-" * len(header))
    for library, race in async_races():
        count = asyncio.run(race())  # type: ignore[arg-type]  # each race() is a coroutine
        print(f"{library:<16}{'asyncio tasks':<16}{count:>8}")
    for library, thread_race in thread_races():
        print(f"{library:<16}{'OS threads':<16}{thread_race():>8}")


if __name__ == "__main__":
    main()
