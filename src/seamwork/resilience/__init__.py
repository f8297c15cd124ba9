"""Resilience primitives: circuit breaker, bulkhead, retry, timeout, rate limiter.

Each pattern is a pure decision core (no I/O, an injected ``Clock``) with two thin
drivers: ``await policy.call(fn, ...)`` for coroutine functions and
``policy.call_sync(fn, ...)`` for plain ones; every policy is also a decorator that
keeps the wrapped function's signature. ``Pipeline`` composes them outermost first.
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
from seamwork.resilience._budget import RetryBudget
from seamwork.resilience._bulkhead import Bulkhead, Bulkheads, BulkheadStats
from seamwork.resilience._fallback import Fallback
from seamwork.resilience._pipeline import Pipeline
from seamwork.resilience._policy import Policy
from seamwork.resilience._ratelimit import RateLimiter, RateLimiterStats
from seamwork.resilience._retry import RetryPolicy
from seamwork.resilience._timeout import Timeout

__all__ = [
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
