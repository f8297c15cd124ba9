"""The code samples of the design document, run as written against real stores and brokers.

Each test is one sample of ``DESIGN.md`` (§3 sagas, §4 resilience, §5 events, §6
messaging), with only the scaffolding it needs (temporary paths, unique names) and
assertions on what the text around it promises.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import os
import re
import sqlite3
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import nats
import pytest

from seamwork.brokers import EmbeddedNats, NatsBroker, RabbitBroker
from seamwork.errors import ConfigError, StoreError
from seamwork.events import (
    ANY,
    NO_STREAM,
    STREAM_EXISTS,
    EventStore,
    NewEvent,
    RecordedEvent,
    WrongExpectedVersion,
)
from seamwork.messaging import Delivery, Inbox, Message, Outbox, OutboxRelay
from seamwork.resilience import (
    Bulkhead,
    BulkheadFullError,
    Bulkheads,
    CircuitBreaker,
    CircuitOpenError,
    Pipeline,
    RateLimiter,
    Timeout,
)
from seamwork.resilience import Retry as ResilienceRetry
from seamwork.saga import (
    Parallel,
    Retry,
    Saga,
    SagaOrchestrator,
    SagaState,
    Step,
    StepContext,
    StepFailed,
)
from seamwork.storage import SQLiteStore
from seamwork.testing import ManualClock

# --- §3 Sagas ---------------------------------------------------------------------------


def _order_saga(calls: list[tuple[str, Any]], *, declined: bool = False) -> Saga:
    async def reserve(ctx: StepContext) -> Mapping[str, Any]:
        calls.append(("reserve", ctx))
        return {"reservation": f"r-{ctx.data['order_id']}"}

    async def release(ctx: StepContext) -> None:
        calls.append(("release", ctx))

    async def charge(ctx):  # type: ignore[no-untyped-def]  # ctx: StepContext
        calls.append(("charge", ctx))
        if declined:
            raise StepFailed("card declined")  # definite failure
        return {"payment_id": "p-1"}  # merged into the saga context

    async def refund(ctx: StepContext) -> None:
        calls.append(("refund", ctx))

    async def ship(ctx: StepContext) -> None:
        calls.append(("ship", ctx))

    async def cancel_shipment(ctx: StepContext) -> None:
        calls.append(("cancel_shipment", ctx))

    async def confirm(ctx: StepContext) -> None:
        calls.append(("confirm", ctx))

    async def send_cancellation(ctx: StepContext) -> None:
        calls.append(("send_cancellation", ctx))

    return Saga("order", version=1, steps=[
        Step("reserve_inventory", reserve, compensate=release, timeout=5),
        Step("charge_payment", charge, compensate=refund, timeout=30, retry=Retry(3)),
        Step("ship_order", ship, compensate=cancel_shipment, timeout=10),
        Step("send_confirmation", confirm, compensate=send_cancellation, timeout=5),
    ])  # fmt: skip


async def test_saga_sample_runs_to_completion(tmp_path: Path) -> None:
    calls: list[tuple[str, Any]] = []
    order = _order_saga(calls)
    db = str(tmp_path / "sagas.db")
    async with SagaOrchestrator(SQLiteStore(db), [order]) as orch:
        run = await orch.start("order", {"order_id": 42}, saga_id="order-42")
        state = await run.wait()
        assert isinstance(state, SagaState)
        assert state.status == "completed"
        assert state.saga_id == "order-42"
        assert (state.saga_name, state.saga_version) == ("order", 1)
        assert state.completed_steps == (
            "reserve_inventory",
            "charge_payment",
            "ship_order",
            "send_confirmation",
        )
        assert state.compensated_steps == ()
        assert state.context == {"order_id": 42, "reservation": "r-42", "payment_id": "p-1"}
        stored = await orch.get("order-42")
        assert isinstance(stored, SagaState)
        assert stored.status == "completed"
        assert await orch.get("order-43") is None
        assert await orch.list(status="stuck") == []
        # start() with an existing id is idempotent: nothing runs again
        again = await orch.start("order", {"order_id": 42}, saga_id="order-42")
        assert (await again.wait()).status == "completed"
    assert [name for name, _ in calls] == ["reserve", "charge", "ship", "confirm"]
    charge_ctx = calls[1][1]
    assert isinstance(charge_ctx, StepContext)
    assert charge_ctx.saga_id == "order-42"
    assert charge_ctx.step == "charge_payment"
    assert charge_ctx.attempt == 1
    assert charge_ctx.idempotency_key == "order-42:charge_payment"
    assert dict(charge_ctx.data) == {"order_id": 42, "reservation": "r-42"}
    with pytest.raises(TypeError, match="read-only"):
        charge_ctx.data["x"] = 1  # type: ignore[index]  # read-only mapping
    assert json.loads(json.dumps(charge_ctx.data)) == {"order_id": 42, "reservation": "r-42"}


async def test_saga_sample_state_has_every_documented_field(tmp_path: Path) -> None:
    order = _order_saga([])
    async with SagaOrchestrator(SQLiteStore(str(tmp_path / "sagas.db")), [order]) as orch:
        state = await (await orch.start("order", {"order_id": 1}, saga_id="o-1")).wait()
    for name in [
        "saga_id",
        "saga_name",
        "saga_version",
        "status",
        "current_step_index",
        "completed_steps",
        "compensated_steps",
        "context",
        "started_at",
        "updated_at",
        "failure_reason",
        "compensation_attempts",
        "lease_owner",
        "lease_expires_at",
    ]:
        assert hasattr(state, name), name
    assert state.current_step_index == 4
    assert {s.value for s in type(state.status)} == {
        "running",
        "compensating",
        "completed",
        "failed",
        "stuck",
    }


async def test_saga_sample_declined_card_is_definite_and_compensates_in_reverse(
    tmp_path: Path,
) -> None:
    calls: list[tuple[str, Any]] = []
    order = _order_saga(calls, declined=True)
    async with SagaOrchestrator(SQLiteStore(str(tmp_path / "sagas.db")), [order]) as orch:
        run = await orch.start("order", {"order_id": 42}, saga_id="order-42")
        state = await run.wait()
    assert state.status == "failed"
    assert "card declined" in (state.failure_reason or "")
    # StepFailed is definite: not retried (despite retry=Retry(3)), not compensated
    assert [name for name, _ in calls] == ["reserve", "charge", "release"]
    assert state.completed_steps == ("reserve_inventory",)
    assert state.compensated_steps == ("reserve_inventory",)
    assert calls[2][1].compensating


async def test_saga_sample_wait_works_for_a_saga_an_earlier_process_began(
    tmp_path: Path,
) -> None:
    gate = asyncio.Event()
    entered = asyncio.Event()

    async def slow(ctx: StepContext) -> None:
        entered.set()
        await gate.wait()

    refused: list[str] = []

    async def quick(ctx: StepContext) -> None:
        try:
            ctx.data.pop("order_id")  # type: ignore[attr-defined]
        except TypeError as exc:  # read-only after a recovery too
            refused.append(str(exc))

    def saga() -> Saga:
        return Saga("order", version=1, steps=[Step("a", slow), Step("b", quick)])

    db = str(tmp_path / "sagas.db")
    async with SagaOrchestrator(SQLiteStore(db), [saga()]) as orch:
        await orch.start("order", {"order_id": 42}, saga_id="order-42")
        await entered.wait()
    gate.set()  # the next process's step finishes at once
    async with SagaOrchestrator(SQLiteStore(db), [saga()]) as orch:
        run = await orch.start("order", {"order_id": 42}, saga_id="order-42")
        state = await run.wait()
        assert state.status == "completed"
        assert state.context == {"order_id": 42}
    assert len(refused) == 1
    assert "read-only" in refused[0]


async def test_saga_sample_cancel_compensates_and_retry_abort_exist(tmp_path: Path) -> None:
    entered = asyncio.Event()
    undone: list[str] = []

    async def reserve(ctx: StepContext) -> None:
        return None

    async def release(ctx: StepContext) -> None:
        undone.append(ctx.step)

    async def hang(ctx: StepContext) -> None:
        entered.set()
        await asyncio.Event().wait()

    saga = Saga("order", steps=[Step("reserve", reserve, compensate=release), Step("pay", hang)])
    async with SagaOrchestrator(SQLiteStore(str(tmp_path / "sagas.db")), [saga]) as orch:
        run = await orch.start("order", {}, saga_id="order-9")
        await entered.wait()
        await orch.cancel("order-9")
        state = await run.wait()
        assert state.status == "failed"
        assert undone == ["reserve"]


async def test_saga_sample_stuck_sagas_are_listed_retried_and_aborted(tmp_path: Path) -> None:
    broken = True
    tries: list[int] = []

    async def reserve(ctx: StepContext) -> None:
        return None

    async def release(ctx: StepContext) -> None:
        tries.append(ctx.attempt)
        if broken:
            raise RuntimeError("inventory service down")

    async def pay(ctx: StepContext) -> None:
        raise StepFailed("card declined")

    saga = Saga(
        "order",
        steps=[Step("reserve", reserve, compensate=release), Step("pay", pay)],
        max_compensation_attempts=2,
        compensation_backoff=0,
    )
    async with SagaOrchestrator(SQLiteStore(str(tmp_path / "sagas.db")), [saga]) as orch:
        for saga_id in ("order-1", "order-2"):
            state = await (await orch.start("order", {}, saga_id=saga_id)).wait()
            assert state.status == "stuck"
        assert tries == [1, 2, 1, 2]  # max_compensation_attempts per step, then stuck
        assert {s.saga_id for s in await orch.list(status="stuck")} == {"order-1", "order-2"}
        broken = False
        retried = await (await orch.retry("order-1")).wait()
        assert retried.status == "failed"
        assert retried.compensated_steps == ("reserve",)
        aborted = await orch.abort("order-2")
        assert aborted.status == "failed"
        assert [s.saga_id for s in await orch.list(status="stuck")] == []


def test_retry_is_one_class_for_steps_and_policies() -> None:
    assert Retry is ResilienceRetry


# --- §4 Resilience ------------------------------------------------------------------------


class NotFound(Exception):
    """A dependency's 'no such thing': an answer, not an outage."""


