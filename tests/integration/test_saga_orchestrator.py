"""The orchestrator end to end on a real SQLite store: DESIGN.md §3's rules, one by one."""

from __future__ import annotations

import asyncio
import logging
import math
import sqlite3
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pytest

from seamwork.errors import (
    ConfigError,
    CorruptSagaError,
    InvalidSagaOperation,
    SagaDefinitionError,
    SerializationError,
    StoreError,
    UnknownSagaError,
)
from seamwork.saga import (
    Parallel,
    Retry,
    Saga,
    SagaMachine,
    SagaOrchestrator,
    SagaState,
    SagaStatus,
    Step,
    StepContext,
    StepFailed,
)
from seamwork.storage import SQLiteStore


class Ledger:
    """Records what each step and compensation did, in order."""

    def __init__(self) -> None:
        self.log: list[tuple[str, str, str]] = []  # (kind, step, idempotency key)

    def action(
        self,
        name: str,
        *,
        result: dict[str, Any] | None = None,
        fail: Callable[[StepContext], BaseException | None] | None = None,
        sleep: float = 0.0,
    ) -> Callable[[StepContext], Any]:
        async def run(ctx: StepContext) -> dict[str, Any] | None:
            error = fail(ctx) if fail else None
            if isinstance(error, StepFailed):
                raise error
            self.log.append(("apply", name, ctx.idempotency_key))
            if sleep:
                await asyncio.sleep(sleep)
            if error is not None:
                raise error
            return result

        return run

    def undo(self, name: str, *, fail_times: int = 0) -> Callable[[StepContext], Any]:
        failures = {"left": fail_times}

        async def run(ctx: StepContext) -> None:
            if failures["left"]:
                failures["left"] -= 1
                raise RuntimeError(f"cannot undo {name}")
            self.log.append(("undo", name, ctx.idempotency_key))

        return run

    def kinds(self, kind: str) -> list[str]:
        return [step for k, step, _ in self.log if k == kind]


def chain(ledger: Ledger, *names: str, **steps: Step) -> list[Step]:
    return [
        steps.get(n) or Step(n, ledger.action(n, result={n: True}), compensate=ledger.undo(n))
        for n in names
    ]


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "sagas.db"


async def run_saga(db: Path, saga: Saga, data: dict[str, Any] | None = None) -> SagaState:
    async with SagaOrchestrator(SQLiteStore(db), [saga]) as orch:
        run = await orch.start(saga.name, data or {"order_id": 1}, saga_id="s-1")
        return await run.wait()


# --- forward ------------------------------------------------------------------------


async def test_a_saga_runs_every_step_in_order_and_merges_results(db: Path) -> None:
    ledger = Ledger()
    saga = Saga("order", steps=chain(ledger, "reserve", "charge", "ship", "confirm"))
    state = await run_saga(db, saga, {"order_id": 42})
    assert state.status is SagaStatus.COMPLETED
    assert ledger.kinds("apply") == ["reserve", "charge", "ship", "confirm"]
    assert state.completed_steps == ("reserve", "charge", "ship", "confirm")
    assert state.context == {
        "order_id": 42,
        "reserve": True,
        "charge": True,
        "ship": True,
        "confirm": True,
    }
    assert [key for _, _, key in ledger.log] == [
        "s-1:reserve",
        "s-1:charge",
        "s-1:ship",
        "s-1:confirm",
    ]


async def test_each_transition_is_exactly_one_commit(db: Path) -> None:
    ledger = Ledger()
    saga = Saga("order", steps=chain(ledger, "a", "b", "c", "d"))
    store = SQLiteStore(db)
    async with SagaOrchestrator(store, [saga]) as orch:
        await (await orch.start("order", {}, saga_id="warm")).wait()
        before = store.commits
        await (await orch.start("order", {}, saga_id="s-1")).wait()
        commits = store.commits - before
    assert commits == 5  # start + one per step (the last also completes the saga)


async def test_steps_see_earlier_results_in_their_context(db: Path) -> None:
    seen: list[dict[str, Any]] = []

    async def second(ctx: StepContext) -> None:
        seen.append(dict(ctx.data))

    saga = Saga(
        "order",
        steps=[
            Step("first", Ledger().action("first", result={"payment_id": "p-9"})),
            Step("second", second),
        ],
    )
    await run_saga(db, saga, {"order_id": 3})
    assert seen == [{"order_id": 3, "payment_id": "p-9"}]


# --- failures and compensation --------------------------------------------------------


async def test_a_definite_failure_compensates_completed_steps_in_reverse(db: Path) -> None:
    ledger = Ledger()
    declined = Step(
        "charge",
        ledger.action("charge", fail=lambda ctx: StepFailed("card declined")),
        compensate=ledger.undo("charge"),
    )
    saga = Saga("order", steps=chain(ledger, "reserve", "hold", "charge", charge=declined))
    state = await run_saga(db, saga)
    assert state.status is SagaStatus.FAILED
    assert state.failure_reason == "step 'charge' failed: card declined"
    assert ledger.kinds("undo") == ["hold", "reserve"]  # the declined step is not undone
    assert state.compensated_steps == ("hold", "reserve")
    undo_keys = [key for kind, _, key in ledger.log if kind == "undo"]
    assert undo_keys == ["s-1:hold:compensate", "s-1:reserve:compensate"]


async def test_a_step_that_applied_then_timed_out_is_compensated(db: Path) -> None:
    ledger = Ledger()
    slow = Step(
        "ship", ledger.action("ship", sleep=5.0), compensate=ledger.undo("ship"), timeout=0.05
    )
    saga = Saga("order", steps=chain(ledger, "reserve", "ship", ship=slow))
    state = await run_saga(db, saga)
    assert state.status is SagaStatus.FAILED
    assert state.uncertain_steps == ("ship",)
    assert ledger.kinds("undo") == ["ship", "reserve"]
    async with SagaOrchestrator(SQLiteStore(db), [saga]) as orch:
        events = await orch._store.timeline("s-1")  # type: ignore[attr-defined]
    assert ("timed_out", "ship") in [(e.event, e.step) for e in events]


async def test_uncertain_failures_are_retried_with_the_same_key(db: Path) -> None:
    ledger = Ledger()
    attempts: list[tuple[int, str]] = []

    def flaky(ctx: StepContext) -> BaseException | None:
        attempts.append((ctx.attempt, ctx.idempotency_key))
        return ConnectionError("reset") if ctx.attempt < 3 else None

    retried = Step(
        "charge",
        ledger.action("charge", fail=flaky),
        compensate=ledger.undo("charge"),
        retry=Retry(3, backoff=0.001),
    )
    state = await run_saga(db, Saga("order", steps=chain(ledger, "charge", charge=retried)))
    assert state.status is SagaStatus.COMPLETED
    assert attempts == [(1, "s-1:charge"), (2, "s-1:charge"), (3, "s-1:charge")]
    assert state.step_attempts == {"charge": 2}


