"""Resilience primitives: circuit breaker, bulkhead, retry, timeout, rate limiter.

Each pattern is a pure decision core (no I/O, an injected ``Clock``) with two thin
drivers: ``await policy.call(fn, ...)`` for coroutine functions and
``policy.call_sync(fn, ...)`` for plain ones; every policy is also a decorator.
"""

from seamwork._core.retry import Retry
from seamwork.errors import (
    BulkheadFullError,
    CallTimeout,
    CircuitOpenError,
    ConfigError,
    RateLimitedError,
    ResilienceError,
    RetryBudgetExhausted,
)
from seamwork.resilience._breaker import BreakerStats, CircuitBreaker
from seamwork.resilience._breaker_machine import BreakerState
from seamwork.resilience._policy import Policy
from seamwork.resilience._timeout import Timeout

__all__ = [
    "BreakerState",
    "BreakerStats",
    "BulkheadFullError",
    "CallTimeout",
    "CircuitBreaker",
    "CircuitOpenError",
    "ConfigError",
    "Policy",
    "RateLimitedError",
    "ResilienceError",
    "Retry",
    "RetryBudgetExhausted",
    "Timeout",
]
