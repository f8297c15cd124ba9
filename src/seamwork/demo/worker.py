"""The demo's orchestrator process: ``python -m seamwork.demo.worker --dir D --orders N``.

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
import sys
import time
from pathlib import Path
from typing import Any

from seamwork._core import runtime
from seamwork.demo.saga import SAGA_NAME, SAGAS_DB, make_orders, order_saga, saga_id
from seamwork.demo.services import Order, Services
from seamwork.saga import SagaOrchestrator, SagaState
from seamwork.storage import SQLiteStore


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


async def run(directory: Path, orders: int, concurrency: int) -> None:
    services = Services.in_directory(directory)
    recovered: list[str] = []
    orch = SagaOrchestrator(
        SQLiteStore(directory / SAGAS_DB),
        [order_saga(services)],
        on_stuck=_alert,
        recovery_interval=0.2,
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
    args = parser.parse_args(argv)
    logging.basicConfig(
        filename=args.log or args.dir / "orchestrator.log",
        level=logging.INFO,
        format="%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s",
    )
    runtime.run(run(args.dir, args.orders, args.concurrency))


if __name__ == "__main__":
    main()
