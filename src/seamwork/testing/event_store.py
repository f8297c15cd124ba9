"""The ``EventStore`` contract: behaviour every event store adapter must have.

Subclass ``EventStoreContract`` as ``Test...`` and implement ``make_store`` (a new,
empty, unopened store). Requires pytest with pytest-asyncio (``asyncio_mode=auto``).
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from seamwork.errors import ConfigError, EventStoreError, SerializationError, UpcastError
from seamwork.events import (
    ANY,
    NO_STREAM,
    STREAM_EXISTS,
    EventStore,
    Loaded,
    NewEvent,
    RecordedEvent,
    Snapshots,
    Upcasters,
    WrongExpectedVersion,
)


def count(state: int, event: RecordedEvent) -> int:
    return state + int(event.data.get("n", 1))


async def all_of(store: EventStore, count: int) -> list[RecordedEvent]:
    """``$all`` once it shows ``count`` events (at most 10 s): on PostgreSQL a transaction
    open anywhere in the cluster holds new events back from readers for a while."""
    async with asyncio.timeout(10):
        while len(everything := await store.read_all()) < count:  # noqa: ASYNC110 - polling a real store
            await asyncio.sleep(0.01)
    return everything


def events(*types: str, **data: Any) -> list[NewEvent]:
    return [NewEvent(t, dict(data)) for t in types]


class EventStoreContract:
    """Behaviour shared by every ``EventStore`` adapter."""

    async def make_store(self, tmp_path: Path, upcasters: Upcasters | None = None) -> EventStore:
        raise NotImplementedError

    @pytest.fixture
    async def store(self, tmp_path: Path) -> AsyncIterator[EventStore]:
        store = await self.make_store(tmp_path)
        await store.open()
        try:
            yield store
        finally:
            await store.aclose()

    # --- appending --------------------------------------------------------------------

    async def test_a_new_stream_starts_at_version_zero(self, store: EventStore) -> None:
        result = await store.append(
            "order-1", events("Created", "Paid"), expected_version=NO_STREAM
        )
        assert result.version == 1
        stored = await store.read_stream("order-1")
        assert [(e.version, e.type) for e in stored] == [(0, "Created"), (1, "Paid")]
        assert stored[-1].position == result.position

    async def test_a_stale_expected_version_is_rejected_with_the_actual_one(
        self, store: EventStore
    ) -> None:
        await store.append("order-1", events("A", "B", "C"))
        with pytest.raises(WrongExpectedVersion) as raised:
            await store.append("order-1", events("D"), expected_version=1)
        assert (raised.value.stream, raised.value.expected, raised.value.actual) == (
            "order-1",
            1,
            2,
        )
        assert len(await store.read_stream("order-1")) == 3

    async def test_a_writer_cannot_skip_ahead(self, store: EventStore) -> None:
        await store.append("order-1", events("A"))
        with pytest.raises(WrongExpectedVersion):
            await store.append("order-1", events("B"), expected_version=5)
        await store.append("order-1", events("B"), expected_version=0)
        assert [e.version for e in await store.read_stream("order-1")] == [0, 1]

    async def test_no_stream_and_stream_exists_expectations(self, store: EventStore) -> None:
        with pytest.raises(WrongExpectedVersion):
            await store.append("s", events("A"), expected_version=STREAM_EXISTS)
        await store.append("s", events("A"), expected_version=NO_STREAM)
        with pytest.raises(WrongExpectedVersion):
            await store.append("s", events("B"), expected_version=NO_STREAM)
        await store.append("s", events("B"), expected_version=STREAM_EXISTS)
        await store.append("s", events("C"), expected_version=ANY)
        assert [e.type for e in await store.read_stream("s")] == ["A", "B", "C"]

    async def test_concurrent_appends_at_one_version_admit_exactly_one(
        self, store: EventStore
    ) -> None:
        await store.append("s", events("A"))
        tries = [store.append("s", events(f"B{i}"), expected_version=0) for i in range(20)]
        results = await asyncio.gather(*tries, return_exceptions=True)
        assert sum(not isinstance(r, Exception) for r in results) == 1
        assert all(isinstance(r, WrongExpectedVersion) for r in results if isinstance(r, Exception))
        assert [e.version for e in await store.read_stream("s")] == [0, 1]

    async def test_an_event_id_is_stored_once(self, store: EventStore) -> None:
        event = NewEvent("A", {"n": 1})
        await store.append("s", [event])
        with pytest.raises(EventStoreError):
            await store.append("t", [event])
        assert await store.read_stream("t") == []

    # --- bad input ---------------------------------------------------------------------

    async def test_bad_input_is_refused_and_nothing_is_written(self, store: EventStore) -> None:
        with pytest.raises(SerializationError, match="data of 'A'"):
            await store.append("s", [NewEvent("A", {"at": object()})])
        with pytest.raises(ConfigError, match="stream name"):
            await store.append("", events("A"))
        with pytest.raises(ConfigError, match=">= 0"):
            await store.append("s", events("A"), expected_version=-1)
        with pytest.raises(ConfigError, match="at least one event"):
            await store.append("s", [])
        with pytest.raises(ConfigError, match="mapping"):
            NewEvent("A", ["not", "a", "mapping"])  # type: ignore[arg-type]
        with pytest.raises(ConfigError, match="id must be a non-empty string"):
            await store.append("s", [NewEvent("A", id=5)])  # type: ignore[arg-type]
        with pytest.raises(ConfigError, match="id must be a non-empty string"):
            await store.append("s", [NewEvent("A", id="")])
        with pytest.raises(ConfigError, match="schema_version must be <= 2147483647"):
            await store.append("s", [NewEvent("A", schema_version=2**31)])
        assert await store.read_all() == []

    async def test_a_nul_character_is_refused_by_name_before_anything_is_written(
        self, store: EventStore
    ) -> None:
        # PostgreSQL's text and jsonb cannot hold U+0000; every store refuses it alike
        refused: list[tuple[Any, type[Exception], str]] = [
            (
                lambda: NewEvent("A", {"a": {"b": ["x", "y\x00"]}}),
                SerializationError,
                r"data of 'A' event\['a'\]\['b'\]\[1\] contains a NUL",
            ),
            (
                lambda: NewEvent("A", {"k\x00": 1}),
                SerializationError,
                r"data of 'A' event\['k\\x00'\] contains a NUL",
            ),
            (
                lambda: NewEvent("A", metadata={"user": "\x00"}),
                SerializationError,
                r"metadata of 'A'\['user'\] contains a NUL",
            ),
        ]
        for make, error, where in refused:
            with pytest.raises(error, match=where):
                await store.append("s", [NewEvent("B"), make()])
        with pytest.raises(ConfigError, match="an event type must not contain a NUL"):
            NewEvent("A\x00")
        with pytest.raises(ConfigError, match="the id must not contain a NUL"):
            NewEvent("A", id="a\x00")
        with pytest.raises(ConfigError, match="a stream name must not contain a NUL"):
            await store.append("s\x00", events("A"))
        with pytest.raises(ConfigError, match="a stream name must not contain a NUL"):
            await store.read_stream("s\x00")
        with pytest.raises(SerializationError, match=r"metadata of stream 's'\['owner'\]"):
            await store.set_stream_metadata("s", {"owner": "\x00"})
        with pytest.raises(ConfigError, match=r"Snapshots\.name must not contain a NUL"):
            Snapshots("count\x00")
        with pytest.raises(SerializationError, match=r"snapshot 'count' of 's'\['x'\]"):
            await store.save_snapshot("s", "count", 0, {"x": "\x00"})
        # a bad append does not take the appends queued beside it down with it
        results = await asyncio.gather(
            store.append("ok-1", events("A")),
            store.append("s", [NewEvent("A", {"a": "\x00"})]),
            store.append("ok-2", events("A")),
            return_exceptions=True,
        )
        assert isinstance(results[1], SerializationError)
        assert [e.stream for e in await all_of(store, 2)] == ["ok-1", "ok-2"]
        assert await store.stream_info("s") is None
        # a backslash followed by "u0000" is ordinary text
        await store.append("s", [NewEvent("A", {"path": "C:\\u0000"}, {"m": "\\u0000"})])
        (stored,) = await store.read_stream("s")
        assert (stored.data, stored.metadata) == ({"path": "C:\\u0000"}, {"m": "\\u0000"})

    async def test_a_lone_surrogate_is_refused_by_name_before_anything_is_written(
        self, store: EventStore
    ) -> None:
        # a str may hold one ("\ud800"), but no UTF-8 text can: the drivers failed to
        # encode it, with a UnicodeEncodeError that took a batch's other appends with it
        with pytest.raises(ConfigError, match="a stream name must be valid Unicode"):
            await store.append("s\ud800", events("A"))
        with pytest.raises(ConfigError, match="a stream name must be valid Unicode"):
            await store.read_stream("s\udfff")
        with pytest.raises(ConfigError, match="a stream name must be valid Unicode"):
            await store.stream_info("s\ud800")
        with pytest.raises(ConfigError, match="an event type must be valid Unicode"):
            NewEvent("A\ud800")
        with pytest.raises(ConfigError, match="the id must be valid Unicode"):
            NewEvent("A", id="a\udc00")
        with pytest.raises(ConfigError, match=r"Snapshots\.name must be valid Unicode"):
            Snapshots("count\ud800")
        with pytest.raises(ConfigError, match="a snapshot name must be valid Unicode"):
            await store.save_snapshot("s", "count\ud800", 0, 1)
        with pytest.raises(SerializationError, match=r"data of 'A' event\['a'\]\[1\] contains"):
            await store.append("s", [NewEvent("A", {"a": ["x", "y\ud800"]})])
        with pytest.raises(SerializationError, match=r"metadata of 'A'\['k\\udc00'\] contains"):
            await store.append("s", [NewEvent("A", metadata={"k\udc00": 1})])
        with pytest.raises(SerializationError, match=r"metadata of stream 's'\['owner'\]"):
            await store.set_stream_metadata("s", {"owner": "\ud800"})
        with pytest.raises(SerializationError, match=r"snapshot 'count' of 's'\['x'\]"):
            await store.save_snapshot("s", "count", 0, {"x": "\ud800"})
        results = await asyncio.gather(
            store.append("ok-1", events("A")),
            store.append("s", [NewEvent("A", {"a": "\ud800"})]),
            store.append("ok-2", events("A")),
            return_exceptions=True,
        )
        assert isinstance(results[1], SerializationError)
        assert [e.stream for e in await all_of(store, 2)] == ["ok-1", "ok-2"]
        assert await store.stream_info("s") is None
        # a character past U+FFFF (a surrogate pair in UTF-16) is ordinary text
        await store.append("s", [NewEvent("A", {"emoji": "\U0001f600"})])
        (stored,) = await store.read_stream("s")
        assert stored.data == {"emoji": "\U0001f600"}

    async def test_an_overlong_indexed_key_is_refused_by_name_before_anything_is_written(
        self, store: EventStore
    ) -> None:
        # stream names, event ids and snapshot names are indexed; a PostgreSQL index
        # entry holds about 2,700 bytes, so every store refuses a key over the limit
        longest = "".join(random.choices("abcdefghijklmnopqrstuvwxyz0123456789", k=1024))
        overlong = "s" + longest  # 1025 bytes, not compressible into an index entry
        wide = "é" * 513  # 513 characters, 1026 bytes of UTF-8
        for stream in (overlong, wide, longest * 3):
            with pytest.raises(ConfigError, match="stream name must be at most 1024 bytes"):
                await store.append(stream, events("A"))
            with pytest.raises(ConfigError, match="stream name must be at most 1024 bytes"):
                await store.set_stream_metadata(stream, {"owner": "x"})
            with pytest.raises(ConfigError, match="stream name must be at most 1024 bytes"):
                await store.save_snapshot(stream, "count", 0, 1)
        with pytest.raises(ConfigError, match="the id must be at most 1024 bytes"):
            NewEvent("A", id=longest * 3)
        with pytest.raises(ConfigError, match="snapshot name must be at most 1024 bytes"):
            await store.save_snapshot("s", longest * 3, 0, 1)
        with pytest.raises(ConfigError, match=r"Snapshots\.name must be at most 1024 bytes"):
            Snapshots(longest * 3)
        assert await store.read_all() == []
        assert await store.stream_info(longest) is None
        # the limit itself is accepted, and reads back
        await store.append(longest, [NewEvent("A", id=longest)])
        await store.save_snapshot(longest, longest, 0, 1)
        (stored,) = await store.read_stream(longest)
        assert (stored.stream, stored.id) == (longest, longest)
        assert await store.load_snapshot(longest, longest, 0) == (0, 1)

    async def test_a_closed_store_opens_again(self, store: EventStore) -> None:
        await store.append("s", events("A"))
        await store.aclose()
        await store.open()  # (the fixture closes it again)
        await store.append("s", events("B"), expected_version=0)
        assert [e.type for e in await store.read_stream("s")] == ["A", "B"]

    async def test_a_store_opened_again_sees_what_another_appended_meanwhile(
        self, tmp_path: Path
    ) -> None:
        first = await self.make_store(tmp_path)
        async with first:
            await first.append("s", events("A"))
        other = await self.make_store(tmp_path)
        async with other:
            await other.append("s", events("B"), expected_version=0)
        async with first:
            with pytest.raises(WrongExpectedVersion):
                await first.append("s", events("X"), expected_version=0)
            result = await first.append("s", events("C"), expected_version=1)
            assert result.version == 2
            assert [e.type for e in await first.read_stream("s")] == ["A", "B", "C"]

    async def test_bad_read_arguments_are_refused_by_name(self, store: EventStore) -> None:
        await store.append("s", events("A", "B"))
        too_big = 2**64
        stream_reads: list[tuple[dict[str, Any], str]] = [
            ({"limit": -1}, "limit"),
            ({"limit": 0}, "limit"),
            ({"limit": 1.5}, "limit"),
            ({"from_version": "1"}, "from_version"),
            ({"from_version": too_big}, "from_version"),
            ({"to_version": -1}, "to_version"),
            ({"to_version": too_big}, "to_version"),
        ]
        for bad, name in stream_reads:
            with pytest.raises(ConfigError, match=name):
                await store.read_stream("s", **bad)
        all_reads: list[tuple[dict[str, Any], str]] = [
            ({"limit": 1.5}, "limit"),
            ({"from_position": too_big}, "from_position"),
        ]
        for bad, name in all_reads:
            with pytest.raises(ConfigError, match=name):
                await store.read_all(**bad)
        loads: list[tuple[dict[str, Any], str]] = [
            ({"as_of_version": too_big}, "as_of_version"),
            ({"as_of_version": "1"}, "as_of_version"),
            ({"as_of_time": "now"}, "as_of_time"),
            ({"as_of_time": float("nan")}, "as_of_time"),
            ({"as_of_time": 10**400}, "as_of_time"),  # no float can hold it
        ]
        for bad, name in loads:
            with pytest.raises(ConfigError, match=name):
                await store.load("s", count, 0, **bad)
        subscriptions: list[tuple[dict[str, Any], str]] = [
            ({"batch_size": 0}, "batch_size"),
            ({"batch_size": "10"}, "batch_size"),
            ({"from_position": -1}, "from_position"),
        ]
        for bad, name in subscriptions:  # at the call, not at the first iteration
            with pytest.raises(ConfigError, match=name):
                store.subscribe(**bad)

    async def test_an_unknown_event_type_is_refused_when_types_are_declared(
        self, tmp_path: Path
    ) -> None:
        store = await self.make_store(tmp_path, Upcasters(known_types={"OrderCreated"}))
        async with store:
            with pytest.raises(ConfigError, match="unknown event type 'OrderCretaed'"):
                await store.append("s", events("OrderCreated", "OrderCretaed"))
            assert await store.read_all() == []

    # --- reading -----------------------------------------------------------------------

    async def test_read_stream_from_a_version_and_backwards(self, store: EventStore) -> None:
        await store.append("s", [NewEvent("E", {"i": i}) for i in range(10)])
        forward = await store.read_stream("s", from_version=7)
        assert [e.version for e in forward] == [7, 8, 9]
        backward = await store.read_stream("s", backwards=True, limit=3)
        assert [e.version for e in backward] == [9, 8, 7]
        assert await store.read_stream("missing") == []

    async def test_read_stream_refuses_a_backwards_that_is_not_a_bool(
        self, store: EventStore
    ) -> None:
        """Any truthy value read backwards: ``backwards="no"`` did."""
        await store.append("s", [NewEvent("E", {"i": i}) for i in range(3)])
        for value in ("no", 1, None):
            with pytest.raises(ConfigError, match="backwards must be True or False"):
                await store.read_stream("s", backwards=value)  # type: ignore[arg-type]

    async def test_read_all_is_in_position_order_and_exclusive(self, store: EventStore) -> None:
        for i in range(30):
            await store.append(f"s-{i % 4}", [NewEvent("E", {"i": i})])
        everything = await all_of(store, 30)
        assert [e.data["i"] for e in everything] == list(range(30))
        positions = [e.position for e in everything]
        assert positions == sorted(positions)
        assert len(set(positions)) == 30
        after = await store.read_all(from_position=positions[9], limit=5)
        assert [e.data["i"] for e in after] == [10, 11, 12, 13, 14]

    async def test_subscribe_catches_up_then_goes_live(self, store: EventStore) -> None:
        await store.append("s", events("A", "B"))
        seen: list[str] = []

        async def follow() -> None:
            async for event in store.subscribe(from_position=0):
                seen.append(event.type)
                if len(seen) == 4:
                    return

        task = asyncio.create_task(follow())
        await asyncio.sleep(0.05)
        await store.append("t", events("C"))
        await store.append("s", events("D"))
        await asyncio.wait_for(task, 5)
        assert seen == ["A", "B", "C", "D"]

    # --- replay ------------------------------------------------------------------------

    async def test_load_folds_events_and_travels_in_time(self, store: EventStore) -> None:
        for n in (1, 2, 3, 4):
            await store.append("s", [NewEvent("Added", {"n": n})])
        assert await store.load("s", count, 0) == 10
        assert await store.load("s", count, 0, as_of_version=1) == 3
        assert await store.load("missing", count, 0) == 0
        middle = (await store.read_stream("s"))[2].recorded_at
        assert await store.load("s", count, 0, as_of_time=middle) == 6
        assert await store.load("s", count, 0, as_of_time=0.0) == 0
        assert await store.load("s", count, 0, as_of_time=2**64) == 10  # an int past 64 bits
        assert await store.load("s", count, 0, as_of_time=-(2**64)) == 0

    async def test_snapshots_give_the_same_state_as_a_full_replay(self, store: EventStore) -> None:
        policy: Snapshots[int] = Snapshots("count", every=10)
        rng = random.Random(7)
        for _ in range(5):
            batch = [NewEvent("Added", {"n": rng.randint(1, 9)}) for _ in range(rng.randint(5, 15))]
            await store.append("s", batch)
            with_snapshots = await store.load_versioned("s", count, 0, snapshots=policy)
            without = await store.load_versioned("s", count, 0)
            assert with_snapshots == without
        assert await store.load_snapshot("s", "count", 2**62) is not None
        early = await store.load("s", count, 0, as_of_version=3, snapshots=policy)
        assert early == await store.load("s", count, 0, as_of_version=3)

    async def test_a_snapshot_saved_again_at_its_version_replaces_the_old_one(
        self, store: EventStore
    ) -> None:
        await store.append("s", events("A", "B", "C", "D"))
        await store.save_snapshot("s", "count", 3, {"n": 1})
        await store.save_snapshot("s", "count", 3, {"n": 2})  # e.g. a fixed encode
        assert await store.load_snapshot("s", "count", 2**62) == (3, {"n": 2})
        policy: Snapshots[int] = Snapshots("count", every=1, decode=lambda v: int(v["n"]))
        assert await store.load("s", count, 0, snapshots=policy) == 2

    async def test_a_snapshot_past_the_streams_end_is_not_loaded(self, store: EventStore) -> None:
        # (saved at a wrong version, say): taken, every load answered a version the
        # stream never reached, and an append expecting it was refused on every retry
        await store.append("s", events("A", "B", "C"))
        await store.save_snapshot("s", "count", 50, 99)
        policy: Snapshots[int] = Snapshots("count", every=1000)
        assert await store.load_versioned("s", count, 0, snapshots=policy) == Loaded(3, 2)
        assert await store.load_snapshot("s", "count", 2**62) is None

    async def test_a_snapshot_with_a_bad_key_is_refused_by_name_and_not_stored(
        self, store: EventStore
    ) -> None:
        await store.append("s", events("A", "B", "C"))
        bad: list[tuple[tuple[Any, Any, Any], str]] = [
            (("s", "count", 1.5), "version"),
            (("s", "count", "1"), "version"),
            (("s", "count", -1), "version"),
            (("s", "count", True), "version"),
            (("s", "", 1), "snapshot name"),
            (("s", None, 1), "snapshot name"),
            (("", "count", 1), "stream name"),
        ]
        for (stream, name, version), field in bad:
            with pytest.raises(ConfigError, match=field):
                await store.save_snapshot(stream, name, version, 3)
            with pytest.raises(ConfigError, match=field):
                await store.load_snapshot(stream, name, version)
        assert await store.load_snapshot("s", "count", 2**62) is None

    async def test_upcasters_bring_old_shapes_forward(self, tmp_path: Path) -> None:
        old = await self.make_store(tmp_path)
        async with old:
            await old.append("s", [NewEvent("Shipped", {"carrier": "FedEx"})])
            await old.append("s", [NewEvent("Addr", {"city": "X"})])
        upcasters = Upcasters()
        upcasters.register("Shipped", 1, lambda d: {"carrier": {"name": d["carrier"]}})
        upcasters.register("Addr", 1, lambda d: {"address": {"city": d["city"]}})
        upcasters.register("Addr", 2, lambda d: {**d, "country": "?"}, to_type="Address")
        store = await self.make_store(tmp_path, upcasters)
        async with store:
            shipped, addr = await store.read_stream("s")
        assert (shipped.type, shipped.schema_version) == ("Shipped", 2)
        assert shipped.data == {"carrier": {"name": "FedEx"}}
        assert (addr.type, addr.schema_version) == ("Address", 3)
        assert addr.data == {"address": {"city": "X"}, "country": "?"}

    async def test_an_old_event_without_an_upcaster_is_a_clear_error(self, tmp_path: Path) -> None:
        old = await self.make_store(tmp_path)
        async with old:
            await old.append("s", [NewEvent("Shipped", {"carrier": "FedEx"})])
            await old.append("s", [NewEvent("Shipped", {"c": 1}, schema_version=2)])
        upcasters = Upcasters()
        upcasters.register("Shipped", 2, lambda d: d)
        store = await self.make_store(tmp_path, upcasters)
        async with store:
            with pytest.raises(UpcastError, match="'Shipped', schema 1"):
                await store.read_stream("s")

    # --- metadata and deletion -----------------------------------------------------------

    async def test_stream_metadata_round_trips(self, store: EventStore) -> None:
        await store.append("s", events("A"))
        await store.set_stream_metadata("s", {"owner": "orders", "max_age": 3600})
        info = await store.stream_info("s")
        assert info is not None
        assert (info.version, info.metadata) == (0, {"owner": "orders", "max_age": 3600})
        assert await store.stream_info("missing") is None
        with pytest.raises(ConfigError, match="must be a mapping, got list"):
            await store.set_stream_metadata("s", ["owner"])  # type: ignore[arg-type]
        with pytest.raises(SerializationError):
            await store.set_stream_metadata("s", {"when": object()})
        info = await store.stream_info("s")
        assert info is not None
        assert info.metadata == {"owner": "orders", "max_age": 3600}  # refusals change nothing

    async def test_metadata_alone_makes_a_stream_known_at_version_minus_one(
        self, store: EventStore
    ) -> None:
        await store.set_stream_metadata("s", {"owner": "orders"})
        info = await store.stream_info("s")
        assert info is not None
        assert (info.version, info.metadata, info.deleted) == (-1, {"owner": "orders"}, False)
        assert await store.read_stream("s") == []
        await store.append("s", events("A"), expected_version=NO_STREAM)  # still no events
        info = await store.stream_info("s")
        assert info is not None
        assert (info.version, info.metadata) == (0, {"owner": "orders"})

    async def test_a_soft_deleted_stream_reads_empty_and_can_start_again(
        self, store: EventStore
    ) -> None:
        policy: Snapshots[int] = Snapshots("count", every=1)
        await store.append("s", events("A", "B"))
        assert await store.load("s", count, 0, snapshots=policy) == 2  # leaves a snapshot
        await store.delete_stream("s", expected_version=1)
        assert await store.read_stream("s") == []
        assert await store.load("s", count, 0) == 0
        assert await store.load("s", count, 0, snapshots=policy) == 0  # the snapshot is gone too
        info = await store.stream_info("s")
        assert info is not None
        assert info.deleted
        assert info.version == -1
        await store.append("s", events("C"), expected_version=NO_STREAM)
        again = await store.read_stream("s")
        assert [(e.type, e.version) for e in again] == [("C", 2)]
        assert len(await all_of(store, 3)) == 3  # $all keeps history
