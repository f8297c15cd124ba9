"""The demo's invariants, checked against the services' OWN databases.

The saga store says what the orchestrator believes; the services' tables and
ledgers say what actually happened. Each check compares the two:

* every saga is terminal, and ended as the scenario planned;
* a completed saga applied every step exactly once (one ledger entry, one row);
* a failed saga compensated exactly the steps it applied - including a shipment
  whose step timed out after it was created - each exactly once;
* compensations ran in reverse order of the steps (read from the timeline), every
  one of them for a failed saga, every one before the release that failed for a
  stuck one;
* the stuck sagas are exactly those of warehouse W-13 whose release failed;
* stock is conserved: what left the shelves is what is still reserved;
* idempotency keys are stable: every row carries ``<saga_id>:<step>``, and the
  ledger's first result names that very row;
* the SIGKILL hit sagas in flight, and the new process resumed all of them when it
  started and finished them.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from seamwork.demo.saga import STEP_NAMES, expectation, saga_id
from seamwork.demo.scenario import DemoRun
from seamwork.demo.services import INITIAL_STOCK, STUCK_WAREHOUSE, Order
from seamwork.saga import IdempotencyLedger, SagaState, StepEvent

if TYPE_CHECKING:
    from seamwork.demo.servers import PgRun

Row = dict[str, Any]
MAX_SHOWN = 3

_SERVICE_OF = {
    "reserve_inventory": "inventory",
    "charge_payment": "payment",
    "ship_order": "shipping",
    "send_confirmation": "notification",
}
_TABLES = {
    "inventory": ("reservations",),
    "payment": ("payments", "refunds"),
    "shipping": ("shipments",),
    "notification": ("emails",),
}
_RESULT_ID = {
    "reserve_inventory": ("reservations", "reservation_id"),
    "charge_payment": ("payments", "payment_id"),
    "ship_order": ("shipments", "shipment_id"),
    "send_confirmation": ("emails", "email_id"),
}


@dataclass(frozen=True, slots=True)
class Check:
    """One invariant and whether it held."""

    name: str
    ok: bool
    detail: str


@dataclass(slots=True)
class Evidence:
    """The services' rows and ledger entries, by order."""

    rows: dict[str, dict[str, list[Row]]] = field(default_factory=dict)
    stock: dict[tuple[str, str], int] = field(default_factory=dict)
    ledger: dict[str, Any] = field(default_factory=dict)

    def of(self, table: str, order_id: str) -> list[Row]:
        return self.rows.get(table, {}).get(order_id, [])


def action_key(sid: str, step: str) -> str:
    return f"{sid}:{step}"


def undo_key(sid: str, step: str) -> str:
    return f"{sid}:{step}:compensate"


async def gather_evidence(
    directory: Path, orders: list[Order], pg: PgRun | None = None
) -> Evidence:
    """Read the services' tables and look every saga's keys up in their ledgers: the
    SQLite files in ``directory``, or with ``pg`` the run's PostgreSQL schemas."""
    evidence = Evidence()

    async def read(service: str, sql: str) -> list[Row]:
        if pg is not None:
            return await _pg_rows(pg, service, sql)
        return _sqlite_rows(directory, service, sql)

    for service, tables in _TABLES.items():
        for table in tables:
            evidence.rows[table] = _by_order(await read(service, f"SELECT * FROM {table}"))
    rows = await read("inventory", "SELECT sku, warehouse, qty FROM stock")
    evidence.stock = {(r["sku"], r["warehouse"]): r["qty"] for r in rows}
    for service in _TABLES:
        ledger = (
            IdempotencyLedger.postgres(pg.dsn_for(service))
            if pg is not None
            else IdempotencyLedger.sqlite(directory / f"{service}.db")
        )
        steps = [s for s, owner in _SERVICE_OF.items() if owner == service]
        keys = [k for o in orders for s in steps for k in _keys(saga_id(o.order_id), s)]
        async with ledger:
            results = await asyncio.gather(*(ledger.result(k) for k in keys))
        evidence.ledger.update(zip(keys, results, strict=True))
    return evidence


def _keys(sid: str, step: str) -> tuple[str, str]:
    return action_key(sid, step), undo_key(sid, step)


def _sqlite_rows(directory: Path, service: str, sql: str) -> list[Row]:
    """The rows of ``sql`` in the service's SQLite file, opened read-only."""
    path = directory / f"{service}.db"
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as conn:
        conn.row_factory = sqlite3.Row
        return [dict(row) for row in conn.execute(sql)]


