"""The choreographed order saga end to end: four services, their own databases, NATS.

Each test places orders through the orders service and waits for the flow monitor
to see them settle; then it checks the monitor's view of every flow (the exact
sequence of message types and who published each) and each service's own database.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from seamwork.brokers import EmbeddedNats
from seamwork.demo.choreography import OrderSystem, running
from seamwork.messaging import FlowMonitor, Message, Transaction

SUCCESS = [
    ("OrderCreated", "orders"),
    ("InventoryReserved", "inventory"),
    ("PaymentProcessed", "payment"),
    ("NotificationSent", "notification"),
    ("OrderCompleted", "orders"),
]
PAYMENT_FAILED = [
    ("OrderCreated", "orders"),
    ("InventoryReserved", "inventory"),
    ("PaymentFailed", "payment"),
    ("InventoryReleased", "inventory"),
    ("OrderCancelled", "orders"),
]


@pytest.fixture
async def system(tmp_path: Path) -> AsyncIterator[OrderSystem]:
    async with EmbeddedNats() as server, running(tmp_path, server.url) as order_system:
        yield order_system


def one(db: Path, sql: str, *params: object) -> tuple[object, ...] | None:
    with sqlite3.connect(db) as conn:
        row: tuple[object, ...] | None = conn.execute(sql, params).fetchone()
        return row


async def test_an_order_that_pays_is_reserved_charged_notified_and_completed(
    system: OrderSystem,
) -> None:
    await system.place_order("order-1", "book", 2, 30)
    await system.settled("order-1")
    flow = system.monitor.flow("order-1")
    assert flow is not None
    assert (flow.path, flow.status, flow.where) == (SUCCESS, "completed", "orders")
    assert one(system.orders.db, "SELECT status FROM orders WHERE id = 'order-1'") == ("completed",)
    assert one(system.inventory.db, "SELECT available FROM stock WHERE sku = 'book'") == (8,)
    assert one(system.inventory.db, "SELECT status FROM reservations") == ("reserved",)
    assert one(system.payment.db, "SELECT amount, status FROM payments") == (30, "charged")
    assert one(system.notification.db, "SELECT order_id FROM notifications") == ("order-1",)


async def test_a_declined_payment_releases_the_stock_and_cancels_the_order(
    system: OrderSystem,
) -> None:
    await system.place_order("order-2", "book", 3, 5_000)
    await system.settled("order-2")
    flow = system.monitor.flow("order-2")
    assert flow is not None
    assert (flow.path, flow.status) == (PAYMENT_FAILED, "cancelled")
    assert one(system.orders.db, "SELECT status FROM orders WHERE id = 'order-2'") == ("cancelled",)
    assert one(system.inventory.db, "SELECT available FROM stock WHERE sku = 'book'") == (10,)
    assert one(system.inventory.db, "SELECT status FROM reservations") == ("released",)
    assert one(system.payment.db, "SELECT status FROM payments") == ("declined",)
    assert one(system.notification.db, "SELECT count(*) FROM notifications") == (0,)


async def test_flows_run_side_by_side_and_every_outbox_drains(system: OrderSystem) -> None:
    await system.place_order("a", "book", 1, 10)
    await system.place_order("b", "lamp", 5, 10)  # only 2 lamps: InventoryFailed
    await system.place_order("c", "book", 1, 2_000)
    await system.settled("a", "b", "c")
    flows = system.monitor.flows()
    assert flows["a"].path == SUCCESS
    assert flows["b"].path == [
        ("OrderCreated", "orders"),
        ("InventoryFailed", "inventory"),
        ("OrderCancelled", "orders"),
    ]
    assert flows["c"].path == PAYMENT_FAILED
    assert [line.split()[:2] for line in system.monitor.render().splitlines()] == [
        ["a", "completed"],
        ["b", "cancelled"],
        ["c", "cancelled"],
    ]
    # a relay marks a message sent once the broker took it, which may be after the
    # monitor already saw it: wait (bounded) for that, then every outbox is empty
    await system.drained()
    for service in system.services:
        assert await service.outbox.pending_count() == 0


def test_the_monitor_orders_a_flow_by_causation_not_by_arrival() -> None:
    created = Message("OrderCreated", {}, correlation_id="o-1")
    reserved = created.caused("InventoryReserved")
    charged = reserved.caused("PaymentProcessed")
    monitor = FlowMonitor({"PaymentProcessed": "paid"})
    monitor.record(charged, "payment.processed")  # streams are consumed independently
    monitor.record(created, "orders.created")
    monitor.record(reserved, "inventory.reserved")
    monitor.record(reserved, "inventory.reserved")  # a redelivery is recorded once
    flow = monitor.flow("o-1")
    assert flow is not None
    assert flow.path == [
        ("OrderCreated", "orders"),
        ("InventoryReserved", "inventory"),
        ("PaymentProcessed", "payment"),
    ]
    assert flow.status == "paid"
    assert monitor.flow("unknown") is None


def test_a_flow_without_a_terminal_message_is_in_progress_where_it_stopped() -> None:
    created = Message("OrderCreated", {}, correlation_id="o-2")
    monitor = FlowMonitor({"OrderCompleted": "completed"})
    monitor.record(created, "orders.created")
    monitor.record(created.caused("InventoryReserved"), "inventory.reserved")
    flow = monitor.flows()["o-2"]
    assert (flow.status, flow.where) == ("in progress", "inventory")


@pytest.mark.parametrize("steps_before_cancel", [1, 2, 3, 5, 10, 20])
async def test_a_cancel_while_stopping_still_stops_every_service(
    tmp_path: Path, steps_before_cancel: int
) -> None:
    # a Ctrl-C landing in stop() must not leave the later services' relays, broker
    # connections and database writer threads running (the process could not exit)
    import asyncio

    async with EmbeddedNats() as server:
        system = OrderSystem(tmp_path, server.url)
        await system.start()
        await system.place_order("o-1", "book", 1, 30)
        stopping = asyncio.create_task(system.stop())
        for _ in range(steps_before_cancel):
            await asyncio.sleep(0)
        stopping.cancel()
        with pytest.raises(asyncio.CancelledError):
            await stopping
        assert system._monitor_broker._nc is None
        for service in system.services:
            relay = service.relay._task
            assert relay is None or relay.done(), service.name
            assert service.broker._nc is None, service.name
            assert not service.outbox.store.writer.running, service.name


def _act_two(tmp_path: Path) -> None:
    import io

    from rich.console import Console

    from seamwork.demo.run import _act_two
    from seamwork.demo.scenario import DemoConfig

    _act_two(DemoConfig(tmp_path, orders=20), Console(file=io.StringIO()))


def test_demo_act_two_that_cannot_settle_is_a_demo_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from seamwork.demo import choreo_act
    from seamwork.demo.scenario import DemoError

    monkeypatch.setattr(choreo_act, "SETTLE_SECONDS", 0.0)
    with pytest.raises(DemoError, match=r"^act two: \d+ of 20 choreographed orders did not"):
        _act_two(tmp_path)


def test_demo_act_two_without_a_nats_server_is_a_demo_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import functools

    from seamwork.demo import choreo_act
    from seamwork.demo.scenario import DemoError

    # a real EmbeddedNats whose server exits at once, as a broken install's would
    monkeypatch.setattr(
        choreo_act, "EmbeddedNats", functools.partial(EmbeddedNats, binary="/bin/false")
    )
    with pytest.raises(DemoError, match=r"^act two could not run: nats-server did not start"):
        _act_two(tmp_path)


def _open_files() -> set[str]:
    import os

    found = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            found.add(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            continue
    return found


async def test_demo_checks_report_missing_data_as_failures_and_close_their_databases(
    tmp_path: Path,
) -> None:
    import sqlite3
    from contextlib import closing

    from seamwork.demo import choreo_act
    from seamwork.demo.choreo_act import _rows, check, prepare, run_choreography

    prepare(tmp_path)
    run = await run_choreography(tmp_path, 20)
    assert all(c.ok for c in check(run))
    assert not {p for p in _open_files() if p.startswith(str(tmp_path))}
    with pytest.raises(sqlite3.OperationalError) as failed:  # the frame stays referenced
        _rows(tmp_path / "orders.db", "SELECT nothing FROM nowhere")
    assert failed.value is not None
    assert str(tmp_path / "orders.db") not in _open_files()
    del run.flows["choreo-0003"]  # a flow the monitor never saw
    with closing(sqlite3.connect(tmp_path / "inventory.db")) as db, db:
        db.execute("DELETE FROM stock WHERE sku = 'lamp'")  # a service's row gone
    failing = {c.name: c.detail for c in check(run) if not c.ok}
    assert set(failing) == {
        "every flow follows its planned path",
        "stock conserved (available + reserved)",
    }
    assert "choreo-0003" in failing["every flow follows its planned path"]
    # a release that never happened keeps the stock conserved (the reservation still
    # holds it) but not the reservation's own state; a notification too many, likewise
    completed = next(o.order_id for o in run.orders if o.expected == choreo_act.SUCCESS)
    declined = next(o.order_id for o in run.orders if o.expected == choreo_act.DECLINED)
    with closing(sqlite3.connect(tmp_path / "inventory.db")) as db, db:
        db.execute("UPDATE reservations SET status = 'reserved' WHERE order_id = ?", (declined,))
    with closing(sqlite3.connect(tmp_path / "notification.db")) as db, db:
        db.execute("DELETE FROM notifications WHERE order_id = ?", (completed,))
    failing = {c.name: c.detail for c in check(run) if not c.ok}
    assert declined in failing["reservations held or released as planned"]
    assert completed in failing["a notification for each completed order only"]


def _children() -> list[int]:
    """The live child processes of this process (a nats-server left running)."""
    import os

    found = []
    for entry in Path("/proc").iterdir():
        try:
            state, ppid = (entry / "stat").read_text().rsplit(")", 1)[1].split()[:2]
        except (OSError, IndexError):  # not a process, or gone meanwhile
            continue
        if int(ppid) == os.getpid() and state != "Z":
            found.append(int(entry.name))
    return found


@pytest.mark.timeout(30)
async def test_act_two_cancelled_in_its_start_up_ends_at_once_and_leaves_nothing_running(
    tmp_path: Path,
) -> None:
    # a Ctrl-C (SIGINT, SIGTERM: asyncio.run cancels the act) in the first ms of act
    # two lands in the server's boot, a database being opened or a broker's request
    import asyncio
    import threading

    from seamwork.demo.choreo_act import prepare, run_choreography

    for step in range(31):  # cancels 0, 2, ... 60 ms in
        directory = tmp_path / f"run-{step}"
        prepare(directory)
        act = asyncio.create_task(run_choreography(directory, 20))
        await asyncio.sleep(step * 0.002)
        act.cancel()
        done, _ = await asyncio.wait({act}, timeout=5)
        assert done, f"act two cancelled {step * 2} ms in did not end within 5 s"
        assert act.cancelled(), f"act two went on after a cancel {step * 2} ms in"
        assert [t for t in asyncio.all_tasks() if t is not asyncio.current_task()] == []
        assert [t.name for t in threading.enumerate() if t.name.startswith("seamwork-")] == []
        assert _children() == []


async def test_act_two_catches_a_duplicate_sent_just_as_every_flow_ended(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the flows are checked once no service has anything left to send and the monitor
    # has seen all they sent, not at the moment the last flow first reached its end
    from seamwork.demo.choreo_act import check, prepare, run_choreography

    settled = OrderSystem.settled

    async def settled_then_duplicate(self: OrderSystem, *ids: str, seconds: float) -> None:
        await settled(self, *ids, seconds=seconds)
        async with self.payment.outbox.transaction() as tx:  # handled again, under a new id
            order = {"order_id": "choreo-0000", "sku": "book", "qty": 1, "amount": 20}
            await tx.publish(
                "payment.processed",
                Message("PaymentProcessed", order, correlation_id="choreo-0000"),
            )

    monkeypatch.setattr(OrderSystem, "settled", settled_then_duplicate)
    prepare(tmp_path)
    run = await run_choreography(tmp_path, 20)
    failing = {c.name: c.detail for c in check(run) if not c.ok}
    assert failing == {"every flow follows its planned path": "1 wrong, e.g. choreo-0000"}


async def test_act_two_fails_a_check_when_a_message_was_dead_lettered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # every flow can reach its end while a message sits in the dead-letter stream (a
    # consumer gave up on it); act two did not look there, and all its checks held
    from seamwork.brokers import NatsBroker
    from seamwork.demo.choreo_act import check, prepare, run_choreography

    settled = OrderSystem.settled

    async def settled_then_poison(self: OrderSystem, *ids: str, seconds: float) -> None:
        await settled(self, *ids, seconds=seconds)
        async with self.payment.outbox.transaction() as tx:  # a type notification never handles
            await tx.publish(
                "payment.processed", Message("PaymentRefunded", {}, correlation_id="stray")
            )
        reader = NatsBroker(self.payment.broker.url, name="test-dlq-reader")
        try:
            async with asyncio.timeout(10):
                while not await reader.dead_letters():
                    await asyncio.sleep(0.05)
        finally:
            await reader.aclose()

    monkeypatch.setattr(OrderSystem, "settled", settled_then_poison)
    prepare(tmp_path)
    run = await run_choreography(tmp_path, 20)
    failing = {c.name: c.detail for c in check(run) if not c.ok}
    assert set(failing) == {"no message dead-lettered"}
    assert (
        "PaymentRefunded on payment.processed (notification)" in failing["no message dead-lettered"]
    )


async def test_on_a_shared_server_the_monitor_names_services_not_the_runs_prefix(
    tmp_path: Path, nats_service: str
) -> None:
    # under --nats every subject starts with the run's own token
    # (seamwork-demo-<id>.inventory.reserved), which the monitor took for the service
    from seamwork.demo.servers import NatsRun, new_run_id

    run = NatsRun(nats_service, new_run_id())
    try:
        async with running(tmp_path, nats_service, nats_run=run) as on_shared:
            await on_shared.place_order("order-1", "book", 1, 30)
            await on_shared.settled("order-1")
            flow = on_shared.monitor.flow("order-1")
    finally:
        await run.clean()
    assert flow is not None
    assert (flow.path, flow.where) == (SUCCESS, "orders")


@pytest.mark.parametrize("store", ["sqlite", "postgres"])
async def test_compensation_crashing_after_it_published_is_emitted_once_on_redelivery(
    tmp_path: Path,
    nats_service: str,
    store: str,
    monkeypatch: pytest.MonkeyPatch,
    request: pytest.FixtureRequest,
) -> None:
    # release (on PaymentFailed) and cancel (on InventoryFailed / InventoryReleased)
    # crash after publishing their compensating event: each message is delivered
    # again, and the flow must still emit each compensating event once, the stock
    # going back once
    import uuid

    from seamwork.demo import choreography
    from seamwork.demo.servers import NatsRun, new_run_id

    crashes: list[str] = []

    def crashing_once(fn: Callable[[Message, Transaction], Awaitable[None]]) -> Any:
        async def handler(message: Message, tx: Transaction) -> None:
            await fn(message, tx)
            if message.id not in crashes:
                crashes.append(message.id)
                raise ConnectionError("crashed after publishing")

        return handler

    monkeypatch.setattr(choreography, "release", crashing_once(choreography.release))
    monkeypatch.setattr(choreography, "cancel", crashing_once(choreography.cancel))
    dsn_for = None
    if store == "postgres":
        import psycopg

        database = request.getfixturevalue("pg_database")
        tag = uuid.uuid4().hex[:8]
        with psycopg.connect(database, autocommit=True) as conn:
            for name in ("orders", "inventory", "payment", "notification"):
                conn.execute(f'CREATE SCHEMA "c{tag}_{name}"'.encode())

        def dsn_for(name: str) -> str:
            return f"{database} options='-c search_path=c{tag}_{name}'"

    run = NatsRun(nats_service, new_run_id())
    try:
        async with running(tmp_path, nats_service, dsn_for=dsn_for, nats_run=run) as shop:
            await shop.place_order("declined", "book", 3, 5_000)
            await shop.place_order("no-stock", "lamp", 5, 10)
            await shop.settled("declined", "no-stock")
            await shop.drained()
            flows = shop.monitor.flows()
            (available,) = await _one(shop.inventory, "SELECT available FROM stock WHERE sku = ?")
    finally:
        await run.clean()
    assert len(crashes) == 3  # PaymentFailed, InventoryReleased, InventoryFailed
    assert flows["declined"].path == PAYMENT_FAILED
    assert [kind for kind, _ in flows["no-stock"].path] == [
        "OrderCreated",
        "InventoryFailed",
        "OrderCancelled",
    ]
    assert available == 10


async def _one(service: Any, sql: str) -> tuple[Any, ...]:
    async with service.outbox.transaction() as tx:
        (row,) = await service.local(tx).execute(sql, ("book",))
        return tuple(row)
