"""The public surface of seamwork.resilience is pinned."""

import seamwork.resilience as resilience
from seamwork._core.retry import Retry as CoreRetry
from seamwork.errors import CircuitOpenError as RootCircuitOpenError

EXPECTED = [
    "BreakerState",
    "BreakerStats",
    "Bulkhead",
    "BulkheadFullError",
    "BulkheadStats",
    "Bulkheads",
    "CallTimeout",
    "CircuitBreaker",
    "CircuitOpenError",
    "ConfigError",
    "Fallback",
    "Pipeline",
    "Policy",
    "RateLimitedError",
    "RateLimiter",
    "RateLimiterStats",
    "ResilienceError",
    "Retry",
    "RetryBudget",
    "RetryBudgetExhausted",
    "RetryPolicy",
    "Timeout",
]


def test_exports_are_pinned_and_sorted() -> None:
    assert resilience.__all__ == EXPECTED
    assert sorted(resilience.__all__) == resilience.__all__


def test_every_export_exists() -> None:
    for name in resilience.__all__:
        assert getattr(resilience, name) is not None, name


def test_retry_is_the_core_class_shared_with_sagas() -> None:
    assert resilience.Retry is CoreRetry


def test_errors_are_the_ones_from_the_error_tree() -> None:
    assert resilience.CircuitOpenError is RootCircuitOpenError
    assert issubclass(resilience.CallTimeout, TimeoutError)
