"""CQRS read models: ``Projection`` (what to do with each event type) and
``ProjectionRunner`` (feed it every event of ``$all``, exactly once in effect).

Theory of operation
-------------------
The runner reads ``$all`` in pages after its checkpoint and hands each page to the
read model store, which - in ONE transaction of the read model's database - applies
every event in its own savepoint and moves the checkpoint to the page's last
position. A crash before the commit leaves neither the effects nor the checkpoint, so
the page is simply done again: exactly-once effect when the read model lives in that
database, at-least-once (idempotent handlers, please) for effects outside it.

A handler that raises does not stop the projection, nor does an event no upcaster
can bring to its current shape (``UpcastError``). Its event is *parked* in a
per-stream dead-letter table, and every later event of the same stream is parked
behind it (so the stream's order is never broken), while other streams flow on.
``parked()`` lists them; ``replay(stream)`` applies them again, in order, once fixed.
"""

from __future__ import annotations

import asyncio
import builtins
import inspect
import logging
import math
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from seamwork._core.lifecycle import StartStop
from seamwork.errors import ConfigError, UpcastError
from seamwork.events._model import (
    RecordedEvent,
    check_key_length,
    check_no_nul,
    check_stream_name,
)
from seamwork.events._store import EventStore, _check_int
from seamwork.events._upcast import UnreadableEvent

log = logging.getLogger("seamwork.events")

Handler = Callable[[Any, RecordedEvent, Any], None]
F = TypeVar("F", bound=Callable[..., None])


def handles(*event_types: str) -> Callable[[F], F]:
    """Mark a ``Projection`` method as the handler of ``event_types``:
    ``def on_created(self, event, conn) -> None``."""
    if not event_types:
        raise ConfigError("handles() needs at least one event type")
    for event_type in event_types:
        if not isinstance(event_type, str) or not event_type:
            raise ConfigError(
                f"handles(): event types must be non-empty strings, got {event_type!r}"
                + (" (unpack a list: handles(*types))" if isinstance(event_type, list) else "")
            )

    def mark(fn: F) -> F:
        if not inspect.isfunction(fn):
            shown = ", ".join(repr(t) for t in event_types)
            raise ConfigError(f"handles({shown}) marks a method, got {fn!r}")
        fn.__seamwork_handles__ = event_types  # type: ignore[attr-defined]
        return fn

    return mark


def _check_name(owner: str, name: object) -> None:
    """Refuse a projection name no read model can key its checkpoint on: not a string,
    blank, with NUL, not valid Unicode, or too long (both stores must hold it)."""
    what = f"{owner}.name"
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"{what} must be a non-empty string, got {name!r}")
    check_no_nul(name, what)
    try:
        name.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ConfigError(f"{what} must be valid Unicode ({exc.reason}), got {name!r}") from None
    check_key_length(name, what)


class Projection:
    """A read model fed by events. Subclass it, set ``name``, mark handlers with
    ``@handles("OrderCreated")``, create tables in ``setup`` and empty them in
    ``reset`` (for a rebuild). Handlers get the event and the read model's
    connection, inside the transaction that also moves the checkpoint."""

    name: str = ""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _collect_handlers(cls)  # a clash is refused where the class is written

    def __init__(self) -> None:
        if not self.name:
            raise ConfigError(f"{type(self).__name__} needs a name")
        _check_name(type(self).__name__, self.name)

    @property
    def handlers(self) -> dict[str, Callable[[RecordedEvent, Any], None]]:
        """The handler of each event type (bound methods), found on first use, so a
        subclass whose own ``__init__`` skips this one's still has them."""
        found: dict[str, Callable[[RecordedEvent, Any], None]] | None
        found = self.__dict__.get("_handlers")
        if found is None:
            found = {kind: getattr(self, attr) for kind, attr in _collect_handlers(type(self))}
            self.__dict__["_handlers"] = found
        return found

    @handlers.setter
    def handlers(self, handlers: dict[str, Callable[[RecordedEvent, Any], None]]) -> None:
        self.__dict__["_handlers"] = handlers

    def setup(self, conn: Any) -> None:
        """Create the read model's tables (idempotently)."""

    def reset(self, conn: Any) -> None:
        """Empty the read model before a rebuild from position 0."""

    def apply(self, event: RecordedEvent, conn: Any) -> None:
        if isinstance(event, UnreadableEvent):  # parks its stream, like a handler error
            raise UpcastError(event.error)
        handler = self.handlers.get(event.type)
        if handler is not None:
            result: object = handler(event, conn)
            if inspect.isawaitable(result):  # it did nothing: park it, do not lose it
                if inspect.iscoroutine(result):
                    result.close()
                raise TypeError(
                    f"the handler of {event.type!r} returned an awaitable; handlers run "
                    "inside the read model's transaction and must be plain functions"
                )


