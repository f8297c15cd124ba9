"""Chaos on PostgreSQL: several worker processes share one saga store and die often.

Three ``seamwork worker`` processes run the order saga of ``pg_saga_app`` (services
keeping idempotent books in PostgreSQL). The test submits 1,000 sagas while it
SIGKILLs random workers and restarts them - sometimes under the same ``--worker-id``
(it takes its sagas back at once), sometimes as a new worker (the dead one's sagas
are claimed when their leases expire) - then checks the services' books.

A second test pauses a worker (SIGSTOP) in the middle of a step until its lease
expires and another worker has taken the saga over, then resumes it: the zombie's
writes are fenced off and it stops that saga, and the saga's recorded history shows
one owner at a time.
"""

from __future__ import annotations

import asyncio
import json
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import psycopg
import pytest
from pg_chaos import (
    check_invariants,
    start_worker,
    statuses,
    stop,
    store_and_books,
    submit,
    wait_terminal,
    worker_env,
)

pytestmark = pytest.mark.chaos

SCENARIOS = ("ok", "ok", "ok", "decline", "late_decline")
LEASE = 1.5
INTERVAL = 0.2


def cli_worker(store: str, ledger: str, worker_id: str, log: Path) -> subprocess.Popen[bytes]:
    argv = [sys.executable, "-m", "seamwork.cli", "worker", "--postgres", store]
    argv += ["--app", "pg_saga_app:SAGAS", "--worker-id", worker_id]
    argv += ["--lease", str(LEASE), "--interval", str(INTERVAL)]
    with open(log, "ab") as out:
        return subprocess.Popen(argv, env=worker_env(ledger), stdout=out, stderr=out)


@pytest.mark.timeout(150)
def test_three_workers_with_random_sigkills_leave_every_saga_terminal_and_books_balanced(
    pg_database: str, tmp_path: Path
) -> None:
    rng = random.Random(20250607)
    store, ledger = store_and_books(pg_database)
    plan = [{"id": f"order-{i}", "scenario": rng.choice(SCENARIOS)} for i in range(1000)]
    log = tmp_path / "workers.log"
    asyncio.run(submit(store, plan[:1]))  # creates the schema before workers race to it
    workers = {f"w{i}": cli_worker(store, ledger, f"w{i}", log) for i in range(3)}
    killed_while: list[Counter[str]] = []
    submitted, fresh = 1, 3
    started = time.monotonic()
    try:
        while len(killed_while) < 30 or submitted < len(plan):
            batch = plan[submitted : submitted + 40]
            if batch:
                asyncio.run(submit(store, batch))
                submitted += len(batch)
            time.sleep(rng.uniform(0.2, 0.7))
            name = rng.choice(sorted(workers))
            workers[name].send_signal(signal.SIGKILL)
            workers[name].wait()
            killed_while.append(statuses(store))
            del workers[name]
            if rng.random() < 0.5:  # a new worker: the dead one's leases must expire
                name, fresh = f"w{fresh}", fresh + 1
            workers[name] = cli_worker(store, ledger, name, log)
        counts = wait_terminal(store, len(plan), timeout=60)
    finally:
        for proc in workers.values():
            stop(proc)
    elapsed = time.monotonic() - started
    tail = log.read_text()[-3000:]
    assert counts["completed"] + counts["failed"] == len(plan), f"{counts}\n{tail}"
    assert len(killed_while) >= 30
    assert any(c["running"] for c in killed_while)
    assert any(c["compensating"] for c in killed_while), "no kill landed during compensation"
    outcomes = check_invariants(store, ledger, plan)
    assert set(outcomes) == {"completed", "failed"}
    print(f"1000 sagas, {len(killed_while)} SIGKILLs, {elapsed:.1f}s, outcomes {outcomes}")


def _history(ledger: str, saga_id: str) -> list[tuple[str, str | None, str]]:
    with psycopg.connect(ledger) as conn:
        return [
            (row[0], row[1], row[2])
            for row in conn.execute(
                "SELECT event, step, owner FROM transitions WHERE saga_id = %s ORDER BY id",
                (saga_id,),
            )
        ]


def _wait_for(predicate: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _effects(ledger: str, saga_id: str, step: str) -> int:
    with psycopg.connect(ledger) as conn:
        row = conn.execute(
            "SELECT count(*) FROM effects WHERE saga_id = %s AND step = %s", (saga_id, step)
        ).fetchone()
    return int(row[0]) if row else 0


@pytest.mark.timeout(90)
def test_a_paused_worker_past_its_lease_is_fenced_off_when_it_resumes(
    pg_database: str, tmp_path: Path
) -> None:
    store, ledger = store_and_books(pg_database)
    log = tmp_path / "workers.log"
    options = {"lease": 1.0, "interval": 0.1}
    zombie_stats, other_stats = tmp_path / "zombie.json", tmp_path / "other.json"
    asyncio.run(submit(store, []))
    zombie = start_worker(store, ledger, log, worker_id="zombie", stats=zombie_stats, **options)
    # the zombie is up (and alone) before the saga exists
    _wait_for(lambda: log.exists() and "running" in log.read_text(), 20, "the zombie to start")
    asyncio.run(submit(store, [{"id": "slow-1", "scenario": "slow"}]))
    # It applies charge_payment's effect, then is paused before it can answer.
    _wait_for(lambda: _effects(ledger, "slow-1", "charge_payment") == 1, 10, "the slow step")
    zombie.send_signal(signal.SIGSTOP)
    other = start_worker(store, ledger, log, worker_id="other", stats=other_stats, **options)
    try:
        _wait_for(lambda: statuses(store)["completed"] == 1, 30, "the takeover to finish")
        zombie.send_signal(signal.SIGCONT)
        _wait_for(lambda: zombie_stats.exists(), 10, "the zombie to notice its lost lease")
        time.sleep(0.5)
    finally:
        zombie.send_signal(signal.SIGCONT)
        stop(zombie)
        stop(other)
    stats = json.loads(zombie_stats.read_text())
    assert stats["lease_lost"] == 1, stats
    assert stats["completed"] == 0, stats
    history = _history(ledger, "slow-1")
    owners = [owner for _, _, owner in history]
    assert owners[0].startswith("zombie:"), history
    assert owners[-1].startswith("other:"), history
    handover = owners.index(owners[-1])
    assert set(owners[:handover]) == {owners[0]}, f"owners interleave: {history}"
    assert set(owners[handover:]) == {owners[-1]}, f"owners interleave: {history}"
    assert [e for e, _, _ in history].count("completed") == 1, history
    check_invariants(store, ledger, [{"id": "slow-1", "scenario": "slow"}])
    assert "lease" in log.read_text()
