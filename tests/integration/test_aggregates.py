"""The write model: aggregates deciding against a real SQLite event store.

(Projections into read models are checked by the read-model contract,
``seamwork.testing.read_model``, on SQLite and PostgreSQL: tests/contract.)
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from seamwork.events import (
    Aggregate,
    EventStore,
    NewEvent,
    RecordedEvent,
    Upcasters,
    WrongExpectedVersion,
)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[EventStore]:
    async with EventStore.sqlite(tmp_path / "events.db") as store:
        yield store


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


async def test_an_aggregate_folds_its_new_events_as_a_reload_reads_them(tmp_path: Path) -> None:
    # Deposited v1 held "amount"; v2 holds "cents". A decide still writing v1 (the
    # default schema version) is read back upcast: the state handed back must agree.
    upcasters = Upcasters()
    upcasters.register("Deposited", 1, lambda d: {"cents": d["amount"] * 100})

    def evolve_v2(state: dict[str, int], event: RecordedEvent) -> dict[str, int]:
        return {"balance": state["balance"] + event.data["cents"]}

    def decide_v1(command: int, state: dict[str, int]) -> list[NewEvent]:
        return [NewEvent("Deposited", {"amount": command})]

    legacy: Aggregate[dict[str, int], int] = Aggregate(
        "account", {"balance": 0}, evolve_v2, decide_v1
    )
    async with EventStore.sqlite(tmp_path / "events.db", upcasters=upcasters) as store:
        decision = await legacy.handle(store, "a4", 5)
        assert decision.state == {"balance": 500}
        assert decision.state == (await legacy.load(store, "a4")).state


@pytest.mark.parametrize("retries", [1.5, "3", True, -1])
async def test_retries_that_are_not_a_whole_number_from_0_are_refused_by_name(
    store: EventStore, retries: object
) -> None:
    # 1.5 failed in range() with a bare TypeError; nothing is decided or appended
    from seamwork.errors import ConfigError

    with pytest.raises(ConfigError, match="retries must be"):
        await account.handle(store, "a9", ("deposit", 1), retries=retries)  # type: ignore[arg-type]
    assert await store.read_stream(account.stream("a9")) == []
