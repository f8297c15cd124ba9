"""The demo scenario: run the orders, SIGKILL the orchestrator mid-run, recover.

1. Set up the four services' databases (tables, stock) in the demo directory, or
   in the run's PostgreSQL schemas (``--postgres``).
2. Start an orchestrator process (``seamwork.demo.worker``) on every order.
3. Once ``kill_at`` of the orders are finished, kill it with SIGKILL: no cleanup,
   leases held, steps cut off between their effect and their checkpoint. The kill
   lands on a saga in flight: the process is frozen (SIGSTOP) and killed only if the
   saga store shows one running or compensating; otherwise it runs on a moment and
   is looked at again (one saga at a time, it reports a finish just before it stores
   the next start, so a kill sent on that report hit nothing).
4. Start a new orchestrator process. It resumes the sagas left in flight and
   starts the orders the first one never reached. Recovery time is measured from
   the moment the new process is spawned.
5. Read back every saga and its timeline for the summary and the invariant checks.

The parent never drives a saga itself: it only spawns, kills and reads.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, Self

from seamwork.demo.saga import SAGAS_DB, make_orders, saga_store, services_at, stock_locations
from seamwork.demo.servers import NatsRun, PgRun
from seamwork.demo.services import INITIAL_STOCK, Order
from seamwork.saga import SagaState, SagaStatus, SagaStore, StepEvent

_DEMO_FILES = (
    "sagas.db",
    "inventory.db",
    "payment.db",
    "shipping.db",
    "notification.db",
)
PHASE_TIMEOUT = 300.0
LOOK_AGAIN = 0.002
"""How long a frozen orchestrator with no saga in flight runs before the next look."""


class DemoError(Exception):
    """The scenario itself could not run (not an invariant violation)."""


class Reporter(Protocol):
    """What the scenario tells whoever shows it."""

    def phase(self, text: str) -> None: ...

    def finished(self, count: int) -> None: ...

    def alert(self, saga_id: str, reason: str | None) -> None: ...


@dataclass(frozen=True, slots=True)
class DemoConfig:
    """Args of a demo run.

    Args:
        directory: where the databases and logs go (kept after the run).
        orders: how many orders.
        concurrency: sagas in flight at once per orchestrator process.
        kill_at: fraction of orders finished when the orchestrator is killed.
        postgres: a PostgreSQL DSN: the saga store and every service on a schema of
            its own there (``servers.PgRun``), instead of SQLite files in
            ``directory`` (which then holds only the logs).
        nats: a NATS JetStream URL for act two, instead of an embedded nats-server.
        run_id: names the run's schemas, subjects, streams and groups.
        keep: leave the run's schemas and streams on the servers to inspect.
    """

    directory: Path
    orders: int = 300
    concurrency: int = 32
    kill_at: float = 0.4
    postgres: str | None = None
    nats: str | None = None
    run_id: str = ""
    keep: bool = False

    @property
    def sagas_db(self) -> Path:
        return self.directory / SAGAS_DB

    @property
    def pg(self) -> PgRun | None:
        return None if self.postgres is None else PgRun(self.postgres, self.run_id)

    @property
    def nats_run(self) -> NatsRun | None:
        return None if self.nats is None else NatsRun(self.nats, self.run_id)


@dataclass(slots=True)
class Recovery:
    """What the kill left behind and how fast the new process dealt with it."""

    in_flight: list[str] = field(default_factory=list)
    compensating: int = 0
    restarted_at: float = 0.0
    resumed_at: float | None = None
    resumed: int = 0
    recovered_at: float | None = None

    @property
    def resume_seconds(self) -> float | None:
        return None if self.resumed_at is None else self.resumed_at - self.restarted_at

    @property
    def finish_seconds(self) -> float | None:
        return None if self.recovered_at is None else self.recovered_at - self.restarted_at


@dataclass(slots=True)
class DemoRun:
    """Everything the summary and the invariant checks need."""

    config: DemoConfig
    orders: list[Order]
    states: dict[str, SagaState] = field(default_factory=dict)
    timelines: dict[str, list[StepEvent]] = field(default_factory=dict)
    recovery: Recovery = field(default_factory=Recovery)
    alerts: dict[str, str | None] = field(default_factory=dict)
    started_at: float = 0.0
    finished_at: float = 0.0
    killed_after: int = 0

    @property
    def seconds(self) -> float:
        return self.finished_at - self.started_at


async def run_scenario(config: DemoConfig, reporter: Reporter) -> DemoRun:
    """Run the scenario; raises ``DemoError`` if a process misbehaves."""
    demo = DemoRun(config, make_orders(config.orders))
    reporter.phase("setting up the services' databases")
    await prepare(config.directory, config.pg)
    store = saga_store(config.directory, config.pg, pool_size=2)
    await store.open()
    try:
        finished: set[str] = set()
        demo.started_at = time.time()
        await _first_orchestrator(demo, store, finished, reporter)
        active = await _active(store, config.orders)
        demo.recovery.in_flight = [s.saga_id for s in active]
        demo.recovery.compensating = sum(s.status is SagaStatus.COMPENSATING for s in active)
        await _second_orchestrator(demo, finished, reporter)
        demo.finished_at = time.time()
        await _read_back(demo, store)
    finally:
        await store.aclose()
    return demo


async def prepare(directory: Path, pg: PgRun | None = None) -> None:
    """Fresh databases for the services, stocked; earlier demo files are replaced.
    With ``pg`` the services' tables go to the run's schemas (made by ``PgRun.create``)
    and ``directory`` keeps only the logs.

    Raises:
        DemoError: ``directory`` cannot hold the demo's files (it is a file, lies
            beneath one, or a demo file's name is taken by a directory).
    """
    try:
        await asyncio.to_thread(_clear, directory)
    except OSError as exc:
        raise DemoError(f"cannot use {directory} for the demo's files: {exc}") from exc
    services = services_at(directory, pg)
    try:
        await services.setup()
        await services.inventory.stock_up(stock_locations(), INITIAL_STOCK)
    finally:
        await services.aclose()


def _clear(directory: Path) -> None:
    """Remove the files an earlier demo left; nothing else in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    for name in _DEMO_FILES:
        for suffix in ("", "-wal", "-shm", ".lock"):
            (directory / f"{name}{suffix}").unlink(missing_ok=True)
    for log in directory.glob("orchestrator-*.log"):
        log.unlink()


