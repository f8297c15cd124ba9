"""The transactional outbox and its relay; the idempotent inbox.

Outbox. A service writes its state change and the messages announcing it in ONE
local transaction (``outbox.transaction()``), so there is never a state change
without its message or a message without its state change. ``OutboxRelay`` then
publishes pending rows in order and marks them sent; a crash between the broker's
acknowledgement and the mark re-sends them, and the broker drops the duplicates by
message id. Sent rows are kept for ``retention`` seconds (at least the broker's
flush interval), so they can be re-sent after the broker lost data.

Parking. A message the broker refuses for good (``InvalidMessage`` or ``ConfigError``
from ``publish_batch``: over NATS' ``max_payload``, a subject it cannot route) would
fail the same way on every try and hold up every message after it. The relay then
sends that page one message at a time, parks each refused one (it stays in the
outbox with the error and the time, no longer pending), logs an ERROR naming it and
goes on in order. ``outbox.parked()`` lists them; once the cause is fixed,
``outbox.requeue(ids)`` makes them pending again (in their old place: the oldest go
first), or ``outbox.discard(ids)`` deletes them. Any other error (the broker down, a
timeout) parks nothing: the relay backs off and tries the page again. A row no
message can be built from (its data or headers not JSON, or not what a ``Message``
takes: written by hand, by another version, or damaged) would stop the relay the
same way; the relay parks it too, with an error naming the row and what is wrong
with it, and ``parked()`` lists it with its stored text (``ParkedMessage.raw``).
Requeued unfixed, it is parked again at the next drain.

Inbox. A consumer records each message id in the same transaction as the message's
effect (``inbox.handler(fn)``); a redelivered message finds its id and applies
nothing. Ids are recorded per consumer group: two groups of one service handling
the same message in one database each apply it once (an id recorded before groups
were, under the group ``""``, counts for every group). The broker is acknowledged
only after that commit. What a handler publishes with ``tx.publish`` joins the
handled message's flow (correlation and causation, as ``caused()`` sets them) unless
it names a flow or a cause of its own.

Batches. A broker that fetches several messages at once hands them to
``InboxHandler.batch``: the whole batch is applied in ONE transaction (one commit,
one fsync) with a savepoint per message, in delivery order. A message whose handler
raises is rolled back to its savepoint alone and reported back, so the broker
retries or dead-letters it; the others commit, and are acknowledged after the commit.

The adapters (``seamwork.storage``) are loaded on first use, so this core imports
no driver.
"""

from __future__ import annotations

import asyncio
import builtins
import importlib
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import KW_ONLY, dataclass
from pathlib import Path
from typing import Any, Protocol

from seamwork._core.checks import check_seconds
from seamwork._core.codec import dumps, loads
from seamwork._core.lifecycle import OpenClose, StartStop
from seamwork.errors import ConfigError, InvalidMessage, MessagingError, StoreError
from seamwork.messaging._message import Message, check_subject, encode, in_flow_of
from seamwork.messaging._ports import Broker, Delivery, PoisonMessage

log = logging.getLogger("seamwork.messaging")

REFUSED: tuple[type[Exception], ...] = (InvalidMessage, ConfigError)
"""What a broker's publish raises for a message it will refuse on every try."""


class Transaction(Protocol):
    """One local transaction of a service's database."""

    async def execute(self, sql: str, params: Sequence[Any] = ()) -> builtins.list[tuple[Any, ...]]:
        """Run a statement in the transaction; returns its rows."""
        ...

    async def publish(self, subject: str, message: Message) -> None:
        """Queue ``message`` for ``subject``; it is sent only if the transaction commits.

        In an inbox handler's transaction, a message with neither a ``correlation_id``
        nor a ``causation_id`` is sent in the flow of the message being handled, as
        ``msg.caused()`` would build it: correlation = that message's flow, causation
        = its id, its trace context carried over (the stored and sent message is that
        copy, with the same id). One that sets either is sent exactly as given: give
        it a ``correlation_id`` of its own (its own ``id``, say) to start a new flow.
        """
        ...


class InboxBatch(Protocol):
    """One transaction applying a batch of messages (an adapter's side of ``batch``)."""

    async def apply(
        self, message: Message, fn: Callable[[Message, Transaction], Awaitable[None]]
    ) -> BaseException | None:
        """Run ``fn(message, tx)`` in its own savepoint unless ``message``'s id was
        applied before (or earlier in this batch); returns the error it raised, after
        rolling back its statements, or None."""
        ...


