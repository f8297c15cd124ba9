"""The order example's read side: ``OrderSummary`` answers ``GET /orders/{id}``."""

from __future__ import annotations

import sqlite3
import sys
from collections.abc import AsyncIterator
from contextlib import closing
from pathlib import Path

import pytest

from seamwork.events import EventStore, NewEvent, ProjectionRunner
from seamwork.storage import SQLiteReadModel

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))

from order_system.order_query import OrderSummary, get_order

ITEMS = [{"sku": "book", "quantity": 2, "price": 12.5}, {"sku": "pen", "quantity": 1, "price": 5}]


def created(order_id: str, customer: str = "ada") -> NewEvent:
    return NewEvent("OrderCreated", {"order_id": order_id, "customer": customer, "items": ITEMS})


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[EventStore]:
    async with EventStore.sqlite(tmp_path / "orders.db") as store:
        yield store


@pytest.fixture
async def read_model(tmp_path: Path) -> AsyncIterator[SQLiteReadModel]:
    model = SQLiteReadModel(tmp_path / "orders-read.db")
    await model.open()
    yield model
    await model.aclose()


async def place_orders(store: EventStore) -> None:
    await store.append(
        "order-1",
        [
            created("1"),
            NewEvent("InventoryReserved", {"order_id": "1"}),
            NewEvent("PaymentProcessed", {"order_id": "1", "amount": 30.0}),
        ],
    )
    await store.append("order-2", [created("2", "grace"), NewEvent("InventoryReserved")])
    await store.append("order-1", [NewEvent("OrderShipped", {"carrier": "FedEx"})])
    await store.append(
        "order-2",
        [NewEvent("PaymentFailed", {"reason": "declined"}), NewEvent("OrderCancelled")],
    )
    await store.append("order-1", [NewEvent("OrderCompleted")])
    await store.append("order-3", [created("3", "alan")])


async def test_get_order_answers_from_the_summary_of_every_event(
    store: EventStore, read_model: SQLiteReadModel
) -> None:
    await place_orders(store)
    await ProjectionRunner(store, OrderSummary(), read_model).catch_up()
    last = (await store.read_stream("order-1"))[-1].position
    assert await get_order(read_model, "1") == {
        "id": "1",
        "customer": "ada",
        "status": "completed",
        "total": 30.0,
        "items": ITEMS,
        "updated_position": last,
    }
    order_2 = await get_order(read_model, "2")
    assert order_2 is not None
    assert (order_2["customer"], order_2["status"]) == ("grace", "cancelled")
    order_3 = await get_order(read_model, "3")
    assert order_3 is not None
    assert order_3["status"] == "created"


async def test_an_unknown_order_is_none(store: EventStore, read_model: SQLiteReadModel) -> None:
    await place_orders(store)
    await ProjectionRunner(store, OrderSummary(), read_model).catch_up()
    assert await get_order(read_model, "404") is None


async def test_the_summary_follows_new_events_and_rebuilds_to_the_same_rows(
    store: EventStore, read_model: SQLiteReadModel
) -> None:
    runner = ProjectionRunner(store, OrderSummary(), read_model)
    await store.append("order-7", [created("7")])
    await runner.catch_up()
    order = await get_order(read_model, "7")
    assert order is not None
    assert order["status"] == "created"
    await store.append("order-7", [NewEvent("InventoryReserved"), NewEvent("PaymentProcessed")])
    await runner.catch_up()
    before = await get_order(read_model, "7")
    assert before is not None
    assert before["status"] == "paid"
    await runner.rebuild()
    assert await get_order(read_model, "7") == before


async def test_handlers_ignore_an_event_delivered_twice(
    store: EventStore, read_model: SQLiteReadModel, tmp_path: Path
) -> None:
    await place_orders(store)
    projection = OrderSummary()
    await ProjectionRunner(store, projection, read_model).catch_up()
    before = await get_order(read_model, "1")
    events = await store.read_all(from_position=0)
    # at-least-once redelivery straight to the handlers: the read model's checkpoint
    # (which drops events at or before it) is not what is under test here
    with closing(sqlite3.connect(tmp_path / "orders-read.db")) as conn, conn:
        for event in events[:4]:
            projection.apply(event, conn)
    assert await get_order(read_model, "1") == before
