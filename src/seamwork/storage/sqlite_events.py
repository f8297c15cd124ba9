"""The embedded ``EventStore`` on SQLite.

Appends go to ONE writer connection on its own thread, which group-commits
concurrent appends: a version conflict rejects only its own append, and one fsync
covers the batch (WAL, ``synchronous=FULL`` by default). Versions are computed by the
writer from the stream's current version, inside the transaction: no gaps, no
skipping ahead. The version check happens before an append writes anything, so
batches run without a savepoint per append (the writer falls back to savepoints only
when an append fails after writing, e.g. a duplicate event id).

The writer thread caches stream versions it has read or written. The cache is
dropped whenever another connection committed to the file (``PRAGMA data_version``,
checked under the write lock at the start of every batch; its count starts again with
each connection, so the first batch after the store opens again drops it too) and
whenever a batch rolls back, so several processes may append to one file.

``$all`` positions are SQLite rowids assigned inside the single write transaction,
so commit order is position order and a reader can never see position N+1 before
N: gap-safe by construction. Reads use a second connection on a reader thread, so
a long catch-up read never holds up appends. Subscribers in this process are woken
by each commit; other processes' appends are found by polling (``poll_interval``).
"""

from __future__ import annotations

import asyncio
import builtins
import json
import sqlite3
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from seamwork._core.checks import check_seconds
from seamwork._core.codec import loads
from seamwork.errors import (
    ConfigError,
    CorruptRecord,
    EventStoreError,
    StoreError,
    WrongExpectedVersion,
)
from seamwork.events._model import (
    ANY,
    NO_STREAM,
    STREAM_EXISTS,
    AppendResult,
    ExpectedVersion,
    NewEvent,
    RecordedEvent,
    StreamInfo,
    check_expected_version,
    check_stream_name,
    encode_event,
    encode_json,
    encode_stream_metadata,
)
from seamwork.events._store import EventStore, check_snapshot_key
from seamwork.events._upcast import Upcasters
from seamwork.storage._sqlite_writer import Migration, SQLiteWriter, Synchronous

EVENT_MIGRATIONS = (
    Migration(
        "events",
        1,
        (
            """CREATE TABLE seamwork_events (
                position INTEGER PRIMARY KEY,
                stream TEXT NOT NULL,
                version INTEGER NOT NULL,
                id TEXT NOT NULL,
                type TEXT NOT NULL,
                schema_version INTEGER NOT NULL,
                data TEXT NOT NULL,
                metadata TEXT,
                recorded_at REAL NOT NULL
            )""",
            "CREATE UNIQUE INDEX seamwork_events_by_stream ON seamwork_events(stream, version)",
            "CREATE UNIQUE INDEX seamwork_events_by_id ON seamwork_events(id)",
            """CREATE TABLE seamwork_streams (
                stream TEXT PRIMARY KEY,
                version INTEGER NOT NULL,
                truncate_before INTEGER NOT NULL DEFAULT 0,
                deleted INTEGER NOT NULL DEFAULT 0,
                metadata TEXT NOT NULL DEFAULT '{}'
            ) WITHOUT ROWID""",
            """CREATE TABLE seamwork_snapshots (
                stream TEXT NOT NULL,
                name TEXT NOT NULL,
                version INTEGER NOT NULL,
                state TEXT NOT NULL,
                PRIMARY KEY (stream, name, version)
            ) WITHOUT ROWID""",
        ),
    ),
)

_COLUMNS = "position, stream, version, type, data, metadata, recorded_at, id, schema_version"
_INSERT = (
    "INSERT INTO seamwork_events "
    "(stream, version, id, type, schema_version, data, metadata, recorded_at) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
)
_UPSERT_STREAM = (
    "INSERT INTO seamwork_streams (stream, version) VALUES (?, ?) "
    "ON CONFLICT(stream) DO UPDATE SET version = excluded.version, deleted = 0"
)


_MAX_CACHED_STREAMS = 100_000


