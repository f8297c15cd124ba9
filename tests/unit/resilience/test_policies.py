"""Bulkhead, RateLimiter, RetryPolicy, Timeout, Fallback and Pipeline drivers."""

import asyncio
import functools
import inspect
import math
import random
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator

import pytest

from seamwork.resilience import (
    Bulkhead,
    BulkheadFullError,
    Bulkheads,
    CallTimeout,
    CircuitBreaker,
    CircuitOpenError,
    ConfigError,
    Fallback,
    Pipeline,
    Policy,
    RateLimitedError,
    RateLimiter,
    Retry,
    RetryBudget,
    RetryBudgetExhausted,
    RetryPolicy,
    Timeout,
)
from seamwork.testing import ManualClock


class Flaky:
    """Fails ``failures`` times, then returns ``"ok"``; counts attempts."""

    def __init__(self, failures: int) -> None:
        self.failures, self.attempts = failures, 0

    def __call__(self) -> str:
        self.attempts += 1
        if self.attempts <= self.failures:
            raise ConnectionError(f"attempt {self.attempts}")
        return "ok"

    async def run(self) -> str:
        return self()


async def test_bulkhead_burst_runs_queues_and_rejects_then_times_out_on_schedule() -> None:
    clock, gate = ManualClock(), asyncio.Event()
    bulkhead = Bulkhead("db", 10, max_queue=20, max_wait=1.0, clock=clock)
    ran: list[int] = []

    async def work(i: int) -> int:
        ran.append(i)
        await gate.wait()
        return i

    tasks = [asyncio.create_task(bulkhead.call(work, i)) for i in range(100)]
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    rejected = [t for t in tasks if t.done()]
    assert len(rejected) == 70
    assert len(ran) == 10
    assert bulkhead.stats().queued == 20
    clock.advance(0.999)
    await asyncio.sleep(0)
    assert bulkhead.stats().queued == 20
    clock.advance(0.001)
    await asyncio.sleep(0)
    gate.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    timed_out = [r for r in results if isinstance(r, BulkheadFullError) and "timed out" in str(r)]
    assert len(timed_out) == 20
    assert sorted(r for r in results if isinstance(r, int)) == list(range(10))
    assert bulkhead.stats().active == 0


async def test_bulkhead_hands_a_freed_slot_to_the_oldest_waiter() -> None:
    bulkhead, order = Bulkhead("db", 1, max_queue=3), []
    gate = asyncio.Event()

    async def work(i: int) -> None:
        order.append(i)
        await gate.wait()

    tasks = [asyncio.create_task(bulkhead.call(work, i)) for i in range(4)]
    await asyncio.sleep(0)
    gate.set()
    await asyncio.gather(*tasks)
    assert order == [0, 1, 2, 3]


def test_bulkhead_sync_driver_rejects_when_full() -> None:
    bulkhead = Bulkhead("db", 1)
    inner = []

    def nested() -> None:
        with pytest.raises(BulkheadFullError, match="queue is full"):
            bulkhead.call_sync(lambda: None)
        inner.append(True)

    bulkhead.call_sync(nested)
    assert inner == [True]
    assert bulkhead.stats().rejected_total == 1


def test_bulkhead_sync_caller_with_an_infinite_max_wait_waits_for_a_slot() -> None:
    # threading.Event.wait(inf) raises OverflowError: a queued plain caller failed
    # at once instead of waiting, where an async one waited as told.
    bulkhead, outcome = Bulkhead("db", 1, max_queue=1, max_wait=math.inf), []

    def wait_in_line() -> None:
        try:
            outcome.append(bulkhead.call_sync(lambda: "ran"))
        except Exception as error:
            outcome.append(error)

    waiter = threading.Thread(target=wait_in_line)

    def hold() -> None:
        waiter.start()
        deadline = time.monotonic() + 5.0
        while not outcome and bulkhead.stats().queued == 0 and time.monotonic() < deadline:
            time.sleep(0.001)

    bulkhead.call_sync(hold)
    waiter.join(5.0)
    assert outcome == ["ran"]
    assert bulkhead.stats().active == 0


