"""Aggregates in a functional style: ``decide`` turns a command into events, ``evolve``
folds events into state. The write model of CQRS: invariants live in ``decide``.

``Aggregate`` is the thin helper that runs the loop - load, decide, append with the
loaded version as the expected version, retry on a concurrent write - so that no
two writers can both act on the same state.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from seamwork.errors import ConfigError, WrongExpectedVersion
from seamwork.events._model import NO_STREAM, AppendResult, NewEvent, RecordedEvent
from seamwork.events._store import EventStore, Loaded, Snapshots, _check_int

S = TypeVar("S")
C = TypeVar("C")


@dataclass(frozen=True, slots=True)
class Decision(Generic[S]):
    """What handling a command did: the new state, the events and where they went."""

    state: S
    events: tuple[NewEvent, ...]
    result: AppendResult | None


@dataclass(frozen=True, slots=True)
class Aggregate(Generic[S, C]):
    """A consistency boundary: one stream per instance, ``"<category>-<id>"``.

    Args:
        category: the stream prefix, e.g. ``"order"``.
        initial: the state before any event.
        evolve: ``evolve(state, event) -> state``; pure.
        decide: ``decide(command, state) -> events``; pure; raise to refuse a command.
        snapshots: snapshot policy for long-lived instances.
    """

    category: str
    initial: S
    evolve: Callable[[S, RecordedEvent], S]
    decide: Callable[[C, S], Sequence[NewEvent]]
    snapshots: Snapshots[S] | None = None

    def __post_init__(self) -> None:
        if not self.category or "-" in self.category:
            raise ConfigError(
                f"an aggregate category must be non-empty without '-': {self.category!r}"
            )

    def stream(self, id: str) -> str:
        return f"{self.category}-{id}"

    async def load(self, store: EventStore, id: str) -> Loaded[S]:
        """The instance's current state and version."""
        return await store.load_versioned(
            self.stream(id), self.evolve, self.initial, snapshots=self.snapshots
        )

    async def handle(
        self, store: EventStore, id: str, command: C, *, retries: int = 3
    ) -> Decision[S]:
        """Decide on ``command`` against the latest state and append the result.

        A concurrent writer makes the append fail with ``WrongExpectedVersion``; the
        command is then decided again on the new state, up to ``retries`` times.
        """
        _check_int("retries", retries, 0)  # (1.5 failed in range() with a bare TypeError)
        for attempt in range(retries + 1):
            loaded = await self.load(store, id)
            events = tuple(self.decide(command, loaded.state))
            if not events:
                return Decision(loaded.state, (), None)
            expected = loaded.version if loaded.version >= 0 else NO_STREAM
            try:
                result = await store.append(self.stream(id), events, expected_version=expected)
            except WrongExpectedVersion:
                if attempt == retries:
                    raise
                continue
            return Decision(self._fold(store, id, loaded, events, result), events, result)
        raise AssertionError("unreachable")

    def _fold(
        self,
        store: EventStore,
        id: str,
        loaded: Loaded[S],
        events: tuple[NewEvent, ...],
        result: AppendResult,
    ) -> S:
        """The state after ``events``, each as a reload will read it (upcast too)."""
        state = loaded.state
        for offset, event in enumerate(events, start=1):
            recorded = RecordedEvent(
                stream=self.stream(id),
                version=result.version - len(events) + offset,  # after a delete, too
                position=result.position - len(events) + offset,  # consecutive in an append
                type=event.type,
                data=dict(event.data),
                metadata=None if event.metadata is None else dict(event.metadata),
                recorded_at=0.0,
                id=event.id,
                schema_version=event.schema_version,
            )
            state = self.evolve(state, store.upcasters.upcast(recorded))
        return state
