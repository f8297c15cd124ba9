"""Outbox, relay and inbox in PostgreSQL, through a real (embedded) nats-server."""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator

import psycopg
import pytest

from seamwork.brokers import EmbeddedNats, NatsBroker
from seamwork.errors import StoreError, StoreUnavailable
from seamwork.messaging import (
    Delivery,
    Flow,
    FlowMonitor,
    Inbox,
    Message,
    Outbox,
    OutboxRelay,
    PoisonMessage,
    Transaction,
)
from seamwork.storage._pg import migrate
from seamwork.storage.postgres_messaging import MESSAGING_MIGRATIONS
from seamwork.testing.broker import eventually, until

pytestmark = pytest.mark.postgres


@pytest.fixture
async def outbox(pg_dsn: str) -> AsyncIterator[Outbox]:
    async with Outbox.postgres(pg_dsn) as box:
        async with box.transaction() as tx:
            await tx.execute("CREATE TABLE orders (id int PRIMARY KEY)")
            await tx.execute("CREATE TABLE effects (n int, message_id text)")
        yield box


async def count(dsn: str, sql: str) -> int:
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cursor = await conn.execute(sql.encode())
        row = await cursor.fetchone()
        return int(row[0]) if row else 0


async def test_outbox_rows_commit_and_roll_back_with_the_services_writes(
    outbox: Outbox, pg_dsn: str
) -> None:
    async with outbox.transaction() as tx:
        await tx.execute("INSERT INTO orders (id) VALUES (%s)", (1,))
        await tx.publish("orders.created", Message("OrderCreated", {"order_id": 1}))

    async def failing() -> None:
        async with outbox.transaction() as tx:
            await tx.execute("INSERT INTO orders (id) VALUES (%s)", (2,))
            await tx.publish("orders.created", Message("OrderCreated", {"order_id": 2}))
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        await failing()
    assert await count(pg_dsn, "SELECT count(*) FROM orders") == 1
    assert await outbox.pending_count() == 1
    (record,) = await outbox.pending(10)
    assert record.message.data == {"order_id": 1}


async def test_relay_and_inbox_apply_each_message_once_across_redelivery(
    outbox: Outbox, pg_dsn: str
) -> None:
    inbox = Inbox.of(outbox)
    subject = f"t{uuid.uuid4().hex[:10]}.created"
    for n in range(20):
        async with outbox.transaction() as tx:
            await tx.publish(subject, Message("N", {"n": n}))
    applied: list[int] = []

    async def on_n(message: Message, tx: Transaction) -> None:
        await tx.execute(
            "INSERT INTO effects (n, message_id) VALUES (%s, %s)", (message.data["n"], message.id)
        )
        applied.append(message.data["n"])

    handler = inbox.handler(on_n, types={"N"})
    async with EmbeddedNats() as server:
        broker = NatsBroker(server.url)
        await broker.subscribe(subject, "effects", handler)
        relay = OutboxRelay(outbox, broker)
        assert await relay.drain() == 20
        await eventually(lambda: len(applied) == 20)
        record = (await outbox_sent(outbox, pg_dsn))[0]
        redelivered = Delivery(record, subject, "effects", attempt=2)
        await handler(redelivered)  # a redelivery applies nothing
        await broker.aclose()
    assert await count(pg_dsn, "SELECT count(*) FROM effects") == 20
    assert await outbox.pending_count() == 0


async def outbox_sent(outbox: Outbox, dsn: str) -> list[Message]:
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cursor = await conn.execute(
            "SELECT id, type, data FROM seamwork_outbox ORDER BY seq LIMIT 1"
        )
        return [Message(t, d, id=i) for i, t, d in await cursor.fetchall()]


async def test_two_consumers_racing_on_one_message_apply_it_once(
    outbox: Outbox, pg_dsn: str
) -> None:
    inbox = Inbox.of(outbox)
    started = asyncio.Event()

    async def slow(message: Message, tx: Transaction) -> None:
        await tx.execute("INSERT INTO effects (n, message_id) VALUES (1, %s)", (message.id,))
        started.set()
        await asyncio.sleep(0.1)

    handler = inbox.handler(slow)
    delivery = Delivery(Message("N", {}), "x.y", "g")
    await asyncio.gather(handler(delivery), handler(delivery))
    assert await count(pg_dsn, "SELECT count(*) FROM effects") == 1