async def test_an_uncertain_step_that_stays_failed_is_compensated_too(db: Path) -> None:
    ledger = Ledger()
    broken = Step(
        "charge",
        ledger.action("charge", fail=lambda ctx: ConnectionError("reset")),
        compensate=ledger.undo("charge"),
        retry=Retry(2, backoff=0.001),
    )
    state = await run_saga(
        db, Saga("order", steps=chain(ledger, "reserve", "charge", charge=broken))
    )
    assert state.status is SagaStatus.FAILED
    assert ledger.kinds("apply") == ["reserve", "charge", "charge"]
    assert ledger.kinds("undo") == ["charge", "reserve"]
    assert "ConnectionError: reset" in (state.failure_reason or "")


async def test_step_failed_is_never_retried(db: Path) -> None:
    calls: list[int] = []

    async def decline(ctx: StepContext) -> None:
        calls.append(ctx.attempt)
        raise StepFailed("declined")

    saga = Saga("order", steps=[Step("charge", decline, retry=Retry(5, backoff=0.001))])
    state = await run_saga(db, saga)
    assert state.status is SagaStatus.FAILED
    assert calls == [1]


async def test_compensation_failures_are_retried_then_the_saga_recovers(db: Path) -> None:
    ledger = Ledger()
    steps = [
        Step("reserve", ledger.action("reserve"), compensate=ledger.undo("reserve", fail_times=2)),
        Step("charge", ledger.action("charge", fail=lambda ctx: StepFailed("no"))),
    ]
    saga = Saga("order", steps=steps, compensation_backoff=0.001)
    state = await run_saga(db, saga)
    assert state.status is SagaStatus.FAILED
    assert state.compensation_attempts == {"reserve": 2}
    assert ledger.kinds("undo") == ["reserve"]


