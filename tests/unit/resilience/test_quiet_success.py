"""The quiet (lock-free) success path decides exactly as the locked one would."""

from __future__ import annotations

import pytest

from seamwork.resilience import BreakerState, CircuitBreaker
from seamwork.resilience._breaker_machine import BreakerConfig, BreakerMachine
from seamwork.testing import ManualClock


def ok() -> str:
    return "ok"


def fail() -> None:
    raise ConnectionError("down")


def attempt(breaker: CircuitBreaker) -> None:
    with pytest.raises(ConnectionError):
        breaker.call_sync(fail)


def test_successes_are_ticked_without_the_lock_once_minimum_calls_are_in() -> None:
    clock = ManualClock()
    breaker = CircuitBreaker("q", minimum_calls=3, window=10.0, clock=clock)
    for _ in range(3):
        breaker.call_sync(ok)
    machine = breaker._machine
    assert machine.quiet_until > clock.monotonic()
    breaker.call_sync(ok)
    assert machine.window.calls == 3, "the fourth success was ticked, not recorded"
    assert breaker.stats().window_calls == 4
    assert breaker.stats().successes_total == 4


def test_a_success_after_a_slice_eviction_trips_as_the_locked_path_would() -> None:
    clock = ManualClock(start=0.0)
    breaker = CircuitBreaker("q", minimum_calls=4, window=10.0, window_buckets=10, clock=clock)
    for _ in range(6):
        breaker.call_sync(ok)  # the last two are ticked quietly
    clock.advance(5.0)
    for _ in range(3):
        attempt(breaker)  # 3 / 9 failed: under the rate
    assert breaker.state is BreakerState.CLOSED
    clock.advance(5.5)  # the slice with the six successes falls out: 3 calls, all failed
    breaker.call_sync(ok)  # 3 / 4 failed with minimum_calls met
    assert breaker.state is BreakerState.OPEN


def test_listeners_slow_calls_and_result_predicates_keep_the_full_path() -> None:
    clock = ManualClock()
    seen: list[object] = []
    breaker = CircuitBreaker("q", minimum_calls=1, window=10.0, clock=clock)
    breaker.call_sync(ok)
    breaker.on("success", lambda *args: seen.append(args[1]))
    breaker.call_sync(ok)
    assert seen == ["ok"]
    slow = CircuitBreaker("s", minimum_calls=1, window=10.0, slow_call=1.0, clock=clock)
    assert not slow._lean
    judged = CircuitBreaker("j", minimum_calls=1, window=10.0, failure_if=bool, clock=clock)
    assert not judged._lean


def test_a_stale_tick_lands_on_a_retired_tally_and_changes_nothing() -> None:
    machine = BreakerMachine(BreakerConfig(minimum_calls=1, window=10.0, reset_timeout=1.0))
    machine.on_success(machine.acquire(0.0), 0.0, 0.0)
    old_tally, old_generation = machine.tally, machine.generation
    machine.isolate(0.0)
    machine.reset(0.0)
    assert machine.generation != old_generation
    assert machine.tally is not old_tally
    next(old_tally)  # a caller admitted before the isolation ticks late
    machine.fold()
    assert machine.window.calls == 0
    assert machine.successes == 1


def test_a_count_window_is_never_quiet() -> None:
    machine = BreakerMachine(BreakerConfig(minimum_calls=1, window_calls=5))
    for _ in range(5):
        machine.on_success(machine.acquire(0.0), 0.0, 0.0)
    assert machine.quiet_until == float("-inf")