def outbox_row(subject: str, message: Message, cause: Message | None = None) -> tuple[Any, ...]:
    """The outbox row of ``message`` for ``subject`` - ``(id, subject, type, data,
    correlation_id, causation_id, headers, created_at)``, JSON as text - refusing now
    what a relay could never send. ``cause``: the message an inbox handler is
    handling; ``message`` then joins its flow unless it names its own
    (``in_flow_of``)."""
    check_subject(subject)
    if not isinstance(message, Message):
        raise ConfigError(f"publish takes a Message, got {type(message).__name__}")
    if cause is not None:
        message = in_flow_of(message, cause)
    encode(message)
    return (
        message.id,
        subject,
        message.type,
        dumps(message.data),
        message.flow,
        message.causation_id,
        dumps(dict(message.headers)),
        time.time(),
    )


def check_open(ended: bool) -> None:
    """Refuse a ``tx`` used after its block (a task the handler left running, say):
    on PostgreSQL its connection is back in the pool, serving someone else's
    transaction, and a message published then would be dropped without a word."""
    if ended:
        raise StoreError(
            "the transaction has ended: use tx only inside its block (nothing was applied)"
        )


@dataclass(frozen=True, slots=True)
class OutboxRecord:
    seq: int
    subject: str
    message: Message


@dataclass(frozen=True, slots=True)
class UnreadableRow:
    """A pending outbox row no ``Message`` can be built from; the relay parks it."""

    seq: int
    id: str
    subject: str
    problem: str
    """What is wrong with it, naming the row (its seq and id)."""


RAW_COLUMNS = ("id", "type", "data", "correlation_id", "causation_id", "headers")
"""The stored columns ``ParkedMessage.raw`` holds."""


def read_row(row: Sequence[Any]) -> OutboxRecord | UnreadableRow:
    """The message of a stored outbox row ``(seq, id, subject, type, data,
    correlation_id, causation_id, headers)`` - data and headers as JSON text - or
    what keeps one from being built."""
    seq, id_, subject, type_, data, correlation, causation, headers = row
    try:
        message = Message(
            type_,
            _json(data, "data"),
            id=id_,
            correlation_id=correlation,
            causation_id=causation,
            headers=_json(headers, "headers"),
        )
    except (ValueError, TypeError) as exc:  # ConfigError is a ValueError
        problem = f"outbox row seq {seq} (id {id_!r}) cannot be read: {exc}"
        return UnreadableRow(seq, _text(id_) or "", _text(subject) or "", problem)
    return OutboxRecord(seq, subject, message)


def raw_row(row: Sequence[Any]) -> dict[str, str | None]:
    """The stored columns of an outbox row as text (``ParkedMessage.raw``)."""
    _, id_, _, *rest = row
    return dict(zip(RAW_COLUMNS, (_text(v) for v in (id_, *rest)), strict=True))


def parked_message(row: Sequence[Any]) -> ParkedMessage:
    """The ``ParkedMessage`` of a stored row: ``read_row``'s columns, then its park
    error and time."""
    read = read_row(row[:8])
    error, parked_at = row[8] or "", row[9]
    if isinstance(read, OutboxRecord):
        return ParkedMessage(read.subject, read.message, error, parked_at)
    return ParkedMessage(read.subject, None, error, parked_at, raw=raw_row(row[:8]))


def readable(rows: Sequence[OutboxRecord | UnreadableRow]) -> builtins.list[OutboxRecord]:
    """``rows`` as records; ``StoreError`` naming the first row that cannot be read."""
    for row in rows:
        if isinstance(row, UnreadableRow):
            raise StoreError(f"{row.problem} (an outbox relay parks it)")
    return [row for row in rows if isinstance(row, OutboxRecord)]


def _json(text: Any, column: str) -> Any:
    if not isinstance(text, str | bytes):
        raise TypeError(f"its {column} is not JSON text but {type(text).__name__}")
    try:
        return loads(text)
    except ValueError as exc:  # UnicodeDecodeError too
        raise ValueError(f"its {column} is not valid JSON ({exc})") from exc


