"""The order saga, choreographed: four services reacting to each other's events.

No orchestrator. Each service owns a database - a SQLite file, or a PostgreSQL
schema of its own - holding its tables, its outbox and its inbox, and runs its own
relay; it changes its state and announces the change in ONE local transaction, and
handles each message it receives at most once.

    orders        OrderCreated ----------------------------------------------.
    inventory       -> InventoryReserved  (or InventoryFailed -> orders cancels)
    payment            -> PaymentProcessed          | -> PaymentFailed
    notification          -> NotificationSent       |     inventory releases
    orders                   -> OrderCompleted      |     -> InventoryReleased
                                                    |        -> OrderCancelled

Every message of one order carries the order id as its correlation id and the id of
the message that caused it, so ``FlowMonitor`` rebuilds each order's flow from the
messages alone. ``seamwork demo`` runs it as its second act; ``python -m
seamwork.demo.choreography`` places one order that succeeds, one whose card is
declined and one for an item out of stock, and prints the monitor's view.
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from seamwork.brokers import EmbeddedNats, NatsBroker
from seamwork.demo.servers import NatsRun
from seamwork.demo.services import pg_sql
from seamwork.messaging import (
    FlowMonitor,
    Inbox,
    Message,
    Outbox,
    OutboxRelay,
    Transaction,
)

CARD_LIMIT = 1_000
"""The payment service declines any order above this amount."""
STOCK = {"book": 10, "lamp": 2}
SUBJECTS = ("orders.>", "inventory.>", "payment.>", "notification.>")
TERMINAL = {"OrderCompleted": "completed", "OrderCancelled": "cancelled"}

Fn = Callable[[Message, Transaction], Awaitable[None]]


class Service:
    """One service: its database (tables + outbox + inbox), relay and broker.

    The database is the SQLite file ``<workdir>/<name>.db``, or the PostgreSQL schema
    ``postgres`` connects to. Handlers write ``?`` placeholders and bare subjects
    (``inventory.reserved``); ``local`` makes them right for the database and puts
    ``prefix`` before every subject (a run's own on a shared NATS server).
    """

    def __init__(
        self,
        name: str,
        workdir: Path,
        url: str,
        schema: tuple[str, ...],
        *,
        postgres: str | None = None,
        prefix: str = "",
        group: str | None = None,
    ) -> None:
        self.name = name
        self.group = group or name
        self.prefix = prefix
        self.db = workdir / f"{name}.db"
        self.postgres = postgres
        self.outbox = Outbox.postgres(postgres) if postgres else Outbox.sqlite(self.db)
        self.inbox = Inbox.of(self.outbox)
        self.broker = NatsBroker(url, name=self.group)
        self.relay = OutboxRelay(self.outbox, self.broker, poll_interval=0.05)
        self.schema = schema

    async def start(self) -> None:
        await self.outbox.open()
        async with self.outbox.transaction() as tx:
            for statement in self.schema:
                await self.local(tx).execute(statement)
        await self.relay.start()

    def local(self, tx: Transaction) -> Transaction:
        """``tx`` as the handlers write to it."""
        return _Local(tx, self.prefix, pg=self.postgres is not None)

    async def on(self, subject: str, fn: Fn, message_type: str) -> None:
        """Handle ``message_type`` on ``subject`` as this service's consumer group."""

        async def handle(message: Message, tx: Transaction) -> None:
            await fn(message, self.local(tx))

        handler = self.inbox.handler(handle, types={message_type})
        await self.broker.subscribe(self.prefix + subject, self.group, handler, retry_delay=0.1)

    async def stop(self) -> None:
        # the relay first: left running, it would connect the closed broker again
        await close_all(self.relay.stop, self.broker.aclose, self.outbox.aclose)


class _Local:
    """A ``Transaction`` taking ``?`` placeholders and bare subjects: psycopg's ``%s``
    on PostgreSQL, ``prefix`` before every subject published."""

    def __init__(self, tx: Transaction, prefix: str, *, pg: bool) -> None:
        self.tx = tx
        self.prefix = prefix
        self.pg = pg

    async def execute(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return await self.tx.execute(pg_sql(sql) if self.pg else sql, params)

    async def publish(self, subject: str, message: Message) -> None:
        await self.tx.publish(self.prefix + subject, message)


async def close_all(*closers: Callable[[], Awaitable[None]]) -> None:
    """Run every closer, even after one raised or the caller was cancelled (a Ctrl-C),
    so no relay, connection or database thread is left running; then raise the first
    error."""
    first: BaseException | None = None
    for close in closers:
        try:
            await close()
        except BaseException as exc:  # re-raised once all are closed
            first = first or exc
    if first is not None:
        raise first


# --- the services' handlers -----------------------------------------------------------


async def reserve(message: Message, tx: Transaction) -> None:
    """inventory, on OrderCreated: reserve the stock, or report that there is none."""
    order = message.data
    (row,) = await tx.execute("SELECT available FROM stock WHERE sku = ?", (order["sku"],))
    if row[0] < order["qty"]:
        await tx.publish("inventory.failed", message.caused("InventoryFailed", order))
        return
    await tx.execute(
        "UPDATE stock SET available = available - ? WHERE sku = ?", (order["qty"], order["sku"])
    )
    await tx.execute(
        "INSERT INTO reservations (order_id, sku, qty, status) VALUES (?, ?, ?, 'reserved')",
        (order["order_id"], order["sku"], order["qty"]),
    )
    await tx.publish("inventory.reserved", message.caused("InventoryReserved", order))


async def release(message: Message, tx: Transaction) -> None:
    """inventory, on PaymentFailed: put the reserved stock back."""
    order = message.data
    await tx.execute(
        "UPDATE reservations SET status = 'released' WHERE order_id = ?", (order["order_id"],)
    )
    await tx.execute(
        "UPDATE stock SET available = available + ? WHERE sku = ?", (order["qty"], order["sku"])
    )
    await tx.publish("inventory.released", message.caused("InventoryReleased", order))


async def charge(message: Message, tx: Transaction) -> None:
    """payment, on InventoryReserved: charge the card (declined above the limit)."""
    order = message.data
    ok = order["amount"] <= CARD_LIMIT
    await tx.execute(
        "INSERT INTO payments (order_id, amount, status) VALUES (?, ?, ?)",
        (order["order_id"], order["amount"], "charged" if ok else "declined"),
    )
    kind, subject = ("PaymentProcessed", "processed") if ok else ("PaymentFailed", "failed")
    await tx.publish(f"payment.{subject}", message.caused(kind, order))


async def notify(message: Message, tx: Transaction) -> None:
    """notification, on PaymentProcessed: tell the customer."""
    order = message.data
    await tx.execute(
        "INSERT INTO notifications (order_id, text) VALUES (?, ?)",
        (order["order_id"], f"order {order['order_id']} is on its way"),
    )
    await tx.publish("notification.sent", message.caused("NotificationSent", order))


async def complete(message: Message, tx: Transaction) -> None:
    """orders, on NotificationSent: the order is complete."""
    await _finish(message, tx, "completed", "OrderCompleted")


async def cancel(message: Message, tx: Transaction) -> None:
    """orders, on InventoryFailed or InventoryReleased: the order is cancelled."""
    await _finish(message, tx, "cancelled", "OrderCancelled")


async def _finish(message: Message, tx: Transaction, status: str, kind: str) -> None:
    order_id = message.data["order_id"]
    await tx.execute("UPDATE orders SET status = ? WHERE id = ?", (status, order_id))
    await tx.publish(f"orders.{status}", message.caused(kind, {"order_id": order_id}))


# --- the system -----------------------------------------------------------------------


class OrderSystem:
    """The four services and a flow monitor on one NATS server.

    With ``dsn_for`` each service's database is the PostgreSQL schema
    ``dsn_for(name)`` connects to; with ``nats_run`` the subjects and consumer groups
    are that run's own (``servers.NatsRun``).
    """

    def __init__(
        self,
        workdir: Path,
        url: str,
        stock: dict[str, int] | None = None,
        *,
        dsn_for: Callable[[str], str] | None = None,
        nats_run: NatsRun | None = None,
    ) -> None:
        self.stock = dict(stock or STOCK)
        self.prefix = nats_run.prefix if nats_run else ""
        # the service is the subject's first token after the run's own prefix
        self.monitor = FlowMonitor(TERMINAL, service_of=self._service_of)
        self._group = nats_run.group if nats_run else (lambda name: name)
        self._monitor_broker = NatsBroker(url, name=self._group("flow-monitor"))

        def service(name: str, schema: tuple[str, ...]) -> Service:
            return Service(
                name,
                workdir,
                url,
                schema,
                postgres=dsn_for(name) if dsn_for else None,
                prefix=self.prefix,
                group=self._group(name),
            )

        self.orders = service(
            "orders",
            (
                "CREATE TABLE orders (id TEXT PRIMARY KEY, sku TEXT, qty INT, amount INT,"
                " status TEXT)",
            ),
        )
        stocked = ", ".join(f"('{sku}', {n})" for sku, n in self.stock.items())
        self.inventory = service(
            "inventory",
            (
                "CREATE TABLE stock (sku TEXT PRIMARY KEY, available INT NOT NULL)",
                f"INSERT INTO stock (sku, available) VALUES {stocked}",
                "CREATE TABLE reservations (order_id TEXT PRIMARY KEY, sku TEXT, qty INT,"
                " status TEXT)",
            ),
        )
        self.payment = service(
            "payment",
            ("CREATE TABLE payments (order_id TEXT PRIMARY KEY, amount INT, status TEXT)",),
        )
        self.notification = service(
            "notification",
            ("CREATE TABLE notifications (order_id TEXT PRIMARY KEY, text TEXT)",),
        )
        self.services = (self.orders, self.inventory, self.payment, self.notification)

    def _service_of(self, subject: str) -> str:
        """The service that published on ``subject``: its first token after the run's
        prefix (``seamwork-demo-<id>.inventory.reserved`` -> ``inventory``)."""
        return subject.removeprefix(self.prefix).split(".", 1)[0]

    async def start(self) -> None:
        for service in self.services:
            await service.start()
        await self.monitor.watch(
            self._monitor_broker,
            [self.prefix + subject for subject in SUBJECTS],
            group=self._group("flow-monitor"),
        )
        await self.inventory.on("orders.created", reserve, "OrderCreated")
        await self.inventory.on("payment.failed", release, "PaymentFailed")
        await self.payment.on("inventory.reserved", charge, "InventoryReserved")
        await self.notification.on("payment.processed", notify, "PaymentProcessed")
        await self.orders.on("notification.sent", complete, "NotificationSent")
        await self.orders.on("inventory.failed", cancel, "InventoryFailed")
        await self.orders.on("inventory.released", cancel, "InventoryReleased")

    async def stop(self) -> None:
        await close_all(self._monitor_broker.aclose, *(s.stop for s in self.services))

    async def place_order(self, order_id: str, sku: str, qty: int, amount: int) -> None:
        """The orders service takes an order: its row and OrderCreated, one transaction."""
        order = {"order_id": order_id, "sku": sku, "qty": qty, "amount": amount}
        async with self.orders.outbox.transaction() as raw:
            tx = self.orders.local(raw)
            await tx.execute(
                "INSERT INTO orders (id, sku, qty, amount, status) VALUES (?, ?, ?, ?, 'pending')",
                (order_id, sku, qty, amount),
            )
            await tx.publish(
                "orders.created", Message("OrderCreated", order, correlation_id=order_id)
            )

    async def settled(self, *order_ids: str, seconds: float = 15.0) -> None:
        """Wait until the monitor sees every one of these orders in a terminal state."""

        def done() -> bool:
            flows = self.monitor.flows()
            return all(oid in flows and flows[oid].status in TERMINAL.values() for oid in order_ids)

        async with asyncio.timeout(seconds):
            while not done():  # noqa: ASYNC110 - watching messages arrive from outside
                await asyncio.sleep(0.02)

    async def drained(self, seconds: float = 5.0) -> None:
        """Wait until the monitor has seen every message the services sent: no outbox
        holds an unsent one and the monitor recorded as many as the relays published.

        A message still on its way when the last flow reached its end (a duplicate, a
        step the monitor's consumer of that subject had not fetched yet) is then in
        the flows, and is checked with them.
        """

        async def quiet() -> bool:
            for service in self.services:
                if await service.outbox.pending_count():
                    return False
            seen = sum(len(flow.steps) for flow in self.monitor.flows().values())
            return seen >= sum(service.relay.published for service in self.services)

        async with asyncio.timeout(seconds):
            while not await quiet():  # noqa: ASYNC110 - polling databases and the monitor
                await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def running(
    workdir: Path,
    url: str,
    stock: dict[str, int] | None = None,
    *,
    dsn_for: Callable[[str], str] | None = None,
    nats_run: NatsRun | None = None,
) -> AsyncIterator[OrderSystem]:
    """``async with running(dir, url) as system:`` the four services and the monitor."""
    system = OrderSystem(workdir, url, stock, dsn_for=dsn_for, nats_run=nats_run)
    try:
        await system.start()
        yield system
    finally:
        await system.stop()


async def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        async with EmbeddedNats() as server, running(Path(tmp), server.url) as system:
            await system.place_order("order-1", "book", 1, 30)
            await system.place_order("order-2", "book", 1, 5_000)
            await system.place_order("order-3", "lamp", 5, 100)
            await system.settled("order-1", "order-2", "order-3")
            print(system.monitor.render())


if __name__ == "__main__":
    asyncio.run(main())