async def test_a_tx_used_after_its_block_is_refused_not_run_on_a_pooled_connection(
    outbox: Outbox, pg_dsn: str
) -> None:
    async with outbox.transaction() as tx:
        stale = tx
    with pytest.raises(StoreError, match="transaction has ended"):
        await stale.execute("INSERT INTO orders (id) VALUES (%s)", (1,))
    with pytest.raises(StoreError, match="transaction has ended"):
        await stale.publish("orders.created", Message("OrderCreated"))
    async with outbox.transaction() as tx:  # the next user of the pooled connection
        await tx.execute("INSERT INTO orders (id) VALUES (%s)", (2,))
    assert await count(pg_dsn, "SELECT count(*) FROM orders WHERE id = 1") == 0
    assert await outbox.pending_count() == 0

    kept: list[Transaction] = []

    async def keep(message: Message, tx: Transaction) -> None:
        kept.append(tx)

    inbox = Inbox.of(outbox)
    await inbox.handler(keep)(Delivery(Message("N", {}), "x.y", "g"))
    batch = [Delivery(Message("N", {}), "x.y", "g") for _ in range(2)]
    assert await inbox.handler(keep).batch(batch) == [None, None]
    for late in kept:
        with pytest.raises(StoreError, match="transaction has ended"):
            await late.execute("INSERT INTO effects (n, message_id) VALUES (99, 'late')")
    assert await count(pg_dsn, "SELECT count(*) FROM effects") == 0


async def test_a_handler_returning_a_value_is_poison_and_applies_nothing(
    outbox: Outbox, pg_dsn: str
) -> None:
    inbox = Inbox.of(outbox)

    async def fn(message: Message, tx: Transaction) -> Message:
        await tx.execute("INSERT INTO effects (n, message_id) VALUES (%s, %s)", (1, message.id))
        return message.caused("Next")  # meant to be published: it would be dropped

    handler = inbox.handler(fn)  # type: ignore[arg-type]
    message = Message("N", {})
    with pytest.raises(PoisonMessage, match=r"fn returned a Message"):
        await handler(Delivery(message, "x.y", "g"))
    (outcome,) = await handler.batch([Delivery(message, "x.y", "g")])
    assert isinstance(outcome, PoisonMessage)
    assert await count(pg_dsn, "SELECT count(*) FROM effects") == 0
    assert await outbox.pending_count() == 0
    assert not await inbox.seen(message.id)


async def test_a_batch_rolls_back_a_failing_message_alone(outbox: Outbox, pg_dsn: str) -> None:
    inbox = Inbox.of(outbox)

    async def fn(message: Message, tx: Transaction) -> None:
        await tx.execute("INSERT INTO effects (n, message_id) VALUES (%s, %s)", (1, message.id))
        await tx.publish("orders.next", message.caused("Next"))
        if message.data.get("bad"):
            raise ValueError("bad message")

    handler = inbox.handler(fn)
    deliveries = [Delivery(Message("N", {"bad": n == 1}), "x.y", "g") for n in range(3)]
    outcomes = await handler.batch(deliveries)
    assert [type(o).__name__ if o else None for o in outcomes] == [None, "ValueError", None]
    assert await count(pg_dsn, "SELECT count(*) FROM effects") == 2
    assert await outbox.pending_count() == 2
    assert await inbox.seen(deliveries[0].message.id)
    assert not await inbox.seen(deliveries[1].message.id)


