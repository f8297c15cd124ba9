"""A saga worker process on PostgreSQL that also keeps a record for the tests.

Like ``seamwork worker --postgres``, plus: every committed transition is recorded
with this incarnation's lease owner (table ``transitions`` in the ledger schema,
written synchronously from the hooks, so it is there before the next transition),
and the orchestrator's stats go to ``--stats`` as JSON after every lease loss and
at exit (SIGTERM).

Usage: ``python pg_saga_worker.py --store DSN --ledger DSN [--worker-id NAME] ...``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import time
from pathlib import Path

import psycopg
from pg_saga_app import Services, order_sagas  # runs as a script: its directory is on sys.path

from seamwork.saga import SagaOrchestrator, SagaState
from seamwork.storage import PostgresStore

TRANSITIONS = (
    "CREATE TABLE IF NOT EXISTS transitions (id bigserial PRIMARY KEY, saga_id text,"
    " event text, step text, owner text, at double precision)"
)


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--store", required=True)
    parser.add_argument("--ledger", required=True)
    parser.add_argument("--worker-id")
    parser.add_argument("--lease", type=float, default=1.5)
    parser.add_argument("--interval", type=float, default=0.2)
    parser.add_argument("--query-timeout", type=float, default=2.0)
    parser.add_argument("--versions", default="1")
    parser.add_argument("--stats")
    return parser.parse_args(argv)


class Recorder:
    """Writes each committed transition with its owner, before the saga moves on."""

    def __init__(self, ledger: str, orch: SagaOrchestrator, stats: str | None) -> None:
        self.conn = psycopg.connect(ledger, autocommit=True)
        self.conn.execute(TRANSITIONS)
        self.orch = orch
        self.stats = stats
        for event in ("recovered", "completed", "failed", "stuck"):
            orch.on(event, lambda state, event=event: self.row(state, event, None))
        orch.on("step_completed", lambda state, step: self.row(state, "step_completed", step))
        orch.on("compensated", lambda state, step: self.row(state, "compensated", step))
        orch.on("lease_lost", lambda state: self.dump())
        orch.on("stranded", self.stranded)

    def row(self, state: SagaState, event: str, step: str | None) -> None:
        self.conn.execute(
            "INSERT INTO transitions (saga_id, event, step, owner, at) VALUES (%s, %s, %s, %s, %s)",
            (state.saga_id, event, step, self.orch.owner, time.time()),
        )

    def stranded(self, states: list[SagaState]) -> None:
        for state in states:
            self.row(state, "stranded", None)

    def dump(self) -> None:
        if self.stats:
            Path(self.stats).write_text(json.dumps({"owner": self.orch.owner, **self.orch.stats}))


async def main(args: argparse.Namespace) -> None:
    services = Services(args.ledger)
    versions = tuple(int(v) for v in args.versions.split(","))
    store = PostgresStore(args.store, query_timeout=args.query_timeout)
    orch = SagaOrchestrator(
        store,
        order_sagas(services, versions),
        owner=args.worker_id,
        lease_seconds=args.lease,
        recovery_interval=args.interval,
    )
    recorder = Recorder(args.ledger, orch, args.stats)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    async with orch:
        print(f"worker {orch.owner} running", flush=True)
        await stop.wait()
    recorder.dump()
    await services.aclose()


if __name__ == "__main__":
    asyncio.run(main(parse(sys.argv[1:])))
