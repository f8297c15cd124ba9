"""Upcasting: old event shapes become today's shape as they are read.

Events are immutable once stored; when the shape of ``data`` changes, bump the
event's ``schema_version`` in new code and register an upcaster from the old
version. Reading applies the chain ``(type, 1) -> (type, 2) -> ...`` until no
upcaster matches. An event older than the type's declared current version with no
upcaster to bring it forward raises ``UpcastError`` rather than handing stale data
to an ``evolve`` function that does not expect it.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any

from seamwork.errors import ConfigError, UpcastError
from seamwork.events._model import _MAX_SCHEMA_VERSION, RecordedEvent

UpcastFn = Callable[[dict[str, Any]], Mapping[str, Any]]


def _check_type(name: str, value: object) -> None:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{name} must be a non-empty event type name, got {value!r}")


@dataclass(slots=True)
class UnreadableEvent(RecordedEvent):
    """An event as stored that no upcaster brings to its current shape (``error`` says
    why): what a projection runner reads in its place, so that the event parks its own
    stream instead of stopping every stream behind it."""

    error: str = ""


def readable_or_marked(upcasters: Upcasters, event: RecordedEvent) -> RecordedEvent:
    """``event`` upcast, or an ``UnreadableEvent`` carrying the ``UpcastError``."""
    try:
        return upcasters.upcast(event)
    except UpcastError as exc:
        return UnreadableEvent(
            event.stream,
            event.version,
            event.position,
            event.type,
            event.data,
            event.metadata,
            event.recorded_at,
            event.id,
            event.schema_version,
            str(exc),
        )


class Upcasters:
    """A registry of upcasters keyed by ``(type, schema_version)``.

    Args:
        known_types: if given, appending an event of any other type is refused
            (a typo in an event type is then caught before it is stored).
    """

    def __init__(self, *, known_types: Collection[str] | None = None) -> None:
        self._steps: dict[tuple[str, int], tuple[str, int, UpcastFn]] = {}
        self._current: dict[str, int] = {}
        self.known_types: frozenset[str] | None = (
            frozenset(known_types) if known_types is not None else None
        )

    def register(
        self,
        type: str,
        from_version: int,
        fn: UpcastFn,
        *,
        to_type: str | None = None,
    ) -> None:
        """Turn ``type`` events of ``from_version`` into version ``from_version + 1``
        (optionally renamed ``to_type``) with ``fn(data) -> data``."""
        _check_type("type", type)
        if to_type is not None:
            _check_type("to_type", to_type)
        if (
            isinstance(from_version, bool)
            or not isinstance(from_version, int)
            or not 1 <= from_version < _MAX_SCHEMA_VERSION
        ):
            raise ConfigError(
                f"from_version must be an int from 1 to {_MAX_SCHEMA_VERSION - 1} "
                f"(a schema version with one after it), got {from_version!r}"
            )
        if (type, from_version) in self._steps:
            raise ConfigError(f"an upcaster for ({type!r}, {from_version}) is already registered")
        if not callable(fn):
            raise ConfigError(f"upcaster for ({type!r}, {from_version}) must be callable")
        target = to_type or type
        self._steps[(type, from_version)] = (target, from_version + 1, fn)
        self._current[target] = max(self._current.get(target, 1), from_version + 1)

    def upcaster(
        self, type: str, from_version: int, *, to_type: str | None = None
    ) -> Callable[[UpcastFn], UpcastFn]:
        """Decorator form of ``register``."""

        def decorate(fn: UpcastFn) -> UpcastFn:
            self.register(type, from_version, fn, to_type=to_type)
            return fn

        return decorate

    def current_version(self, type: str) -> int:
        """The schema version new ``type`` events should be written with."""
        return self._current.get(type, 1)

    def check_known(self, type: str) -> None:
        if self.known_types is not None and type not in self.known_types:
            raise ConfigError(
                f"unknown event type {type!r}; known types: {', '.join(sorted(self.known_types))}"
            )

    def upcast(self, event: RecordedEvent) -> RecordedEvent:
        """``event`` in its current shape (the same object if nothing applies)."""
        if not self._steps:
            return event
        type, version, data = event.type, event.schema_version, event.data
        while (step := self._steps.get((type, version))) is not None:
            target, next_version, fn = step
            if data is event.data:  # upcasters may edit their input; events are immutable
                data = copy.deepcopy(data)
            try:
                data = dict(fn(data))
            except Exception as exc:
                raise UpcastError(
                    f"upcaster ({type!r}, {version}) failed on event {event.id} "
                    f"at {event.stream}@{event.version}: {exc}"
                ) from exc
            type, version = target, next_version
        if version < self._current.get(type, 1):
            raise UpcastError(
                f"event {event.id} at {event.stream}@{event.version} is ({type!r}, schema "
                f"{version}) but the current schema is {self._current[type]} and no upcaster "
                f"from {version} is registered"
            )
        if type == event.type and version == event.schema_version:
            return event
        return RecordedEvent(
            event.stream,
            event.version,
            event.position,
            type,
            data,
            event.metadata,
            event.recorded_at,
            event.id,
            version,
        )
