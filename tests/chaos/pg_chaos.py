"""Shared pieces of the PostgreSQL chaos tests: schemas, saga submission, worker
processes, and the invariants checked on the services' books."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import psycopg
from pg_saga_app import STEPS, Services, create_books, order_sagas

from seamwork.saga import SagaMachine
from seamwork.storage import PostgresStore

HERE = Path(__file__).parent
WORKER = HERE / "pg_saga_worker.py"
SRC = HERE.parent.parent / "src"


def fresh_schema(database_dsn: str, prefix: str) -> str:
    """A DSN whose tables land in a new schema of the run's database."""
    schema = f"{prefix}_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(database_dsn, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"'.encode())
    return f"{database_dsn} options='-c search_path={schema}'"


def store_and_books(database_dsn: str) -> tuple[str, str]:
    """(saga store DSN, services' books DSN), each in its own new schema."""
    ledger = fresh_schema(database_dsn, "books")
    create_books(ledger)
    return fresh_schema(database_dsn, "sagas"), ledger


async def submit(store_dsn: str, plan: list[dict[str, str]]) -> None:
    """Store the sagas of ``plan`` unleased, as a client that runs none itself would:
    the workers' claim loops pick them up."""
    machine = SagaMachine(order_sagas(Services("unused"))[0])
    store = PostgresStore(store_dsn, pool_size=1)
    await store.open()
    try:
        begun = [
            machine.begin(entry["id"], {"scenario": entry["scenario"]}, time.time())
            for entry in plan
        ]
        await asyncio.gather(*(store.create(b.state, b.events) for b in begun))
    finally:
        await store.aclose()


def worker_env(ledger: str, **extra: str) -> dict[str, str]:
    path = os.pathsep.join([str(HERE), str(SRC), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, "SEAMWORK_CHAOS_LEDGER": ledger, **extra}


def start_worker(
    store: str, ledger: str, log: Path, *, worker_id: str | None = None, **options: Any
) -> subprocess.Popen[bytes]:
    """A ``pg_saga_worker.py`` process (options: lease, interval, stats, versions...)."""
    argv = [sys.executable, str(WORKER), "--store", store, "--ledger", ledger]
    if worker_id:
        argv += ["--worker-id", worker_id]
    for key, value in options.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    with open(log, "ab") as out:
        return subprocess.Popen(argv, env=worker_env(ledger), stdout=out, stderr=out)


def stop(proc: subprocess.Popen[bytes], timeout: float = 15) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def statuses(store: str) -> Counter[str]:
    with psycopg.connect(store) as conn:
        rows = conn.execute("SELECT status, count(*) FROM seamwork_sagas GROUP BY 1").fetchall()
    return Counter({row[0]: int(row[1]) for row in rows})


def wait_terminal(store: str, total: int, timeout: float) -> Counter[str]:
    deadline = time.monotonic() + timeout
    while True:
        counts = statuses(store)
        done = counts["completed"] + counts["failed"] + counts["stuck"]
        if done >= total or time.monotonic() > deadline:
            return counts
        time.sleep(0.2)


def read_books(store: str, ledger: str) -> dict[str, Any]:
    books: dict[str, Any] = {}
    with psycopg.connect(ledger) as conn:
        books["effects"] = conn.execute(
            "SELECT saga_id, step, kind, key, owner FROM effects ORDER BY id"
        ).fetchall()
        books["calls"] = conn.execute("SELECT saga_id, step, kind, key FROM calls").fetchall()
        books["keys"] = {row[0] for row in conn.execute("SELECT key FROM ledger")}
    with psycopg.connect(store) as conn:
        books["sagas"] = {
            row[0]: {
                "status": row[1],
                "completed": list(row[2]),
                "uncertain": list(row[3]),
                "compensated": list(row[4]),
                "lease_owner": row[5],
            }
            for row in conn.execute(
                "SELECT saga_id, status, completed_steps, uncertain_steps, compensated_steps, "
                "lease_owner FROM seamwork_sagas"
            )
        }
    return books


EXPECTED_APPLIED = {"ok": 4, "decline": 1, "late_decline": 3, "slow": 4}


def check_invariants(store: str, ledger: str, plan: list[dict[str, str]]) -> Counter[str]:
    """Every saga terminal; every effect applied once; compensations only of applied
    steps, in reverse order; every call under the saga's stable key."""
    books = read_books(store, ledger)
    sagas = books["sagas"]
    assert set(sagas) == {e["id"] for e in plan}
    effects: dict[str, list[tuple[str, str]]] = {}
    for saga_id, step, kind, key, _owner in books["effects"]:
        suffix = ":compensate" if kind == "compensate" else ""
        assert key == f"{saga_id}:{step}{suffix}"
        assert key in books["keys"], f"effect without its ledger entry: {key}"
        effects.setdefault(saga_id, []).append((step, kind))
    for saga_id, step, kind, key in books["calls"]:
        assert key == f"{saga_id}:{step}" + (":compensate" if kind == "compensate" else "")
    outcomes: Counter[str] = Counter()
    for entry in plan:
        saga_id, scenario = entry["id"], entry["scenario"]
        row = sagas[saga_id]
        outcomes[row["status"]] += 1
        where = f"saga {saga_id} ({scenario}): {row}, effects {effects.get(saga_id)}"
        applied = [s for s, k in effects.get(saga_id, []) if k == "apply"]
        undone = [s for s, k in effects.get(saga_id, []) if k == "compensate"]
        assert row["lease_owner"] is None, f"a finished saga keeps its lease, {where}"
        assert len(applied) == len(set(applied)), f"effect applied twice, {where}"
        assert len(undone) == len(set(undone)), f"compensated twice, {where}"
        assert set(undone) <= set(applied), f"compensated a step never applied, {where}"
        assert set(applied) <= {*row["completed"], *row["uncertain"]}, where
        assert undone == list(reversed(applied))[: len(undone)], f"not in reverse, {where}"
        expected_order = list(reversed(row["completed"] + row["uncertain"]))
        assert row["compensated"] == expected_order[: len(row["compensated"])], where
        assert applied == list(STEPS[: EXPECTED_APPLIED[scenario]]), where
        if scenario in ("ok", "slow"):
            assert row["status"] == "completed", where
            assert undone == [], where
        else:
            assert row["status"] == "failed", where
            assert undone == list(reversed(applied)), where
            assert row["compensated"] == expected_order, where
    return outcomes


def write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value))
