"""What both read model stores do inside a page's transaction, written once.

A page is fenced on the stored checkpoint (events at or below it were applied by an
earlier page - another runner, an overlapping replica - and are skipped), parked
streams are read from the table (the truth, whoever parked them), each event runs
in its own savepoint, and the checkpoint moves in the same transaction. Only the
placeholder style and the savepoint helper differ between SQLite and PostgreSQL.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from seamwork.events._model import RecordedEvent
from seamwork.events._projection import BatchResult, Projection

ApplyOne = Callable[[Any, Projection, RecordedEvent], str | None]


class PageSQL:
    """The read model statements in one driver's placeholder style (``?`` or ``%s``)."""

    def __init__(self, mark: str, *, lock_checkpoint: str = "") -> None:
        self.checkpoint = (
            f"SELECT position FROM seamwork_checkpoints WHERE projection = {mark}{lock_checkpoint}"
        )
        self.parked_streams = (
            f"SELECT DISTINCT stream FROM seamwork_parked WHERE projection = {mark}"
        )
        self.parked_positions = (
            f"SELECT position FROM seamwork_parked WHERE projection = {mark} "
            f"AND stream = {mark} ORDER BY position"
        )
        self.park = (
            "INSERT INTO seamwork_parked (projection, stream, position, event_type, error, "
            f"parked_at) VALUES ({mark}, {mark}, {mark}, {mark}, {mark}, {mark}) "
            "ON CONFLICT (projection, stream, position) "
            "DO UPDATE SET error = excluded.error, parked_at = excluded.parked_at"
        )
        self.reset_checkpoint = (
            f"INSERT INTO seamwork_checkpoints (projection, position) VALUES ({mark}, 0) "
            "ON CONFLICT (projection) DO UPDATE SET position = 0"
        )
        self.set_checkpoint = (
            f"INSERT INTO seamwork_checkpoints (projection, position) VALUES ({mark}, {mark}) "
            "ON CONFLICT (projection) DO UPDATE SET position = excluded.position"
        )
        self.unpark = (
            f"DELETE FROM seamwork_parked WHERE projection = {mark} AND stream = {mark} "
            f"AND position = {mark}"
        )
        self.note_error = (
            f"UPDATE seamwork_parked SET error = {mark} WHERE projection = {mark} "
            f"AND stream = {mark} AND position = {mark}"
        )


def storable(error: str) -> str:
    """``error`` as text both stores can keep: PostgreSQL's text holds no NUL and
    neither driver encodes a lone surrogate, so each is written as its escape
    (``\\x00``, ``\\ud800``); a failing write would lose the parking."""
    return error.replace("\x00", "\\x00").encode("utf-8", "backslashreplace").decode("utf-8")


def apply_page(
    conn: Any,
    sql: PageSQL,
    apply_one: ApplyOne,
    projection: Projection,
    events: Sequence[RecordedEvent],
    now: float,
    after: int | None = None,
) -> BatchResult:
    """Apply a page of events after the stored checkpoint, parking what fails; none
    if the page was read after a position the stored checkpoint is behind (a reset
    since: applying it would move the checkpoint past events the rebuild needs)."""
    name = projection.name
    row = conn.execute(sql.checkpoint, (name,)).fetchone()
    done = 0 if row is None else int(row[0])
    if after is not None and done < after:
        return BatchResult(done, 0, ())
    fresh = [e for e in events if e.position > done]
    if not fresh:
        return BatchResult(done, 0, ())
    blocked = {r[0] for r in conn.execute(sql.parked_streams, (name,)).fetchall()}
    newly: list[str] = []
    applied = 0
    for event in fresh:
        if event.stream in blocked:  # queued behind an earlier failure: keep the order
            conn.execute(sql.park, (name, event.stream, event.position, event.type, None, now))
            continue
        error = apply_one(conn, projection, event)
        if error is None:
            applied += 1
            continue
        error = storable(error)
        conn.execute(sql.park, (name, event.stream, event.position, event.type, error, now))
        blocked.add(event.stream)
        newly.append(event.stream)
    conn.execute(sql.set_checkpoint, (name, fresh[-1].position))
    return BatchResult(fresh[-1].position, applied, tuple(newly))


def replay_stream(
    conn: Any,
    sql: PageSQL,
    apply_one: ApplyOne,
    projection: Projection,
    stream: str,
    events: Sequence[RecordedEvent],
) -> int:
    """Apply ``stream``'s parked events again, in order, stopping at the first that
    still fails; only events still parked (read in this transaction) are touched.

    The checkpoint row is locked first, as a page locks it (PostgreSQL): a page of
    another replica that read the stream as parked commits before this reads what is
    parked, and one after waits for this to commit and finds the stream free. Without
    it, such a page parked its event behind events this unparked: stuck, no error."""
    name = projection.name
    conn.execute(sql.checkpoint, (name,))
    parked = [r[0] for r in conn.execute(sql.parked_positions, (name, stream)).fetchall()]
    by_position = {e.position: e for e in events}
    done = 0
    for position in parked:
        event = by_position.get(position)
        if event is None:
            return done
        error = apply_one(conn, projection, event)
        if error is not None:
            conn.execute(sql.note_error, (storable(error), name, stream, position))
            return done
        conn.execute(sql.unpark, (name, stream, position))
        done += 1
    return done