async def test_a_handlers_plain_follow_up_joins_the_flow_it_handles(
    outbox: Outbox, pg_dsn: str
) -> None:
    # a handler's Message(...) started a flow of its own: no correlation, no
    # causation, and the monitor lost the order there
    prefix = f"t{uuid.uuid4().hex[:10]}"
    created_on, charged_on, audit_on = (
        f"{prefix}.{name}" for name in ("orders.created", "payments.charged", "audit.opened")
    )

    async def charge(message: Message, tx: Transaction) -> None:
        n = message.data["n"]
        await tx.execute("INSERT INTO effects (n, message_id) VALUES (%s, %s)", (n, message.id))
        await tx.publish(charged_on, Message("PaymentCharged", {"n": n}))
        await tx.publish(audit_on, Message("AuditOpened", {"n": n}, correlation_id=f"audit-{n}"))

    handler = Inbox.of(outbox).handler(charge)
    one = Message("OrderCreated", {"n": 1}, correlation_id="order-1")
    await handler(Delivery(one, created_on, "payments"))  # its own transaction
    two = Message("OrderCreated", {"n": 2})  # relayed, handled in a fetched batch
    monitor = FlowMonitor(
        {"PaymentCharged": "charged", "AuditOpened": "opened"},
        service_of=lambda subject: subject.split(".")[1],
    )

    async def settled() -> list[Flow] | None:
        flows = [monitor.flow(c) for c in ("order-1", two.id, "audit-1", "audit-2")]
        done = [f for f in flows if f is not None and f.status != "in progress"]
        return done if len(done) == len(flows) else None

    async with EmbeddedNats() as server:
        broker = NatsBroker(server.url)
        try:
            await monitor.watch(broker, [created_on, charged_on, audit_on], group="monitor")
            await broker.subscribe(created_on, "payments", handler)
            async with outbox.transaction() as tx:
                await tx.publish(created_on, two)
            async with OutboxRelay(outbox, broker, poll_interval=0.05):
                first, second, *audits = await until(settled, seconds=5)
        finally:
            await broker.aclose()
    assert first.path == [("PaymentCharged", "payments")]
    assert first.steps[0].causation_id == one.id
    assert second.path == [("OrderCreated", "orders"), ("PaymentCharged", "payments")]
    assert second.steps[1].causation_id == two.id
    assert [(a.path, a.steps[0].causation_id) for a in audits] == [
        ([("AuditOpened", "audit")], None)
    ] * 2
    async with await psycopg.AsyncConnection.connect(pg_dsn) as conn:
        cursor = await conn.execute(
            "SELECT type, correlation_id, causation_id FROM seamwork_outbox ORDER BY seq"
        )
        assert await cursor.fetchall() == [
            ("PaymentCharged", "order-1", one.id),
            ("AuditOpened", "audit-1", None),
            ("OrderCreated", two.id, None),
            ("PaymentCharged", two.id, two.id),
            ("AuditOpened", "audit-2", None),
        ]


async def test_one_handlers_statement_timeout_fails_only_its_message(
    outbox: Outbox, pg_dsn: str
) -> None:
    async def on_order(message: Message, tx: Transaction) -> None:
        if message.data["n"] == 2:  # this handler's own statement runs out of time
            await tx.execute("SET LOCAL statement_timeout = '50ms'")
            await tx.execute("SELECT pg_sleep(1)")
        await tx.execute(
            "INSERT INTO effects (n, message_id) VALUES (%s, %s)", (message.data["n"], message.id)
        )

    deliveries = [Delivery(Message("N", {"n": n}), "orders.created", "g") for n in (1, 2, 3)]
    outcomes = await Inbox.of(outbox).handler(on_order).batch(deliveries)
    assert [type(o).__name__ if o else None for o in outcomes] == [None, "QueryCanceled", None]
    assert await count(pg_dsn, "SELECT count(*) FROM effects") == 2


async def test_a_message_id_the_outbox_holds_already_is_a_store_error_and_writes_nothing(
    outbox: Outbox, pg_dsn: str
) -> None:
    message = Message("OrderCreated", {"order_id": 1})
    async with outbox.transaction() as tx:
        await tx.publish("orders.created", message)

    async def again() -> None:
        async with outbox.transaction() as tx:
            await tx.execute("INSERT INTO orders (id) VALUES (%s)", (2,))
            await tx.publish("orders.created", message)

    with pytest.raises(
        StoreError, match=f"message id '{message.id}' is in the outbox already"
    ) as caught:
        await again()
    assert isinstance(caught.value.__cause__, psycopg.errors.UniqueViolation)
    assert await count(pg_dsn, "SELECT count(*) FROM orders") == 0
    assert await outbox.pending_count() == 1


