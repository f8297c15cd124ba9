"""The order example's read side (CQRS): ``OrderSummary`` and ``get_order``.

The write side appends an order's events to the stream ``order-<id>``:

=====================  ==========================================  ================
event                  data                                        status after it
=====================  ==========================================  ================
``OrderCreated``       ``order_id``, ``customer``, ``items``        ``created``
                       (``[{"sku", "quantity", "price"}]``),
                       ``total`` (optional: summed from items)
``InventoryReserved``  -                                           ``reserved``
``PaymentProcessed``   ``amount`` (optional)                       ``paid``
``PaymentFailed``      ``reason``                                  ``payment_failed``
``OrderShipped``       ``carrier``, ``tracking`` (optional)        ``shipped``
``OrderCancelled``     ``reason``                                  ``cancelled``
``OrderCompleted``     -                                           ``completed``
=====================  ==========================================  ================

``OrderSummary`` folds them into one ``order_summary`` row per order in a SQLite
read model, in the same transaction as the projection's checkpoint. Every handler is
also idempotent on its own (a row remembers the position of the last event applied
and ignores anything at or before it), so the projection is safe even where
delivery is at-least-once. ``get_order`` answers what ``GET /orders/{id}`` returns.

Run it::

    runner = ProjectionRunner(store, OrderSummary(), SQLiteReadModel("orders-read.db"))
    await runner.catch_up()            # or: async with runner: ... (live)
    order = await get_order(read_model, "42")
"""

from __future__ import annotations

import json
import sqlite3
from typing import Any

from seamwork.events import Projection, RecordedEvent, handles
from seamwork.storage import SQLiteReadModel

STREAM_PREFIX = "order-"

_STATUS_BY_EVENT = {
    "InventoryReserved": "reserved",
    "PaymentProcessed": "paid",
    "PaymentFailed": "payment_failed",
    "OrderShipped": "shipped",
    "OrderCancelled": "cancelled",
    "OrderCompleted": "completed",
}


def order_id_of(event: RecordedEvent) -> str:
    """The order an event belongs to: ``data["order_id"]``, else from the stream name."""
    given = event.data.get("order_id")
    if given is not None:
        return str(given)
    return event.stream.removeprefix(STREAM_PREFIX)


class OrderSummary(Projection):
    """One row per order: id, customer, status, total, items, updated position."""

    name = "order_summary"

    def setup(self, conn: sqlite3.Connection) -> None:
        conn.execute(
            """CREATE TABLE IF NOT EXISTS order_summary (
                id TEXT PRIMARY KEY,
                customer TEXT NOT NULL,
                status TEXT NOT NULL,
                total REAL NOT NULL,
                items TEXT NOT NULL,
                updated_position INTEGER NOT NULL
            )"""
        )

    def reset(self, conn: sqlite3.Connection) -> None:
        conn.execute("DELETE FROM order_summary")

    @handles("OrderCreated")
    def created(self, event: RecordedEvent, conn: sqlite3.Connection) -> None:
        items = list(event.data.get("items", []))
        total = event.data.get("total")
        if total is None:
            total = sum(item["price"] * item.get("quantity", 1) for item in items)
        conn.execute(
            "INSERT INTO order_summary (id, customer, status, total, items, updated_position) "
            "VALUES (?, ?, 'created', ?, ?, ?) ON CONFLICT(id) DO NOTHING",
            (
                order_id_of(event),
                str(event.data["customer"]),
                total,
                json.dumps(items, separators=(",", ":")),
                event.position,
            ),
        )

    @handles(*_STATUS_BY_EVENT)
    def status_changed(self, event: RecordedEvent, conn: sqlite3.Connection) -> None:
        conn.execute(
            "UPDATE order_summary SET status = ?, updated_position = ? "
            "WHERE id = ? AND updated_position < ?",
            (_STATUS_BY_EVENT[event.type], event.position, order_id_of(event), event.position),
        )


async def get_order(read_model: SQLiteReadModel, order_id: str) -> dict[str, Any] | None:
    """The order as ``GET /orders/{id}`` returns it, or None (a 404)."""
    rows = await read_model.query(
        "SELECT id, customer, status, total, items, updated_position "
        "FROM order_summary WHERE id = ?",
        (order_id,),
    )
    if not rows:
        return None
    row = rows[0]
    return {
        "id": row["id"],
        "customer": row["customer"],
        "status": row["status"],
        "total": row["total"],
        "items": json.loads(row["items"]),
        "updated_position": row["updated_position"],
    }
