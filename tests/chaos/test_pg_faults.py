"""Database faults under a running orchestrator on PostgreSQL.

The orchestrator runs in the test process; the services keep their books on the
shared server, the saga store suffers the fault: connections terminated by the
server, a stalled network (a proxy that stops forwarding), connections cut right
after the server committed a transition, and - on a private cluster this test
creates, never the shared one - two crash-restarts (``pg_ctl -m immediate``).
Afterwards the books must balance: every saga terminal, nothing applied twice,
compensations only of applied steps, in reverse order.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import re
import time
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from pg_chaos import check_invariants, fresh_schema, store_and_books
from pg_faults import PrivateCluster, Proxy, pg_bin
from pg_saga_app import Services, create_books, order_sagas

from seamwork.errors import StoreError, StoreUnavailable
from seamwork.saga import SagaOrchestrator, SagaState
from seamwork.storage import PostgresStore
from seamwork.testing.broker import until
from seamwork.testing.saga_store import OWNER, saga_state, started

pytestmark = pytest.mark.chaos

SCENARIOS = ("ok", "ok", "ok", "decline", "late_decline")


def make_plan(count: int, seed: int) -> list[dict[str, str]]:
    rng = random.Random(seed)
    return [{"id": f"order-{i}", "scenario": rng.choice(SCENARIOS)} for i in range(count)]


def orchestrator(store: str, ledger: str, **options: Any) -> tuple[SagaOrchestrator, Services]:
    services = Services(ledger)
    timeout = options.pop("query_timeout", 2.0)
    options = {"lease_seconds": 2.0, "recovery_interval": 0.1, **options}
    orch = SagaOrchestrator(
        PostgresStore(store, query_timeout=timeout), order_sagas(services), **options
    )
    return orch, services


async def run_plan(
    orch: SagaOrchestrator,
    plan: list[dict[str, str]],
    *,
    in_flight: int = 16,
    timeout: float = 60,
    errors: list[float] | None = None,
) -> list[SagaState]:
    """Start and await every saga, as a client would: a store error means try again
    (``start`` with the same id is idempotent)."""
    gate = asyncio.Semaphore(in_flight)

    async def one(entry: dict[str, str]) -> SagaState:
        async with gate:
            while True:
                try:
                    data = {"scenario": entry["scenario"]}
                    run = await orch.start("order", data, saga_id=entry["id"])
                    return await run.wait()
                except StoreError:
                    if errors is not None:
                        errors.append(time.monotonic())
                    await asyncio.sleep(0.05)

    tasks = [asyncio.ensure_future(one(entry)) for entry in plan]
    _, pending = await asyncio.wait(tasks, timeout=timeout)
    for task in pending:
        task.cancel()
    unfinished = [plan[i]["id"] for i, task in enumerate(tasks) if task in pending]
    assert not unfinished, f"not finished in {timeout}s: {unfinished[:20]} (of {len(unfinished)})"
    return [task.result() for task in tasks]


def with_port(dsn: str, port: int) -> str:
    return re.sub(r"\bport=\d+", f"port={port}", dsn) if "port=" in dsn else f"{dsn} port={port}"


class Transitions:
    """Monotonic times of committed transitions (hooks fire after the commit)."""

    def __init__(self, orch: SagaOrchestrator) -> None:
        self.times: list[float] = []
        for event in ("completed", "failed"):
            orch.on(event, lambda state: self.times.append(time.monotonic()))
        for event in ("step_completed", "compensated"):
            orch.on(event, lambda state, step: self.times.append(time.monotonic()))

    def first_after(self, moment: float) -> float:
        return min((t for t in self.times if t > moment), default=float("inf")) - moment


class StoreErrors(logging.Handler):
    """Times at which the store's failure surfaced: under a saga, in a recovery round,
    or to a client whose start() got a StoreError (``run_plan`` reports those here)."""

    def __init__(self) -> None:
        super().__init__()
        self.times: list[float] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "store error" in message or "recovery round failed" in message:
            self.times.append(time.monotonic())


@pytest.fixture
def store_errors() -> Iterator[StoreErrors]:
    handler = StoreErrors()
    logger = logging.getLogger("seamwork.saga")
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)


@pytest.mark.timeout(120)
async def test_terminated_connections_lose_nothing_and_apply_nothing_twice(
    pg_database: str,
) -> None:
    store, ledger = store_and_books(pg_database)
    name = f"seamwork_store_{uuid.uuid4().hex[:8]}"
    orch, services = orchestrator(f"{store} application_name={name}", ledger)
    plan = make_plan(600, seed=1)
    kills = 0

    async def killer() -> None:
        nonlocal kills
        rng = random.Random(2)
        async with await psycopg.AsyncConnection.connect(pg_database, autocommit=True) as conn:
            while True:
                await asyncio.sleep(rng.uniform(0.03, 0.15))
                cursor = await conn.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE application_name = %s ORDER BY random() LIMIT 1",
                    (name,),
                )
                row = await cursor.fetchone()
                kills += bool(row and row[0])

    async with orch:
        task = asyncio.create_task(killer())
        try:  # batches of 150 until at least 15 kills landed (a fast run needs more)
            for start in range(0, len(plan), 150):
                await run_plan(orch, plan[start : start + 150])
                if kills >= 15 and start >= 150:
                    plan = plan[: start + 150]
                    break
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    await services.aclose()
    assert kills >= 15, kills
    check_invariants(store, ledger, plan)


@pytest.mark.timeout(120)
async def test_a_stalled_connection_is_detected_within_2s_and_recovered_after(
    pg_database: str, store_errors: StoreErrors
) -> None:
    store, ledger = store_and_books(pg_database)
    proxy = Proxy(5432)
    await proxy.start()
    orch, services = orchestrator(with_port(store, proxy.port), ledger, query_timeout=1.5)
    transitions = Transitions(orch)
    plan = make_plan(150, seed=3)
    async with orch:
        work = asyncio.create_task(run_plan(orch, plan, in_flight=8, errors=store_errors.times))
        await asyncio.sleep(0.5)
        stalled = time.monotonic()
        proxy.stall()
        await asyncio.sleep(3.0)
        resumed = time.monotonic()
        proxy.resume()
        await work
    await services.aclose()
    await proxy.aclose()
    detected = min(t for t in store_errors.times if t > stalled) - stalled
    assert detected <= 2.0, f"a stall was noticed after {detected:.2f}s"
    assert transitions.first_after(resumed) <= 2.0
    check_invariants(store, ledger, plan)


@pytest.mark.timeout(120)
async def test_a_connection_cut_after_commit_is_resolved_by_rereading(
    pg_database: str, store_errors: StoreErrors
) -> None:
    store, ledger = store_and_books(pg_database)
    proxy = Proxy(5432)
    await proxy.start()
    orch, services = orchestrator(with_port(store, proxy.port), ledger)
    plan = make_plan(120, seed=4)
    async with orch:
        proxy.cut_after_commits(10)
        await run_plan(orch, plan, in_flight=8)
    await services.aclose()
    await proxy.aclose()
    assert proxy.cuts == 10
    assert store_errors.times, "no transition was left in doubt"
    check_invariants(store, ledger, plan)
    with psycopg.connect(ledger) as conn:
        reruns = conn.execute(
            "SELECT saga_id, step, kind, count(*) FROM calls GROUP BY 1, 2, 3 HAVING count(*) > 1"
        ).fetchall()
    assert reruns == [], "a commit in doubt was guessed (the step ran again), not re-read"


async def test_a_read_after_the_pools_connections_were_terminated_still_answers(
    pg_database: str,
) -> None:
    name = f"seamwork_store_{uuid.uuid4().hex[:8]}"
    store = PostgresStore(f"{fresh_schema(pg_database, 'sagas')} application_name={name}")
    await store.open()
    try:
        assert await store.create(saga_state("s-1"), started("s-1"))
        await asyncio.gather(*(store.get("s-1") for _ in range(4)))  # the pool fills up
        async with await psycopg.AsyncConnection.connect(pg_database, autocommit=True) as conn:
            cursor = await conn.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE application_name = %s",
                (name,),
            )
            row = await cursor.fetchone()
            assert row is not None
            assert row[0] >= 2
        await asyncio.sleep(0.2)  # the backends are gone; the pool does not know yet
        state = await store.get("s-1")
        assert state is not None
        assert state.saga_id == "s-1"
        assert [s.saga_id for s in await store.list()] == ["s-1"]
    finally:
        await store.aclose()


async def test_a_save_on_a_stalled_server_fails_within_the_deadline_not_after_it(
    pg_database: str,
) -> None:
    dsn = fresh_schema(pg_database, "sagas")
    proxy = Proxy(5432)
    await proxy.start()
    store = PostgresStore(with_port(dsn, proxy.port), query_timeout=1.0)
    await store.open()
    try:
        state = saga_state("s-1")
        assert await store.create(state, started("s-1"))
        proxy.stall()
        began = time.monotonic()
        with pytest.raises(StoreUnavailable):
            await store.save(state.evolve(updated_at=1001.0), [], owner=OWNER)
        waited = time.monotonic() - began
        assert waited <= 2.0, f"the caller waited {waited:.2f}s on a 1s deadline"
        proxy.resume()  # the writer reconnects in the background; the next save lands

        async def saved() -> bool:
            try:
                await store.save(state.evolve(updated_at=1002.0), [], owner=OWNER)
            except StoreUnavailable:
                return False
            return True

        await until(saved, seconds=15)
        reread = await store.get("s-1")
        assert reread is not None
        assert reread.updated_at == 1002.0
    finally:
        proxy.resume()
        await store.aclose()
        await proxy.aclose()


async def test_opening_on_a_stalled_server_fails_within_the_deadline(pg_database: str) -> None:
    """``open()`` connected (to check or create the schema) with no deadline: on a server
    that accepts the connection and never answers, ``seamwork sagas list --postgres`` and
    ``seamwork worker`` waited for good; it now fails after ``query_timeout``."""
    dsn = fresh_schema(pg_database, "sagas")
    proxy = Proxy(5432)
    await proxy.start()
    store = PostgresStore(with_port(dsn, proxy.port), query_timeout=1.0, create=False)
    try:
        proxy.stall()
        began = time.monotonic()
        with pytest.raises(StoreUnavailable, match="no answer within 1s"):
            await asyncio.wait_for(store.open(), 15)
        waited = time.monotonic() - began
        assert waited <= 2.0, f"open() waited {waited:.2f}s on a 1s deadline"
    finally:
        proxy.resume()
        await store.aclose()
        await proxy.aclose()


@pytest.fixture
def private_cluster() -> Iterator[PrivateCluster]:
    if pg_bin("initdb") is None:
        if os.environ.get("SEAMWORK_REQUIRE_SERVICES") == "1":
            pytest.fail("initdb is missing: cannot create a private PostgreSQL cluster")
        pytest.skip("initdb is missing: cannot create a private PostgreSQL cluster")
    cluster = PrivateCluster()
    try:
        cluster.create()
        yield cluster
    finally:
        cluster.destroy()


@pytest.mark.timeout(150)
async def test_two_immediate_restarts_lose_nothing_and_recovery_resumes_within_1s(
    pg_database: str, private_cluster: PrivateCluster
) -> None:
    ledger = fresh_schema(pg_database, "books")
    create_books(ledger)
    store = fresh_schema(private_cluster.dsn, "sagas")
    orch, services = orchestrator(store, ledger)
    transitions = Transitions(orch)
    plan = make_plan(1000, seed=5)
    back: list[float] = []
    async with orch:
        work = asyncio.create_task(run_plan(orch, plan, in_flight=16, timeout=90))
        for _ in range(2):
            await asyncio.sleep(1.0)
            assert not work.done(), "the sagas finished before the database went down"
            await asyncio.to_thread(private_cluster.crash)
            await asyncio.sleep(1.0)
            await asyncio.to_thread(private_cluster.start)
            back.append(time.monotonic())
        await work
    await services.aclose()
    check_invariants(store, ledger, plan)
    resumed = [transitions.first_after(moment) for moment in back]
    assert max(resumed) <= 1.0, f"transitions resumed {resumed} s after the database was back"
