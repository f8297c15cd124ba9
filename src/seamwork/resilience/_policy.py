"""What every resilience policy offers: ``call``, ``call_sync`` and decorator use.

A policy implements two thin drivers over its pure core: ``call`` awaits a coroutine
function, ``call_sync`` calls a plain one. Decorating picks the driver from the
function's kind (a callable object's by its ``__call__``), keeps its signature for
type checkers (ParamSpec) and exposes the policy as ``wrapper.policy``.

The decorated function is a ``functools.partial`` of the driver, not a Python
wrapper function: calling it costs no extra frame (and, for a coroutine function, no
extra coroutine), and ``inspect`` sees through it (``iscoroutinefunction``,
``signature`` via ``__wrapped__``). ``_Decorated.__get__`` binds it like a function,
so decorating a method still passes ``self``.
"""

from __future__ import annotations

import functools
import inspect
import time
import types
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, ParamSpec, TypeVar, cast, overload

from seamwork._core.clock import Clock, SystemClock
from seamwork.errors import ConfigError

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
        """Decorate ``fn`` (sync or async); the wrapper keeps its signature.

        Raises:
            ConfigError: ``fn`` is a generator or async generator function.
        """
        _refuse_generators(self, fn)
        is_async = returns_coroutine(fn)
        if not is_async:
            self._check_sync_driver(fn)
        wrapper = functools.update_wrapper(self._bind(fn, is_async), fn)
        wrapper.policy = self  # type: ignore[attr-defined]
        return cast(Callable[P, Any], wrapper)

    def _check_sync_driver(self, fn: Callable[..., Any]) -> None:
        """Raise ``ConfigError`` if this policy cannot guard the plain function ``fn``
        (an async fallback, which the sync driver could not await). Most can."""
        return

    def _bind(self, fn: Callable[..., Any], is_async: bool) -> _Decorated:
        """The callable a decorator returns: the driver with ``fn`` bound first."""
        return _Decorated(self.call if is_async else self.call_sync, fn)


class _Decorated(functools.partial[Any]):
    """``partial(driver, fn)`` that binds as a method when it is a class attribute."""

    def __get__(self, instance: object, owner: type | None = None) -> Any:
        return self if instance is None else types.MethodType(self, instance)


def returns_coroutine(fn: Callable[..., Any]) -> bool:
    """Whether calling ``fn`` gives a coroutine, so the decorator must pick ``call``.

    ``inspect.iscoroutinefunction`` (3.11) answers False for an object whose
    ``__call__`` is a coroutine function, and for a ``partial`` of one; the sync driver
    would then "run" it by creating the coroutine, counting a success and releasing
    its slot before any of it ran.
    """
    return inspect.iscoroutinefunction(_code_owner(fn))


def _refuse_generators(policy: Policy, fn: Callable[..., Any]) -> None:
    """A generator function cannot be guarded: its call returns before its body runs,
    so a breaker would count a success, a bulkhead free its slot and a retry or
    timeout be over before any of the work (or its errors) happened."""
    owner = _code_owner(fn)
    if inspect.isgeneratorfunction(owner) or inspect.isasyncgenfunction(owner):
        raise ConfigError(
            f"{policy!r} cannot guard {fn!r}: it is a generator function, whose call "
            "only creates the generator; guard the function that consumes it"
        )


def _code_owner(fn: Callable[..., Any]) -> Any:
    """What says what calling ``fn`` gives: ``fn`` without partials, or the
    ``__call__`` of a callable object."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    if isinstance(fn, type) or inspect.isroutine(fn) or not callable(fn):
        return fn
    return type(fn).__call__


def monotonic_reader(clock: Clock) -> Callable[[], float]:
    """``clock.monotonic``, or ``time.monotonic`` itself for the system clock.

    Drivers cache it once, so the hot path pays one C call per reading rather than a
    method of a method; an injected clock (``ManualClock``) is still read through.
    """
    return time.monotonic if type(clock) is SystemClock else clock.monotonic


def refuse_async_handler(
    policy: Policy, handler: Callable[..., Any] | None, fn: Callable[..., Any]
) -> None:
    """Raise ``ConfigError`` if ``handler`` (a fallback) gives a coroutine: the sync
    driver guarding ``fn`` could not await it."""
    if handler is not None and returns_coroutine(handler):
        raise ConfigError(
            f"{policy!r} cannot guard the plain function {fn!r}: its fallback "
            f"{handler!r} is async and call_sync cannot await it; use a plain fallback"
        )


def sync_value(policy: Policy, value: Any, error: BaseException) -> Any:
    """A fallback's ``value`` for the sync driver; ``ConfigError`` (from ``error``) if
    it is awaitable, which ``call_sync`` cannot await (the coroutine is closed)."""
    if not inspect.isawaitable(value):
        return value
    if inspect.iscoroutine(value):
        value.close()  # never awaited on purpose: no "never awaited" warning
    raise ConfigError(
        f"{policy!r}: the fallback returned an awaitable, which call_sync cannot await; "
        "use a plain fallback for plain functions, or call (async)"
    ) from error


async def resolve(value: Any) -> Any:
    """Await ``value`` if it is awaitable (a fallback may be sync or async)."""
    return await value if inspect.isawaitable(value) else value
