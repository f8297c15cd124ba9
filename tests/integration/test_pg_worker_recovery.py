"""Recovery on PostgreSQL: what a worker's claim loop does with rows it cannot run."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable

import psycopg
import pytest

from seamwork.saga import Saga, SagaOrchestrator, SagaState, SagaStatus, Step, StepContext
from seamwork.storage import PostgresStore


async def _noop(ctx: StepContext) -> None:
    return None


async def _until(predicate: Callable[[], bool]) -> None:
    while not predicate():
        await asyncio.sleep(0.02)


async def _seed(dsn: str, *states: SagaState) -> None:
    store = PostgresStore(dsn)
    await store.open()
    try:
        for state in states:
            await store.create(state, [])
    finally:
        await store.aclose()


async def test_a_row_its_definition_cannot_run_stops_only_itself_not_the_worker(
    pg_dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A v1 saga stored at step 3 of a definition that now has one step (edited without
    a version bump): the worker still opens and runs the other sagas; that one is
    logged and counted as an error. Before, its claim raised out of the start-up
    recovery and the worker could not start at all."""
    saga = Saga("order", steps=[Step("a", _noop)])
    await _seed(
        pg_dsn,
        SagaState("bad", "order", 1, SagaStatus.RUNNING, current_step_index=3, updated_at=1.0),
        SagaState("good", "order", 1, SagaStatus.RUNNING, updated_at=2.0),
    )
    caplog.set_level(logging.CRITICAL, logger="seamwork.saga")
    orch = SagaOrchestrator(PostgresStore(pg_dsn), [saga], lease_seconds=1.0, recovery_interval=0.1)
    async with orch:
        final = await asyncio.wait_for(orch.handle("good").wait(), 5.0)
        await asyncio.wait_for(_until(lambda: orch.stats["errors"] == 1), 5.0)
        bad = await orch.get("bad")
    assert final.status is SagaStatus.COMPLETED
    assert bad is not None
    assert (bad.status, bad.current_step_index) == (SagaStatus.RUNNING, 3)


async def test_renew_and_release_go_past_pooled_connections_the_server_dropped(
    pg_dsn: str,
) -> None:
    """After a database restart (or a failover) the pool still holds the dead idle
    connections. A renewal that failed on each in turn cost a recovery round apiece,
    and with a tight lease the worker stopped its sagas as if their leases were lost."""
    name = f"seamwork_renew_{uuid.uuid4().hex[:8]}"
    store = PostgresStore(f"{pg_dsn} application_name={name}")
    await store.open()
    try:
        leased = SagaState("s-1", "order", 1, SagaStatus.RUNNING, lease_owner="w1:a")
        await store.create(leased, [])
        await asyncio.gather(*(store.get("s-1") for _ in range(4)))  # the pool fills up
        for call in ("renew", "release"):
            await _terminate(pg_dsn, name)
            if call == "renew":
                kept = await store.renew("w1:a", ["s-1"], now=time.time(), lease_seconds=30)
                assert kept == {"s-1"}
            else:
                await store.release("w1:a", ["s-1"])
                stored = await store.get("s-1")
                assert stored is not None
                assert stored.lease_owner is None
    finally:
        await store.aclose()


async def test_a_claim_goes_past_pooled_connections_the_server_dropped(pg_dsn: str) -> None:
    """After a database restart a claim failed once per dead idle connection in the
    pool, a recovery round apiece: the sagas left by a dead worker waited that long."""
    name = f"seamwork_claim_{uuid.uuid4().hex[:8]}"
    store = PostgresStore(f"{pg_dsn} application_name={name}")
    await store.open()
    try:
        free = SagaState("s-1", "order", 1, SagaStatus.RUNNING)
        await store.create(free, [])
        await asyncio.gather(*(store.get("s-1") for _ in range(4)))  # the pool fills up
        await _terminate(pg_dsn, name)
        result = await store.claim(
            "w1:a", [("order", 1)], now=time.time(), lease_seconds=30, limit=10
        )
        assert [s.saga_id for s in result.claimed] == ["s-1"]
    finally:
        await store.aclose()


async def _terminate(dsn: str, application_name: str) -> None:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s",
            (application_name,),
        )
    await asyncio.sleep(0.2)  # the backends are gone; the pool does not know yet


async def test_a_repeated_start_runs_its_own_earlier_saga_only_on_a_renewed_lease(
    pg_dsn: str,
) -> None:
    """A start() whose commit was in doubt left the saga leased to this worker, unrun;
    the client repeats the start after that lease expired. Before, the saga was run on
    the expired lease: another worker's claim could take it at the same moment and run
    its step too. Now the lease is renewed first (fenced on the owner)."""
    entered, checked = asyncio.Event(), asyncio.Event()

    async def step(ctx: StepContext) -> None:
        entered.set()
        await checked.wait()

    saga = Saga("order", steps=[Step("a", step)])
    orch = SagaOrchestrator(
        PostgresStore(pg_dsn), [saga], lease_seconds=30.0, recovery_interval=10.0
    )
    async with orch:
        expired = time.time() - 1.0
        await _seed(
            pg_dsn,
            SagaState(
                "s-1",
                "order",
                1,
                SagaStatus.RUNNING,
                lease_owner=orch.owner,
                lease_expires_at=expired,
            ),
        )
        await orch.start("order", {}, saga_id="s-1")
        await asyncio.wait_for(entered.wait(), 5.0)
        stored = await orch.get("s-1")
        checked.set()
        final = await asyncio.wait_for(orch.handle("s-1").wait(), 5.0)
    assert stored is not None
    assert stored.lease_owner == orch.owner
    assert stored.lease_expires_at is not None
    assert stored.lease_expires_at > time.time() + 20, "its step ran on an expired lease"
    assert final.status is SagaStatus.COMPLETED