def test_bulkheads_give_one_pool_per_dependency() -> None:
    pools = Bulkheads({"payments": 10, "catalog": 20, "notifications": 5}, max_queue=2)
    assert {name: pools[name].stats().max_concurrent for name in pools} == {
        "payments": 10,
        "catalog": 20,
        "notifications": 5,
    }
    assert pools["catalog"].stats().max_queue == 2
    assert pools["payments"] is not pools["catalog"]


def test_bulkheads_take_a_ready_bulkhead_under_its_own_name() -> None:
    payments = Bulkhead("payments", 3, max_queue=1)
    pools = Bulkheads({"payments": payments, "catalog": 20})
    assert pools["payments"] is payments
    assert {name: stats.name for name, stats in pools.stats().items()} == {
        "payments": "payments",
        "catalog": "catalog",
    }


async def test_rate_limiter_rejects_over_the_rate_and_refills() -> None:
    clock = ManualClock()
    limiter = RateLimiter(2.0, burst=2, clock=clock)
    assert await limiter.call(asyncio.sleep, 0, "a") == "a"
    assert limiter.try_acquire()
    with pytest.raises(RateLimitedError):
        await limiter.call(asyncio.sleep, 0)
    clock.advance(0.5)
    assert limiter.call_sync(lambda: 1) == 1
    assert limiter.stats().rejected_total == 1


async def test_rate_limiter_acquire_waits_its_turn_on_the_clock() -> None:
    clock = ManualClock(auto_advance=True)
    limiter = RateLimiter(10.0, burst=1, clock=clock, max_wait=1.0)
    for _ in range(5):
        await limiter.acquire()
    assert clock.monotonic() == pytest.approx(0.4)
    with pytest.raises(RateLimitedError):
        await limiter.acquire(max_wait=0.0)


async def test_a_waiter_cancelled_while_it_sleeps_gives_its_place_back() -> None:
    clock = ManualClock()
    limiter = RateLimiter(1.0, burst=1, max_wait=5.0, clock=clock)
    await limiter.acquire()  # the burst
    waiter = asyncio.create_task(limiter.acquire())  # reserves the token due in 1 s
    await asyncio.sleep(0)
    assert not limiter.try_acquire()
    waiter.cancel()
    await asyncio.gather(waiter, return_exceptions=True)
    clock.advance(1.0)
    assert limiter.try_acquire()  # the cancelled waiter's token was handed back
    assert limiter.stats().admitted_total == 2


async def test_a_cancelled_waiter_behind_others_keeps_their_places() -> None:
    clock = ManualClock()
    limiter = RateLimiter(1.0, burst=1, max_wait=5.0, clock=clock)
    await limiter.acquire()
    first = asyncio.create_task(limiter.acquire())  # due at +1 s
    second = asyncio.create_task(limiter.acquire())  # due at +2 s
    await asyncio.sleep(0)
    first.cancel()
    await asyncio.gather(first, return_exceptions=True)
    clock.advance(2.0)
    await second  # still served when it was promised
    assert not limiter.try_acquire()  # the place the first gave up stays spent


async def test_retry_retries_with_capped_backoff_on_the_clock() -> None:
    clock, flaky = ManualClock(auto_advance=True), Flaky(2)
    policy = RetryPolicy(Retry(3, backoff=1.0, max_backoff=1.5, jitter="none"), clock=clock)
    assert await policy.call(flaky.run) == "ok"
    assert flaky.attempts == 3
    assert clock.monotonic() == pytest.approx(1.0 + 1.5)


def test_retry_gives_up_after_max_attempts_with_the_last_error() -> None:
    clock, flaky = ManualClock(auto_advance=True), Flaky(5)
    policy = RetryPolicy(Retry(3, backoff=0.0, max_backoff=0.0), clock=clock)
    with pytest.raises(ConnectionError, match="attempt 3"):
        policy.call_sync(flaky)


def test_retry_does_not_retry_errors_outside_retry_on() -> None:
    flaky = Flaky(1)
    policy = RetryPolicy(Retry(3, retry_on=(KeyError,)), clock=ManualClock(auto_advance=True))
    with pytest.raises(ConnectionError):
        policy.call_sync(flaky)
    assert flaky.attempts == 1


