"""Driving one saga: the per-saga loop of the orchestrator.

Ask the machine, run what it says (a stage's steps with their timeouts and retries,
or a compensation), persist the transition, repeat. Split from ``_orchestrator``,
which owns the lifecycle, the public operations and recovery; ``Driver`` is the mixin
``SagaOrchestrator`` inherits these from.
"""

from __future__ import annotations

import asyncio
import builtins
import dataclasses
import logging
import random
from collections.abc import Mapping
from typing import Any

from seamwork._core.clock import Clock
from seamwork._core.hooks import Hooks
from seamwork.errors import LeaseLost, SerializationError, StepFailed, StoreError
from seamwork.saga._definition import Step, StepContext
from seamwork.saga._machine import (
    Compensate,
    FailureKind,
    RunStage,
    SagaMachine,
    StepFailure,
    Transition,
)
from seamwork.saga._ports import SagaStore
from seamwork.saga._state import SagaContext, SagaState, SagaStatus

log = logging.getLogger("seamwork.saga")


class _Run:
    """One saga being driven by this process."""

    __slots__ = (
        "attempted",
        "cancel_reason",
        "cancelled",
        "done",
        "finishing",
        "lease_until",
        "lock",
        "machine",
        "resumed",
        "scopes",
        "state",
        "task",
    )

    def __init__(self, machine: SagaMachine, state: SagaState, lease_until: float) -> None:
        self.machine = machine
        self.state = state
        # When this process's lease runs out unless renewed (its monotonic clock): past
        # it another worker may claim the saga, so the run must have stopped by then.
        self.lease_until = lease_until
        # Awaiting the save that ends the saga: that save releases the lease, so a
        # renewal may find the lease gone because the save is in, not stolen.
        self.finishing = False
        self.task: asyncio.Task[None] | None = None
        self.done: asyncio.Future[SagaState | None] = asyncio.get_running_loop().create_future()
        self.scopes: set[asyncio.Timeout] = set()
        self.cancel_reason: str | None = None
        self.cancelled = asyncio.Event()
        self.lock = asyncio.Lock()
        # Steps of the current stage that may have run (and applied) in a process
        # that died before their checkpoint: their outcome is uncertain until re-run.
        self.resumed: set[str] = set()
        # Steps of the current stage whose action began here: after a commit in doubt
        # (a store error) they join ``resumed``, for their effect may have landed.
        self.attempted: set[str] = set()

    def interrupt(self, reason: str) -> None:
        self.cancel_reason = reason
        now = asyncio.get_running_loop().time()
        for scope in self.scopes:
            scope.reschedule(now)