async def _pg_rows(pg: PgRun, service: str, sql: str) -> list[Row]:
    """The rows of ``sql`` in the service's PostgreSQL schema."""
    import psycopg
    from psycopg.rows import dict_row

    async with await psycopg.AsyncConnection.connect(
        pg.dsn_for(service), row_factory=dict_row
    ) as conn:
        cursor = await conn.execute(sql.encode())
        return list(await cursor.fetchall())


def _by_order(rows: Iterable[Row]) -> dict[str, list[Row]]:
    grouped: dict[str, list[Row]] = defaultdict(list)
    for row in rows:
        grouped[row["order_id"]].append(row)
    return dict(grouped)


def check_all(demo: DemoRun, evidence: Evidence) -> list[Check]:
    """Every invariant, in the order the module docstring lists them."""
    checks: list[Callable[[DemoRun, Evidence], Check]] = [
        check_terminal,
        check_planned_outcomes,
        check_completed_once,
        check_failed_compensated,
        check_reverse_order,
        check_stuck,
        check_stock,
        check_keys,
        check_recovery,
    ]
    return [check(demo, evidence) for check in checks]


class _Problems:
    def __init__(self) -> None:
        self.items: list[str] = []

    def add(self, message: str) -> None:
        self.items.append(message)

    def check(self, name: str, ok_detail: str) -> Check:
        if not self.items:
            return Check(name, True, ok_detail)
        shown = "; ".join(self.items[:MAX_SHOWN])
        more = f" (+{len(self.items) - MAX_SHOWN} more)" if len(self.items) > MAX_SHOWN else ""
        return Check(name, False, shown + more)


def _sagas(demo: DemoRun, status: str) -> list[tuple[Order, SagaState]]:
    found = ((o, demo.states.get(saga_id(o.order_id))) for o in demo.orders)
    return [(o, s) for o, s in found if s is not None and s.status.value == status]


def check_terminal(demo: DemoRun, evidence: Evidence) -> Check:
    problems = _Problems()
    for order in demo.orders:
        state = demo.states.get(saga_id(order.order_id))
        if state is None:
            problems.add(f"{order.order_id} has no saga")
        elif not state.terminal:
            problems.add(f"{state.saga_id} is {state.status.value}")
    return problems.check("every saga terminal", f"{len(demo.orders)} of {len(demo.orders)}")


def check_planned_outcomes(demo: DemoRun, evidence: Evidence) -> Check:
    problems = _Problems()
    for order in demo.orders:
        state = demo.states.get(saga_id(order.order_id))
        planned = expectation(order).status
        if state is not None and state.status.value != planned:
            problems.add(f"{state.saga_id} is {state.status.value}, planned {planned}")
    return problems.check("outcomes as planned", "declined/timed out -> compensated, rest done")


def check_completed_once(demo: DemoRun, evidence: Evidence) -> Check:
    problems = _Problems()
    completed = _sagas(demo, "completed")
    for order, state in completed:
        sid, oid = state.saga_id, order.order_id
        if state.completed_steps != STEP_NAMES or state.compensated_steps:
            problems.add(f"{sid}: steps {state.completed_steps}, undone {state.compensated_steps}")
        for step in STEP_NAMES:
            if evidence.ledger.get(action_key(sid, step)) is None:
                problems.add(f"{sid}: no ledger entry for {step}")
            if evidence.ledger.get(undo_key(sid, step)) is not None:
                problems.add(f"{sid}: {step} was compensated")
        counts = _effect_counts(evidence, oid)
        expected = {"reserved": 1, "released": 0, "paid": 1, "refunded": 0, "shipped": 1}
        expected |= {"cancelled": 0, "confirmation": 1, "cancellation": 0}
        if counts != expected:
            problems.add(f"{sid}: effects {_diff(counts, expected)}")
    return problems.check(
        "completed sagas applied every step exactly once",
        f"{len(completed)} sagas x {len(STEP_NAMES)} steps (ledgers + tables)",
    )


def _effect_counts(evidence: Evidence, order_id: str) -> dict[str, int]:
    reservations = evidence.of("reservations", order_id)
    shipments = evidence.of("shipments", order_id)
    emails = [e["kind"] for e in evidence.of("emails", order_id)]
    return {
        "reserved": len(reservations),
        "released": sum(r["released"] for r in reservations),
        "paid": len(evidence.of("payments", order_id)),
        "refunded": len(evidence.of("refunds", order_id)),
        "shipped": len(shipments),
        "cancelled": sum(s["cancelled"] for s in shipments),
        "confirmation": emails.count("confirmation"),
        "cancellation": emails.count("cancellation"),
    }


def _diff(actual: dict[str, int], expected: dict[str, int]) -> str:
    return ", ".join(f"{k}={actual[k]} (want {v})" for k, v in expected.items() if actual[k] != v)


