"""The EventStore contract on SQLite."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from seamwork.errors import StoreError
from seamwork.events import EventStore, NewEvent, Upcasters
from seamwork.testing.event_store import EventStoreContract


class TestSQLiteEventStore(EventStoreContract):
    async def make_store(self, tmp_path: Path, upcasters: Upcasters | None = None) -> EventStore:
        return EventStore.sqlite(tmp_path / "events.db", upcasters=upcasters)


async def test_closing_the_store_ends_a_waiting_subscription_at_once(tmp_path: Path) -> None:
    store = EventStore.sqlite(tmp_path / "events.db", poll_interval=30.0)

    async def follow() -> None:
        async for _ in store.subscribe():
            pass

    await store.open()
    await store.append("s", [NewEvent("A")])
    subscriber = asyncio.create_task(follow())
    await asyncio.sleep(0.3)  # caught up: waiting for the next event
    await store.aclose()
    with pytest.raises(StoreError, match=r"not open|closed"):
        await asyncio.wait_for(subscriber, 2)  # not after the 30 s poll interval