def _satisfied(expected: ExpectedVersion, visible: int) -> bool:
    if expected == ANY:
        return True
    if expected == NO_STREAM:
        return visible == -1
    if expected == STREAM_EXISTS:
        return visible >= 0
    return expected == visible


# The JSON scanner that ``json.loads`` ends in, called directly: the text was written
# by this store, so the two whitespace regex passes ``loads`` adds buy nothing here.
_scan: Callable[[str, int], tuple[Any, int]] = json.JSONDecoder().scan_once  # type: ignore[attr-defined]


def _json(text: str) -> Any:
    try:
        return _scan(text, 0)[0]
    except StopIteration as exc:
        raise ValueError(f"not JSON: {text[:40]!r}") from exc


def _decode_rows(rows: builtins.list[tuple[Any, ...]]) -> builtins.list[RecordedEvent]:
    """Rows of ``_COLUMNS`` as events (a page at a time: this is the read hot path)."""
    scan = _scan
    try:
        return [
            RecordedEvent(
                r[1],
                r[2],
                r[0],
                r[3],
                scan(r[4], 0)[0],
                None if r[5] is None else scan(r[5], 0)[0],
                r[6],
                r[7],
                r[8],
            )
            for r in rows
        ]
    except (ValueError, StopIteration):
        for row in rows:  # find and name the bad one
            try:
                _json(row[4])
                if row[5] is not None:
                    _json(row[5])
            except ValueError as exc:
                raise CorruptRecord(f"event at position {row[0]}", str(exc)) from exc
        raise