def _text(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


@dataclass(frozen=True, slots=True)
class ParkedMessage:
    """An outbox message kept out of the relay's way: the broker refused it for good,
    or no message can be built from its row (then ``message`` is None and ``raw``
    holds the row's stored text)."""

    subject: str
    message: Message | None
    error: str
    """Why it was parked (the broker's exception's type and text, or what is wrong
    with the row)."""
    parked_at: float
    _: KW_ONLY
    raw: Mapping[str, str | None] | None = None
    """The row's id, type, data, correlation_id, causation_id and headers as stored
    (data and headers as JSON text), when no message can be built from it."""

    @property
    def id(self) -> str:
        """The message id (what ``requeue`` and ``discard`` take)."""
        if self.message is not None:
            return self.message.id
        return (self.raw or {}).get("id") or ""


def check_ids(ids: Collection[str]) -> builtins.list[str]:
    """``ids`` as a list of distinct message ids, refusing a lone string (a
    collection of its letters) and anything that is not a string."""
    if isinstance(ids, str | bytes):
        raise ConfigError(f"ids must be a collection of message ids, got {ids!r}")
    bad = [i for i in ids if not isinstance(i, str)]
    if bad:
        raise ConfigError(f"message ids are strings, got {bad[0]!r}")
    for message_id in ids:
        try:
            message_id.encode("utf-8")
        except UnicodeEncodeError:  # argv bytes that are not UTF-8: no store holds them
            raise ConfigError(
                f"message id {message_id!r} is not valid Unicode (no outbox can hold it; "
                "nothing was changed)"
            ) from None
    return builtins.list(dict.fromkeys(ids))


MAX_LIMIT = 2**63 - 1
"""The largest listing limit (SQLite's and PostgreSQL's 64-bit integers)."""


def check_limit(limit: int) -> None:
    """Refuse a listing limit no store takes (not an int, a bool, below 1, past a 64-bit
    integer), naming it."""
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_LIMIT:
        raise ConfigError(f"limit must be an int 1..{MAX_LIMIT}, got {limit!r}")


def not_parked(wanted: Sequence[str], found: Collection[str]) -> MessagingError:
    """The error for ids of ``wanted`` that are not among the parked ``found``."""
    missing = [i for i in wanted if i not in found]
    return MessagingError(
        f"no parked message with id {', '.join(map(repr, missing))} in the outbox "
        "(nothing was changed)"
    )


def id_taken(message_id: str) -> str:
    """What a store says of a message id its outbox holds already (the whole
    transaction is then rolled back)."""
    return (
        f"outbox: message id {message_id!r} is in the outbox already (message ids are "
        "unique, and a parked message keeps its id until outbox.discard([id]) deletes "
        "it; nothing of the transaction was committed)"
    )


def _load(module: str, name: str) -> Any:
    return getattr(importlib.import_module(module), name)


class Outbox(OpenClose, ABC):
    """Messages written with the service's own state, published later by a relay."""

    @staticmethod
    def sqlite(path: str | Path, **options: Any) -> Outbox:
        """The outbox in the service's SQLite database at ``path``."""
        outbox: Outbox = _load("seamwork.storage.sqlite_messaging", "SQLiteOutbox").open_path(
            path, **options
        )
        return outbox

    @staticmethod
    def postgres(dsn: str, **options: Any) -> Outbox:
        """The outbox in the service's PostgreSQL database (``seamwork[postgres]``)."""
        outbox: Outbox = _load("seamwork.storage.postgres_messaging", "PostgresOutbox").open_dsn(
            dsn, **options
        )
        return outbox

    @abstractmethod
    def transaction(self) -> AbstractAsyncContextManager[Transaction]:
        """One local transaction: ``async with outbox.transaction() as tx``."""

    @abstractmethod
    async def pending(self, limit: int) -> builtins.list[OutboxRecord]:
        """The oldest unsent messages, in the order they were written."""

    async def _pending_rows(self, limit: int) -> builtins.list[OutboxRecord | UnreadableRow]:
        """What the relay reads: ``pending(limit)``, with an ``UnreadableRow`` in the
        place of each row no message can be built from. Adapters override it (and
        build ``pending`` on it); this default reads ``pending``."""
        return builtins.list(await self.pending(limit))

    @abstractmethod
    async def mark_sent(self, seqs: Collection[int]) -> None:
        """Mark rows as published (a row another relay parked meanwhile is no longer
        parked: it was published)."""

    @abstractmethod
    async def pending_count(self) -> int:
        """How many messages are not yet published."""

    @abstractmethod
    async def purge_sent(self, older_than: float) -> int:
        """Delete rows sent before wall-clock time ``older_than``; returns how many."""

    @abstractmethod
    async def resend_since(self, since: float) -> int:
        """Mark rows sent after ``since`` as pending again (after broker data loss)."""

    @abstractmethod
    async def wait_for_messages(self, max_wait: float) -> None:
        """Return when this process committed new messages, or after ``max_wait`` s."""

    @abstractmethod
    async def park(self, seq: int, error: str) -> None:
        """Take an unsent row out of the pending ones, keeping it with ``error``."""

    @abstractmethod
    async def parked(self, *, limit: int = 100) -> builtins.list[ParkedMessage]:
        """The parked messages, oldest first."""

    @abstractmethod
    async def requeue(self, ids: Collection[str]) -> int:
        """Make parked messages pending again, in their old place in the order;
        returns how many. An id that is not parked is a ``MessagingError`` naming it,
        and then nothing is requeued."""

    @abstractmethod
    async def discard(self, ids: Collection[str]) -> int:
        """Delete parked messages for good; returns how many. An id that is not
        parked is a ``MessagingError`` naming it, and then nothing is deleted."""

    @abstractmethod
    async def open(self) -> None: ...

    @abstractmethod
    async def aclose(self) -> None: ...


class Inbox(OpenClose, ABC):
    """Remembers handled message ids in the service's database, with the effects."""

    @staticmethod
    def sqlite(path: str | Path, **options: Any) -> Inbox:
        """The inbox in the service's SQLite database at ``path``."""
        inbox: Inbox = _load("seamwork.storage.sqlite_messaging", "SQLiteInbox").open_path(
            path, **options
        )
        return inbox

    @staticmethod
    def postgres(dsn: str, **options: Any) -> Inbox:
        """The inbox in the service's PostgreSQL database (``seamwork[postgres]``)."""
        inbox: Inbox = _load("seamwork.storage.postgres_messaging", "PostgresInbox").open_dsn(
            dsn, **options
        )
        return inbox

    @staticmethod
    def of(outbox: Outbox) -> Inbox:
        """An inbox in the same database as ``outbox``: handlers can ``tx.publish``
        follow-up messages atomically with their effects."""
        inbox: Inbox = outbox.inbox()  # type: ignore[attr-defined]
        return inbox

    @abstractmethod
    def _transaction(
        self, message: Message, group: str = ""
    ) -> AbstractAsyncContextManager[Transaction | None]:
        """A transaction that records ``message``'s id for consumer ``group`` on commit;
        yields None if the id was recorded before for it (a redelivery)."""

    @abstractmethod
    async def seen(self, message_id: str) -> bool:
        """Whether a message with this id was handled (by any consumer group)."""

    @abstractmethod
    async def open(self) -> None: ...

    @abstractmethod
    async def aclose(self) -> None: ...

    def _batch(
        self, messages: Sequence[Message], group: str = ""
    ) -> AbstractAsyncContextManager[InboxBatch]:
        """One transaction for ``messages`` of consumer ``group``; committed when the
        block exits cleanly.

        Adapters override this; the default raises ``NotImplementedError`` and
        ``InboxHandler.batch`` then applies the messages one transaction each.
        """
        raise NotImplementedError

    def handler(
        self,
        fn: Callable[[Message, Transaction], Awaitable[None]],
        *,
        types: Collection[str] | None = None,
    ) -> InboxHandler:
        """A broker handler running ``fn(message, tx)`` at most once per message id.

        ``tx.publish`` sends follow-ups only if ``fn``'s transaction commits, and in
        ``message``'s flow: a ``Message`` published without a ``correlation_id`` or
        ``causation_id`` gets ``message``'s flow as its correlation and ``message``'s
        id as its causation (as ``message.caused(...)`` builds it), so a
        ``FlowMonitor`` follows the flow on. To start a new flow, give the follow-up a
        ``correlation_id`` of its own (a business key, or its own id:
        ``Message(t, d, id=i, correlation_id=i)``).

        ``types`` declares the message types ``fn`` handles; any other type is
        dead-lettered at once (it would fail the same way on every retry).
        """
        return InboxHandler(self, fn, types)


class InboxHandler:
    """The broker handler ``Inbox.handler`` builds: ``await h(delivery)`` for one
    message, ``await h.batch(deliveries)`` for a fetched batch in one transaction."""

    def __init__(
        self,
        inbox: Inbox,
        fn: Callable[[Message, Transaction], Awaitable[None]],
        types: Collection[str] | None,
    ) -> None:
        if isinstance(types, str):  # frozenset("OrderCreated") is a set of letters
            raise ConfigError(f"types must be a collection of type names, got {types!r}")
        self.inbox = inbox
        self.fn = fn
        self.types = frozenset(types) if types is not None else None

    async def _apply(self, message: Message, tx: Transaction) -> None:
        """``fn(message, tx)``, refusing a ``Message`` (or a list of them) it returns:
        a follow-up returned rather than published with ``tx.publish`` would be
        dropped without a word. Any other value (a lambda's rows) is ignored."""
        returned = await _returned(self.fn(message, tx))
        if isinstance(returned, list | tuple) and any(isinstance(m, Message) for m in returned):
            returned = next(m for m in returned if isinstance(m, Message))
        if isinstance(returned, Message):
            name = getattr(self.fn, "__name__", repr(self.fn))
            raise PoisonMessage(
                f"inbox handler {name} returned a Message ({returned.type}) for message "
                f"{message.type!r} {message.id}: a handler publishes its follow-ups with "
                "tx.publish(subject, message), what it returns is dropped (nothing of it "
                "was applied)"
            )

    def __repr__(self) -> str:
        return f"InboxHandler({self.inbox!r}, {getattr(self.fn, '__name__', self.fn)!r})"

    def _undeclared(self, delivery: Delivery) -> PoisonMessage | None:
        if self.types is None or delivery.message.type in self.types:
            return None
        return PoisonMessage(
            f"no handler for message type {delivery.message.type!r} on {delivery.subject} "
            f"(declared: {', '.join(sorted(self.types))})"
        )

    async def __call__(self, delivery: Delivery) -> None:
        undeclared = self._undeclared(delivery)
        if undeclared is not None:
            raise undeclared
        async with self.inbox._transaction(delivery.message, delivery.group) as tx:
            if tx is not None:
                await self._apply(delivery.message, tx)

    async def batch(self, deliveries: Sequence[Delivery]) -> builtins.list[BaseException | None]:
        """Apply ``deliveries`` in order in ONE transaction, a savepoint per message.

        Returns one outcome per delivery: None (applied now or before: acknowledge
        it) or the error its handler raised (its statements rolled back alone: retry
        or dead-letter it). Returns only after the commit; if the commit fails, this
        raises and no delivery may be acknowledged.
        """
        outcomes: builtins.list[BaseException | None] = [self._undeclared(d) for d in deliveries]
        todo = [i for i, outcome in enumerate(outcomes) if outcome is None]
        if not todo:
            return outcomes
        groups = {deliveries[i].group for i in todo}
        try:
            if len(groups) > 1:  # one consumer fetches a batch; anything else, one by one
                raise NotImplementedError
            transaction = self.inbox._batch([deliveries[i].message for i in todo], groups.pop())
        except NotImplementedError:
            for i in todo:
                outcomes[i] = await _outcome(self(deliveries[i]))
            return outcomes
        async with transaction as batch:
            for i in todo:
                outcomes[i] = await batch.apply(deliveries[i].message, self._apply)
        return outcomes


async def _returned(call: Awaitable[object]) -> object:
    return await call


async def _outcome(call: Awaitable[None]) -> BaseException | None:
    try:
        await call
    except Exception as exc:
        return exc
    return None


class OutboxRelay(StartStop):
    """Publishes an outbox's pending messages in order and marks them sent.

    ``await relay.drain()`` publishes everything pending once; ``async with relay:``
    keeps doing it in the background (woken by commits in this process, and every
    ``poll_interval`` for the others), purging sent rows older than ``retention``.
    A message the broker refuses for good is parked (see the module's doc);
    ``published`` and ``parked`` count what this relay did.
    """

    def __init__(
        self,
        outbox: Outbox,
        broker: Broker,
        *,
        page_size: int = 500,
        poll_interval: float = 0.5,
        retention: float = 600.0,
    ) -> None:
        # refused here, not at the first drain: a float page failed every drain, a NaN
        # poll interval never polled, a NaN retention never purged
        if isinstance(page_size, bool) or not isinstance(page_size, int) or page_size < 1:
            raise ConfigError(f"page_size must be an int >= 1, got {page_size!r}")
        check_seconds("poll_interval", poll_interval)
        if not _seconds(retention) or not retention >= 0:
            raise ConfigError(f"retention must be >= 0 seconds, got {retention!r}")
        self.outbox = outbox
        self.broker = broker
        self.page_size = page_size
        self.poll_interval = poll_interval
        self.retention = retention
        self.published = 0
        self.parked = 0
        self._task: asyncio.Task[None] | None = None
        self._draining = asyncio.Lock()

    async def drain(self) -> int:
        """Publish every pending message once, in order; returns how many.

        Drains of one relay (a call while ``async with relay`` runs one) take turns:
        two reading the same page would both publish it, and a broker that does not
        drop duplicate ids (RabbitMQ) would deliver it twice.
        """
        async with self._draining:
            total = 0
            while True:
                rows = await self.outbox._pending_rows(self.page_size)
                if not rows:
                    return total
                records = [r for r in rows if isinstance(r, OutboxRecord)]
                if len(records) < len(rows):
                    await self._park_unreadable(rows)
                    if not records:
                        continue
                try:
                    await self.broker.publish_batch([(r.subject, r.message) for r in records])
                except REFUSED:
                    total += await self._one_at_a_time(records)
                    continue
                await self.outbox.mark_sent([r.seq for r in records])
                total += len(records)
                self.published += len(records)

    async def _one_at_a_time(self, records: Sequence[OutboxRecord]) -> int:
        """Publish a page the broker refused, one message at a time, in order, parking
        each message it refuses; returns how many were published. Any other error
        stops here (those sent so far are marked) and is raised."""
        sent: builtins.list[int] = []
        try:
            for record in records:
                try:
                    await self.broker.publish_batch([(record.subject, record.message)])
                except REFUSED as exc:
                    await self._park(record, exc)
                else:
                    sent.append(record.seq)
                    self.published += 1
        finally:
            if sent:
                await self.outbox.mark_sent(sent)
        return len(sent)

    async def _park(self, record: OutboxRecord, exc: Exception) -> None:
        error = f"{type(exc).__name__}: {exc}"
        await self.outbox.park(record.seq, error)
        self.parked += 1
        log.error(
            "outbox relay: parked message %s (%s) to %s, the broker refuses it: %s "
            "(outbox.parked() lists it; requeue it once the cause is fixed)",
            record.message.id,
            record.message.type,
            record.subject,
            error,
        )

    async def _park_unreadable(self, rows: Sequence[OutboxRecord | UnreadableRow]) -> None:
        for row in rows:
            if isinstance(row, UnreadableRow):
                await self.outbox.park(row.seq, row.problem)
                self.parked += 1
                log.error(
                    "outbox relay: parked %s, to %s (outbox.parked() lists it with its stored "
                    "text; discard it, or fix the row and requeue it)",
                    row.problem,
                    row.subject,
                )

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="seamwork-outbox-relay")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _run(self) -> None:
        delay = self.poll_interval
        last_purge = 0.0
        task = asyncio.current_task()
        assert task is not None
        while True:
            try:
                await self.drain()
                delay = self.poll_interval
                if time.time() - last_purge > max(self.retention / 10, 1.0):
                    await self.outbox.purge_sent(time.time() - self.retention)
                    last_purge = time.time()
                _raise_if_cancelled(task)
                await self.outbox.wait_for_messages(self.poll_interval)
                _raise_if_cancelled(task)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("outbox relay: %s; retrying in %.1fs", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)


def _seconds(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _raise_if_cancelled(task: asyncio.Task[Any]) -> None:
    """Stop a task whose cancel was swallowed by a callee: on Python 3.11,
    ``asyncio.wait_for`` (which nats-py's publish uses) drops a cancel that lands as its
    future completes, and the relay would then go on forever under a ``stop()``."""
    if task.cancelling():
        raise asyncio.CancelledError
