"""The orchestrator process the chaos tests kill: an order saga over four services.

Usage: ``python saga_runner.py WORKDIR``. ``WORKDIR/plan.json`` lists the sagas
(``{"id", "scenario"}``); the services (inventory, payment, shipping, notification)
each own a SQLite database in ``WORKDIR`` with an ``IdempotencyLedger`` and an
``effects`` table recording ``(saga_id, step, kind, seq, key)`` for every effect and
compensation, and a ``calls`` table recording every invocation and its key.

Environment (read here, at the edge):

* ``SEAMWORK_CHAOS_UPTO``: start only the first N sagas of the plan (default: all).
* ``SEAMWORK_CHAOS_CRASH``: ``point`` or ``point:step``; the process SIGKILLs itself
  the first time it gets there. Points: ``recovered`` (a saga was claimed),
  ``after_effect`` (a step's effect committed, before the saga's checkpoint),
  ``after_checkpoint`` (a step's completion committed), ``during_compensation``
  (a compensation's effect committed, before its checkpoint), ``alerting`` (a saga
  is stuck and committed, before its alert is out). Every alert goes to
  ``WORKDIR/alerts.log``, one saga id a line.
* ``SEAMWORK_CHAOS_RETRY_STUCK=1``: first retry every stuck saga (the operator).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any

from seamwork.saga import (
    IdempotencyLedger,
    Retry,
    Saga,
    SagaOrchestrator,
    Step,
    StepContext,
    StepFailed,
)
from seamwork.storage.sqlite import SQLiteStore

WORKDIR = Path(sys.argv[1])
CRASH = os.environ.get("SEAMWORK_CHAOS_CRASH", "")
STEP_DELAY = 0.005
CONCURRENCY = 6
SERVICES = {
    "reserve_inventory": "inventory",
    "charge_payment": "payment",
    "ship_order": "shipping",
    "send_confirmation": "notification",
}
TABLES = (
    "CREATE TABLE IF NOT EXISTS effects (id INTEGER PRIMARY KEY, saga_id TEXT, step TEXT,"
    " kind TEXT, seq INTEGER, key TEXT)",
    "CREATE TABLE IF NOT EXISTS calls (id INTEGER PRIMARY KEY, saga_id TEXT, step TEXT,"
    " kind TEXT, attempt INTEGER, key TEXT)",
)


def crash_here(point: str, step: str | None = None, saga_id: str | None = None) -> None:
    """SIGKILL this process if the crash spec names this point (and step)."""
    if not CRASH:
        return
    want, _, want_step = CRASH.partition(":")
    if want != point or (want_step and want_step != step):
        return
    with open(WORKDIR / "crashes.log", "a") as log:
        log.write(f"{point} {saga_id} {step}\n")
        log.flush()
        os.fsync(log.fileno())
    os.kill(os.getpid(), signal.SIGKILL)


LEDGERS = {
    name: IdempotencyLedger.sqlite(WORKDIR / f"{name}.db") for name in set(SERVICES.values())
}


async def record_call(ctx: StepContext, kind: str) -> None:
    row = (ctx.saga_id, ctx.step, kind, ctx.attempt, ctx.idempotency_key)
    await LEDGERS[SERVICES[ctx.step]].transaction(
        lambda conn: conn.execute(
            "INSERT INTO calls (saga_id, step, kind, attempt, key) VALUES (?, ?, ?, ?, ?)", row
        )
    )


def declines(step: str, scenario: str) -> bool:
    if step == "charge_payment":
        return scenario in ("decline", "stuck")
    return step == "send_confirmation" and scenario == "late_decline"


def make_action(step: str) -> Any:
    async def action(ctx: StepContext) -> dict[str, bool]:
        await record_call(ctx, "apply")
        scenario = ctx.data["scenario"]
        if declines(step, scenario):
            raise StepFailed(f"{step} declined")

        def effect(conn: sqlite3.Connection) -> dict[str, bool]:
            conn.execute(
                "INSERT INTO effects (saga_id, step, kind, seq, key) VALUES (?, ?, 'apply', ?, ?)",
                (ctx.saga_id, step, time.time_ns(), ctx.idempotency_key),
            )
            return {f"{step}_done": True}

        result = await LEDGERS[SERVICES[step]].once(ctx.idempotency_key, effect)
        crash_here("after_effect", step, ctx.saga_id)
        if step == "ship_order" and scenario == "ship_timeout":
            await asyncio.sleep(5)  # applied, then the answer never comes in time
        await asyncio.sleep(STEP_DELAY)
        return result

    return action


def make_compensation(step: str) -> Any:
    async def compensate(ctx: StepContext) -> None:
        await record_call(ctx, "compensate")
        if step == "reserve_inventory" and ctx.data["scenario"] == "stuck":
            raise RuntimeError("warehouse is down")

        def effect(conn: sqlite3.Connection) -> dict[str, bool]:
            applied = conn.execute(
                "SELECT 1 FROM effects WHERE saga_id = ? AND step = ? AND kind = 'apply'",
                (ctx.saga_id, step),
            ).fetchone()
            if applied:  # compensations tolerate "nothing to undo"
                conn.execute(
                    "INSERT INTO effects (saga_id, step, kind, seq, key)"
                    " VALUES (?, ?, 'compensate', ?, ?)",
                    (ctx.saga_id, step, time.time_ns(), ctx.idempotency_key),
                )
            return {"undone": bool(applied)}

        await LEDGERS[SERVICES[step]].once(ctx.idempotency_key, effect)
        crash_here("during_compensation", step, ctx.saga_id)
        await asyncio.sleep(STEP_DELAY)

    return compensate


def step(name: str, **options: Any) -> Step:
    return Step(name, make_action(name), compensate=make_compensation(name), **options)


ORDER = Saga(
    "order",
    steps=[
        step("reserve_inventory", timeout=5),
        step("charge_payment", timeout=5),
        step("ship_order", timeout=0.3, retry=Retry(2, backoff=0.01)),
        step("send_confirmation", timeout=5),
    ],
    max_compensation_attempts=3,
    compensation_backoff=0.01,
)


def alert(state: Any) -> None:
    crash_here("alerting", None, state.saga_id)
    with open(WORKDIR / "alerts.log", "a") as log:
        log.write(f"{state.saga_id}\n")
        log.flush()
        os.fsync(log.fileno())


async def main() -> None:
    plan = json.loads((WORKDIR / "plan.json").read_text())
    upto = int(os.environ.get("SEAMWORK_CHAOS_UPTO", len(plan)))
    for ledger in LEDGERS.values():
        await ledger.open()
        for sql in TABLES:
            await ledger.transaction(lambda conn, sql=sql: conn.execute(sql))
    orch = SagaOrchestrator(SQLiteStore(WORKDIR / "sagas.db"), [ORDER], recovery_interval=0.05)
    orch.on("recovered", lambda state: crash_here("recovered", None, state.saga_id))
    orch.on(
        "step_completed",
        lambda state, name: crash_here("after_checkpoint", name, state.saga_id),
    )
    orch.on("stuck", alert)
    async with orch:
        (WORKDIR / "ready").write_text(str(os.getpid()))  # the tests time kills from here
        if os.environ.get("SEAMWORK_CHAOS_RETRY_STUCK") == "1":
            stuck = await orch.list(status="stuck", limit=10_000)
            runs = [await orch.retry(s.saga_id) for s in stuck]
            await asyncio.gather(*(run.wait() for run in runs))
        gate = asyncio.Semaphore(CONCURRENCY)

        async def one(entry: dict[str, str]) -> None:
            async with gate:
                run = await orch.start(
                    "order", {"scenario": entry["scenario"]}, saga_id=entry["id"]
                )
                await run.wait()

        await asyncio.gather(*(one(entry) for entry in plan[:upto]))
    for ledger in LEDGERS.values():
        await ledger.aclose()


if __name__ == "__main__":
    asyncio.run(main())
