"""The demo's services: inventory, payment, shipping and notification.

Each one owns a separate SQLite database with its own tables and an
``IdempotencyLedger`` in that same database. Every effect and every compensation
goes through ``ledger.once(key, effect)``, so the key and the effect commit in one
transaction and a repeated call (a retry, a re-run after a crash) applies nothing.

The undo operations deliberately do NOT guard against being applied twice
(``released = released + 1``, a new ``refunds`` row each time): exactly-once is
the ledger's job, and the invariant checks would see a double application.

In this first version the services are in-process components of the orchestrator
process; later versions put each behind HTTP and NATS.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from seamwork.saga import IdempotencyLedger

STUCK_WAREHOUSE = "W-13"
DECLINED_CARD = "4000-0000-0000-0002"
SLOW_CARRIER = "slowpost"
INITIAL_STOCK = 100_000

Row = dict[str, Any]


class WarehouseUnavailable(Exception):
    """The warehouse system does not answer: a release cannot be recorded."""


@dataclass(frozen=True, slots=True)
class Order:
    """One order of the scenario, as the saga's start data carries it."""

    order_id: str
    sku: str
    warehouse: str
    qty: int
    amount_cents: int
    card: str
    carrier: str
    email: str

    def as_data(self) -> Row:
        return {
            "order_id": self.order_id,
            "sku": self.sku,
            "warehouse": self.warehouse,
            "qty": self.qty,
            "amount_cents": self.amount_cents,
            "card": self.card,
            "carrier": self.carrier,
            "email": self.email,
        }


class _Service:
    """A component with its own SQLite database and idempotency ledger."""

    name = "service"
    schema: tuple[str, ...] = ()

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.ledger = IdempotencyLedger.sqlite(path)

    async def setup(self) -> None:
        """Create this service's tables (idempotent)."""

        def create(conn: sqlite3.Connection) -> None:
            for statement in self.schema:
                conn.execute(statement)

        await self.ledger.transaction(create)

    async def aclose(self) -> None:
        await self.ledger.aclose()


class InventoryService(_Service):
    """Stock per (sku, warehouse) and reservations against it."""

    name = "inventory"
    schema = (
        "CREATE TABLE IF NOT EXISTS stock (sku TEXT NOT NULL, warehouse TEXT NOT NULL,"
        " qty INTEGER NOT NULL, PRIMARY KEY (sku, warehouse))",
        "CREATE TABLE IF NOT EXISTS reservations (id INTEGER PRIMARY KEY,"
        " order_id TEXT NOT NULL, sku TEXT NOT NULL, warehouse TEXT NOT NULL,"
        " qty INTEGER NOT NULL, released INTEGER NOT NULL DEFAULT 0,"
        " idempotency_key TEXT NOT NULL)",
        "CREATE INDEX IF NOT EXISTS reservations_by_order ON reservations(order_id)",
    )

    async def stock_up(self, items: Iterable[tuple[str, str]], qty: int) -> None:
        """Set the stock of each (sku, warehouse) to ``qty``."""
        rows = [(sku, warehouse, qty) for sku, warehouse in items]

        def fill(conn: sqlite3.Connection) -> None:
            conn.executemany(
                "INSERT INTO stock (sku, warehouse, qty) VALUES (?, ?, ?)"
                " ON CONFLICT DO UPDATE SET qty = excluded.qty",
                rows,
            )

        await self.ledger.transaction(fill)

    async def reserve(self, key: str, order: Row) -> Row:
        def effect(conn: sqlite3.Connection) -> Row:
            args = (order["qty"], order["sku"], order["warehouse"], order["qty"])
            updated = conn.execute(
                "UPDATE stock SET qty = qty - ? WHERE sku = ? AND warehouse = ? AND qty >= ?", args
            )
            if updated.rowcount != 1:
                return {"reservation_id": None, "reason": "out of stock"}
            cursor = conn.execute(
                "INSERT INTO reservations (order_id, sku, warehouse, qty, idempotency_key)"
                " VALUES (?, ?, ?, ?, ?)",
                (order["order_id"], order["sku"], order["warehouse"], order["qty"], key),
            )
            return {"reservation_id": cursor.lastrowid}

        return await self.ledger.once(key, effect)

    async def release(self, key: str, order: Row) -> Row:
        if order["warehouse"] == STUCK_WAREHOUSE:
            raise WarehouseUnavailable(f"warehouse {STUCK_WAREHOUSE} does not answer")

        def effect(conn: sqlite3.Connection) -> Row:
            rows = conn.execute(
                "SELECT id, sku, warehouse, qty FROM reservations WHERE order_id = ?",
                (order["order_id"],),
            ).fetchall()
            for rid, sku, warehouse, qty in rows:
                conn.execute("UPDATE reservations SET released = released + 1 WHERE id = ?", (rid,))
                conn.execute(
                    "UPDATE stock SET qty = qty + ? WHERE sku = ? AND warehouse = ?",
                    (qty, sku, warehouse),
                )
            return {"released": len(rows)}

        return await self.ledger.once(key, effect)


