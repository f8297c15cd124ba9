"""Read models in SQLite: a projection's tables, its checkpoint and its dead letters in
one database, written in one transaction per page of events (exactly-once effect).

It may be the event store's own file or a separate one (the usual CQRS split: the
query service owns its database). Handlers run on the writer thread with its
``sqlite3.Connection``: plain, blocking SQL is right there.
"""

from __future__ import annotations

import builtins
import sqlite3
import time
from collections.abc import Collection, Sequence
from pathlib import Path

from seamwork._core.lifecycle import OpenClose
from seamwork.events._model import RecordedEvent
from seamwork.events._projection import BatchResult, ParkedEvent, Projection
from seamwork.storage._readmodel import PageSQL, apply_page, replay_stream
from seamwork.storage._sqlite_writer import Migration, SQLiteWriter, Synchronous

READ_MODEL_MIGRATIONS = (
    Migration(
        "projections",
        1,
        (
            """CREATE TABLE seamwork_checkpoints (
                projection TEXT PRIMARY KEY,
                position INTEGER NOT NULL
            ) WITHOUT ROWID""",
            """CREATE TABLE seamwork_parked (
                projection TEXT NOT NULL,
                stream TEXT NOT NULL,
                position INTEGER NOT NULL,
                event_type TEXT NOT NULL,
                error TEXT,
                parked_at REAL NOT NULL,
                PRIMARY KEY (projection, stream, position)
            ) WITHOUT ROWID""",
        ),
    ),
)

_SQL = PageSQL("?")


class SQLiteReadModel(OpenClose):
    """``ReadModelStore`` in a SQLite file.

    Args:
        path: the read model's database file.
        synchronous: ``"full"`` (default) or the named, less durable ``"normal"``.
    """

    def __init__(self, path: str | Path, *, synchronous: Synchronous = "full") -> None:
        self.path = str(path)
        self._writer = SQLiteWriter(
            path, synchronous=synchronous, migrations=READ_MODEL_MIGRATIONS, name="read-model"
        )

    def __repr__(self) -> str:
        return f"SQLiteReadModel({self.path!r})"

    async def open(self) -> None:
        await self._writer.start()

    async def aclose(self) -> None:
        await self._writer.close()

    async def query(self, sql: str, params: Sequence[object] = ()) -> builtins.list[sqlite3.Row]:
        """Run a read-only query against the read model (rows as ``sqlite3.Row``)."""

        def run(conn: sqlite3.Connection) -> builtins.list[sqlite3.Row]:
            cursor = conn.execute(sql, tuple(params))
            cursor.row_factory = sqlite3.Row
            return cursor.fetchall()

        if not self._writer.running:
            await self.open()
        return await self._writer.read(run)

    async def setup(self, projection: Projection) -> tuple[int, set[str]]:
        if not self._writer.running:
            await self.open()
        name = projection.name

        def setup(conn: sqlite3.Connection) -> tuple[int, set[str]]:
            projection.setup(conn)
            row = conn.execute(
                "SELECT position FROM seamwork_checkpoints WHERE projection = ?", (name,)
            ).fetchone()
            parked = conn.execute(
                "SELECT DISTINCT stream FROM seamwork_parked WHERE projection = ?", (name,)
            )
            return (0 if row is None else row[0], {r[0] for r in parked})

        return await self._writer.write(setup)

    async def apply_batch(
        self,
        projection: Projection,
        events: Sequence[RecordedEvent],
        parked: Collection[str],
        *,
        after: int | None = None,
    ) -> BatchResult:
        now = time.time()
        return await self._writer.write(
            lambda conn: apply_page(conn, _SQL, _apply_in_savepoint, projection, events, now, after)
        )

    async def reset(self, projection: Projection) -> None:
        name = projection.name

        def reset(conn: sqlite3.Connection) -> None:
            # First: the checkpoint row is what pages lock (fence on), so a page in
            # flight commits before the read model is emptied. It is kept, at 0.
            conn.execute(_SQL.reset_checkpoint, (name,))
            projection.reset(conn)
            conn.execute("DELETE FROM seamwork_parked WHERE projection = ?", (name,))

        await self._writer.write(reset)

    async def parked(self, projection: str) -> builtins.list[ParkedEvent]:
        if not self._writer.running:
            await self.open()
        rows = await self._writer.read(
            lambda conn: conn.execute(
                "SELECT projection, stream, position, event_type, error, parked_at "
                "FROM seamwork_parked WHERE projection = ? ORDER BY stream, position",
                (projection,),
            ).fetchall()
        )
        return [ParkedEvent(*row) for row in rows]

    async def replay(
        self, projection: Projection, stream: str, events: Sequence[RecordedEvent]
    ) -> int:
        return await self._writer.write(
            lambda conn: replay_stream(conn, _SQL, _apply_in_savepoint, projection, stream, events)
        )


def _apply_in_savepoint(
    conn: sqlite3.Connection, projection: Projection, event: RecordedEvent
) -> str | None:
    """Apply one event; on error roll back just its writes and say why."""
    conn.execute("SAVEPOINT event")
    try:
        projection.apply(event, conn)
    except Exception as exc:
        conn.execute("ROLLBACK TO event")
        conn.execute("RELEASE event")
        return f"{type(exc).__name__}: {exc}"
    conn.execute("RELEASE event")
    return None
