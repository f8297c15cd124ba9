"""Leases on PostgreSQL: a worker that cannot renew stops before its lease runs out."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import psycopg

from seamwork.saga import Saga, SagaOrchestrator, Step, StepContext
from seamwork.storage import PostgresStore

LEASE = 1.5


async def test_a_worker_that_cannot_renew_stops_its_sagas_before_their_lease_runs_out(
    pg_dsn: str,
) -> None:
    entered = asyncio.Event()
    stopped: list[float] = []

    async def ship(ctx: StepContext) -> None:
        entered.set()
        try:
            await asyncio.sleep(3600)
        finally:
            stopped.append(time.time())

    saga = Saga("order", steps=[Step("ship", ship)])
    orch = SagaOrchestrator(
        PostgresStore(pg_dsn, query_timeout=0.2),
        [saga],
        lease_seconds=LEASE,
        recovery_interval=0.1,
    )
    async with orch:
        await orch.start("order", {}, saga_id="s-1")
        await entered.wait()
        # Another session holds the row: every renewal now misses its deadline (the
        # server is there, this worker just cannot reach the row), as in a partition.
        async with await psycopg.AsyncConnection.connect(pg_dsn) as blocker:
            cursor = await blocker.execute(
                "SELECT lease_expires_at FROM seamwork_sagas WHERE saga_id = 's-1' FOR UPDATE"
            )
            row = await cursor.fetchone()
            assert row is not None
            expires = float(row[0])  # no renewal can move it while the row is held
            await asyncio.sleep(expires - time.time() + 0.5)
            assert stopped, "the step still runs on a lease that has run out"
            assert stopped[0] < expires  # before any other worker may claim the saga
            assert orch.running == 0
            assert orch.stats["lease_lost"] == 1
            await blocker.rollback()
        # The database is reachable again: the saga is claimed and run again.
        await asyncio.wait_for(_until(lambda: orch.running == 1), 5.0)


async def _until(predicate: Callable[[], bool]) -> None:
    while not predicate():
        await asyncio.sleep(0.02)