def _collect_handlers(cls: type) -> list[tuple[str, str]]:
    """``(event type, method name)`` of every ``@handles`` method of ``cls``."""
    found: dict[str, str] = {}
    for attr in dir(cls):
        method = getattr(cls, attr, None)
        for event_type in getattr(method, "__seamwork_handles__", ()):
            if inspect.iscoroutinefunction(method):
                raise ConfigError(
                    f"{cls.__name__}: {attr} handles {event_type!r} but is an async def; "
                    "handlers run inside the read model's transaction, on its thread: "
                    "make it a plain def"
                )
            if event_type in found:
                raise ConfigError(
                    f"{cls.__name__}: two handlers for {event_type!r} "
                    f"({found[event_type]} and {attr})"
                )
            found[event_type] = attr
    return list(found.items())


@dataclass(frozen=True, slots=True)
class ParkedEvent:
    """An event a projection could not apply, or one queued behind it in its stream."""

    projection: str
    stream: str
    position: int
    event_type: str
    error: str | None
    parked_at: float


@dataclass(frozen=True, slots=True)
class BatchResult:
    checkpoint: int
    applied: int
    parked: tuple[str, ...]


class ReadModelStore(Protocol):
    """Where read models live, with their checkpoints and dead letters."""

    async def open(self) -> None: ...

    async def aclose(self) -> None: ...

    async def setup(self, projection: Projection) -> tuple[int, set[str]]:
        """Create tables; return the checkpoint and the streams currently parked."""
        ...

    async def apply_batch(
        self,
        projection: Projection,
        events: Sequence[RecordedEvent],
        parked: Collection[str],
        *,
        after: int | None = None,
    ) -> BatchResult:
        """Apply the ``events`` after the stored checkpoint and move it, in one
        transaction; streams parked in the store (``parked`` is only a hint) keep
        their order by parking what follows a failure.

        ``after`` is the position the page was read after (the runner's checkpoint).
        A stored checkpoint behind it means the read model was reset since (a rebuild
        elsewhere): nothing is applied and the stored checkpoint is returned, so the
        runner reads again from there instead of leaving a hole in the rebuilt model."""
        ...

    async def reset(self, projection: Projection) -> None:
        """Empty the read model and its dead letters, and move its checkpoint to 0."""
        ...

    async def parked(self, projection: str) -> builtins.list[ParkedEvent]: ...

    async def replay(
        self, projection: Projection, stream: str, events: Sequence[RecordedEvent]
    ) -> int:
        """Apply the stream's events that are still parked (``events`` holds the
        stream's events, and parked ones from before a soft delete; the parked ones are
        read in the same transaction), in order, stopping at the first that still
        fails; returns how many succeeded."""
        ...


