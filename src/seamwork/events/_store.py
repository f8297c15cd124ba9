"""The ``EventStore`` port and what every adapter shares: replay, snapshots, upcasting,
subscriptions.

Adapters implement the storage primitives (append, raw reads, snapshots, a wait for
new events); this base class builds the user-facing behaviour on them once, so the
SQLite and PostgreSQL stores cannot drift apart. Factories (``EventStore.sqlite``,
``EventStore.postgres``) load the adapter on first use, so the core imports no driver.
"""

from __future__ import annotations

import asyncio
import builtins
import importlib
import math
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar, cast

from seamwork._core.lifecycle import OpenClose
from seamwork.errors import ConfigError
from seamwork.events._model import (
    ANY,
    AppendResult,
    ExpectedVersion,
    NewEvent,
    RecordedEvent,
    StreamInfo,
    check_key_length,
    check_no_nul,
    check_stream_name,
    check_unicode,
)
from seamwork.events._upcast import Upcasters, readable_or_marked

S = TypeVar("S")
Evolve = Callable[[S, RecordedEvent], S]


def _identity(value: Any) -> Any:
    return value


_MAX_INT = 2**63 - 1  # the stores keep versions and positions in 64-bit integers


def _check_int(name: str, value: object, minimum: int) -> None:
    """Raise ``ConfigError`` unless ``value`` is an int from ``minimum`` to 2**63 - 1."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name} must be an int, got {value!r}")
    if value < minimum:
        raise ConfigError(f"{name} must be >= {minimum}, got {value}")
    if value > _MAX_INT:
        raise ConfigError(f"{name} must be below 2**63, got {value}")


def _unix_time(value: object) -> float:
    """``as_of_time`` as the float ``recorded_at`` is compared with (an int past 64
    bits is a float to both stores alike), else ``ConfigError``."""
    if not isinstance(value, bool) and isinstance(value, int | float):
        try:
            when = float(value)
        except OverflowError:
            when = math.nan
        if not math.isnan(when):
            return when
    raise ConfigError(f"as_of_time must be a Unix time in seconds, got {value!r}")


def check_snapshot_key(stream: str, name: object, version_field: str, version: object) -> None:
    """Raise ``ConfigError`` naming the field unless a snapshot's stream, name and
    version are usable (checked before a snapshot is stored or looked up)."""
    check_stream_name(stream)
    if not isinstance(name, str) or not name:
        raise ConfigError(f"a snapshot name must be a non-empty string, got {name!r}")
    check_no_nul(name, "a snapshot name")
    check_unicode(name, "a snapshot name")
    check_key_length(name, "a snapshot name")
    _check_int(version_field, version, 0)


@dataclass(frozen=True, slots=True)
class Snapshots(Generic[S]):
    """How to snapshot one kind of state derived from a stream.

    Args:
        name: which state this is (a stream may feed several ``evolve`` functions);
            change it when ``evolve`` changes meaning, so old snapshots are ignored.
        every: write a snapshot when a load replayed at least this many events.
        encode / decode: state <-> JSON-serializable value (default: as is).
    """

    name: str
    every: int = 100
    encode: Callable[[S], Any] = _identity
    decode: Callable[[Any], S] = _identity

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ConfigError(f"Snapshots.name must be a non-empty string, got {self.name!r}")
        check_no_nul(self.name, "Snapshots.name")
        check_unicode(self.name, "Snapshots.name")
        check_key_length(self.name, "Snapshots.name")
        _check_int("Snapshots.every", self.every, 1)


@dataclass(frozen=True, slots=True)
class Loaded(Generic[S]):
    """A state rebuilt from a stream, and the version it reflects (-1: no events)."""

    state: S
    version: int


class EventStore(OpenClose, ABC):
    """Append-only streams of events with optimistic concurrency and a global order.

    Args:
        upcasters: applied to every event read (and, with ``known_types``, checked on
            every append).
    """

    def __init__(self, *, upcasters: Upcasters | None = None) -> None:
        self.upcasters = upcasters or Upcasters()
        # Opened, or closed, once: from then on only open() opens it (a closed store
        # stays closed, so its subscriptions end). Adapters set it in open and aclose.
        self._used = False
        self._first_use = asyncio.Lock()

    async def _open_on_first_use(self) -> None:
        """Open a store that was never opened: connections open on first use, as with
        ``async with store`` (adapters call it when ``_used`` is still False)."""
        async with self._first_use:
            if not self._used:
                await self.open()

    # --- factories -------------------------------------------------------------------

    @staticmethod
    def sqlite(path: str | Path, **options: Any) -> EventStore:
        """The embedded store in the SQLite file ``path`` (``synchronous="full"`` default)."""
        return _adapter("seamwork.storage.sqlite_events", "SQLiteEventStore")(path, **options)

    @staticmethod
    def postgres(dsn: str, **options: Any) -> EventStore:
        """A store in PostgreSQL (``pip install 'seamwork[postgres]'``)."""
        return _adapter("seamwork.storage.postgres_events", "PostgresEventStore")(dsn, **options)

    # --- lifecycle -------------------------------------------------------------------

    @abstractmethod
    async def open(self) -> None:
        """Connect and migrate the schema (safe when several processes start at once)."""

    @abstractmethod
    async def aclose(self) -> None:
        """Release connections and threads. Idempotent."""

    # --- writing ---------------------------------------------------------------------

    @abstractmethod
    async def append(
        self,
        stream: str,
        events: Sequence[NewEvent],
        *,
        expected_version: ExpectedVersion = ANY,
    ) -> AppendResult:
        """Append ``events`` to ``stream`` atomically, if it is at ``expected_version``.

        The store computes the new versions from the stream's actual version; a
        writer can never skip ahead and leave a gap.

        Raises:
            WrongExpectedVersion: the stream is elsewhere (carries ``actual``).
            SerializationError: data or metadata is not JSON, or holds a NUL character
                (U+0000, which PostgreSQL cannot store); nothing is written.
            ConfigError: empty stream name, bad expected version, unknown type; a
                stream name or event id over ``MAX_KEY_BYTES`` (1024) bytes of UTF-8
                (both are indexed, and a PostgreSQL index entry holds about 2,700
                bytes; every store refuses them alike, before anything is written).
        """

    @abstractmethod
    async def set_stream_metadata(self, stream: str, metadata: Mapping[str, Any]) -> None:
        """Replace the stream's metadata (a JSON object)."""

    @abstractmethod
    async def delete_stream(self, stream: str, *, expected_version: ExpectedVersion = ANY) -> None:
        """Soft-delete: the stream reads as empty; appending again continues its versions.

        Its events stay in ``$all`` (projections already saw them).
        """

    @abstractmethod
    async def stream_info(self, stream: str) -> StreamInfo | None:
        """Version, metadata and deletion mark of a stream, or None if the store knows
        nothing of it.

        A stream exists once it has events or metadata: a stream with metadata but no
        events has version -1 (and still accepts ``NO_STREAM``), as does a deleted one.
        """

    @abstractmethod
    async def save_snapshot(self, stream: str, name: str, version: int, state: Any) -> None:
        """Store ``state`` (JSON) as the ``name`` snapshot of ``stream`` at ``version``.

        A snapshot already stored at that version is replaced: the last save wins, so a
        snapshot written by a faulty ``encode`` can be put right by saving it again.
        """

    @abstractmethod
    async def load_snapshot(
        self, stream: str, name: str, max_version: int
    ) -> tuple[int, Any] | None:
        """The newest ``name`` snapshot of ``stream`` at or below ``max_version``."""

    # --- raw reads (adapters) --------------------------------------------------------

    @abstractmethod
    async def _read_stream(
        self,
        stream: str,
        from_version: int,
        to_version: int | None,
        backwards: bool,
        limit: int | None,
    ) -> builtins.list[RecordedEvent]:
        """Events of ``stream`` between the versions (inclusive), not upcast."""

    @abstractmethod
    async def _read_all(self, from_position: int, limit: int) -> builtins.list[RecordedEvent]:
        """Events after ``from_position`` (exclusive) in ``$all`` order, not upcast; only
        events no earlier-positioned, still-open transaction can precede (gap-safe)."""

    @abstractmethod
    async def _version_at(self, stream: str, when: float) -> int:
        """The stream's version as of wall-clock time ``when`` (-1: none yet)."""

    def _is_closed(self) -> bool:
        """Whether the store was opened and then closed (it stays closed until
        ``open()``): what follows it - a subscription, a live projection - ends."""
        return False

    async def _commit_bound(self) -> int | None:
        """A position ``$all``'s gap-safe horizon must reach before every event
        committed until now can be read; None where a commit is readable at once (a
        single writer gives the order)."""
        return None

    async def _horizon(self) -> int:
        """How far ``$all`` can be read now: events below this position (only called
        where ``_commit_bound`` is not None)."""
        raise NotImplementedError

    def _wakes(self) -> int:
        """How many wake-ups (news that events may have been appended) the adapter has
        had. A reader takes it before each read of ``$all`` and hands it to
        ``_wait_for_events``; an adapter that keeps no count returns 0."""
        return 0

    @abstractmethod
    async def _wait_for_events(self, after_position: int, wakes: int) -> None:
        """Return when events after ``after_position`` may exist: at once if a wake-up
        came since ``_wakes()`` was ``wakes`` (the reader may have been busy when it
        came, and its read missed what it announced), else at the next one, or when a
        poll interval passed."""

    # --- reads -----------------------------------------------------------------------

    async def read_stream(
        self,
        stream: str,
        *,
        from_version: int = 0,
        to_version: int | None = None,
        backwards: bool = False,
        limit: int | None = None,
    ) -> builtins.list[RecordedEvent]:
        """A stream's events from ``from_version`` (forwards), or from ``to_version`` down
        (``backwards=True``), upcast to their current shape."""
        check_stream_name(stream)
        _check_int("from_version", from_version, 0)
        if to_version is not None:
            _check_int("to_version", to_version, 0)
        if limit is not None:
            _check_int("limit", limit, 1)
        if not isinstance(backwards, bool):  # ("no" read backwards)
            raise ConfigError(f"backwards must be True or False, got {backwards!r}")
        events = await self._read_stream(stream, from_version, to_version, backwards, limit)
        return self._upcast_all(events)

    async def read_all(
        self, *, from_position: int = 0, limit: int = 1000
    ) -> builtins.list[RecordedEvent]:
        """Up to ``limit`` events after ``from_position`` (exclusive) in ``$all`` order."""
        _check_int("from_position", from_position, 0)
        _check_int("limit", limit, 1)
        return self._upcast_all(await self._read_all(from_position, limit))

    def subscribe(
        self, *, from_position: int = 0, batch_size: int = 500
    ) -> AsyncIterator[RecordedEvent]:
        """Every event after ``from_position``: the history first, then live, forever.

        Events arrive in ``$all`` order, each once; a subscriber that stores the
        position of the last event it handled resumes from there without a gap.

        Raises:
            ConfigError: ``from_position`` < 0 or ``batch_size`` < 1 (at the call, naming
                the argument).
        """
        _check_int("from_position", from_position, 0)
        _check_int("batch_size", batch_size, 1)
        return self._subscribe(from_position, batch_size)

    async def _subscribe(self, from_position: int, batch_size: int) -> AsyncIterator[RecordedEvent]:
        position = from_position
        while True:
            wakes = self._wakes()  # before the read: a wake-up from here on is news
            events = await self.read_all(from_position=position, limit=batch_size)
            for event in events:
                yield event
                position = event.position
            if len(events) < batch_size:
                await self._wait_for_events(position, wakes)

    async def load(
        self,
        stream: str,
        evolve: Evolve[S],
        initial: S,
        *,
        as_of_version: int | None = None,
        as_of_time: float | None = None,
        snapshots: Snapshots[S] | None = None,
    ) -> S:
        """The state of ``stream``: ``initial`` folded with ``evolve`` over its events.

        ``as_of_version`` / ``as_of_time`` stop at an earlier point (time travel).
        With ``snapshots``, replay starts at the newest usable snapshot, and a load
        that replayed ``snapshots.every`` events or more writes a new one.
        """
        loaded = await self.load_versioned(
            stream,
            evolve,
            initial,
            as_of_version=as_of_version,
            as_of_time=as_of_time,
            snapshots=snapshots,
        )
        return loaded.state

    async def load_versioned(
        self,
        stream: str,
        evolve: Evolve[S],
        initial: S,
        *,
        as_of_version: int | None = None,
        as_of_time: float | None = None,
        snapshots: Snapshots[S] | None = None,
    ) -> Loaded[S]:
        """Like ``load``, also returning the version the state reflects (for appends)."""
        check_stream_name(stream)
        if as_of_version is not None and as_of_time is not None:
            raise ConfigError("give as_of_version or as_of_time, not both")
        if as_of_version is not None:
            _check_int("as_of_version", as_of_version, 0)
        upper = as_of_version
        if as_of_time is not None:
            upper = await self._version_at(stream, _unix_time(as_of_time))
            if upper < 0:
                return Loaded(initial, -1)
        state, version = initial, -1
        if snapshots is not None:
            found = await self.load_snapshot(
                stream, snapshots.name, upper if upper is not None else 2**62
            )
            if found is not None:
                version, state = found[0], snapshots.decode(found[1])
        events = await self._read_stream(stream, version + 1, upper, False, None)
        for event in self._upcast_all(events):
            state = evolve(state, event)
            version = event.version
        if snapshots is not None and len(events) >= snapshots.every:
            await self.save_snapshot(stream, snapshots.name, version, snapshots.encode(state))
        return Loaded(state, version)

    def _upcast_all(self, events: builtins.list[RecordedEvent]) -> builtins.list[RecordedEvent]:
        if not self.upcasters._steps:
            return events
        return [self.upcasters.upcast(e) for e in events]

    def _upcast_or_mark(self, events: builtins.list[RecordedEvent]) -> builtins.list[RecordedEvent]:
        if not self.upcasters._steps:
            return events
        return [readable_or_marked(self.upcasters, e) for e in events]

    async def _read_all_for_projection(
        self, from_position: int, limit: int
    ) -> builtins.list[RecordedEvent]:
        """``read_all`` for a projection runner: an event no upcaster can read comes as
        an ``UnreadableEvent``, which parks its own stream, instead of an ``UpcastError``
        that would fail the page (and stop every stream) until the upcaster is fixed."""
        return self._upcast_or_mark(await self._read_all(from_position, limit))

    async def _read_stream_for_projection(self, stream: str) -> builtins.list[RecordedEvent]:
        """``read_stream`` for a projection's replay, upcast like ``_read_all_for_projection``."""
        return self._upcast_or_mark(await self._read_stream(stream, 0, None, False, None))

    def _check_append(self, stream: str, events: Sequence[NewEvent]) -> None:
        check_stream_name(stream)
        if not events:
            raise ConfigError(f"append to {stream!r} needs at least one event")
        upcasters = self.upcasters
        check = upcasters.known_types is not None
        for event in events:
            if type(event) is not NewEvent and not isinstance(event, NewEvent):
                raise ConfigError(f"append takes NewEvent objects, got {type(event).__name__}")
            if check:
                upcasters.check_known(event.type)


def _adapter(module: str, name: str) -> Callable[..., EventStore]:
    try:
        loaded = importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(f"{exc}; pip install 'seamwork[postgres]'") from exc
    return cast(Callable[..., EventStore], getattr(loaded, name))
