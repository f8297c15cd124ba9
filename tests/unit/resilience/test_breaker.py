"""CircuitBreaker drivers (async and sync) under a manual clock."""

import asyncio
import inspect

import pytest

from seamwork.resilience import (
    BreakerState,
    CallTimeout,
    CircuitBreaker,
    CircuitOpenError,
)
from seamwork.testing import ManualClock


class Boom(Exception):
    pass


class NotFound(Exception):
    pass


def boom() -> None:
    raise Boom


async def aboom() -> None:
    raise Boom


def ok(value: int = 1) -> int:
    return value


async def aok(value: int = 1) -> int:
    return value


def make(clock: ManualClock, **options: object) -> CircuitBreaker:
    settings: dict[str, object] = {"minimum_calls": 2, "window_calls": 4, "reset_timeout": 30.0}
    settings.update(options)
    return CircuitBreaker("payments", clock=clock, **settings)  # type: ignore[arg-type]


def trip(breaker: CircuitBreaker) -> None:
    while breaker.state is BreakerState.CLOSED:
        with pytest.raises(Boom):
            breaker.call_sync(boom)


async def test_thirty_second_reset_timeout_runs_on_the_manual_clock() -> None:
    clock = ManualClock()
    breaker = make(clock)
    trip(breaker)
    with pytest.raises(CircuitOpenError, match="payments"):
        await breaker.call(aok)
    clock.advance(30.0)
    assert breaker.state is BreakerState.HALF_OPEN
    assert await breaker.call(aok, 7) == 7
    assert breaker.state is BreakerState.CLOSED


def test_state_events_fire_in_order_with_the_previous_state() -> None:
    clock, seen = ManualClock(), []
    breaker = make(clock)
    for event in ("open", "half_open", "close", "reject"):
        breaker.on(event, lambda b, detail, event=event: seen.append((event, detail)))
    trip(breaker)
    with pytest.raises(CircuitOpenError):
        breaker.call_sync(ok)
    clock.advance(30.0)
    breaker.call_sync(ok)
    names = [name for name, _ in seen]
    assert names == ["open", "reject", "half_open", "close"]
    assert seen[0][1] is BreakerState.CLOSED
    assert seen[3][1] is BreakerState.HALF_OPEN


def test_a_hook_that_moves_the_breaker_does_not_overtake_the_event_it_answers() -> None:
    clock, seen = ManualClock(), []
    breaker = make(clock, minimum_calls=1, window_calls=1)
    breaker.on("open", lambda b, _: b.reset())  # an auto-heal hook, registered first
    for event in ("open", "close"):
        breaker.on(event, lambda b, _, event=event: seen.append((event, b.state)))
    with pytest.raises(Boom):
        breaker.call_sync(boom)
    assert seen == [("open", BreakerState.CLOSED), ("close", BreakerState.CLOSED)]


async def test_a_listener_subscribed_mid_call_hears_no_made_up_duration() -> None:
    clock, gate, seen = ManualClock(), asyncio.Event(), []
    clock.advance(1000.0)
    breaker = make(clock)

    async def query() -> int:
        await gate.wait()
        return 1

    running = asyncio.create_task(breaker.call(query))  # not timed: nobody listens yet
    await asyncio.sleep(0)
    breaker.on("success", lambda b, result, seconds: seen.append(seconds))
    clock.advance(2.0)
    gate.set()
    assert await running == 1
    gate.clear()
    later = asyncio.create_task(breaker.call(query))
    await asyncio.sleep(0)
    clock.advance(3.0)
    gate.set()
    await later
    assert seen == [3.0]  # not 1002.0, the clock's whole reading, for the first call


def test_excluded_errors_never_open_the_circuit() -> None:
    breaker = make(ManualClock(), exclude=(NotFound,))

    def missing() -> None:
        raise NotFound

    for _ in range(20):
        with pytest.raises(NotFound):
            breaker.call_sync(missing)
    assert breaker.state is BreakerState.CLOSED
    assert breaker.stats().ignored_total == 20


def test_result_predicate_counts_a_failure_but_returns_the_value() -> None:
    breaker = make(ManualClock(), failure_if=lambda r: r is None)
    assert breaker.call_sync(lambda: None) is None
    assert breaker.call_sync(lambda: None) is None
    assert breaker.state is BreakerState.OPEN