def test_retry_budget_refuses_retries_once_spent() -> None:
    clock = ManualClock(auto_advance=True)
    budget = RetryBudget(0.5, min_retries=0, clock=clock)
    policy = RetryPolicy(Retry(2, backoff=0.0, max_backoff=0.0, budget=budget), clock=clock)
    outcomes = []
    for _ in range(4):
        try:
            policy.call_sync(Flaky(10))
        except RetryBudgetExhausted as error:
            outcomes.append(f"refused after {type(error.__cause__).__name__}")
        except ConnectionError:
            outcomes.append("retried")
    refused = "refused after ConnectionError"
    assert outcomes == [refused, "retried", refused, "retried"]
    assert budget.counts() == (4, 2)


def test_retry_stays_backward_compatible() -> None:
    retry = Retry(3)
    assert (retry.max_attempts, retry.backoff, retry.max_backoff, retry.jitter) == (
        3,
        0.1,
        10.0,
        "full",
    )
    assert retry.budget is None
    assert retry.should_retry(1, ValueError())
    assert not retry.should_retry(3, ValueError())
    assert 0.0 <= retry.delay(2, random.Random(1)) <= 0.2


async def test_timeout_cancels_async_calls_and_leaves_their_own_timeouts_alone() -> None:
    clock = ManualClock()
    timeout = Timeout(1.0, clock=clock)
    task = asyncio.create_task(timeout.call(asyncio.sleep, 3600))
    await asyncio.sleep(0)
    clock.advance(1.0)
    with pytest.raises(CallTimeout):
        await task

    async def own_timeout() -> None:
        raise TimeoutError("upstream said so")

    with pytest.raises(TimeoutError, match="upstream") as info:
        await timeout.call(own_timeout)
    assert not isinstance(info.value, CallTimeout)


def test_timeout_sync_lets_the_call_finish_then_reports_the_overrun() -> None:
    clock, done = ManualClock(), []
    timeout = Timeout(1.0, clock=clock)

    def slow() -> None:
        clock.advance(2.0)
        done.append(True)

    with pytest.raises(CallTimeout):
        timeout.call_sync(slow)
    assert done == [True]
    assert timeout.call_sync(lambda: 3) == 3


async def test_fallback_covers_only_its_error_types() -> None:
    fallback = Fallback(lambda error: f"cached after {type(error).__name__}", on=(KeyError,))

    async def missing() -> str:
        raise KeyError

    assert await fallback.call(missing) == "cached after KeyError"
    with pytest.raises(ValueError, match="x"):
        fallback.call_sync(lambda: (_ for _ in ()).throw(ValueError("x")))


async def test_pipeline_applies_policies_outermost_first_and_retries_through_them() -> None:
    clock = ManualClock(auto_advance=True)
    breaker = CircuitBreaker("p", minimum_calls=10, clock=clock)
    bulkhead = Bulkhead("p", 2, clock=clock)
    policy = Pipeline(
        Timeout(3.0, clock=clock),
        Retry(3, backoff=0.1, max_backoff=2.0, jitter="full"),
        breaker,
        bulkhead,
        clock=clock,
        rng=random.Random(7),
    )
    flaky = Flaky(2)
    assert await policy.call(flaky.run) == "ok"
    assert breaker.stats().failures_total == 2
    assert breaker.stats().successes_total == 1
    assert bulkhead.stats().admitted_total == 3
    assert policy.call_sync(Flaky(1)) == "ok"


async def test_pipeline_with_an_outer_fallback_answers_an_open_circuit() -> None:
    breaker = CircuitBreaker("p", minimum_calls=1, window_calls=1, clock=ManualClock())
    breaker.isolate()
    policy = Pipeline(Fallback(lambda error: "queued"), breaker)

    @policy
    async def charge(order: int) -> str:
        return "charged"

    assert await charge(1) == "queued"
    with pytest.raises(CircuitOpenError):
        await Pipeline(breaker).call(charge.__wrapped__, 1)  # type: ignore[attr-defined]


class AsyncCharge:
    """A callable object whose ``__call__`` is a coroutine function; always fails."""

    def __init__(self) -> None:
        self.attempts = 0

    async def __call__(self, order: int) -> str:
        self.attempts += 1
        raise ConnectionError(f"order {order}")


