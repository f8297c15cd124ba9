"""The demo's services: inventory, payment, shipping and notification.

Each one owns a separate database - a SQLite file, or with ``--postgres`` a
PostgreSQL schema of its own - with its own tables and an ``IdempotencyLedger`` in
that same database. Every effect and every compensation
goes through ``ledger.once(key, effect)``, so the key and the effect commit in one
transaction and a repeated call (a retry, a re-run after a crash) applies nothing.

The undo operations deliberately do NOT guard against being applied twice
(``released = released + 1``, a new ``refunds`` row each time): exactly-once is
the ledger's job, and the invariant checks would see a double application.

Each effect is written once, as a coroutine over ``Sql`` (``?`` placeholders): on
PostgreSQL it runs on the ledger's async connection, on SQLite it runs to its end
at once on the ledger's writer thread (nothing in it waits).

In this first version the services are in-process components of the orchestrator
process; later versions put each behind HTTP and NATS.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from seamwork.errors import ConfigError
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


class Sql(Protocol):
    """The statements of one effect, in the ledger's transaction (``?`` placeholders)."""

    async def rows(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """Run ``sql``; its rows (none for a statement that returns none)."""
        ...

    async def count(self, sql: str, params: Sequence[Any] = ()) -> int:
        """Run ``sql``; how many rows it changed."""
        ...


Effect = Callable[[Sql], Coroutine[Any, Any, Row]]


class _SQLiteSql:
    """``Sql`` on the SQLite ledger's connection: plain blocking calls on its writer
    thread, so an effect's coroutine never waits (``_at_once`` runs it)."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    async def rows(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return self.conn.execute(sql, tuple(params)).fetchall()

    async def count(self, sql: str, params: Sequence[Any] = ()) -> int:
        return self.conn.execute(sql, tuple(params)).rowcount


class _PgSql:
    """``Sql`` on the PostgreSQL ledger's transaction (``%s`` placeholders)."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn  # a psycopg.AsyncConnection (psycopg is imported only for it)

    async def rows(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        cursor = await self.conn.execute(pg_sql(sql).encode(), tuple(params))
        return list(await cursor.fetchall()) if cursor.description else []

    async def count(self, sql: str, params: Sequence[Any] = ()) -> int:
        cursor = await self.conn.execute(pg_sql(sql).encode(), tuple(params))
        return int(cursor.rowcount)


def pg_sql(sql: str) -> str:
    """The demo's SQL (``?`` placeholders, none in a literal) for psycopg (``%s``)."""
    return sql.replace("?", "%s")


def _at_once(coroutine: Coroutine[Any, Any, Row]) -> Row:
    """The result of a coroutine that never waits (an effect on ``_SQLiteSql``)."""
    try:
        coroutine.send(None)
    except StopIteration as done:
        result: Row = done.value
        return result
    coroutine.close()
    raise RuntimeError("a SQLite effect waited on something: it must not")


class _Service:
    """A component with its own database - a SQLite file or a PostgreSQL schema -
    and its idempotency ledger in it."""

    name = "service"
    schema: tuple[str, ...] = ()

    def __init__(self, path: str | Path | None = None, *, postgres: str | None = None) -> None:
        if (path is None) == (postgres is None):
            raise ConfigError("a demo service takes a SQLite path or a PostgreSQL DSN, not both")
        self.postgres = postgres is not None
        self.ledger = (
            IdempotencyLedger.postgres(postgres)
            if postgres is not None
            else IdempotencyLedger.sqlite(str(path))
        )

    async def setup(self) -> None:
        """Create this service's tables (idempotent)."""
        key = "serial PRIMARY KEY" if self.postgres else "INTEGER PRIMARY KEY"

        async def create(sql: Sql) -> Row:
            for statement in self.schema:
                await sql.count(statement.format(id=key))
            return {}

        await self.ledger.transaction(self._bound(create))

    async def once(self, key: str, effect: Effect) -> Row:
        """``effect`` applied once for ``key`` (the ledger's ``once``)."""
        return await self.ledger.once(key, self._bound(effect))

    def _bound(self, effect: Effect) -> Callable[[Any], Any]:
        if self.postgres:
            return lambda conn: effect(_PgSql(conn))
        return lambda conn: _at_once(effect(_SQLiteSql(conn)))

    async def aclose(self) -> None:
        await self.ledger.aclose()


class InventoryService(_Service):
    """Stock per (sku, warehouse) and reservations against it."""

    name = "inventory"
    schema = (
        "CREATE TABLE IF NOT EXISTS stock (sku TEXT NOT NULL, warehouse TEXT NOT NULL,"
        " qty INTEGER NOT NULL, PRIMARY KEY (sku, warehouse))",
        "CREATE TABLE IF NOT EXISTS reservations (id {id},"
        " order_id TEXT NOT NULL, sku TEXT NOT NULL, warehouse TEXT NOT NULL,"
        " qty INTEGER NOT NULL, released INTEGER NOT NULL DEFAULT 0,"
        " idempotency_key TEXT NOT NULL)",
        "CREATE INDEX IF NOT EXISTS reservations_by_order ON reservations(order_id)",
    )

    async def stock_up(self, items: Iterable[tuple[str, str]], qty: int) -> None:
        """Set the stock of each (sku, warehouse) to ``qty``."""
        rows = [(sku, warehouse, qty) for sku, warehouse in items]

        async def fill(sql: Sql) -> Row:
            for row in rows:
                await sql.count(
                    "INSERT INTO stock (sku, warehouse, qty) VALUES (?, ?, ?)"
                    " ON CONFLICT (sku, warehouse) DO UPDATE SET qty = excluded.qty",
                    row,
                )
            return {}

        await self.ledger.transaction(self._bound(fill))

    async def reserve(self, key: str, order: Row) -> Row:
        async def effect(sql: Sql) -> Row:
            args = (order["qty"], order["sku"], order["warehouse"], order["qty"])
            updated = await sql.count(
                "UPDATE stock SET qty = qty - ? WHERE sku = ? AND warehouse = ? AND qty >= ?", args
            )
            if updated != 1:
                return {"reservation_id": None, "reason": "out of stock"}
            ((rid,),) = await sql.rows(
                "INSERT INTO reservations (order_id, sku, warehouse, qty, idempotency_key)"
                " VALUES (?, ?, ?, ?, ?) RETURNING id",
                (order["order_id"], order["sku"], order["warehouse"], order["qty"], key),
            )
            return {"reservation_id": rid}

        return await self.once(key, effect)

    async def release(self, key: str, order: Row) -> Row:
        if order["warehouse"] == STUCK_WAREHOUSE:
            raise WarehouseUnavailable(f"warehouse {STUCK_WAREHOUSE} does not answer")

        async def effect(sql: Sql) -> Row:
            rows = await sql.rows(
                "SELECT id, sku, warehouse, qty FROM reservations WHERE order_id = ?",
                (order["order_id"],),
            )
            for rid, sku, warehouse, qty in rows:
                await sql.count(
                    "UPDATE reservations SET released = released + 1 WHERE id = ?", (rid,)
                )
                await sql.count(
                    "UPDATE stock SET qty = qty + ? WHERE sku = ? AND warehouse = ?",
                    (qty, sku, warehouse),
                )
            return {"released": len(rows)}

        return await self.once(key, effect)


class PaymentService(_Service):
    """Charges and refunds. A charge to the declined test card is refused."""

    name = "payment"
    schema = (
        "CREATE TABLE IF NOT EXISTS payments (id {id}, order_id TEXT NOT NULL,"
        " amount_cents INTEGER NOT NULL, idempotency_key TEXT NOT NULL)",
        "CREATE INDEX IF NOT EXISTS payments_by_order ON payments(order_id)",
        "CREATE TABLE IF NOT EXISTS refunds (id {id}, order_id TEXT NOT NULL,"
        " payment_id INTEGER NOT NULL, amount_cents INTEGER NOT NULL,"
        " idempotency_key TEXT NOT NULL)",
        "CREATE INDEX IF NOT EXISTS refunds_by_order ON refunds(order_id)",
    )

    async def charge(self, key: str, order: Row) -> Row:
        """Charge the order; a decline is recorded too, so asking again gives the same answer."""

        async def effect(sql: Sql) -> Row:
            if order["card"] == DECLINED_CARD:
                return {"payment_id": None, "declined": "card declined"}
            ((pid,),) = await sql.rows(
                "INSERT INTO payments (order_id, amount_cents, idempotency_key) VALUES (?, ?, ?)"
                " RETURNING id",
                (order["order_id"], order["amount_cents"], key),
            )
            return {"payment_id": pid}

        return await self.once(key, effect)

    async def refund(self, key: str, order: Row) -> Row:
        async def effect(sql: Sql) -> Row:
            rows = await sql.rows(
                "SELECT id, amount_cents FROM payments WHERE order_id = ?", (order["order_id"],)
            )
            for pid, amount in rows:
                await sql.count(
                    "INSERT INTO refunds (order_id, payment_id, amount_cents, idempotency_key)"
                    " VALUES (?, ?, ?, ?)",
                    (order["order_id"], pid, amount, key),
                )
            return {"refunded": len(rows)}

        return await self.once(key, effect)


class ShippingService(_Service):
    """Shipments. The slow carrier accepts a shipment, then hangs before answering."""

    name = "shipping"
    schema = (
        "CREATE TABLE IF NOT EXISTS shipments (id {id}, order_id TEXT NOT NULL,"
        " carrier TEXT NOT NULL, cancelled INTEGER NOT NULL DEFAULT 0,"
        " idempotency_key TEXT NOT NULL)",
        "CREATE INDEX IF NOT EXISTS shipments_by_order ON shipments(order_id)",
    )

    def __init__(
        self,
        path: str | Path | None = None,
        *,
        postgres: str | None = None,
        slow_answer: float = 3.0,
    ) -> None:
        super().__init__(path, postgres=postgres)
        self.slow_answer = slow_answer

    async def ship(self, key: str, order: Row) -> Row:
        async def effect(sql: Sql) -> Row:
            ((sid,),) = await sql.rows(
                "INSERT INTO shipments (order_id, carrier, idempotency_key) VALUES (?, ?, ?)"
                " RETURNING id",
                (order["order_id"], order["carrier"], key),
            )
            return {"shipment_id": sid}

        result = await self.once(key, effect)
        if order["carrier"] == SLOW_CARRIER:
            # The shipment exists now; the caller just never hears back in time.
            await asyncio.sleep(self.slow_answer)
        return result

    async def cancel(self, key: str, order: Row) -> Row:
        async def effect(sql: Sql) -> Row:
            cancelled = await sql.count(
                "UPDATE shipments SET cancelled = cancelled + 1 WHERE order_id = ?",
                (order["order_id"],),
            )
            return {"cancelled": cancelled}

        return await self.once(key, effect)


class NotificationService(_Service):
    """Emails sent to customers."""

    name = "notification"
    schema = (
        "CREATE TABLE IF NOT EXISTS emails (id {id}, order_id TEXT NOT NULL,"
        " kind TEXT NOT NULL, recipient TEXT NOT NULL, idempotency_key TEXT NOT NULL)",
        "CREATE INDEX IF NOT EXISTS emails_by_order ON emails(order_id)",
    )

    async def send(self, key: str, order: Row, kind: str) -> Row:
        async def effect(sql: Sql) -> Row:
            ((eid,),) = await sql.rows(
                "INSERT INTO emails (order_id, kind, recipient, idempotency_key)"
                " VALUES (?, ?, ?, ?) RETURNING id",
                (order["order_id"], kind, order["email"], key),
            )
            return {"email_id": eid}

        return await self.once(key, effect)


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

    @classmethod
    def on_postgres(cls, dsn_for: Callable[[str], str], *, slow_answer: float = 3.0) -> Services:
        """Each service on its own PostgreSQL schema: ``dsn_for(name)`` connects to it."""
        return cls(
            InventoryService(postgres=dsn_for("inventory")),
            PaymentService(postgres=dsn_for("payment")),
            ShippingService(postgres=dsn_for("shipping"), slow_answer=slow_answer),
            NotificationService(postgres=dsn_for("notification")),
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