async def test_a_compensation_that_keeps_failing_ends_stuck_and_raises_the_alert(
    db: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ledger = Ledger()
    steps = [
        Step("reserve", ledger.action("reserve"), compensate=ledger.undo("reserve", fail_times=99)),
        Step("charge", ledger.action("charge", fail=lambda ctx: StepFailed("no"))),
    ]
    saga = Saga("order", steps=steps, compensation_backoff=0.001, max_compensation_attempts=4)
    alerts: list[SagaState] = []
    with caplog.at_level(logging.ERROR, logger="seamwork.saga"):
        async with SagaOrchestrator(SQLiteStore(db), [saga], on_stuck=alerts.append) as orch:
            state = await (await orch.start("order", {}, saga_id="s-1")).wait()
    assert state.status is SagaStatus.STUCK
    assert state.compensation_attempts == {"reserve": 4}
    assert [a.saga_id for a in alerts] == ["s-1"]
    assert any(
        "ALERT saga s-1" in r.getMessage() and "stuck" in r.getMessage() for r in caplog.records
    )
    async with SagaOrchestrator(SQLiteStore(db), [saga], on_stuck=alerts.append) as orch:
        stored = await orch.get("s-1")
        await asyncio.sleep(0.05)  # a recovery round: nothing is owed, nothing is sent
    assert stored is not None
    assert stored.lease_owner is None  # the alert went out, and the lease with it
    assert len(alerts) == 1
    assert orch.stats["late_alerts"] == 0


async def test_a_restarted_orchestrator_sends_the_alert_its_predecessor_never_did(
    db: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The process died between a saga's stuck save and its alert (the row as that save
    leaves it: stuck, still leased): the next one sends the alert, once."""
    saga = Saga("order", steps=[Step("reserve", _noop, compensate=_noop)])
    dead = SagaState(
        "s-1",
        "order",
        1,
        SagaStatus.STUCK,
        completed_steps=("reserve",),
        compensation_attempts={"reserve": 3},
        failure_reason="charge: declined",
        lease_owner="worker:dead",
        lease_expires_at=time.time() + 3600,
    )
    store = SQLiteStore(db)
    await store.open()
    await store.create(dead, [])
    await store.aclose()
    alerts: list[SagaState] = []
    with caplog.at_level(logging.ERROR, logger="seamwork.saga"):
        async with SagaOrchestrator(SQLiteStore(db), [saga], on_stuck=alerts.append) as orch:
            await asyncio.sleep(0.05)
    assert [(a.saga_id, a.status) for a in alerts] == [("s-1", SagaStatus.STUCK)]
    assert orch.stats["late_alerts"] == 1
    assert any(
        "ALERT saga s-1" in r.getMessage() and "late" in r.getMessage() for r in caplog.records
    )
    async with SagaOrchestrator(SQLiteStore(db), [saga], on_stuck=alerts.append) as orch:
        stored = await orch.get("s-1")
        await asyncio.sleep(0.05)
    assert len(alerts) == 1
    assert stored is not None
    assert (stored.status, stored.lease_owner) == (SagaStatus.STUCK, None)


async def _noop(ctx: StepContext) -> None:
    return None


async def test_operator_retry_of_a_stuck_saga_finishes_its_compensation(db: Path) -> None:
    ledger = Ledger()
    undo = ledger.undo("reserve", fail_times=3)
    steps = [
        Step("reserve", ledger.action("reserve"), compensate=undo),
        Step("charge", ledger.action("charge", fail=lambda ctx: StepFailed("no"))),
    ]
    saga = Saga("order", steps=steps, compensation_backoff=0.001)
    async with SagaOrchestrator(SQLiteStore(db), [saga]) as orch:
        stuck = await (await orch.start("order", {}, saga_id="s-1")).wait()
        assert stuck.status is SagaStatus.STUCK
        final = await (await orch.retry("s-1")).wait()
        with pytest.raises(InvalidSagaOperation, match="failed"):
            await orch.retry("s-1")
    assert final.status is SagaStatus.FAILED
    assert final.compensated_steps == ("reserve",)


async def test_operator_abort_marks_a_stuck_saga_failed(db: Path) -> None:
    ledger = Ledger()
    steps = [
        Step("reserve", ledger.action("reserve"), compensate=ledger.undo("reserve", fail_times=9)),
        Step("charge", ledger.action("charge", fail=lambda ctx: StepFailed("no"))),
    ]
    saga = Saga("order", steps=steps, compensation_backoff=0.001)
    async with SagaOrchestrator(SQLiteStore(db), [saga]) as orch:
        await (await orch.start("order", {}, saga_id="s-1")).wait()
        aborted = await orch.abort("s-1", "refunded by hand")
        stored = await orch.get("s-1")
    assert aborted.status is SagaStatus.FAILED
    assert stored == aborted
    assert "refunded by hand" in (stored.failure_reason or "")


# --- shapes: parallel, conditional ---------------------------------------------------


async def test_parallel_steps_run_together_and_undo_in_reverse_completion_order(
    db: Path,
) -> None:
    ledger = Ledger()
    running: list[str] = []
    overlap: list[int] = []

    def timed(name: str, delay: float) -> Step:
        async def run(ctx: StepContext) -> dict[str, bool]:
            running.append(name)
            overlap.append(len(running))
            await asyncio.sleep(delay)
            running.remove(name)
            ledger.log.append(("apply", name, ctx.idempotency_key))
            return {name: True}

        return Step(name, run, compensate=ledger.undo(name))

    fail = Step("charge", ledger.action("charge", fail=lambda ctx: StepFailed("no")))
    saga = Saga(
        "order",
        steps=[Parallel(timed("slow", 0.06), timed("fast", 0.01), timed("mid", 0.03)), fail],
    )
    state = await run_saga(db, saga)
    assert max(overlap) == 3
    assert state.completed_steps == ("fast", "mid", "slow")
    assert ledger.kinds("undo") == ["slow", "mid", "fast"]


async def test_a_failure_inside_a_parallel_group_lets_siblings_finish_then_undoes_them(
    db: Path,
) -> None:
    ledger = Ledger()
    bad = Step(
        "b", ledger.action("b", fail=lambda ctx: StepFailed("no")), compensate=ledger.undo("b")
    )
    saga = Saga("order", steps=[*chain(ledger, "first"), Parallel(*chain(ledger, "a", "c"), bad)])
    state = await run_saga(db, saga)
    assert state.status is SagaStatus.FAILED
    assert sorted(ledger.kinds("undo")[:2]) == ["a", "c"]
    assert ledger.kinds("undo")[-1] == "first"
    assert "b" not in ledger.kinds("undo")


async def test_a_step_whose_condition_is_false_is_skipped(db: Path) -> None:
    ledger = Ledger()
    gift = Step("gift_wrap", ledger.action("gift_wrap"), when=lambda data: bool(data.get("gift")))
    saga = Saga("order", steps=chain(ledger, "reserve", "gift_wrap", "ship", gift_wrap=gift))
    state = await run_saga(db, saga, {"gift": False})
    assert state.status is SagaStatus.COMPLETED
    assert ledger.kinds("apply") == ["reserve", "ship"]
    assert state.skipped_steps == ("gift_wrap",)


# --- deadline and cancellation ----------------------------------------------------------


async def test_a_saga_past_its_deadline_is_cancelled_and_compensated(db: Path) -> None:
    ledger = Ledger()
    slow = Step("ship", ledger.action("ship", sleep=10.0), compensate=ledger.undo("ship"))
    saga = Saga("order", steps=chain(ledger, "reserve", "ship", ship=slow), deadline=0.2)
    state = await run_saga(db, saga)
    assert state.status is SagaStatus.FAILED
    assert "deadline" in (state.failure_reason or "")
    assert ledger.kinds("undo") == ["ship", "reserve"]


async def test_members_that_failed_before_the_deadline_cut_their_group_keep_their_events(
    db: Path,
) -> None:
    ledger = Ledger()
    bad = Step(
        "a", ledger.action("a", fail=lambda ctx: StepFailed("no")), compensate=ledger.undo("a")
    )
    flaky = Step(
        "c",
        ledger.action("c", fail=lambda ctx: RuntimeError("reset")),
        compensate=ledger.undo("c"),
        retry=Retry(3, backoff=0.02, max_backoff=0.02, jitter="none"),
    )
    slow = Step("b", ledger.action("b", sleep=10.0), compensate=ledger.undo("b"))
    saga = Saga("order", steps=[*chain(ledger, "first"), Parallel(bad, flaky, slow)], deadline=0.4)
    async with SagaOrchestrator(SQLiteStore(db), [saga]) as orch:
        final = await asyncio.wait_for((await orch.start("order", {}, saga_id="s-1")).wait(), 5)
        timeline = [(e.event, e.step, e.attempt) for e in await orch._store.timeline("s-1")]
    assert final.status is SagaStatus.FAILED
    assert "deadline" in (final.failure_reason or "")
    cut = timeline.index(("cancelled", None, None))
    assert sorted(timeline[6:cut]) == [  # after saga_started .. started b
        ("errored", "c", 1),
        ("errored", "c", 2),
        ("errored", "c", 3),  # its last attempt, before the deadline: lost before
        ("failed", "a", 1),  # a's definite failure, before the deadline: lost before
    ]
    assert final.step_attempts == {"a": 1, "c": 3}
    assert final.uncertain_steps == ("c", "b")
    assert ledger.kinds("undo") == ["b", "c", "first"]  # never a


async def test_cancel_interrupts_the_step_in_flight_and_compensates(db: Path) -> None:
    ledger = Ledger()
    gate = asyncio.Event()

    async def wait_forever(ctx: StepContext) -> None:
        ledger.log.append(("apply", "ship", ctx.idempotency_key))
        gate.set()
        await asyncio.sleep(3600)

    saga = Saga(
        "order",
        steps=chain(
            ledger,
            "reserve",
            "ship",
            ship=Step("ship", wait_forever, compensate=ledger.undo("ship")),
        ),
    )
    async with SagaOrchestrator(SQLiteStore(db), [saga]) as orch:
        run = await orch.start("order", {}, saga_id="s-1")
        await gate.wait()
        cancelled = await orch.cancel("s-1")
        final = await run.wait()
    assert cancelled.status is SagaStatus.COMPENSATING
    assert cancelled.failure_reason == "cancelled by operator"
    assert final.status is SagaStatus.FAILED
    assert ledger.kinds("undo") == ["ship", "reserve"]


async def test_cancel_during_the_commit_before_a_retry_backoff_does_not_wait_it_out(
    db: Path,
) -> None:
    ledger = Ledger()
    flaky = Step(
        "charge",
        ledger.action("charge", fail=lambda ctx: RuntimeError("connection reset")),
        compensate=ledger.undo("charge"),
        retry=Retry(5, backoff=60.0, max_backoff=60.0, jitter="none"),
    )
    saga = Saga("order", steps=chain(ledger, "reserve", "charge", charge=flaky))
    store = SQLiteStore(db)
    real_save = store.save
    saving, release = asyncio.Event(), asyncio.Event()

    async def slow_save(state: SagaState, events: Any, **kw: Any) -> None:
        if any(e.event == "errored" for e in events):  # the attempt's failure, before backoff
            saving.set()
            await release.wait()
        await real_save(state, events, **kw)

    store.save = slow_save  # type: ignore[method-assign]
    async with SagaOrchestrator(store, [saga]) as orch:
        run = await orch.start("order", {}, saga_id="s-1")
        await saving.wait()
        cancel = asyncio.create_task(orch.cancel("s-1"))
        await asyncio.sleep(0.01)
        release.set()
        cancelled = await asyncio.wait_for(cancel, 5.0)  # not after the 60 s backoff
        final = await asyncio.wait_for(run.wait(), 5.0)
    assert cancelled.status is SagaStatus.COMPENSATING
    assert final.status is SagaStatus.FAILED
    assert final.failure_reason == "cancelled by operator"
    assert ledger.kinds("apply") == ["reserve", "charge"]
    assert ledger.kinds("undo") == ["charge", "reserve"]


async def test_cancel_as_a_parallel_stage_begins_stops_its_members_before_they_run(
    db: Path,
) -> None:
    ledger = Ledger()
    slow = {n: Step(n, ledger.action(n, sleep=2.0), compensate=ledger.undo(n)) for n in "ab"}
    saga = Saga("order", steps=[Parallel(slow["a"], slow["b"])])
    async with SagaOrchestrator(SQLiteStore(db), [saga]) as orch:
        run = await orch.start("order", {}, saga_id="s-1")
        await asyncio.sleep(0)  # the saga's task enters the stage; its members start next
        began = asyncio.get_running_loop().time()
        cancelled = await orch.cancel("s-1")  # awaited here: it runs before the members
        took = asyncio.get_running_loop().time() - began
        final = await run.wait()
    assert took < 1.0  # not after the members' 2 s
    assert cancelled.status is not SagaStatus.COMPLETED
    assert final.status is SagaStatus.FAILED
    assert final.failure_reason == "cancelled by operator"
    assert final.completed_steps == ()
    assert ledger.log == []  # never started, so nothing to compensate


async def test_a_retry_the_deadline_overtakes_still_compensates_the_uncertain_first_attempt(
    db: Path,
) -> None:
    ledger = Ledger()
    flaky = Step(
        "charge",
        ledger.action("charge", fail=lambda ctx: RuntimeError("connection reset")),
        compensate=ledger.undo("charge"),
        retry=Retry(3, backoff=0.2, max_backoff=0.2, jitter="none"),
    )
    saga = Saga("order", steps=chain(ledger, "reserve", "charge", charge=flaky), deadline=0.4)
    store = SQLiteStore(db)
    real_save = store.save

    async def slow_save(state: SagaState, events: Any, **kw: Any) -> None:
        if any(e.event == "errored" for e in events):  # the commit before the backoff is
            await asyncio.sleep(0.3)  # slow: the backoff ends past the deadline
        await real_save(state, events, **kw)

    store.save = slow_save  # type: ignore[method-assign]
    async with SagaOrchestrator(store, [saga]) as orch:
        final = await asyncio.wait_for((await orch.start("order", {}, saga_id="s-1")).wait(), 5)
    assert final.status is SagaStatus.FAILED
    assert "deadline" in (final.failure_reason or "")
    assert ledger.kinds("apply") == ["reserve", "charge"]  # the retry never began
    assert final.uncertain_steps == ("charge",)
    assert ledger.kinds("undo") == ["charge", "reserve"]  # attempt 1 may have applied


async def test_cancel_of_a_completed_saga_is_refused(db: Path) -> None:
    saga = Saga("order", steps=chain(Ledger(), "a"))
    async with SagaOrchestrator(SQLiteStore(db), [saga]) as orch:
        await (await orch.start("order", {}, saga_id="s-1")).wait()
        with pytest.raises(InvalidSagaOperation, match="completed"):
            await orch.cancel("s-1")


async def test_cancel_of_a_saga_that_completes_while_the_cancel_is_pending_is_refused(
    db: Path,
) -> None:
    ledger = Ledger()
    saga = Saga("order", steps=chain(ledger, "a"))
    store = SQLiteStore(db)
    real_save = store.save
    saving, release = asyncio.Event(), asyncio.Event()

    async def slow_save(state: SagaState, events: Any, **kw: Any) -> None:
        if any(e.event == "saga_completed" for e in events):  # the last step's commit
            saving.set()
            await release.wait()
        await real_save(state, events, **kw)

    store.save = slow_save  # type: ignore[method-assign]
    async with SagaOrchestrator(store, [saga]) as orch:
        run = await orch.start("order", {}, saga_id="s-1")
        await saving.wait()
        cancel = asyncio.create_task(orch.cancel("s-1"))
        await asyncio.sleep(0.01)
        release.set()
        with pytest.raises(InvalidSagaOperation, match="completed"):
            await asyncio.wait_for(cancel, 5.0)  # as for a saga completed before the cancel
        final = await asyncio.wait_for(run.wait(), 5.0)
    assert final.status is SagaStatus.COMPLETED
    assert ledger.kinds("undo") == []


# --- identity, restarts, versions ---------------------------------------------------------


async def test_start_with_an_existing_id_starts_nothing(db: Path) -> None:
    ledger = Ledger()
    saga = Saga("order", steps=chain(ledger, "a"))
    other = Saga("refund", steps=chain(ledger, "r"))
    async with SagaOrchestrator(SQLiteStore(db), [saga, other]) as orch:
        first = await (await orch.start("order", {"n": 1}, saga_id="s-1")).wait()
        second = await (await orch.start("order", {"n": 2}, saga_id="s-1")).wait()
        with pytest.raises(InvalidSagaOperation, match="order"):
            await orch.start("refund", {}, saga_id="s-1")
    assert first == second
    assert ledger.kinds("apply") == ["a"]


async def test_start_with_the_id_of_a_running_saga_of_another_name_is_refused(
    db: Path,
) -> None:
    ledger = Ledger()
    gate = asyncio.Event()

    async def parked(ctx: StepContext) -> None:
        await gate.wait()

    saga = Saga("order", steps=[Step("a", parked)])
    other = Saga("refund", steps=chain(ledger, "r"))
    async with SagaOrchestrator(SQLiteStore(db), [saga, other]) as orch:
        run = await orch.start("order", {}, saga_id="s-1")
        assert orch.running == 1  # still running here: the id is found in memory
        with pytest.raises(InvalidSagaOperation, match="already used by a 'order' saga"):
            await orch.start("refund", {}, saga_id="s-1")
        again = await orch.start("order", {}, saga_id="s-1")
        gate.set()
        final = await again.wait()
        assert final == await run.wait()
    assert final.saga_name == "order"
    assert final.status is SagaStatus.COMPLETED
    assert ledger.kinds("apply") == []


async def test_a_saga_begun_by_an_earlier_process_resumes_and_can_be_awaited(db: Path) -> None:
    ledger = Ledger()
    entered = asyncio.Event()

    async def hang(ctx: StepContext) -> None:
        entered.set()
        await asyncio.sleep(3600)

    hanging = Saga("order", steps=chain(ledger, "reserve", "ship", ship=Step("ship", hang)))
    async with SagaOrchestrator(SQLiteStore(db), [hanging]) as orch:
        await orch.start("order", {}, saga_id="s-1")
        await entered.wait()
    working = Saga("order", steps=chain(ledger, "reserve", "ship"))
    async with SagaOrchestrator(SQLiteStore(db), [working]) as orch:
        state = await (await orch.start("order", {}, saga_id="s-1")).wait()
    assert state.status is SagaStatus.COMPLETED
    assert ledger.kinds("apply") == ["reserve", "ship"]  # reserve was not run again


async def test_a_saga_finishes_on_the_version_it_started_with(db: Path) -> None:
    ledger = Ledger()
    entered = asyncio.Event()

    async def hang(ctx: StepContext) -> None:
        entered.set()
        await asyncio.sleep(3600)

    v1_hanging = Saga("order", version=1, steps=chain(ledger, "a", "b", b=Step("b", hang)))
    async with SagaOrchestrator(SQLiteStore(db), [v1_hanging]) as orch:
        await orch.start("order", {}, saga_id="s-1")
        await entered.wait()
    v1 = Saga("order", version=1, steps=chain(ledger, "a", "b"))
    v2 = Saga("order", version=2, steps=chain(ledger, "a", "x", "y"))
    async with SagaOrchestrator(SQLiteStore(db), [v1, v2]) as orch:
        old = await (await orch.start("order", {}, saga_id="s-1")).wait()
        new = await (await orch.start("order", {}, saga_id="s-2")).wait()
    assert (old.saga_version, old.completed_steps) == (1, ("a", "b"))
    assert (new.saga_version, new.completed_steps) == (2, ("a", "x", "y"))


async def test_sagas_of_an_unregistered_version_are_reported_and_left_untouched(
    db: Path, caplog: pytest.LogCaptureFixture
) -> None:
    entered = asyncio.Event()

    async def hang(ctx: StepContext) -> None:
        entered.set()
        await asyncio.sleep(3600)

    async with SagaOrchestrator(SQLiteStore(db), [Saga("order", steps=[Step("a", hang)])]) as orch:
        await orch.start("order", {}, saga_id="old")
        await entered.wait()
    before = await _row(db, "old")
    reported: list[list[SagaState]] = []
    v2 = Saga("order", version=2, steps=chain(Ledger(), "a"))
    with caplog.at_level(logging.WARNING, logger="seamwork.saga"):
        async with SagaOrchestrator(SQLiteStore(db), [v2], on_stranded=reported.append) as orch:
            fresh = await (await orch.start("order", {}, saga_id="new")).wait()
    assert [[s.saga_id for s in batch] for batch in reported] == [["old"]]
    assert any("old" in r.getMessage() and "version 1" in r.getMessage() for r in caplog.records)
    assert fresh.status is SagaStatus.COMPLETED
    after = await _row(db, "old")
    assert after[:-2] == before[:-2]  # all but the lease columns, released on shutdown


async def test_a_corrupt_row_is_reported_by_id_and_other_sagas_keep_running(
    db: Path, caplog: pytest.LogCaptureFixture
) -> None:
    entered = asyncio.Event()

    async def hang(ctx: StepContext) -> None:
        entered.set()
        await asyncio.sleep(3600)

    hanging = Saga("order", steps=[Step("a", hang)])
    async with SagaOrchestrator(SQLiteStore(db), [hanging]) as orch:
        await orch.start("order", {}, saga_id="broken")
        await entered.wait()
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE seamwork_sagas SET completed_steps = 'oops' WHERE saga_id = 'broken'")
    broken = await _row(db, "broken")
    corrupt: list[str] = []
    working = Saga("order", steps=chain(Ledger(), "a"))
    with caplog.at_level(logging.ERROR, logger="seamwork.saga"):
        orch = SagaOrchestrator(SQLiteStore(db), [working])
        orch.on("corrupt", lambda error: corrupt.append(error.saga_id))
        async with orch:
            fresh = await (await orch.start("order", {}, saga_id="fine")).wait()
            with pytest.raises(CorruptSagaError, match="broken"):
                await orch.get("broken")
    assert fresh.status is SagaStatus.COMPLETED
    assert corrupt == ["broken"]
    assert any("'broken' is corrupt" in r.getMessage() for r in caplog.records)
    assert await _row(db, "broken") == broken  # kept as it was, for the operator to mend


# --- bad input ---------------------------------------------------------------------------


async def test_starting_an_unknown_saga_is_refused_and_writes_nothing(db: Path) -> None:
    async with SagaOrchestrator(
        SQLiteStore(db), [Saga("order", steps=chain(Ledger(), "a"))]
    ) as orch:
        with pytest.raises(UnknownSagaError, match="'refund'"):
            await orch.start("refund", {})
        with pytest.raises(UnknownSagaError, match="version 7"):
            await orch.start("order", {}, version=7)
        assert await orch.list() == []


async def test_a_context_that_is_not_json_is_refused_before_anything_is_written(
    db: Path,
) -> None:
    async with SagaOrchestrator(
        SQLiteStore(db), [Saga("order", steps=chain(Ledger(), "a"))]
    ) as orch:
        with pytest.raises(SerializationError, match=r"saga data\['items'\]\[1\]"):
            await orch.start("order", {"items": [1, {1, 2}]})
        with pytest.raises(SerializationError, match="nan"):
            await orch.start("order", {"total": float("nan")})
        assert await orch.list() == []


async def test_start_data_and_step_results_may_be_any_mapping(db: Path) -> None:
    async def frozen(ctx: StepContext) -> Mapping[str, Any]:
        return MappingProxyType({"seen": ctx.data["order_id"]})

    saga = Saga("order", steps=[Step("a", frozen)])
    async with SagaOrchestrator(SQLiteStore(db), [saga]) as orch:
        run = await orch.start("order", MappingProxyType({"order_id": 7}), saga_id="s-1")
        final = await run.wait()
        stored = await orch.get("s-1")
    assert final.status is SagaStatus.COMPLETED
    assert stored is not None
    assert stored.context == final.context == {"order_id": 7, "seen": 7}


async def test_a_step_result_that_is_not_json_is_an_uncertain_failure(db: Path) -> None:
    ledger = Ledger()
    odd = Step(
        "charge", ledger.action("charge", result={"at": object()}), compensate=ledger.undo("charge")
    )
    state = await run_saga(db, Saga("order", steps=chain(ledger, "charge", charge=odd)))
    assert state.status is SagaStatus.FAILED
    assert "not JSON-serializable" in (state.failure_reason or "")
    assert ledger.kinds("undo") == ["charge"]


async def test_a_parallel_member_whose_result_is_not_json_lets_siblings_finish_and_undoes_all(
    db: Path,
) -> None:
    ledger = Ledger()
    odd = Step("a", ledger.action("a", result={"at": object()}), compensate=ledger.undo("a"))
    slow = Step("b", ledger.action("b", result={"b": 1}, sleep=0.1), compensate=ledger.undo("b"))
    saga = Saga("order", steps=[*chain(ledger, "first"), Parallel(odd, slow)])
    async with SagaOrchestrator(SQLiteStore(db), [saga]) as orch:
        run = await orch.start("order", {}, saga_id="s-1")
        final = await asyncio.wait_for(run.wait(), 5.0)  # not after the lease (30 s)
        timeline = [(e.event, e.step) for e in await orch._store.timeline("s-1")]
        errors = orch.stats["errors"]
    assert errors == 0
    assert final.status is SagaStatus.FAILED
    assert final.completed_steps == ("first", "b")
    assert final.uncertain_steps == ("a",)
    assert ledger.kinds("undo") == ["a", "b", "first"]  # b applied after a's failure: undone
    assert timeline[-6:] == [
        ("errored", "a"),
        ("compensating", None),
        ("compensated", "a"),
        ("compensated", "b"),
        ("compensated", "first"),
        ("saga_failed", None),
    ]


async def test_data_with_a_non_string_key_is_refused_not_rewritten_as_a_string(
    db: Path,
) -> None:
    # JSON would store {7: "x"} as {"7": "x"}: the saga would see ctx.data[7] while it
    # runs in this process and ctx.data["7"] after a recovery.
    ledger = Ledger()
    odd = Step("charge", ledger.action("charge", result={7: "x"}), compensate=ledger.undo("charge"))
    saga = Saga("order", steps=chain(ledger, "charge", charge=odd))
    async with SagaOrchestrator(SQLiteStore(db), [saga]) as orch:
        with pytest.raises(SerializationError, match=r"saga data\[1\]"):
            await orch.start("order", {1: "x"}, saga_id="s-0")  # type: ignore[dict-item]
        assert await orch.get("s-0") is None
        final = await (await orch.start("order", {"order_id": 1}, saga_id="s-1")).wait()
        stored = await orch.get("s-1")
    assert stored is not None
    assert stored.context == final.context == {"order_id": 1}
    assert final.status is SagaStatus.FAILED
    assert "[7]" in (final.failure_reason or "")
    assert ledger.kinds("undo") == ["charge"]


async def _noop(ctx: StepContext) -> None:
    return None


def _sync(ctx: StepContext) -> None:
    return None


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: Saga("order", steps=[]), "has no steps"),
        (
            lambda: Saga("order", steps=[Step("a", _noop), Step("a", _noop)]),
            "duplicate step name 'a'",
        ),
        (lambda: Saga("", steps=[Step("a", _noop)]), "saga name"),
        (
            lambda: Saga("order", steps=[Step("a", _noop)], compensation_backoff="1"),
            "compensation_backoff",
        ),
        (
            lambda: Saga("order", steps=[Step("a", _noop)], compensation_backoff=float("nan")),
            "compensation_backoff",
        ),
        (
            lambda: Saga("order", steps=[Step("a", _noop)], max_compensation_attempts=True),
            "max_compensation_attempts",
        ),
        (lambda: Saga("o", version=0, steps=[Step("a", _noop)]), "version must be an int >= 1"),
        (lambda: Step("a", "charge"), "action must be callable"),  # type: ignore[arg-type]
        (lambda: Step("a", _sync), "action must be an async function"),  # type: ignore[arg-type]
        (lambda: Step("a", _noop, compensate=42), "compensate must be callable"),  # type: ignore[arg-type]
        (lambda: Step("a", _noop, timeout=0), "timeout must be a number of seconds > 0"),
        (lambda: Step("a", _noop, timeout=-1.5), "timeout must be a number of seconds > 0"),
        (lambda: Step("", _noop), "step name"),
        (lambda: Step("a\x00b", _noop), "step name must not contain NUL"),
        (lambda: Step("s" * 201, _noop), "step name must be at most 200 bytes"),
        (lambda: Step("a\ud800", _noop), "step name must be valid Unicode"),
        (lambda: Saga("o\x00", steps=[Step("a", _noop)]), "saga name must not contain NUL"),
        (lambda: Parallel(Step("a", _noop)), "at least two steps"),
        (lambda: Saga("o", steps=[Step("a", _noop)], deadline=0), "deadline"),
        (
            lambda: Saga("o", steps=[Step("a", _noop)], max_compensation_attempts=0),
            "max_compensation",
        ),
    ],
)
def test_malformed_definitions_are_refused_when_built(
    build: Callable[[], object], message: str
) -> None:
    with pytest.raises(SagaDefinitionError, match=message):
        build()


@pytest.mark.parametrize(
    ("saga_id", "message"),
    [
        ("order\x00-1", "must not contain NUL"),
        ("o" * 513, "must be at most 512 bytes"),
        ("order-\udc80", "must be valid Unicode"),
    ],
)
async def test_a_saga_id_a_store_or_ledger_cannot_hold_is_refused_before_anything_is_written(
    db: Path, saga_id: str, message: str
) -> None:
    """SQLite stored such ids and PostgreSQL refused them with a StoreError (a NUL, an
    index row too large) or a raw UnicodeEncodeError (a lone surrogate); an id near
    the index limit also made every step's idempotency key too long for a ledger."""
    async with SagaOrchestrator(SQLiteStore(db), [Saga("order", steps=[Step("a", _noop)])]) as orch:
        with pytest.raises(ConfigError, match=f"saga_id {message}"):
            await orch.start("order", {}, saga_id=saga_id)
        assert await orch.list() == []
        ok = await (await orch.start("order", {}, saga_id="o" * 512)).wait()
        assert ok.status is SagaStatus.COMPLETED


def test_an_orchestrator_refuses_the_same_version_twice(db: Path) -> None:
    saga = Saga("order", steps=[Step("a", _noop)])
    with pytest.raises(ValueError, match="registered twice"):
        SagaOrchestrator(SQLiteStore(db), [saga, saga])


async def _row(db: Path, saga_id: str) -> tuple[Any, ...]:
    with sqlite3.connect(db) as conn:
        row: tuple[Any, ...] = conn.execute(
            "SELECT * FROM seamwork_sagas WHERE saga_id = ?", (saga_id,)
        ).fetchone()
    return row


async def test_a_condition_that_raises_stops_only_its_saga_and_is_logged(
    db: Path, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(data: object) -> bool:
        raise KeyError("gift")

    ledger = Ledger()
    saga = Saga("order", steps=chain(ledger, "a", "b", b=Step("b", _noop, when=broken)))
    fine = Saga("other", steps=chain(ledger, "x"))
    with caplog.at_level(logging.ERROR, logger="seamwork.saga"):
        async with SagaOrchestrator(SQLiteStore(db), [saga, fine]) as orch:
            await orch.start("order", {}, saga_id="s-1")
            done = await (await orch.start("other", {}, saga_id="s-2")).wait()
            for _ in range(100):
                if orch.stats["errors"]:
                    break
                await asyncio.sleep(0.01)
            stored = await orch.get("s-1")
    assert done.status is SagaStatus.COMPLETED
    assert orch.stats["errors"] == 1
    assert stored is not None
    assert stored.status is SagaStatus.RUNNING  # left as it was, to be retried
    assert "saga s-1 stopped on an unexpected error" in caplog.text


async def test_max_running_caps_the_sagas_a_process_drives_at_once(db: Path) -> None:
    gate = asyncio.Event()
    running: list[str] = []
    peak: list[int] = []

    async def step(ctx: StepContext) -> None:
        running.append(ctx.saga_id)
        peak.append(len(running))
        await gate.wait()
        running.remove(ctx.saga_id)

    parked = Saga("order", steps=[Step("a", step)])
    async with SagaOrchestrator(SQLiteStore(db), [parked], recovery_interval=0.01) as orch:
        for n in range(5):
            await orch.start("order", {}, saga_id=f"s-{n}")
    running.clear()  # the first process stopped (its steps were cancelled mid-way)
    peak.clear()
    async with SagaOrchestrator(
        SQLiteStore(db), [parked], max_running=2, recovery_interval=0.01
    ) as orch:
        await asyncio.sleep(0.1)
        assert orch.running == 2
        gate.set()
        states = [await orch.handle(f"s-{n}").wait() for n in range(5)]
    assert all(s.status is SagaStatus.COMPLETED for s in states)
    assert max(peak) == 2


async def test_a_start_whose_commit_was_in_doubt_runs_on_the_retried_start(db: Path) -> None:
    ledger = Ledger()
    saga = Saga("order", steps=chain(ledger, "a"))
    orch = SagaOrchestrator(SQLiteStore(db), [saga])
    async with orch:
        begun = SagaMachine(saga).begin("s-1", {}, 1.0, owner=orch.owner, lease_expires_at=9e12)
        assert await orch._store.create(begun.state, begun.events)  # landed, caller never knew
        state = await (await orch.start("order", {}, saga_id="s-1")).wait()
    assert state.status is SagaStatus.COMPLETED
    assert ledger.kinds("apply") == ["a"]


async def test_a_parallel_stage_whose_commit_fails_reruns_without_orphans(db: Path) -> None:
    running: dict[str, int] = {"a": 0, "b": 0}
    overlap: list[int] = []
    ran_c: list[str] = []

    def member(name: str, delay: float) -> Step:
        async def run(ctx: StepContext) -> dict[str, int]:
            running[name] += 1
            overlap.append(running[name])
            try:
                await asyncio.sleep(delay)
            finally:
                running[name] -= 1
            return {name: 1}

        return Step(name, run, compensate=_noop)

    async def c(ctx: StepContext) -> None:
        ran_c.append(ctx.saga_id)

    saga = Saga("p", steps=[Parallel(member("a", 0.0), member("b", 0.3)), Step("c", c)])
    store = SQLiteStore(db)
    real_save = store.save
    failed: list[int] = []

    async def flaky_save(state: SagaState, events: Any, **kw: Any) -> None:
        if not failed and "a" in state.completed_steps and "b" not in state.completed_steps:
            failed.append(1)
            raise StoreError("commit failed (injected; nothing written)")
        await real_save(state, events, **kw)

    store.save = flaky_save  # type: ignore[method-assign]
    async with SagaOrchestrator(store, [saga]) as orch:
        final = await asyncio.wait_for((await orch.start("p", {}, saga_id="p1")).wait(), 10)
    assert failed == [1]
    assert max(overlap) == 1  # no step ran twice at once
    assert final.status is SagaStatus.COMPLETED
    assert sorted(final.completed_steps) == ["a", "b", "c"]
    assert ran_c == ["p1"]


async def test_closing_an_orchestrator_releases_its_leases(db: Path) -> None:
    entered = asyncio.Event()

    async def hang(ctx: StepContext) -> None:
        entered.set()
        await asyncio.sleep(3600)

    async with SagaOrchestrator(SQLiteStore(db), [Saga("order", steps=[Step("a", hang)])]) as orch:
        await orch.start("order", {}, saga_id="s-1")
        await entered.wait()
    row = await _row(db, "s-1")
    assert row[-2:] == (None, None)  # lease_owner, lease_expires_at


def test_a_recovery_interval_too_long_for_lease_renewal_is_refused(db: Path) -> None:
    with pytest.raises(ValueError, match="recovery_interval"):
        SagaOrchestrator(
            SQLiteStore(db),
            [Saga("o", steps=[Step("a", _noop)])],
            lease_seconds=3,
            recovery_interval=2,
        )


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("lease_seconds", math.inf),
        ("lease_seconds", math.nan),
        ("lease_seconds", "30"),
        ("lease_seconds", True),
        ("recovery_interval", math.nan),
        ("recovery_interval", -1.0),
    ],
)
def test_a_lease_or_interval_that_is_not_a_finite_positive_number_is_refused(
    db: Path, option: str, value: object
) -> None:
    """An infinite or NaN lease never expires (every comparison with it is false or
    it is always in the future): a worker that died would keep its sagas for ever."""
    with pytest.raises(ConfigError, match=f"{option} must be a finite number > 0"):
        SagaOrchestrator(SQLiteStore(db), [Saga("o", steps=[Step("a", _noop)])], **{option: value})


