"""How a ``Projection`` class is checked and dispatches events (no store involved)."""

from __future__ import annotations

import math
from typing import Any

import pytest

from seamwork.errors import ConfigError
from seamwork.events import EventStore, Projection, ProjectionRunner, RecordedEvent, handles


def recorded(event_type: str) -> RecordedEvent:
    return RecordedEvent(
        stream="s",
        version=0,
        position=1,
        type=event_type,
        data={},
        metadata={},
        recorded_at=0.0,
        id="e-1",
    )


def test_two_handlers_for_one_event_type_are_refused_when_the_class_is_defined() -> None:
    with pytest.raises(ConfigError, match=r"two handlers for 'Placed' \(first and second\)"):

        class Twice(Projection):
            name = "twice"

            @handles("Placed")
            def first(self, event: RecordedEvent, conn: Any) -> None: ...

            @handles("Placed")
            def second(self, event: RecordedEvent, conn: Any) -> None: ...


def test_a_subclass_overriding_a_handler_replaces_it_even_with_its_own_init() -> None:
    class Base(Projection):
        name = "base"

        @handles("Placed")
        def placed(self, event: RecordedEvent, conn: list[str]) -> None:
            conn.append("base")

    class Patched(Base):
        def __init__(self, label: str) -> None:  # does not call Projection.__init__
            self.label = label

        @handles("Placed")
        def placed(self, event: RecordedEvent, conn: list[str]) -> None:
            conn.append(self.label)

    seen: list[str] = []
    Patched("patched").apply(recorded("Placed"), seen)
    Base().apply(recorded("Placed"), seen)
    Base().apply(recorded("Other"), seen)  # no handler: ignored
    assert seen == ["patched", "base"]
    assert set(Patched("x").handlers) == {"Placed"}


def test_a_projection_without_a_name_is_refused(tmp_path: Any) -> None:
    class Nameless(Projection):
        def __init__(self) -> None:
            pass

    with pytest.raises(ConfigError, match="needs a name"):
        Projection()
    with pytest.raises(ConfigError, match="is not a Projection with a name"):
        ProjectionRunner(EventStore.sqlite(tmp_path / "e.db"), Nameless(), None)  # type: ignore[arg-type]


def test_handlers_survive_a_mixin_that_skips_init_subclass_and_can_be_added_per_instance() -> None:
    class Quiet:
        def __init_subclass__(cls, **kwargs: Any) -> None:  # does not call super()
            pass

    class Mixed(Quiet, Projection):
        name = "mixed"

        @handles("Placed")
        def placed(self, event: RecordedEvent, conn: list[str]) -> None:
            conn.append("placed")

    seen: list[str] = []
    projection = Mixed()
    projection.handlers["Paid"] = lambda event, conn: conn.append("paid")
    projection.apply(recorded("Placed"), seen)
    projection.apply(recorded("Paid"), seen)
    assert seen == ["placed", "paid"]


def test_an_async_handler_is_refused_when_the_class_is_defined() -> None:
    # Called like the others, it returned a coroutine that never ran: the event was
    # counted as applied and the checkpoint moved on, so the read model lost it.
    with pytest.raises(ConfigError, match=r"Async: on_placed .*'Placed'.* async def"):

        class Async(Projection):
            name = "async"

            @handles("Placed")
            async def on_placed(self, event: RecordedEvent, conn: Any) -> None: ...


def test_an_async_handler_added_per_instance_fails_its_event_instead_of_skipping_it() -> None:
    class Plain(Projection):
        name = "plain"

    async def paid(event: RecordedEvent, conn: Any) -> None: ...

    projection = Plain()
    projection.handlers["Paid"] = paid
    with pytest.raises(TypeError, match=r"handler of 'Paid' returned an awaitable"):
        projection.apply(recorded("Paid"), None)  # a runner parks its stream


@pytest.mark.parametrize(
    ("types", "message"),
    [
        ((5,), r"event types must be non-empty strings, got 5"),
        ((["Placed", "Paid"],), r"event types must be non-empty strings, got \['Placed'"),
        (("",), r"event types must be non-empty strings, got ''"),
    ],
)
def test_handles_refuses_event_types_that_are_not_names(
    types: tuple[Any, ...], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        handles(*types)


def test_handles_refuses_what_is_not_a_function() -> None:
    with pytest.raises(ConfigError, match=r"handles\('Placed'\) marks a method, got 5"):
        handles("Placed")(5)
    with pytest.raises(ConfigError, match=r"handles\('Placed'\) marks a method, got <property"):
        handles("Placed")(property(lambda self: None))


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        (7, "a non-empty string"),
        ("  ", "a non-empty string"),
        ("orders\x00v2", "NUL"),
        ("orders\ud800", "valid Unicode"),
        ("p" * 1025, "at most"),
    ],
)
def test_a_projection_name_no_read_model_can_key_on_is_refused_by_name(
    name: object, problem: str
) -> None:
    # the name keys the checkpoint and the parked events: 7 worked on SQLite but every
    # page failed on PostgreSQL (text compared with an integer), NUL broke PostgreSQL
    class Named(Projection):
        pass

    Named.name = name  # type: ignore[assignment]
    with pytest.raises(ConfigError, match=f"Named.name must .*{problem}"):
        Named()


@pytest.mark.parametrize("wait", [-1.0, math.nan, math.inf])
async def test_a_catch_up_wait_that_is_not_a_finite_time_is_refused(
    wait: float, tmp_path: Any
) -> None:
    class Named(Projection):
        name = "named"

    runner = ProjectionRunner(EventStore.sqlite(tmp_path / "e.db"), Named(), None)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="wait must be a finite number of seconds >= 0"):
        await runner.catch_up(wait=wait)


@pytest.mark.parametrize("batch_size", [2.5, "10", True, 0, 2**63])
def test_a_batch_size_that_is_not_a_whole_number_of_events_is_refused(
    batch_size: object, tmp_path: Any
) -> None:
    # 2.5 was taken: on PostgreSQL every page read LIMIT 2 (the float rounded), never
    # equal to 2.5, so catch_up() returned after two events as if it had caught up;
    # on SQLite every page failed ('datatype mismatch'), a live runner once a second
    class Named(Projection):
        name = "named"

    with pytest.raises(ConfigError, match="batch_size must be"):
        ProjectionRunner(EventStore.sqlite(tmp_path / "e.db"), Named(), None, batch_size=batch_size)  # type: ignore[arg-type]


@pytest.mark.parametrize("stream", [123, "", None])
async def test_replay_of_something_that_is_not_a_stream_name_is_refused(
    stream: object, tmp_path: Any
) -> None:
    # replay(123) matched no parked event and returned 0, as if nothing were parked
    from seamwork.storage.sqlite_readmodel import SQLiteReadModel

    class Named(Projection):
        name = "named"

    async with EventStore.sqlite(tmp_path / "e.db") as store:
        runner = ProjectionRunner(store, Named(), SQLiteReadModel(tmp_path / "r.db"))
        with pytest.raises(ConfigError, match="stream name"):
            await runner.replay(stream)  # type: ignore[arg-type]