def _sample_breaker(
    alerts: list[Any], fallbacks: list[BaseException], **extra: Any
) -> CircuitBreaker:
    def queued_for_retry(error: BaseException) -> str:
        fallbacks.append(error)
        return "queued"

    def alert(*args: Any) -> None:
        alerts.append(args)

    breaker = CircuitBreaker("payments", failure_rate=0.5, minimum_calls=10,
                             window=10.0,            # seconds (time-based) or window_calls=N
                             reset_timeout=30.0, half_open_calls=1,
                             slow_call=2.0, slow_call_rate=0.8,
                             exclude=(NotFound,), fallback=queued_for_retry,
                             **extra)  # fmt: skip
    breaker.on("open", alert)
    return breaker


async def test_resilience_sample_pipeline_runs_async_and_sync_calls() -> None:
    alerts: list[Any] = []
    fallbacks: list[BaseException] = []
    breaker = _sample_breaker(alerts, fallbacks)
    policy = Pipeline(
        Timeout(3.0),
        Retry(3, backoff=0.1, max_backoff=2.0, jitter="full"),
        breaker,
        Bulkhead("payments", max_concurrent=10, max_queue=20, max_wait=1.0),
    )

    async def charge_card(order: dict[str, Any]) -> str:
        return f"charged {order['id']}"

    def read_cache(key: str) -> str:
        return f"cached {key}"

    order = {"id": 42}
    result = await policy.call(charge_card, order)  # coroutine functions
    assert result == "charged 42"
    key = "k"
    result = policy.call_sync(read_cache, key)  # plain functions: same core, sync driver
    assert result == "cached k"
    assert breaker.state == "closed"
    assert breaker.stats().successes_total == 2


