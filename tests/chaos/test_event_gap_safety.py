"""Chaos: a tailing subscriber must never skip an event that commits late.

Eight writers append 20,000 events while holding their transactions open for random
sleeps and rolling back 5% of them. A checkpointing subscriber (``ProjectionRunner``
into a SQLite read model, in ``event_chaos_worker.py``) tails ``$all`` in its own
process; it is SIGKILLed once mid-run and restarted. At the end the read model must
hold every committed event exactly once, nothing rolled back, in ``$all`` order
(positions strictly increasing in the order the projection inserted them).

PostgreSQL: eight connections each append with ``append_in`` inside explicit
transactions (sleep before and after the append, so commits land out of
transaction-id order). SQLite: eight writer processes with their own stores on one
file, which now and then hold BEGIN IMMEDIATE from a raw connection, insert, sleep
and roll back.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

import pytest

from seamwork.events import EventStore, NewEvent

pytestmark = pytest.mark.chaos

WORKER = Path(__file__).with_name("event_chaos_worker.py")
WRITERS = 8
EVENTS = 20_000
ROLLBACK_RATE = 0.05
KILL_AFTER_DELIVERED = 3_000


def delivered(read_model: Path) -> list[tuple[int, str]]:
    """(position, event id) in the order the projection inserted them."""
    if not read_model.exists():
        return []
    conn = sqlite3.connect(read_model, timeout=10)
    try:
        return conn.execute("SELECT position, event_id FROM delivered ORDER BY seq").fetchall()
    except sqlite3.OperationalError:
        return []
    finally:
        conn.close()


def count_delivered(read_model: Path) -> int:
    if not read_model.exists():
        return 0
    conn = sqlite3.connect(read_model, timeout=10)
    try:
        return int(conn.execute("SELECT count(*) FROM delivered").fetchone()[0])
    except sqlite3.OperationalError:
        return 0
    finally:
        conn.close()


class Subscriber:
    """The subscriber process: start, SIGKILL, restart."""

    def __init__(self, backend: str, target: str, read_model: Path, log: Path) -> None:
        self.args = [sys.executable, str(WORKER), "subscribe", backend, target, str(read_model)]
        self.read_model = read_model
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None
        self.kills = 0
        self.restarts = 0

    async def start(self) -> None:
        ready = Path(f"{self.read_model}.ready")
        ready.unlink(missing_ok=True)
        with open(self.log, "a") as log:
            self.proc = subprocess.Popen(self.args, stdout=subprocess.DEVNULL, stderr=log)
        deadline = time.monotonic() + 20
        while not ready.exists():
            assert self.proc.poll() is None, self.log.read_text()
            assert time.monotonic() < deadline, "subscriber did not start"
            await asyncio.sleep(0.02)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    async def kill_once_and_restart(self) -> None:
        while count_delivered(self.read_model) < KILL_AFTER_DELIVERED:
            assert self.alive(), self.log.read_text()
            await asyncio.sleep(0.02)
        self.kill()
        self.kills += 1
        await asyncio.sleep(0.3)  # writers carry on while it is down
        await self.start()
        self.restarts += 1

    async def wait_for(self, expected: int, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while count_delivered(self.read_model) < expected:
            assert self.alive(), self.log.read_text()
            assert time.monotonic() < deadline, (
                f"{count_delivered(self.read_model)} of {expected} delivered"
            )
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)  # anything extra (a duplicate) would show up now


async def run_with_subscriber(subscriber: Subscriber, writers: Awaitable[list[str]]) -> list[str]:
    await subscriber.start()
    try:
        killer = asyncio.create_task(subscriber.kill_once_and_restart())
        committed = await writers
        # killed while the writers still wrote: it tailed live, not a catch-up at the end
        assert subscriber.kills == 1, "the subscriber was not killed mid-run"
        await killer
        await subscriber.wait_for(len(committed))
    finally:
        if subscriber.proc is not None and subscriber.proc.poll() is None:
            subscriber.kill()
    return committed


async def all_events(store: EventStore) -> list[Any]:
    found, position = [], 0
    while page := await store.read_all(from_position=position, limit=5000):
        found.extend(page)
        position = page[-1].position
    return found


async def check(store: EventStore, read_model: Path, committed: list[str]) -> None:
    rows = delivered(read_model)
    positions = [position for position, _ in rows]
    assert all(a < b for a, b in itertools.pairwise(positions)), "delivered out of $all order"
    ids = Counter(event_id for _, event_id in rows)
    assert [i for i, n in ids.items() if n > 1] == [], "delivered twice"
    assert set(ids) == set(committed), "lost or phantom events"
    assert len(committed) == EVENTS
    stored = await all_events(store)
    assert [e.id for e in stored] == [event_id for _, event_id in rows]


# --- PostgreSQL ------------------------------------------------------------------------


async def pg_writer(store: Any, dsn: str, index: int, quota: int) -> list[str]:
    import psycopg

    rng = random.Random(index)
    committed: list[str] = []
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        while len(committed) < quota:
            count = min(quota - len(committed), rng.randint(1, 8))
            batch = [NewEvent("Written", {"writer": index}) for _ in range(count)]
            roll_back = rng.random() < ROLLBACK_RATE
            async with conn.transaction():
                await asyncio.sleep(rng.uniform(0, 0.002))
                await store.append_in(conn, f"w{index}-{rng.randrange(20)}", batch)
                await asyncio.sleep(rng.uniform(0, 0.004))
                if roll_back:
                    raise psycopg.Rollback()
            if not roll_back:
                committed.extend(e.id for e in batch)
    return committed


async def pg_writers(store: Any, dsn: str) -> list[str]:
    quotas = [EVENTS // WRITERS] * WRITERS
    results = await asyncio.gather(*(pg_writer(store, dsn, i, q) for i, q in enumerate(quotas)))
    return [event_id for ids in results for event_id in ids]


@pytest.mark.postgres
@pytest.mark.timeout(90)
async def test_postgres_subscriber_sees_every_late_commit_exactly_once_in_order(
    pg_dsn: str, tmp_path: Path
) -> None:
    read_model = tmp_path / "read.db"
    subscriber = Subscriber("postgres", pg_dsn, read_model, tmp_path / "subscriber.log")
    async with EventStore.postgres(pg_dsn) as store:
        committed = await run_with_subscriber(subscriber, pg_writers(store, pg_dsn))
        assert subscriber.restarts == 1
        await check(store, read_model, committed)


# --- SQLite ----------------------------------------------------------------------------


async def sqlite_writers(path: Path, workdir: Path) -> list[str]:
    import json

    procs = []
    for index in range(WRITERS):
        out = workdir / f"writer-{index}.json"
        args = [str(path), str(index), str(EVENTS // WRITERS), str(index), str(out)]
        procs.append(
            (
                await asyncio.create_subprocess_exec(
                    sys.executable, str(WORKER), "write-sqlite", *args
                ),
                out,
            )
        )
    committed: list[str] = []
    for proc, out in procs:
        assert await proc.wait() == 0
        committed.extend(json.loads(out.read_text()))
    return committed


@pytest.mark.timeout(90)
async def test_sqlite_subscriber_sees_every_commit_exactly_once_in_order(tmp_path: Path) -> None:
    path = tmp_path / "events.db"
    read_model = tmp_path / "read.db"
    async with EventStore.sqlite(path) as store:  # creates the schema before the writers
        subscriber = Subscriber("sqlite", str(path), read_model, tmp_path / "subscriber.log")
        committed = await run_with_subscriber(subscriber, sqlite_writers(path, tmp_path))
        assert subscriber.restarts == 1
        await check(store, read_model, committed)