class PaymentService(_Service):
    """Charges and refunds. A charge to the declined test card is refused."""

    name = "payment"
    schema = (
        "CREATE TABLE IF NOT EXISTS payments (id INTEGER PRIMARY KEY, order_id TEXT NOT NULL,"
        " amount_cents INTEGER NOT NULL, idempotency_key TEXT NOT NULL)",
        "CREATE INDEX IF NOT EXISTS payments_by_order ON payments(order_id)",
        "CREATE TABLE IF NOT EXISTS refunds (id INTEGER PRIMARY KEY, order_id TEXT NOT NULL,"
        " payment_id INTEGER NOT NULL, amount_cents INTEGER NOT NULL,"
        " idempotency_key TEXT NOT NULL)",
        "CREATE INDEX IF NOT EXISTS refunds_by_order ON refunds(order_id)",
    )

    async def charge(self, key: str, order: Row) -> Row:
        """Charge the order; a decline is recorded too, so asking again gives the same answer."""

        def effect(conn: sqlite3.Connection) -> Row:
            if order["card"] == DECLINED_CARD:
                return {"payment_id": None, "declined": "card declined"}
            cursor = conn.execute(
                "INSERT INTO payments (order_id, amount_cents, idempotency_key) VALUES (?, ?, ?)",
                (order["order_id"], order["amount_cents"], key),
            )
            return {"payment_id": cursor.lastrowid}

        return await self.ledger.once(key, effect)

    async def refund(self, key: str, order: Row) -> Row:
        def effect(conn: sqlite3.Connection) -> Row:
            rows = conn.execute(
                "SELECT id, amount_cents FROM payments WHERE order_id = ?", (order["order_id"],)
            ).fetchall()
            conn.executemany(
                "INSERT INTO refunds (order_id, payment_id, amount_cents, idempotency_key)"
                " VALUES (?, ?, ?, ?)",
                [(order["order_id"], pid, amount, key) for pid, amount in rows],
            )
            return {"refunded": len(rows)}

        return await self.ledger.once(key, effect)


class ShippingService(_Service):
    """Shipments. The slow carrier accepts a shipment, then hangs before answering."""

    name = "shipping"
    schema = (
        "CREATE TABLE IF NOT EXISTS shipments (id INTEGER PRIMARY KEY, order_id TEXT NOT NULL,"
        " carrier TEXT NOT NULL, cancelled INTEGER NOT NULL DEFAULT 0,"
        " idempotency_key TEXT NOT NULL)",
        "CREATE INDEX IF NOT EXISTS shipments_by_order ON shipments(order_id)",
    )

    def __init__(self, path: str | Path, *, slow_answer: float = 3.0) -> None:
        super().__init__(path)
        self.slow_answer = slow_answer

    async def ship(self, key: str, order: Row) -> Row:
        def effect(conn: sqlite3.Connection) -> Row:
            cursor = conn.execute(
                "INSERT INTO shipments (order_id, carrier, idempotency_key) VALUES (?, ?, ?)",
                (order["order_id"], order["carrier"], key),
            )
            return {"shipment_id": cursor.lastrowid}

        result = await self.ledger.once(key, effect)
        if order["carrier"] == SLOW_CARRIER:
            # The shipment exists now; the caller just never hears back in time.
            await asyncio.sleep(self.slow_answer)
        return result

    async def cancel(self, key: str, order: Row) -> Row:
        def effect(conn: sqlite3.Connection) -> Row:
            cursor = conn.execute(
                "UPDATE shipments SET cancelled = cancelled + 1 WHERE order_id = ?",
                (order["order_id"],),
            )
            return {"cancelled": cursor.rowcount}

        return await self.ledger.once(key, effect)


class NotificationService(_Service):
    """Emails sent to customers."""

    name = "notification"
    schema = (
        "CREATE TABLE IF NOT EXISTS emails (id INTEGER PRIMARY KEY, order_id TEXT NOT NULL,"
        " kind TEXT NOT NULL, recipient TEXT NOT NULL, idempotency_key TEXT NOT NULL)",
        "CREATE INDEX IF NOT EXISTS emails_by_order ON emails(order_id)",
    )

    async def send(self, key: str, order: Row, kind: str) -> Row:
        def effect(conn: sqlite3.Connection) -> Row:
            cursor = conn.execute(
                "INSERT INTO emails (order_id, kind, recipient, idempotency_key)"
                " VALUES (?, ?, ?, ?)",
                (order["order_id"], kind, order["email"], key),
            )
            return {"email_id": cursor.lastrowid}

        return await self.ledger.once(key, effect)


@dataclass(frozen=True, slots=True)
class Services:
    """The four services of the demo, each on its own database in ``directory``."""

    inventory: InventoryService
    payment: PaymentService
    shipping: ShippingService
    notification: NotificationService

    @classmethod
    def in_directory(cls, directory: str | Path, *, slow_answer: float = 3.0) -> Services:
        base = Path(directory)
        return cls(
            InventoryService(base / "inventory.db"),
            PaymentService(base / "payment.db"),
            ShippingService(base / "shipping.db", slow_answer=slow_answer),
            NotificationService(base / "notification.db"),
        )

    @property
    def all(self) -> tuple[_Service, ...]:
        return (self.inventory, self.payment, self.shipping, self.notification)

    async def setup(self) -> None:
        for service in self.all:
            await service.setup()

    async def aclose(self) -> None:
        for service in self.all:
            await service.aclose()