async def test_resilience_sample_breaker_opens_alerts_and_falls_back() -> None:
    alerts: list[Any] = []
    fallbacks: list[BaseException] = []
    clock = ManualClock()
    breaker = _sample_breaker(alerts, fallbacks, clock=clock)
    calls = 0

    async def lookup(order: int) -> str:
        nonlocal calls
        calls += 1
        raise NotFound(order)

    for i in range(20):  # excluded errors count neither way: they are raised, not trip
        with pytest.raises(NotFound):
            await breaker.call(lookup, i)
    assert breaker.state == "closed"

    async def charge_card(order: int) -> str:
        nonlocal calls
        calls += 1
        raise ConnectionError("payments down")

    for i in range(9):
        assert await breaker.call(charge_card, i) == "queued"  # the fallback's answer
    assert breaker.state == "closed"  # fewer than minimum_calls seen
    assert await breaker.call(charge_card, 9) == "queued"
    assert breaker.state == "open"
    assert len(alerts) == 1
    seen = calls
    assert await breaker.call(charge_card, 10) == "queued"  # rejected fast, not called
    assert calls == seen
    assert isinstance(fallbacks[-1], CircuitOpenError)
    clock.advance(30.0)
    assert breaker.state == "half_open"

    async def healthy(order: int) -> str:
        return "ok"

    assert await breaker.call(healthy, 11) == "ok"
    assert breaker.state == "closed"