async def test_listing_with_an_unknown_status_is_refused_naming_it(db: Path) -> None:
    saga = Saga("order", steps=[Step("a", _noop)])
    async with SagaOrchestrator(SQLiteStore(db), [saga]) as orch:
        with pytest.raises(ConfigError, match=r"status must be one of running, .*'sleeping'"):
            await orch.list(status="sleeping")
        with pytest.raises(ConfigError, match="limit"):
            await orch.list(limit=-1)


async def test_a_cancel_whose_commit_fails_rereads_the_row_and_still_compensates(
    db: Path,
) -> None:
    ledger = Ledger()
    saga = Saga("order", steps=chain(ledger, "reserve", "ship"))
    store = SQLiteStore(db)
    real_save = store.save
    saving, release = asyncio.Event(), asyncio.Event()
    failed: list[str] = []

    async def flaky_save(state: SagaState, events: Any, **kw: Any) -> None:
        names = [e.event for e in events]
        if "completed" in names and state.completed_steps == ("reserve",):
            saving.set()  # the cancel arrives while this commit is under way
            await release.wait()
        if "cancelled" in names and not failed:
            failed.append("cancelled")
            raise StoreError("commit failed (injected; nothing written)")
        await real_save(state, events, **kw)

    store.save = flaky_save  # type: ignore[method-assign]
    async with SagaOrchestrator(store, [saga]) as orch:
        run = await orch.start("order", {}, saga_id="s-1")
        await saving.wait()
        cancel = asyncio.create_task(orch.cancel("s-1"))
        await asyncio.sleep(0.01)
        release.set()
        cancelled = await asyncio.wait_for(cancel, 5.0)
        final = await asyncio.wait_for(run.wait(), 5.0)  # not after the lease (30 s)
    assert failed == ["cancelled"]
    assert cancelled.status is SagaStatus.COMPENSATING
    assert final.status is SagaStatus.FAILED
    assert final.failure_reason == "cancelled by operator"
    assert ledger.kinds("apply") == ["reserve"]
    assert ledger.kinds("undo") == ["reserve"]


