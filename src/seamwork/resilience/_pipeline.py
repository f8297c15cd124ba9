"""Pipeline: compose policies, outermost first.

``Pipeline(Timeout(3), Retry(3), breaker, bulkhead)`` runs a call as
``timeout(retry(breaker(bulkhead(fn))))``: the timeout bounds every attempt together,
each retry passes the breaker and the bulkhead again. Composition allocates nothing
per call: the outer policy receives the next policy's ``call`` as its function and
the rest of the chain as leading arguments, so each layer is exactly one frame.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable
from typing import Any, ParamSpec, TypeVar

from seamwork._core.clock import Clock
from seamwork._core.retry import Retry
from seamwork.errors import ConfigError
from seamwork.resilience._policy import Policy, _Decorated
from seamwork.resilience._retry import RetryPolicy

P = ParamSpec("P")
R = TypeVar("R")


class Pipeline(Policy):
    """Policies applied outermost first; itself a policy (and a decorator).

    Args:
        policies: ``Policy`` objects, or ``Retry`` schedules (driven by a
            ``RetryPolicy`` with this pipeline's ``clock`` and ``rng``).
        clock: time source for retries built here; ``SystemClock()`` by default.
        rng: random source for their jitter.
    """

    __slots__ = ("_head", "_head_sync", "_tail", "_tail_sync", "policies")

    def __init__(
        self,
        *policies: Policy | Retry,
        clock: Clock | None = None,
        rng: random.Random | None = None,
    ) -> None:
        if not policies:
            raise ConfigError("policies: a Pipeline needs at least one policy")
        self.policies = tuple(_as_policy(p, clock, rng) for p in policies)
        calls: list[Any] = [p.call for p in self.policies]
        sync_calls: list[Any] = [p.call_sync for p in self.policies]
        self._head, self._tail = calls[0], tuple(calls[1:])
        self._head_sync, self._tail_sync = sync_calls[0], tuple(sync_calls[1:])

    async def call(self, fn: Callable[P, Awaitable[R]], /, *args: P.args, **kwargs: P.kwargs) -> R:
        return await self._head(*self._tail, fn, *args, **kwargs)  # type: ignore[no-any-return]

    def call_sync(self, fn: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> R:
        return self._head_sync(*self._tail_sync, fn, *args, **kwargs)  # type: ignore[no-any-return]

    def _check_sync_driver(self, fn: Callable[..., Any]) -> None:
        for policy in self.policies:
            policy._check_sync_driver(fn)

    def _bind(self, fn: Callable[..., Any], is_async: bool) -> _Decorated:
        # The decorated function enters the outermost policy directly (one frame less).
        if is_async:
            return _Decorated(self._head, *self._tail, fn)
        return _Decorated(self._head_sync, *self._tail_sync, fn)

    def __repr__(self) -> str:
        return f"Pipeline{self.policies!r}"


def _as_policy(policy: object, clock: Clock | None, rng: random.Random | None) -> Policy:
    if isinstance(policy, Retry):
        return RetryPolicy(policy, clock=clock, rng=rng)
    if not isinstance(policy, Policy):
        raise ConfigError(f"policies: {policy!r} is not a resilience policy")
    return policy
