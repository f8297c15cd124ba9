"""Saga throughput: seamwork vs DBOS vs the SQLite storage floor, in one table.

The seed's 4-step order saga (reserve_inventory, charge_payment, ship_order,
send_confirmation, each with its compensation) with trivial async steps, durable on
SQLite in WAL mode with ``synchronous=FULL``:

* seamwork: ``SagaOrchestrator`` on ``SQLiteStore`` (its defaults);
* DBOS (PyPI ``dbos``): the same four steps as ``@DBOS.step``, a ``@DBOS.workflow``
  calling them, compensation in an ``except`` block, on a SQLite system database
  switched to WAL + FULL;
* the storage floor: a plain synchronous ``sqlite3`` loop doing the same durable
  writes as seamwork's schema (INSERT at start, UPDATE + timeline INSERT + COMMIT
  per transition), and for 32 sagas in flight a plain group-commit loop (one
  thread, one transaction per round holding every pending transition).

Plus recovery: 100 sagas parked mid-step in a process that is then SIGKILLed, and
the time a fresh orchestrator takes from ``open()`` until all 100 are completed.

seamwork and the floor run in one subprocess with their chunks interleaved (who
goes first alternates), so both meet the same disk and CPU weather and the ratios
are fair; DBOS runs in a subprocess of its own (a process-wide singleton with
background threads, kept out of the others' CPU accounting); recovery uses two more.

Targets (DESIGN.md §9, issue 2): sequential p50 <= 1.5x the floor, CPU <= 1.5 ms
per saga, >= 600 sagas/s with p99 <= 100 ms at 32 in flight (and >= 2/3 of the
group-commit floor), one commit per transition, recovery of 100 parked sagas <= 0.5 s.

Usage::

    python benchmarks/saga_throughput.py [--quick] [--repeat 3] [--sequential N] ...
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import math
import os
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from seamwork._core import runtime

IN_FLIGHT_DEFAULT = 32
STEPS = ("reserve_inventory", "charge_payment", "ship_order", "send_confirmation")
HAPPY_TRANSITIONS = 1 + len(STEPS)  # start + one per step (the last also completes it)
FAIL_TRANSITIONS = 4  # start, reserve done, charge declined -> compensating, released -> failed
DBOS_MISSING = "not installed (pip install 'seamwork[bench]')"


# --- measurement helpers ------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of ``values``."""
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def summarize(latencies: Sequence[float]) -> dict[str, float]:
    return {
        "p50_ms": percentile(latencies, 50) * 1e3,
        "p99_ms": percentile(latencies, 99) * 1e3,
    }


class Phase:
    """Wall and CPU time of one measured phase."""

    def __enter__(self) -> Phase:
        self.wall0, self.cpu0 = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self.wall0
        self.cpu = time.process_time() - self.cpu0


async def closed_loop(count: int, in_flight: int, one: Callable[[int], Any]) -> list[float]:
    """Run ``one(i)`` for i < count, ``in_flight`` at a time; returns each latency."""
    latencies: list[float] = []
    numbers = iter(range(count))

    async def worker() -> None:
        for i in numbers:
            t0 = time.perf_counter()
            await one(i)
            latencies.append(time.perf_counter() - t0)

    await asyncio.gather(*(worker() for _ in range(in_flight)))
    return latencies


# --- seamwork -----------------------------------------------------------------------


def order_saga(*, park: bool = False) -> Any:
    """The seed's order saga with trivial steps; ``park`` makes charge block forever."""
    from seamwork.saga import Retry, Saga, Step, StepFailed

    async def reserve(ctx: Any) -> dict[str, Any]:
        return {"reservation_id": f"r-{ctx.data['order_id']}"}

    async def release(ctx: Any) -> None:
        return None

    async def charge(ctx: Any) -> dict[str, Any]:
        if ctx.data.get("decline"):
            raise StepFailed("card declined")
        return {"payment_id": f"p-{ctx.data['order_id']}"}

    async def charge_parked(ctx: Any) -> dict[str, Any]:
        PARKED.append(ctx.saga_id)
        await asyncio.Event().wait()  # never fires: the process is killed here
        raise AssertionError("unreachable")

    async def refund(ctx: Any) -> None:
        return None

    async def ship(ctx: Any) -> dict[str, Any]:
        return {"tracking": f"t-{ctx.data['order_id']}"}

    async def cancel_shipment(ctx: Any) -> None:
        return None

    async def confirm(ctx: Any) -> None:
        return None

    async def send_cancellation(ctx: Any) -> None:
        return None

    return Saga(
        "order",
        version=1,
        steps=[
            Step("reserve_inventory", reserve, compensate=release, timeout=5),
            Step(
                "charge_payment",
                charge_parked if park else charge,
                compensate=refund,
                timeout=30,
                retry=Retry(3),
            ),
            Step("ship_order", ship, compensate=cancel_shipment, timeout=10),
            Step("send_confirmation", confirm, compensate=send_cancellation, timeout=5),
        ],
    )