async def test_a_step_whose_success_commit_failed_is_compensated_if_cancelled_before_rerun(
    db: Path,
) -> None:
    ledger = Ledger()
    saga = Saga("order", steps=chain(ledger, "reserve", "charge"))
    store = SQLiteStore(db)
    real_save = store.save
    saving, release = asyncio.Event(), asyncio.Event()

    async def flaky_save(state: SagaState, events: Any, **kw: Any) -> None:
        if "charge" in state.completed_steps and not saving.is_set():
            saving.set()  # charge applied; the cancel arrives while its commit hangs,
            await release.wait()  # which then fails: the row still says charge is to run
            raise StoreError("commit failed (injected; nothing written)")
        await real_save(state, events, **kw)

    store.save = flaky_save  # type: ignore[method-assign]
    async with SagaOrchestrator(store, [saga]) as orch:
        run = await orch.start("order", {}, saga_id="s-1")
        await saving.wait()
        cancel = asyncio.create_task(orch.cancel("s-1"))
        await asyncio.sleep(0.01)
        release.set()
        await asyncio.wait_for(cancel, 5.0)
        final = await asyncio.wait_for(run.wait(), 5.0)
    assert final.status is SagaStatus.FAILED
    assert final.failure_reason == "cancelled by operator"
    assert ledger.kinds("apply") == ["reserve", "charge"]
    assert final.uncertain_steps == ("charge",)
    assert ledger.kinds("undo") == ["charge", "reserve"]  # charge may have applied: undone


