"""Events as they go in (``NewEvent``) and as they come out (``RecordedEvent``).

Versions count within a stream from 0 (a stream's first event has version 0).
Positions order the whole store (``$all``): strictly increasing in the order
readers may see events, so a checkpoint is simply the last position handled.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from seamwork._core.codec import dumps, dumps_clean
from seamwork._core.ids import new_id
from seamwork.errors import ConfigError, SerializationError

ANY: Final = "any"
"""Append whatever the stream's version is."""
NO_STREAM: Final = "no_stream"
"""Append only if the stream does not exist yet (or was deleted)."""
STREAM_EXISTS: Final = "stream_exists"
"""Append only if the stream already has events."""

ExpectedVersion = int | str
"""An exact version (>= 0, the version of the stream's last event), or one of
``ANY``, ``NO_STREAM``, ``STREAM_EXISTS``."""

_EXPECTATIONS = frozenset({ANY, NO_STREAM, STREAM_EXISTS})
_MAX_SCHEMA_VERSION = 2**31 - 1
MAX_KEY_BYTES: Final = 1024
"""Longest stream name, event id and snapshot name, in bytes of UTF-8. They are
indexed, and a PostgreSQL btree entry holds at most about 2,700 bytes (a snapshot's
key holds a stream name and a snapshot name): every store refuses a longer one."""
_SHORT_KEY = MAX_KEY_BYTES // 4  # characters of at most 4 bytes of UTF-8 each: short enough
# A lone surrogate: a str may hold one, no UTF-8 text can (the drivers fail to encode it)
_SURROGATE = re.compile("[\ud800-\udfff]")


def check_expected_version(expected: object) -> None:
    """Raise ``ConfigError`` unless ``expected`` is a valid expected version."""
    if isinstance(expected, bool):
        raise ConfigError(f"expected_version must be an int >= 0 or a constant, got {expected!r}")
    if isinstance(expected, int):
        if expected < 0:
            raise ConfigError(
                f"expected_version must be >= 0 (or NO_STREAM for a new stream), got {expected}"
            )
        return
    if expected not in _EXPECTATIONS:
        raise ConfigError(
            f"expected_version must be an int >= 0, ANY, NO_STREAM or STREAM_EXISTS, "
            f"got {expected!r}"
        )


def check_stream_name(stream: object) -> str:
    """Return ``stream`` if it is a usable stream name, else raise ``ConfigError``."""
    if (
        type(stream) is str
        and len(stream) <= _SHORT_KEY
        and stream.strip()
        and stream[0] != "$"
        and "\x00" not in stream
        and (stream.isascii() or _SURROGATE.search(stream) is None)
    ):
        return stream  # the common name; any other goes through the checks that name why
    if not isinstance(stream, str) or not stream.strip():
        raise ConfigError(f"a stream name must be a non-empty string, got {stream!r}")
    if stream.startswith("$"):
        raise ConfigError(f"stream names starting with '$' are reserved, got {stream!r}")
    check_no_nul(stream, "a stream name")
    check_unicode(stream, "a stream name")
    check_key_length(stream, "a stream name")
    return stream


def check_key_length(text: str, what: str) -> None:
    """Raise ``ConfigError`` if ``text`` is over ``MAX_KEY_BYTES`` bytes of UTF-8."""
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > MAX_KEY_BYTES:
        raise ConfigError(
            f"{what} must be at most {MAX_KEY_BYTES} bytes of UTF-8 (it is indexed), "
            f"got {size}: {text[:40]!r}..."
        )


def check_no_nul(text: str, what: str) -> None:
    """Raise ``ConfigError`` if ``text`` holds a NUL character.

    PostgreSQL's ``text`` and ``jsonb`` cannot store U+0000, so every event store
    refuses it (SQLite could keep it, but a store must not accept what another refuses).
    """
    if "\x00" in text:
        raise ConfigError(f"{what} must not contain a NUL character (\\u0000), got {text!r}")


def check_unicode(text: str, what: str) -> None:
    """Raise ``ConfigError`` if ``text`` holds a lone surrogate (no store can encode it)."""
    if _has_surrogate(text):
        raise ConfigError(f"{what} must be valid Unicode (a lone surrogate is not), got {text!r}")


def _has_surrogate(text: str) -> bool:
    return not text.isascii() and _SURROGATE.search(text) is not None


def encode_json(value: object, what: str) -> str:
    """``value`` as stored JSON text; ``SerializationError`` naming where it is when it
    is not JSON or holds a NUL character (see ``check_no_nul``) or a lone surrogate."""
    text = dumps(value, what=what)
    if "\\u0000" in text:  # the encoder's escape for U+0000 (or an escaped backslash)
        where = _text_path(value, what, lambda s: "\x00" in s)
        if where is not None:
            raise SerializationError(
                f"{where} contains a NUL character (\\u0000), which the event store cannot hold"
            )
    if _has_surrogate(text):  # the encoder keeps non-ASCII text as it is
        where = _text_path(value, what, _has_surrogate) or what
        raise SerializationError(
            f"{where} contains a lone surrogate, which is not valid Unicode: no store can hold it"
        )
    return text


