"""Act two of ``seamwork demo``: the same order saga, choreographed over NATS.

Four services (``choreography``), each with its own database (a SQLite file, or with
``--postgres`` a PostgreSQL schema), outbox, inbox and relay, react to each other's
events on an embedded ``nats-server`` (or with ``--nats`` the user's, under the run's
own subjects and groups); nothing orchestrates them. The flow monitor rebuilds every
order's flow from the messages' correlation and causation ids, and the checks compare
that view with each service's own tables.
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.table import Table

from seamwork.brokers import EmbeddedNats, NatsBroker
from seamwork.demo.choreography import CARD_LIMIT, TERMINAL, running
from seamwork.demo.invariants import Check
from seamwork.demo.scenario import DemoError
from seamwork.demo.servers import NatsRun, PgRun
from seamwork.messaging import DeadLetter, Flow

SUCCESS = (
    "OrderCreated",
    "InventoryReserved",
    "PaymentProcessed",
    "NotificationSent",
    "OrderCompleted",
)
DECLINED = (
    "OrderCreated",
    "InventoryReserved",
    "PaymentFailed",
    "InventoryReleased",
    "OrderCancelled",
)
NO_STOCK = ("OrderCreated", "InventoryFailed", "OrderCancelled")
_FILES = ("orders", "inventory", "payment", "notification")
SETTLE_SECONDS = 60.0
"""How long every order's flow may take to reach its end state."""


@dataclass(frozen=True, slots=True)
class PlannedOrder:
    order_id: str
    sku: str
    qty: int
    amount: int

    @property
    def expected(self) -> tuple[str, ...]:
        if self.sku == "lamp":
            return NO_STOCK
        return DECLINED if self.amount > CARD_LIMIT else SUCCESS


@dataclass(slots=True)
class ChoreographyRun:
    orders: list[PlannedOrder]
    flows: dict[str, Flow]
    stock: dict[str, int]
    boot_ms: float | None  # None: a NATS server of the user's (--nats)
    seconds: float
    directory: Path
    dead_letters: list[DeadLetter] = field(default_factory=list)
    pg: PgRun | None = None
    nats: NatsRun | None = None


def plan(count: int) -> list[PlannedOrder]:
    """Every 5th order's card is declined; every 7th wants 5 lamps (2 in stock)."""
    orders = []
    for n in range(count):
        order_id = f"choreo-{n:04d}"
        if n % 7 == 5:
            orders.append(PlannedOrder(order_id, "lamp", 5, 80))
        elif n % 5 == 3:
            orders.append(PlannedOrder(order_id, "book", 1, CARD_LIMIT * 5))
        else:
            orders.append(PlannedOrder(order_id, "book", 1, 20 + n % 30))
    return orders


def prepare(directory: Path) -> None:
    """A fresh directory for the four services' databases."""
    directory.mkdir(parents=True, exist_ok=True)
    for name in _FILES:
        for suffix in (".db", ".db-wal", ".db-shm"):
            (directory / f"{name}{suffix}").unlink(missing_ok=True)


async def run_choreography(
    directory: Path, count: int, *, pg: PgRun | None = None, nats: NatsRun | None = None
) -> ChoreographyRun:
    """Place ``count`` orders until every flow settled and the monitor saw every message
    the services sent. The services' databases are in ``directory`` (see ``prepare``),
    or with ``pg`` the run's ``choreo_*`` schemas; the messages go through an embedded
    nats-server, or with ``nats`` through that server under the run's own names."""
    orders = plan(count)
    stock = {"book": count, "lamp": 2}
    dsn_for = None if pg is None else (lambda name: pg.dsn_for(f"choreo_{name}"))
    async with (
        _server(nats) as (url, boot_ms),
        running(directory, url, stock, dsn_for=dsn_for, nats_run=nats) as system,
    ):
        started = time.perf_counter()
        for order in orders:
            await system.place_order(order.order_id, order.sku, order.qty, order.amount)
        try:
            await system.settled(*(o.order_id for o in orders), seconds=SETTLE_SECONDS)
        except TimeoutError:
            letters = await _dead_letters(url, nats)
            raise DemoError(_unsettled(system.monitor.flows(), orders, letters)) from None
        seconds = time.perf_counter() - started
        with contextlib.suppress(TimeoutError):  # a message never seen fails the checks
            await system.drained()
        flows = system.monitor.flows()
        letters = await _dead_letters(url, nats)
    return ChoreographyRun(
        orders, flows, stock, boot_ms, seconds, directory, letters, pg=pg, nats=nats
    )


@contextlib.asynccontextmanager
async def _server(nats: NatsRun | None) -> AsyncIterator[tuple[str, float | None]]:
    """The NATS server's URL and boot time: an embedded one, or the user's."""
    if nats is not None:
        yield nats.url, None
        return
    async with EmbeddedNats() as server:
        yield server.url, (server.boot_seconds or 0.0) * 1e3


async def _dead_letters(url: str, nats: NatsRun | None) -> list[DeadLetter]:
    """What the services' consumer groups gave up on (a message that kept failing);
    on a shared server, only the run's own."""
    if nats is not None:
        return await nats.dead_letters()
    reader = NatsBroker(url, name="dead-letter-reader")
    try:
        letters: list[DeadLetter] = await reader.dead_letters(limit=1000)
        return letters
    finally:
        await reader.aclose()


def _letters(letters: list[DeadLetter]) -> str:
    first = letters[0]
    return (
        f"{len(letters)}, e.g. {first.message.type} on {first.subject} "
        f"({first.group}): {first.error.splitlines()[0] if first.error else '?'}"
    )


