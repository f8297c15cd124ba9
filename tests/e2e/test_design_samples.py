"""The code samples of the design document, run as written against real stores and brokers.

Each test is one sample of ``DESIGN.md`` (§3 sagas, §4 resilience, §5 events, §6
messaging), with only the scaffolding it needs (temporary paths, unique names) and
assertions on what the text around it promises.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

# --- §3 Sagas ---------------------------------------------------------------------------
from seamwork.resilience import Retry as ResilienceRetry
from seamwork.saga import Retry, Saga, SagaOrchestrator, SagaState, Step, StepContext, StepFailed
from seamwork.storage import SQLiteStore


def _order_saga(calls: list[tuple[str, Any]], *, declined: bool = False) -> Saga:
    async def reserve(ctx: StepContext) -> Mapping[str, Any]:
        calls.append(("reserve", ctx))
        return {"reservation": f"r-{ctx.data['order_id']}"}

    async def release(ctx: StepContext) -> None:
        calls.append(("release", ctx))

    async def charge(ctx):  # type: ignore[no-untyped-def]  # ctx: StepContext
        calls.append(("charge", ctx))
        if declined:
            raise StepFailed("card declined")  # definite failure
        return {"payment_id": "p-1"}  # merged into the saga context

    async def refund(ctx: StepContext) -> None:
        calls.append(("refund", ctx))

    async def ship(ctx: StepContext) -> None:
        calls.append(("ship", ctx))

    async def cancel_shipment(ctx: StepContext) -> None:
        calls.append(("cancel_shipment", ctx))

    async def confirm(ctx: StepContext) -> None:
        calls.append(("confirm", ctx))

    async def send_cancellation(ctx: StepContext) -> None:
        calls.append(("send_cancellation", ctx))

    return Saga("order", version=1, steps=[
        Step("reserve_inventory", reserve, compensate=release, timeout=5),
        Step("charge_payment", charge, compensate=refund, timeout=30, retry=Retry(3)),
        Step("ship_order", ship, compensate=cancel_shipment, timeout=10),
        Step("send_confirmation", confirm, compensate=send_cancellation, timeout=5),
    ])  # fmt: skip


async def test_saga_sample_runs_to_completion(tmp_path: Path) -> None:
    calls: list[tuple[str, Any]] = []
    order = _order_saga(calls)
    db = str(tmp_path / "sagas.db")
    async with SagaOrchestrator(SQLiteStore(db), [order]) as orch:
        run = await orch.start("order", {"order_id": 42}, saga_id="order-42")
        state = await run.wait()
        assert isinstance(state, SagaState)
        assert state.status == "completed"
        assert state.saga_id == "order-42"
        assert (state.saga_name, state.saga_version) == ("order", 1)
        assert state.completed_steps == (
            "reserve_inventory",
            "charge_payment",
            "ship_order",
            "send_confirmation",
        )
        assert state.compensated_steps == ()
        assert state.context == {"order_id": 42, "reservation": "r-42", "payment_id": "p-1"}
        stored = await orch.get("order-42")
        assert isinstance(stored, SagaState)
        assert stored.status == "completed"
        assert await orch.get("order-43") is None
        assert await orch.list(status="stuck") == []
        # start() with an existing id is idempotent: nothing runs again
        again = await orch.start("order", {"order_id": 42}, saga_id="order-42")
        assert (await again.wait()).status == "completed"
    assert [name for name, _ in calls] == ["reserve", "charge", "ship", "confirm"]
    charge_ctx = calls[1][1]
    assert isinstance(charge_ctx, StepContext)
    assert charge_ctx.saga_id == "order-42"
    assert charge_ctx.step == "charge_payment"
    assert charge_ctx.attempt == 1
    assert charge_ctx.idempotency_key == "order-42:charge_payment"
    assert dict(charge_ctx.data) == {"order_id": 42, "reservation": "r-42"}
    with pytest.raises(TypeError, match="read-only"):
        charge_ctx.data["x"] = 1  # type: ignore[index]  # read-only mapping
    assert json.loads(json.dumps(charge_ctx.data)) == {"order_id": 42, "reservation": "r-42"}


async def test_saga_sample_state_has_every_documented_field(tmp_path: Path) -> None:
    order = _order_saga([])
    async with SagaOrchestrator(SQLiteStore(str(tmp_path / "sagas.db")), [order]) as orch:
        state = await (await orch.start("order", {"order_id": 1}, saga_id="o-1")).wait()
    for name in [
        "saga_id",
        "saga_name",
        "saga_version",
        "status",
        "current_step_index",
        "completed_steps",
        "compensated_steps",
        "context",
        "started_at",
        "updated_at",
        "failure_reason",
        "compensation_attempts",
        "lease_owner",
        "lease_expires_at",
    ]:
        assert hasattr(state, name), name
    assert state.current_step_index == 4
    assert {s.value for s in type(state.status)} == {
        "running",
        "compensating",
        "completed",
        "failed",
        "stuck",
    }


async def test_saga_sample_declined_card_is_definite_and_compensates_in_reverse(
    tmp_path: Path,
) -> None:
    calls: list[tuple[str, Any]] = []
    order = _order_saga(calls, declined=True)
    async with SagaOrchestrator(SQLiteStore(str(tmp_path / "sagas.db")), [order]) as orch:
        run = await orch.start("order", {"order_id": 42}, saga_id="order-42")
        state = await run.wait()
    assert state.status == "failed"
    assert "card declined" in (state.failure_reason or "")
    # StepFailed is definite: not retried (despite retry=Retry(3)), not compensated
    assert [name for name, _ in calls] == ["reserve", "charge", "release"]
    assert state.completed_steps == ("reserve_inventory",)
    assert state.compensated_steps == ("reserve_inventory",)
    assert calls[2][1].compensating


async def test_saga_sample_wait_works_for_a_saga_an_earlier_process_began(
    tmp_path: Path,
) -> None:
    gate = asyncio.Event()
    entered = asyncio.Event()

    async def slow(ctx: StepContext) -> None:
        entered.set()
        await gate.wait()

    refused: list[str] = []

    async def quick(ctx: StepContext) -> None:
        try:
            ctx.data.pop("order_id")  # type: ignore[attr-defined]
        except TypeError as exc:  # read-only after a recovery too
            refused.append(str(exc))

    def saga() -> Saga:
        return Saga("order", version=1, steps=[Step("a", slow), Step("b", quick)])

    db = str(tmp_path / "sagas.db")
    async with SagaOrchestrator(SQLiteStore(db), [saga()]) as orch:
        await orch.start("order", {"order_id": 42}, saga_id="order-42")
        await entered.wait()
    gate.set()  # the next process's step finishes at once
    async with SagaOrchestrator(SQLiteStore(db), [saga()]) as orch:
        run = await orch.start("order", {"order_id": 42}, saga_id="order-42")
        state = await run.wait()
        assert state.status == "completed"
        assert state.context == {"order_id": 42}
    assert len(refused) == 1
    assert "read-only" in refused[0]


async def test_saga_sample_cancel_compensates_and_retry_abort_exist(tmp_path: Path) -> None:
    entered = asyncio.Event()
    undone: list[str] = []

    async def reserve(ctx: StepContext) -> None:
        return None

    async def release(ctx: StepContext) -> None:
        undone.append(ctx.step)

    async def hang(ctx: StepContext) -> None:
        entered.set()
        await asyncio.Event().wait()

    saga = Saga("order", steps=[Step("reserve", reserve, compensate=release), Step("pay", hang)])
    async with SagaOrchestrator(SQLiteStore(str(tmp_path / "sagas.db")), [saga]) as orch:
        run = await orch.start("order", {}, saga_id="order-9")
        await entered.wait()
        await orch.cancel("order-9")
        state = await run.wait()
        assert state.status == "failed"
        assert undone == ["reserve"]


async def test_saga_sample_stuck_sagas_are_listed_retried_and_aborted(tmp_path: Path) -> None:
    broken = True
    tries: list[int] = []

    async def reserve(ctx: StepContext) -> None:
        return None

    async def release(ctx: StepContext) -> None:
        tries.append(ctx.attempt)
        if broken:
            raise RuntimeError("inventory service down")

    async def pay(ctx: StepContext) -> None:
        raise StepFailed("card declined")

    saga = Saga(
        "order",
        steps=[Step("reserve", reserve, compensate=release), Step("pay", pay)],
        max_compensation_attempts=2,
        compensation_backoff=0,
    )
    async with SagaOrchestrator(SQLiteStore(str(tmp_path / "sagas.db")), [saga]) as orch:
        for saga_id in ("order-1", "order-2"):
            state = await (await orch.start("order", {}, saga_id=saga_id)).wait()
            assert state.status == "stuck"
        assert tries == [1, 2, 1, 2]  # max_compensation_attempts per step, then stuck
        assert {s.saga_id for s in await orch.list(status="stuck")} == {"order-1", "order-2"}
        broken = False
        retried = await (await orch.retry("order-1")).wait()
        assert retried.status == "failed"
        assert retried.compensated_steps == ("reserve",)
        aborted = await orch.abort("order-2")
        assert aborted.status == "failed"
        assert [s.saga_id for s in await orch.list(status="stuck")] == []


def test_retry_is_one_class_for_steps_and_policies() -> None:
    assert Retry is ResilienceRetry