async def _first_orchestrator(
    demo: DemoRun, store: SagaStore, finished: set[str], reporter: Reporter
) -> None:
    config = demo.config
    kill_after = max(1, int(config.orders * config.kill_at))
    reporter.phase(f"orchestrator 1 running; SIGKILL after {kill_after} finished orders")
    async with await _Worker.spawn(config, 1) as worker:
        handle = _handler(demo, finished, reporter)
        reached = await worker.follow(handle, lambda: len(finished) >= kill_after)
        if not reached:
            failure = await worker.failure()
            raise DemoError(f"orchestrator 1 ended before it could be killed: {failure}")
        killed = await _kill_mid_saga(worker, store, config.orders)
        await worker.follow(handle, None)  # what it reported before the kill
        await worker.wait()
    if not killed:
        raise DemoError(
            f"orchestrator 1 finished its last saga before the SIGKILL could hit one in "
            f"flight (--kill-at {config.kill_at:g} of {config.orders} orders); use a lower "
            "--kill-at"
        )
    demo.killed_after = len(finished)


async def _kill_mid_saga(worker: _Worker, store: SagaStore, limit: int) -> bool:
    """SIGKILL the orchestrator while the store shows a saga in flight; False if it
    ended first."""
    async with asyncio.timeout(PHASE_TIMEOUT):
        while worker.process.returncode is None:
            worker.freeze()
            if await _active(store, limit):
                worker.kill()
                return True
            worker.thaw()
            await asyncio.sleep(LOOK_AGAIN)
    return False


async def _second_orchestrator(demo: DemoRun, finished: set[str], reporter: Reporter) -> None:
    recovery = demo.recovery
    reporter.phase(
        f"killed with SIGKILL, {len(recovery.in_flight)} sagas in flight; orchestrator 2 recovering"
    )
    recovery.restarted_at = time.time()
    async with await _Worker.spawn(demo.config, 2) as worker:
        await worker.follow(_handler(demo, finished, reporter), None)
        if await worker.wait() != 0:
            raise DemoError(f"orchestrator 2 failed: {await worker.failure()}")
    if len(finished) != len(demo.orders):
        raise DemoError(f"orchestrator 2 finished {len(finished)} of {len(demo.orders)} orders")


