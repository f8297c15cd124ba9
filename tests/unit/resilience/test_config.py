"""Bad settings raise ConfigError naming the field, at construction."""

import math
from collections.abc import Callable
from typing import Any

import pytest

from seamwork.resilience import (
    Bulkhead,
    Bulkheads,
    CircuitBreaker,
    ConfigError,
    Fallback,
    Pipeline,
    RateLimiter,
    Retry,
    RetryBudget,
    RetryPolicy,
    Timeout,
)
from seamwork.testing import ManualClock

CASES: list[tuple[str, Callable[[], Any]]] = [
    ("failure_rate", lambda: CircuitBreaker("b", failure_rate=0.0)),
    ("failure_rate", lambda: CircuitBreaker("b", failure_rate=1.5)),
    ("failure_rate", lambda: CircuitBreaker("b", failure_rate=-0.1)),
    ("slow_call_rate", lambda: CircuitBreaker("b", slow_call_rate=2.0)),
    ("minimum_calls", lambda: CircuitBreaker("b", minimum_calls=0)),
    ("half_open_calls", lambda: CircuitBreaker("b", half_open_calls=0)),
    ("reset_timeout", lambda: CircuitBreaker("b", reset_timeout=-1.0)),
    ("reset_timeout", lambda: CircuitBreaker("b", reset_timeout=0)),
    ("window", lambda: CircuitBreaker("b", window=-5.0)),
    ("window_calls", lambda: CircuitBreaker("b", window_calls=0)),
    ("window_calls", lambda: CircuitBreaker("b", window_calls=5, minimum_calls=10)),
    ("window_calls", lambda: CircuitBreaker("b", window=10.0, window_calls=20)),
    ("slow_call", lambda: CircuitBreaker("b", slow_call=-1.0)),
    ("timeout", lambda: CircuitBreaker("b", timeout=-1.0)),
    ("max_reset_timeout", lambda: CircuitBreaker("b", reset_timeout=5, max_reset_timeout=1)),
    ("reset_timeout_multiplier", lambda: CircuitBreaker("b", reset_timeout_multiplier=0.5)),
    # NaN: the second opening's pause was NaN, and the circuit never probed again
    ("reset_timeout_multiplier", lambda: CircuitBreaker("b", reset_timeout_multiplier=math.nan)),
    ("reset_timeout_multiplier", lambda: CircuitBreaker("b", reset_timeout_multiplier="2")),  # type: ignore[arg-type]
    ("half_open_mode", lambda: CircuitBreaker("b", half_open_mode="maybe")),  # type: ignore[arg-type]
    ("exclude", lambda: CircuitBreaker("b", exclude=[KeyError])),  # type: ignore[arg-type]
    ("name", lambda: CircuitBreaker("")),
    # not callable: each call (or each failure) ran, then ended in a bare TypeError
    ("failure_if", lambda: CircuitBreaker("b", failure_if=True)),  # type: ignore[arg-type]
    ("fallback", lambda: CircuitBreaker("b", fallback="queued")),  # type: ignore[arg-type]
    ("max_concurrent", lambda: Bulkhead("p", 0)),
    ("max_queue", lambda: Bulkhead("p", 1, max_queue=-1)),
    ("max_wait", lambda: Bulkhead("p", 1, max_wait=-0.5)),
    ("limits", lambda: Bulkheads({})),
    ("max_concurrent", lambda: Bulkheads({"payments": 0})),
    ("rate", lambda: RateLimiter(0)),
    ("rate", lambda: RateLimiter(float("inf"))),
    ("burst", lambda: RateLimiter(1.0, burst=0)),
    ("name", lambda: RateLimiter(1.0, name="")),
    ("name", lambda: RateLimiter(1.0, name=None)),  # type: ignore[arg-type]
    ("max_wait", lambda: RateLimiter(1.0, max_wait=-1)),
    ("cost", lambda: RateLimiter(1.0, burst=2).try_acquire(3)),
    ("max_wait", lambda: RateLimiter(1.0).acquire_sync(max_wait=-1.0)),
    ("max_wait", lambda: RateLimiter(1.0).acquire_sync(max_wait=float("nan"))),
    ("max_wait", lambda: RateLimiter(1.0).acquire_sync(max_wait="1")),  # type: ignore[arg-type]
    ("Timeout.seconds", lambda: Timeout(0)),
    ("Timeout.seconds", lambda: Timeout(-3.0)),
    ("ratio", lambda: RetryBudget(0.0)),
    ("min_retries", lambda: RetryBudget(0.2, min_retries=-1)),
    ("window", lambda: RetryBudget(0.2, window=0)),
    ("max_attempts", lambda: Retry(0)),
    ("backoff", lambda: Retry(3, backoff=-1.0)),
    ("budget", lambda: Retry(3, budget=object())),  # type: ignore[arg-type]
    ("retry", lambda: RetryPolicy(3)),  # type: ignore[arg-type]
    ("policies", lambda: Pipeline()),
    ("policies", lambda: Pipeline(object())),  # type: ignore[arg-type]
    ("handler", lambda: Fallback(42)),  # type: ignore[arg-type]
]


@pytest.mark.parametrize(
    ("field", "build"), CASES, ids=[f"{f}-{i}" for i, (f, _) in enumerate(CASES)]
)
def test_bad_configuration_raises_config_error_naming_the_field(
    field: str, build: Callable[[], Any]
) -> None:
    with pytest.raises(ConfigError, match=field):
        build()


def test_config_error_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="failure_rate"):
        CircuitBreaker("b", failure_rate=2)


async def test_a_bad_max_wait_for_one_acquire_is_refused_and_takes_no_token() -> None:
    limiter = RateLimiter(1.0, clock=ManualClock())
    with pytest.raises(ConfigError, match="max_wait"):
        await limiter.acquire(max_wait=-1.0)
    with pytest.raises(ConfigError, match="max_wait"):
        await limiter.acquire(max_wait=float("nan"))
    stats = limiter.stats()
    assert (stats.admitted_total, stats.rejected_total) == (0, 0)
    assert limiter.try_acquire()  # the one token is still there


def test_a_ready_bulkhead_under_another_dependency_name_is_refused() -> None:
    # Its errors and its stats would name "catalog" while it guards "payments".
    with pytest.raises(ConfigError, match=r"limits\['payments'\] is a Bulkhead named 'catalog'"):
        Bulkheads({"payments": Bulkhead("catalog", 1)})
