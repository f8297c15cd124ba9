"""Resilience under real concurrency: asyncio tasks and OS threads racing for real."""

from __future__ import annotations

import asyncio
import gc
import signal
import threading
import time
from types import FrameType

import pytest

from seamwork.resilience import (
    BreakerState,
    Bulkhead,
    BulkheadFullError,
    CircuitBreaker,
    CircuitOpenError,
    RateLimiter,
)
from seamwork.testing import ManualClock

RACERS = 100


def half_open_breaker(probes: int, mode: str = "reject") -> tuple[CircuitBreaker, ManualClock]:
    clock = ManualClock()
    breaker = CircuitBreaker(
        "racy",
        minimum_calls=1,
        window_calls=1,
        reset_timeout=30.0,
        half_open_calls=probes,
        half_open_mode=mode,  # type: ignore[arg-type]
        clock=clock,
    )
    breaker.isolate()
    breaker.reset()
    with pytest.raises(ZeroDivisionError):
        breaker.call_sync(lambda: 1 / 0)
    clock.advance(30.0)
    assert breaker.state is BreakerState.HALF_OPEN
    return breaker, clock


@pytest.mark.parametrize("probes", [1, 3])
async def test_racing_tasks_in_half_open_let_exactly_n_probes_through(probes: int) -> None:
    breaker, _ = half_open_breaker(probes)
    reached, gate = [], asyncio.Event()

    async def still_failing() -> None:
        reached.append(1)
        await gate.wait()
        raise ConnectionError("still down")

    start = asyncio.Event()

    async def racer() -> None:
        await start.wait()
        await breaker.call(still_failing)

    tasks = [asyncio.create_task(racer()) for _ in range(RACERS)]
    await asyncio.sleep(0)
    start.set()
    await asyncio.sleep(0.05)
    gate.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert len(reached) == probes
    assert sum(isinstance(r, CircuitOpenError) for r in results) == RACERS - probes
    assert breaker.state is BreakerState.OPEN


@pytest.mark.parametrize("probes", [1, 3])
def test_racing_threads_in_half_open_let_exactly_n_probes_through(probes: int) -> None:
    breaker, _ = half_open_breaker(probes)
    reached, lock, gate = [0], threading.Lock(), threading.Event()
    barrier = threading.Barrier(RACERS)
    outcomes: list[str] = []

    def still_failing() -> None:
        with lock:
            reached[0] += 1
        gate.wait(10)
        raise ConnectionError("still down")

    def racer() -> None:
        barrier.wait()
        try:
            breaker.call_sync(still_failing)
        except CircuitOpenError:
            outcomes.append("rejected")
        except ConnectionError:
            outcomes.append("failed")

    threads = [threading.Thread(target=racer) for _ in range(RACERS)]
    for thread in threads:
        thread.start()
    _wait_until(lambda: breaker.stats().rejections_total >= RACERS - probes)
    gate.set()
    for thread in threads:
        thread.join(10)
    assert reached[0] == probes
    assert sorted(outcomes) == ["failed"] * probes + ["rejected"] * (RACERS - probes)


def test_racing_threads_in_wait_mode_all_get_the_verdict() -> None:
    breaker, _ = half_open_breaker(2, mode="wait")
    reached, lock, gate = [0], threading.Lock(), threading.Event()
    barrier, results = threading.Barrier(RACERS), []

    def recovered() -> str:
        with lock:
            reached[0] += 1
        gate.wait(10)
        return "ok"

    def racer() -> None:
        barrier.wait()
        results.append(breaker.call_sync(recovered))

    threads = [threading.Thread(target=racer) for _ in range(RACERS)]
    for thread in threads:
        thread.start()
    time.sleep(0.2)
    assert reached[0] == 2  # the others are parked, not calling
    gate.set()
    for thread in threads:
        thread.join(10)
    assert results == ["ok"] * RACERS
    assert breaker.state is BreakerState.CLOSED