PARKED: list[str] = []


class Tally:
    """Latencies, CPU, wall time and commits accumulated over the chunks of a phase."""

    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.cpu = self.wall = 0.0
        self.commits = self.count = 0

    def add(self, latencies: list[float], phase: Phase, commits: int) -> None:
        self.latencies += latencies
        self.cpu += phase.cpu
        self.wall += phase.wall
        self.commits += commits
        self.count += len(latencies)


class SeamworkRunner:
    """Chunks of the seamwork phases on one open orchestrator."""

    def __init__(self, orch: Any, store: Any) -> None:
        self.orch, self.store = orch, store
        self.serial = iter(range(10**9))

    async def one(self, decline: bool = False) -> None:
        run = await self.orch.start("order", {"order_id": next(self.serial), "decline": decline})
        state = await run.wait()
        expected = "failed" if decline else "completed"
        if state.status.value != expected:
            raise RuntimeError(f"saga {run.saga_id} ended {state.status.value}")

    async def sequential(self, tally: Tally, count: int, decline: bool = False) -> None:
        latencies = []
        commits0 = self.store.commits
        with Phase() as phase:
            for _ in range(count):
                t0 = time.perf_counter()
                await self.one(decline)
                latencies.append(time.perf_counter() - t0)
        tally.add(latencies, phase, self.store.commits - commits0)

    async def load(self, tally: Tally, count: int, in_flight: int) -> None:
        commits0 = self.store.commits
        with Phase() as phase:
            latencies = await closed_loop(count, in_flight, lambda _: self.one())
        tally.add(latencies, phase, self.store.commits - commits0)


async def _seamwork_pragmas(store: Any) -> str:
    """journal_mode and synchronous of the store's own writer connection."""
    writer = getattr(store, "_writer", None)
    if writer is None or not hasattr(writer, "read"):
        return "wal / full (configured)"
    modes = await writer.read(
        lambda conn: (
            conn.execute("PRAGMA journal_mode").fetchone()[0],
            conn.execute("PRAGMA synchronous").fetchone()[0],
        )
    )
    return _pragma_text(*modes)


def _pragma_text(journal: str, synchronous: int) -> str:
    names = {0: "OFF", 1: "NORMAL", 2: "FULL", 3: "EXTRA"}
    return f"{journal} / {names.get(int(synchronous), synchronous)}"


# --- recovery: park 100 sagas mid-step, SIGKILL, time a fresh orchestrator ----------


async def run_park(cfg: dict[str, Any]) -> None:
    """Start ``parked`` sagas whose charge step never returns, say so, wait to die."""
    from seamwork.saga import SagaOrchestrator
    from seamwork.storage import SQLiteStore

    store = SQLiteStore(cfg["db"])
    async with SagaOrchestrator(store, [order_saga(park=True)]) as orch:
        for i in range(cfg["parked"]):
            await orch.start("order", {"order_id": i}, saga_id=f"parked-{i:04d}")
        while len(PARKED) < cfg["parked"]:
            await asyncio.sleep(0.005)
        print("parked", flush=True)
        await asyncio.Event().wait()


async def run_recover(cfg: dict[str, Any]) -> dict[str, Any]:
    from seamwork.saga import SagaOrchestrator, SagaRun
    from seamwork.storage import SQLiteStore

    ids = [f"parked-{i:04d}" for i in range(cfg["parked"])]
    orch = SagaOrchestrator(SQLiteStore(cfg["db"]), [order_saga()])
    t0 = time.perf_counter()
    await orch.open()
    opened = time.perf_counter() - t0
    try:
        states = await asyncio.gather(*(SagaRun(orch, saga_id).wait(poll=0.001) for saga_id in ids))
        elapsed = time.perf_counter() - t0
    finally:
        await orch.aclose()
    done = sum(1 for s in states if s.status.value == "completed")
    return {"recovery_s": elapsed, "open_s": opened, "recovered": done, "parked": len(ids)}


