"""Fallback: answer with something else when a call fails."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, ParamSpec, TypeVar

from seamwork.errors import ConfigError
from seamwork.resilience._policy import Policy, refuse_async_handler, resolve, sync_value

P = ParamSpec("P")
R = TypeVar("R")


class Fallback(Policy):
    """Return ``handler(error)`` instead of raising, for the errors in ``on``.

    Placed outermost in a ``Pipeline`` it also covers rejections
    (``CircuitOpenError``, ``BulkheadFullError``) and timeouts from inner policies.

    Args:
        handler: called with the error; its result (awaited in ``call`` if it is
            awaitable) becomes the call's result. ``call_sync`` cannot await: an
            awaitable result there raises ``ConfigError``, and decorating a plain
            function with an async handler is refused (``ConfigError``).
        on: exception types handled; others propagate. Default: every ``Exception``.
    """

    __slots__ = ("handler", "on")

    def __init__(
        self,
        handler: Callable[[BaseException], Any],
        *,
        on: tuple[type[BaseException], ...] = (Exception,),
    ) -> None:
        if not callable(handler):
            raise ConfigError(f"handler must be callable, got {handler!r}")
        if not isinstance(on, tuple) or not all(
            isinstance(kind, type) and issubclass(kind, BaseException) for kind in on
        ):
            raise ConfigError(f"on must be a tuple of exception types, got {on!r}")
        self.handler, self.on = handler, on

    async def call(self, fn: Callable[P, Awaitable[R]], /, *args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await fn(*args, **kwargs)
        except self.on as error:
            return await resolve(self.handler(error))  # type: ignore[no-any-return]

    def call_sync(self, fn: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except self.on as error:
            return sync_value(self, self.handler(error), error)  # type: ignore[no-any-return]

    def _check_sync_driver(self, fn: Callable[..., Any]) -> None:
        refuse_async_handler(self, self.handler, fn)

    def __repr__(self) -> str:
        return f"Fallback({self.handler!r})"
