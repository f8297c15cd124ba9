"""The saga orchestrator: the thin async driver around ``SagaMachine``.

It calls steps, persists each transition (one commit, awaited before moving on),
recovers sagas after a crash, renews leases, and raises the alarm when a saga is
stuck or cannot be resumed. Every decision is the machine's; this module does I/O.
"""

from __future__ import annotations

import asyncio
import builtins
import logging
import random
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from seamwork._core.clock import Clock, SystemClock
from seamwork._core.codec import dumps
from seamwork._core.hooks import Hooks
from seamwork._core.ids import new_id
from seamwork._core.lifecycle import OpenClose
from seamwork.errors import (
    ConfigError,
    CorruptSagaError,
    InvalidSagaOperation,
    LeaseLost,
    SagaNotFound,
    SerializationError,
    StepFailed,
    StoreError,
    UnknownSagaError,
)
from seamwork.saga._definition import Saga, Step, StepContext
from seamwork.saga._machine import (
    Compensate,
    FailureKind,
    RunStage,
    SagaMachine,
    StepFailure,
    Transition,
    abort,
    retry_stuck,
)
from seamwork.saga._ports import SagaKey, SagaStore
from seamwork.saga._state import SagaState, SagaStatus

log = logging.getLogger("seamwork.saga")

EVENTS = (
    "started",
    "step_completed",
    "compensated",
    "completed",
    "failed",
    "stuck",
    "stranded",
    "corrupt",
    "recovered",
    "lease_lost",
)


class _Run:
    """One saga being driven by this process."""

    __slots__ = (
        "cancel_reason",
        "cancelled",
        "done",
        "lock",
        "machine",
        "resumed",
        "scopes",
        "state",
        "task",
    )

    def __init__(self, machine: SagaMachine, state: SagaState) -> None:
        self.machine = machine
        self.state = state
        self.task: asyncio.Task[None] | None = None
        self.done: asyncio.Future[SagaState | None] = asyncio.get_running_loop().create_future()
        self.scopes: set[asyncio.Timeout] = set()
        self.cancel_reason: str | None = None
        self.cancelled = asyncio.Event()
        self.lock = asyncio.Lock()
        # Steps of the current stage that may have run (and applied) in a process
        # that died before their checkpoint: their outcome is uncertain until re-run.
        self.resumed: set[str] = set()

    def interrupt(self, reason: str) -> None:
        self.cancel_reason = reason
        now = asyncio.get_running_loop().time()
        for scope in self.scopes:
            scope.reschedule(now)


class SagaRun:
    """A handle on a started (or recovered) saga."""

    __slots__ = ("_orchestrator", "saga_id")

    def __init__(self, orchestrator: SagaOrchestrator, saga_id: str) -> None:
        self._orchestrator = orchestrator
        self.saga_id = saga_id

    async def wait(self, *, poll: float = 0.05) -> SagaState:
        """Wait until the saga is completed, failed or stuck, and return its state.

        Works for sagas an earlier process began: they are awaited once recovered,
        or polled in the store when another process runs them.

        Bound it with ``asyncio.timeout`` if need be.

        Raises:
            SagaNotFound: no saga has this id.
        """
        return await self._orchestrator._wait(self.saga_id, poll)

    def __repr__(self) -> str:
        return f"SagaRun({self.saga_id!r})"


