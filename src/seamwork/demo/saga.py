"""The seed's order saga, and the scenario's orders.

The orders are a pure function of their count, so the orchestrator process, its
replacement after the kill, and the invariant checks all agree on them without
sharing anything but the number.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from seamwork.demo.services import (
    DECLINED_CARD,
    SLOW_CARRIER,
    STUCK_WAREHOUSE,
    Order,
    Services,
)
from seamwork.saga import Retry, Saga, SagaStore, Step, StepContext, StepFailed

if TYPE_CHECKING:
    from seamwork.demo.servers import PgRun

SAGA_NAME = "order"
SAGAS_DB = "sagas.db"
WAREHOUSES = ("W-01", "W-02", "W-03", "W-04")
SKUS = tuple(f"SKU-{n}" for n in range(1, 8))
STEP_NAMES = ("reserve_inventory", "charge_payment", "ship_order", "send_confirmation")
SHIP_TIMEOUT = 1.0
"""The slow carrier answers after ``slow_answer`` (3 s): well past this; a normal
shipment takes milliseconds, so a loaded machine does not time one out by accident."""


def services_at(directory: Path, pg: PgRun | None) -> Services:
    """The four services: SQLite files in ``directory``, or the run's PostgreSQL schemas."""
    return Services.on_postgres(pg.dsn_for) if pg else Services.in_directory(directory)


def saga_store(directory: Path, pg: PgRun | None, *, pool_size: int = 4) -> SagaStore:
    """The saga store: ``sagas.db`` in ``directory``, or the run's ``sagas`` schema."""
    if pg is None:
        from seamwork.storage import SQLiteStore

        return SQLiteStore(directory / SAGAS_DB)
    from seamwork.storage.postgres import PostgresStore

    return PostgresStore(pg.dsn_for("sagas"), pool_size=pool_size)


def saga_id(order_id: str) -> str:
    return f"saga-{order_id}"


@dataclass(frozen=True, slots=True)
class Expectation:
    """How the scenario means an order to end."""

    declined: bool
    ship_times_out: bool
    stuck_warehouse: bool

    @property
    def fails(self) -> bool:
        return self.declined or self.ship_times_out

    @property
    def status(self) -> str:
        if not self.fails:
            return "completed"
        return "stuck" if self.stuck_warehouse else "failed"


def make_orders(count: int) -> list[Order]:
    """``count`` orders: about 1 in 9 declined, 1 in 14 shipped with the slow
    carrier, 1 in 12 from the warehouse whose releases always fail."""
    return [_order(n) for n in range(1, count + 1)]


def _order(n: int) -> Order:
    warehouse = STUCK_WAREHOUSE if n % 12 == 5 else WAREHOUSES[n % len(WAREHOUSES)]
    return Order(
        order_id=f"order-{n:04d}",
        sku=SKUS[n % len(SKUS)],
        warehouse=warehouse,
        qty=1 + n % 3,
        amount_cents=1000 + (n * 37) % 9000,
        card=DECLINED_CARD if n % 9 == 2 else "4242-4242-4242-4242",
        carrier=SLOW_CARRIER if n % 14 == 5 else "fastship",
        email=f"customer{n}@example.com",
    )


def expectation(order: Order) -> Expectation:
    declined = order.card == DECLINED_CARD
    return Expectation(
        declined=declined,
        ship_times_out=not declined and order.carrier == SLOW_CARRIER,
        stuck_warehouse=order.warehouse == STUCK_WAREHOUSE,
    )


def stock_locations() -> list[tuple[str, str]]:
    return [(sku, wh) for sku in SKUS for wh in (*WAREHOUSES, STUCK_WAREHOUSE)]


def order_saga(services: Services) -> Saga:
    """The order saga, its steps bound to ``services``."""
    inventory, payment = services.inventory, services.payment
    shipping, notification = services.shipping, services.notification

    async def reserve(ctx: StepContext) -> Mapping[str, Any]:
        result = await inventory.reserve(ctx.idempotency_key, dict(ctx.data))
        if result["reservation_id"] is None:
            raise StepFailed(result["reason"])
        return result

    async def release(ctx: StepContext) -> None:
        await inventory.release(ctx.idempotency_key, dict(ctx.data))

    async def charge(ctx: StepContext) -> Mapping[str, Any]:
        result = await payment.charge(ctx.idempotency_key, dict(ctx.data))
        if result["payment_id"] is None:
            raise StepFailed(result["declined"])
        return result

    async def refund(ctx: StepContext) -> None:
        await payment.refund(ctx.idempotency_key, dict(ctx.data))

    async def ship(ctx: StepContext) -> Mapping[str, Any]:
        return await shipping.ship(ctx.idempotency_key, dict(ctx.data))

    async def cancel_shipment(ctx: StepContext) -> None:
        await shipping.cancel(ctx.idempotency_key, dict(ctx.data))

    async def confirm(ctx: StepContext) -> Mapping[str, Any]:
        return await notification.send(ctx.idempotency_key, dict(ctx.data), "confirmation")

    async def send_cancellation(ctx: StepContext) -> None:
        await notification.send(ctx.idempotency_key, dict(ctx.data), "cancellation")

    return Saga(
        SAGA_NAME,
        version=1,
        steps=[
            Step("reserve_inventory", reserve, compensate=release, timeout=5),
            Step("charge_payment", charge, compensate=refund, timeout=5, retry=Retry(3)),
            Step(
                "ship_order",
                ship,
                compensate=cancel_shipment,
                timeout=SHIP_TIMEOUT,
                compensate_timeout=5,
            ),
            Step("send_confirmation", confirm, compensate=send_cancellation, timeout=5),
        ],
        max_compensation_attempts=3,
        compensation_backoff=0.02,
    )
