"""The saga state machine: pure transitions, no I/O, no clock of its own.

Theory of operation
-------------------
A saga is a list of *stages* (a ``Step``, or a ``Parallel`` group of steps). The
machine is told what happened (a step succeeded, an attempt failed, a compensation
failed, the operator cancelled) together with the time, and returns a
``Transition``: the new ``SagaState`` and the timeline events to store with it in
ONE commit. It also answers "what now?" (``next_action``): run these steps,
compensate that step, or nothing - the saga is finished. The orchestrator is the
thin driver that calls steps, persists transitions and asks again.

Statuses and the events that move them (``_TABLE``)::

    running ──advance──> running ──finish──> completed
       │ fail / cancel
       v
    compensating ──undo──> compensating ──undo_last──> failed
       │ give_up (max_compensation_attempts reached)
       v
    stuck ──retry (operator)──> compensating      stuck ──abort (operator)──> failed

Invariants (checked by the stateful tests in ``tests/unit/test_saga_machine.py``):

* a step is compensated only if it completed or its outcome is uncertain (it timed
  out or raised something other than ``StepFailed``), and at most once;
* compensation runs in reverse order of completion;
* a step that raised ``StepFailed`` (a definite failure) is never compensated;
* a saga that gave up compensating is ``stuck`` after exactly
  ``max_compensation_attempts`` failed attempts of one compensation;
* the idempotency key of a step never changes (it is derived, not stored).
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from seamwork.errors import InvalidSagaOperation
from seamwork.saga._definition import Saga, Step
from seamwork.saga._state import SagaContext, SagaState, SagaStatus, StepEvent

RUNNING = SagaStatus.RUNNING
COMPENSATING = SagaStatus.COMPENSATING
COMPLETED = SagaStatus.COMPLETED
FAILED = SagaStatus.FAILED
STUCK = SagaStatus.STUCK

_TABLE: Mapping[tuple[SagaStatus, str], SagaStatus] = {
    (RUNNING, "advance"): RUNNING,
    (RUNNING, "attempt_failed"): RUNNING,
    (RUNNING, "finish"): COMPLETED,
    (RUNNING, "fail"): COMPENSATING,
    (RUNNING, "fail_nothing_to_undo"): FAILED,
    (COMPENSATING, "undo"): COMPENSATING,
    (COMPENSATING, "undo_last"): FAILED,
    (COMPENSATING, "undo_failed"): COMPENSATING,
    (COMPENSATING, "give_up"): STUCK,
    (STUCK, "retry"): COMPENSATING,
    (STUCK, "abort"): FAILED,
}

FailureKind = Literal["definite", "uncertain", "timeout"]


def _move(state: SagaState, event: str) -> SagaStatus:
    try:
        return _TABLE[(state.status, event)]
    except KeyError:
        raise InvalidSagaOperation(
            f"saga {state.saga_id!r} is {state.status.value}: cannot {event.replace('_', ' ')}"
        ) from None


@dataclass(frozen=True, slots=True)
class Transition:
    """A new state and the timeline events to commit with it."""

    state: SagaState
    events: tuple[StepEvent, ...]


@dataclass(frozen=True, slots=True)
class StepFailure:
    """How one step ended when it did not succeed."""

    step: str
    attempt: int
    kind: FailureKind
    reason: str
    # False when there is no attempt's outcome to put on the timeline: the attempt
    # never began, was cut by the cancel (or deadline) itself, or is already recorded.
    record: bool = True


@dataclass(frozen=True, slots=True)
class RunStage:
    """Run these steps (one, or the unfinished members of a parallel group)."""

    index: int
    steps: tuple[Step, ...]


@dataclass(frozen=True, slots=True)
class Compensate:
    """Run this step's compensation."""

    step: Step
    attempt: int


@dataclass(frozen=True, slots=True)
class Finished:
    """Nothing left to do."""

    status: SagaStatus


Action = RunStage | Compensate | Finished

_FAILURE_EVENT: Mapping[FailureKind, str] = {
    "definite": "failed",
    "uncertain": "errored",
    "timeout": "timed_out",
}


