"""Event hooks: components announce what happens; users subscribe with ``on``.

A hook that raises is logged and ignored: an alerting callback must never break the
component that called it. Emitting with no subscriber costs one dict lookup.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import Callable, Iterable
from typing import Any

from seamwork.errors import ConfigError

Callback = Callable[..., object]


class Hooks:
    """A small, typed-by-name event emitter.

    Args:
        events: the event names this component emits; ``on`` refuses others.
        logger: where failing callbacks are reported.
    """

    __slots__ = ("_events", "_logger", "_subscribers")

    def __init__(self, events: Iterable[str], logger: logging.Logger) -> None:
        self._events = frozenset(events)
        self._logger = logger
        self._subscribers: dict[str, list[Callback]] = {}

    def on(self, event: str, callback: Callback) -> Callable[[], None]:
        """Call ``callback(*args)`` whenever ``event`` fires; returns an unsubscribe function."""
        if event not in self._events:
            known = ", ".join(sorted(self._events))
            raise ConfigError(f"unknown event {event!r}; known events: {known}")
        if not callable(callback):
            raise ConfigError(f"callback for {event!r} must be callable, got {callback!r}")
        if inspect.iscoroutinefunction(callback):  # its coroutine would never run
            raise ConfigError(
                f"callback for {event!r} is async, but hooks are called synchronously: "
                "use a plain function (it may start a task for async work)"
            )
        listeners = self._subscribers.setdefault(event, [])
        listeners.append(callback)
        done = False

        def unsubscribe() -> None:  # once: a second call must not remove another copy
            nonlocal done
            if not done:
                done = True
                with contextlib.suppress(ValueError):
                    listeners.remove(callback)

        return unsubscribe

    def emit(self, event: str, *args: Any) -> None:
        listeners = self._subscribers.get(event)
        if not listeners:
            return
        for callback in tuple(listeners):
            try:
                result = callback(*args)
            except Exception:
                self._logger.exception("hook %r for event %r raised; ignored", callback, event)
                continue
            if inspect.iscoroutine(result):  # (an object with an async __call__, a lambda)
                result.close()
                self._logger.error(
                    "hook %r for event %r returned a coroutine, which hooks never await: "
                    "it did not run",
                    callback,
                    event,
                )

    def has(self, event: str) -> bool:
        return bool(self._subscribers.get(event))
