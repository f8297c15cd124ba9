"""The demo's orchestrator process: ``python -m seamwork.demo.worker --dir D --orders N``.

With ``--postgres-run RUN_ID`` its saga store and services are the run's PostgreSQL
schemas on ``$SEAMWORK_PG_DSN`` (the DSN goes in the environment, not on the command
line, where ``ps`` would show its password).

It opens the saga store (recovering whatever an earlier, killed process left in
flight), starts every order of the scenario (``start`` is idempotent by saga id, so
orders the earlier process already began are not started twice) with at most
``--concurrency`` in flight, and waits for all of them. It reports to its parent
as JSON lines on stdout: ``resumed``, ``recovered``, ``finished``, ``stuck``, ``done``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from seamwork._core import runtime
from seamwork.demo.saga import (
    SAGA_NAME,
    make_orders,
    order_saga,
    saga_id,
    saga_store,
    services_at,
)
from seamwork.demo.servers import PgRun
from seamwork.demo.services import Order
from seamwork.saga import SagaOrchestrator, SagaState

WORKER = "seamwork-demo"
"""Every orchestrator process of the demo is this one worker: the one started after
the SIGKILL is its restart, so on opening it takes over the dead one's leases at
once (a PostgreSQL store frees only the same worker's; another's runs out after
``lease_seconds``, 30 s)."""


def emit(event: str, **fields: Any) -> None:
    """One JSON line to the parent; flushed, since this process may be killed any time."""
    sys.stdout.write(json.dumps({"event": event, "at": time.time(), **fields}) + "\n")
    sys.stdout.flush()


def _alert(state: SagaState) -> None:
    gave_up = ", ".join(f"{step} x{n}" for step, n in state.compensation_attempts.items())
    reason = f"compensation failed ({gave_up}) after {state.failure_reason}"
    emit("stuck", saga_id=state.saga_id, reason=reason)


async def _drive(orch: SagaOrchestrator, order: Order, slots: asyncio.Semaphore) -> None:
    async with slots:
        run = await orch.start(SAGA_NAME, order.as_data(), saga_id=saga_id(order.order_id))
        state = await run.wait()
    emit("finished", saga_id=state.saga_id, status=state.status.value)


async def _watch_recovered(orch: SagaOrchestrator, recovered: list[str]) -> None:
    await asyncio.gather(*(orch.handle(sid).wait() for sid in recovered))
    emit("recovered", count=len(recovered))


async def run(directory: Path, orders: int, concurrency: int, pg: PgRun | None = None) -> None:
    services = services_at(directory, pg)
    recovered: list[str] = []
    orch = SagaOrchestrator(
        saga_store(directory, pg),
        [order_saga(services)],
        on_stuck=_alert,
        recovery_interval=0.2,
        owner=WORKER,
    )
    orch.on("recovered", lambda state: recovered.append(state.saga_id))
    try:
        async with orch:
            emit("resumed", count=len(recovered))
            watcher = asyncio.create_task(_watch_recovered(orch, list(recovered)))
            slots = asyncio.Semaphore(concurrency)
            await asyncio.gather(*(_drive(orch, o, slots) for o in make_orders(orders)))
            await watcher
    finally:
        await services.aclose()
    emit("done")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m seamwork.demo.worker")
    parser.add_argument("--dir", type=Path, required=True)
    parser.add_argument("--orders", type=int, required=True)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--log", type=Path, default=None)
    parser.add_argument("--postgres-run", default=None, help="run id; the DSN is $SEAMWORK_PG_DSN")
    args = parser.parse_args(argv)
    pg = None
    if args.postgres_run:
        pg = PgRun(os.environ["SEAMWORK_PG_DSN"], args.postgres_run)
    logging.basicConfig(
        filename=args.log or args.dir / "orchestrator.log",
        level=logging.INFO,
        format="%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s",
    )
    runtime.run(run(args.dir, args.orders, args.concurrency, pg))


if __name__ == "__main__":
    main()