def _handler(
    demo: DemoRun, finished: set[str], reporter: Reporter
) -> Callable[[dict[str, Any]], None]:
    recovery = demo.recovery

    def handle(event: dict[str, Any]) -> None:
        kind = event["event"]
        if kind == "finished":
            finished.add(event["saga_id"])
            reporter.finished(len(finished))
        elif kind == "stuck":
            if event["saga_id"] not in demo.alerts:
                reporter.alert(event["saga_id"], event.get("reason"))
            demo.alerts[event["saga_id"]] = event.get("reason")
        elif kind == "resumed" and recovery.restarted_at:
            recovery.resumed_at, recovery.resumed = event["at"], event["count"]
        elif kind == "recovered" and recovery.restarted_at:
            recovery.recovered_at = event["at"]

    return handle


async def _active(store: SagaStore, limit: int) -> list[SagaState]:
    running = await store.list(status=SagaStatus.RUNNING, limit=limit)
    compensating = await store.list(status=SagaStatus.COMPENSATING, limit=limit)
    return running + compensating


async def _read_back(demo: DemoRun, store: SagaStore) -> None:
    states = await store.list(limit=len(demo.orders) + 1000)
    demo.states = {s.saga_id: s for s in states}
    for saga_id in demo.states:
        demo.timelines[saga_id] = await store.timeline(saga_id)


class _Worker:
    """One orchestrator child process and its JSON-lines report."""

    def __init__(self, process: asyncio.subprocess.Process, stderr: Path) -> None:
        self.process = process
        self.stderr = stderr

    @classmethod
    async def spawn(cls, config: DemoConfig, index: int) -> _Worker:
        directory = config.directory
        stderr = directory / f"orchestrator-{index}.err.log"
        env = None
        if config.postgres is not None:  # not on the command line: ps would show a password
            env = {**os.environ, "SEAMWORK_PG_DSN": config.postgres}
        with stderr.open("wb") as err:
            process = await asyncio.create_subprocess_exec(
                *_worker_command(config, index),
                env=env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=err,
            )
        return cls(process, stderr)

    async def follow(
        self, handle: Callable[[dict[str, Any]], None], stop: Callable[[], bool] | None
    ) -> bool:
        """Feed events to ``handle`` until the process closes stdout (False) or
        ``stop()`` turns true (True)."""
        stdout = self.process.stdout
        assert stdout is not None
        try:
            async with asyncio.timeout(PHASE_TIMEOUT):
                return await self._read(stdout, handle, stop)
        except TimeoutError:
            raise DemoError(f"an orchestrator made no end within {PHASE_TIMEOUT:g}s") from None

    async def _read(
        self,
        stdout: asyncio.StreamReader,
        handle: Callable[[dict[str, Any]], None],
        stop: Callable[[], bool] | None,
    ) -> bool:
        while line := await stdout.readline():
            try:
                handle(json.loads(line))
            except (ValueError, KeyError):
                continue
            if stop is not None and stop():
                return True
        return False

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        """Never leave an orchestrator behind, whatever went wrong here."""
        if self.process.returncode is None:
            self.kill()
            await self.process.wait()

    def kill(self) -> None:
        self.process.kill()  # SIGKILL on POSIX: no cleanup, no lease release

    def freeze(self) -> None:
        self.process.send_signal(signal.SIGSTOP)  # its store writes stand still

    def thaw(self) -> None:
        self.process.send_signal(signal.SIGCONT)

    async def wait(self) -> int:
        return await self.process.wait()

    async def failure(self) -> str:
        code = await self.process.wait()
        tail = _tail(self.stderr)
        return f"exit code {code}" + (f"; stderr:\n{tail}" if tail else "")


def _worker_command(config: DemoConfig, index: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "seamwork.demo.worker",
        "--dir",
        str(config.directory),
        "--orders",
        str(config.orders),
        "--concurrency",
        str(config.concurrency),
        "--log",
        str(config.directory / f"orchestrator-{index}.log"),
        *(["--postgres-run", config.run_id] if config.postgres is not None else []),
    ]


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""
