"""The orchestrator's lifecycle racing its runs and operator calls, on a real SQLite
store (a slow reply or commit stands in for a loaded machine or network)."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from seamwork.errors import InvalidSagaOperation
from seamwork.saga import Saga, SagaOrchestrator, SagaState, SagaStatus, Step, StepContext
from seamwork.storage import SQLiteStore


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "sagas.db"


async def _noop(ctx: StepContext) -> None:
    return None


async def _declined(ctx: StepContext) -> None:
    from seamwork.saga import StepFailed

    raise StepFailed("declined")


async def _cannot_undo(ctx: StepContext) -> None:
    raise RuntimeError("cannot undo")


GIVES_UP = Saga(
    "order",
    steps=[Step("reserve", _noop, compensate=_cannot_undo), Step("charge", _declined)],
    compensation_backoff=0.001,
    max_compensation_attempts=2,
)


class SlowStuckReply(SQLiteStore):
    """The real store, whose reply to the save that makes a saga stuck comes late (the
    commit is in): the orchestrator is closed meanwhile."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.committed = asyncio.Event()

    async def save(self, state: SagaState, events: Any, **options: Any) -> None:
        await super().save(state, events, **options)
        if state.status is SagaStatus.STUCK:
            self.committed.set()
            await asyncio.sleep(3600)


async def test_closing_while_a_stuck_save_is_answered_still_gets_its_alert_out(db: Path) -> None:
    alerts: list[str] = []
    store = SlowStuckReply(db)
    orch = SagaOrchestrator(store, [GIVES_UP], on_stuck=lambda s: alerts.append(s.saga_id))
    async with orch:
        await orch.start("order", {}, saga_id="s-1")
        await asyncio.wait_for(store.committed.wait(), 5.0)
    async with SagaOrchestrator(
        SQLiteStore(db), [GIVES_UP], on_stuck=lambda s: alerts.append(s.saga_id)
    ) as again:
        await asyncio.sleep(0.05)  # a recovery round
        stored = await again.get("s-1")
    assert alerts == ["s-1"]  # sent once, by one of the two
    assert stored is not None
    assert (stored.status, stored.lease_owner) == (SagaStatus.STUCK, None)


class HeldCancel(SQLiteStore):
    """The real store, whose commit of a saga's cancel is held up (a slow disk): the
    orchestrator is closed before it is made."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.cancelling = asyncio.Event()

    async def save(self, state: SagaState, events: Any, **options: Any) -> None:
        if any(e.event == "cancelled" for e in events):
            self.cancelling.set()
            await asyncio.sleep(3600)
        await super().save(state, events, **options)


async def test_a_cancel_the_close_cut_before_its_commit_is_not_reported_done(db: Path) -> None:
    entered = asyncio.Event()

    async def hang(ctx: StepContext) -> None:
        entered.set()
        await asyncio.sleep(3600)

    saga = Saga("order", steps=[Step("reserve", hang, compensate=_noop)])
    store = HeldCancel(db)
    orch = SagaOrchestrator(store, [saga])
    async with orch:
        await orch.start("order", {}, saga_id="s-1")
        await entered.wait()
        cancel = asyncio.create_task(orch.cancel("s-1"))
        await asyncio.wait_for(store.cancelling.wait(), 5.0)
    with pytest.raises(InvalidSagaOperation, match="before its cancel was confirmed stored"):
        await asyncio.wait_for(cancel, 5.0)
    with sqlite3.connect(db) as conn:
        (status,) = conn.execute("SELECT status FROM seamwork_sagas").fetchone()
    assert status == "running"  # it was never cancelled: it resumes forward


class LateCreateReply(SQLiteStore):
    """The real store, whose reply to a saga's create comes late (the commit is in):
    the orchestrator is closed meanwhile."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.created = asyncio.Event()
        self.reply = asyncio.Event()

    async def create(self, state: SagaState, events: Any) -> bool:
        created = await super().create(state, events)
        self.created.set()
        await self.reply.wait()
        return created