async def test_connections_killed_under_the_outbox_are_store_unavailable_not_driver_errors(
    pg_dsn: str,
) -> None:
    async def kill_the_pool() -> None:
        async with await psycopg.AsyncConnection.connect(pg_dsn, autocommit=True) as conn:
            await conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )

    async with Outbox.postgres(pg_dsn, pool_size=1) as outbox:  # one connection to kill

        async def killed_mid_way() -> None:
            async with outbox.transaction() as tx:
                await tx.publish("orders.created", Message("OrderCreated"))
                await kill_the_pool()  # the transaction's own connection

        with pytest.raises(StoreUnavailable, match="outbox"):
            await killed_mid_way()
        assert await outbox.pending_count() == 0  # on a new connection


async def test_a_closed_outbox_opens_again(outbox: Outbox, pg_dsn: str) -> None:
    async with outbox.transaction() as tx:
        await tx.execute("INSERT INTO orders (id) VALUES (%s)", (7,))
    await outbox.aclose()
    await outbox.open()  # (the fixture closes it again)
    async with outbox.transaction() as tx:
        await tx.execute("INSERT INTO orders (id) VALUES (%s)", (8,))
    assert await count(pg_dsn, "SELECT count(*) FROM orders") == 2


ODD_DATA = {"z": 1e16, "huge": 1e300, "nul": "a\x00b", "b": 1, "a": [2.0, {"y": 1, "x": 0}]}
ODD_HEADERS = {"b": "1", "a": "é", "e": ""}


async def test_a_message_is_relayed_as_written_as_on_sqlite(outbox: Outbox) -> None:
    """Numbers keep their type, keys their order and a NUL character is taken (jsonb
    made 1e16 the int 10000000000000000, sorted keys and refused the NUL)."""
    async with outbox.transaction() as tx:
        await tx.publish("orders.created", Message("Odd", ODD_DATA, headers=ODD_HEADERS))
    (record,) = await outbox.pending(10)
    assert json.dumps(record.message.data) == json.dumps(ODD_DATA)
    assert json.dumps(record.message.headers) == json.dumps(ODD_HEADERS)


async def test_rows_written_before_the_upgrade_are_relayed_after_it(pg_dsn: str) -> None:
    message = Message("Old", {"n": 1, "f": 2.5}, headers={"k": "v"})
    async with await psycopg.AsyncConnection.connect(pg_dsn) as conn:
        await migrate(conn, MESSAGING_MIGRATIONS[:1])  # the schema of an older release
        await conn.execute(
            "INSERT INTO seamwork_outbox (id, subject, type, data, correlation_id, headers, "
            "created_at) VALUES (%s, 'orders.created', 'Old', %s::jsonb, %s, %s::jsonb, 0)",
            (message.id, '{"n": 1, "f": 2.5}', message.id, '{"k": "v"}'),
        )
        await conn.commit()
    async with Outbox.postgres(pg_dsn) as outbox:
        (record,) = await outbox.pending(10)
        async with outbox.transaction() as tx:
            await tx.publish("orders.created", Message("New", ODD_DATA))
        assert await outbox.pending_count() == 2
    assert record.message == Message(
        "Old", {"n": 1, "f": 2.5}, id=message.id, correlation_id=message.id, headers={"k": "v"}
    )