def _applied(state: SagaState) -> tuple[str, ...]:
    return state.completed_steps + state.uncertain_steps


def _expected_counts(applied: tuple[str, ...], undone: set[str]) -> dict[str, int]:
    def n(step: str, among: Iterable[str]) -> int:
        return int(step in among)

    return {
        "reserved": n("reserve_inventory", applied),
        "released": n("reserve_inventory", undone),
        "paid": n("charge_payment", applied),
        "refunded": n("charge_payment", undone),
        "shipped": n("ship_order", applied),
        "cancelled": n("ship_order", undone),
        "confirmation": n("send_confirmation", applied),
        "cancellation": n("send_confirmation", undone),
    }


def check_failed_compensated(demo: DemoRun, evidence: Evidence) -> Check:
    problems = _Problems()
    failed = _sagas(demo, "failed")
    timed_out = 0
    for order, state in failed:
        sid, applied = state.saga_id, _applied(state)
        if sorted(state.compensated_steps) != sorted(applied):
            problems.add(f"{sid}: applied {applied}, compensated {state.compensated_steps}")
        for step in STEP_NAMES:
            undone = evidence.ledger.get(undo_key(sid, step)) is not None
            if undone != (step in applied):
                problems.add(f"{sid}: {step} applied={step in applied} but compensated={undone}")
        counts = _effect_counts(evidence, order.order_id)
        expected = _expected_counts(applied, set(applied))
        if counts != expected:
            problems.add(f"{sid}: effects {_diff(counts, expected)}")
        if expectation(order).ship_times_out:
            timed_out += 1
            if "ship_order" not in state.uncertain_steps:
                problems.add(f"{sid}: the timed-out shipment is not marked uncertain")
    return problems.check(
        "failed sagas compensated exactly their applied steps",
        f"{len(failed)} sagas, {timed_out} with a timed-out shipment cancelled",
    )


def forward_order(state: SagaState, timeline: list[StepEvent]) -> list[str]:
    """The steps as they were applied, read from the timeline: completions, and the
    final timeout/error of a step whose outcome stayed uncertain."""
    order: list[str] = []
    for event in timeline:
        step = event.step
        if step is None or step in order:
            continue
        if event.event == "completed" or (
            event.event in ("timed_out", "errored") and step in state.uncertain_steps
        ):
            order.append(step)
    return order


def check_reverse_order(demo: DemoRun, evidence: Evidence) -> Check:
    problems = _Problems()
    checked = 0
    for _, state in _sagas(demo, "failed") + _sagas(demo, "stuck"):
        checked += 1
        timeline = demo.timelines.get(state.saga_id, [])
        undone = [e.step for e in timeline if e.event == "compensated"]
        backwards = list(reversed(forward_order(state, timeline)))
        if undone != backwards[: len(undone)] or list(state.compensated_steps) != undone:
            problems.add(f"{state.saga_id}: applied {backwards[::-1]}, undone in order {undone}")
        if undone != _owed(state, timeline, backwards):
            problems.add(f"{state.saga_id}: undid {undone} of {backwards}")
    return problems.check("compensation in reverse order (timeline)", f"{checked} sagas")


def _owed(state: SagaState, timeline: list[StepEvent], backwards: list[str]) -> list[str]:
    """The compensations a terminal saga must have run: all of them when it failed;
    when it is stuck, those before the one that kept failing (none if it is unknown)."""
    if state.status.value != "stuck":
        return backwards
    failing = [e.step for e in timeline if e.event == "compensation_failed"]
    if not failing or failing[-1] not in backwards:
        return []
    return backwards[: backwards.index(failing[-1])]


def check_stuck(demo: DemoRun, evidence: Evidence) -> Check:
    problems = _Problems()
    planned = {saga_id(o.order_id) for o in demo.orders if expectation(o).status == "stuck"}
    stuck = _sagas(demo, "stuck")
    actual = {s.saga_id for _, s in stuck}
    for sid in sorted(planned ^ actual):
        problems.add(f"{sid}: {'not stuck' if sid in planned else 'stuck unexpectedly'}")
    for order, state in stuck:
        problems.items.extend(_stuck_problems(order, state, demo, evidence))
    for sid in sorted(actual - set(demo.alerts)):
        problems.add(f"{sid}: no on_stuck alert seen")
    return problems.check(
        f"stuck sagas are exactly the {STUCK_WAREHOUSE} ones with a failed release",
        f"{len(actual)} stuck, {len(demo.alerts)} alerts",
    )