class SagaOrchestrator(OpenClose):
    """Runs sagas durably on a ``SagaStore``.

    Use it as an async context manager: entering opens the store, attaches to it,
    reports sagas no registered definition can run, and resumes every saga that was
    running or compensating when the previous process stopped. Leaving stops the
    runs (they resume next time) and closes the store.

    Args:
        store: where saga state lives; the orchestrator opens and closes it.
        sagas: the definitions this process can run (several versions of one saga
            may be registered; new sagas start on the highest).
        owner: this worker's stable name (default: a fresh one). Leases are held as
            ``"<owner>:<incarnation>"``, a new incarnation per start; a worker restarted
            under the same name takes its previous incarnation's sagas back at once,
            and anything that incarnation still tries to write is fenced off.
        clock: time source (``seamwork.testing.ManualClock`` in tests).
        rng: randomness for backoff jitter.
        lease_seconds: how long a claimed saga stays leased without renewal.
        recovery_interval: seconds between looks for sagas to claim.
        claim_batch: sagas claimed per look.
        max_running: the most sagas this process drives at once (None: no limit);
            with several workers on one store, a limit spreads a backlog over them.
        on_stuck: called with the ``SagaState`` of a saga that gave up compensating.
        on_stranded: called with the list of sagas no registered definition can run.
    """

    def __init__(
        self,
        store: SagaStore,
        sagas: Iterable[Saga],
        *,
        owner: str | None = None,
        clock: Clock | None = None,
        rng: random.Random | None = None,
        lease_seconds: float = 30.0,
        recovery_interval: float = 1.0,
        claim_batch: int = 100,
        max_running: int | None = None,
        on_stuck: Callable[[SagaState], object] | None = None,
        on_stranded: Callable[[list[SagaState]], object] | None = None,
    ) -> None:
        self._store = store
        self._machines: dict[SagaKey, SagaMachine] = {}
        self._latest: dict[str, Saga] = {}
        for saga in sagas:
            self._register(saga)
        if not self._machines:
            raise ConfigError("SagaOrchestrator needs at least one Saga definition")
        if lease_seconds <= 0:
            raise ConfigError(f"lease_seconds must be > 0, got {lease_seconds!r}")
        if recovery_interval <= 0:
            raise ConfigError(f"recovery_interval must be > 0, got {recovery_interval!r}")
        if recovery_interval > lease_seconds / 3:
            raise ConfigError(
                f"recovery_interval ({recovery_interval!r}) must be <= lease_seconds / 3 "
                f"({lease_seconds / 3:g}): leases are renewed from the same loop"
            )
        if claim_batch < 1:
            raise ConfigError(f"claim_batch must be >= 1, got {claim_batch!r}")
        if max_running is not None and max_running < 1:
            raise ConfigError(f"max_running must be >= 1 or None, got {max_running!r}")
        self._max_running = max_running
        if owner is not None and (not isinstance(owner, str) or not owner or ":" in owner):
            raise ConfigError(f"owner must be a non-empty name without ':', got {owner!r}")
        self.worker = owner or f"orchestrator-{new_id()[:8]}"
        self.owner = f"{self.worker}:{new_id()}"
        self._clock: Clock = clock or SystemClock()
        self._rng = rng or random.Random()
        self._lease = lease_seconds
        self._interval = recovery_interval
        self._batch = claim_batch
        self._runs: dict[str, _Run] = {}
        self._reported: set[str] = set()
        self._loop_task: asyncio.Task[None] | None = None
        self._open = False
        self.hooks = Hooks(EVENTS, log)
        if on_stuck is not None:
            self.hooks.on("stuck", on_stuck)
        if on_stranded is not None:
            self.hooks.on("stranded", on_stranded)
        self.stats: dict[str, int] = dict.fromkeys(
            (
                "started",
                "completed",
                "failed",
                "stuck",
                "recovered",
                "lease_lost",
                "corrupt",
                "errors",
            ),
            0,
        )

    def _register(self, saga: Saga) -> None:
        if not isinstance(saga, Saga):
            raise ConfigError(f"expected Saga definitions, got {saga!r}")
        if saga.key in self._machines:
            raise ConfigError(f"saga {saga.name!r} version {saga.version} is registered twice")
        self._machines[saga.key] = SagaMachine(saga)
        latest = self._latest.get(saga.name)
        if latest is None or saga.version > latest.version:
            self._latest[saga.name] = saga

    def on(self, event: str, callback: Callable[..., object]) -> Callable[[], None]:
        """Subscribe to an orchestrator event (see ``EVENTS``); returns an unsubscribe."""
        return self.hooks.on(event, callback)

    # --- lifecycle ----------------------------------------------------------------

    async def open(self) -> None:
        """Open the store, report stranded sagas, recover, and start the worker loop."""
        if self._open:
            return
        await self._store.open()
        try:
            await self._store.attach(self.owner)
        except BaseException:
            await self._store.aclose()
            raise
        self._open = True
        await self._report_stranded()
        await self._recover_once(drain=True)
        self._loop_task = asyncio.create_task(self._worker_loop(), name="seamwork-saga-worker")

    async def aclose(self) -> None:
        """Stop every run (it resumes on the next start), release leases, close the store."""
        if not self._open:
            return
        self._open = False
        owned = list(self._runs)  # read before the runs end and remove themselves
        tasks = [t for t in (self._loop_task, *(r.task for r in self._runs.values())) if t]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for run in self._runs.values():
            if not run.done.done():
                run.done.set_result(None)
        self._runs.clear()
        try:
            if owned:
                await self._store.release(self.owner, owned)
        finally:
            await self._store.aclose()

    # --- public operations --------------------------------------------------------

    async def start(
        self,
        name: str,
        data: Mapping[str, Any] | None = None,
        *,
        saga_id: str | None = None,
        version: int | None = None,
    ) -> SagaRun:
        """Start saga ``name`` with ``data`` as its context; returns once it is stored.

        Starting with an existing ``saga_id`` starts nothing and returns a handle on
        the existing saga (idempotent start).

        Raises:
            UnknownSagaError: no definition ``name`` (with ``version``) is registered.
            SerializationError: ``data`` is not JSON-serializable (nothing written).
        """
        self._require_open()
        machine = self._machine_for(name, version)
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise ConfigError(f"saga data must be a mapping, got {type(data).__name__}")
        dumps(data, what="saga data")
        if saga_id is None:
            saga_id = new_id()
        elif not isinstance(saga_id, str) or not saga_id.strip():
            raise ConfigError(f"saga_id must be a non-empty string, got {saga_id!r}")
        if saga_id in self._runs:
            return SagaRun(self, saga_id)
        now = self._clock.now()
        begun = machine.begin(
            saga_id, data, now, owner=self.owner, lease_expires_at=now + self._lease
        )
        if not await self._store.create(begun.state, begun.events):
            existing = await self._store.get(saga_id)
            if existing is not None and existing.saga_name != name:
                raise InvalidSagaOperation(
                    f"saga id {saga_id!r} is already used by a {existing.saga_name!r} saga"
                )
            if (
                existing is not None
                and existing.lease_owner == self.owner
                and existing.status.active
                and saga_id not in self._runs
            ):  # our own earlier start whose commit was in doubt: run it now
                machine = self._machines[(existing.saga_name, existing.saga_version)]
                self._spawn(machine, existing, recovered=True)
            return SagaRun(self, saga_id)
        self.stats["started"] += 1
        self.hooks.emit("started", begun.state)
        self._spawn(machine, begun.state)
        return SagaRun(self, saga_id)

    def handle(self, saga_id: str) -> SagaRun:
        """A handle on an existing saga (e.g. one recovered after a restart) to ``wait`` on."""
        return SagaRun(self, saga_id)

    async def get(self, saga_id: str) -> SagaState | None:
        """The stored state of a saga, or None."""
        return await self._store.get(saga_id)

    async def list(
        self, *, status: SagaStatus | str | None = None, name: str | None = None, limit: int = 100
    ) -> builtins.list[SagaState]:
        """Stored sagas, most recently updated first."""
        return await self._store.list(
            status=SagaStatus(status) if status is not None else None, name=name, limit=limit
        )

    async def retry(self, saga_id: str) -> SagaRun:
        """Start compensating a ``stuck`` saga again, with fresh attempts."""
        self._require_open()
        state = await self._existing(saga_id)
        machine = self._machine_for(state.saga_name, state.saga_version)
        moved = retry_stuck(state, self._clock.now())
        owned = moved.state.evolve(
            lease_owner=self.owner, lease_expires_at=self._clock.now() + self._lease
        )
        await self._store.save(owned, moved.events, expect_status=SagaStatus.STUCK)
        self._spawn(machine, owned)
        return SagaRun(self, saga_id)

    async def abort(self, saga_id: str, reason: str = "aborted by operator") -> SagaState:
        """Give up on a ``stuck`` saga: it is marked ``failed`` and left as it is."""
        state = await self._existing(saga_id)
        moved = abort(state, self._clock.now(), reason)
        await self._store.save(moved.state, moved.events, expect_status=SagaStatus.STUCK)
        return moved.state

    async def cancel(self, saga_id: str, reason: str = "cancelled by operator") -> SagaState:
        """Stop a running saga and compensate what it applied; returns once that is stored.

        The step in flight, if any, is interrupted; its outcome is uncertain, so it is
        compensated too.
        """
        self._require_open()
        run = self._runs.get(saga_id)
        if run is None:
            state = await self._existing(saga_id)
            if state.status is SagaStatus.COMPENSATING:
                return state
            raise InvalidSagaOperation(
                f"saga {saga_id!r} is {state.status.value} and not run by this orchestrator"
            )
        if run.state.status is not SagaStatus.RUNNING:
            return run.state
        run.interrupt(reason)
        waiters: set[asyncio.Future[Any]] = {
            asyncio.ensure_future(run.cancelled.wait()),
            asyncio.shield(run.done),
        }
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        for waiter in waiters:
            waiter.cancel()
        return run.state

    @property
    def running(self) -> int:
        """How many sagas this process is driving right now."""
        return len(self._runs)

    # --- driving one saga ---------------------------------------------------------

    def _spawn(self, machine: SagaMachine, state: SagaState, *, recovered: bool = False) -> None:
        run = _Run(machine, state)
        action = machine.next_action(state)
        if recovered and isinstance(action, RunStage):
            run.resumed = {step.name for step in action.steps}
        self._runs[state.saga_id] = run
        run.task = asyncio.create_task(self._drive(run), name=f"saga:{state.saga_id}")

    async def _drive(self, run: _Run) -> None:
        try:
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
            if self._runs.get(run.state.saga_id) is run:
                del self._runs[run.state.saga_id]
            if not run.done.done():
                run.done.set_result(run.state if run.state.terminal else None)
        if run.state.terminal:
            self._finished(run.state)

    async def _advance(self, run: _Run) -> None:
        """Ask the machine, do what it says, persist, repeat until it says nothing."""
        while True:
            if run.cancel_reason is not None:
                if run.state.status is SagaStatus.RUNNING:
                    in_flight = tuple(run.resumed)
                    cancel = run.machine.cancel(
                        run.state, run.cancel_reason, in_flight, self._now()
                    )
                    await self._commit(run, cancel)
                run.cancelled.set()
            action = run.machine.next_action(run.state)
            # A store error under a stage or compensation leaves its commit in doubt:
            # the row is re-read, never guessed, and the step runs again under its
            # unchanged idempotency key.
            try:
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
        if len(action.steps) == 1:
            step = action.steps[0]
            outcome = await self._run_step(run, step)
            if isinstance(outcome, StepFailure):
                await self._commit(run, self._failed(run, [outcome]))
            else:
                await self._commit_success(run, step, outcome)
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
        if isinstance(outcome, StepFailure):
            failures.append(outcome)
            return
        async with run.lock:
            await self._commit_success(run, step, outcome)

    async def _commit_success(
        self, run: _Run, step: Step, result: Mapping[str, Any] | None
    ) -> None:
        succeeded = run.machine.step_succeeded(run.state, step.name, result, self._now())
        try:
            await self._commit(run, succeeded)
        except SerializationError as exc:  # the result cannot be stored: nothing was
            attempt = run.state.step_attempts.get(step.name, 0) + 1  # written
            failure = StepFailure(step.name, attempt, "uncertain", str(exc))
            await self._commit(run, self._failed(run, [failure]))
            return
        self.hooks.emit("step_completed", run.state, step.name)

    def _failed(self, run: _Run, failures: builtins.list[StepFailure]) -> Transition:
        if run.cancel_reason is not None:
            uncertain = [f.step for f in failures if f.kind != "definite"]
            return run.machine.cancel(run.state, run.cancel_reason, uncertain, self._now())
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
                return outcome

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
            state.context,
        )
        timeout = self._step_timeout(run, step)
        if timeout is not None and timeout <= 0:
            # Not started here. A step resumed after a crash may have applied its effect
            # in the dead process (uncertain, compensated); any other was never run.
            run.interrupt(f"deadline of {run.machine.saga.deadline:g}s exceeded")
            kind: FailureKind = "uncertain" if step.name in run.resumed else "definite"
            return StepFailure(step.name, attempt, kind, "saga deadline exceeded"), None
        run.resumed.discard(step.name)
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
                return StepFailure(step.name, attempt, "uncertain", run.cancel_reason), exc
            if self._deadline_hit(run):
                run.interrupt(f"deadline of {run.machine.saga.deadline:g}s exceeded")
            reason = f"timed out after {timeout:g}s" if timeout is not None else repr(exc)
            return StepFailure(step.name, attempt, "timeout", reason), exc
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
            state.context,
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
        if state.terminal:  # the store releases a finished saga's lease with this save
            state = state.evolve(lease_owner=None, lease_expires_at=None)
        await self._store.save(state, transition.events, owner=self.owner)
        run.state = state

    async def _interruptible_sleep(self, run: _Run, seconds: float) -> bool:
        """Sleep unless the saga is cancelled meanwhile; False if it was."""
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
        status = state.status
        self.stats[status.value] += 1
        if status is SagaStatus.STUCK:
            log.error(
                "ALERT saga %s (%s v%d) is stuck: %s; run `seamwork sagas retry %s` or `abort`",
                state.saga_id,
                state.saga_name,
                state.saga_version,
                _stuck_reason(state),
                state.saga_id,
            )
        self.hooks.emit(status.value, state)

    # --- recovery -----------------------------------------------------------------

    async def _worker_loop(self) -> None:
        renew_every = self._lease / 3
        last_renew = self._clock.monotonic()
        while True:
            await self._clock.sleep(self._interval)
            try:
                if self._clock.monotonic() - last_renew >= renew_every:
                    await self._renew()
                    last_renew = self._clock.monotonic()
                await self._recover_once()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("saga recovery round failed; retrying in %.1fs", self._interval)

    async def _recover_once(self, *, drain: bool = False) -> None:
        """Claim free sagas: one batch a round, or (``drain``, at start-up) until none is
        left - never more than ``max_running`` at once, so workers share a backlog."""
        while True:
            room = self._batch
            if self._max_running is not None:
                room = min(room, self._max_running - len(self._runs))
                if room <= 0:
                    return
            result = await self._store.claim(
                self.owner,
                list(self._machines),
                now=self._clock.now(),
                lease_seconds=self._lease,
                limit=room,
            )
            for error in result.corrupt:
                self._report_corrupt(error)
            for state in result.claimed:
                if state.saga_id in self._runs:
                    continue
                self.stats["recovered"] += 1
                self.hooks.emit("recovered", state)
                machine = self._machines[(state.saga_name, state.saga_version)]
                self._spawn(machine, state, recovered=True)
            if not drain or len(result.claimed) < room:
                return

    async def _renew(self) -> None:
        owned = list(self._runs)
        if not owned:
            return
        kept = await self._store.renew(
            self.owner, owned, now=self._clock.now(), lease_seconds=self._lease
        )
        for saga_id in set(owned) - kept:
            run = self._runs.get(saga_id)
            if run is not None and run.task is not None:
                # Counted and announced like a fenced write: whichever finds out first.
                self.stats["lease_lost"] += 1
                log.warning("saga %s: lease lost to another owner; stopping it here", saga_id)
                self.hooks.emit("lease_lost", run.state)
                run.task.cancel()

    async def _report_stranded(self) -> None:
        stranded = await self._store.stranded(list(self._machines))
        if not stranded:
            return
        registered = ", ".join(f"{n} v{v}" for n, v in sorted(self._machines))
        for state in stranded:
            log.warning(
                "saga %s cannot be resumed: %s version %d is not registered (registered: %s); "
                "its row is left untouched",
                state.saga_id,
                state.saga_name,
                state.saga_version,
                registered,
            )
        self.hooks.emit("stranded", stranded)

    def _report_corrupt(self, error: CorruptSagaError) -> None:
        if error.saga_id in self._reported:
            return
        self._reported.add(error.saga_id)
        self.stats["corrupt"] += 1
        log.error("%s; the row is left untouched and other sagas keep running", error)
        self.hooks.emit("corrupt", error)

    # --- helpers ------------------------------------------------------------------

    async def _wait(self, saga_id: str, poll: float) -> SagaState:
        while True:
            run = self._runs.get(saga_id)
            if run is not None:
                final = await asyncio.shield(run.done)
                if final is not None:
                    return final
                continue
            state = await self._store.get(saga_id)
            if state is None:
                raise SagaNotFound(f"no saga with id {saga_id!r}")
            if state.terminal:
                return state
            await asyncio.sleep(poll)

    async def _existing(self, saga_id: str) -> SagaState:
        state = await self._store.get(saga_id)
        if state is None:
            raise SagaNotFound(f"no saga with id {saga_id!r}")
        return state

    def _machine_for(self, name: str, version: int | None) -> SagaMachine:
        if version is None:
            latest = self._latest.get(name)
            if latest is None:
                raise UnknownSagaError(
                    f"no saga named {name!r} is registered (registered: {sorted(self._latest)})"
                )
            version = latest.version
        machine = self._machines.get((name, version))
        if machine is None:
            raise UnknownSagaError(f"saga {name!r} version {version} is not registered")
        return machine

    def _require_open(self) -> None:
        if not self._open:
            raise InvalidSagaOperation(
                "the orchestrator is not open: use `async with SagaOrchestrator(...)` or open()"
            )

    def _now(self) -> float:
        return self._clock.now()


def _describe(exc: BaseException, timeout: float | None) -> str:
    if isinstance(exc, TimeoutError) and timeout is not None:
        return f"timed out after {timeout:g}s"
    return f"{type(exc).__name__}: {exc}"


def _stuck_reason(state: SagaState) -> str:
    failed = {s: n for s, n in state.compensation_attempts.items() if n}
    return f"compensation attempts {failed}; saga failed because {state.failure_reason}"
