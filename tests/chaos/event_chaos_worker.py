"""Processes for the event gap-safety chaos test (``test_event_gap_safety.py``).

``subscribe BACKEND TARGET READ_MODEL``: a tailing, checkpointing subscriber - a
``ProjectionRunner`` whose handler records (position, event id) of every event it
sees into a SQLite read model, in the same transaction as its checkpoint. Touches
``READ_MODEL.ready`` once running; runs until killed.

``write-sqlite PATH INDEX EVENTS SEED OUT``: one of the concurrent SQLite writers,
with its own store on the shared file. Now and then it holds the write lock from a
raw ``sqlite3`` connection instead - BEGIN IMMEDIATE, an event row inserted, a
sleep, then a ROLLBACK - so the other writers queue behind a transaction that sleeps
and the rolled-back row's position is handed out again. Writes the ids of the events
it committed to ``OUT`` (JSON) at the end.
"""

from __future__ import annotations

import asyncio
import json
import random
import sqlite3
import sys
import time
from pathlib import Path

from seamwork.events import (
    EventStore,
    NewEvent,
    Projection,
    ProjectionRunner,
    RecordedEvent,
    handles,
)
from seamwork.storage import SQLiteReadModel

RAW_HOLD_RATE = 0.05


class Delivered(Projection):
    """Every event, in the order the projection saw it."""

    name = "delivered"

    def setup(self, conn: sqlite3.Connection) -> None:
        conn.execute(
            "CREATE TABLE IF NOT EXISTS delivered ("
            " seq INTEGER PRIMARY KEY, position INTEGER NOT NULL, event_id TEXT NOT NULL)"
        )

    @handles("Written")
    def written(self, event: RecordedEvent, conn: sqlite3.Connection) -> None:
        conn.execute(
            "INSERT INTO delivered (position, event_id) VALUES (?, ?)", (event.position, event.id)
        )


async def subscribe(backend: str, target: str, read_model: str) -> None:
    store = EventStore.sqlite(target) if backend == "sqlite" else EventStore.postgres(target)
    model = SQLiteReadModel(read_model)
    async with store:
        await model.open()
        async with ProjectionRunner(store, Delivered(), model, batch_size=200):
            Path(read_model + ".ready").touch()
            await asyncio.Event().wait()


def hold_raw_transaction(path: str, rng: random.Random) -> None:
    conn = sqlite3.connect(path, isolation_level=None, timeout=30)
    try:
        conn.execute("BEGIN IMMEDIATE")
        conn.execute(
            "INSERT INTO seamwork_events (stream, version, id, type, schema_version, data, "
            "metadata, recorded_at) VALUES (?, 0, ?, 'Written', 1, '{}', NULL, ?)",
            (f"raw-{rng.random()}", f"raw-{rng.random()}", time.time()),
        )
        time.sleep(rng.uniform(0.001, 0.01))
        conn.execute("ROLLBACK")
    finally:
        conn.close()


async def write_sqlite(path: str, index: int, total: int, seed: int, out: str) -> None:
    rng = random.Random(seed)
    committed: list[str] = []
    async with EventStore.sqlite(path) as store:
        while len(committed) < total:
            if rng.random() < RAW_HOLD_RATE:
                await asyncio.to_thread(hold_raw_transaction, path, rng)
                continue
            count = min(total - len(committed), rng.randint(1, 8))
            batch = [NewEvent("Written", {"writer": index}) for _ in range(count)]
            await store.append(f"w{index}-{rng.randrange(20)}", batch)
            committed.extend(e.id for e in batch)
            await asyncio.sleep(rng.uniform(0, 0.002))
    Path(out).write_text(json.dumps(committed))


def main(argv: list[str]) -> None:
    if argv[0] == "subscribe":
        asyncio.run(subscribe(argv[1], argv[2], argv[3]))
    elif argv[0] == "write-sqlite":
        asyncio.run(write_sqlite(argv[1], int(argv[2]), int(argv[3]), int(argv[4]), argv[5]))
    else:
        raise SystemExit(f"unknown command {argv[0]!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