async def test_resilience_sample_half_open_lets_exactly_half_open_calls_through() -> None:
    clock = ManualClock()
    breaker = CircuitBreaker("payments", minimum_calls=2, reset_timeout=30.0, clock=clock)
    breaker.isolate()
    breaker.reset()
    for _ in range(2):
        with pytest.raises(ConnectionError):
            await breaker.call(_refuse)
    assert breaker.state == "open"
    clock.advance(30.0)
    release = asyncio.Event()
    reached = 0

    async def probe() -> str:
        nonlocal reached
        reached += 1
        await release.wait()
        return "ok"

    racers = [asyncio.ensure_future(breaker.call(probe)) for _ in range(20)]
    await asyncio.sleep(0)
    release.set()
    outcomes = await asyncio.gather(*racers, return_exceptions=True)
    assert reached == 1
    assert outcomes.count("ok") == 1
    assert all(isinstance(o, CircuitOpenError) for o in outcomes if o != "ok")
    assert breaker.state == "closed"

    breaker = CircuitBreaker(
        "payments", minimum_calls=2, reset_timeout=30.0, half_open_mode="wait", clock=clock
    )
    for _ in range(2):
        with pytest.raises(ConnectionError):
            await breaker.call(_refuse)
    clock.advance(30.0)
    release.clear()
    reached = 0
    racers = [asyncio.ensure_future(breaker.call(probe)) for _ in range(5)]
    await asyncio.sleep(0)
    release.set()
    assert await asyncio.gather(*racers) == ["ok"] * 5  # waited for the probe's verdict
    assert reached == 5


async def _refuse() -> None:
    raise ConnectionError("refused")


async def test_resilience_sample_breaker_decorates_keeping_the_signature() -> None:
    breaker = CircuitBreaker("payments")

    async def original(order: dict[str, Any], *, express: bool = False) -> str:
        return "charged"

    @breaker  # decorator: sync or async, signature kept
    async def charge(order: dict[str, Any], *, express: bool = False) -> str:
        return "charged"

    @breaker
    def read_cache(key: str) -> str:
        return key

    assert inspect.signature(charge) == inspect.signature(original)
    assert inspect.iscoroutinefunction(charge)
    assert charge.__name__ == "charge"
    assert await charge({"id": 1}) == "charged"
    assert read_cache("k") == "k"
    assert inspect.signature(read_cache).parameters.keys() == {"key"}


def test_resilience_sample_breaker_events_all_subscribe() -> None:
    breaker = CircuitBreaker("payments")
    for event in ("open", "half_open", "close", "reject", "success", "failure", "timeout"):
        unsubscribe = breaker.on(event, lambda *args: None)
        assert callable(unsubscribe)


def test_resilience_sample_opossum_options_are_accepted() -> None:
    # opossum users find their options: timeout, error_threshold_percentage,
    # reset_timeout, events, fallback
    breaker = CircuitBreaker(
        "payments",
        timeout=3.0,
        error_threshold_percentage=50,
        reset_timeout=30.0,
        fallback=lambda error: "queued",
    )
    assert breaker.config.failure_rate == 0.5
    with pytest.raises(ConfigError, match="error_threshold_percentage"):
        CircuitBreaker("payments", error_threshold_percentage=150)
    with pytest.raises(ConfigError, match="error_threshold_percentage"):
        CircuitBreaker("payments", error_threshold_percentage=50, failure_rate=0.4)


async def test_resilience_sample_bulkheads_give_one_pool_per_dependency() -> None:
    pools = Bulkheads({"payments": 10, "catalog": 20, "notifications": 5})
    assert {name: pools[name].stats().max_concurrent for name in pools} == {
        "payments": 10,
        "catalog": 20,
        "notifications": 5,
    }

    async def fetch() -> str:
        return "ok"

    assert await pools["catalog"].call(fetch) == "ok"
    one = Bulkhead("payments", max_concurrent=1, max_queue=0)
    gate = asyncio.Event()

    async def hold() -> None:
        await gate.wait()

    first = asyncio.ensure_future(one.call(hold))
    await asyncio.sleep(0)
    with pytest.raises(BulkheadFullError):
        await one.call(fetch)
    gate.set()
    await first