async def test_decorating_an_object_with_an_async_call_uses_the_async_driver() -> None:
    clock = ManualClock(auto_advance=True)
    for partial in (False, True):
        breaker = CircuitBreaker("p", minimum_calls=1, window_calls=1, clock=clock)
        policy = Pipeline(Retry(3, backoff=0.0, max_backoff=0.0), breaker, clock=clock)
        charge = AsyncCharge()
        decorated = policy(functools.partial(charge, order=7) if partial else charge)
        assert inspect.iscoroutinefunction(decorated)
        with pytest.raises(CircuitOpenError):  # the failure counted; the retry met the circuit
            await decorated(order=7)
        assert charge.attempts == 1
        assert breaker.stats().failures_total == 1


async def test_decorating_an_object_with_an_async_call_holds_the_slot_while_it_runs() -> None:
    gate, bulkhead = asyncio.Event(), Bulkhead("db", 1)

    class Query:
        async def __call__(self) -> str:
            await gate.wait()
            return "rows"

    query = bulkhead(Query())
    running = asyncio.create_task(query())
    await asyncio.sleep(0)
    assert bulkhead.stats().active == 1
    with pytest.raises(BulkheadFullError):
        await query()
    gate.set()
    assert await running == "rows"
    assert bulkhead.stats().active == 0


def rows() -> Iterator[int]:
    yield 1


async def arows() -> AsyncIterator[int]:
    yield 1


class Rows:
    def __call__(self) -> Iterator[int]:
        yield 1


@pytest.mark.parametrize(
    "generator",
    [rows, arows, functools.partial(rows), Rows()],
    ids=["sync", "async", "partial", "object"],
)
def test_decorating_a_generator_function_is_refused(generator: Callable[[], object]) -> None:
    # Calling it only makes the generator: every policy would be done before its body runs.
    for policy in (
        CircuitBreaker("p", clock=ManualClock()),
        Bulkhead("db", 1),
        Pipeline(Retry(3), Timeout(1.0)),
    ):
        with pytest.raises(ConfigError, match="generator"):
            policy(generator)


async def _queued(error: BaseException) -> str:
    return "queued"


def _fails() -> str:
    raise ValueError("down")


@pytest.mark.parametrize(
    "policy",
    [
        pytest.param(Fallback(_queued), id="Fallback"),
        pytest.param(CircuitBreaker("p", fallback=_queued, clock=ManualClock()), id="breaker"),
        pytest.param(Pipeline(Fallback(_queued), RateLimiter(1.0)), id="pipeline"),
    ],
)
def test_an_async_fallback_is_refused_by_the_sync_driver(policy: Policy) -> None:
    # Before: call_sync returned the un-awaited coroutine object as the call's result.
    with pytest.raises(ConfigError, match="call_sync cannot await") as raised:
        policy.call_sync(_fails)
    assert isinstance(raised.value.__cause__, ValueError)
    with pytest.raises(ConfigError, match="async"):
        policy(_fails)


def test_an_async_fallback_is_refused_when_a_sync_call_is_rejected() -> None:
    breaker = CircuitBreaker("p", fallback=_queued, clock=ManualClock())
    breaker.isolate()
    with pytest.raises(ConfigError, match="call_sync cannot await") as raised:
        breaker.call_sync(lambda: "charged")
    assert isinstance(raised.value.__cause__, CircuitOpenError)


async def test_an_async_fallback_still_answers_async_calls() -> None:
    breaker = CircuitBreaker("p", fallback=_queued, clock=ManualClock())

    @Pipeline(Fallback(_queued), breaker)
    async def charge() -> str:
        raise ValueError("down")

    assert await charge() == "queued"
    breaker.isolate()
    assert await breaker.call(charge.__wrapped__) == "queued"  # type: ignore[attr-defined]


async def test_rate_limiter_stats_never_report_fewer_than_zero_tokens() -> None:
    clock = ManualClock()
    limiter = RateLimiter(1.0, burst=2, max_wait=5.0, clock=clock)
    assert limiter.stats().available == 2.0
    await limiter.acquire(2)  # the burst
    waiters = [asyncio.create_task(limiter.acquire()) for _ in range(3)]  # due at 1, 2, 3 s
    await asyncio.sleep(0)
    # Before: -3.0 - the tokens promised to the waiters counted as a debt in the bucket.
    assert limiter.stats().available == 0.0
    clock.advance(3.0)
    await asyncio.gather(*waiters)
    assert limiter.stats().available == 0.0
    clock.advance(1.5)
    assert limiter.stats().available == pytest.approx(1.5)
