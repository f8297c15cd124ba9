"""Leases on PostgreSQL: a worker that cannot renew stops before its lease runs out."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import psycopg

from seamwork.saga import (
    Saga,
    SagaOrchestrator,
    SagaState,
    SagaStatus,
    Step,
    StepContext,
    StepFailed,
)
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


async def test_an_alert_its_worker_never_sent_goes_out_from_another_once_the_lease_expires(
    pg_dsn: str,
) -> None:
    """Worker w1 died between a saga's stuck save and its alert (the row as that save
    leaves it: stuck, leased to w1): w2 sends the alert when the lease has expired, not
    before, and only once."""
    saga = Saga("order", steps=[Step("reserve", _noop, compensate=_noop)])
    expires = time.time() + 1.0
    owed = SagaState(
        "s-1",
        "order",
        1,
        SagaStatus.STUCK,
        completed_steps=("reserve",),
        compensation_attempts={"reserve": 3},
        lease_owner="w1:dead",
        lease_expires_at=expires,
    )
    store = PostgresStore(pg_dsn)
    await store.open()
    await store.create(owed, [])
    await store.aclose()
    alerts: list[tuple[str, float]] = []
    orch = SagaOrchestrator(
        PostgresStore(pg_dsn),
        [saga],
        owner="w2",
        recovery_interval=0.05,
        on_stuck=lambda state: alerts.append((state.saga_id, time.time())),
    )
    async with orch:
        await asyncio.wait_for(_until(lambda: bool(alerts)), 5.0)
        await asyncio.sleep(0.3)  # more recovery rounds: nothing more is owed
        stored = await orch.get("s-1")
    assert [saga_id for saga_id, _ in alerts] == ["s-1"]
    assert alerts[0][1] >= expires
    assert orch.stats["late_alerts"] == 1
    assert stored is not None
    assert (stored.status, stored.lease_owner) == (SagaStatus.STUCK, None)


async def _noop(ctx: StepContext) -> None:
    return None


async def test_a_renewal_beside_a_batch_of_saves_never_deadlocks_with_it(pg_dsn: str) -> None:
    """A worker's writer commits several sagas' transitions in one transaction while its
    recovery loop renews their leases on another connection: both lock the same rows,
    so they must lock them in one order. (They did not: a batch saving s2 then s1 and a
    renewal taking s1 then s2 deadlocked; PostgreSQL aborted the batch, and its sagas
    were reloaded as if the database had gone away.)"""
    store = PostgresStore(pg_dsn)
    await store.open()
    try:
        base = SagaState("s1", "order", 1, SagaStatus.RUNNING, lease_owner="w1:a")
        for saga_id in ("s1", "s2"):
            await store.create(base.evolve(saga_id=saga_id, lease_expires_at=9e12), [])
        async with await psycopg.AsyncConnection.connect(pg_dsn, autocommit=True) as conn:
            # Saving s2 holds its row a while: the batch has locked s2 and not yet s1.
            await conn.execute(
                "CREATE FUNCTION slow_s2() RETURNS trigger LANGUAGE plpgsql AS "
                "$$ BEGIN PERFORM pg_sleep(0.5); RETURN NEW; END $$"
            )
            await conn.execute(
                "CREATE TRIGGER slow_s2 BEFORE UPDATE ON seamwork_sagas FOR EACH ROW "
                "WHEN (NEW.saga_id = 's2' AND NEW.current_step_index = 1) "
                "EXECUTE FUNCTION slow_s2()"
            )
        moved = [base.evolve(saga_id=s, current_step_index=1) for s in ("s2", "s1")]
        saves = asyncio.gather(*(store.save(s, [], owner="w1:a") for s in moved))
        await asyncio.sleep(0.2)
        kept = await store.renew("w1:a", ["s1", "s2"], now=time.time(), lease_seconds=30)
        await saves
        assert kept == {"s1", "s2"}
        for saga_id in ("s1", "s2"):
            stored = await store.get(saga_id)
            assert stored is not None
            assert stored.current_step_index == 1
    finally:
        await store.aclose()


class _SlowStuckReply(PostgresStore):
    """The real store, whose reply to the save that makes a saga stuck comes late (the
    commit is in): the worker is closed meanwhile."""

    committed: asyncio.Event

    async def save(self, state: SagaState, events: Any, **options: Any) -> None:
        await super().save(state, events, **options)
        if state.status is SagaStatus.STUCK:
            self.committed.set()
            await asyncio.sleep(3600)


async def test_a_worker_closed_while_its_stuck_save_is_answered_still_sends_the_alert(
    pg_dsn: str,
) -> None:
    async def declined(ctx: StepContext) -> None:
        raise StepFailed("declined")

    async def cannot_undo(ctx: StepContext) -> None:
        raise RuntimeError("cannot undo")

    saga = Saga(
        "order",
        steps=[Step("reserve", _noop, compensate=cannot_undo), Step("charge", declined)],
        compensation_backoff=0.001,
        max_compensation_attempts=2,
    )
    alerts: list[str] = []
    store = _SlowStuckReply(pg_dsn)
    store.committed = asyncio.Event()
    async with SagaOrchestrator(
        store, [saga], owner="w1", on_stuck=lambda s: alerts.append(s.saga_id)
    ) as orch:
        await orch.start("order", {}, saga_id="s-1")
        await asyncio.wait_for(store.committed.wait(), 5.0)
    async with SagaOrchestrator(
        PostgresStore(pg_dsn),
        [saga],
        owner="w2",
        lease_seconds=0.3,
        recovery_interval=0.05,
        on_stuck=lambda s: alerts.append(s.saga_id),
    ) as other:
        await asyncio.sleep(0.5)  # past any lease w1 could have kept: nothing more owed
        stored = await other.get("s-1")
    assert alerts == ["s-1"]
    assert stored is not None
    assert (stored.status, stored.lease_owner) == (SagaStatus.STUCK, None)