def _unsettled(
    flows: dict[str, Flow], orders: list[PlannedOrder], letters: list[DeadLetter]
) -> str:
    ended = set(TERMINAL.values())
    late = [
        o.order_id
        for o in orders
        if o.order_id not in flows or flows[o.order_id].status not in ended
    ]
    return (
        f"act two: {len(late)} of {len(orders)} choreographed orders did not reach an end "
        f"state within {SETTLE_SECONDS:g}s, e.g. {', '.join(late[:3])}"
        + (f"; messages dead-lettered: {_letters(letters)}" if letters else "")
    )


def check(run: ChoreographyRun) -> list[Check]:
    """The invariants of the choreographed run, against each service's own tables."""
    orders = {o.order_id: o for o in run.orders}
    paths = {oid: _path(run.flows.get(oid)) for oid in orders}
    wrong = [oid for oid, o in orders.items() if paths[oid] != o.expected]
    status = dict(_own_rows(run, "orders", "SELECT id, status FROM orders"))
    expected_status = {oid: _final(o) for oid, o in orders.items()}
    mismatched = [oid for oid in orders if status.get(oid) != expected_status[oid]]
    charged = dict(_own_rows(run, "payment", "SELECT order_id, status FROM payments"))
    bad_payments = [oid for oid, o in orders.items() if charged.get(oid) != _payment(o)]
    available = dict(_own_rows(run, "inventory", "SELECT sku, available FROM stock"))
    held = Counter[str]()
    for sku, qty in _own_rows(
        run, "inventory", "SELECT sku, qty FROM reservations WHERE status = 'reserved'"
    ):
        held[sku] += qty
    conserved = all(available.get(s, -1) + held[s] == n for s, n in run.stock.items())
    notified = {
        row[0] for row in _own_rows(run, "notification", "SELECT order_id FROM notifications")
    }
    to_notify = {oid for oid, o in orders.items() if o.expected == SUCCESS}
    wrongly_notified = sorted(notified ^ to_notify)
    reservations = dict(_own_rows(run, "inventory", "SELECT order_id, status FROM reservations"))
    bad_reservations = [
        oid for oid, o in orders.items() if reservations.get(oid) != _reservation(o)
    ]
    unsent = "SELECT count(*) FROM seamwork_outbox WHERE sent_at IS NULL"
    pending = sum(_own_rows(run, n, unsent)[0][0] for n in _FILES)
    return [
        Check("every flow follows its planned path", not wrong, _some(wrong) or f"{len(orders)}"),
        Check("orders' own status matches the flow", not mismatched, _some(mismatched) or "all"),
        Check(
            "payments charged or declined as planned",
            not bad_payments,
            _some(bad_payments) or "all",
        ),
        Check("stock conserved (available + reserved)", conserved, f"{available} + {dict(held)}"),
        Check(
            "reservations held or released as planned",
            not bad_reservations,
            _some(bad_reservations) or "all",
        ),
        Check(
            "a notification for each completed order only",
            not wrongly_notified,
            _some(wrongly_notified) or f"{len(notified)}",
        ),
        Check("no message left in any outbox", pending == 0, f"{pending} pending"),
        Check(
            "no message dead-lettered",
            not run.dead_letters,
            _letters(run.dead_letters) if run.dead_letters else "0",
        ),
    ]


def summary(run: ChoreographyRun) -> Table:
    outcomes = Counter(f.status for o in run.orders if (f := run.flows.get(o.order_id)))
    kinds = Counter(
        o.expected
        for o in run.orders
        if (f := run.flows.get(o.order_id)) is not None and f.status == "cancelled"
    )
    table = Table(
        title="seamwork demo: the order saga choreographed over NATS",
        show_header=False,
        title_justify="left",
    )
    table.add_column("what", style="bold")
    table.add_column("value", justify="right")
    table.add_row("orders", str(len(run.orders)))
    table.add_row("[green]completed", str(outcomes["completed"]))
    table.add_row(
        "[yellow]cancelled",
        f"{outcomes['cancelled']}  ({kinds[DECLINED]} declined, {kinds[NO_STOCK]} out of stock)",
    )
    if run.boot_ms is None and run.nats is not None:
        table.add_row("NATS server", f"{run.nats.shown_url} ({run.nats.prefix}>)")
    else:
        table.add_row("embedded nats-server boot", f"{run.boot_ms or 0:.0f} ms")
    table.add_row("all flows settled in", f"{run.seconds:.2f} s")
    return table


def _final(order: PlannedOrder) -> str:
    return "completed" if order.expected == SUCCESS else "cancelled"


def _payment(order: PlannedOrder) -> str | None:
    if order.expected == NO_STOCK:
        return None
    return "charged" if order.expected == SUCCESS else "declined"


def _reservation(order: PlannedOrder) -> str | None:
    if order.expected == NO_STOCK:
        return None
    return "reserved" if order.expected == SUCCESS else "released"


def _path(flow: Flow | None) -> tuple[str, ...] | None:
    """The flow's message types in causal order; None for a flow the monitor never saw."""
    return None if flow is None else tuple(step.type for step in flow.steps)


def _own_rows(run: ChoreographyRun, service: str, sql: str) -> list[tuple[Any, ...]]:
    """The rows of ``sql`` in the service's own database (SQLite file or schema)."""
    if run.pg is None:
        return _rows(run.directory / f"{service}.db", sql)
    import psycopg

    with psycopg.connect(run.pg.dsn_for(f"choreo_{service}")) as pg:
        return pg.execute(sql.encode()).fetchall()


def _rows(path: Path, sql: str) -> list[tuple[Any, ...]]:
    # closing(): ``with sqlite3.connect()`` alone commits and leaves the connection open
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as conn:
        return conn.execute(sql).fetchall()


def _some(ids: Iterable[str]) -> str:
    listed = list(ids)
    return "" if not listed else f"{len(listed)} wrong, e.g. {', '.join(listed[:3])}"
