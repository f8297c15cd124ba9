"""Projections into a PostgreSQL read model: exactly-once checkpoints, rebuild, dead
letters, replay and a live runner (the SQLite read model's tests, on PostgreSQL)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from seamwork.events import (
    EventStore,
    NewEvent,
    Projection,
    ProjectionRunner,
    RecordedEvent,
    handles,
)
from seamwork.storage.postgres_readmodel import PostgresReadModel

pytestmark = pytest.mark.postgres


class Totals(Projection):
    """Sum of amounts per stream; raises on a poisoned event."""

    name = "totals"

    def setup(self, conn: Any) -> None:
        conn.execute("CREATE TABLE IF NOT EXISTS totals (stream text PRIMARY KEY, total int)")

    def reset(self, conn: Any) -> None:
        conn.execute("DELETE FROM totals")

    @handles("Added")
    def added(self, event: RecordedEvent, conn: Any) -> None:
        if event.data.get("poison"):
            raise ValueError("cannot add poison")
        conn.execute(
            "INSERT INTO totals VALUES (%s, %s) "
            "ON CONFLICT (stream) DO UPDATE SET total = totals.total + excluded.total",
            (event.stream, event.data["n"]),
        )


class Fixed(Totals):
    @handles("Added")
    def added(self, event: RecordedEvent, conn: Any) -> None:
        conn.execute(
            "INSERT INTO totals VALUES (%s, %s) "
            "ON CONFLICT (stream) DO UPDATE SET total = totals.total + excluded.total",
            (event.stream, event.data["n"]),
        )


@pytest.fixture
async def store(pg_dsn: str) -> AsyncIterator[EventStore]:
    async with EventStore.postgres(pg_dsn) as store:
        yield store


@pytest.fixture
async def read_model(pg_dsn: str) -> AsyncIterator[PostgresReadModel]:
    model = PostgresReadModel(pg_dsn)
    await model.open()
    yield model
    await model.aclose()


async def totals(model: PostgresReadModel) -> dict[str, int]:
    return {row["stream"]: row["total"] for row in await model.query("SELECT * FROM totals")}


async def test_a_projection_applies_every_event_once_and_checkpoints_with_it(
    store: EventStore, read_model: PostgresReadModel
) -> None:
    for i in range(50):
        await store.append(f"s-{i % 3}", [NewEvent("Added", {"n": 1}), NewEvent("Other")])
    runner = ProjectionRunner(store, Totals(), read_model, batch_size=7)
    checkpoint = await runner.catch_up()
    assert await totals(read_model) == {"s-0": 17, "s-1": 17, "s-2": 16}
    assert checkpoint == (await store.read_all(limit=1000))[-1].position
    again = ProjectionRunner(store, Totals(), read_model)  # a restarted process
    assert await again.catch_up() == checkpoint
    assert await totals(read_model) == {"s-0": 17, "s-1": 17, "s-2": 16}


async def test_rebuild_projects_everything_again_from_zero(
    store: EventStore, read_model: PostgresReadModel
) -> None:
    for i in range(20):
        await store.append("s", [NewEvent("Added", {"n": i})])
    runner = ProjectionRunner(store, Totals(), read_model)
    await runner.catch_up()
    await read_model.query("UPDATE totals SET total = -1 RETURNING stream")  # drifted
    await runner.rebuild()
    assert await totals(read_model) == {"s": sum(range(20))}


async def test_a_failing_event_parks_its_stream_while_others_flow(
    store: EventStore, read_model: PostgresReadModel
) -> None:
    await store.append("good", [NewEvent("Added", {"n": 1})])
    await store.append("bad", [NewEvent("Added", {"n": 1})])
    await store.append("bad", [NewEvent("Added", {"n": 5, "poison": True})])
    await store.append("bad", [NewEvent("Added", {"n": 7})])
    await store.append("good", [NewEvent("Added", {"n": 2})])
    runner = ProjectionRunner(store, Totals(), read_model)
    await runner.catch_up()
    assert await totals(read_model) == {"good": 3, "bad": 1}
    parked = await runner.parked()
    assert [(p.stream, p.error is not None) for p in parked] == [("bad", True), ("bad", False)]
    assert "cannot add poison" in (parked[0].error or "")
    assert await runner.replay("bad") == 0  # not fixed yet: nothing moves


async def test_replaying_a_fixed_stream_applies_its_parked_events_in_order(
    store: EventStore, read_model: PostgresReadModel
) -> None:
    await store.append("bad", [NewEvent("Added", {"n": 5, "poison": True})])
    await store.append("bad", [NewEvent("Added", {"n": 7})])
    await ProjectionRunner(store, Totals(), read_model).catch_up()
    assert await totals(read_model) == {}
    fixed = ProjectionRunner(store, Fixed(), read_model)
    assert await fixed.replay("bad") == 2
    assert await totals(read_model) == {"bad": 12}
    assert await fixed.parked() == []


async def test_a_failing_sql_statement_in_a_handler_parks_only_its_event(
    store: EventStore, read_model: PostgresReadModel
) -> None:
    class BadSql(Totals):
        @handles("Broken")
        def broken(self, event: RecordedEvent, conn: Any) -> None:
            conn.execute("INSERT INTO no_such_table VALUES (1)")

    await store.append("a", [NewEvent("Added", {"n": 1})])
    await store.append("b", [NewEvent("Broken")])
    await store.append("a", [NewEvent("Added", {"n": 2})])
    runner = ProjectionRunner(store, BadSql(), read_model)
    await runner.catch_up()
    assert await totals(read_model) == {"a": 3}
    assert [p.stream for p in await runner.parked()] == ["b"]


async def test_a_live_runner_follows_new_events(
    store: EventStore, read_model: PostgresReadModel
) -> None:
    async with ProjectionRunner(store, Totals(), read_model) as runner:
        for n in range(1, 6):
            await store.append("s", [NewEvent("Added", {"n": n})])
        for _ in range(300):
            if (await totals(read_model)).get("s") == 15:
                break
            await asyncio.sleep(0.01)
        assert runner.checkpoint == (await store.read_all())[-1].position
    assert await totals(read_model) == {"s": 15}


async def test_replicas_starting_together_apply_each_event_once(
    store: EventStore, pg_dsn: str
) -> None:
    for n in range(1, 4):
        await store.append("s", [NewEvent("Added", {"n": n})])
    first, second = PostgresReadModel(pg_dsn), PostgresReadModel(pg_dsn)
    try:
        await asyncio.gather(
            ProjectionRunner(store, Totals(), first).catch_up(),
            ProjectionRunner(store, Totals(), second).catch_up(),
        )
        assert await totals(first) == {"s": 6}
    finally:
        await first.aclose()
        await second.aclose()
