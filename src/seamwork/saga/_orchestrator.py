"""The saga orchestrator: the thin async driver around ``SagaMachine``.

It calls steps, persists each transition (one commit, awaited before moving on),
recovers sagas after a crash, renews leases, and raises the alarm when a saga is
stuck or cannot be resumed. Every decision is the machine's; this module does I/O.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import logging
import math
import random
from collections.abc import Callable, Iterable, Iterator, Mapping
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
    SagaNotFound,
    UnknownSagaError,
)
from seamwork.saga._definition import MAX_SAGA_ID_BYTES, Saga, check_name
from seamwork.saga._driver import Driver, _Run
from seamwork.saga._machine import (
    SagaMachine,
    abort,
    retry_stuck,
)
from seamwork.saga._ports import ClaimResult, SagaKey, SagaStore
from seamwork.saga._state import SagaState, SagaStatus, as_status

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


def _finite_positive(value: object) -> bool:
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value > 0
    )


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
            InvalidSagaOperation: the orchestrator is closed, or closed while waiting.
        """
        return await self._orchestrator._wait(self.saga_id, poll)

    def __repr__(self) -> str:
        return f"SagaRun({self.saga_id!r})"


class SagaOrchestrator(Driver, OpenClose):
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
        lease_seconds: how long a claimed saga stays leased without renewal; a saga
            whose renewals fail is stopped here before its lease runs out.
        recovery_interval: seconds between looks for sagas to claim.
        claim_batch: sagas claimed per look.
        max_running: the most sagas this process claims to drive at once (None: no
            limit); with several workers on one store, a limit spreads a backlog over
            them. It caps what recovery claims, not ``start()``: a saga started here
            always runs here (refusing it would leave the caller's request undone).
        on_stuck: called with the ``SagaState`` of a saga that gave up compensating:
            at least once, since the saga keeps its lease until the alert is out; if
            the process dies first, whoever claims the saga next sends the alert. A
            plain function (hooks are called synchronously; an async one is refused).
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
        for name, seconds in (
            ("lease_seconds", lease_seconds),
            ("recovery_interval", recovery_interval),
        ):  # an infinite (or NaN) lease never expires: a dead worker's sagas would wait for ever
            if not _finite_positive(seconds):
                raise ConfigError(f"{name} must be a finite number > 0, got {seconds!r}")
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
        self.worker = owner or f"orchestrator-{new_id()[-12:]}"  # (random digits)
        self.owner = f"{self.worker}:{new_id()}"
        self._clock: Clock = clock or SystemClock()
        self._rng = rng or random.Random()
        self._lease = lease_seconds
        self._interval = recovery_interval
        self._batch = claim_batch
        self._runs: dict[str, _Run] = {}
        self._reported: set[str] = set()
        self._loop_task: asyncio.Task[None] | None = None
        self._watch_task: asyncio.Task[None] | None = None
        self._open = False
        self._spawning_calls: set[asyncio.Future[None]] = set()
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
                "late_alerts",
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
        try:
            await self._report_stranded()
            await self._recover_once(drain=True)
        except BaseException:
            # Not open after all: stop what the start-up recovery spawned, release its
            # leases and close the store, so a later open() starts afresh.
            await self.aclose()
            raise
        self._loop_task = asyncio.create_task(self._worker_loop(), name="seamwork-saga-worker")
        self._watch_task = asyncio.create_task(self._lease_watch(), name="seamwork-saga-leases")

    async def aclose(self) -> None:
        """Stop every run (it resumes on the next start), release leases, close the store."""
        if not self._open:
            return
        self._open = False
        while self._spawning_calls:  # a start or retry under way ends first (its run is
            await asyncio.wait(builtins.list(self._spawning_calls))  # stopped below)
        owned = list(self._runs)  # read before the runs end and remove themselves
        # Runs cut while their final save was under way: it may have landed.
        in_doubt = [saga_id for saga_id, run in self._runs.items() if run.finishing]
        loops = (self._loop_task, self._watch_task)
        tasks = [t for t in (*loops, *(r.task for r in self._runs.values())) if t]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for run in self._runs.values():
            if not run.done.done():
                run.done.set_result(None)
        self._runs.clear()
        try:
            kept = await self._settle_final_saves(in_doubt)
            released = [saga_id for saga_id in owned if saga_id not in kept]
            if released:
                await self._store.release(self.owner, released)
        finally:
            await self._store.aclose()

    async def _settle_final_saves(self, saga_ids: builtins.list[str]) -> set[str]:
        """Of sagas whose final save a close cut short, the ones whose lease must stay.

        A save that made the saga ``stuck`` and landed keeps the lease as the mark of
        an alert owed: the alert goes out here, before the lease is released. A row
        that cannot be read keeps its lease, so an alert it may owe is sent by whoever
        claims it next."""
        kept: set[str] = set()
        for saga_id in saga_ids:
            try:
                state = await self._store.get(saga_id)
            except Exception:
                log.exception("saga %s: could not read its row while closing", saga_id)
                kept.add(saga_id)
                continue
            if state is None or state.lease_owner != self.owner:
                continue  # finished, or moved on by an operator: nothing owed here
            if state.status is SagaStatus.STUCK:
                self._finished(state)  # its alert is owed, and ours to send
        return kept

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
        if type(data) is not dict:  # any mapping will do (a step's result may be one too);
            data = dict(data)  # the context is stored as a JSON object
        dumps(data, what="saga data")
        if saga_id is None:
            saga_id = new_id()
        else:
            check_name("saga_id", saga_id, ConfigError, MAX_SAGA_ID_BYTES)
        with self._spawning():
            return await self._begin(machine, name, data, saga_id)

    async def _begin(
        self, machine: SagaMachine, name: str, data: dict[str, Any], saga_id: str
    ) -> SagaRun:
        running = self._runs.get(saga_id)
        if running is not None:
            _check_same_saga(saga_id, name, running.state)
            return SagaRun(self, saga_id)
        now = self._clock.now()
        begun = machine.begin(
            saga_id, data, now, owner=self.owner, lease_expires_at=now + self._lease
        )
        if not await self._store.create(begun.state, begun.events):
            existing = await self._store.get(saga_id)
            if existing is not None:
                _check_same_saga(saga_id, name, existing)
            if (
                existing is not None
                and existing.lease_owner == self.owner
                and existing.status.active
                and saga_id not in self._runs
            ):  # our own earlier start whose commit was in doubt: run it now
                await self._run_own(existing)
            return SagaRun(self, saga_id)
        self.stats["started"] += 1
        self.hooks.emit("started", begun.state)
        self._spawn(machine, begun.state)
        return SagaRun(self, saga_id)

    async def _run_own(self, state: SagaState) -> None:
        """Run a saga found leased here with no run, on a lease renewed first: the one
        it has may have expired, and another worker's claim may take it any moment."""
        now = self._clock.now()
        kept = await self._store.renew(
            self.owner, [state.saga_id], now=now, lease_seconds=self._lease
        )
        if state.saga_id in kept and state.saga_id not in self._runs:
            machine = self._machines[(state.saga_name, state.saga_version)]
            self._spawn(machine, state.evolve(lease_expires_at=now + self._lease), recovered=True)

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
            status=as_status(status) if status is not None else None, name=name, limit=limit
        )

    async def retry(self, saga_id: str) -> SagaRun:
        """Start compensating a ``stuck`` saga again, with fresh attempts."""
        self._require_open()
        with self._spawning():
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
        self._require_open()
        state = await self._existing(saga_id)
        moved = abort(state, self._clock.now(), reason)
        await self._store.save(moved.state, moved.events, expect_status=SagaStatus.STUCK)
        return moved.state

    async def cancel(self, saga_id: str, reason: str = "cancelled by operator") -> SagaState:
        """Stop a running saga and compensate what it applied; returns once that is stored.

        The step in flight, if any, is interrupted; its outcome is uncertain, so it is
        compensated too. A saga already compensating is returned as it is.

        Raises:
            InvalidSagaOperation: the saga is not running here: it completed (also when
                it completes while the cancel waits for the step in flight or the commit
                under way: nothing is undone), failed, is stuck, or another process runs
                it; or its run here stopped (a close, a lost lease) before the cancel
                was confirmed stored.
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
        if run.state.status is SagaStatus.RUNNING:
            run.interrupt(reason)
            waiters: set[asyncio.Future[Any]] = {
                asyncio.ensure_future(run.cancelled.wait()),
                asyncio.shield(run.done),
            }
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            for waiter in waiters:
                waiter.cancel()
        if run.state.status is SagaStatus.COMPLETED:  # its last step landed first
            raise InvalidSagaOperation(
                f"saga {saga_id!r} is completed: it finished before the cancel took hold"
            )
        if run.state.status is SagaStatus.RUNNING:  # the run ended with no cancel stored
            raise InvalidSagaOperation(
                f"saga {saga_id!r} stopped running here (the orchestrator closed, lost its "
                "lease, or hit an error) before its cancel was confirmed stored; it may still "
                "be running: see get(), and cancel it where it runs"
            )
        return run.state

    @property
    def running(self) -> int:
        """How many sagas this process is driving right now."""
        return len(self._runs)

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
        left - never more than ``max_running`` at once, so workers share a backlog.

        A claim is a ``_spawning`` call: a close lets it finish, then stops and releases
        what it claimed (cut short, its leases would outlive this process's interest)."""
        while self._open:
            room = self._batch
            if self._max_running is not None:
                room = min(room, self._max_running - len(self._runs))
                if room <= 0:
                    return
            with self._spawning():
                result = await self._store.claim(
                    self.owner,
                    list(self._machines),
                    now=self._clock.now(),
                    lease_seconds=self._lease,
                    limit=room,
                )
                claimed = await self._take_over(result)
            if not drain or claimed < room:
                return

    async def _take_over(self, result: ClaimResult) -> int:
        """Run the sagas a claim leased here and send the alerts it handed over; returns
        how many it held."""
        for error in result.corrupt:
            self._report_corrupt(error)
        for state in result.claimed:
            if state.saga_id in self._runs:
                continue
            self.stats["recovered"] += 1
            self.hooks.emit("recovered", state)
            machine = self._machines[(state.saga_name, state.saga_version)]
            self._spawn(machine, state, recovered=True)
        if result.alerts:
            self.stats["late_alerts"] += len(result.alerts)
            for state in result.alerts:
                self._alert(state, late=True)
            await self._alerts_out([state.saga_id for state in result.alerts])
        return len(result.claimed) + len(result.alerts)

    async def _renew(self) -> None:
        owned = list(self._runs)
        if not owned:
            return
        began = self._clock.monotonic()  # the new expiry counts from before the call
        kept = await self._store.renew(
            self.owner, owned, now=self._clock.now(), lease_seconds=self._lease
        )
        for saga_id in owned:
            run = self._runs.get(saga_id)
            if run is None:
                continue
            if saga_id in kept:
                run.lease_until = max(run.lease_until, began + self._lease)
            elif not run.finishing:  # (its final save, fenced, released the lease itself)
                self._stop(run, "lease lost to another owner")

    async def _lease_watch(self) -> None:
        """Stop every run whose lease runs out before the next look: renewals failed
        (the store is unreachable from here, or too slow), and once the lease expires
        another worker may claim the saga and run its step too. Apart from the worker
        loop, which may be held up in a renewal for as long as the store's deadline."""
        while True:
            horizon = self._clock.monotonic() + self._interval
            for run in builtins.list(self._runs.values()):
                # (a run awaiting its final save is spared, as by _renew: that save is
                # fenced, and stopping the run would only lose its hooks and alert)
                if run.lease_until <= horizon and not run.finishing:
                    self._stop(run, "lease runs out before it could be renewed")
            await self._clock.sleep(self._interval)

    def _stop(self, run: _Run, why: str) -> None:
        if run.task is None or run.task.done():
            return
        # Counted and announced like a fenced write: whichever finds out first.
        self.stats["lease_lost"] += 1
        log.warning("saga %s: %s; stopping it here", run.state.saga_id, why)
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
            if not self._open:  # (closed before, or while, waiting: the store is gone)
                raise InvalidSagaOperation(
                    f"the orchestrator is closed, so saga {saga_id!r} cannot be waited on "
                    "here; it resumes when an orchestrator opens its store again"
                )
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

    @contextlib.contextmanager
    def _spawning(self) -> Iterator[None]:
        """A start or retry under way: ``aclose()`` waits for it to end, so its run is
        spawned before the close stops every run (and releases its lease), never after
        the store closed, where it would run on alone."""
        ended: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._spawning_calls.add(ended)
        try:
            yield
        finally:
            self._spawning_calls.discard(ended)
            ended.set_result(None)

    def _require_open(self) -> None:
        if not self._open:
            raise InvalidSagaOperation(
                "the orchestrator is not open: use `async with SagaOrchestrator(...)` or open()"
            )


def _check_same_saga(saga_id: str, name: str, existing: SagaState) -> None:
    """An idempotent start names the saga that holds the id; another name is a mistake."""
    if existing.saga_name != name:
        raise InvalidSagaOperation(
            f"saga id {saga_id!r} is already used by a {existing.saga_name!r} saga"
        )
