"""The read-model contract: what projections into a ``ReadModelStore`` must do.

Subclass ``ReadModelContract`` as ``Test...`` and implement ``make_store`` (a new,
empty, unopened event store), ``make_read_model`` (an unopened read model; every call
in one test must reach the same database, as replicas of one service would) and
``drift`` (change the ``totals`` table behind the runner's back). Set ``placeholder``
to the driver's parameter mark, and ``failed_statement_aborts_the_transaction`` where
a failed statement aborts the transaction (PostgreSQL). Requires pytest with pytest-asyncio
(``asyncio_mode=auto``).

The projection under test keeps a sum per stream in a ``totals`` table and fails on
an event marked ``poison``; the checks are the ones a demanding user relies on: each
event applied exactly once with its checkpoint, rebuild from zero, a failing event
parking its own stream (later events queue behind it) while the others flow, replay
in order once fixed (also after the stream was soft-deleted, and what another
replica parked behind it meanwhile), a failing SQL statement
parking only its event, an error text with a NUL or a lone surrogate parked
readably, a live runner following new events (also after a rebuild and
beside a catch-up), a rebuild during a catch-up or beside another replica's runner, and
overlapping runners and replicas starting together.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from seamwork.errors import ConfigError
from seamwork.events import (
    NO_STREAM,
    EventStore,
    NewEvent,
    Projection,
    ProjectionRunner,
    ReadModelStore,
    RecordedEvent,
    handles,
)
from seamwork.testing.event_store import all_of


class Totals(Projection):
    """Sum of ``n`` per stream; an event with ``poison`` set fails."""

    name = "totals"

    def __init__(self, placeholder: str, combine: str = "totals.total + excluded.total") -> None:
        super().__init__()
        self.upsert = (
            f"INSERT INTO totals VALUES ({placeholder}, {placeholder}) "
            f"ON CONFLICT (stream) DO UPDATE SET total = {combine}"
        )

    def setup(self, conn: Any) -> None:
        conn.execute("CREATE TABLE IF NOT EXISTS totals (stream TEXT PRIMARY KEY, total INT)")

    def reset(self, conn: Any) -> None:
        conn.execute("DELETE FROM totals")

    @handles("Added")
    def added(self, event: RecordedEvent, conn: Any) -> None:
        if event.data.get("poison"):
            raise ValueError("cannot add poison")
        conn.execute(self.upsert, (event.stream, event.data["n"]))


class Fixed(Totals):
    """The same projection after the poison bug was fixed."""

    @handles("Added")
    def added(self, event: RecordedEvent, conn: Any) -> None:
        conn.execute(self.upsert, (event.stream, event.data["n"]))


class BadSql(Totals):
    """A projection whose ``Broken`` handler runs SQL the database refuses."""

    @handles("Broken")
    def broken(self, event: RecordedEvent, conn: Any) -> None:
        conn.execute("INSERT INTO no_such_table VALUES (1)")


class SwallowsSql(Totals):
    """A projection whose ``Swallow`` handler catches the error of a statement the
    database refuses and goes on (as an "ignore a duplicate" handler would)."""

    @handles("Swallow")
    def swallow(self, event: RecordedEvent, conn: Any) -> None:
        with contextlib.suppress(Exception):
            conn.execute("INSERT INTO no_such_table VALUES (1)")


class UnprintableError(Totals):
    """A projection whose ``Odd`` handler fails with a NUL character and a lone
    surrogate in its error text (PostgreSQL's text cannot hold either)."""

    @handles("Odd")
    def odd(self, event: RecordedEvent, conn: Any) -> None:
        raise ValueError(f"bad byte \x00 in {event.data['at']} \ud800 here")


def added(n: int, *, poison: bool = False) -> list[NewEvent]:
    return [NewEvent("Added", {"n": n, "poison": True} if poison else {"n": n})]


async def totals(model: Any) -> dict[str, int]:
    rows = await model.query("SELECT stream, total FROM totals")
    return {row["stream"]: row["total"] for row in rows}


async def settled(check: Callable[[], Awaitable[bool]], seconds: float = 10.0) -> None:
    """Wait until a live runner has caught up with what the test expects."""
    async with asyncio.timeout(seconds):
        while not await check():  # noqa: ASYNC110 - a real store watched from outside
            await asyncio.sleep(0.01)


async def readable(store: EventStore, count: int) -> int:
    """Wait until ``$all`` shows ``count`` events (``all_of``) and return the last one's
    position."""
    return (await all_of(store, count))[-1].position


class ReadModelContract:
    """Behaviour shared by every ``ReadModelStore``."""

    placeholder = "?"
    failed_statement_aborts_the_transaction = False
    """True where a failed statement aborts the transaction (PostgreSQL): a handler
    that swallows the error has its event rolled back and parked."""

    def make_store(self) -> EventStore:
        raise NotImplementedError

    def make_read_model(self) -> ReadModelStore:
        raise NotImplementedError

    async def drift(self, model: ReadModelStore) -> None:
        """Set every total to -1 without the runner knowing."""
        raise NotImplementedError

    def totals_projection(self) -> Totals:
        return Totals(self.placeholder)

    @pytest.fixture
    async def store(self) -> AsyncIterator[EventStore]:
        async with self.make_store() as store:
            yield store

    @pytest.fixture
    async def read_model(self) -> AsyncIterator[ReadModelStore]:
        model = self.make_read_model()
        await model.open()
        try:
            yield model
        finally:
            await model.aclose()

    async def test_async_with_opens_the_read_model_and_closes_it(self, store: EventStore) -> None:
        await store.append("s", added(3))
        model: Any = self.make_read_model()
        async with model as opened:
            assert opened is model
            await ProjectionRunner(store, self.totals_projection(), opened).catch_up()
            assert await totals(opened) == {"s": 3}
        async with model:  # closed on the way out, opened again on the way in
            assert await totals(model) == {"s": 3}

    async def test_a_projection_applies_every_event_once_and_checkpoints_with_it(
        self, store: EventStore, read_model: ReadModelStore
    ) -> None:
        for i in range(50):
            await store.append(f"s-{i % 3}", [*added(1), NewEvent("Other")])
        runner = ProjectionRunner(store, self.totals_projection(), read_model, batch_size=7)
        checkpoint = await runner.catch_up()
        assert await totals(read_model) == {"s-0": 17, "s-1": 17, "s-2": 16}
        assert checkpoint == (await store.read_all(limit=1000))[-1].position
        again = ProjectionRunner(store, self.totals_projection(), read_model)  # a restart
        assert await again.catch_up() == checkpoint
        assert await totals(read_model) == {"s-0": 17, "s-1": 17, "s-2": 16}

    async def test_rebuild_projects_everything_again_from_zero(
        self, store: EventStore, read_model: ReadModelStore
    ) -> None:
        for i in range(20):
            await store.append("s", added(i))
        runner = ProjectionRunner(store, self.totals_projection(), read_model)
        await runner.catch_up()
        await self.drift(read_model)
        assert await totals(read_model) == {"s": -1}
        await runner.rebuild()
        assert await totals(read_model) == {"s": sum(range(20))}

    @pytest.mark.parametrize("wait", [-1.0, math.nan, math.inf])
    async def test_a_rebuild_with_a_bad_wait_is_refused_before_anything_is_reset(
        self, store: EventStore, read_model: ReadModelStore, wait: float
    ) -> None:
        # the wait was checked by the catch_up after the reset: the call was refused
        # with the read model already emptied and its checkpoint back at 0
        await store.append("s", added(3))
        runner = ProjectionRunner(store, self.totals_projection(), read_model)
        checkpoint = await runner.catch_up()
        with pytest.raises(ConfigError, match="wait must be a finite number of seconds"):
            await runner.rebuild(wait=wait)
        assert await totals(read_model) == {"s": 3}
        assert await ProjectionRunner(store, self.totals_projection(), read_model).catch_up() == (
            checkpoint
        )

    async def test_a_rebuild_during_a_catch_up_projects_every_event_once(
        self, store: EventStore, read_model: ReadModelStore
    ) -> None:
        for n in range(1, 61):
            await store.append("s", added(n))
        runner = ProjectionRunner(store, self.totals_projection(), read_model, batch_size=1)
        catching_up = asyncio.create_task(runner.catch_up())
        async with asyncio.timeout(10):
            while runner.checkpoint == 0:  # noqa: ASYNC110 - a page in, the rebuild starts
                await asyncio.sleep(0)
        await runner.rebuild()
        await catching_up
        assert await totals(read_model) == {"s": sum(range(1, 61))}
        assert runner.checkpoint == (await store.read_all())[-1].position

    async def test_a_rebuild_beside_another_runner_projects_every_event_once(
        self, store: EventStore, read_model: ReadModelStore, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        for n in (1, 2, 3):
            await store.append("s", added(n))
        await readable(store, 3)
        replica = self.make_read_model()  # another process of the same service
        await replica.open()
        try:
            other = ProjectionRunner(store, self.totals_projection(), replica)
            await other.catch_up()
            reset = read_model.reset

            async def reset_then_the_other_runner_moves(projection: Projection) -> None:
                await reset(projection)
                await store.append("s", added(4))
                await readable(store, 4)
                await other.catch_up()  # its next page lands between the reset and the rebuild

            monkeypatch.setattr(read_model, "reset", reset_then_the_other_runner_moves)
            rebuilding = ProjectionRunner(store, self.totals_projection(), read_model)
            await rebuilding.rebuild()
            await other.catch_up()
        finally:
            await replica.aclose()
        assert await totals(read_model) == {"s": 10}
        assert other.checkpoint == rebuilding.checkpoint == await readable(store, 4)

    async def test_a_failing_event_parks_its_stream_while_others_flow(
        self, store: EventStore, read_model: ReadModelStore
    ) -> None:
        await store.append("good", added(1))
        await store.append("bad", added(1))
        await store.append("bad", added(5, poison=True))
        await store.append("bad", added(7))
        await store.append("good", added(2))
        runner = ProjectionRunner(store, self.totals_projection(), read_model)
        await runner.catch_up()
        assert await totals(read_model) == {"good": 3, "bad": 1}
        parked = await runner.parked()
        assert [(p.stream, p.error is not None) for p in parked] == [("bad", True), ("bad", False)]
        assert "cannot add poison" in (parked[0].error or "")
        await store.append("bad", added(100))
        await runner.catch_up()
        assert len(await runner.parked()) == 3  # still queued behind the poison
        assert await runner.replay("bad") == 0  # not fixed yet: nothing moves

    async def test_an_event_no_upcaster_can_read_parks_its_stream_while_others_flow(
        self, store: EventStore, read_model: ReadModelStore
    ) -> None:
        broken = True

        def to_v2(data: dict[str, Any]) -> dict[str, Any]:
            if broken:
                raise KeyError("amount")  # an upcaster bug, fixed by the next deploy
            return {"n": data["n"] * 10}

        await store.append("old", [NewEvent("Added", {"n": 1})])  # schema 1
        await store.append("old", added(2))
        await store.append("new", [NewEvent("Added", {"n": 3}, schema_version=2)])
        store.upcasters.register("Added", 1, to_v2)
        runner = ProjectionRunner(store, self.totals_projection(), read_model)
        await runner.catch_up()  # before, UpcastError: the page failed, no stream moved
        assert await totals(read_model) == {"new": 3}
        parked = await runner.parked()
        assert [(p.stream, p.error is not None) for p in parked] == [("old", True), ("old", False)]
        assert "UpcastError" in (parked[0].error or "")
        assert await runner.replay("old") == 0  # still broken: both stay parked
        broken = False
        assert await runner.replay("old") == 2
        assert await totals(read_model) == {"new": 3, "old": 30}
        assert await runner.parked() == []

    async def test_an_error_text_no_column_can_hold_is_parked_readably(
        self, store: EventStore, read_model: ReadModelStore
    ) -> None:
        await store.append("odd", [NewEvent("Odd", {"at": "first"})])
        await store.append("odd", added(1))
        await store.append("good", added(2))
        runner = ProjectionRunner(store, UnprintableError(self.placeholder), read_model)
        await runner.catch_up()
        assert await totals(read_model) == {"good": 2}
        parked = await runner.parked()
        assert [(p.stream, p.event_type) for p in parked] == [("odd", "Odd"), ("odd", "Added")]
        assert parked[0].error == "ValueError: bad byte \\x00 in first \\ud800 here"
        assert await runner.replay("odd") == 0  # fails again: its new error is noted
        assert (await runner.parked())[0].error == parked[0].error

    async def test_replaying_a_fixed_stream_applies_its_parked_events_in_order(
        self, store: EventStore, read_model: ReadModelStore
    ) -> None:
        await store.append("bad", added(5, poison=True))
        await store.append("bad", added(7))
        await ProjectionRunner(store, self.totals_projection(), read_model).catch_up()
        assert await totals(read_model) == {}
        fixed = ProjectionRunner(store, Fixed(self.placeholder), read_model)
        assert await fixed.replay("bad") == 2
        assert await totals(read_model) == {"bad": 12}
        assert await fixed.parked() == []
        await store.append("bad", added(1))
        await fixed.catch_up()
        assert await totals(read_model) == {"bad": 13}

    async def test_a_stream_deleted_after_parking_can_still_be_replayed(
        self, store: EventStore, read_model: ReadModelStore
    ) -> None:
        await store.append("bad", added(5, poison=True))
        await store.append("bad", added(7))
        await ProjectionRunner(store, self.totals_projection(), read_model).catch_up()
        await store.delete_stream("bad")  # its events stay in $all, parked or not
        await store.append("bad", added(1), expected_version=NO_STREAM)
        fixed = ProjectionRunner(store, Fixed(self.placeholder), read_model)
        await fixed.catch_up()
        assert len(await fixed.parked()) == 3  # the new event queues behind the old ones
        assert await fixed.replay("bad") == 3
        assert await totals(read_model) == {"bad": 13}
        assert await fixed.parked() == []

    async def test_a_failing_sql_statement_in_a_handler_parks_only_its_event(
        self, store: EventStore, read_model: ReadModelStore
    ) -> None:
        await store.append("a", added(1))
        await store.append("b", [NewEvent("Broken")])
        await store.append("a", added(2))
        runner = ProjectionRunner(store, BadSql(self.placeholder), read_model)
        await runner.catch_up()
        assert await totals(read_model) == {"a": 3}
        assert [p.stream for p in await runner.parked()] == ["b"]

    async def test_a_handler_that_swallows_a_database_error_does_not_stop_the_projection(
        self, store: EventStore, read_model: ReadModelStore
    ) -> None:
        await store.append("a", added(1))
        await store.append("b", [NewEvent("Swallow")])
        await store.append("a", added(2))
        last = await readable(store, 3)
        runner = ProjectionRunner(store, SwallowsSql(self.placeholder), read_model)
        assert await runner.catch_up() == last
        assert await totals(read_model) == {"a": 3}
        # SQLite goes on after a failed statement; PostgreSQL cannot, so there the
        # event is rolled back and parked, saying why
        parked = await runner.parked()
        if self.failed_statement_aborts_the_transaction:
            assert [(p.stream, p.event_type) for p in parked] == [("b", "Swallow")]
            assert "went on after a database error" in (parked[0].error or "")
        else:
            assert parked == []
        await store.append("a", added(3))
        await readable(store, 4)
        await runner.catch_up()
        assert await totals(read_model) == {"a": 6}

    async def test_a_live_runner_follows_new_events(
        self, store: EventStore, read_model: ReadModelStore
    ) -> None:
        async with ProjectionRunner(store, self.totals_projection(), read_model) as runner:
            for n in range(1, 6):
                await store.append("s", added(n))

            async def caught_up() -> bool:
                return (await totals(read_model)).get("s") == 15

            await settled(caught_up)
            assert runner.checkpoint == (await store.read_all())[-1].position
        assert await totals(read_model) == {"s": 15}

    async def test_a_live_runner_keeps_following_after_a_rebuild(
        self, store: EventStore, read_model: ReadModelStore
    ) -> None:
        await store.append("s", added(1))
        async with ProjectionRunner(store, self.totals_projection(), read_model) as runner:
            await runner.rebuild()
            await store.append("s", added(2))

            async def caught_up() -> bool:
                return await totals(read_model) == {"s": 3}

            await settled(caught_up)
        assert await totals(read_model) == {"s": 3}

    async def test_starting_a_live_runner_twice_leaves_one_loop_that_stop_ends(
        self, store: EventStore, read_model: ReadModelStore
    ) -> None:
        def loops() -> list[asyncio.Task[Any]]:
            return [t for t in asyncio.all_tasks() if t.get_name() == "projection:totals"]

        runner = ProjectionRunner(store, self.totals_projection(), read_model)
        await runner.start()
        await runner.start()  # before: a second loop, and the first one outlived stop()
        assert len(loops()) == 1
        await store.append("s", added(1))

        async def caught_up() -> bool:
            return await totals(read_model) == {"s": 1}

        await settled(caught_up)
        await runner.stop()
        assert loops() == []

    async def test_a_live_runner_ends_when_its_event_store_is_closed(
        self, read_model: ReadModelStore
    ) -> None:
        # it went on failing a batch (and logging it) every second until stop()
        def loops() -> list[asyncio.Task[Any]]:
            return [t for t in asyncio.all_tasks() if t.get_name() == "projection:totals"]

        store = self.make_store()
        await store.open()
        runner = ProjectionRunner(store, self.totals_projection(), read_model)
        await runner.start()
        await store.append("s", added(1))

        async def caught_up() -> bool:
            return await totals(read_model) == {"s": 1}

        await settled(caught_up)
        await store.aclose()

        async def ended() -> bool:
            return loops() == []

        await settled(ended)
        await runner.stop()

    async def test_a_live_runner_whose_rebuild_fails_keeps_following(
        self, store: EventStore, read_model: ReadModelStore
    ) -> None:
        class ResetFailsOnce(Totals):
            failed = False

            def reset(self, conn: Any) -> None:
                if not self.failed:
                    self.failed = True
                    raise RuntimeError("reset broke")
                super().reset(conn)

        await store.append("s", added(1))
        async with ProjectionRunner(store, ResetFailsOnce(self.placeholder), read_model) as runner:
            with pytest.raises(Exception, match="reset broke"):
                await runner.rebuild()
            await store.append("s", added(2))  # before: nobody followed it any more

            async def caught_up() -> bool:
                return await totals(read_model) == {"s": 3}

            await settled(caught_up)

    async def test_catch_up_beside_a_live_runner_applies_each_event_once(
        self, store: EventStore, read_model: ReadModelStore
    ) -> None:
        for n in range(1, 4):
            await store.append("s", added(n))
        async with ProjectionRunner(store, self.totals_projection(), read_model):
            beside = ProjectionRunner(store, self.totals_projection(), read_model)
            await beside.catch_up()  # the live runner works through the same events
            await asyncio.sleep(0.2)
        assert await totals(read_model) == {"s": 6}

    async def test_two_runners_on_one_read_model_apply_each_event_once(
        self, store: EventStore, read_model: ReadModelStore
    ) -> None:
        for n in range(1, 4):
            await store.append("s", added(n))
        first = ProjectionRunner(store, self.totals_projection(), read_model)
        second = ProjectionRunner(store, self.totals_projection(), read_model)  # overlapping
        await asyncio.gather(first.catch_up(), second.catch_up())
        assert await totals(read_model) == {"s": 6}

    async def test_replicas_starting_together_apply_each_event_once(
        self, store: EventStore, read_model: ReadModelStore
    ) -> None:
        for n in range(1, 4):
            await store.append("s", added(n))
        second = self.make_read_model()  # another process of the same service
        await second.open()
        try:
            await asyncio.gather(
                ProjectionRunner(store, self.totals_projection(), read_model).catch_up(),
                ProjectionRunner(store, self.totals_projection(), second).catch_up(),
            )
        finally:
            await second.aclose()
        assert await totals(read_model) == {"s": 6}

    async def test_a_replay_while_events_keep_arriving_leaves_nothing_parked(
        self, store: EventStore, read_model: ReadModelStore
    ) -> None:
        await store.append("s", added(1, poison=True))
        async with ProjectionRunner(store, self.totals_projection(), read_model) as live:
            await store.append("s", added(2))  # parked behind the poison

            async def both_parked() -> bool:
                return len(await live.parked()) == 2

            await settled(both_parked)
        shifting = Fixed(self.placeholder, combine="totals.total * 10 + excluded.total")
        async with ProjectionRunner(store, shifting, read_model) as fixed:
            appending = asyncio.create_task(store.append("s", added(3)))
            assert await fixed.replay("s") >= 2  # the poison and the event behind it
            await appending
            await store.append("s", added(4))

            async def drained() -> bool:
                return not await fixed.parked() and (await totals(read_model)).get("s") == 1234

            await settled(drained)
        assert await totals(read_model) == {"s": 1234}  # once each, in stream order

    async def test_an_event_another_replica_parks_while_a_replay_reads_is_replayed_too(
        self, store: EventStore, read_model: ReadModelStore, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        await store.append("s", added(5, poison=True))
        await store.append("s", added(2))
        await ProjectionRunner(store, self.totals_projection(), read_model).catch_up()
        replica = self.make_read_model()  # the query service's other process, live
        await replica.open()
        try:
            other = ProjectionRunner(store, Fixed(self.placeholder), replica)
            read_stream = store._read_stream_for_projection
            reads: list[str] = []

            async def read_then_the_replica_parks_one_more(stream: str) -> list[RecordedEvent]:
                events = await read_stream(stream)
                reads.append(stream)
                if len(reads) == 1:
                    await store.append("s", added(3))
                    await readable(store, 3)
                    await other.catch_up()  # "s" is still parked: it queues behind
                return events

            monkeypatch.setattr(
                store, "_read_stream_for_projection", read_then_the_replica_parks_one_more
            )
            fixed = ProjectionRunner(store, Fixed(self.placeholder), read_model)
            assert await fixed.replay("s") == 3
        finally:
            await replica.aclose()
        assert await fixed.parked() == []  # before: the third stayed parked, "s" stuck
        assert await totals(read_model) == {"s": 10}


__all__ = ["ReadModelContract", "Totals"]
