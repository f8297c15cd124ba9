"""The PostgreSQL batchers' deadline: one watchdog timer for all their batches, each
batch still held to its own deadline (the stalled-server case, where cutting the
connection ends the batch, is in tests/chaos/test_pg_event_faults.py)."""

from __future__ import annotations

import asyncio
import time

import pytest

from seamwork.errors import StoreUnavailable
from seamwork.storage._pg import AsyncCursor, PgBatcher

pytestmark = pytest.mark.postgres


async def test_each_batch_is_held_to_its_own_deadline(pg_dsn: str) -> None:
    """Batches one after another, each within the deadline though together past it, all
    succeed (the timer set for the first one waits on for the batch then in hand); a
    batch that hangs on something the cut connection cannot end (here a sleep) fails
    at its own deadline plus the backstop, and the next batch runs on a new connection."""
    durations = [0.2, 0.2, 0.2, 60.0, 0.0]

    async def run(cursor: AsyncCursor, items: list[int]) -> list[int | BaseException]:
        await asyncio.sleep(durations[items[0]])
        await cursor.execute(b"SELECT 1")
        return items

    batcher: PgBatcher[int, int] = PgBatcher(pg_dsn, run, name="test", deadline=0.3)
    await batcher.start()
    try:
        assert [await batcher.submit(i) for i in range(3)] == [0, 1, 2]
        started = time.monotonic()
        with pytest.raises(StoreUnavailable, match=r"did not answer within 0.3s"):
            await batcher.submit(3)
        assert 0.5 <= time.monotonic() - started < 2.0
        assert await batcher.submit(4) == 4
    finally:
        await batcher.close()


async def test_closing_stops_the_watchdog(pg_dsn: str) -> None:
    async def run(cursor: AsyncCursor, items: list[int]) -> list[int | BaseException]:
        return items

    batcher: PgBatcher[int, int] = PgBatcher(pg_dsn, run, name="test", deadline=30.0)
    await batcher.start()
    assert await batcher.submit(1) == 1
    assert batcher._watchdog is not None
    await batcher.close()
    assert batcher._watchdog is None