class SQLiteEventStore(EventStore):
    """``EventStore`` in one SQLite file.

    Args:
        path: the database file; its directory must exist.
        synchronous: ``"full"`` (default) or the named, less durable ``"normal"``.
        upcasters: applied on read; with ``known_types``, checked on append.
        poll_interval: seconds between looks for other processes' appends while a
            subscription is live.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        synchronous: Synchronous = "full",
        upcasters: Upcasters | None = None,
        poll_interval: float = 0.05,
    ) -> None:
        super().__init__(upcasters=upcasters)
        if str(path) == ":memory:":
            raise ConfigError(
                "the SQLite event store needs a file (readers use their own connection)"
            )
        check_seconds("poll_interval", poll_interval)  # (NaN: a busy loop, or a ValueError)
        self.path = str(path)
        self._versions: dict[str, tuple[int, bool]] = {}
        self._data_version = -1
        self._writer = SQLiteWriter(
            path,
            synchronous=synchronous,
            migrations=EVENT_MIGRATIONS,
            name="event",
            rerun_safe=True,
            on_begin=self._check_data_version,
            on_rollback=self._versions.clear,
            coalesce=True,
        )
        self._reader = SQLiteWriter(path, synchronous=synchronous, name="event-reader")
        self._poll = poll_interval
        self._appended: asyncio.Event | None = None
        self._last_position = 0

    def __repr__(self) -> str:
        return f"SQLiteEventStore({self.path!r})"

    @property
    def commits(self) -> int:
        return self._writer.commits

    async def open(self) -> None:
        await self._writer.start()
        await self._reader.start()
        self._used = True

    async def aclose(self) -> None:
        self._used = True
        await self._reader.close()
        await self._writer.close()
        # ``PRAGMA data_version`` counts per connection: the next one's first value says
        # nothing of what other connections committed while this store was closed
        self._data_version = -1
        self._wake(0)  # a waiting subscriber looks again now, and finds the store closed

    def _is_closed(self) -> bool:
        return self._used and not self._writer.running

    # --- writing ---------------------------------------------------------------------

    async def append(
        self,
        stream: str,
        events: Sequence[NewEvent],
        *,
        expected_version: ExpectedVersion = ANY,
    ) -> AppendResult:
        self._check_append(stream, events)
        if expected_version is not ANY:
            check_expected_version(expected_version)
        now = time.time()
        encoded = [(e.id, e.type, e.schema_version, *encode_event(e)) for e in events]
        versions = self._versions

        def append(conn: sqlite3.Connection) -> AppendResult:
            known = versions.get(stream)
            if known is None:
                known = self._stream_version(conn, stream)
            current = known[0]
            visible = -1 if known[1] else current
            if expected_version is not ANY and not (
                expected_version == visible or _satisfied(expected_version, visible)
            ):
                raise WrongExpectedVersion(stream, expected_version, visible)
            try:
                if len(encoded) == 1:
                    id_, type_, schema, data, meta = encoded[0]
                    version = current + 1
                    position = (
                        conn.execute(
                            _INSERT, (stream, version, id_, type_, schema, data, meta, now)
                        ).lastrowid
                        or 0
                    )
                else:
                    conn.executemany(
                        _INSERT,
                        [
                            (stream, current + 1 + i, id_, type_, schema, data, meta, now)
                            for i, (id_, type_, schema, data, meta) in enumerate(encoded)
                        ],
                    )
                    version = current + len(encoded)
                    position = conn.execute("SELECT last_insert_rowid()").fetchone()[0]
            except sqlite3.IntegrityError as exc:
                raise EventStoreError(
                    f"append to {stream!r} refused: an event id was already stored ({exc})"
                ) from exc
            conn.execute(_UPSERT_STREAM, (stream, version))
            versions[stream] = (version, False)
            return AppendResult(version, position)

        if not self._used:
            await self._open_on_first_use()
        result = await self._writer.write(append)
        self._wake(result.position)
        return result

    def _stream_version(self, conn: sqlite3.Connection, stream: str) -> tuple[int, bool]:
        """The stream's (version, deleted) from the table, remembered (writer thread)."""
        row = conn.execute(
            "SELECT version, deleted FROM seamwork_streams WHERE stream = ?", (stream,)
        ).fetchone()
        known = (-1, False) if row is None else (row[0], bool(row[1]))
        if len(self._versions) >= _MAX_CACHED_STREAMS:
            self._versions.clear()
        self._versions[stream] = known
        return known

    def _check_data_version(self, conn: sqlite3.Connection) -> None:
        """Forget cached versions if another connection committed since (writer thread)."""
        version = conn.execute("PRAGMA data_version").fetchone()[0]
        if version != self._data_version:
            self._versions.clear()
            self._data_version = version

    async def set_stream_metadata(self, stream: str, metadata: Mapping[str, Any]) -> None:
        text = encode_stream_metadata(stream, metadata)

        def update(conn: sqlite3.Connection) -> None:
            self._versions.pop(stream, None)
            conn.execute(
                "INSERT INTO seamwork_streams (stream, version, metadata) VALUES (?, -1, ?) "
                "ON CONFLICT(stream) DO UPDATE SET metadata = excluded.metadata",
                (stream, text),
            )

        if not self._used:
            await self._open_on_first_use()
        await self._writer.write(update)

    async def delete_stream(self, stream: str, *, expected_version: ExpectedVersion = ANY) -> None:
        check_stream_name(stream)
        check_expected_version(expected_version)

        def delete(conn: sqlite3.Connection) -> None:
            self._versions.pop(stream, None)
            row = conn.execute(
                "SELECT version, deleted FROM seamwork_streams WHERE stream = ?", (stream,)
            ).fetchone()
            visible = -1 if row is None or row[1] else row[0]
            if not _satisfied(expected_version, visible):
                raise WrongExpectedVersion(stream, expected_version, visible)
            if visible < 0:
                return
            conn.execute(
                "UPDATE seamwork_streams SET deleted = 1, truncate_before = version + 1 "
                "WHERE stream = ?",
                (stream,),
            )

        if not self._used:
            await self._open_on_first_use()
        await self._writer.write(delete)

    async def stream_info(self, stream: str) -> StreamInfo | None:
        check_stream_name(stream)
        if not self._used:
            await self._open_on_first_use()
        row = await self._reader.read(
            lambda conn: conn.execute(
                "SELECT version, metadata, deleted FROM seamwork_streams WHERE stream = ?",
                (stream,),
            ).fetchone()
        )
        if row is None:
            return None
        version = -1 if row[2] else row[0]
        return StreamInfo(stream, version, loads(row[1]), bool(row[2]))

    async def save_snapshot(self, stream: str, name: str, version: int, state: Any) -> None:
        check_snapshot_key(stream, name, "version", version)
        text = encode_json(state, f"snapshot {name!r} of {stream!r}")
        if not self._used:
            await self._open_on_first_use()
        await self._writer.write(
            lambda conn: conn.execute(
                "INSERT OR REPLACE INTO seamwork_snapshots (stream, name, version, state) "
                "VALUES (?, ?, ?, ?)",
                (stream, name, version, text),
            )
        )

    async def load_snapshot(
        self, stream: str, name: str, max_version: int
    ) -> tuple[int, Any] | None:
        check_snapshot_key(stream, name, "max_version", max_version)
        if not self._used:
            await self._open_on_first_use()
        row = await self._reader.read(
            lambda conn: conn.execute(
                "SELECT s.version, s.state FROM seamwork_snapshots s "
                "JOIN seamwork_streams t ON t.stream = s.stream "
                "WHERE s.stream = ? AND s.name = ? AND s.version <= ? "
                "AND s.version >= t.truncate_before AND s.version <= t.version "
                "ORDER BY s.version DESC LIMIT 1",
                (stream, name, max_version),
            ).fetchone()
        )
        return None if row is None else (row[0], loads(row[1]))

    # --- raw reads ---------------------------------------------------------------------

    async def _read_stream(
        self,
        stream: str,
        from_version: int,
        to_version: int | None,
        backwards: bool,
        limit: int | None,
    ) -> builtins.list[RecordedEvent]:
        upper = to_version if to_version is not None else 2**62
        order = "DESC" if backwards else "ASC"
        sql = (
            f"SELECT {_COLUMNS} FROM seamwork_events WHERE stream = ? AND version >= ? "
            "AND version <= ? AND version >= (SELECT coalesce(max(truncate_before), 0) "
            "FROM seamwork_streams WHERE stream = ?) "
            f"ORDER BY version {order} LIMIT ?"
        )
        params = (stream, from_version, upper, stream, -1 if limit is None else limit)

        def read(conn: sqlite3.Connection) -> builtins.list[RecordedEvent]:
            return _decode_rows(conn.execute(sql, params).fetchall())

        if not self._used:
            await self._open_on_first_use()
        return await self._reader.read(read)

    async def _read_all(self, from_position: int, limit: int) -> builtins.list[RecordedEvent]:
        sql = f"SELECT {_COLUMNS} FROM seamwork_events WHERE position > ? ORDER BY position LIMIT ?"

        def read(conn: sqlite3.Connection) -> builtins.list[RecordedEvent]:
            return _decode_rows(conn.execute(sql, (from_position, limit)).fetchall())

        if not self._used:
            await self._open_on_first_use()
        return await self._reader.read(read)

    async def _version_at(self, stream: str, when: float) -> int:
        if not self._used:
            await self._open_on_first_use()
        row = await self._reader.read(
            lambda conn: conn.execute(
                "SELECT max(version) FROM seamwork_events WHERE stream = ? AND recorded_at <= ?",
                (stream, when),
            ).fetchone()
        )
        return -1 if row is None or row[0] is None else int(row[0])

    async def _wait_for_events(self, after_position: int, wakes: int) -> None:
        # ``wakes`` is not needed: an append of this process moves ``_last_position``
        if not self._reader.running:
            raise StoreError(f"event store at {self.path} is closed")
        if self._last_position > after_position:
            return  # this process appended since; no await between check and wait
        if self._appended is None:
            self._appended = asyncio.Event()
        appended = self._appended
        try:
            async with asyncio.timeout(self._poll):
                await appended.wait()
        except TimeoutError:
            return

    def _wake(self, position: int) -> None:
        self._last_position = max(self._last_position, position)
        appended, self._appended = self._appended, None
        if appended is not None:
            appended.set()