class Driver:
    """The per-saga half of ``SagaOrchestrator`` (see the module docstring)."""

    _store: SagaStore
    _clock: Clock
    _rng: random.Random
    _runs: dict[str, _Run]
    _lease: float
    owner: str
    hooks: Hooks
    stats: dict[str, int]

    def _spawn(self, machine: SagaMachine, state: SagaState, *, recovered: bool = False) -> None:
        now = self._clock.now()
        expires = state.lease_expires_at if state.lease_expires_at is not None else now
        run = _Run(machine, state, self._clock.monotonic() + expires - now)
        self._runs[state.saga_id] = run
        run.task = asyncio.create_task(self._drive(run, recovered), name=f"saga:{state.saga_id}")

    async def _drive(self, run: _Run, recovered: bool) -> None:
        try:
            await self._run_to_the_end(run, recovered)
        finally:  # (a stuck run stays listed until its alert is out: a close releases it)
            if self._runs.get(run.state.saga_id) is run:
                del self._runs[run.state.saga_id]

    async def _run_to_the_end(self, run: _Run, recovered: bool) -> None:
        try:
            if recovered:  # in the run, not in _spawn: a row its definition cannot run
                action = run.machine.next_action(run.state)  # (an index past its steps)
                if isinstance(action, RunStage):  # stops only itself, not the whole claim
                    run.resumed = {step.name for step in action.steps}
            await self._advance(run)
        except LeaseLost as exc:
            self.stats["lease_lost"] += 1
            log.warning("saga %s: %s; this process stops running it", run.state.saga_id, exc)
            self.hooks.emit("lease_lost", run.state)
        except Exception:
            # A bug in user code the engine calls outside a step (a `when` condition) or
            # in the engine: the row is left as it is, and the recovery loop claims it
            # again once its lease expires - retried, logged, never silently dropped.
            self.stats["errors"] += 1
            log.exception(
                "saga %s stopped on an unexpected error; it will be retried after its lease "
                "(%gs) expires",
                run.state.saga_id,
                self._lease,
            )
        finally:
            if not run.done.done():
                run.done.set_result(run.state if run.state.terminal else None)
        if run.state.terminal:
            self._finished(run.state)
            if run.state.status is SagaStatus.STUCK:
                await self._alerts_out([run.state.saga_id])

    async def _advance(self, run: _Run) -> None:
        """Ask the machine, do what it says, persist, repeat until it says nothing."""
        while True:
            # A store error under a cancel, a stage or a compensation leaves its commit
            # in doubt: the row is re-read, never guessed, and the cancel is committed
            # again or the step runs again under its unchanged idempotency key.
            try:
                if run.cancel_reason is not None:
                    if run.state.status is SagaStatus.RUNNING:
                        in_flight = tuple(run.resumed)
                        cancel = run.machine.cancel(
                            run.state, run.cancel_reason, in_flight, self._now()
                        )
                        await self._commit(run, cancel)
                    run.cancelled.set()
                action = run.machine.next_action(run.state)
                if type(action) is RunStage:
                    await self._run_stage(run, action)
                elif type(action) is Compensate:
                    await self._compensate(run, action)
                else:
                    return
            except StoreError:
                log.exception("saga %s: store error; reloading its row", run.state.saga_id)
                await self._reload(run)

    async def _reload(self, run: _Run) -> None:
        delay = 0.05
        while True:
            await self._clock.sleep(delay)
            try:
                state = await self._store.get(run.state.saga_id)
            except Exception:
                log.exception("saga %s: reload failed; retrying", run.state.saga_id)
                delay = min(delay * 2, 5.0)
                continue
            if state is not None and state.terminal and state.updated_at >= run.state.updated_at:
                run.state = state  # the commit in doubt did land, and finished the saga
                return
            if state is None or state.lease_owner != self.owner:
                raise LeaseLost(f"saga {run.state.saga_id!r} is no longer leased to {self.owner}")
            run.state = state
            return

    async def _run_stage(self, run: _Run, action: RunStage) -> None:
        run.attempted.clear()
        try:
            await self._run_stage_steps(run, action)
        except StoreError:
            # The stage's commit is in doubt and its row is re-read: a step that began
            # here may have applied with nothing recorded, as after a crash - uncertain
            # until it runs again (compensated if cancelled or past the deadline first).
            run.resumed.update(run.attempted)
            raise

    async def _run_stage_steps(self, run: _Run, action: RunStage) -> None:
        if len(action.steps) == 1:
            step = action.steps[0]
            outcome = await self._run_step(run, step)
            if not isinstance(outcome, StepFailure):
                outcome = await self._commit_success(run, step, outcome)
            if outcome is not None:
                await self._commit(run, self._failed(run, [outcome]))
            return
        failures: builtins.list[StepFailure] = []
        members = [
            asyncio.ensure_future(self._run_member(run, step, failures)) for step in action.steps
        ]
        try:
            await asyncio.wait(members, return_when=asyncio.FIRST_EXCEPTION)
        finally:
            for member in members:  # siblings never outlive their stage: after a store
                member.cancel()  # error the stage is re-read and run again as a whole
            ended = await asyncio.gather(*members, return_exceptions=True)
        for error in ended:
            if isinstance(error, Exception):
                raise error
        if failures:
            async with run.lock:
                await self._commit(run, self._failed(run, failures))

    async def _run_member(
        self, run: _Run, step: Step, failures: builtins.list[StepFailure]
    ) -> None:
        outcome = await self._run_step(run, step)
        if not isinstance(outcome, StepFailure):
            async with run.lock:
                outcome = await self._commit_success(run, step, outcome)
        if outcome is not None:
            failures.append(outcome)

    async def _commit_success(
        self, run: _Run, step: Step, result: Mapping[str, Any] | None
    ) -> StepFailure | None:
        """Commit ``step``'s success; a result that cannot be stored (nothing was
        written) is an uncertain failure, returned for the stage to commit once its
        other members have ended - committed at once, it started compensating while
        siblings still ran, and a sibling's later success could not be recorded."""
        succeeded = run.machine.step_succeeded(run.state, step.name, result, self._now())
        try:
            await self._commit(run, succeeded)
        except SerializationError as exc:
            attempt = run.state.step_attempts.get(step.name, 0) + 1
            return StepFailure(step.name, attempt, "uncertain", str(exc))
        self.hooks.emit("step_completed", run.state, step.name)
        return None

    def _failed(self, run: _Run, failures: builtins.list[StepFailure]) -> Transition:
        if run.cancel_reason is not None:
            uncertain = [f.step for f in failures if f.kind != "definite"]
            return run.machine.cancel(
                run.state, run.cancel_reason, uncertain, self._now(), failures
            )
        return run.machine.stage_failed(run.state, failures, self._now())

    async def _run_step(self, run: _Run, step: Step) -> Mapping[str, Any] | StepFailure | None:
        """Run ``step`` with its retries; returns its result or how it failed."""
        state = run.state
        attempt = state.step_attempts.get(step.name, 0)
        while True:
            attempt += 1
            outcome, error = await self._attempt(run, step, attempt)
            if not isinstance(outcome, StepFailure) or run.cancel_reason is not None:
                return outcome
            delay = run.machine.retry_delay(step, outcome, error, self._rng)
            if delay is None or self._past_deadline(run, delay):
                return outcome
            async with run.lock:
                await self._commit(run, run.machine.attempt_failed(run.state, outcome, self._now()))
            if not await self._interruptible_sleep(run, delay):
                return dataclasses.replace(outcome, record=False)  # (recorded above)

    async def _attempt(
        self, run: _Run, step: Step, attempt: int
    ) -> tuple[Mapping[str, Any] | StepFailure | None, BaseException | None]:
        state = run.state
        ctx = StepContext(
            state.saga_id,
            state.saga_name,
            step.name,
            attempt,
            f"{state.saga_id}:{step.name}",
            SagaContext.of(state.context),
        )
        if run.cancel_reason is not None:
            # Cancelled before this attempt began (a parallel member starts a loop turn
            # after its stage): not started here; as below, it may still have applied.
            kind = _unstarted_kind(run, step, attempt)
            return StepFailure(step.name, attempt, kind, run.cancel_reason, False), None
        timeout = self._step_timeout(run, step)
        if timeout is not None and timeout <= 0:
            # Not started here (the deadline came during the backoff or the commit
            # before it, or before a resumed step's re-run); see _unstarted_kind.
            run.interrupt(f"deadline of {run.machine.saga.deadline:g}s exceeded")
            kind = _unstarted_kind(run, step, attempt)
            return StepFailure(step.name, attempt, kind, "saga deadline exceeded", False), None
        run.resumed.discard(step.name)
        run.attempted.add(step.name)
        try:
            async with self._clock.timeout(timeout) as scope:
                run.scopes.add(scope)  # cancel() ends the attempt through its scope
                try:
                    result = await step.action(ctx)
                finally:
                    run.scopes.discard(scope)
        except StepFailed as exc:
            return StepFailure(step.name, attempt, "definite", exc.reason), exc
        except TimeoutError as exc:
            if run.cancel_reason is not None:
                return StepFailure(step.name, attempt, "uncertain", run.cancel_reason, False), exc
            cut = self._deadline_hit(run)  # the deadline's doing, not the step's own timeout
            if cut:
                run.interrupt(f"deadline of {run.machine.saga.deadline:g}s exceeded")
            reason = f"timed out after {timeout:g}s" if timeout is not None else repr(exc)
            return StepFailure(step.name, attempt, "timeout", reason, not cut), exc
        except Exception as exc:
            return StepFailure(step.name, attempt, "uncertain", f"{type(exc).__name__}: {exc}"), exc
        if result is None or type(result) is dict:
            return result, None
        if not isinstance(result, Mapping):
            reason = f"returned {type(result).__name__}; a step returns a mapping or None"
            return StepFailure(step.name, attempt, "uncertain", reason), None
        return result, None

    async def _compensate(self, run: _Run, action: Compensate) -> None:
        step, state = action.step, run.state
        assert step.compensate is not None
        ctx = StepContext(
            state.saga_id,
            state.saga_name,
            step.name,
            action.attempt,
            f"{state.saga_id}:{step.name}:compensate",
            SagaContext.of(state.context),
            compensating=True,
        )
        try:
            async with self._clock.timeout(step.effective_compensate_timeout):
                await step.compensate(ctx)
        except Exception as exc:
            reason = _describe(exc, step.effective_compensate_timeout)
            moved = run.machine.compensation_failed(state, step.name, reason, self._now())
            await self._commit(run, moved)
            if moved.state.status is SagaStatus.COMPENSATING:
                await self._clock.sleep(
                    run.machine.compensation_delay(moved.state, step.name, self._rng)
                )
            return
        await self._commit(run, run.machine.compensated(state, step.name, self._now()))
        self.hooks.emit("compensated", run.state, step.name)

    async def _commit(self, run: _Run, transition: Transition) -> None:
        state = transition.state
        if state.status is SagaStatus.STUCK:
            # Held until the alert is out (``_alert`` releases it): if this process dies
            # first, whoever claims the saga after the lease expires sends the alert.
            expires = self._clock.now() + self._lease
            state = state.evolve(lease_owner=self.owner, lease_expires_at=expires)
        elif state.terminal:  # the save releases a finished saga's lease
            state = state.evolve(lease_owner=None, lease_expires_at=None)
        run.finishing = state.terminal
        try:
            await self._store.save(state, transition.events, owner=self.owner)
        finally:
            run.finishing = False
        run.state = state

    async def _interruptible_sleep(self, run: _Run, seconds: float) -> bool:
        """Sleep unless the saga is cancelled meanwhile; False if it was."""
        if run.cancel_reason is not None:  # cancelled before the sleep began (during the
            return False  # commit before it): no scope of ours was there to interrupt
        try:
            async with self._clock.timeout(None) as scope:
                run.scopes.add(scope)
                try:
                    await self._clock.sleep(seconds)
                finally:
                    run.scopes.discard(scope)
        except TimeoutError:
            return False
        return run.cancel_reason is None

    def _step_timeout(self, run: _Run, step: Step) -> float | None:
        deadline = run.state.deadline_at
        if deadline is None:
            return step.timeout
        remaining = deadline - self._clock.now()
        return remaining if step.timeout is None else min(step.timeout, remaining)

    def _deadline_hit(self, run: _Run) -> bool:
        deadline = run.state.deadline_at
        return deadline is not None and self._clock.now() >= deadline

    def _past_deadline(self, run: _Run, delay: float) -> bool:
        deadline = run.state.deadline_at
        return deadline is not None and self._clock.now() + delay >= deadline

    def _finished(self, state: SagaState) -> None:
        self.stats[state.status.value] += 1
        if state.status is SagaStatus.STUCK:
            self._alert(state)
        else:
            self.hooks.emit(state.status.value, state)

    def _alert(self, state: SagaState, *, late: bool = False) -> None:
        """The alert for a stuck saga: an error log line and the ``stuck`` hook."""
        log.error(
            "ALERT saga %s (%s v%d) is stuck: %s; run `seamwork sagas retry %s` or `abort`%s",
            state.saga_id,
            state.saga_name,
            state.saga_version,
            _stuck_reason(state),
            state.saga_id,
            " (sent late: the process that got it stuck stopped before its alert)" if late else "",
        )
        self.hooks.emit(SagaStatus.STUCK.value, state)

    async def _alerts_out(self, saga_ids: builtins.list[str]) -> None:
        """Release the leases stuck sagas keep until their alert is out. If this fails,
        the alerts go out again once the leases expire: twice rather than never."""
        try:  # (a saga retried here meanwhile is not stuck: its new lease stays)
            await self._store.release(self.owner, saga_ids, status=SagaStatus.STUCK)
        except StoreError as exc:
            log.warning(
                "could not record that the alerts of %s went out (%s); they will be sent "
                "again when their leases (%gs) expire",
                ", ".join(saga_ids),
                exc,
                self._lease,
            )

    def _now(self) -> float:
        return self._clock.now()


def _unstarted_kind(run: _Run, step: Step, attempt: int) -> FailureKind:
    """How a step ends whose attempt was stopped before it began. Uncertain if it may
    have applied all the same: resumed (it may have run in a process that died, or
    under a commit in doubt), or a retry (only uncertain failures are retried, so an
    earlier attempt may have applied); definite only if it never ran at all."""
    return "uncertain" if attempt > 1 or step.name in run.resumed else "definite"


def _describe(exc: BaseException, timeout: float | None) -> str:
    if isinstance(exc, TimeoutError) and timeout is not None:
        return f"timed out after {timeout:g}s"
    return f"{type(exc).__name__}: {exc}"


def _stuck_reason(state: SagaState) -> str:
    failed = {s: n for s, n in state.compensation_attempts.items() if n}
    return f"compensation attempts {failed}; saga failed because {state.failure_reason}"
