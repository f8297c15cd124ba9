"""Chaos: SIGKILL the orchestrator process anywhere, then check the services' books.

``saga_runner.py`` runs an order saga over four services that each own a SQLite
database and an ``IdempotencyLedger``. These tests kill it at random moments and at
each transition point, restart it, let it finish, and then check every invariant
against what the services themselves recorded, not what the engine believes.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from seamwork.saga import Saga as SagaDef
from seamwork.saga import SagaOrchestrator, SagaStatus, Step
from seamwork.storage.sqlite import SQLiteStore

pytestmark = pytest.mark.chaos

RUNNER = Path(__file__).with_name("saga_runner.py")
STEPS = ("reserve_inventory", "charge_payment", "ship_order", "send_confirmation")
SERVICES = ("inventory", "payment", "shipping", "notification")
MAX_COMPENSATION_ATTEMPTS = 3
SOAK = os.environ.get("SEAMWORK_SOAK") == "1"
SCENARIOS = ("ok", "ok", "ok", "decline", "ship_timeout", "late_decline", "stuck")


def write_plan(workdir: Path, scenarios: list[str]) -> list[dict[str, str]]:
    plan = [{"id": f"order-{i}", "scenario": s} for i, s in enumerate(scenarios)]
    (workdir / "plan.json").write_text(json.dumps(plan))
    return plan


def run_runner(workdir: Path, *, kill_after: float | None = None, **env: str) -> int:
    """Run the orchestrator process; SIGKILL it ``kill_after`` seconds after it is up
    (its recovery done and its sagas starting), if given."""
    environ = {**os.environ, **{f"SEAMWORK_CHAOS_{k.upper()}": v for k, v in env.items()}}
    ready = workdir / "ready"
    ready.unlink(missing_ok=True)
    with open(workdir / "runner.log", "a") as log:
        proc = subprocess.Popen(
            [sys.executable, str(RUNNER), str(workdir)],
            env=environ,
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
        try:
            if kill_after is None:
                return proc.wait(timeout=60)
            deadline = time.monotonic() + 30
            while not ready.exists() and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.005)
            return proc.wait(timeout=kill_after)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            rc = proc.wait()
            if kill_after is None:
                raise
            return rc


def active_statuses(workdir: Path) -> Counter[str]:
    if not (workdir / "sagas.db").exists():
        return Counter()
    with sqlite3.connect(workdir / "sagas.db") as conn:
        try:
            rows = conn.execute("SELECT status FROM seamwork_sagas").fetchall()
        except sqlite3.OperationalError:
            return Counter()
    return Counter(row[0] for row in rows)


def finish(workdir: Path, **env: str) -> None:
    rc = run_runner(workdir, **env)
    log = (workdir / "runner.log").read_text()[-3000:]
    assert rc == 0, f"the last run must finish cleanly (rc={rc}):\n{log}"


# --- the books --------------------------------------------------------------------------


def read_books(workdir: Path) -> dict[str, Any]:
    books: dict[str, Any] = {"effects": [], "calls": [], "keys": set()}
    for service in SERVICES:
        with sqlite3.connect(workdir / f"{service}.db") as conn:
            books["effects"] += conn.execute(
                "SELECT saga_id, step, kind, seq, key FROM effects ORDER BY seq"
            ).fetchall()
            books["calls"] += conn.execute("SELECT saga_id, step, kind, key FROM calls").fetchall()
            books["keys"] |= {r[0] for r in conn.execute("SELECT key FROM seamwork_idempotency")}
    books["effects"].sort(key=lambda row: row[3])
    alerts = workdir / "alerts.log"
    books["alerts"] = Counter(alerts.read_text().split() if alerts.exists() else [])
    with sqlite3.connect(workdir / "sagas.db") as conn:
        books["sagas"] = {
            row[0]: {
                "status": row[1],
                "completed": json.loads(row[2]),
                "uncertain": json.loads(row[3]),
                "compensated": json.loads(row[4]),
            }
            for row in conn.execute(
                "SELECT saga_id, status, completed_steps, uncertain_steps, compensated_steps "
                "FROM seamwork_sagas"
            )
        }
        books["events"] = conn.execute(
            "SELECT saga_id, event, step FROM seamwork_saga_events ORDER BY id"
        ).fetchall()
    return books


def check_invariants(workdir: Path, plan: list[dict[str, str]], *, rounds: int = 1) -> Counter[str]:
    """Assert every chaos invariant on the services' books and the saga store."""
    books = read_books(workdir)
    sagas = books["sagas"]
    assert set(sagas) == {e["id"] for e in plan}
    outcomes: Counter[str] = Counter()
    for entry in plan:
        saga_id, scenario = entry["id"], entry["scenario"]
        row = sagas[saga_id]
        outcomes[row["status"]] += 1
        where = f"saga {saga_id} ({scenario}): {row}"
        applied = [e[1] for e in books["effects"] if e[0] == saga_id and e[2] == "apply"]
        undone = [e[1] for e in books["effects"] if e[0] == saga_id and e[2] == "compensate"]
        assert len(applied) == len(set(applied)), f"effect applied twice, {where}"
        assert len(undone) == len(set(undone)), f"compensated twice, {where}"
        assert set(applied) <= {*row["completed"], *row["uncertain"]}, where
        expected_order = list(reversed(row["completed"] + row["uncertain"]))
        assert row["compensated"] == expected_order[: len(row["compensated"])], where
        if scenario == "ok":
            assert row["status"] == "completed", where
            assert applied == list(STEPS), where
            assert row["completed"] == list(STEPS), where
            assert undone == [], where
        elif scenario == "stuck":
            assert row["status"] == "stuck", where
            assert applied == ["reserve_inventory"], where
            assert undone == [], where
            failed = [e for e in books["events"] if e[0] == saga_id]
            counted = Counter(e[1] for e in failed if e[2] == "reserve_inventory")
            assert counted["compensation_failed"] == MAX_COMPENSATION_ATTEMPTS * rounds, where
            assert counted["stuck"] == rounds, where
            rounds_seen = [e[1] for e in failed if e[1] in ("stuck", "retried")]
            assert rounds_seen == ["stuck", "retried"] * (rounds - 1) + ["stuck"], where
            assert books["alerts"][saga_id] >= rounds, f"an alert never went out, {where}"
        else:
            assert row["status"] == "failed", where
            assert undone == list(reversed(applied)), f"not undone in reverse, {where}"
            assert row["compensated"] == expected_order, where
            want = {"decline": 1, "ship_timeout": 3, "late_decline": 3}[scenario]
            assert applied == list(STEPS[:want]), where
            if scenario == "ship_timeout":
                assert "ship_order" in row["uncertain"], where
                assert "ship_order" in undone, where
    check_keys(books, sagas)
    return outcomes