async def test_fallback_answers_failures_and_rejections_but_not_excluded_errors() -> None:
    got: list[type] = []

    def fallback(error: BaseException) -> str:
        got.append(type(error))
        return "queued"

    breaker = make(ManualClock(), fallback=fallback, exclude=(NotFound,))
    assert await breaker.call(aboom) == "queued"
    assert breaker.call_sync(boom) == "queued"
    assert await breaker.call(aok) == "queued"  # open now: rejected
    assert got == [Boom, Boom, CircuitOpenError]

    async def missing() -> None:
        raise NotFound

    breaker.reset()
    with pytest.raises(NotFound):
        await breaker.call(missing)


async def test_async_fallback_is_awaited() -> None:
    async def fallback(error: BaseException) -> str:
        return "later"

    breaker = make(ManualClock(), fallback=fallback)
    assert await breaker.call(aboom) == "later"


async def test_timeout_cancels_the_call_and_counts_a_failure() -> None:
    clock, cancelled = ManualClock(), []
    breaker = make(clock, timeout=2.0, minimum_calls=1, window_calls=1)
    timeouts: list[object] = []
    breaker.on("timeout", lambda b, error: timeouts.append(error))

    async def hang() -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.append(True)
            raise

    task = asyncio.create_task(breaker.call(hang))
    await asyncio.sleep(0)
    clock.advance(1.9)
    await asyncio.sleep(0)
    assert not task.done()
    clock.advance(0.1)
    with pytest.raises(CallTimeout):
        await task
    assert cancelled == [True]
    assert len(timeouts) == 1
    assert breaker.state is BreakerState.OPEN


def test_sync_overrun_raises_call_timeout_after_the_call_returns() -> None:
    clock = ManualClock()
    breaker = make(clock, timeout=1.0)

    def slow() -> int:
        clock.advance(1.5)
        return 1

    with pytest.raises(CallTimeout, match="not interrupted"):
        breaker.call_sync(slow)
    assert breaker.stats().failures_total == 1


def test_slow_calls_trip_the_circuit_at_the_slow_call_rate() -> None:
    clock = ManualClock()
    breaker = make(clock, slow_call=1.0, slow_call_rate=0.5, window_calls=4, minimum_calls=4)
    slow_events: list[float] = []
    breaker.on("slow", lambda b, seconds: slow_events.append(seconds))

    def crawl() -> int:
        clock.advance(1.0)
        return 1

    breaker.call_sync(ok)
    breaker.call_sync(ok)
    breaker.call_sync(crawl)
    assert breaker.state is BreakerState.CLOSED
    breaker.call_sync(crawl)
    assert breaker.state is BreakerState.OPEN
    assert slow_events == [1.0, 1.0]


def test_time_window_forgets_failures_older_than_the_window() -> None:
    clock = ManualClock()
    breaker = CircuitBreaker("w", minimum_calls=3, window=10.0, clock=clock)
    for _ in range(2):
        with pytest.raises(Boom):
            breaker.call_sync(boom)
    clock.advance(11.0)
    with pytest.raises(Boom):
        breaker.call_sync(boom)
    assert breaker.state is BreakerState.CLOSED
    assert breaker.stats().window_calls == 1


def test_operators_isolate_disable_and_reset() -> None:
    breaker = make(ManualClock())
    breaker.isolate()
    with pytest.raises(CircuitOpenError, match="forced_open"):
        breaker.call_sync(ok)
    breaker.disable()
    for _ in range(10):
        with pytest.raises(Boom):
            breaker.call_sync(boom)
    assert breaker.state is BreakerState.DISABLED
    breaker.reset()
    assert breaker.state is BreakerState.CLOSED
    assert breaker.stats().window_calls == 0


def test_each_rejection_raises_a_fresh_exception() -> None:
    breaker = make(ManualClock())
    breaker.isolate()
    errors = []
    for _ in range(3):
        with pytest.raises(CircuitOpenError) as info:
            breaker.call_sync(ok)
        errors.append(info.value)
    assert len({id(e) for e in errors}) == 3
    assert breaker.stats().rejections_total == 3


async def test_a_cancelled_probe_returns_its_permit() -> None:
    clock = ManualClock()
    breaker = make(clock)
    trip(breaker)
    clock.advance(30.0)
    task = asyncio.create_task(breaker.call(asyncio.sleep, 3600))
    await asyncio.sleep(0)
    with pytest.raises(CircuitOpenError):
        await breaker.call(aok)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await breaker.call(aok, 5) == 5
    assert breaker.state is BreakerState.CLOSED