class ProjectionRunner(StartStop):
    """Runs one projection over an event store into a read model store.

    Use ``await runner.catch_up()`` to process everything committed so far, or
    ``async with runner:`` to keep it live in the background.
    """

    def __init__(
        self,
        store: EventStore,
        projection: Projection,
        read_model: ReadModelStore,
        *,
        batch_size: int = 1000,
    ) -> None:
        _check_int("batch_size", batch_size, 1)  # a float LIMIT ended catch_up early
        if not isinstance(projection, Projection) or not projection.name:
            raise ConfigError(f"{projection!r} is not a Projection with a name")
        _check_name(type(projection).__name__, projection.name)
        self.store = store
        self.projection = projection
        self.read_model = read_model
        self.batch_size = batch_size
        self.checkpoint = 0
        self._parked: set[str] = set()
        self._ready = False
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()  # one page or replay at a time (live loop, callers)

    async def start(self) -> None:
        """Follow new events in the background; a runner already live stays as it is."""
        await self._setup()
        if self._task is not None and not self._task.done():
            return
        self._task = asyncio.create_task(self._run(), name=f"projection:{self.projection.name}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def catch_up(self, *, wait: float = 5.0) -> int:
        """Apply every event committed before the call; returns the new checkpoint.

        On PostgreSQL a committed event is readable once no transaction that began
        before it is still open, anywhere on the server (the gap-safe ``$all``): an
        append, then ``catch_up()``, would miss the event while another writer's
        transaction is open. So ``catch_up`` first waits, up to ``wait`` seconds, for
        the transactions open at the call to end; if one is still open then, it applies
        what it can and logs a warning (the rest comes with a later call).
        """
        _check_wait(wait)
        await self._setup()
        bound = await self.store._commit_bound()
        if bound is not None and not await self._readable(bound, wait):
            log.warning(
                "projection %s: a transaction open since before catch_up() is still open "
                "after %gs; the events committed behind it are applied by a later call",
                self.projection.name,
                wait,
            )
        while await self._step():
            pass
        return self.checkpoint

    async def _readable(self, bound: int, wait: float) -> bool:
        """Whether ``$all``'s horizon reached ``bound`` within ``wait`` seconds."""
        loop = asyncio.get_running_loop()
        deadline, pause = loop.time() + wait, 0.002
        while await self.store._horizon() < bound:
            left = deadline - loop.time()
            if left <= 0:
                return False
            await asyncio.sleep(min(pause, left))
            pause = min(pause * 2, 0.05)
        return True

    async def rebuild(self, *, wait: float = 5.0) -> int:
        """Empty the read model and project everything again from position 0 (a live
        runner goes on following new events afterwards, also when the rebuild fails:
        its read model is then as the failed transaction left it, checkpoint and all).
        ``wait`` is ``catch_up``'s."""
        _check_wait(wait)  # before the reset, not after it
        live = self._task is not None
        await self.stop()
        try:
            await self._setup()
            async with self._lock:  # a catch_up's page lands wholly before the reset or after
                await self.read_model.reset(self.projection)
                self.checkpoint, self._parked = 0, set()
            return await self.catch_up(wait=wait)
        finally:
            if live:
                await self.start()

    async def parked(self) -> builtins.list[ParkedEvent]:
        """The events parked for this projection, stream by stream, in order."""
        return await self.read_model.parked(self.projection.name)

    async def replay(self, stream: str) -> int:
        """Apply ``stream``'s parked events again; returns how many now succeeded."""
        check_stream_name(stream)  # (anything else matched no parked event: 0, silently)
        await self._setup()
        async with self._lock:  # the live loop cannot park behind our back meanwhile
            done = 0
            waiting = [p.position for p in await self.parked() if p.stream == stream]
            while waiting:
                events = await self.store._read_stream_for_projection(stream)
                readable = {e.position for e in events}
                for position in waiting:
                    if position in readable:
                        continue
                    # Parked before the stream was soft-deleted: no longer in the stream's
                    # reads, still in $all (positions are > 0, read_all is exclusive).
                    found = await self.store._read_all_for_projection(position - 1, 1)
                    if found and found[0].position == position:
                        events.append(found[0])
                done += await self.read_model.replay(self.projection, stream, events)
                left = [p.position for p in await self.parked() if p.stream == stream]
                if not left or left[0] in waiting:  # all applied, or one still fails
                    break
                # Another replica's page parked more of the stream after it was read
                # here (its runner's lock is not ours): read it again and go on.
                waiting = left
            else:
                return 0
            if not left:
                self._parked.discard(stream)
            return done

    async def _setup(self) -> None:
        if not self._ready:
            self.checkpoint, self._parked = await self.read_model.setup(self.projection)
            self._ready = True

    async def _step(self) -> bool:
        async with self._lock:
            return await self._page()

    async def _page(self) -> bool:
        after = self.checkpoint
        events = await self.store._read_all_for_projection(after, self.batch_size)
        if not events:
            return False
        result = await self.read_model.apply_batch(
            self.projection, events, self._parked, after=after
        )
        for stream in result.parked:
            if stream not in self._parked:
                log.error("projection %s parked stream %s", self.projection.name, stream)
        self._parked.update(result.parked)
        self.checkpoint = result.checkpoint
        if result.checkpoint < after:  # reset by another runner: follow its rebuild
            log.warning("projection %s was reset elsewhere; reading again", self.projection.name)
            return True
        return len(events) == self.batch_size

    async def _run(self) -> None:
        while True:
            try:
                wakes = self.store._wakes()
                if not await self._step():
                    await self.store._wait_for_events(self.checkpoint, wakes)
            except asyncio.CancelledError:
                raise
            except Exception:
                if self.store._is_closed():
                    log.warning(
                        "projection %s stops: its event store was closed", self.projection.name
                    )
                    return
                log.exception("projection %s failed a batch; retrying", self.projection.name)
                await asyncio.sleep(1.0)


def _check_wait(wait: float) -> None:
    if not 0 <= wait < math.inf:
        raise ConfigError(f"wait must be a finite number of seconds >= 0, got {wait!r}")


def summary_of(parked: Sequence[ParkedEvent]) -> Mapping[str, int]:
    """Parked events per stream (for operators)."""
    counts: dict[str, int] = {}
    for event in parked:
        counts[event.stream] = counts.get(event.stream, 0) + 1
    return counts
