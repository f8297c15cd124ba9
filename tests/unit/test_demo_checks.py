"""The demo's invariant checks fail on broken evidence (a check that cannot fail
proves nothing): fed a saga store's view that breaks the invariant, they say so."""

from __future__ import annotations

from pathlib import Path

from seamwork.demo.invariants import Evidence, check_recovery, check_reverse_order
from seamwork.demo.saga import make_orders
from seamwork.demo.scenario import DemoConfig, DemoRun
from seamwork.saga import SagaState, SagaStatus, StepEvent

SID = "saga-order-0005"  # W-13 (its release fails), slow carrier (its shipment times out)


def _event(event: str, step: str | None, attempt: int | None = None) -> StepEvent:
    return StepEvent(SID, 0.0, event, step, attempt, None)


def _stuck(undone: tuple[str, ...]) -> DemoRun:
    """Saga 5 stuck on its release, having undone ``undone`` (in that order) first."""
    timeline = [_event("saga_started", None)]
    for step in ("reserve_inventory", "charge_payment"):
        timeline += [_event("started", step), _event("completed", step, 1)]
    timeline += [_event("started", "ship_order"), _event("timed_out", "ship_order", 1)]
    timeline += [_event("compensating", None)]
    timeline += [_event("compensated", step, 1) for step in undone]
    timeline += [_event("compensation_failed", "reserve_inventory", n) for n in (1, 2, 3)]
    timeline += [_event("stuck", "reserve_inventory", 3)]
    state = SagaState(
        SID,
        "order",
        1,
        SagaStatus.STUCK,
        completed_steps=("reserve_inventory", "charge_payment"),
        uncertain_steps=("ship_order",),
        compensated_steps=undone,
    )
    demo = DemoRun(DemoConfig(Path("unused"), 20), make_orders(20))
    demo.states, demo.timelines = {SID: state}, {SID: timeline}
    return demo


def test_a_stuck_saga_that_undid_its_later_steps_first_passes_the_order_check() -> None:
    assert check_reverse_order(_stuck(("ship_order", "charge_payment")), Evidence()).ok


def test_a_stuck_saga_that_tried_its_release_before_its_later_steps_fails_the_order_check() -> None:
    """Compensating in forward order, the saga tries the release first, fails, and is
    stuck with its payment never refunded and its shipment never cancelled."""
    check = check_reverse_order(_stuck(()), Evidence())
    assert not check.ok
    assert SID in check.detail


def test_a_stuck_saga_that_skipped_a_later_step_fails_the_order_check() -> None:
    check = check_reverse_order(_stuck(("ship_order",)), Evidence())
    assert not check.ok
    assert SID in check.detail


def _recovered(resumed: int) -> DemoRun:
    """Two sagas in flight at the SIGKILL, both finished since; the new orchestrator
    resumed ``resumed`` of them when it started."""
    demo = DemoRun(DemoConfig(Path("unused"), 20), make_orders(20))
    ids = ["saga-order-0001", "saga-order-0003"]
    demo.states = {sid: SagaState(sid, "order", 1, SagaStatus.COMPLETED) for sid in ids}
    demo.recovery.in_flight = ids
    demo.recovery.restarted_at, demo.recovery.resumed_at = 100.0, 100.2
    demo.recovery.recovered_at, demo.recovery.resumed = 100.2, resumed
    return demo


def test_in_flight_sagas_all_resumed_by_the_new_orchestrator_pass_the_recovery_check() -> None:
    assert check_recovery(_recovered(2), Evidence()).ok


def test_in_flight_sagas_the_new_orchestrator_did_not_resume_fail_the_recovery_check() -> None:
    """Finished, but not by the restart: left leased, they waited for the dead
    process's lease to run out, and "all in-flight done" timed only the others."""
    check = check_recovery(_recovered(1), Evidence())
    assert not check.ok
    assert "1 of 2" in check.detail
