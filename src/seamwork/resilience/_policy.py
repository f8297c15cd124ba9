"""What every resilience policy offers: ``call``, ``call_sync`` and decorator use.

A policy implements two thin drivers over its pure core: ``call`` awaits a coroutine
function, ``call_sync`` calls a plain one. Decorating picks the driver from the
function's kind, keeps its signature for type checkers (ParamSpec) and exposes the
policy as ``wrapper.policy``.
"""

from __future__ import annotations

import functools
import inspect
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, ParamSpec, TypeVar, overload

P = ParamSpec("P")
R = TypeVar("R")


class Policy(ABC):
    """Base of the resilience policies (breaker, bulkhead, timeout, limiter, ...)."""

    __slots__ = ()

    @abstractmethod
    async def call(self, fn: Callable[P, Awaitable[R]], /, *args: P.args, **kwargs: P.kwargs) -> R:
        """Await ``fn(*args, **kwargs)`` under this policy."""

    @abstractmethod
    def call_sync(self, fn: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> R:
        """Call the plain function ``fn(*args, **kwargs)`` under this policy."""

    @overload
    def __call__(
        self, fn: Callable[P, Coroutine[Any, Any, R]]
    ) -> Callable[P, Coroutine[Any, Any, R]]: ...

    @overload
    def __call__(self, fn: Callable[P, R]) -> Callable[P, R]: ...

    def __call__(self, fn: Callable[P, Any]) -> Callable[P, Any]:
        """Decorate ``fn`` (sync or async); the wrapper keeps its signature."""
        if inspect.iscoroutinefunction(fn):

            async def run_async(*args: P.args, **kwargs: P.kwargs) -> Any:
                return await self.call(fn, *args, **kwargs)

            wrapper: Callable[P, Any] = functools.wraps(fn)(run_async)
        else:

            def run_sync(*args: P.args, **kwargs: P.kwargs) -> Any:
                return self.call_sync(fn, *args, **kwargs)

            wrapper = functools.wraps(fn)(run_sync)
        wrapper.policy = self  # type: ignore[attr-defined]
        return wrapper


async def resolve(value: Any) -> Any:
    """Await ``value`` if it is awaitable (a fallback may be sync or async)."""
    return await value if inspect.isawaitable(value) else value
