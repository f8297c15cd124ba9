"""Projections into a SQLite read model: exactly-once checkpoints, rebuild, dead letters."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from seamwork.events import (
    Aggregate,
    EventStore,
    NewEvent,
    Projection,
    ProjectionRunner,
    RecordedEvent,
    WrongExpectedVersion,
    handles,
)
from seamwork.storage import SQLiteReadModel


class Totals(Projection):
    """Sum of amounts per stream; raises on a poisoned event."""

    name = "totals"

    def setup(self, conn: sqlite3.Connection) -> None:
        conn.execute("CREATE TABLE IF NOT EXISTS totals (stream TEXT PRIMARY KEY, total INT)")

    def reset(self, conn: sqlite3.Connection) -> None:
        conn.execute("DELETE FROM totals")

    @handles("Added")
    def added(self, event: RecordedEvent, conn: sqlite3.Connection) -> None:
        if event.data.get("poison"):
            raise ValueError("cannot add poison")
        conn.execute(
            "INSERT INTO totals VALUES (?, ?) "
            "ON CONFLICT(stream) DO UPDATE SET total = total + excluded.total",
            (event.stream, event.data["n"]),
        )


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[EventStore]:
    async with EventStore.sqlite(tmp_path / "events.db") as store:
        yield store


@pytest.fixture
async def read_model(tmp_path: Path) -> AsyncIterator[SQLiteReadModel]:
    model = SQLiteReadModel(tmp_path / "read.db")
    await model.open()
    yield model
    await model.aclose()


async def totals(model: SQLiteReadModel) -> dict[str, int]:
    return {row["stream"]: row["total"] for row in await model.query("SELECT * FROM totals")}


async def test_a_projection_applies_every_event_once_and_checkpoints_with_it(
    store: EventStore, read_model: SQLiteReadModel
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
    store: EventStore, read_model: SQLiteReadModel
) -> None:
    for i in range(20):
        await store.append("s", [NewEvent("Added", {"n": i})])
    runner = ProjectionRunner(store, Totals(), read_model)
    await runner.catch_up()
    with sqlite3.connect(read_model.path) as conn:
        conn.execute("UPDATE totals SET total = -1")  # the read model drifted
    await runner.rebuild()
    assert await totals(read_model) == {"s": sum(range(20))}


async def test_a_failing_event_parks_its_stream_while_others_flow(
    store: EventStore, read_model: SQLiteReadModel
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
    await store.append("bad", [NewEvent("Added", {"n": 100})])
    await runner.catch_up()
    assert len(await runner.parked()) == 3  # still queued behind the poison
    assert await runner.replay("bad") == 0  # not fixed yet: nothing moves


async def test_replaying_a_fixed_stream_applies_its_parked_events_in_order(
    store: EventStore, read_model: SQLiteReadModel
) -> None:
    await store.append("bad", [NewEvent("Added", {"n": 5, "poison": True})])
    await store.append("bad", [NewEvent("Added", {"n": 7})])
    runner = ProjectionRunner(store, Totals(), read_model)
    await runner.catch_up()
    assert await totals(read_model) == {}

    class Fixed(Totals):
        @handles("Added")
        def added(self, event: RecordedEvent, conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO totals VALUES (?, ?) "
                "ON CONFLICT(stream) DO UPDATE SET total = total + excluded.total",
                (event.stream, event.data["n"]),
            )

    fixed = ProjectionRunner(store, Fixed(), read_model)
    assert await fixed.replay("bad") == 2
    assert await totals(read_model) == {"bad": 12}
    assert await fixed.parked() == []
    await store.append("bad", [NewEvent("Added", {"n": 1})])
    await fixed.catch_up()
    assert await totals(read_model) == {"bad": 13}


async def test_a_live_runner_follows_new_events(
    store: EventStore, read_model: SQLiteReadModel
) -> None:
    import asyncio

    async with ProjectionRunner(store, Totals(), read_model) as runner:
        for n in range(1, 6):
            await store.append("s", [NewEvent("Added", {"n": n})])
        for _ in range(200):
            if (await totals(read_model)).get("s") == 15:
                break
            await asyncio.sleep(0.01)
        assert runner.checkpoint == (await store.read_all())[-1].position
    assert await totals(read_model) == {"s": 15}


# --- the write model ---------------------------------------------------------------------


def evolve(state: dict[str, int], event: RecordedEvent) -> dict[str, int]:
    if event.type == "Deposited":
        return {"balance": state["balance"] + event.data["amount"]}
    if event.type == "Withdrawn":
        return {"balance": state["balance"] - event.data["amount"]}
    return state


def decide(command: tuple[str, int], state: dict[str, int]) -> list[NewEvent]:
    kind, amount = command
    if kind == "withdraw" and amount > state["balance"]:
        raise ValueError("insufficient funds")
    return [NewEvent("Deposited" if kind == "deposit" else "Withdrawn", {"amount": amount})]


account: Aggregate[dict[str, int], tuple[str, int]] = Aggregate(
    "account", {"balance": 0}, evolve, decide
)


async def test_an_aggregate_enforces_its_invariant_under_concurrent_commands(
    store: EventStore,
) -> None:
    import asyncio

    await account.handle(store, "a1", ("deposit", 100))
    results = await asyncio.gather(
        *(account.handle(store, "a1", ("withdraw", 30), retries=10) for _ in range(5)),
        return_exceptions=True,
    )
    succeeded = [r for r in results if not isinstance(r, BaseException)]
    refused = [r for r in results if isinstance(r, ValueError)]
    assert (len(succeeded), len(refused)) == (3, 2)
    loaded = await account.load(store, "a1")
    assert loaded.state == {"balance": 10}
    assert loaded.version == 3


async def test_an_aggregate_gives_up_after_its_retries(store: EventStore) -> None:
    await store.append("account-a2", [NewEvent("Deposited", {"amount": 5})])

    def racing_decide(command: tuple[str, int], state: dict[str, int]) -> list[NewEvent]:
        return [NewEvent("Deposited", {"amount": command[1]})]

    original = store.append

    async def append_after_a_rival(stream, events, *, expected_version):  # type: ignore[no-untyped-def]
        await original(stream, [NewEvent("Deposited", {"amount": 1})])
        return await original(stream, events, expected_version=expected_version)

    store.append = append_after_a_rival  # type: ignore[method-assign]
    racing = Aggregate("account", {"balance": 0}, evolve, racing_decide)
    with pytest.raises(WrongExpectedVersion):
        await racing.handle(store, "a2", ("deposit", 1), retries=2)
    store.append = original  # type: ignore[method-assign]
    final = await account.load(store, "a2")
    assert (final.version, final.state) == (3, {"balance": 8})  # three rivals', none of ours


async def test_an_aggregate_recreated_after_a_delete_reports_the_store_versions(
    store: EventStore,
) -> None:
    def note_where(state: dict[str, int], event: RecordedEvent) -> dict[str, int]:
        return {**evolve(state, event), "version": event.version, "position": event.position}

    tracked = Aggregate("account", {"balance": 0}, note_where, decide)
    await tracked.handle(store, "a3", ("deposit", 5))
    await tracked.handle(store, "a3", ("deposit", 5))
    await store.delete_stream("account-a3", expected_version=1)
    decision = await tracked.handle(store, "a3", ("deposit", 7))
    (stored,) = await store.read_stream("account-a3")
    assert decision.state == {"balance": 7, "version": stored.version, "position": stored.position}
    assert decision.state == (await tracked.load(store, "a3")).state  # folded == reloaded


# --- runners that overlap ------------------------------------------------------------------


async def test_catch_up_beside_a_live_runner_applies_each_event_once(
    store: EventStore, read_model: SQLiteReadModel
) -> None:
    import asyncio

    for n in range(1, 4):
        await store.append("s", [NewEvent("Added", {"n": n})])
    async with ProjectionRunner(store, Totals(), read_model) as runner:
        await runner.catch_up()
        await asyncio.sleep(0.2)
    assert await totals(read_model) == {"s": 6}


async def test_two_runners_on_one_read_model_apply_each_event_once(
    store: EventStore, read_model: SQLiteReadModel
) -> None:
    import asyncio

    for n in range(1, 4):
        await store.append("s", [NewEvent("Added", {"n": n})])
    first = ProjectionRunner(store, Totals(), read_model)
    second = ProjectionRunner(store, Totals(), read_model)  # an overlapping replica
    await asyncio.gather(first.catch_up(), second.catch_up())
    assert await totals(read_model) == {"s": 6}


async def test_a_live_runner_keeps_following_after_a_rebuild(
    store: EventStore, read_model: SQLiteReadModel
) -> None:
    import asyncio

    await store.append("s", [NewEvent("Added", {"n": 1})])
    async with ProjectionRunner(store, Totals(), read_model) as runner:
        await runner.rebuild()
        await store.append("s", [NewEvent("Added", {"n": 2})])
        for _ in range(200):
            if await totals(read_model) == {"s": 3}:
                break
            await asyncio.sleep(0.01)
    assert await totals(read_model) == {"s": 3}


async def test_a_replay_while_events_keep_arriving_leaves_nothing_parked(
    store: EventStore, read_model: SQLiteReadModel
) -> None:
    import asyncio

    await store.append("s", [NewEvent("Added", {"n": 1, "poison": True})])

    class Fixed(Totals):
        @handles("Added")
        def added(self, event: RecordedEvent, conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO totals VALUES (?, ?) "
                "ON CONFLICT(stream) DO UPDATE SET total = total * 10 + excluded.total",
                (event.stream, event.data["n"]),
            )

    async with ProjectionRunner(store, Totals(), read_model):
        await asyncio.sleep(0.2)
        await store.append("s", [NewEvent("Added", {"n": 2})])  # parked behind the poison
        await asyncio.sleep(0.2)
    async with ProjectionRunner(store, Fixed(), read_model) as fixed:
        appending = asyncio.create_task(store.append("s", [NewEvent("Added", {"n": 3})]))
        await fixed.replay("s")
        await appending
        await store.append("s", [NewEvent("Added", {"n": 4})])
        for _ in range(200):
            if not await fixed.parked() and (await totals(read_model)).get("s") == 1234:
                break
            await asyncio.sleep(0.01)
        parked = await fixed.parked()
    assert parked == []
    assert await totals(read_model) == {"s": 1234}  # applied once each, in stream order