async def test_a_start_under_way_when_the_orchestrator_closes_runs_nothing_after_the_close(
    db: Path,
) -> None:
    ran: list[str] = []

    async def reserve(ctx: StepContext) -> None:
        ran.append(ctx.saga_id)
        if len(ran) == 1:
            await asyncio.sleep(3600)  # in flight when the orchestrator closes

    saga = Saga("order", steps=[Step("reserve", reserve, compensate=_noop)])
    store = LateCreateReply(db)
    orch = SagaOrchestrator(store, [saga])
    await orch.open()
    start = asyncio.create_task(orch.start("order", {}, saga_id="s-1"))
    await asyncio.wait_for(store.created.wait(), 5.0)
    closing = asyncio.create_task(orch.aclose())
    await asyncio.sleep(0.05)
    store.reply.set()
    await asyncio.wait_for(closing, 5.0)
    run = await asyncio.wait_for(start, 5.0)  # stored before the close: a handle
    ran_before_close = list(ran)
    await asyncio.sleep(0.1)
    assert ran == ran_before_close  # no step runs on a closed orchestrator
    assert orch.running == 0
    assert not [t for t in asyncio.all_tasks() if t.get_name() == "saga:s-1"]
    with sqlite3.connect(db) as conn:
        row = conn.execute("SELECT status, lease_owner FROM seamwork_sagas").fetchone()
    assert row == ("running", None)  # released by the close: the next start resumes it
    async with SagaOrchestrator(SQLiteStore(db), [saga]) as again:
        state = await asyncio.wait_for(again.handle(run.saga_id).wait(), 5.0)
    assert state.status is SagaStatus.COMPLETED
    assert set(ran) == {"s-1"}


async def test_every_operator_write_on_a_closed_orchestrator_says_it_is_not_open(
    db: Path,
) -> None:
    alerts: list[str] = []
    async with SagaOrchestrator(
        SQLiteStore(db), [GIVES_UP], on_stuck=lambda s: alerts.append(s.saga_id)
    ) as orch:
        state = await asyncio.wait_for((await orch.start("order", {}, saga_id="s-1")).wait(), 5)
    assert state.status is SagaStatus.STUCK
    for call in (
        lambda: orch.start("order", {}, saga_id="s-2"),
        lambda: orch.retry("s-1"),
        lambda: orch.abort("s-1"),
        lambda: orch.cancel("s-1"),
    ):
        with pytest.raises(InvalidSagaOperation, match="not open"):
            await call()


class SlowClaimReply(SQLiteStore):
    """The real store; once ``slow`` is set, its reply to a claim arrives late (the
    claim is committed: the sagas are leased to the claimer)."""

    slow = False

    async def claim(self, owner: str, runnable: Any, **options: Any) -> Any:
        result = await super().claim(owner, runnable, **options)
        if self.slow and (result.claimed or result.alerts):
            await asyncio.sleep(0.3)
        return result


async def test_a_close_during_a_recovery_claim_releases_what_that_claim_leased(
    db: Path,
) -> None:
    """The recovery loop's claim had committed, its reply not yet in, when the
    orchestrator closed: the sagas it leased were neither run nor released, so (with
    leases shared on PostgreSQL) every other worker had to wait out the lease. The close
    now lets the claim finish and then stops and releases its runs too."""
    store = SlowClaimReply(db)
    orch = SagaOrchestrator(
        store, [Saga("order", steps=[Step("a", _noop)])], recovery_interval=0.02
    )
    await orch.open()
    parked = SagaState("parked", "order", 1, SagaStatus.RUNNING, started_at=1.0, updated_at=1.0)
    store.slow = True
    await store.create(parked, [])  # as a crashed worker leaves a saga: running, no lease
    await asyncio.sleep(0.15)  # the loop has claimed it; the reply is on its way
    await orch.aclose()
    with sqlite3.connect(db) as conn:
        row = conn.execute(
            "SELECT status, lease_owner FROM seamwork_sagas WHERE saga_id = 'parked'"
        ).fetchone()
    assert row[1] is None, f"left leased to the closed orchestrator: {row}"


async def test_a_wait_cut_by_a_close_says_the_orchestrator_closed(db: Path) -> None:
    """wait() on a saga whose run a close stopped (or on a closed orchestrator) raises
    InvalidSagaOperation saying so; it raised the closed store's StoreError ('... is not
    open'), which reads like a database outage."""

    async def forever(ctx: StepContext) -> None:
        await asyncio.sleep(3600)

    orch = SagaOrchestrator(SQLiteStore(db), [Saga("order", steps=[Step("a", forever)])])
    await orch.open()
    run = await orch.start("order", {}, saga_id="s-1")
    waiting = asyncio.create_task(run.wait())
    await asyncio.sleep(0.05)
    await orch.aclose()
    with pytest.raises(InvalidSagaOperation, match="closed"):
        await waiting
    with pytest.raises(InvalidSagaOperation, match="closed"):
        await run.wait()
