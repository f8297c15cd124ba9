"""Resilience primitives (circuit breaker, bulkhead, retry, timeout, rate limiter)."""
