"""Stateful and example tests of the pure ``SagaMachine``.

The stateful test plays driver, services and crashes at once. A *world* records
which step effects and compensations the services really applied (idempotently, as
an ``IdempotencyLedger`` would); the machine only ever hears what a correct driver
would tell it. A crash drops everything in memory and continues from the last
``Transition.state`` returned, re-running the steps that were in flight.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from seamwork.errors import InvalidSagaOperation
from seamwork.saga import (
    Parallel,
    Retry,
    Saga,
    SagaMachine,
    SagaState,
    SagaStatus,
    Step,
    StepFailure,
    Transition,
)
from seamwork.saga._machine import Compensate, Finished, RunStage, abort, retry_stuck

RUNNING = SagaStatus.RUNNING
COMPENSATING = SagaStatus.COMPENSATING
COMPLETED = SagaStatus.COMPLETED
FAILED = SagaStatus.FAILED
STUCK = SagaStatus.STUCK

# The status table of DESIGN.md §3, written out independently of the machine's.
ALLOWED_MOVES = {
    (RUNNING, RUNNING),
    (RUNNING, COMPLETED),
    (RUNNING, COMPENSATING),
    (RUNNING, FAILED),
    (COMPENSATING, COMPENSATING),
    (COMPENSATING, FAILED),
    (COMPENSATING, STUCK),
    (STUCK, COMPENSATING),
    (STUCK, FAILED),
}


async def _act(ctx: object) -> None:
    return None


async def _undo(ctx: object) -> None:
    return None


# --- saga shapes ----------------------------------------------------------------------


@dataclass(frozen=True)
class StepSpec:
    name: str
    compensable: bool
    flag: str | None  # `when` reads this start-data flag
    attempts: int  # Retry(max_attempts) or 1 for no retry

    def build(self) -> Step:
        flag = self.flag
        return Step(
            self.name,
            _act,
            compensate=_undo if self.compensable else None,
            retry=Retry(self.attempts, backoff=0) if self.attempts > 1 else None,
            when=(lambda data: bool(data.get(flag))) if flag else None,
        )


FLAGS = ("f0", "f1")


@st.composite
def saga_shapes(draw: st.DrawFn) -> tuple[Saga, dict[str, bool]]:
    counter = iter(range(100))
    stages: list[Step | Parallel] = []
    for _ in range(draw(st.integers(1, 6))):
        width = draw(st.sampled_from([1, 1, 1, 2, 3]))
        specs = [
            StepSpec(
                f"s{next(counter)}",
                compensable=draw(st.booleans() | st.just(True)),
                flag=draw(st.none() | st.none() | st.sampled_from(FLAGS)),
                attempts=draw(st.sampled_from([1, 1, 2, 3])),
            )
            for _ in range(width)
        ]
        steps = [s.build() for s in specs]
        stages.append(steps[0] if width == 1 else Parallel(*steps))
    saga = Saga("shape", steps=stages, max_compensation_attempts=draw(st.integers(1, 3)))
    data = {flag: draw(st.booleans()) for flag in FLAGS}
    return saga, data


# --- the world the machine does not see --------------------------------------------------


@dataclass
class World:
    """What the services really did (idempotent by key, like a ledger)."""

    applied: list[str] = field(default_factory=list)
    undone: list[str] = field(default_factory=list)

    def apply(self, step: str) -> None:
        if step not in self.applied:
            self.applied.append(step)

    def undo(self, step: str) -> None:
        if step not in self.undone:
            self.undone.append(step)


class SagaMachineModel(RuleBasedStateMachine):
    """Any interleaving of outcomes, crashes and operator moves keeps the invariants."""

    def __init__(self) -> None:
        super().__init__()
        self.now = 1000.0
        self.world = World()
        self.definite: set[str] = set()
        self.completion: list[str] = []  # committed completions, in order
        self.uncertain: list[str] = []  # committed uncertain failures, in order
        self.comp_failures: Counter[str] = Counter()  # this retry round
        self.comp_events: Counter[str] = Counter()  # compensation_failed events, this round
        self.aborted = False
        self.reset_memory()

    # -- driver memory (lost on crash) --

    def reset_memory(self) -> None:
        self.pending: dict[str, int] = {}  # step in flight -> attempt number
        self.failures: list[StepFailure] = []

    def tick(self) -> float:
        self.now += 1.0
        return self.now

    @initialize(shape=saga_shapes())
    def begin(self, shape: tuple[Saga, dict[str, bool]]) -> None:
        self.saga, data = shape
        self.machine = SagaMachine(self.saga)
        self.max_comp = self.saga.max_compensation_attempts
        begun = self.machine.begin("saga-1", data, self.tick())
        assert begun.state.status in (RUNNING, COMPLETED)
        self.state = begun.state
        self.last = begun
        self.start_stage()

    def commit(self, transition: Transition) -> None:
        before, after = self.state.status, transition.state.status
        assert (before, after) in ALLOWED_MOVES, (before, after)
        assert all(e.saga_id == "saga-1" for e in transition.events)
        for event in transition.events:
            if event.event == "compensation_failed":
                self.comp_events[event.step] += 1
        self.state = transition.state
        self.last = transition

    def start_stage(self) -> None:
        """Ask the machine what to do; when a stage is to run, put its steps in flight."""
        action = self.machine.next_action(self.state)
        if isinstance(action, RunStage) and not self.pending and not self.failures:
            assert action.steps, "a running saga always has a step to run"
            for step in action.steps:
                self.pending[step.name] = self.state.step_attempts.get(step.name, 0) + 1

    def action(self) -> RunStage | Compensate | Finished:
        return self.machine.next_action(self.state)

    # -- forward --

    def running(self) -> bool:
        return self.state.status is RUNNING and bool(self.pending)

    def pick(self, data: st.DataObject) -> str:
        return data.draw(st.sampled_from(sorted(self.pending)))

    @precondition(running)
    @rule(data=st.data())
    def step_succeeds(self, data: st.DataObject) -> None:
        name = self.pick(data)
        del self.pending[name]
        self.world.apply(name)
        self.commit(self.machine.step_succeeded(self.state, name, {name: True}, self.tick()))
        self.completion.append(name)
        self.settle()

    @precondition(running)
    @rule(data=st.data())
    def step_declines(self, data: st.DataObject) -> None:
        # A service that applied the effect answers from its ledger: no decline then.
        candidates = sorted(n for n in self.pending if n not in self.world.applied)
        if not candidates:
            return
        name = data.draw(st.sampled_from(candidates))
        self.fail(name, "definite")

    @precondition(running)
    @rule(data=st.data(), kind=st.sampled_from(["uncertain", "timeout"]), applied=st.booleans())
    def step_uncertain(self, data: st.DataObject, kind: str, applied: bool) -> None:
        name = self.pick(data)
        if applied:
            self.world.apply(name)
        self.fail(name, kind)

    def fail(self, name: str, kind: Any) -> None:
        attempt = self.pending.pop(name)
        failure = StepFailure(name, attempt, kind, f"{kind} failure")
        step = self.saga.steps_by_name[name]
        error = None if kind == "definite" else RuntimeError("boom")
        delay = self.machine.retry_delay(step, failure, error, _Rng())
        retries = kind != "definite" and step.retry is not None
        assert (delay is not None) == (retries and attempt < step.retry.max_attempts)  # type: ignore[union-attr]
        if delay is not None:
            self.commit(self.machine.attempt_failed(self.state, failure, self.tick()))
            assert self.state.step_attempts[name] == attempt
            self.pending[name] = attempt + 1
            return
        self.failures.append(failure)
        self.settle()

    def settle(self) -> None:
        """When every member of the stage has an outcome, report the failures, if any."""
        if self.pending or not self.failures:
            self.start_stage()
            return
        failures, self.failures = self.failures, []
        before_uncertain = len(self.state.uncertain_steps)
        self.commit(self.machine.stage_failed(self.state, failures, self.tick()))
        self.definite |= {f.step for f in failures if f.kind == "definite"}
        self.uncertain.extend(self.state.uncertain_steps[before_uncertain:])
        assert set(self.state.uncertain_steps[before_uncertain:]) == {
            f.step for f in failures if f.kind != "definite"
        }
        self.reset_memory()

    @precondition(lambda self: self.state.status is RUNNING)
    @rule(applied=st.lists(st.booleans(), min_size=3, max_size=3))
    def cancel(self, applied: list[bool]) -> None:
        # Every step still in flight (or re-run after a crash) may have applied.
        in_flight = [*self.pending, *(f.step for f in self.failures if f.kind != "definite")]
        self.definite |= {f.step for f in self.failures if f.kind == "definite"}
        for name, did in zip(self.pending, applied, strict=False):
            if did:
                self.world.apply(name)
        before_uncertain = len(self.state.uncertain_steps)
        self.commit(self.machine.cancel(self.state, "cancelled", in_flight, self.tick()))
        self.uncertain.extend(self.state.uncertain_steps[before_uncertain:])
        self.reset_memory()

    # -- backward --

    def compensating(self) -> bool:
        return isinstance(self.action(), Compensate)

    @precondition(compensating)
    @rule()
    def compensation_succeeds(self) -> None:
        action = self.action()
        assert isinstance(action, Compensate)
        self.world.undo(action.step.name)
        self.commit(self.machine.compensated(self.state, action.step.name, self.tick()))

    @precondition(compensating)
    @rule()
    def compensation_fails(self) -> None:
        action = self.action()
        assert isinstance(action, Compensate)
        name = action.step.name
        assert action.attempt == self.comp_failures[name] + 1
        self.commit(self.machine.compensation_failed(self.state, name, "nope", self.tick()))
        self.comp_failures[name] += 1
        stuck = [e for e in self.last.events if e.event == "stuck"]
        if self.comp_failures[name] == self.max_comp:
            assert self.state.status is STUCK
            assert [(e.step, e.attempt) for e in stuck] == [(name, self.max_comp)]
        else:
            assert self.state.status is COMPENSATING
            assert not stuck

    @precondition(compensating)
    @rule()
    def compensation_applies_then_crash(self) -> None:
        action = self.action()
        assert isinstance(action, Compensate)
        self.world.undo(action.step.name)
        self.crash()

    # -- crashes and the operator --

    @precondition(running)
    @rule(data=st.data())
    def step_applies_then_crash(self, data: st.DataObject) -> None:
        self.world.apply(self.pick(data))
        self.crash()

    @rule()
    def crash(self) -> None:
        self.reset_memory()
        self.state = self.last.state  # the store holds exactly the last committed state
        self.start_stage()

    @precondition(lambda self: self.state.status is STUCK)
    @rule()
    def operator_retries(self) -> None:
        self.commit(retry_stuck(self.state, self.tick()))
        assert self.state.compensation_attempts == {}
        self.comp_failures.clear()
        self.comp_events.clear()

    @precondition(lambda self: self.state.status is STUCK)
    @rule()
    def operator_aborts(self) -> None:
        self.commit(abort(self.state, self.tick()))
        self.aborted = True

    @precondition(lambda self: self.state.terminal)
    @rule()
    def terminal_refuses_forward_events(self) -> None:
        with pytest.raises(InvalidSagaOperation):
            self.machine.cancel(self.state, "late", (), self.tick())
        if self.state.status is not STUCK:
            with pytest.raises(InvalidSagaOperation):
                retry_stuck(self.state, self.tick())
            with pytest.raises(InvalidSagaOperation):
                abort(self.state, self.tick())

    # -- invariants --

    @invariant()
    def compensated_only_applied_or_uncertain_and_once(self) -> None:
        s = self.state
        assert set(s.compensated_steps) <= set(s.completed_steps) | set(s.uncertain_steps)
        assert len(s.compensated_steps) == len(set(s.compensated_steps))
        assert len(s.completed_steps) == len(set(s.completed_steps))

    @invariant()
    def compensation_runs_in_reverse_completion_order(self) -> None:
        s = self.state
        assert list(s.completed_steps) == self.completion
        assert list(s.uncertain_steps) == self.uncertain
        expected = [
            n
            for n in reversed(self.completion + self.uncertain)
            if self.saga.steps_by_name[n].compensate is not None
        ]
        assert list(s.compensated_steps) == expected[: len(s.compensated_steps)]
        # What the services undid is what the machine recorded, plus at most one
        # compensation applied just before a crash.
        done = list(s.compensated_steps)
        assert self.world.undone[: len(done)] == done
        assert len(self.world.undone) - len(done) <= 1

    @invariant()
    def definite_failures_are_never_compensated(self) -> None:
        assert not self.definite & set(self.state.compensated_steps)
        assert not self.definite & set(self.state.completed_steps)
        assert not self.definite & set(self.state.uncertain_steps)

    @invariant()
    def applied_effects_are_never_forgotten(self) -> None:
        s = self.state
        known = set(s.completed_steps) | set(s.uncertain_steps)
        if s.status is RUNNING:
            stage = self.saga.stages[s.current_step_index]
            known |= {step.name for step in stage}
        assert set(self.world.applied) <= known

    @invariant()
    def stuck_exactly_after_max_compensation_failures(self) -> None:
        s = self.state
        assert all(n <= self.max_comp for n in self.comp_failures.values())
        assert dict(s.compensation_attempts) == {k: v for k, v in self.comp_failures.items() if v}
        assert self.comp_events == self.comp_failures
        exhausted = [k for k, v in self.comp_failures.items() if v == self.max_comp]
        assert (s.status is STUCK) == (bool(exhausted) and not self.aborted)
        if s.status is STUCK:
            assert exhausted == [_pending_head(s, self.saga)]

    @invariant()
    def completed_means_every_runnable_step_once_and_nothing_undone(self) -> None:
        s = self.state
        if s.status is not COMPLETED:
            return
        names = list(self.saga.steps_by_name)
        assert sorted([*s.completed_steps, *s.skipped_steps]) == sorted(names)
        assert not set(s.completed_steps) & set(s.skipped_steps)
        assert s.compensated_steps == ()
        assert s.uncertain_steps == ()
        assert s.current_step_index == len(self.saga.stages)
        assert sorted(self.world.applied) == sorted(s.completed_steps)
        assert self.world.undone == []

    @invariant()
    def failed_means_every_applied_compensable_step_undone(self) -> None:
        s = self.state
        if s.status is not FAILED or self.aborted:
            return
        compensable = {n for n, step in self.saga.steps_by_name.items() if step.compensate}
        assert set(self.world.applied) & compensable <= set(s.compensated_steps)
        assert isinstance(self.action(), Finished)

    @invariant()
    def skipped_steps_follow_their_condition(self) -> None:
        for name in self.state.skipped_steps:
            step = self.saga.steps_by_name[name]
            assert step.when is not None
            assert not step.when(self.state.context)


def _pending_head(state: SagaState, saga: Saga) -> str:
    return next(n for n in state.to_compensate if saga.steps_by_name[n].compensate is not None)


class _Rng:
    """A deterministic ``random.Random`` stand-in for jittered delays."""

    def random(self) -> float:
        return 0.5


SagaMachineModel.TestCase.settings = settings(
    max_examples=400,
    stateful_step_count=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestSagaMachineStateful = SagaMachineModel.TestCase


# --- examples: the corner cases ------------------------------------------------------------


def _machine(*stages: Step | Parallel, max_comp: int = 3) -> SagaMachine:
    return SagaMachine(Saga("ex", steps=list(stages), max_compensation_attempts=max_comp))


def _step(name: str, *, undo: bool = True, when: Any = None, retry: int = 1) -> Step:
    return Step(
        name,
        _act,
        compensate=_undo if undo else None,
        when=when,
        retry=Retry(retry, backoff=0) if retry > 1 else None,
    )


def _run(machine: SagaMachine, data: Mapping[str, Any] | None = None) -> SagaState:
    return machine.begin("ex-1", data or {}, 1.0).state


def test_all_steps_skipped_completes_at_begin() -> None:
    machine = _machine(_step("a", when=lambda d: False), _step("b", when=lambda d: False))
    begun = machine.begin("ex-1", {}, 1.0)
    assert begun.state.status is COMPLETED
    assert begun.state.skipped_steps == ("a", "b")
    assert [e.event for e in begun.events][-1] == "saga_completed"
    assert isinstance(machine.next_action(begun.state), Finished)


def test_failure_of_first_step_fails_without_compensating() -> None:
    machine = _machine(_step("a"), _step("b"))
    state = _run(machine)
    failed = machine.stage_failed(state, [StepFailure("a", 1, "definite", "no")], 2.0)
    assert failed.state.status is FAILED
    assert failed.state.compensated_steps == ()
    assert failed.state.failure_reason == "step 'a' failed: no"


def test_timed_out_first_step_is_compensated() -> None:
    machine = _machine(_step("a"), _step("b"))
    state = _run(machine)
    moved = machine.stage_failed(state, [StepFailure("a", 1, "timeout", "slow")], 2.0).state
    assert moved.status is COMPENSATING
    action = machine.next_action(moved)
    assert isinstance(action, Compensate)
    assert action.step.name == "a"
    assert action.attempt == 1


def test_uncertain_step_without_compensation_is_not_waited_for() -> None:
    machine = _machine(_step("a"), _step("b", undo=False))
    state = machine.step_succeeded(_run(machine), "a", None, 2.0).state
    moved = machine.stage_failed(state, [StepFailure("b", 1, "uncertain", "?")], 3.0).state
    action = machine.next_action(moved)
    assert isinstance(action, Compensate)
    assert action.step.name == "a"
    assert machine.compensated(moved, "a", 4.0).state.status is FAILED


def test_parallel_group_compensates_in_reverse_completion_order() -> None:
    machine = _machine(_step("a"), Parallel(_step("b"), _step("c"), _step("d")))
    state = machine.step_succeeded(_run(machine), "a", None, 2.0).state
    state = machine.step_succeeded(state, "d", None, 3.0).state
    state = machine.step_succeeded(state, "b", None, 4.0).state
    state = machine.stage_failed(state, [StepFailure("c", 1, "timeout", "slow")], 5.0).state
    order = []
    while isinstance(action := machine.next_action(state), Compensate):
        order.append(action.step.name)
        state = machine.compensated(state, action.step.name, 6.0).state
    assert order == ["c", "b", "d", "a"]
    assert state.status is FAILED


def test_parallel_group_resumes_only_unfinished_members_after_crash() -> None:
    machine = _machine(Parallel(_step("a"), _step("b")), _step("c"))
    state = machine.step_succeeded(_run(machine), "b", None, 2.0).state
    action = machine.next_action(state)
    assert isinstance(action, RunStage)
    assert [s.name for s in action.steps] == ["a"]


def test_definite_failure_in_parallel_group_compensates_only_the_others() -> None:
    machine = _machine(Parallel(_step("a"), _step("b")))
    state = machine.step_succeeded(_run(machine), "a", None, 2.0).state
    state = machine.stage_failed(state, [StepFailure("b", 1, "definite", "no")], 3.0).state
    assert state.to_compensate == ("a",)


def test_stuck_after_exactly_max_attempts_then_retry_starts_a_fresh_round() -> None:
    machine = _machine(_step("a"), _step("b"), max_comp=2)
    state = machine.step_succeeded(_run(machine), "a", None, 2.0).state
    state = machine.stage_failed(state, [StepFailure("b", 1, "definite", "no")], 3.0).state
    state = machine.compensation_failed(state, "a", "x", 4.0).state
    assert state.status is COMPENSATING
    stuck = machine.compensation_failed(state, "a", "x", 5.0)
    assert stuck.state.status is STUCK
    assert [e.event for e in stuck.events] == ["compensation_failed", "stuck"]
    retried = retry_stuck(stuck.state, 6.0).state
    assert retried.status is COMPENSATING
    assert retried.compensation_attempts == {}
    action = machine.next_action(retried)
    assert isinstance(action, Compensate)
    assert action.attempt == 1


def test_abort_of_stuck_saga_fails_it_and_keeps_the_reason() -> None:
    machine = _machine(_step("a"), _step("b"), max_comp=1)
    state = machine.step_succeeded(_run(machine), "a", None, 2.0).state
    state = machine.stage_failed(state, [StepFailure("b", 1, "definite", "no")], 3.0).state
    state = machine.compensation_failed(state, "a", "x", 4.0).state
    aborted = abort(state, 5.0, "gave up").state
    assert aborted.status is FAILED
    assert aborted.failure_reason == "step 'b' failed: no; gave up"


def test_retry_and_abort_refuse_a_saga_that_is_not_stuck() -> None:
    machine = _machine(_step("a"))
    state = _run(machine)
    with pytest.raises(InvalidSagaOperation):
        retry_stuck(state, 2.0)
    with pytest.raises(InvalidSagaOperation):
        abort(state, 2.0)


def test_cancel_marks_in_flight_steps_uncertain_but_not_completed_ones() -> None:
    machine = _machine(Parallel(_step("a"), _step("b")), _step("c"))
    state = machine.step_succeeded(_run(machine), "a", None, 2.0).state
    cancelled = machine.cancel(state, "operator", ["a", "b"], 3.0).state
    assert cancelled.uncertain_steps == ("b",)
    assert cancelled.to_compensate == ("b", "a")


def test_cancel_of_a_compensating_saga_is_refused() -> None:
    machine = _machine(_step("a"), _step("b"))
    state = machine.step_succeeded(_run(machine), "a", None, 2.0).state
    state = machine.stage_failed(state, [StepFailure("b", 1, "definite", "no")], 3.0).state
    with pytest.raises(InvalidSagaOperation):
        machine.cancel(state, "late", (), 4.0)


def test_step_success_after_completion_is_refused() -> None:
    machine = _machine(_step("a"))
    done = machine.step_succeeded(_run(machine), "a", None, 2.0).state
    assert done.status is COMPLETED
    with pytest.raises(InvalidSagaOperation):
        machine.step_succeeded(done, "a", None, 3.0)


def test_condition_reads_results_of_earlier_steps() -> None:
    machine = _machine(_step("a"), _step("b", when=lambda d: d.get("go") is True), _step("c"))
    state = machine.step_succeeded(_run(machine), "a", {"go": False}, 2.0).state
    assert state.skipped_steps == ("b",)
    action = machine.next_action(state)
    assert isinstance(action, RunStage)
    assert action.steps[0].name == "c"


def test_retry_delay_follows_the_step_policy() -> None:
    machine = _machine(_step("a", retry=2))
    step = machine.saga.steps_by_name["a"]
    first = StepFailure("a", 1, "timeout", "slow")
    assert machine.retry_delay(step, first, None, _Rng()) is not None  # type: ignore[arg-type]
    last = StepFailure("a", 2, "timeout", "slow")
    assert machine.retry_delay(step, last, None, _Rng()) is None  # type: ignore[arg-type]
    definite = StepFailure("a", 1, "definite", "no")
    assert machine.retry_delay(step, definite, None, _Rng()) is None  # type: ignore[arg-type]


def test_stage_failed_needs_a_failure() -> None:
    machine = _machine(_step("a"))
    with pytest.raises(ValueError, match="at least one failure"):
        machine.stage_failed(_run(machine), [], 2.0)


def test_a_when_condition_gets_the_context_read_only_whatever_mapping_a_store_loaded() -> None:
    # a store of another make may load the context as a plain dict: a condition that
    # wrote to it changed the context in this process only, as a step could before
    def sneaky(data: Mapping[str, Any]) -> bool:
        data["seen"] = True  # type: ignore[index]
        return True

    machine = _machine(_step("a"), _step("b", when=sneaky))
    state = _run(machine, {"order": 1})
    plain = state.evolve(context={"order": 1})  # as a third-party store might load it
    with pytest.raises(TypeError, match="read-only"):
        machine.step_succeeded(plain, "a", None, 2.0)