def check_keys(books: dict[str, Any], sagas: dict[str, dict[str, Any]]) -> None:
    """Every call used the stable key; the ledgers hold exactly the keys of what ran."""
    for saga_id, step, kind, key in books["calls"]:
        suffix = ":compensate" if kind == "compensate" else ""
        assert key == f"{saga_id}:{step}{suffix}"
    applied_keys = {e[4] for e in books["effects"] if e[2] == "apply"}
    compensated_keys = {
        f"{saga_id}:{step}:compensate"
        for saga_id, row in sagas.items()
        for step in row["compensated"]
    }
    assert books["keys"] == applied_keys | compensated_keys


# --- the tests --------------------------------------------------------------------------


@pytest.mark.timeout(240)
def test_random_sigkills_leave_every_saga_terminal_and_the_books_balanced(
    tmp_path: Path,
) -> None:
    rng = random.Random(20240601)
    sagas, kills = (400, 60) if SOAK else (100, 22)
    plan = write_plan(tmp_path, [rng.choice(SCENARIOS) for _ in range(sagas)])
    killed_while: list[Counter[str]] = []
    upto = 0
    while len(killed_while) < kills or upto < sagas:
        upto = min(sagas, upto + 5)
        rc = run_runner(tmp_path, kill_after=rng.uniform(0.0, 0.4), upto=str(upto))
        assert rc in (-signal.SIGKILL, 0), (tmp_path / "runner.log").read_text()[-3000:]
        if rc == -signal.SIGKILL:
            killed_while.append(active_statuses(tmp_path))
    finish(tmp_path)
    assert len(killed_while) >= 20
    assert any(c["compensating"] for c in killed_while), "no kill landed during compensation"
    assert any(c["running"] for c in killed_while)
    outcomes = check_invariants(tmp_path, plan)
    assert sum(outcomes.values()) == sagas
    assert set(outcomes) == {"completed", "failed", "stuck"}


