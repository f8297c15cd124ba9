"""Connection faults under the PostgreSQL event store, read models and outbox/inbox.

The saga store's faults are in ``test_pg_faults.py``; here the same injectors - a
``pg_terminate_backend`` of one of this test's own connections (found by their
``application_name``) and the TCP ``Proxy`` that stalls traffic - are turned on the
other PostgreSQL adapters. Never the shared server itself.
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections.abc import Awaitable
from typing import Any

import pytest
from pg_faults import Proxy

from seamwork.errors import EventStoreError, StoreUnavailable
from seamwork.events import NewEvent, ProjectionRunner, RecordedEvent, handles
from seamwork.messaging import Delivery, Inbox, Message, Outbox, Transaction
from seamwork.saga import IdempotencyLedger
from seamwork.storage.postgres_events import PostgresEventStore
from seamwork.storage.postgres_readmodel import PostgresReadModel
from seamwork.testing.read_model import Totals, added

pytestmark = pytest.mark.chaos


def with_port(dsn: str, port: int) -> str:
    return re.sub(r"\bport=\d+", f"port={port}", dsn) if "port=" in dsn else f"{dsn} port={port}"


@pytest.mark.timeout(60)
async def test_an_append_on_a_stalled_server_fails_within_the_deadline_and_the_store_recovers(
    pg_dsn: str,
) -> None:
    proxy = Proxy(5432)
    await proxy.start()
    store = PostgresEventStore(with_port(pg_dsn, proxy.port))  # default query_timeout: 5 s
    await store.open()
    stream = f"order-{uuid.uuid4().hex[:8]}"
    try:
        await store.append(stream, [NewEvent("Placed", {})])
        proxy.stall()
        lost = NewEvent("Paid", {"n": 1})
        started = time.monotonic()
        with pytest.raises(StoreUnavailable, match="outcome is unknown"):
            await asyncio.wait_for(store.append(stream, [lost]), 15)
        assert time.monotonic() - started < 6.5
        # a read and the next append, queued behind, do not hang either
        with pytest.raises(StoreUnavailable):
            await asyncio.wait_for(store.read_stream(stream), 15)
        with pytest.raises(StoreUnavailable):
            await asyncio.wait_for(store.append(stream, [NewEvent("Shipped", {})]), 15)
        proxy.resume()
        # the stalled append reached the server after all: its retry says so, once
        await asyncio.sleep(0.5)
        with pytest.raises(EventStoreError, match="already stored"):
            await asyncio.wait_for(store.append(stream, [lost]), 15)
        later = await asyncio.wait_for(store.append(stream, [NewEvent("Closed", {})]), 15)
        events = await store.read_stream(stream)
        assert [e.type for e in events].count("Paid") == 1
        assert events[-1].type == "Closed"
        assert later.version == events[-1].version
    finally:
        await asyncio.wait_for(store.aclose(), 15)
        await proxy.aclose()


@pytest.mark.timeout(60)
async def test_an_outbox_read_on_a_stalled_server_fails_within_the_deadline_and_recovers(
    pg_dsn: str,
) -> None:
    """The relay's reads and marks (``pending``, ``mark_sent``, ``purge_sent``) must
    fail on a stalled server, so the relay logs, backs off and carries on after."""
    proxy = Proxy(5432)
    await proxy.start()
    outbox = Outbox.postgres(with_port(pg_dsn, proxy.port))  # default query_timeout: 5 s
    try:
        await outbox.open()
        async with outbox.transaction() as tx:
            await tx.publish("orders.created", Message("OrderCreated", {"n": 1}))
        proxy.stall()
        started = time.monotonic()
        with pytest.raises(StoreUnavailable, match="outbox"):
            await asyncio.wait_for(outbox.pending(10), 15)
        assert time.monotonic() - started < 6.5
        proxy.resume()
        (record,) = await asyncio.wait_for(outbox.pending(10), 15)
        await asyncio.wait_for(outbox.mark_sent([record.seq]), 15)
        assert await asyncio.wait_for(outbox.pending_count(), 15) == 0
    finally:
        await asyncio.wait_for(outbox.aclose(), 15)
        await proxy.aclose()


async def _stalled_within(call: Awaitable[object], seconds: float) -> StoreUnavailable:
    started = time.monotonic()
    with pytest.raises(StoreUnavailable) as caught:
        await asyncio.wait_for(call, 15)
    assert time.monotonic() - started < seconds
    return caught.value


@pytest.mark.timeout(60)
async def test_outbox_and_inbox_transactions_on_a_stalled_server_fail_within_the_deadline(
    pg_dsn: str,
) -> None:
    """A statement inside ``outbox.transaction()`` or an inbox handler - the service's
    own, the BEGIN, the outbox rows, the COMMIT - waited for good on a stalled server;
    each now fails with StoreUnavailable after ``query_timeout`` (a COMMIT's outcome
    then unknown), its connection replaced, and the next transaction runs."""
    proxy = Proxy(5432)
    await proxy.start()
    outbox = Outbox.postgres(with_port(pg_dsn, proxy.port), pool_size=2, query_timeout=1.0)
    inbox = Inbox.of(outbox)
    try:
        await outbox.open()
        async with outbox.transaction() as tx:
            await tx.execute("CREATE TABLE orders (id int PRIMARY KEY)")

        async def statement() -> None:
            async with outbox.transaction() as tx:
                proxy.stall()
                await tx.execute("INSERT INTO orders (id) VALUES (1)")

        async def commit() -> None:
            async with outbox.transaction() as tx:
                await tx.execute("INSERT INTO orders (id) VALUES (2)")
                proxy.stall()

        async def outbox_rows() -> None:
            async with outbox.transaction() as tx:
                await tx.publish("orders.created", Message("OrderCreated", {"id": 6}))
                proxy.stall()

        async def begin() -> None:
            async with outbox.transaction() as tx:
                await tx.execute("INSERT INTO orders (id) VALUES (3)")

        async def handle(message: Message, tx: Transaction) -> None:
            proxy.stall()
            await tx.execute("INSERT INTO orders (id) VALUES (4)")

        await _stalled_within(statement(), 2.5)
        proxy.resume()
        error = await _stalled_within(commit(), 2.5)
        assert "outcome is unknown" in str(error)
        proxy.resume()
        await _stalled_within(outbox_rows(), 2.5)
        proxy.resume()
        proxy.stall()
        await _stalled_within(begin(), 2.5)
        proxy.resume()
        await _stalled_within(inbox.handler(handle)(Delivery(Message("N"), "x.y", "g")), 2.5)
        proxy.resume()
        async with outbox.transaction() as tx:  # the store recovered
            await tx.execute("INSERT INTO orders (id) VALUES (5)")
        rows = await outbox.store.fetch("SELECT id FROM orders ORDER BY id")
        assert [r[0] for r in rows] in ([5], [2, 5])  # 2: its COMMIT may have landed
        assert await outbox.pending_count() == 0
    finally:
        proxy.resume()
        await asyncio.wait_for(outbox.aclose(), 15)
        await proxy.aclose()


@pytest.mark.timeout(60)
async def test_the_ledgers_statements_on_a_stalled_server_fail_within_the_deadline(
    pg_dsn: str,
) -> None:
    """The ledger's own statements - BEGIN, the claim, the recorded result, COMMIT and
    ``result`` - had no deadline; each now fails with StoreUnavailable after
    ``query_timeout`` (a COMMIT's outcome then unknown) and the ledger recovers."""
    proxy = Proxy(5432)
    await proxy.start()
    ledger = IdempotencyLedger.postgres(with_port(pg_dsn, proxy.port), query_timeout=1.0)
    try:
        await ledger.open()

        def stall_then(value: object) -> object:
            proxy.stall()
            return value

        error = await _stalled_within(ledger.once("a", lambda conn: stall_then(1)), 2.5)
        assert "outcome is unknown" not in str(error)  # the result's UPDATE: not a COMMIT
        proxy.resume()
        proxy.stall()
        await _stalled_within(ledger.once("b", lambda conn: 2), 2.5)
        await _stalled_within(ledger.result("b"), 2.5)
        await _stalled_within(ledger.transaction(lambda conn: 3), 2.5)
        proxy.resume()
        assert await asyncio.wait_for(ledger.once("c", lambda conn: 4), 15) == 4
        assert await asyncio.wait_for(ledger.result("a"), 15) is None
    finally:
        proxy.resume()
        await asyncio.wait_for(ledger.aclose(), 15)
        await proxy.aclose()


@pytest.mark.timeout(60)
async def test_read_model_calls_on_a_stalled_server_fail_within_the_deadline(
    pg_dsn: str,
) -> None:
    """A read-model call - a page of a projection, a query - waited for good on a
    stalled server, holding the read model's one connection (and its lock) for every
    later call; a statement that gets no answer within ``query_timeout`` now fails the
    call with StoreUnavailable, the connection is replaced, and the next call runs."""
    proxy = Proxy(5432)
    await proxy.start()
    store = PostgresEventStore(pg_dsn)  # the events come straight from the server
    model = PostgresReadModel(with_port(pg_dsn, proxy.port), query_timeout=1.0)
    projection = Totals("%s")

    class Stalls(Totals):
        @handles("Added")
        def added(self, event: RecordedEvent, conn: Any) -> None:
            proxy.stall()
            super().added(event, conn)

    try:
        await store.open()
        await store.append("s", added(3))
        await model.open()
        await model.setup(projection)
        await _stalled_within(ProjectionRunner(store, Stalls("%s"), model).catch_up(), 2.5)
        proxy.resume()
        proxy.stall()
        await _stalled_within(model.query("SELECT 1"), 2.5)
        proxy.resume()
        assert await asyncio.wait_for(ProjectionRunner(store, projection, model).catch_up(), 15)
        assert await asyncio.wait_for(model.query("SELECT total FROM totals"), 15) == [{"total": 3}]
    finally:
        proxy.resume()
        await asyncio.wait_for(model.aclose(), 15)
        await asyncio.wait_for(store.aclose(), 15)
        await proxy.aclose()


@pytest.mark.timeout(60)
async def test_opening_on_a_stalled_server_fails_within_the_deadline(pg_dsn: str) -> None:
    """``open()`` of an outbox or a ledger connected (to migrate) with no deadline, so on
    a stalled server it waited for good; the connection now fails after
    ``query_timeout`` with StoreUnavailable, and an ``open()`` after the stall works."""
    proxy = Proxy(5432)
    await proxy.start()
    dsn = with_port(pg_dsn, proxy.port)
    outbox = Outbox.postgres(dsn, query_timeout=1.0)
    ledger = IdempotencyLedger.postgres(dsn, query_timeout=1.0)
    try:
        proxy.stall()
        assert "no answer within 1s" in str(await _stalled_within(outbox.open(), 2.5))
        await _stalled_within(ledger.open(), 2.5)
        proxy.resume()
        await asyncio.wait_for(outbox.open(), 15)
        await asyncio.wait_for(ledger.open(), 15)
        assert await outbox.pending_count() == 0
    finally:
        proxy.resume()
        await asyncio.wait_for(outbox.aclose(), 15)
        await asyncio.wait_for(ledger.aclose(), 15)
        await proxy.aclose()