def test_resilience_sample_errors_live_in_the_area_package_and_errors() -> None:
    import seamwork.errors

    assert CircuitOpenError is seamwork.errors.CircuitOpenError
    assert BulkheadFullError is seamwork.errors.BulkheadFullError
    assert RateLimiter(10.0).stats() is not None


# --- §5 Events ----------------------------------------------------------------------------


@pytest.fixture(params=["sqlite", "postgres"])
def event_store_factory(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    if request.param == "sqlite":
        return lambda: EventStore.sqlite(str(tmp_path / "events.db"))
    dsn = request.getfixturevalue("pg_dsn")
    return lambda: EventStore.postgres(dsn)


def _evolve(state: dict[str, Any], event: RecordedEvent) -> dict[str, Any]:
    return {**state, "events": state["events"] + 1, **event.data}


async def test_events_sample_runs_as_written(event_store_factory: Any) -> None:
    store = event_store_factory()  # or EventStore.postgres(dsn)
    try:
        for expected in (NO_STREAM, 0, 1):
            await store.append(
                "order-42", [NewEvent("OrderPlaced", {"n": expected})], expected_version=expected
            )
        with pytest.raises(WrongExpectedVersion):
            await store.append(
                "order-42",
                [NewEvent("OrderShipped", {"carrier": "FedEx"})],
                expected_version=3,  # the stream is at 2
            )
        await store.append("order-42", [NewEvent("Paid", {"paid": True})], expected_version=2)
        await store.append("order-42", [NewEvent("OrderShipped", {"carrier": "FedEx"})],
                           expected_version=3)  # fmt: skip
        events = await store.read_stream("order-42")
        assert [e.version for e in events] == [0, 1, 2, 3, 4]  # first event has version 0
        last = events[-1]
        assert (last.stream, last.type, last.data) == (
            "order-42",
            "OrderShipped",
            {"carrier": "FedEx"},
        )
        assert last.metadata in (None, {})
        assert last.recorded_at > 0
        positions = [e.position for e in events]
        assert positions == sorted(set(positions))
        assert positions[0] > 0  # from_position=0 means from the very beginning

        seen: list[RecordedEvent] = []
        async for e in store.subscribe(from_position=0):  # catch-up, then live
            seen.append(e)
            if len(seen) == 5:
                await store.append("order-7", [NewEvent("OrderPlaced", {})])
            if len(seen) == 6:
                break
        assert [e.stream for e in seen] == ["order-42"] * 5 + ["order-7"]
        after = await store.read_all(from_position=positions[1])
        assert [e.position for e in after[:3]] == positions[2:]  # exclusive of p

        initial = {"events": 0}
        state = await store.load("order-42", _evolve, initial)  # replay
        assert state == {"events": 5, "n": 1, "paid": True, "carrier": "FedEx"}
        assert await store.load("order-42", _evolve, initial, as_of_version=1) == {
            "events": 2,
            "n": 0,
        }
    finally:
        await store.aclose()


def test_events_sample_constants_live_in_seamwork_events() -> None:
    import seamwork.events

    assert {"NO_STREAM", "ANY", "STREAM_EXISTS", "Projection"} <= set(seamwork.events.__all__)
    assert len({NO_STREAM, ANY, STREAM_EXISTS}) == 3


async def test_events_store_opens_on_first_use_and_stays_closed_after_aclose(
    event_store_factory: Any,
) -> None:
    store = event_store_factory()
    assert await store.read_stream("order-1") == []  # a read first opens it too
    await store.aclose()
    with pytest.raises(StoreError):
        await store.append("order-1", [NewEvent("OrderPlaced", {})])
    await store.open()  # an explicit open() opens it again
    try:
        await store.append("order-1", [NewEvent("OrderPlaced", {})])
        assert len(await store.read_stream("order-1")) == 1
    finally:
        await store.aclose()


# --- §6 Messaging -------------------------------------------------------------------------


def _make_table(path: Path, ddl: str) -> None:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute(ddl)
        conn.commit()


def _rows(path: Path, sql: str) -> list[tuple[Any, ...]]:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        return conn.execute(sql).fetchall()


async def test_messaging_sample_outbox_relay_inbox_over_embedded_nats(tmp_path: Path) -> None:
    orders_db, payments_db = tmp_path / "orders.db", tmp_path / "payments.db"
    _make_table(orders_db, "CREATE TABLE orders (id INTEGER PRIMARY KEY)")
    _make_table(payments_db, "CREATE TABLE charges (order_id INTEGER)")
    async with EmbeddedNats() as server:
        assert re.fullmatch(r"nats://127\.0\.0\.1:\d+", server.url)
        outbox = Outbox.sqlite(str(orders_db))  # the service's own database
        async with outbox.transaction() as tx:  # ONE local transaction
            await tx.execute("INSERT INTO orders(id) VALUES (?)", (42,))
            await tx.publish("orders.created", Message("OrderCreated", {"order_id": 42}))
        assert await outbox.pending_count() == 1
        relay = OutboxRelay(outbox, NatsBroker(server.url))
        await relay.drain()  # publish all pending once
        assert await outbox.pending_count() == 0  # rows not yet published

        inbox = Inbox.sqlite(str(payments_db))
        handled = asyncio.Event()
        received: list[Message] = []

        async def on_order(msg: Message, tx) -> None:  # type: ignore[no-untyped-def]
            await tx.execute("INSERT INTO charges(order_id) VALUES (?)", (msg.data["order_id"],))
            received.append(msg)
            handled.set()

        broker = NatsBroker(server.url)
        sub = await broker.subscribe(
            "orders.created", group="payments", handler=inbox.handler(on_order)
        )
        await asyncio.wait_for(handled.wait(), 10)
        message = received[0]
        assert uuid.UUID(message.id)  # id defaults to a fresh UUID
        assert message.type == "OrderCreated"
        assert message.data == {"order_id": 42}
        assert await inbox.seen(message.id)

        # the broker drops a duplicate id, and the inbox applies a redelivery nothing
        await broker.publish("orders.created", message)
        handled.clear()
        async with Outbox.sqlite(str(tmp_path / "again.db")) as again:
            async with again.transaction() as tx:
                await tx.publish(
                    "orders.created", Message("OrderCreated", {"order_id": 42}, id=message.id)
                )
            await OutboxRelay(again, broker).drain()
        assert _rows(payments_db, "SELECT order_id FROM charges") == [(42,)]

        # NatsBroker made (or reused) the stream ORDERS over orders.>
        client = await nats.connect(server.url)
        try:
            info = await client.jetstream().stream_info("ORDERS")
            assert "orders.>" in (info.config.subjects or [])
            assert info.state.messages == 1  # the duplicates were dropped
        finally:
            await client.close()
        await sub.stop()
        await broker.aclose()
        await relay.broker.aclose()
        await outbox.aclose()
        await inbox.aclose()
        assert _rows(orders_db, "SELECT id FROM orders") == [(42,)]


async def test_messaging_sample_message_signature() -> None:
    message = Message("OrderCreated", {"order_id": 42})
    assert uuid.UUID(message.id)
    assert message.id != Message("OrderCreated", {"order_id": 42}).id
    assert message.correlation_id is None or isinstance(message.correlation_id, str)
    given = Message(
        "OrderCreated", {"order_id": 42}, id="m-1", correlation_id="c-1", headers={"x-a": "1"}
    )
    assert (given.id, given.correlation_id, given.headers["x-a"]) == ("m-1", "c-1", "1")
    with pytest.raises(TypeError):
        Message("OrderCreated", {"order_id": 42}, "m-1")  # type: ignore[misc]  # keywords only


async def test_messaging_sample_embedded_nats_cleans_up_and_persists_on_request(
    tmp_path: Path,
) -> None:
    async with EmbeddedNats() as server:
        pid = server.pid
        assert pid is not None
        store = server._store
        assert store is not None
        assert store.exists()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # on exit the server process is gone
    assert not store.exists()  # its temporary store removed

    kept = tmp_path / "js"
    async with EmbeddedNats(store_dir=kept) as server:
        broker = NatsBroker(server.url)
        await broker.publish("orders.created", Message("OrderCreated", {"order_id": 1}))
        await broker.aclose()
    async with EmbeddedNats(store_dir=kept) as server:
        client = await nats.connect(server.url)
        try:
            info = await client.jetstream().stream_info("ORDERS")
            assert info.state.messages == 1  # the store persisted
        finally:
            await client.close()


async def test_messaging_sample_inbox_over_rabbitmq(rabbitmq_service: str, tmp_path: Path) -> None:
    topic = f"t{uuid.uuid4().hex[:10]}.created"
    payments_db = tmp_path / "payments.db"
    _make_table(payments_db, "CREATE TABLE charges (order_id INTEGER)")
    inbox = Inbox.sqlite(str(payments_db))
    handled, later = asyncio.Event(), asyncio.Event()

    async def on_order(msg: Message, tx) -> None:  # type: ignore[no-untyped-def]
        await tx.execute("INSERT INTO charges(order_id) VALUES (?)", (msg.data["order_id"],))
        if msg.data["order_id"] == 42:
            handled.set()
        else:
            later.set()

    broker = RabbitBroker(rabbitmq_service)
    try:
        sub = await broker.subscribe(
            topic, group=f"payments-{uuid.uuid4().hex[:8]}", handler=inbox.handler(on_order)
        )
        message = Message("OrderCreated", {"order_id": 42})
        outbox = Outbox.sqlite(str(tmp_path / "orders.db"))
        async with outbox.transaction() as tx:
            await tx.publish(topic, message)
        await OutboxRelay(outbox, broker).drain()  # sent with message_id = message.id
        await asyncio.wait_for(handled.wait(), 10)
        handled.clear()
        await broker.publish(topic, message)  # the same message again: applied nothing
        await broker.publish(topic, Message("OrderCreated", {"order_id": 43}))
        await asyncio.wait_for(later.wait(), 10)  # (queued behind the repeat)
        await outbox.aclose()
        await sub.stop()
    finally:
        await broker.aclose()
        await inbox.aclose()
    assert _rows(payments_db, "SELECT order_id FROM charges") == [(42,), (43,)]


def test_read_models_of_both_stores_come_from_seamwork_storage() -> None:
    # docs/architecture.md: SQLiteReadModel(path) and PostgresReadModel(dsn)
    from seamwork.storage import PostgresReadModel, SQLiteReadModel

    assert PostgresReadModel.__name__ == "PostgresReadModel"
    assert SQLiteReadModel.__name__ == "SQLiteReadModel"


async def test_messaging_sample_async_with_relay_runs_it(tmp_path: Path) -> None:
    async with EmbeddedNats() as server:
        outbox = Outbox.sqlite(str(tmp_path / "orders.db"))
        broker = NatsBroker(server.url)
        got = asyncio.Event()

        async def on_created(delivery: Delivery) -> None:
            got.set()

        sub = await broker.subscribe("orders.created", group="audit", handler=on_created)
        async with OutboxRelay(outbox, broker):  # `async with relay:` runs it
            async with outbox.transaction() as tx:
                await tx.publish("orders.created", Message("OrderCreated", {"order_id": 1}))
            await asyncio.wait_for(got.wait(), 10)
        assert await outbox.pending_count() == 0
        await sub.stop()
        await broker.aclose()
        await outbox.aclose()


async def test_saga_rule_nine_conditional_steps_parallel_groups_and_deadlines(
    tmp_path: Path,
) -> None:
    undone: list[str] = []
    ran: list[str] = []

    def step(name: str, *, fail: bool = False, hang: bool = False, **kw: Any) -> Step:
        async def action(ctx: StepContext) -> None:
            ran.append(name)
            if hang:
                await asyncio.Event().wait()
            if fail:
                raise StepFailed("no")

        async def compensate(ctx: StepContext) -> None:
            undone.append(name)

        return Step(name, action, compensate=compensate, **kw)

    gift = step("gift_wrap", when=lambda data: data.get("gift", False))
    grouped = Saga("grouped", steps=[
        step("first"),
        gift,
        Parallel(step("step_a"), step("step_b")),
        step("last", fail=True),
    ])  # fmt: skip
    late = Saga("late", steps=[step("early"), step("slow", hang=True)], deadline=0.3)
    stuck: list[SagaState] = []
    store = SQLiteStore(str(tmp_path / "sagas.db"))
    async with SagaOrchestrator(store, [grouped, late], on_stuck=stuck.append) as orch:
        state = await (await orch.start("grouped", {"gift": False})).wait()
        assert state.status == "failed"
        assert "gift_wrap" not in ran
        assert set(undone[:2]) == {"step_a", "step_b"}  # reverse completion order
        assert undone[2:] == ["first"]
        undone.clear()
        state = await (await orch.start("late", {})).wait()  # per-saga deadline
        assert state.status == "failed"
        assert undone == ["slow", "early"]  # the timed-out step is uncertain: undone too
    assert stuck == []