async def test_wait_mode_parks_callers_until_the_probe_verdict() -> None:
    clock = ManualClock()
    breaker = make(clock, half_open_mode="wait")
    trip(breaker)
    clock.advance(30.0)
    gate, reached = asyncio.Event(), []

    async def probe(i: int) -> int:
        reached.append(i)
        await gate.wait()
        return i

    tasks = [asyncio.create_task(breaker.call(probe, i)) for i in range(10)]
    await asyncio.sleep(0.01)
    assert reached == [0]
    gate.set()
    assert await asyncio.gather(*tasks) == list(range(10))
    assert breaker.state is BreakerState.CLOSED


async def test_wait_mode_rejects_parked_callers_when_the_probe_fails() -> None:
    clock = ManualClock()
    breaker = make(clock, half_open_mode="wait")
    trip(breaker)
    clock.advance(30.0)
    gate = asyncio.Event()

    async def failing_probe() -> None:
        await gate.wait()
        raise Boom

    first = asyncio.create_task(breaker.call(failing_probe))
    parked = [asyncio.create_task(breaker.call(aok)) for _ in range(5)]
    await asyncio.sleep(0.01)
    gate.set()
    with pytest.raises(Boom):
        await first
    results = await asyncio.gather(*parked, return_exceptions=True)
    assert all(isinstance(r, CircuitOpenError) for r in results)


async def test_decorator_keeps_the_signature_and_exposes_the_breaker() -> None:
    breaker = make(ManualClock())

    @breaker
    async def charge(order_id: int, *, amount: float = 1.0) -> str:
        """Charge a card."""
        return f"{order_id}:{amount}"

    @breaker
    def read(key: str) -> str:
        return key.upper()

    assert inspect.iscoroutinefunction(charge)
    assert not inspect.iscoroutinefunction(read)
    assert str(inspect.signature(charge)) == "(order_id: int, *, amount: float = 1.0) -> str"
    assert charge.__doc__ == "Charge a card."
    assert charge.policy is breaker  # type: ignore[attr-defined]
    assert await charge(3, amount=2.0) == "3:2.0"
    assert read("k") == "K"
    assert breaker.stats().successes_total == 2


def test_a_failing_hook_is_logged_and_ignored(caplog: pytest.LogCaptureFixture) -> None:
    breaker = make(ManualClock())
    breaker.on("open", lambda *_: 1 / 0)
    trip(breaker)
    assert breaker.state is BreakerState.OPEN
    assert "ignored" in caplog.text


async def test_a_failing_result_predicate_returns_the_half_open_permit() -> None:
    clock = ManualClock()

    def judge(result: object) -> bool:
        if result == "unjudgeable":
            raise ValueError("cannot judge")
        return result is None

    async def unjudgeable() -> str:
        return "unjudgeable"

    for driver in ("sync", "async"):
        breaker = make(clock, failure_if=judge, half_open_mode="wait")
        while breaker.state is BreakerState.CLOSED:
            breaker.call_sync(lambda: None)
        clock.advance(30.0)
        probe = (
            breaker.call(unjudgeable)
            if driver == "async"
            else asyncio.to_thread(breaker.call_sync, lambda: "unjudgeable")
        )
        with pytest.raises(ValueError, match="cannot judge"):
            await probe
        # The probe's permit came back: the next caller probes instead of being
        # rejected (or parked) forever in HALF_OPEN.
        assert breaker.state is BreakerState.HALF_OPEN
        assert await asyncio.wait_for(breaker.call(aok, 3), 1.0) == 3
        assert breaker.state is BreakerState.CLOSED
        assert breaker.stats().ignored_total == 1


async def test_wait_mode_callers_cancelled_while_parked_leave_the_waiters() -> None:
    clock = ManualClock()
    breaker = make(clock, half_open_mode="wait")
    trip(breaker)
    clock.advance(30.0)
    hang = asyncio.Event()
    probe = asyncio.create_task(breaker.call(hang.wait))  # a probe that never ends
    await asyncio.sleep(0)
    for _ in range(50):  # callers giving up on the wait, as a Timeout would make them
        parked = asyncio.create_task(breaker.call(aok))
        await asyncio.sleep(0)
        parked.cancel()
        await asyncio.gather(parked, return_exceptions=True)
    # Before: all 50 stayed parked (each future and its loop) until a state change.
    assert len(breaker._async_waiters) == 0
    hang.set()
    await probe
    assert breaker.state is BreakerState.CLOSED