def _stuck_problems(order: Order, state: SagaState, demo: DemoRun, evidence: Evidence) -> list[str]:
    sid, found = state.saga_id, []
    if order.warehouse != STUCK_WAREHOUSE:
        found.append(f"{sid} is stuck but ships from {order.warehouse}")
    timeline = demo.timelines.get(sid, [])
    failures = [e for e in timeline if e.event == "compensation_failed"]
    if {e.step for e in failures} != {"reserve_inventory"} or len(failures) != 3:
        found.append(f"{sid}: compensation failures {[(e.step, e.attempt) for e in failures]}")
    if evidence.ledger.get(undo_key(sid, "reserve_inventory")) is not None:
        found.append(f"{sid}: release recorded although it failed")
    counts = _effect_counts(evidence, order.order_id)
    undone = set(state.compensated_steps)
    expected = _expected_counts(_applied(state), undone)
    if counts != expected or "reserve_inventory" in undone:
        found.append(f"{sid}: effects {_diff(counts, expected)}, undone {sorted(undone)}")
    return found


def check_stock(demo: DemoRun, evidence: Evidence) -> Check:
    problems = _Problems()
    held: dict[tuple[str, str], int] = defaultdict(int)
    for rows in evidence.rows.get("reservations", {}).values():
        for r in rows:
            if r["released"] not in (0, 1):
                problems.add(f"reservation {r['id']} released {r['released']} times")
            if not r["released"]:
                held[(r["sku"], r["warehouse"])] += r["qty"]
    for location, qty in evidence.stock.items():
        if qty != INITIAL_STOCK - held[location]:
            want = INITIAL_STOCK - held[location]
            problems.add(f"stock {location} is {qty}, want {want}")
    return problems.check(
        "stock conserved (initial = on shelf + held)",
        f"{len(evidence.stock)} locations, {sum(held.values())} units held",
    )


def check_keys(demo: DemoRun, evidence: Evidence) -> Check:
    problems = _Problems()
    known = {o.order_id for o in demo.orders}
    rows = 0
    for table, by_order in evidence.rows.items():
        for order_id, table_rows in by_order.items():
            rows += len(table_rows)
            if order_id not in known:
                problems.add(f"{table}: a row for unknown order {order_id}")
                continue
            for row in table_rows:
                want = _row_key(table, row, saga_id(order_id))
                if row["idempotency_key"] != want:
                    problems.add(f"{table} {row['id']}: key {row['idempotency_key']!r} != {want!r}")
    for order in demo.orders:
        problems.items.extend(_ledger_mismatches(order, evidence))
    return problems.check("idempotency keys stable (rows = ledger)", f"{rows} rows")


def _row_key(table: str, row: Row, sid: str) -> str:
    if table == "refunds":
        return undo_key(sid, "charge_payment")
    if table == "emails" and row["kind"] == "cancellation":
        return undo_key(sid, "send_confirmation")
    step = {"reservations": "reserve_inventory", "payments": "charge_payment"}.get(table)
    step = step or {"shipments": "ship_order", "emails": "send_confirmation"}[table]
    return action_key(sid, step)


def _ledger_mismatches(order: Order, evidence: Evidence) -> list[str]:
    sid, found = saga_id(order.order_id), []
    for step, (table, id_field) in _RESULT_ID.items():
        result = evidence.ledger.get(action_key(sid, step))
        ids = [r["id"] for r in evidence.of(table, order.order_id)]
        if table == "emails":
            kinds = {r["id"]: r["kind"] for r in evidence.of(table, order.order_id)}
            ids = [i for i in ids if kinds[i] == "confirmation"]
        recorded = [] if result is None or result.get(id_field) is None else [result[id_field]]
        if recorded != ids:
            found.append(f"{sid}:{step}: ledger says {recorded}, {table} has {ids}")
    return found


def check_recovery(demo: DemoRun, evidence: Evidence) -> Check:
    recovery = demo.recovery
    in_flight = recovery.in_flight
    open_ = [sid for sid in in_flight if not demo.states[sid].terminal]
    if not in_flight:
        return Check("SIGKILL mid-run, all in-flight sagas recovered", False, "none in flight")
    if open_ or recovery.recovered_at is None:
        detail = f"{len(open_)} of {len(in_flight)} not finished"
        return Check("SIGKILL mid-run, all in-flight sagas recovered", False, detail)
    if recovery.resumed < len(in_flight):  # left leased: finished only once the lease ran out
        missed = len(in_flight) - recovery.resumed
        detail = f"{missed} of {len(in_flight)} not resumed when the new orchestrator started"
        return Check("SIGKILL mid-run, all in-flight sagas recovered", False, detail)
    return Check(
        "SIGKILL mid-run, all in-flight sagas recovered",
        True,
        f"{len(in_flight)} in flight, {recovery.resumed} resumed",
    )