class SagaMachine:
    """Transitions of one saga definition. Stateless: every call takes the state."""

    __slots__ = ("_fresh", "_unconditional", "saga")

    def __init__(self, saga: Saga) -> None:
        self.saga = saga
        # Per stage: no step has a `when` (nothing to evaluate on entry), and the
        # RunStage to return while none of its steps has finished (the common case).
        self._unconditional = tuple(all(s.when is None for s in st) for st in saga.stages)
        self._fresh = tuple(RunStage(i, st) for i, st in enumerate(saga.stages))

    # --- questions ----------------------------------------------------------------

    def next_action(self, state: SagaState) -> Action:
        """What the driver should do next for ``state``."""
        if state.status is RUNNING:
            index = state.current_step_index
            stage = self.saga.stages[index]
            if len(stage) == 1 and self._unconditional[index]:
                name = stage[0].name
                if name not in state.completed_steps and name not in state.uncertain_steps:
                    return self._fresh[index]
            done = {*state.completed_steps, *state.skipped_steps, *state.uncertain_steps}
            return RunStage(index, tuple(s for s in stage if s.name not in done))
        if state.status is COMPENSATING:
            pending = self._pending(state)
            if pending:
                step = self.saga.steps_by_name[pending[0]]
                return Compensate(step, state.compensation_attempts.get(step.name, 0) + 1)
        return Finished(state.status)

    def retry_delay(
        self, step: Step, failure: StepFailure, error: BaseException | None, rng: random.Random
    ) -> float | None:
        """Seconds before the next attempt of ``step``, or None: do not retry."""
        if failure.kind == "definite" or step.retry is None:
            return None
        probe = error if error is not None else TimeoutError(failure.reason)
        if not step.retry.should_retry(failure.attempt, probe):
            return None
        return step.retry.delay(failure.attempt, rng)

    def compensation_delay(self, state: SagaState, step: str, rng: random.Random) -> float:
        attempts = state.compensation_attempts.get(step, 1)
        return self.saga.compensation_retry.delay(attempts, rng)

    # --- forward ------------------------------------------------------------------

    def begin(
        self,
        saga_id: str,
        data: Mapping[str, Any],
        now: float,
        *,
        owner: str | None = None,
        lease_expires_at: float | None = None,
    ) -> Transition:
        """The first state of a new saga, positioned at its first runnable stage."""
        deadline = now + self.saga.deadline if self.saga.deadline is not None else None
        state = SagaState(
            saga_id=saga_id,
            saga_name=self.saga.name,
            saga_version=self.saga.version,
            status=RUNNING,
            context=SagaContext(data),
            started_at=now,
            updated_at=now,
            deadline_at=deadline,
            lease_owner=owner,
            lease_expires_at=lease_expires_at,
        )
        events = [StepEvent(saga_id, now, "saga_started")]
        return self._enter_stage(state, 0, events, now)

    def step_succeeded(
        self, state: SagaState, step: str, result: Mapping[str, Any] | None, now: float
    ) -> Transition:
        """``step`` completed; merge its result and advance when its stage is done."""
        _move(state, "advance")
        context = SagaContext.merged(state.context, result) if result else state.context
        completed = (*state.completed_steps, step)
        events = [StepEvent(state.saga_id, now, "completed", step, self._attempt(state, step))]
        stage = self.saga.stages[state.current_step_index]
        if len(stage) > 1:
            finished = {*completed, *state.skipped_steps}
            if not all(s.name in finished for s in stage):
                state = state.evolve(completed_steps=completed, context=context, updated_at=now)
                return Transition(state, tuple(events))
        return self._enter_stage(
            state,
            state.current_step_index + 1,
            events,
            now,
            completed_steps=completed,
            context=context,
        )

    def attempt_failed(self, state: SagaState, failure: StepFailure, now: float) -> Transition:
        """An attempt failed and will be retried: record it, stay running."""
        status = _move(state, "attempt_failed")
        attempts = {**state.step_attempts, failure.step: failure.attempt}
        state = state.evolve(status=status, step_attempts=attempts, updated_at=now)
        return Transition(state, (self._failure_event(state, failure, now),))

    def stage_failed(
        self, state: SagaState, failures: Sequence[StepFailure], now: float
    ) -> Transition:
        """Steps of the current stage failed for good: start compensating."""
        if not failures:
            raise ValueError("stage_failed needs at least one failure")
        uncertain = tuple(f.step for f in failures if f.kind != "definite")
        attempts = {**state.step_attempts, **{f.step: f.attempt for f in failures}}
        first = failures[0]
        reason = f"step {first.step!r} failed: {first.reason}"
        events = [self._failure_event(state, f, now) for f in failures]
        state = state.evolve(
            uncertain_steps=state.uncertain_steps + uncertain,
            step_attempts=attempts,
            failure_reason=reason,
        )
        return self._start_compensating(state, events, now)

    def cancel(
        self,
        state: SagaState,
        reason: str,
        in_flight: Sequence[str],
        now: float,
        failures: Sequence[StepFailure] = (),
    ) -> Transition:
        """Stop going forward (operator cancel or deadline); steps that were running
        when it happened have an uncertain outcome and are compensated too.
        ``failures``: attempts of the stage that ended on their own before the cancel
        took hold (a parallel member that failed while its siblings ran), recorded
        on the timeline and in ``step_attempts`` as ``stage_failed`` records them."""
        if state.status is not RUNNING:
            raise InvalidSagaOperation(
                f"saga {state.saga_id!r} is {state.status.value}: only a running saga can be "
                "cancelled"
            )
        done = set(state.completed_steps)
        uncertain = tuple(s for s in in_flight if s not in done)
        events = [self._failure_event(state, f, now) for f in failures if f.record]
        attempts = {f.step: f.attempt for f in failures if f.record}
        state = state.evolve(
            uncertain_steps=state.uncertain_steps + uncertain,
            failure_reason=reason,
            step_attempts={**state.step_attempts, **attempts} if attempts else state.step_attempts,
        )
        events.append(StepEvent(state.saga_id, now, "cancelled", detail=reason))
        return self._start_compensating(state, events, now)

    # --- backward -----------------------------------------------------------------

    def compensated(self, state: SagaState, step: str, now: float) -> Transition:
        """``step``'s compensation succeeded."""
        state = state.evolve(compensated_steps=(*state.compensated_steps, step), updated_at=now)
        attempt = state.compensation_attempts.get(step, 0) + 1
        events = [StepEvent(state.saga_id, now, "compensated", step, attempt)]
        if self._pending(state):
            return Transition(state.evolve(status=_move(state, "undo")), tuple(events))
        return self._fail(state, "undo_last", events, now)

    def compensation_failed(
        self, state: SagaState, step: str, reason: str, now: float
    ) -> Transition:
        """``step``'s compensation failed; after the last allowed attempt the saga is stuck."""
        attempt = state.compensation_attempts.get(step, 0) + 1
        attempts = {**state.compensation_attempts, step: attempt}
        events = [StepEvent(state.saga_id, now, "compensation_failed", step, attempt, reason)]
        if attempt >= self.saga.max_compensation_attempts:
            detail = f"compensation of {step!r} failed {attempt} times: {reason}"
            events.append(StepEvent(state.saga_id, now, "stuck", step, attempt, detail))
            status = _move(state, "give_up")
        else:
            status = _move(state, "undo_failed")
        state = state.evolve(status=status, compensation_attempts=attempts, updated_at=now)
        return Transition(state, tuple(events))

    # --- internals ----------------------------------------------------------------

    def _pending(self, state: SagaState) -> tuple[str, ...]:
        steps = self.saga.steps_by_name
        return tuple(s for s in state.to_compensate if steps[s].compensate is not None)

    def _attempt(self, state: SagaState, step: str) -> int:
        return state.step_attempts.get(step, 0) + 1

    def _failure_event(self, state: SagaState, failure: StepFailure, now: float) -> StepEvent:
        event = _FAILURE_EVENT[failure.kind]
        return StepEvent(state.saga_id, now, event, failure.step, failure.attempt, failure.reason)

    def _start_compensating(
        self, state: SagaState, events: list[StepEvent], now: float
    ) -> Transition:
        if not self._pending(state):
            return self._fail(state, "fail_nothing_to_undo", events, now)
        state = state.evolve(status=_move(state, "fail"), updated_at=now)
        events.append(StepEvent(state.saga_id, now, "compensating", detail=state.failure_reason))
        return Transition(state, tuple(events))

    def _fail(
        self, state: SagaState, event: str, events: list[StepEvent], now: float
    ) -> Transition:
        state = state.evolve(status=_move(state, event), updated_at=now)
        events.append(StepEvent(state.saga_id, now, "saga_failed", detail=state.failure_reason))
        return Transition(state, tuple(events))

    def _enter_stage(
        self,
        state: SagaState,
        index: int,
        events: list[StepEvent],
        now: float,
        **changes: Any,
    ) -> Transition:
        """Position the saga at the first stage from ``index`` with a step to run,
        recording skipped steps; past the last stage the saga is completed. ``changes``
        ride along in the same (single) state copy - this runs on every step."""
        context = changes.get("context", state.context)
        stages = self.saga.stages
        skipped: list[str] = []
        while index < len(stages):
            stage = stages[index]
            if self._unconditional[index]:
                break
            # (read-only as a step's ctx.data is, whatever mapping a store loaded)
            runnable = [s for s in stage if s.when is None or s.when(SagaContext.of(context))]
            skipped.extend(s.name for s in stage if s not in runnable)
            if runnable:
                break
            index += 1
        saga_id = state.saga_id
        if skipped:
            events.extend(StepEvent(saga_id, now, "skipped", name) for name in skipped)
            changes["skipped_steps"] = state.skipped_steps + tuple(skipped)
        if index >= len(stages):
            changes["status"] = _move(state, "finish")
            events.append(StepEvent(saga_id, now, "saga_completed"))
        else:
            events.extend(
                StepEvent(saga_id, now, "started", s.name)
                for s in stages[index]
                if s.name not in skipped
            )
        state = state.evolve(current_step_index=index, updated_at=now, **changes)
        return Transition(state, tuple(events))


def retry_stuck(state: SagaState, now: float) -> Transition:
    """Operator retry of a ``stuck`` saga: compensation starts over with fresh attempts."""
    status = _move(state, "retry")
    state = state.evolve(
        status=status,
        compensation_attempts={},
        lease_owner=None,
        lease_expires_at=None,
        updated_at=now,
    )
    return Transition(state, (StepEvent(state.saga_id, now, "retried"),))


def abort(state: SagaState, now: float, reason: str = "aborted by operator") -> Transition:
    """Operator abort of a ``stuck`` saga: give up on it, marked ``failed``."""
    status = _move(state, "abort")
    failure = f"{state.failure_reason}; {reason}" if state.failure_reason else reason
    state = state.evolve(
        status=status,
        failure_reason=failure,
        lease_owner=None,
        lease_expires_at=None,
        updated_at=now,
    )
    return Transition(state, (StepEvent(state.saga_id, now, "aborted", detail=reason),))