def _text_path(value: object, path: str, bad: Callable[[str], bool]) -> str | None:
    """Where in ``value`` a string (or a key) is ``bad``, or None."""
    if isinstance(value, str):
        return path if bad(value) else None
    if isinstance(value, Mapping):
        for key, item in value.items():
            label = f"{path}[{key!r}]"
            if isinstance(key, str) and bad(key):
                return label
            found = _text_path(item, label, bad)
            if found is not None:
                return found
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            found = _text_path(item, f"{path}[{index}]", bad)
            if found is not None:
                return found
    return None


def encode_stream_metadata(stream: str, metadata: object) -> str:
    """``set_stream_metadata``'s input checked and as stored (JSON), else ``ConfigError``."""
    check_stream_name(stream)
    if not isinstance(metadata, Mapping):
        raise ConfigError(f"stream metadata must be a mapping, got {type(metadata).__name__}")
    return encode_json(metadata, f"metadata of stream {stream!r}")


def encode_event(event: NewEvent) -> tuple[str, str | None]:
    """An event's data and metadata as stored JSON text (metadata None stays None)."""
    data = dumps_clean(event.data)
    if data is None or "\\u0000" in data or _has_surrogate(data):  # let encode_json name it
        data = encode_json(event.data, f"data of {event.type!r} event")
    metadata = event.metadata
    if metadata is None:
        return data, None
    text = dumps_clean(metadata)
    if text is None or "\\u0000" in text or _has_surrogate(text):
        text = encode_json(metadata, f"metadata of {event.type!r}")
    return data, text


@dataclass(frozen=True, slots=True)
class NewEvent:
    """An event to append.

    Args:
        type: the event's type name, e.g. ``"OrderShipped"``.
        data: a JSON-serializable mapping.
        metadata: JSON-serializable extra facts (correlation id, user, ...).
        id: a unique id (default: a fresh UUIDv7); appending the same id twice fails.
        schema_version: the shape of ``data``; upcasters bring old shapes forward.
    """

    type: str
    data: Mapping[str, Any] = field(default_factory=dict)
    metadata: Mapping[str, Any] | None = None
    id: str = field(default_factory=new_id)
    schema_version: int = 1

    def __post_init__(self) -> None:
        # the common event in one expression (exact types, a short id); anything else,
        # good or bad, goes through the checks that name what is wrong
        kind, id_ = self.type, self.id
        if not (
            type(kind) is str
            and kind.strip()
            and "\x00" not in kind
            and kind.isascii()
            and type(self.data) is dict
            and (self.metadata is None or type(self.metadata) is dict)
            and type(self.schema_version) is int
            and 0 < self.schema_version <= _MAX_SCHEMA_VERSION
            and type(id_) is str
            and 0 < len(id_) <= _SHORT_KEY
            and "\x00" not in id_
            and id_.isascii()
        ):
            _check_new_event(self)


def _check_new_event(event: NewEvent) -> None:
    """Raise ``ConfigError`` naming what is wrong with ``event``'s fields, if anything."""
    if not isinstance(event.type, str) or not event.type.strip():
        raise ConfigError(f"an event type must be a non-empty string, got {event.type!r}")
    check_no_nul(event.type, "an event type")
    check_unicode(event.type, "an event type")
    if not isinstance(event.data, Mapping):
        raise ConfigError(
            f"event {event.type!r}: data must be a mapping, got {type(event.data).__name__}"
        )
    if event.metadata is not None and not isinstance(event.metadata, Mapping):
        raise ConfigError(f"event {event.type!r}: metadata must be a mapping or None")
    if isinstance(event.schema_version, bool) or not isinstance(event.schema_version, int):
        raise ConfigError(f"event {event.type!r}: schema_version must be an int")
    if event.schema_version < 1:
        raise ConfigError(f"event {event.type!r}: schema_version must be >= 1")
    if event.schema_version > _MAX_SCHEMA_VERSION:  # a 32-bit column on PostgreSQL
        raise ConfigError(f"event {event.type!r}: schema_version must be <= {_MAX_SCHEMA_VERSION}")
    if not isinstance(event.id, str) or not event.id:
        raise ConfigError(f"event {event.type!r}: id must be a non-empty string, got {event.id!r}")
    check_no_nul(event.id, f"event {event.type!r}: the id")
    check_unicode(event.id, f"event {event.type!r}: the id")
    check_key_length(event.id, f"event {event.type!r}: the id")


@dataclass(slots=True)
class RecordedEvent:
    """An event as stored: where it sits in its stream and in ``$all``."""

    stream: str
    version: int
    position: int
    type: str
    data: dict[str, Any]
    metadata: dict[str, Any] | None
    recorded_at: float
    id: str
    schema_version: int = 1


@dataclass(frozen=True, slots=True)
class AppendResult:
    """What an append wrote: the stream's new version and the last event's position."""

    version: int
    position: int


@dataclass(frozen=True, slots=True)
class StreamInfo:
    """A stream's current version (-1: no events, e.g. only metadata, or deleted),
    metadata and deletion mark."""

    stream: str
    version: int
    metadata: dict[str, Any] = field(default_factory=dict)
    deleted: bool = False