async def test_a_step_whose_success_commit_failed_is_compensated_if_the_deadline_passes(
    db: Path,
) -> None:
    ledger = Ledger()
    saga = Saga("order", steps=chain(ledger, "reserve", "charge"), deadline=0.3)
    store = SQLiteStore(db)
    real_save = store.save

    async def stalled_save(state: SagaState, events: Any, **kw: Any) -> None:
        if "charge" in state.completed_steps and not state.compensated_steps:
            await asyncio.sleep(0.4)  # the store stalls past the deadline, then fails
            raise StoreError("commit failed (injected; nothing written)")
        await real_save(state, events, **kw)

    store.save = stalled_save  # type: ignore[method-assign]
    async with SagaOrchestrator(store, [saga]) as orch:
        final = await asyncio.wait_for((await orch.start("order", {}, saga_id="s-1")).wait(), 5)
    assert final.status is SagaStatus.FAILED
    assert "deadline" in (final.failure_reason or "")
    assert ledger.kinds("apply") == ["reserve", "charge"]  # not run again past the deadline
    assert ledger.kinds("undo") == ["charge", "reserve"]


async def test_a_start_up_whose_recovery_fails_closes_and_can_be_tried_again(db: Path) -> None:
    ledger = Ledger()
    entered = asyncio.Event()

    async def hang(ctx: StepContext) -> None:
        entered.set()
        await asyncio.sleep(3600)

    hanging = Saga("order", steps=chain(ledger, "reserve", "ship", ship=Step("ship", hang)))
    async with SagaOrchestrator(SQLiteStore(db), [hanging]) as orch:
        await orch.start("order", {}, saga_id="s-1")
        await entered.wait()
    store = SQLiteStore(db)
    real_claim = store.claim
    failed: list[int] = []

    async def flaky_claim(*args: Any, **kw: Any) -> Any:
        if not failed:
            failed.append(1)
            raise StoreError("claim failed (injected)")
        return await real_claim(*args, **kw)

    store.claim = flaky_claim  # type: ignore[method-assign]
    orch = SagaOrchestrator(store, [Saga("order", steps=chain(ledger, "reserve", "ship"))])
    with pytest.raises(StoreError, match="claim failed"):
        await orch.open()
    assert orch.running == 0
    async with orch:  # opened for real this time: recovery runs
        state = await asyncio.wait_for(orch.handle("s-1").wait(), 5.0)
    assert state.status is SagaStatus.COMPLETED
    assert ledger.kinds("apply") == ["reserve", "ship"]  # reserve was not run again