def measure_recovery(cfg: dict[str, Any]) -> dict[str, Any]:
    db = str(Path(cfg["dir"]) / "recovery.db")
    sub = {"parked": cfg["parked"], "db": db}
    cmd = [sys.executable, __file__, "--worker", "park", "--config", json.dumps(sub)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        if line != "parked":
            raise RuntimeError(f"parking process said {line!r}")
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    with sqlite3.connect(db) as conn:
        rows = conn.execute(
            "SELECT count(*) FROM seamwork_sagas "
            "WHERE status = 'running' AND current_step_index = 1"
        ).fetchone()[0]
    if rows != cfg["parked"]:
        raise RuntimeError(f"expected {cfg['parked']} sagas parked at charge_payment, found {rows}")
    result = run_worker("recover", sub)
    if result["recovered"] != cfg["parked"]:
        raise RuntimeError(f"only {result['recovered']} of {cfg['parked']} sagas completed")
    return result


# --- DBOS -----------------------------------------------------------------------------


class Declined(Exception):
    """The DBOS side's definite failure (module level: DBOS pickles step errors)."""


async def run_dbos(cfg: dict[str, Any]) -> dict[str, Any]:
    import logging

    import sqlalchemy as sa
    from dbos import DBOS

    seen: dict[str, Any] = {}
    counting = {"on": False, "commits": 0}

    def count_commits(sql: str) -> None:
        if counting["on"] and sql.lstrip()[:6].upper() in ("COMMIT", "END"):
            counting["commits"] += 1

    @sa.event.listens_for(sa.engine.Engine, "connect")
    def wal_full(dbapi_conn: Any, record: Any) -> None:
        # Durability on par with the others: WAL + synchronous=FULL on every connection.
        cursor = dbapi_conn.cursor()
        journal = cursor.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        cursor.execute("PRAGMA synchronous=FULL")
        seen["pragmas"] = _pragma_text(journal, cursor.execute("PRAGMA synchronous").fetchone()[0])
        cursor.close()
        dbapi_conn.set_trace_callback(count_commits)

    path = Path(cfg["dir"]) / "dbos.sqlite"
    DBOS(
        config={
            "name": "saga-bench",
            "system_database_url": f"sqlite:///{path}",
            "run_admin_server": False,
            "log_level": "WARNING",
        }
    )
    logging.getLogger("dbos").setLevel(logging.WARNING)

    @DBOS.step()
    async def reserve_inventory(order_id: int) -> dict[str, Any]:
        return {"reservation_id": f"r-{order_id}"}

    @DBOS.step()
    async def release_inventory(order_id: int) -> None:
        return None

    @DBOS.step()
    async def charge_payment(order_id: int, decline: bool) -> dict[str, Any]:
        if decline:
            raise Declined("card declined")
        return {"payment_id": f"p-{order_id}"}

    @DBOS.step()
    async def refund_payment(order_id: int) -> None:
        return None

    @DBOS.step()
    async def ship_order(order_id: int) -> dict[str, Any]:
        return {"tracking": f"t-{order_id}"}

    @DBOS.step()
    async def cancel_shipment(order_id: int) -> None:
        return None

    @DBOS.step()
    async def send_confirmation(order_id: int) -> None:
        return None

    @DBOS.step()
    async def send_cancellation_email(order_id: int) -> None:
        return None

    @DBOS.workflow()
    async def order(order_id: int, decline: bool) -> str:
        done: list[Callable[[int], Any]] = []
        try:
            await reserve_inventory(order_id)
            done.append(release_inventory)
            await charge_payment(order_id, decline)
            done.append(refund_payment)
            await ship_order(order_id)
            done.append(cancel_shipment)
            await send_confirmation(order_id)
        except Declined:
            for compensate in reversed(done):
                await compensate(order_id)
            return "failed"
        return "completed"

    async def one(i: int, decline: bool = False) -> None:
        status = await order(i, decline)
        if status != ("failed" if decline else "completed"):
            raise RuntimeError(f"DBOS workflow for order {i} ended {status}")

    DBOS.launch()
    result: dict[str, Any] = {}
    try:
        n = cfg["dbos_sagas"]
        for i in range(min(cfg["warmup"], n)):
            await one(i)
            await one(i, decline=True)

        latencies = []
        with Phase() as seq:
            for i in range(n):
                t0 = time.perf_counter()
                await one(i)
                latencies.append(time.perf_counter() - t0)
        result["seq"] = summarize(latencies)
        result["cpu_ms"] = seq.cpu / n * 1e3

        failures = min(cfg["failures"], n)
        latencies = []
        for i in range(failures):
            t0 = time.perf_counter()
            await one(i, decline=True)
            latencies.append(time.perf_counter() - t0)
        result["fail"] = summarize(latencies)

        await closed_loop(cfg["in_flight"], cfg["in_flight"], one)  # warm-up
        with Phase() as load:
            latencies = await closed_loop(n, cfg["in_flight"], one)
        result["load"] = summarize(latencies)
        result["load_rate"] = n / load.wall
        result["load_cpu_ms"] = load.cpu / n * 1e3

        # Commits counted in separate passes (SQLite's own COMMIT statements, via the
        # trace hook), so the counting never weighs on the timed passes above.
        counted = max(20, min(100, n // 4))
        result["commits_seq"] = await _count(counting, counted, lambda: _seq(one, counted))
        result["commits_fail"] = await _count(
            counting, counted, lambda: _seq(lambda i: one(i, decline=True), counted)
        )
        per_saga = await _count(
            counting, counted, lambda: closed_loop(counted, cfg["in_flight"], one)
        )
        result["tx_per_commit"] = HAPPY_TRANSITIONS / per_saga
        result["pragmas"] = seen.get("pragmas", "?")
    finally:
        DBOS.destroy()
    return result


async def _seq(one: Callable[[int], Any], count: int) -> None:
    for i in range(count):
        await one(i)


async def _count(counting: dict[str, Any], sagas: int, work: Callable[[], Any]) -> float:
    counting["commits"], counting["on"] = 0, True
    try:
        await work()
    finally:
        counting["on"] = False
    return float(counting["commits"]) / sagas


# --- the storage floor ----------------------------------------------------------------


_FLOOR_INSERT = (
    "INSERT INTO seamwork_sagas (saga_id, saga_name, saga_version, status, current_step_index, "
    "completed_steps, compensated_steps, uncertain_steps, skipped_steps, context, started_at, "
    "updated_at, deadline_at, failure_reason, step_attempts, compensation_attempts, "
    "lease_owner, lease_expires_at) VALUES (?, 'order', 1, 'running', 0, '[]', '[]', '[]', "
    "'[]', ?, ?, ?, NULL, NULL, '{}', '{}', 'floor', ?)"
)
_FLOOR_UPDATE = (  # the same 11 columns seamwork's store rewrites per transition
    "UPDATE seamwork_sagas SET status = ?, current_step_index = ?, completed_steps = ?, "
    "compensated_steps = ?, uncertain_steps = '[]', skipped_steps = '[]', context = ?, "
    "updated_at = ?, failure_reason = ?, step_attempts = ?, compensation_attempts = ? "
    "WHERE saga_id = ? AND lease_owner = 'floor'"
)
_FLOOR_EVENT = (
    "INSERT INTO seamwork_saga_events (saga_id, at, event, step, attempt, detail) "
    "VALUES (?, ?, ?, ?, 1, NULL)"
)
_RESULTS = ({"reservation_id": "r"}, {"payment_id": "p"}, {"tracking": "t"}, None)


def _floor_connect(path: Path) -> tuple[sqlite3.Connection, str]:
    from seamwork.storage.sqlite import SAGA_MIGRATIONS

    conn = sqlite3.connect(path, isolation_level=None)
    journal = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
    conn.execute("PRAGMA synchronous=FULL")
    pragmas = _pragma_text(journal, conn.execute("PRAGMA synchronous").fetchone()[0])
    conn.execute("BEGIN IMMEDIATE")
    for migration in SAGA_MIGRATIONS:
        for statement in migration.statements:
            conn.execute(statement)
    conn.execute("COMMIT")
    return conn, pragmas


class FloorSaga:
    """One simulated saga: the same rows and statements as seamwork's store, no engine
    (per transition the saga row and the two timeline rows the engine records: the
    step's outcome and what comes next)."""

    __slots__ = ("completed", "context", "index", "saga_id", "started")

    def __init__(self, saga_id: str, order_id: int) -> None:
        self.saga_id = saga_id
        self.context: dict[str, Any] = {"order_id": order_id, "decline": False}
        self.completed: list[str] = []
        self.index = -1  # next transition: -1 = start, then one per step
        self.started = time.perf_counter()

    def transition(self, conn: sqlite3.Connection) -> bool:
        """Execute this saga's next transition (no commit); True when it is done."""
        now = time.time()
        if self.index < 0:
            conn.execute(_FLOOR_INSERT, (self.saga_id, json.dumps(self.context), now, now, now))
            conn.executemany(
                _FLOOR_EVENT,
                [
                    (self.saga_id, now, "saga_started", None),
                    (self.saga_id, now, "started", STEPS[0]),
                ],
            )
        else:
            step = STEPS[self.index]
            result = _RESULTS[self.index]
            if result:
                self.context.update(result)
            self.completed.append(step)
            last = self.index == len(STEPS) - 1
            status = "completed" if last else "running"
            conn.execute(
                _FLOOR_UPDATE,
                (
                    status,
                    self.index + 1,
                    json.dumps(self.completed),
                    "[]",
                    json.dumps(self.context),
                    now,
                    None,
                    json.dumps(dict.fromkeys(self.completed, 1)),
                    "{}",
                    self.saga_id,
                ),
            )
            following = (
                (self.saga_id, now, "saga_completed", None)
                if last
                else (self.saga_id, now, "started", STEPS[self.index + 1])
            )
            conn.executemany(_FLOOR_EVENT, [(self.saga_id, now, "completed", step), following])
        self.index += 1
        return self.index == len(STEPS)


def _floor_failure(conn: sqlite3.Connection, saga_id: str) -> int:
    """start, reserve done, charge declined -> compensating, released -> failed."""
    commits = 0
    saga = FloorSaga(saga_id, 0)
    for _ in range(2):
        conn.execute("BEGIN IMMEDIATE")
        saga.transition(conn)
        conn.execute("COMMIT")
        commits += 1
    for status, event, step, then in (
        ("compensating", "failed", "charge_payment", "compensating"),
        ("failed", "compensated", "reserve_inventory", "saga_failed"),
    ):
        now = time.time()
        conn.execute("BEGIN IMMEDIATE")
        conn.execute(
            _FLOOR_UPDATE,
            (
                status,
                1,
                json.dumps(saga.completed),
                json.dumps(["reserve_inventory"] if status == "failed" else []),
                json.dumps(saga.context),
                now,
                "card declined",
                json.dumps({"reserve_inventory": 1, "charge_payment": 1}),
                json.dumps({"reserve_inventory": 1} if status == "failed" else {}),
                saga_id,
            ),
        )
        conn.executemany(_FLOOR_EVENT, [(saga_id, now, event, step), (saga_id, now, then, None)])
        conn.execute("COMMIT")
        commits += 1
    return commits


class FloorRunner:
    """Chunks of the floor's phases: plain blocking sqlite3, no asyncio, no engine."""

    def __init__(self, path: Path) -> None:
        self.conn, self.pragmas = _floor_connect(path)
        self.serial = iter(range(10**9))

    def one(self) -> int:
        commits = 0
        saga = FloorSaga(f"floor-{next(self.serial)}", 0)
        done = False
        while not done:
            self.conn.execute("BEGIN IMMEDIATE")
            done = saga.transition(self.conn)
            self.conn.execute("COMMIT")
            commits += 1
        return commits

    def sequential(self, tally: Tally, count: int, decline: bool = False) -> None:
        latencies, commits = [], 0
        with Phase() as phase:
            for _ in range(count):
                t0 = time.perf_counter()
                if decline:
                    commits += _floor_failure(self.conn, f"floor-{next(self.serial)}")
                else:
                    commits += self.one()
                latencies.append(time.perf_counter() - t0)
        tally.add(latencies, phase, commits)

    def load(self, tally: Tally, count: int, in_flight: int) -> None:
        """Group commit: each round is one transaction holding the next transition of
        every in-flight saga; a finished saga is replaced by a new one."""
        latencies: list[float] = []
        commits = started = 0
        active: list[FloorSaga] = []
        with Phase() as phase:
            while started < count or active:
                while len(active) < in_flight and started < count:
                    active.append(FloorSaga(f"floor-{next(self.serial)}", started))
                    started += 1
                self.conn.execute("BEGIN IMMEDIATE")
                finished = [saga for saga in active if saga.transition(self.conn)]
                self.conn.execute("COMMIT")
                commits += 1
                end = time.perf_counter()
                for saga in finished:
                    latencies.append(end - saga.started)
                    active.remove(saga)
        tally.add(latencies, phase, commits)


def _result(seq: Tally, fail: Tally, load: Tally) -> dict[str, Any]:
    return {
        "seq": summarize(seq.latencies),
        "cpu_ms": seq.cpu / seq.count * 1e3,
        "commits_seq": seq.commits / seq.count,
        "fail": summarize(fail.latencies),
        "commits_fail": fail.commits / fail.count,
        "load": summarize(load.latencies),
        "load_rate": load.count / load.wall,
        "load_cpu_ms": load.cpu / load.count * 1e3,
        "tx_per_commit": load.count * HAPPY_TRANSITIONS / load.commits,
    }


def _chunks(total: int, rounds: int) -> list[int]:
    return [total // rounds + (1 if i < total % rounds else 0) for i in range(rounds)]


async def run_pair(cfg: dict[str, Any]) -> dict[str, Any]:
    """seamwork and the floor in one process, their chunks interleaved (who goes first
    alternates), so both see the same disk and CPU weather and the ratios are fair."""
    from seamwork.saga import SagaOrchestrator
    from seamwork.storage import SQLiteStore

    floor = FloorRunner(Path(cfg["dir"]) / "floor.db")
    store = SQLiteStore(Path(cfg["dir"]) / "seamwork.db")
    rounds, in_flight = cfg["rounds"], cfg["in_flight"]
    tallies = {name: {phase: Tally() for phase in ("seq", "fail", "load")} for name in "sf"}
    async with SagaOrchestrator(store, [order_saga()]) as orch:
        ours = SeamworkRunner(orch, store)
        for decline in (False, True):  # warm-up, not counted
            await ours.sequential(Tally(), cfg["warmup"], decline)
            floor.sequential(Tally(), cfg["warmup"], decline)
        await ours.load(Tally(), in_flight * 4, in_flight)
        floor.load(Tally(), in_flight * 4, in_flight)

        async def both(first_ours: bool, phase: str, count: int) -> None:
            async def run_ours() -> None:
                if phase == "load":
                    await ours.load(tallies["s"][phase], count, in_flight)
                else:
                    await ours.sequential(tallies["s"][phase], count, phase == "fail")

            def run_floor() -> None:
                if phase == "load":
                    floor.load(tallies["f"][phase], count, in_flight)
                else:
                    floor.sequential(tallies["f"][phase], count, phase == "fail")

            if first_ours:
                await run_ours()
                run_floor()
            else:
                run_floor()
                await run_ours()

        for phase, total in (
            ("seq", cfg["sequential"]),
            ("fail", cfg["failures"]),
            ("load", cfg["concurrent"]),
        ):
            for i, count in enumerate(_chunks(total, rounds)):
                await both(i % 2 == 0, phase, count)
        pragmas = await _seamwork_pragmas(store)
    floor.conn.close()
    return {
        "seamwork": {**_result(*tallies["s"].values()), "pragmas": pragmas},
        "floor": {**_result(*tallies["f"].values()), "pragmas": floor.pragmas},
    }


# --- orchestration of the run and the table ----------------------------------------------


def run_worker(name: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """Run one contender in a fresh interpreter; returns its JSON result."""
    with tempfile.TemporaryDirectory(prefix=f"saga-bench-{name}-") as tmp:
        out = Path(tmp) / "result.json"
        sub = {"dir": tmp, **cfg}
        cmd = [sys.executable, __file__, "--worker", name, "--config", json.dumps(sub)]
        cmd += ["--out", str(out)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"{name} worker failed:\n{proc.stdout}\n{proc.stderr}")
        result: dict[str, Any] = json.loads(out.read_text())
        return result


def worker_main(name: str, cfg: dict[str, Any], out: str | None) -> None:
    if name == "park":
        runtime.run(run_park(cfg))
        return
    runners: dict[str, Callable[[dict[str, Any]], Any]] = {  # seamwork on the loop its
        "pair": lambda c: runtime.run(run_pair(c)),  # own commands use (uvloop)
        "dbos": lambda c: asyncio.run(run_dbos(c)),
        "recover": lambda c: runtime.run(run_recover(c)),
    }
    result = runners[name](cfg)
    if out is not None:
        Path(out).write_text(json.dumps(result))


def _get(results: list[dict[str, Any]], *path: str) -> list[float]:
    values = []
    for result in results:
        value: Any = result
        for key in path:
            value = value[key]
        values.append(float(value))
    return values


def build_table(
    runs: dict[str, list[dict[str, Any]]],
    recovery: list[dict[str, Any]],
    in_flight: int,
    dbos_missing: str,
) -> tuple[list[str], list[list[str]]]:
    """Header and rows; a cell is the median over repeats, with (min-max) when > 1.

    Without DBOS its column says why in its first cell and is "-" below."""
    sw, db, fl = runs["seamwork"], runs.get("dbos", []), runs["floor"]

    def cell(results: list[dict[str, Any]], *path: str, fmt: str = "{:.2f}") -> str:
        if not results:
            return "-"
        values = _get(results, *path)
        text = fmt.format(statistics.median(values))
        if len(values) > 1:
            text += f" ({fmt.format(min(values))}-{fmt.format(max(values))})"
        return text

    def ratio(
        a: list[dict[str, Any]], b: list[dict[str, Any]], path: tuple[str, ...], fmt: str
    ) -> str:
        if not a or not b:
            return "-"
        values = [x / y for x, y in zip(_get(a, *path), _get(b, *path), strict=True)]
        text = fmt.format(statistics.median(values))
        if len(values) > 1:
            text += f" ({fmt.format(min(values))}-{fmt.format(max(values))})"
        return text

    def verdict(ok: bool) -> str:
        return "ok" if ok else "MISS"

    med = statistics.median
    pairs = zip(_get(sw, "seq", "p50_ms"), _get(fl, "seq", "p50_ms"), strict=True)
    seq_ratio = med(a / b for a, b in pairs)
    pairs = zip(_get(sw, "load_rate"), _get(fl, "load_rate"), strict=True)
    load_ratio = med(a / b for a, b in pairs)
    rec = [r["recovery_s"] for r in recovery]
    rec_cell = f"{med(rec):.3f}" + (f" ({min(rec):.3f}-{max(rec):.3f})" if len(rec) > 1 else "")
    open_s = [r["open_s"] for r in recovery]
    parked = recovery[0]["parked"] if recovery else 0
    n = str(in_flight)
    floor_name = "SQLite floor"

    header = ["metric", "seamwork", "DBOS", floor_name, "target", "seamwork vs target"]
    rows = [
        [
            "sequential p50 (ms/saga)",
            cell(sw, "seq", "p50_ms"),
            cell(db, "seq", "p50_ms"),
            cell(fl, "seq", "p50_ms"),
            "<= 1.5x floor",
            f"{verdict(seq_ratio <= 1.5)} ({seq_ratio:.2f}x)",
        ],
        [
            "sequential p99 (ms/saga)",
            cell(sw, "seq", "p99_ms"),
            cell(db, "seq", "p99_ms"),
            cell(fl, "seq", "p99_ms"),
            "",
            "",
        ],
        [
            "CPU per saga, sequential (ms)",
            cell(sw, "cpu_ms"),
            cell(db, "cpu_ms"),
            cell(fl, "cpu_ms"),
            "<= 1.5 ms",
            verdict(med(_get(sw, "cpu_ms")) <= 1.5),
        ],
        [
            "failure path p50 (declined -> release, ms)",
            cell(sw, "fail", "p50_ms"),
            cell(db, "fail", "p50_ms"),
            cell(fl, "fail", "p50_ms"),
            "",
            "",
        ],
        [
            f"{n} in flight: throughput (sagas/s)",
            cell(sw, "load_rate", fmt="{:.0f}"),
            cell(db, "load_rate", fmt="{:.0f}"),
            cell(fl, "load_rate", fmt="{:.0f}") + " (group commit)",
            ">= 600 and >= 2/3 floor",
            f"{verdict(med(_get(sw, 'load_rate')) >= 600 and load_ratio >= 2 / 3)}",
        ],
        [
            f"{n} in flight: p99 (ms/saga)",
            cell(sw, "load", "p99_ms"),
            cell(db, "load", "p99_ms"),
            cell(fl, "load", "p99_ms"),
            "<= 100 ms",
            verdict(med(_get(sw, "load", "p99_ms")) <= 100),
        ],
        [
            f"{n} in flight: CPU per saga (ms)",
            cell(sw, "load_cpu_ms"),
            cell(db, "load_cpu_ms"),
            cell(fl, "load_cpu_ms"),
            "",
            "",
        ],
        [
            "commits per saga, sequential (happy path)",
            cell(sw, "commits_seq"),
            cell(db, "commits_seq"),
            cell(fl, "commits_seq"),
            f"{HAPPY_TRANSITIONS} (1 per transition)",
            verdict(abs(med(_get(sw, "commits_seq")) - HAPPY_TRANSITIONS) < 0.05),
        ],
        [
            "commits per saga, failure path",
            cell(sw, "commits_fail"),
            cell(db, "commits_fail"),
            cell(fl, "commits_fail"),
            f"{FAIL_TRANSITIONS} (1 per transition)",
            verdict(abs(med(_get(sw, "commits_fail")) - FAIL_TRANSITIONS) < 0.05),
        ],
        [
            f"{n} in flight: transitions per commit",
            cell(sw, "tx_per_commit"),
            cell(db, "tx_per_commit"),
            cell(fl, "tx_per_commit"),
            "> 1 (group commit)",
            verdict(med(_get(sw, "tx_per_commit")) > 1),
        ],
        [
            f"recovery: {parked} parked sagas after kill -9 (s)",
            rec_cell + f" (open {med(open_s):.3f})",
            "-",
            "-",
            "<= 0.5 s",
            verdict(med(rec) <= 0.5),
        ],
        [
            "ratio: sequential p50 / floor p50",
            ratio(sw, fl, ("seq", "p50_ms"), "{:.2f}x"),
            ratio(db, fl, ("seq", "p50_ms"), "{:.2f}x"),
            "1.00x",
            "<= 1.5x",
            verdict(seq_ratio <= 1.5),
        ],
        [
            f"ratio: {n}-in-flight rate / group-commit floor",
            ratio(sw, fl, ("load_rate",), "{:.2f}"),
            ratio(db, fl, ("load_rate",), "{:.2f}"),
            "1.00",
            ">= 0.67",
            verdict(load_ratio >= 2 / 3),
        ],
        [
            "ratio: seamwork vs DBOS (seq p50 / rate)",
            (
                ratio(db, sw, ("seq", "p50_ms"), "{:.1f}x")
                + " / "
                + ratio(sw, db, ("load_rate",), "{:.1f}x")
            )
            if db
            else "-",
            "1.0x / 1.0x" if db else "-",
            "",
            "",
            "",
        ],
        [
            "journal mode / synchronous (as run)",
            sw[0]["pragmas"],
            db[0]["pragmas"] if db else "-",
            fl[0]["pragmas"],
            "wal / FULL",
            "",
        ],
    ]
    if not db:
        rows[0][2] = dbos_missing
    return header, rows


def print_table(title: str, header: list[str], rows: list[list[str]]) -> None:
    try:
        from rich import box
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # plain text
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        print(title)
        for row in [header, ["-" * w for w in widths], *rows]:
            print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))
        return
    from rich.markup import escape

    table = Table(title=escape(title), box=box.SIMPLE_HEAVY, show_lines=False)
    for i, name in enumerate(header):
        table.add_column(escape(name), justify="left" if i == 0 else "right", no_wrap=i == 0)
    for row in rows:
        table.add_row(*(escape(c) for c in row))
    Console(width=200).print(table)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small counts (a smoke run)")
    parser.add_argument("--sequential", type=int, help="sequential sagas (default 1000)")
    parser.add_argument("--failures", type=int, help="failure-path sagas (default 300)")
    parser.add_argument("--concurrent", type=int, help="sagas run with N in flight (5000)")
    parser.add_argument(
        "--in-flight", type=int, default=IN_FLIGHT_DEFAULT, help="sagas in flight (32)"
    )
    parser.add_argument("--dbos-sagas", type=int, help="sagas per DBOS phase (default 300)")
    parser.add_argument("--parked", type=int, default=100, help="sagas parked for recovery")
    parser.add_argument("--warmup", type=int, help="warm-up sagas per contender (default 50)")
    parser.add_argument("--repeat", type=int, default=1, help="runs; cells show median (range)")
    parser.add_argument(
        "--rounds", type=int, default=5, help="interleaved seamwork/floor chunks per phase"
    )
    parser.add_argument("--no-dbos", action="store_true", help="skip DBOS")
    parser.add_argument(
        "--postgres",
        metavar="DSN",
        help="also run the PostgreSQL section on this server (fresh databases, dropped after)",
    )
    parser.add_argument("--no-sqlite", action="store_true", help="skip the SQLite section")
    parser.add_argument(
        "--cpu",
        type=int,
        help="keep every process of the run on this CPU (a worker's deployment on a VM)",
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    defaults = (
        {"sequential": 200, "failures": 100, "concurrent": 1000, "dbos_sagas": 100, "warmup": 20}
        if args.quick
        else {
            "sequential": 1000,
            "failures": 300,
            "concurrent": 5000,
            "dbos_sagas": 300,
            "warmup": 50,
        }
    )
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def placement(args: argparse.Namespace) -> str:
    """Which loop seamwork ran on and where the processes ran, for the title."""
    where = "all CPUs" if args.cpu is None else f"pinned to CPU {args.cpu}"
    return f"seamwork on {runtime.loop_name()}, {where}"


def describe_source() -> str:
    """The seamwork revision measured (git short hash, '+dirty' if src/ has edits)."""
    root = Path(__file__).resolve().parent.parent
    try:
        rev = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--", "src"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "seamwork (no git)"
    return f"seamwork {rev}{'+dirty' if dirty else ''}"


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.cpu is not None:  # inherited by every subprocess of the run
        os.sched_setaffinity(0, {args.cpu})
    if args.worker:
        worker_main(args.worker, json.loads(args.config), args.out)
        return 0
    cfg = {
        "sequential": args.sequential,
        "failures": args.failures,
        "concurrent": args.concurrent,
        "in_flight": args.in_flight,
        "dbos_sagas": args.dbos_sagas,
        "warmup": args.warmup,
        "rounds": args.rounds,
    }
    load_before = os.getloadavg()[0]
    have_dbos = not args.no_dbos and importlib.util.find_spec("dbos") is not None
    if not args.no_sqlite:
        sqlite_section(args, cfg, have_dbos, load_before)
    if args.postgres:
        postgres_section(args, cfg, have_dbos)
    return 0


def postgres_section(args: argparse.Namespace, cfg: dict[str, Any], have_dbos: bool) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import saga_pg

    load_before = os.getloadavg()[0]
    runs = []
    for round_no in range(1, args.repeat + 1):
        print(f"[{round_no}/{args.repeat}] postgres ...", file=sys.stderr, flush=True)
        runs.append(saga_pg.measure(args.postgres, {**cfg, "parked": args.parked}, have_dbos))
    header, rows = saga_pg.table(runs)
    title = (
        f"Saga throughput on PostgreSQL - {describe_source()}, 4-step order saga, "
        f"{os.cpu_count()} CPUs (load avg {load_before:.2f} at start); seamwork/floor: "
        f"{args.sequential} sequential, {args.concurrent} at {args.in_flight} in flight; "
        f"DBOS: {args.dbos_sagas} per phase"
        + (f"; best (worst) of {args.repeat} runs" if args.repeat > 1 else "")
    )
    print_table(title, header, rows)


def sqlite_section(
    args: argparse.Namespace, cfg: dict[str, Any], have_dbos: bool, load_before: float
) -> None:
    runs: dict[str, list[dict[str, Any]]] = {"floor": [], "seamwork": [], "dbos": []}
    recovery: list[dict[str, Any]] = []
    for round_no in range(1, args.repeat + 1):
        print(f"[{round_no}/{args.repeat}] seamwork + floor ...", file=sys.stderr, flush=True)
        pair = run_worker("pair", cfg)
        runs["seamwork"].append(pair["seamwork"])
        runs["floor"].append(pair["floor"])
        if have_dbos:
            print(f"[{round_no}/{args.repeat}] dbos ...", file=sys.stderr, flush=True)
            runs["dbos"].append(run_worker("dbos", cfg))
        print(f"[{round_no}/{args.repeat}] recovery ...", file=sys.stderr, flush=True)
        with tempfile.TemporaryDirectory(prefix="saga-bench-recovery-") as tmp:
            recovery.append(measure_recovery({"dir": tmp, "parked": args.parked}))
    if have_dbos:
        missing = ""
    elif args.no_dbos:
        missing = "skipped (--no-dbos)"
    else:
        missing = DBOS_MISSING
    header, rows = build_table(runs, recovery, args.in_flight, missing)
    title = (
        f"Saga throughput - {describe_source()}, 4-step order saga, SQLite WAL + "
        f"synchronous=FULL, {os.cpu_count()} CPUs (load avg {load_before:.2f} at start), "
        f"Python {sys.version.split()[0]}, {placement(args)}; seamwork/floor: "
        f"{args.sequential} sequential, {args.failures} failing, {args.concurrent} at "
        f"{args.in_flight} in flight; DBOS: {args.dbos_sagas} per phase"
        + (f"; median (min-max) of {args.repeat} runs" if args.repeat > 1 else "")
    )
    print_table(title, header, rows)


if __name__ == "__main__":
    sys.exit(main())
