"""64 concurrent appenders over 1,000 streams, with planted stale appends.

Each stream has one owner task that knows its version; now and then the owner
plants a stale append (an expected version behind the stream, one skipping ahead of
it, or ``NO_STREAM`` on a stream that exists). Then pairs of appenders from different
store instances race for the same expected version. The store must reject exactly
the planted and the losing appends, and keep everything else: versions without a
gap, every accepted event once in its stream and once in ``$all``, nothing of a
rejected append anywhere.

The appenders share several store instances (separate connections to the same
database), so the version check is exercised across connections, not just inside
one group-commit writer.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from seamwork.events import NO_STREAM, EventStore, NewEvent, WrongExpectedVersion

APPENDERS = 64
STREAMS = 1000
APPENDS_PER_STREAM = 6
STALE_RATE = 0.1
RACED_STREAMS = 100


@dataclass
class Ledger:
    """What the appenders did: accepted events per stream, planted and rejected appends."""

    accepted: dict[str, list[str]] = field(default_factory=dict)
    planted: set[tuple[str, int]] = field(default_factory=set)
    rejected: set[tuple[str, int]] = field(default_factory=set)
    rejected_ids: set[str] = field(default_factory=set)
    unexpected: list[str] = field(default_factory=list)


def stale_expectation(rng: random.Random, version: int) -> int | str:
    """An expected version that is certainly wrong for a stream at ``version``."""
    choices: list[int | str] = [version + 1 + rng.randrange(3)]  # skipping ahead
    if version >= 0:
        choices += [rng.randrange(version + 1) - 1 if version > 0 else NO_STREAM, NO_STREAM]
    choice = rng.choice(choices)
    return NO_STREAM if choice == -1 else choice


async def owner(index: int, store: EventStore, ledger: Ledger, rng: random.Random) -> None:
    """Append to the streams this task owns, interleaved, planting stale appends."""
    mine = [f"s-{n}" for n in range(index, STREAMS, APPENDERS)]
    versions = dict.fromkeys(mine, -1)
    for step in range(APPENDS_PER_STREAM):
        for stream in mine:
            version = versions[stream]
            batch = [NewEvent("Appended", {"step": step, "k": k}) for k in range(rng.randint(1, 3))]
            stale = rng.random() < STALE_RATE
            expected = (
                stale_expectation(rng, version)
                if stale
                else (NO_STREAM if version < 0 else version)
            )
            key = (stream, step)
            if stale:
                ledger.planted.add(key)
            try:
                result = await store.append(stream, batch, expected_version=expected)
            except WrongExpectedVersion as exc:
                ledger.rejected.add(key)
                ledger.rejected_ids.update(e.id for e in batch)
                if exc.actual != version:
                    ledger.unexpected.append(f"{stream}: actual {exc.actual} != {version}")
                continue
            ledger.accepted.setdefault(stream, []).extend(e.id for e in batch)
            versions[stream] = result.version
            if result.version != version + len(batch):
                ledger.unexpected.append(f"{stream}: version {result.version} after {version}")


async def race(stream: str, stores: list[EventStore], ledger: Ledger) -> int:
    """Two appenders on different stores append at the same expected version."""
    version = len(ledger.accepted[stream]) - 1
    batches = [[NewEvent("Raced", {"by": i})] for i in range(2)]
    results = await asyncio.gather(
        *(
            store.append(stream, batch, expected_version=version)
            for store, batch in zip(stores[:2], batches, strict=True)
        ),
        return_exceptions=True,
    )
    winners = 0
    for batch, result in zip(batches, results, strict=True):
        if isinstance(result, WrongExpectedVersion):
            ledger.rejected_ids.update(e.id for e in batch)
        elif isinstance(result, BaseException):
            raise result
        else:
            winners += 1
            ledger.accepted[stream].extend(e.id for e in batch)
    return winners


async def check_store(store: EventStore, ledger: Ledger) -> None:
    total = 0
    for stream, ids in ledger.accepted.items():
        events = await store.read_stream(stream)
        assert [e.version for e in events] == list(range(len(ids))), stream
        assert [e.id for e in events] == ids, stream
        total += len(ids)
    every = []
    position = 0
    while page := await store.read_all(from_position=position, limit=5000):
        every.extend(page)
        position = page[-1].position
    positions = [e.position for e in every]
    assert positions == sorted(set(positions)), "positions must be strictly increasing"
    assert len(every) == total
    seen = {e.id for e in every}
    assert len(seen) == total
    assert not (seen & ledger.rejected_ids)


async def run_scenario(stores: list[EventStore]) -> None:
    ledger = Ledger()
    rng = random.Random(4)
    await asyncio.gather(
        *(
            owner(i, stores[i % len(stores)], ledger, random.Random(rng.random()))
            for i in range(APPENDERS)
        )
    )
    assert ledger.unexpected == []
    assert ledger.rejected == ledger.planted
    assert len(ledger.planted) > 100
    raced = [f"s-{n}" for n in range(RACED_STREAMS) if f"s-{n}" in ledger.accepted]
    winners = await asyncio.gather(*(race(s, stores, ledger) for s in raced))
    assert winners == [1] * len(raced)
    await check_store(stores[0], ledger)


async def test_sqlite_rejects_exactly_the_stale_appends_without_gaps_or_losses(
    tmp_path: Path,
) -> None:
    path = tmp_path / "events.db"
    stores = [EventStore.sqlite(path), EventStore.sqlite(path)]
    try:
        for store in stores:
            await store.open()
        await run_scenario(stores)
    finally:
        for store in stores:
            await store.aclose()


@pytest.mark.postgres
async def test_postgres_rejects_exactly_the_stale_appends_without_gaps_or_losses(
    pg_dsn: str,
) -> None:
    stores = [EventStore.postgres(pg_dsn) for _ in range(4)]
    try:
        for store in stores:
            await store.open()
        await run_scenario(stores)
    finally:
        for store in stores:
            await store.aclose()