async def test_task_burst_into_a_bulkhead_runs_10_queues_20_rejects_70() -> None:
    bulkhead = Bulkhead("db", 10, max_queue=20, max_wait=0.3)
    gate, ran = asyncio.Event(), []
    started = time.monotonic()

    async def work(i: int) -> int:
        ran.append(i)
        await gate.wait()
        return i

    async def caller(i: int) -> tuple[str, float]:
        try:
            await bulkhead.call(work, i)
            return "ran", time.monotonic() - started
        except BulkheadFullError as error:
            kind = "timed_out" if "timed out" in str(error) else "rejected"
            return kind, time.monotonic() - started

    tasks = [asyncio.create_task(caller(i)) for i in range(RACERS)]
    await asyncio.sleep(0.6)
    gate.set()
    outcomes = await asyncio.gather(*tasks)
    assert len(ran) == 10
    _check_burst(outcomes, max_wait=0.3)


def test_thread_burst_into_a_bulkhead_runs_10_queues_20_rejects_70() -> None:
    bulkhead = Bulkhead("db", 10, max_queue=20, max_wait=0.3)
    gate, barrier = threading.Event(), threading.Barrier(RACERS)
    outcomes: list[tuple[str, float]] = []
    started: list[float] = []

    def work() -> None:
        gate.wait(10)

    def caller() -> None:
        barrier.wait()
        if not started:
            started.append(time.monotonic())
        try:
            bulkhead.call_sync(work)
            outcomes.append(("ran", time.monotonic() - started[0]))
        except BulkheadFullError as error:
            kind = "timed_out" if "timed out" in str(error) else "rejected"
            outcomes.append((kind, time.monotonic() - started[0]))

    threads = [threading.Thread(target=caller) for _ in range(RACERS)]
    for thread in threads:
        thread.start()
    _wait_until(lambda: len(outcomes) >= 90)
    gate.set()
    for thread in threads:
        thread.join(10)
    _check_burst(outcomes, max_wait=0.3)
    assert bulkhead.stats().active == 0


def test_thread_burst_queued_callers_run_when_slots_free_in_time() -> None:
    bulkhead = Bulkhead("db", 10, max_queue=20, max_wait=5.0)
    barrier, done = threading.Barrier(RACERS), []
    in_flight, peak, lock = [0], [0], threading.Lock()

    def work() -> None:
        with lock:
            in_flight[0] += 1
            peak[0] = max(peak[0], in_flight[0])
        _wait_until(lambda: done.count("rejected") >= 70)  # every caller has arrived
        time.sleep(0.01)
        with lock:
            in_flight[0] -= 1

    def caller() -> None:
        barrier.wait()
        try:
            bulkhead.call_sync(work)
            done.append("ran")
        except BulkheadFullError:
            done.append("rejected")

    threads = [threading.Thread(target=caller) for _ in range(RACERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert peak[0] <= 10
    assert done.count("rejected") == 70
    assert done.count("ran") == 30


class Interrupted(BaseException):
    """What a signal handler raises into a blocked thread (as KeyboardInterrupt does)."""


def test_a_sync_waiter_interrupted_in_the_queue_gives_its_slot_back() -> None:
    bulkhead = Bulkhead("db", 1, max_queue=1, max_wait=5.0)
    entered, release = threading.Event(), threading.Event()

    def hold() -> None:
        entered.set()
        release.wait(10)

    holder = threading.Thread(target=bulkhead.call_sync, args=(hold,))
    holder.start()
    assert entered.wait(10)

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise Interrupted

    previous = signal.signal(signal.SIGALRM, interrupt)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.2)
        with pytest.raises(Interrupted):
            bulkhead.call_sync(lambda: "never")  # queued behind the holder, then interrupted
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert bulkhead.stats().queued == 0  # the interrupted caller left the queue
    release.set()
    holder.join(10)
    stats = bulkhead.stats()
    assert (stats.active, stats.queued) == (0, 0)  # the holder's slot came back
    assert bulkhead.call_sync(lambda: "ok") == "ok"


def test_a_waiter_whose_event_loop_closed_does_not_take_the_slot_with_it() -> None:
    bulkhead = Bulkhead("db", 1, max_queue=1, max_wait=5.0)
    entered, release = threading.Event(), threading.Event()
    holder_saw: list[object] = []

    def hold() -> str:
        entered.set()
        release.wait(10)
        return "held"

    def holder() -> None:
        try:
            holder_saw.append(bulkhead.call_sync(hold))
        except BaseException as error:
            holder_saw.append(error)

    thread = threading.Thread(target=holder)
    thread.start()
    assert entered.wait(10)
    loop = asyncio.new_event_loop()

    async def queue_a_waiter() -> asyncio.Task[str]:
        task = asyncio.create_task(bulkhead.call(asyncio.sleep, 0, "never"))
        while bulkhead.stats().queued == 0:
            await asyncio.sleep(0)
        return task

    waiting = loop.run_until_complete(queue_a_waiter())
    loop.close()  # with its task still queued: nobody is left to take a slot there
    release.set()
    thread.join(10)
    assert holder_saw == ["held"]  # releasing the slot raised nothing into the holder
    assert bulkhead.call_sync(lambda: "ok") == "ok"  # the slot was passed on, not lost
    del waiting
    gc.collect()  # the dead waiter's coroutine is closed: it must not free a slot again
    stats = bulkhead.stats()
    assert (stats.active, stats.queued) == (0, 0)


def _check_burst(outcomes: list[tuple[str, float]], max_wait: float) -> None:
    kinds = [kind for kind, _ in outcomes]
    assert (kinds.count("ran"), kinds.count("timed_out"), kinds.count("rejected")) == (10, 20, 70)
    rejected_at = [t for kind, t in outcomes if kind == "rejected"]
    timed_out_at = [t for kind, t in outcomes if kind == "timed_out"]
    assert max(rejected_at) < max_wait  # rejected at once, not after waiting
    assert min(timed_out_at) >= max_wait * 0.95  # not before their deadline...
    assert max(timed_out_at) < max_wait + 1.0  # ...and not long after it


def _wait_until(condition: object, limit: float = 10.0) -> None:
    deadline = time.monotonic() + limit
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.005)