class LateFinalReply(SQLiteStore):
    """The real store, whose reply to a saga's final save arrives late (as from a slow
    network), so lease renewals run while that commit is already in."""

    async def save(self, state: SagaState, events: Any, **options: Any) -> None:
        await super().save(state, events, **options)
        if state.terminal:  # long enough for a renewal (every 0.5 s), short of the lease
            await asyncio.sleep(0.8)


async def test_a_renewal_racing_the_final_commit_does_not_stop_the_saga(db: Path) -> None:
    ledger = Ledger()
    saga = Saga("order", steps=chain(ledger, "reserve", "charge"))
    lost: list[str] = []
    async with SagaOrchestrator(
        LateFinalReply(db), [saga], lease_seconds=1.5, recovery_interval=0.1
    ) as orch:
        orch.hooks.on("lease_lost", lambda state: lost.append(state.saga_id))
        run = await orch.start("order", {"order_id": 1}, saga_id="s-1")
        state = await asyncio.wait_for(run.wait(), 5)
        assert state.status is SagaStatus.COMPLETED
        assert lost == []
        assert orch.stats["lease_lost"] == 0
        assert orch.stats["completed"] == 1


class UnrenewableLateFinalReply(SQLiteStore):
    """The real store; renewals fail (the store is unreachable for them), and the reply
    to a saga's final save arrives past the lease the run could still count on."""

    async def renew(self, owner: str, saga_ids: Any, **options: Any) -> set[str]:
        raise StoreError("renewal: the store did not answer")

    async def save(self, state: SagaState, events: Any, **options: Any) -> None:
        await super().save(state, events, **options)
        if state.terminal:
            await asyncio.sleep(1.0)