async def test_a_caught_statement_error_is_reported_not_acknowledged_with_nothing_committed(
    outbox: Outbox, pg_dsn: str
) -> None:
    """PostgreSQL aborts the whole transaction on a failed statement, and COMMIT then
    rolls back without an error: a handler that caught the error and returned was
    acknowledged with nothing of it committed, and so was an outbox block."""
    async with outbox.transaction() as tx:
        await tx.execute("INSERT INTO orders (id) VALUES (0)")

    async def charge_ignoring_duplicates(message: Message, tx: Transaction) -> None:
        await tx.execute("INSERT INTO effects (n, message_id) VALUES (1, %s)", (message.id,))
        with contextlib.suppress(psycopg.errors.UniqueViolation):
            await tx.execute("INSERT INTO orders (id) VALUES (0)")  # already there

    handler = Inbox.of(outbox).handler(charge_ignoring_duplicates)
    delivery = Delivery(Message("N", {}), "x.y", "g")
    with pytest.raises(StoreError, match="failed statement aborted the transaction"):
        await handler(delivery)  # the broker retries it instead of acknowledging it
    assert not await Inbox.of(outbox).seen(delivery.message.id)
    (outcome,) = await handler.batch([delivery])
    assert isinstance(outcome, StoreError)
    assert "failed statement aborted the transaction" in str(outcome)

    async def place_order_ignoring_duplicates() -> None:
        async with outbox.transaction() as tx:
            await tx.execute("INSERT INTO orders (id) VALUES (1)")
            with contextlib.suppress(psycopg.errors.UniqueViolation):
                await tx.execute("INSERT INTO orders (id) VALUES (0)")

    with pytest.raises(StoreError, match="failed statement aborted the transaction"):
        await place_order_ignoring_duplicates()
    assert await count(pg_dsn, "SELECT count(*) FROM effects") == 0
    assert await count(pg_dsn, "SELECT count(*) FROM orders") == 1


async def terminate_idle(dsn: str, application: str) -> int:
    """Terminate the idle backends of ``application`` (the server killing pooled
    connections while idle: a failover, an idle timeout, an operator)."""
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as admin:
        cursor = await admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE application_name = %s AND state = 'idle'",
            (application,),
        )
        killed = len(await cursor.fetchall())
    await asyncio.sleep(0.1)  # the terminations land
    return killed


async def test_reads_and_transactions_go_past_pooled_connections_the_server_killed(
    pg_dsn: str,
) -> None:
    """A read, or a transaction's BEGIN, on a pooled connection the server had killed
    while idle failed with StoreUnavailable though the server was fine, so the relay
    logged an outage that was not there; each now goes past the dead connections (a
    transaction only before any of its statements ran)."""
    application = f"sw-idle-{uuid.uuid4().hex[:8]}"
    dsn = f"{pg_dsn} application_name={application}"
    async with Outbox.postgres(dsn, pool_size=3) as outbox:
        inbox = Inbox.of(outbox)
        async with outbox.transaction() as tx:
            await tx.publish("orders.created", Message("OrderCreated", id="m-1"))

        async def fill_the_pool() -> None:
            await asyncio.gather(*(outbox.pending_count() for _ in range(6)))

        await fill_the_pool()
        assert await terminate_idle(pg_dsn, application) >= 1
        assert await outbox.pending_count() == 1
        await fill_the_pool()
        await terminate_idle(pg_dsn, application)
        (record,) = await outbox.pending(10)
        await fill_the_pool()
        await terminate_idle(pg_dsn, application)
        assert not await inbox.seen("m-1")
        await fill_the_pool()
        await terminate_idle(pg_dsn, application)
        await outbox.mark_sent([record.seq])
        await fill_the_pool()
        await terminate_idle(pg_dsn, application)
        async with outbox.transaction() as tx:
            await tx.execute("SELECT 1")
            await tx.publish("orders.created", Message("OrderCreated", id="m-2"))
        await fill_the_pool()
        await terminate_idle(pg_dsn, application)
        handler = inbox.handler(lambda message, tx: tx.execute("SELECT 1"))
        await handler(Delivery(Message("N", {}, id="m-3"), "x.y", "g"))
        assert await inbox.seen("m-3")
        assert [r.message.id for r in await outbox.pending(10)] == ["m-2"]


async def test_an_outbox_never_opened_opens_at_its_first_transaction(pg_dsn: str) -> None:
    # the transaction took the pool the open was about to replace: 'not open yet'
    box = Outbox.postgres(pg_dsn)
    try:
        async with box.transaction() as tx:
            await tx.execute("CREATE TABLE first_use (id int)")
            await tx.publish("orders.created", Message("OrderCreated", {"order_id": 1}))
        assert await box.pending_count() == 1
    finally:
        await box.aclose()