def test_state_events_reach_listeners_in_transition_order_across_threads() -> None:
    breaker = CircuitBreaker("racy", minimum_calls=1, window_calls=1, clock=ManualClock())
    alerting, reset_done, seen = threading.Event(), threading.Event(), []

    def slow_alert(*_: object) -> None:  # e.g. pages someone over HTTP
        alerting.set()
        reset_done.wait(10)

    breaker.on("open", slow_alert)
    for event in ("open", "close"):
        breaker.on(event, lambda *_, event=event: seen.append(event))

    def trips() -> None:
        with pytest.raises(ZeroDivisionError):
            breaker.call_sync(lambda: 1 / 0)

    tripping = threading.Thread(target=trips)
    tripping.start()
    assert alerting.wait(10)
    breaker.reset()  # an operator closes it while the open alert is still going out
    reset_done.set()
    tripping.join(10)
    assert seen == ["open", "close"]  # a dashboard ends on the state the breaker is in
    assert breaker.state is BreakerState.CLOSED


class _ReadThenStall(ManualClock):
    """Reads 0.0 for the first thread, which then stalls (as a thread preempted right
    after its reading would) while a second thread reads 5 ms and takes its token."""

    def __init__(self, second: threading.Thread) -> None:
        super().__init__()
        self.second, self.first_read = second, False

    def monotonic(self) -> float:
        if self.first_read:
            return 0.005
        self.first_read = True
        self.second.start()
        self.second.join(timeout=0.3)  # holding the limiter's lock, it cannot finish
        return 0.0


def test_a_rate_limiter_burst_is_admitted_whatever_order_racing_threads_read_the_clock() -> None:
    admitted: list[bool] = []
    second = threading.Thread(target=lambda: admitted.append(limiter.try_acquire()))
    limiter = RateLimiter(100.0, burst=2, clock=_ReadThenStall(second))
    admitted.append(limiter.try_acquire())  # reads 0.0, then the other thread reads 5 ms
    second.join()
    # Before: the first reading was judged after the later one's reservation, as if
    # time went back 5 ms, and one of the two calls of a burst of 2 from idle was refused.
    assert admitted == [True, True]
    assert limiter.stats().rejected_total == 0