async def test_the_lease_watch_lets_a_run_awaiting_its_final_save_finish(db: Path) -> None:
    """Renewals fail, so the lease watch stops runs before their lease runs out; but a
    run whose final (fenced) save is already on its way has nothing left to do that a
    new owner could collide with, and stopping it lost its hooks (and a stuck saga's
    alert): it finishes."""
    ledger = Ledger()
    saga = Saga("order", steps=chain(ledger, "reserve"))
    done: list[str] = []
    async with SagaOrchestrator(
        UnrenewableLateFinalReply(db), [saga], lease_seconds=0.9, recovery_interval=0.1
    ) as orch:
        orch.hooks.on("completed", lambda state: done.append(state.saga_id))
        run = await orch.start("order", {"order_id": 1}, saga_id="s-1")
        state = await asyncio.wait_for(run.wait(), 5)
        await asyncio.sleep(0)
    assert state is not None
    assert state.status is SagaStatus.COMPLETED
    assert done == ["s-1"]
    assert orch.stats["lease_lost"] == 0


class SlowAlertRelease(SQLiteStore):
    """The real store, whose release of a stuck saga's alert lease never answers."""

    async def release(self, owner: str, saga_ids: Any, **options: Any) -> None:
        if options.get("status") is SagaStatus.STUCK:
            await asyncio.Event().wait()
        await super().release(owner, saga_ids, **options)


async def test_a_close_while_an_alert_lease_is_released_sends_no_second_alert(db: Path) -> None:
    """The alert went out and its lease was on its way back when the orchestrator
    closed: the close releases it (the run is still its own until then), so the next
    process finds nothing owed. Before, the run had left the orchestrator's books, the
    close neither waited for nor covered that release, and the alert went out twice."""
    ledger = Ledger()
    steps = [
        Step("reserve", ledger.action("reserve"), compensate=ledger.undo("reserve", fail_times=9)),
        Step("charge", ledger.action("charge", fail=lambda ctx: StepFailed("no"))),
    ]
    saga = Saga("order", steps=steps, compensation_backoff=0.001, max_compensation_attempts=2)
    alerts: list[str] = []
    async with SagaOrchestrator(
        SlowAlertRelease(db), [saga], on_stuck=lambda s: alerts.append(s.saga_id)
    ) as orch:
        state = await (await orch.start("order", {}, saga_id="s-1")).wait()
        assert state is not None
        assert state.status is SagaStatus.STUCK
        await asyncio.sleep(0.05)  # the release is under way, and hangs
    async with SagaOrchestrator(
        SQLiteStore(db), [saga], on_stuck=lambda s: alerts.append(s.saga_id)
    ) as again:
        stored = await again.get("s-1")
    assert alerts == ["s-1"]
    assert again.stats["late_alerts"] == 0
    assert stored is not None
    assert (stored.status, stored.lease_owner) == (SagaStatus.STUCK, None)