SWEEP = (
    "after_effect:reserve_inventory",
    "recovered",
    "after_checkpoint:charge_payment",
    "during_compensation",
    "after_effect:ship_order",
    "recovered",
    "after_checkpoint:reserve_inventory",
    "during_compensation:charge_payment",
    "after_effect:send_confirmation",
    "recovered",
    "after_checkpoint:ship_order",
    "during_compensation:reserve_inventory",
    "alerting",
)


@pytest.mark.timeout(180)
def test_crash_at_each_transition_point_then_recover(tmp_path: Path) -> None:
    batch = ["ok", "decline", "ship_timeout", "late_decline", "stuck"]
    plan = write_plan(tmp_path, batch * len(SWEEP))
    for k, point in enumerate(SWEEP):
        upto = str(len(batch) * (k + 1))
        rc = run_runner(tmp_path, crash=point, upto=upto)
        assert rc == -signal.SIGKILL, f"crash point {point} was never reached (rc={rc})"
    crashes = Counter(
        line.split()[0] for line in (tmp_path / "crashes.log").read_text().splitlines()
    )
    assert crashes == {
        "after_effect": 3,
        "recovered": 3,
        "after_checkpoint": 3,
        "during_compensation": 3,
        "alerting": 1,
    }
    finish(tmp_path)
    check_invariants(tmp_path, plan)
    # The operator retries the stuck sagas: each fails its compensation again, exactly
    # max_compensation_attempts times in the new round, and is stuck again.
    finish(tmp_path, retry_stuck="1")
    check_invariants(tmp_path, plan, rounds=2)


# --- a crash the engine gets wrong -------------------------------------------------------


async def _crash_mid_step_then_recover(tmp_path: Path, *, after_deadline: bool) -> Any:
    """A step applies its effect, the process dies before the checkpoint, and the saga
    is recovered either after its deadline or straight into an operator cancel."""
    applied: list[str] = []
    first_life = True

    async def reserve(ctx: Any) -> None:
        applied.append(ctx.step)
        if first_life:
            await asyncio.sleep(60)  # the process dies here

    async def release(ctx: Any) -> None:
        applied.append(f"undo {ctx.step}")

    saga = SagaDef("order", steps=[Step("reserve", reserve, compensate=release)], deadline=0.3)
    path = tmp_path / "sagas.db"
    orch = SagaOrchestrator(SQLiteStore(path), [saga])
    await orch.open()
    await orch.start("order", {}, saga_id="order-1")
    while not applied:
        await asyncio.sleep(0.01)
    await orch.aclose()  # the row stays at its last checkpoint, exactly as after kill -9
    first_life = False
    if after_deadline:
        await asyncio.sleep(0.4)
    async with SagaOrchestrator(SQLiteStore(path), [saga]) as orch:
        if not after_deadline:
            await orch.cancel("order-1")
        state = await (await orch.start("order", {}, saga_id="order-1")).wait()
    return state, applied


async def test_step_in_flight_at_a_crash_is_compensated_when_recovered_after_deadline(
    tmp_path: Path,
) -> None:
    state, applied = await _crash_mid_step_then_recover(tmp_path, after_deadline=True)
    assert state.status is SagaStatus.FAILED
    assert applied == ["reserve", "undo reserve"], "an applied effect was never compensated"


async def test_step_in_flight_at_a_crash_is_compensated_when_cancelled_on_recovery(
    tmp_path: Path,
) -> None:
    state, applied = await _crash_mid_step_then_recover(tmp_path, after_deadline=False)
    assert state.status is SagaStatus.FAILED
    assert applied == ["reserve", "undo reserve"], "an applied effect was never compensated"
