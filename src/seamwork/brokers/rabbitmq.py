"""``RabbitBroker``: the ``Broker`` port on RabbitMQ (aio-pika).

Publishing. Every message goes, persistent, through one durable topic exchange
(``seamwork`` by default) with its subject as routing key, on a channel in
publisher-confirm mode: ``publish`` returns once the broker confirmed the message.
``publish_batch`` sends the whole batch down one channel before waiting for the
confirms, so it pays one round trip, and the channel keeps the order. The AMQP
``message_id`` is the message id; type, correlation, causation and trace ride in
headers (``encode``). A message on a subject that no group is bound to is dropped
by RabbitMQ, as with any topic exchange: subscribe the groups first.

Groups. A consumer group is one durable quorum queue, ``<group>.<subject>`` (a group
holding a dot gets a hash of itself in the name, see ``queue_name``), bound
to the exchange with the subject as binding key (NATS wildcards map: ``*`` stays
``*``, ``>`` - one or more tokens - becomes ``*.#``, since ``#`` alone also matches
none; in the queue's name they are ``..any`` and ``..all``).
Every member consumes that queue, so each message goes to one of them. A group queue
deleted under a running member is declared and bound again by the member's consumer
recovery (aio-pika's), and consumed on; what was published meanwhile went nowhere. A member
handles its messages one at a time; a group with one member sees its messages in
publish order, except that a retried message goes behind the ones published after it.

Retries. RabbitMQ has no delayed requeue: a nack with requeue hands the message
straight back. So a failed delivery is re-published (confirmed) to a retry queue
of its group for that delay, ``<group>.<subject>..retry.<ms>``, with the number of
failed deliveries so far in a header, and only then acknowledged. The retry queue is a
quorum queue with a queue-wide TTL and at-least-once dead-lettering back into the
group's queue (default exchange, the queue's name as routing key), so the message
comes back to this group only, after the delay, and survives a broker restart.
One queue per delay (``retry_delay * 2**(attempt-1)``, capped at 30 s) keeps the
TTL uniform inside a queue, which RabbitMQ needs: it expires only at the head.
The empty token before ``retry`` keeps the name out of reach of any group queue
(``<group>.<subject>.retry.<ms>`` was also the queue of that group on the subject
``<subject>.retry.<ms>``, which then got the retries).
The attempt number counts only the failures the handler raised (that header): a
message handed back unhandled - prefetched by a member that stopped, or held by
one that crashed - has not failed. The quorum queue's ``x-delivery-count`` counts
those returns; once it reaches ``crash_limit`` the message is dead-lettered before
its handler runs, so a message that kills its consumer does not loop forever.
Group queues are declared with ``x-delivery-limit`` 1000: RabbitMQ 4 gives a quorum
queue without one a limit of 20 and drops (there is no dead-letter exchange) a
message past it, which ``crash_limit`` must reach first. A group queue declared by
an earlier version keeps its arguments (a warning says so; a ``delivery-limit``
policy sets the limit on it).

Retries and dead letters are published to their queue as mandatory: if that queue
was deleted under a running broker, RabbitMQ returns the message instead of
confirming it, the original is not acknowledged but requeued (after
``retry_delay``), and the queue is declared again on the next try.

Dead letters. After ``max_deliver`` failed attempts, or at once for
``PoisonMessage`` / ``InvalidMessage``, the message is published (confirmed) to the
dead-letter stream ``<exchange>.deadletter`` with its subject, group, error,
attempts and time in headers (and, for another producer's message known by AMQP's
``message_id`` alone, that id as ``Seamwork-Id``), and then acknowledged. A stream, not a queue, so
listing reads it without consuming (a queue would have to be drained and requeued,
which reorders it and, on quorum queues, counts against the delivery limit).
A stream is append-only, so ``replay_dead_letter`` re-publishes the letter and then
appends a tombstone naming its offset; listing skips tombstoned letters. A crash
between the replay and the tombstone replays once more on the next try with the
same message id, which an ``Inbox`` ignores.

Listing writes nothing (``_rabbit_dlq``): ``dead_letters`` on a broker that is not
connected yet connects read-only - it checks that the exchange exists (passively)
and declares nothing, raising ``BrokerUnavailable`` if there is no such exchange;
a missing dead-letter stream lists as empty. A read-only connected broker still
publishes and subscribes: the dead-letter stream is declared on first use.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import re
from collections.abc import Mapping, Sequence
from typing import Any

try:
    import aio_pika
    import aiormq
    from aio_pika.abc import (
        AbstractChannel,
        AbstractExchange,
        AbstractIncomingMessage,
        AbstractQueue,
        AbstractRobustConnection,
    )
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("RabbitMQ support needs: pip install 'seamwork[rabbitmq]'") from exc

from seamwork._core.checks import check_seconds
from seamwork.brokers._cancels import to_the_end
from seamwork.brokers._rabbit_dlq import TOMBSTONE, Raw, read_letters
from seamwork.brokers._subscription import GracefulStop
from seamwork.errors import (
    BrokerUnavailable,
    ConfigError,
    InvalidMessage,
    MessagingError,
    PublishError,
)
from seamwork.messaging._message import MSG_ID, Message, check_subject, decode, encode
from seamwork.messaging._ports import (
    DLQ_HEADERS,
    DLQ_SUBJECT,
    DeadLetter,
    Delivery,
    Handler,
    PoisonMessage,
    SubscriptionStats,
    check_subscribe_settings,
    dead_letter_headers,
    read_dead_letter,
)

log = logging.getLogger("seamwork.brokers")

RETRIES = "Seamwork-Deliveries"
"""Deliveries that failed before this one (set on the way through a retry queue)."""
SUBJECT = "Seamwork-Subject"
"""The original subject (a retry comes back with the queue's name as routing key)."""
_OURS = DLQ_HEADERS | {RETRIES, SUBJECT}
_BROKER_HEADERS = frozenset({"x-delivery-count", "x-death", "x-stream-offset"})
_MAX_DELAY = 30.0
_DELIVERY_LIMIT = 1000
_MAX_MESSAGE_SIZE = 128 * 1024 * 1024
"""RabbitMQ's default ``max_message_size`` (bytes of a message's body)."""
"""``x-delivery-limit`` of a group queue: far above ``crash_limit``, which acts first."""
_DRIVER_ERRORS = (aiormq.exceptions.AMQPError, ConnectionError, OSError, TimeoutError)
_SHORT_STRING = 255
"""Bytes an AMQP short string (``message_id``, ``correlation_id``, ``type``) holds."""
_QUEUE_NAME = re.compile(r"[a-zA-Z0-9-_.:@#,/+ ]+")
"""What AMQP (pamqp) takes as a queue name."""
_RETRY = "..retry."
"""Between a group queue's name and a delay in ms: the name of its retry queue. The
empty token is one no group queue holds (subjects have none; ``*``/``>`` give
``..any``/``..all``)."""
_MAX_QUEUE_NAME = 255 - len(f"{_RETRY}30000")
"""A group queue's name leaves room for its retry queues' suffix (255 bytes in all)."""


def binding_key(subject: str) -> str:
    """The AMQP binding key of a NATS-style subject: ``>`` (one or more tokens) ->
    ``*.#`` (``#`` alone matches none too: ``orders.#`` takes ``orders``)."""
    return ".".join("*.#" if token == ">" else token for token in subject.split("."))


def queue_name(group: str, subject: str) -> str:
    """The quorum queue that a consumer group of ``subject`` shares.

    AMQP queue names cannot hold ``*`` or ``>``: a wildcard token becomes an empty
    token and a word (``orders.*`` -> ``<group>.orders..any``, ``>`` -> ``..all``),
    which no literal subject can spell (subjects have no empty tokens).

    The group is the name's first token, so a group holding a dot is spelled
    ``<group with . as _>#<hash of the group>``: as it is, ``billing.eu`` on
    ``created`` would share ``billing.eu.created`` with ``billing`` on ``eu.created``.
    """
    tokens = {"*": ".any", ">": ".all"}
    head = group
    if "." in group:
        head = f"{group.replace('.', '_')}#{hashlib.sha256(group.encode()).hexdigest()[:16]}"
    name = ".".join([head, *(tokens.get(token, token) for token in subject.split("."))])
    if len(name.encode()) > _MAX_QUEUE_NAME or not _QUEUE_NAME.fullmatch(name):
        raise ConfigError(
            f"group {group!r} on subject {subject!r} cannot name a RabbitMQ queue: "
            f"{name!r} needs letters, digits and -_.:@#,/+ only, at most "
            f"{_MAX_QUEUE_NAME} bytes"
        )
    return name


class RabbitSubscription(GracefulStop):
    """A running consumer of one group on one subject (its own channel); ``stop()`` as
    in ``seamwork.brokers._subscription`` (a handler still running after ``ack_wait``
    is cancelled and its message handed back; closing the channel hands back what was
    prefetched)."""

    def __init__(self, channel: AbstractChannel, *, grace: float = 30.0) -> None:
        super().__init__(grace)
        self._channel = channel

    async def stop(self) -> None:
        # the one in hand finishes; the next one the consumer may already have taken
        # stays untouched (not started) and goes back with the channel
        if self._stopped_by_own_handler():
            return
        task, self._task = self._task, None
        try:
            if task is not None:
                await self._wait_for_hand("handed back")
        finally:
            await self._end(task)

    async def _end(self, consumer: asyncio.Task[None] | None) -> None:
        """Close the channel, then end the consumer's task: both, even if a cancel
        lands meanwhile (it is raised after), or the task would wait for its channel
        forever."""
        try:
            await self._close_channel()
        finally:
            if consumer is not None:
                consumer.cancel()
                await asyncio.gather(consumer, return_exceptions=True)

    async def _close_channel(self) -> None:
        with contextlib.suppress(Exception):
            # Prefetched, unacked messages go back. Closing the channel before the
            # consumer's iterator closes returns them without a nack (a nack would
            # count as a failed delivery on some RabbitMQ versions).
            await to_the_end(self._channel.close())


class RabbitBroker:
    """``Broker`` on RabbitMQ: publisher confirms, quorum queues, a dead-letter stream.

    Args:
        url: ``amqp://user:password@host:port/vhost``.
        exchange: the durable topic exchange; also names the dead-letter stream
            (``<exchange>.deadletter``).
        publish_timeout: seconds to wait for a publisher confirm.
        connect_timeout: seconds to wait for the first connection.
        reconnect_interval: seconds between reconnection attempts after a loss;
            publishes in the meantime raise ``PublishError``, consumers resume.
        prefetch: unacknowledged messages a subscription may hold.
        dead_letter_max_age: how long the dead-letter stream keeps letters, in
            RabbitMQ's ``x-max-age`` form (``"30D"``, ``"12h"``); None keeps them.
        crash_limit: a message handed out this many times without an outcome (its
            consumer crashed or was stopped while holding it) is dead-lettered
            before its handler runs again. Failures the handler raises count
            against ``max_deliver`` instead.
        max_message_size: the broker's ``max_message_size`` in bytes (RabbitMQ's
            default, 128 MiB): ``publish`` refuses a larger body with
            ``InvalidMessage`` before sending it. RabbitMQ closes the channel for
            such a message, which failed every other publish in flight on it.
    """

    def __init__(
        self,
        url: str,
        *,
        exchange: str = "seamwork",
        publish_timeout: float = 10.0,
        connect_timeout: float = 5.0,
        reconnect_interval: float = 1.0,
        prefetch: int = 64,
        dead_letter_max_age: str | None = None,
        crash_limit: int = 20,
        max_message_size: int = _MAX_MESSAGE_SIZE,
    ) -> None:
        if not exchange or exchange.startswith("amq."):
            raise ConfigError(f"exchange must be a non-empty name outside 'amq.', got {exchange!r}")
        check_seconds("publish_timeout", publish_timeout)
        check_seconds("connect_timeout", connect_timeout)
        check_seconds("reconnect_interval", reconnect_interval)
        if prefetch < 1:
            raise ConfigError(f"prefetch must be >= 1, got {prefetch}")
        if max_message_size < 1:
            raise ConfigError(f"max_message_size must be >= 1, got {max_message_size}")
        if not 1 <= crash_limit < _DELIVERY_LIMIT:
            raise ConfigError(f"crash_limit must be in 1..{_DELIVERY_LIMIT - 1}, got {crash_limit}")
        self.url = url
        self.exchange_name = exchange
        self.dead_letter_queue = f"{exchange}.deadletter"
        self._timeout = publish_timeout
        self._connect_timeout = connect_timeout
        self._reconnect = reconnect_interval
        self._prefetch = prefetch
        self._max_age = dead_letter_max_age
        self.crash_limit = crash_limit
        self.max_message_size = max_message_size
        self._connection: AbstractRobustConnection | None = None
        self._channel: AbstractChannel | None = None
        self._exchange: AbstractExchange | None = None
        self._declared: list[str] = []
        self._subscriptions: list[RabbitSubscription] = []
        self._lock = asyncio.Lock()

    def __repr__(self) -> str:
        return f"RabbitBroker({_redact(self.url)!r}, exchange={self.exchange_name!r})"

    @property
    def declared_queues(self) -> tuple[str, ...]:
        """The queues this instance declared (for tools and test clean-up)."""
        return tuple(self._declared)

    # --- connection ------------------------------------------------------------------

    async def connect(self) -> None:
        """Connect, declaring the exchange and the dead-letter stream."""
        await self._connect(read_only=False)

    async def _connect(self, *, read_only: bool) -> None:
        """Connect; ``read_only`` declares nothing and needs the exchange to exist."""
        if self._exchange is not None:
            return
        async with self._lock:
            if self._exchange is not None:
                return
            connection = await self._open()
            try:
                channel, exchange = await self._set_up(connection, read_only=read_only)
            except BaseException:
                await _close(connection)
                raise
            self._connection, self._channel, self._exchange = connection, channel, exchange

    async def _open(self) -> AbstractRobustConnection:
        """A connection to the broker, closed again if its connect does not finish.

        The connection is made here, not by ``aio_pika.connect_robust``: that one
        connects in a task of its own, which a cancel of the caller (mid-handshake)
        left running, to hold an open connection no one could close. The attempt is
        not cut short either (a cancel waits for it, at most ``connect_timeout``):
        aio-pika's task, cancelled as its handshake ends, drops the connection it has
        just opened.
        """
        connection = aio_pika.RobustConnection(
            aio_pika.connection.make_url(self.url, reconnect_interval=self._reconnect),
            client_properties={"connection_name": "seamwork"},
        )
        try:
            await to_the_end(connection.connect(timeout=self._connect_timeout))
        except BaseException as exc:
            await _close(connection)
            if not isinstance(exc, Exception):
                raise
            raise BrokerUnavailable(
                f"cannot connect to RabbitMQ at {_redact(self.url)}: {_reason(exc)}"
            ) from exc
        return connection

    async def _set_up(
        self, connection: AbstractRobustConnection, *, read_only: bool
    ) -> tuple[AbstractChannel, AbstractExchange]:
        """The publishing channel and the exchange (declared unless ``read_only``)."""
        try:
            channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
            if read_only:
                return channel, await channel.get_exchange(self.exchange_name, ensure=True)
            exchange = await channel.declare_exchange(
                self.exchange_name, aio_pika.ExchangeType.TOPIC, durable=True
            )
            await self._declare_dead_letter_stream(channel)
        except aiormq.exceptions.ChannelNotFoundEntity as exc:
            raise BrokerUnavailable(
                f"no seamwork exchange {self.exchange_name!r} on the broker"
            ) from exc
        except Exception as exc:
            raise BrokerUnavailable(
                f"cannot set up exchange {self.exchange_name!r} on RabbitMQ: {_reason(exc)}"
            ) from exc
        return channel, exchange

    async def aclose(self) -> None:
        """Stop every subscription, then close the connection. The subscriptions stop
        together: none takes another message, and the handlers in hand get one grace
        (the longest ``ack_wait``) to finish, not one each. A cancel that lands
        meanwhile is raised after both (a second one cuts the wait short). Called by a
        subscription's own handler, it does not wait for that handler: its message,
        settled after the connection is closed, comes back."""
        subscriptions, self._subscriptions = self._subscriptions, []
        connection, self._connection = self._connection, None
        self._channel = self._exchange = None
        await to_the_end(_shut(subscriptions, connection, asyncio.current_task()))

    async def _context(self) -> tuple[AbstractChannel, AbstractExchange]:
        if self._exchange is None:
            await self.connect()
        assert self._channel is not None
        assert self._exchange is not None
        return self._channel, self._exchange

    async def _declare_dead_letter_stream(self, channel: AbstractChannel) -> None:
        arguments: dict[str, Any] = {"x-queue-type": "stream"}
        if self._max_age:
            arguments["x-max-age"] = self._max_age
        await channel.declare_queue(self.dead_letter_queue, durable=True, arguments=arguments)
        self._remember(self.dead_letter_queue)

    def _remember(self, name: str) -> None:
        if name not in self._declared:
            self._declared.append(name)

    # --- publishing ------------------------------------------------------------------

    async def publish(
        self, subject: str, message: Message, headers: Mapping[str, str] | None = None
    ) -> None:
        _routable(subject)
        amqp = self._refuse_oversize(subject, message, _amqp_message(message, headers))
        _, exchange = await self._context()
        await self._confirmed(exchange, amqp, subject, f"{message.type} {message.id}")

    async def publish_batch(self, items: Sequence[tuple[str, Message]]) -> None:
        if not items:
            return
        wired = [
            (_routable(s), self._refuse_oversize(s, message, _amqp_message(message, None)))
            for s, message in items
        ]
        _, exchange = await self._context()
        # One channel writes its publishes in call order (aiormq serializes them under
        # a FIFO lock), so starting them in order keeps the batch in order.
        results = await asyncio.gather(
            *(
                self._confirmed(exchange, amqp, subject, str(amqp.message_id))
                for subject, amqp in wired
            ),
            return_exceptions=True,
        )
        for result in results:
            if isinstance(result, BaseException):
                raise result

    def _refuse_oversize(
        self, subject: str, message: Message, amqp: aio_pika.Message
    ) -> aio_pika.Message:
        """``amqp``, unless its body is over ``max_message_size``.

        Raises:
            InvalidMessage: the body is over it (RabbitMQ would close the publishing
                channel, failing every publish in flight on it).
        """
        if len(amqp.body) > self.max_message_size:
            raise InvalidMessage(
                f"message {message.type!r} {message.id} to {subject}: body of "
                f"{len(amqp.body)} bytes, over the broker's max_message_size of "
                f"{self.max_message_size}"
            )
        return amqp

    async def _confirmed(
        self,
        exchange: AbstractExchange,
        amqp: aio_pika.Message,
        routing_key: str,
        what: str,
        *,
        mandatory: bool = False,
    ) -> None:
        try:
            await exchange.publish(amqp, routing_key, mandatory=mandatory, timeout=self._timeout)
        except aiormq.exceptions.PublishError as exc:  # returned: it reached no queue
            raise _Unroutable(f"RabbitMQ returned {what}: no queue {routing_key!r}") from exc
        except aio_pika.exceptions.DeliveryError as exc:
            raise PublishError(f"RabbitMQ refused {what} to {routing_key!r}: {exc}") from exc
        except (*_DRIVER_ERRORS, aio_pika.exceptions.ChannelInvalidStateError) as exc:
            raise PublishError(
                f"publish of {what} to {routing_key!r} not confirmed "
                f"(connection to {_redact(self.url)}: {_reason(exc)})"
            ) from exc

    async def _to_queue(self, queue: str, amqp: aio_pika.Message, what: str) -> None:
        """Publish straight to ``queue``, mandatory: a queue deleted behind our back
        returns the message (``PublishError``) and is declared again on the next try,
        instead of the broker confirming a message that it dropped."""
        channel, _ = await self._context()
        try:
            await self._confirmed(channel.default_exchange, amqp, queue, what, mandatory=True)
        except _Unroutable:
            if queue in self._declared:
                self._declared.remove(queue)
            raise

    # --- consuming -------------------------------------------------------------------

    async def subscribe(
        self,
        subject: str,
        group: str,
        handler: Handler,
        *,
        max_deliver: int = 5,
        ack_wait: float = 30.0,
        retry_delay: float = 0.5,
    ) -> RabbitSubscription:
        """Consume ``subject`` as ``group``. ``ack_wait`` only bounds how long
        ``stop()`` waits for the message in hand: RabbitMQ redelivers a message when
        its consumer's channel closes, not on a timer."""
        check_subject(subject, wildcards=True)
        check_subscribe_settings(group, max_deliver, ack_wait, retry_delay)
        name = queue_name(group, subject)  # refused before anything is declared
        try:
            channel, queue = await self._member_channel(name, subject)
        except _DRIVER_ERRORS as exc:
            raise BrokerUnavailable(
                f"cannot set up group {group!r} on {subject!r}: {_reason(exc)}"
            ) from exc
        subscription = RabbitSubscription(channel, grace=ack_wait)
        consumer = _Consumer(self, queue, subject, group, handler, max_deliver, retry_delay)
        subscription._task = asyncio.create_task(consumer.run(subscription))
        self._subscriptions.append(subscription)
        return subscription

    async def _member_channel(
        self, name: str, subject: str
    ) -> tuple[AbstractChannel, AbstractQueue]:
        """A channel of its own for a member of a group, and the group's queue ``name``
        on it; the channel is closed again if this does not finish (a cancel, an error)."""
        await self._context()
        assert self._connection is not None
        channel: AbstractChannel | None = None
        try:
            channel = await self._connection.channel(publisher_confirms=False)
            await channel.set_qos(prefetch_count=self._prefetch)
            return channel, await self._group_queue(channel, name, subject)
        except BaseException:
            if channel is not None:
                with contextlib.suppress(Exception):
                    await to_the_end(channel.close())
            raise

    async def _group_queue(
        self, channel: AbstractChannel, name: str, subject: str
    ) -> AbstractQueue:
        arguments: dict[str, Any] = {"x-queue-type": "quorum", "x-delivery-limit": _DELIVERY_LIMIT}
        assert self._connection is not None
        # Declared on a channel of its own: a queue declared by an earlier version
        # (no x-delivery-limit) fails the declaration, which closes the channel.
        probe = await self._connection.channel(publisher_confirms=False)
        legacy = False
        try:
            await probe.declare_queue(name, durable=True, arguments=arguments)
        except aiormq.exceptions.ChannelPreconditionFailed as exc:
            if "x-delivery-limit" not in str(exc):
                raise
            legacy = True
            log.warning(
                "queue %s has no x-delivery-limit (declared by an earlier version): on "
                "RabbitMQ 4 its default limit of 20 drops messages; set a delivery-limit "
                "policy of %d on it",
                name,
                _DELIVERY_LIMIT,
            )
        finally:
            with contextlib.suppress(Exception):
                await to_the_end(probe.close())
        # Declared in full (not passively) where it can be: aio-pika declares a queue
        # again as it was declared when it restores a consumer that the broker
        # cancelled, so a group queue deleted under a running member comes back
        # (bound again) instead of leaving the member consuming nothing for good.
        if legacy:
            queue = await channel.declare_queue(name, passive=True)
        else:
            queue = await channel.declare_queue(name, durable=True, arguments=arguments)
        await queue.bind(self.exchange_name, routing_key=binding_key(subject))
        if subject.endswith(">"):  # earlier versions bound ``#``, which takes the bare prefix
            await queue.unbind(self.exchange_name, routing_key=subject[:-1] + "#")
        self._remember(name)
        return queue

    async def _retry_queue(self, queue: str, delay: float) -> str:
        """The retry queue of ``queue`` for ``delay`` seconds (declared on first use)."""
        name = f"{queue}{_RETRY}{round(delay * 1000)}"
        if name in self._declared:
            return name
        channel, _ = await self._context()
        arguments: dict[str, Any] = {
            "x-queue-type": "quorum",
            "x-message-ttl": max(1, round(delay * 1000)),
            "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": queue,
            "x-dead-letter-strategy": "at-least-once",
            "x-overflow": "reject-publish",
        }
        await channel.declare_queue(name, durable=True, arguments=arguments)
        self._remember(name)
        return name

    async def _retry(
        self, msg: AbstractIncomingMessage, queue: str, subject: str, attempt: int, delay: float
    ) -> None:
        target = await self._retry_queue(queue, delay)
        headers = {**_carried(msg), SUBJECT: subject, RETRIES: str(attempt)}
        await self._to_queue(target, _copy(msg, headers), f"retry of {msg.message_id}")

    async def _dead_letter(
        self, msg: AbstractIncomingMessage, subject: str, group: str, error: str, attempts: int
    ) -> None:
        headers = {**_carried(msg), **dead_letter_headers(subject, group, error, attempts)}
        if MSG_ID not in headers and msg.message_id:
            # another producer's message, identified by AMQP's message_id alone: the
            # letter names it in the header that listing and replay read it from
            headers[MSG_ID] = msg.message_id
        if self.dead_letter_queue not in self._declared:
            channel, _ = await self._context()
            await self._declare_dead_letter_stream(channel)
        await self._to_queue(self.dead_letter_queue, _copy(msg, headers), "a dead letter")

    # --- dead letters ----------------------------------------------------------------

    async def dead_letters(self, *, limit: int = 100) -> list[DeadLetter]:
        """The dead letters, oldest first; reads only (see the module's docstring)."""
        letters = await self._read_dead_letters()
        return [_letter(offset, body, headers) for offset, body, headers in letters[:limit]]

    async def replay_dead_letter(self, key: str) -> None:
        await self.replay_dead_letters([key])

    async def replay_dead_letters(self, keys: Sequence[str]) -> None:
        """``replay_dead_letter`` for each of ``keys`` in turn, reading the stream once
        for all of them (a read waits out the listing's idle gap: once a letter, a few
        hundred took minutes).

        Raises:
            MessagingError: a key names no live letter (nothing is replayed), or a
                letter names no subject (the ones before it are replayed).
        """
        live = {str(x[0]): x for x in await self._read_dead_letters()}
        missing = [key for key in keys if key not in live]
        if missing:
            raise MessagingError(
                f"no dead letter with key {missing[0]!r} in {self.dead_letter_queue}"
            )
        for key in keys:
            await self._replay(key, live[key])

    async def _replay(self, key: str, found: Raw) -> None:
        _, body, headers = found
        try:
            subject = _text(headers[DLQ_SUBJECT], DLQ_SUBJECT)  # a letter holds this header
            message_id = _text(headers.get(MSG_ID), MSG_ID)
            check_subject(subject)
        except (ConfigError, InvalidMessage) as exc:  # filed by hand or by another tool
            raise MessagingError(
                f"dead letter {key} names no subject to replay to "
                f"({DLQ_SUBJECT}: {headers[DLQ_SUBJECT]!r}; {exc})"
            ) from exc
        carried = {k: v for k, v in headers.items() if k not in _OURS}
        amqp = aio_pika.Message(
            body,
            headers=carried,
            message_id=_short(message_id),
            content_type="application/json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        )
        _, exchange = await self._context()
        await self._confirmed(exchange, amqp, subject, f"replay of dead letter {key}")
        tombstone = aio_pika.Message(
            b"", headers={TOMBSTONE: key}, delivery_mode=aio_pika.DeliveryMode.PERSISTENT
        )
        await self._to_queue(self.dead_letter_queue, tombstone, f"tombstone of {key}")

    async def _read_dead_letters(self) -> list[Raw]:
        """The live letters of the stream, oldest first, read without writing."""
        if self._exchange is None:
            await self._connect(read_only=True)
        assert self._connection is not None
        try:
            async with asyncio.timeout(self._timeout):
                letters = await read_letters(self._connection, self.dead_letter_queue)
        except TimeoutError as exc:
            raise BrokerUnavailable(
                f"reading {self.dead_letter_queue} took over {self._timeout} s"
            ) from exc
        return letters or []


class _Consumer:
    """The receive-handle-settle loop of one subscription."""

    def __init__(
        self,
        broker: RabbitBroker,
        queue: AbstractQueue,
        subject: str,
        group: str,
        handler: Handler,
        max_deliver: int,
        retry_delay: float,
    ) -> None:
        self.broker, self.queue, self.subject, self.group = broker, queue, subject, group
        self.handler, self.max_deliver, self.retry_delay = handler, max_deliver, retry_delay

    async def run(self, subscription: RabbitSubscription) -> None:
        with contextlib.suppress(aio_pika.exceptions.ChannelInvalidStateError):
            await self._consume(subscription)

    async def _consume(self, subscription: RabbitSubscription) -> None:
        async with self.queue.iterator() as messages:
            async for msg in messages:
                if subscription._stopping:
                    # Not started: hold it until ``stop`` closes the channel, which
                    # hands it back with the prefetched ones.
                    await asyncio.Event().wait()
                subscription._idle.clear()
                try:
                    await self._handle(msg, subscription.stats)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # settling failed (a retry or dead letter not
                    if subscription._stopping:  # confirmed; the broker closed meanwhile)
                        log.warning(  # its channel, closed or closing, gives it back
                            "consumer %s on %s: stopped before its message was settled "
                            "(%s): it is redelivered",
                            self.group,
                            self.subject,
                            type(exc).__name__,
                        )
                    else:
                        log.exception(
                            "consumer %s on %s: message left for redelivery",
                            self.group,
                            self.subject,
                        )
                        await self._give_back(msg)
                finally:
                    subscription._idle.set()
                if subscription._stopping:  # by its own handler (any other stop() waits
                    await subscription._close_channel()  # for this, then cancels us)
                    return

    async def _handle(self, msg: AbstractIncomingMessage, stats: SubscriptionStats) -> None:
        stats.delivered += 1
        headers = msg.headers or {}
        attempt = 1 + _int(headers.get(RETRIES))  # failures the handler raised
        try:
            subject = _text(headers.get(SUBJECT), SUBJECT) or msg.routing_key or self.subject
        except InvalidMessage as exc:
            subject = msg.routing_key or self.subject
            await self._give_up(msg, stats, subject, f"InvalidMessage: {exc}", attempt)
            return
        returned = _int(headers.get("x-delivery-count"))  # handed back without an outcome
        if returned >= self.broker.crash_limit:
            reason = f"delivered {returned} times without an outcome (consumer crash loop)"
            await self._give_up(msg, stats, subject, reason, attempt)
            return
        try:
            message = decode(msg.body, _user_headers(msg), fallback_id=msg.message_id or "")
            await self.handler(Delivery(message, subject, self.group, attempt))
        except (InvalidMessage, PoisonMessage) as exc:
            await self._give_up(msg, stats, subject, f"{type(exc).__name__}: {exc}", attempt)
            return
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            name = type(exc).__name__
            stats.errors[name] = stats.errors.get(name, 0) + 1
            if attempt >= self.max_deliver:
                await self._give_up(msg, stats, subject, f"{name}: {exc}", attempt)
                return
            delay = min(self.retry_delay * 2 ** (attempt - 1), _MAX_DELAY)
            await self.broker._retry(msg, self.queue.name, subject, attempt, delay)
            await msg.ack()
            stats.retried += 1
            return
        await msg.ack()
        stats.acked += 1

    async def _give_back(self, msg: AbstractIncomingMessage) -> None:
        """Requeue a message whose outcome could not be recorded, after a pause (a
        broker that keeps refusing would otherwise spin it). If the channel is gone,
        the broker has given it back already."""
        await asyncio.sleep(min(self.retry_delay, _MAX_DELAY))
        with contextlib.suppress(Exception):
            await msg.nack(requeue=True)

    async def _give_up(
        self,
        msg: AbstractIncomingMessage,
        stats: SubscriptionStats,
        subject: str,
        reason: str,
        attempt: int,
    ) -> None:
        await self.broker._dead_letter(msg, subject, self.group, reason, attempt)
        await msg.ack()
        stats.dead_lettered += 1
        log.warning("dead-lettered a message on %s for %s: %s", subject, self.group, reason)


def _routable(subject: str) -> str:
    """``subject`` if it is well formed and fits an AMQP routing key, else
    ``ConfigError`` (a longer one made pamqp raise a bare ``ValueError`` mid-batch,
    after the messages before it were sent)."""
    check_subject(subject)
    size = len(subject.encode())
    if size > _SHORT_STRING:
        raise ConfigError(
            f"subject {subject[:60]!r}... is {size} bytes: a RabbitMQ routing key "
            f"holds at most {_SHORT_STRING}"
        )
    return subject


class _Unroutable(PublishError):
    """A mandatory publish that the broker returned: no queue took it."""


def _amqp_message(message: Message, extra: Mapping[str, str] | None) -> aio_pika.Message:
    body, headers = encode(message, extra)
    return aio_pika.Message(
        body,
        headers=dict(headers),
        message_id=_short(message.id),
        correlation_id=_short(message.flow),
        type=_short(message.type),
        content_type="application/json",
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
    )


def _short(value: str) -> str | None:
    """``value`` as an AMQP property (a short string: at most 255 bytes), or None if it
    is longer (or empty): the headers carry it whole, and ``decode`` reads them."""
    return value if 0 < len(value.encode()) <= _SHORT_STRING else None


def _carried(msg: AbstractIncomingMessage) -> dict[str, Any]:
    """The headers a message keeps when re-published (not the broker's own)."""
    return {k: v for k, v in (msg.headers or {}).items() if not _broker_header(k)}


def _broker_header(key: str) -> bool:
    return key in _BROKER_HEADERS or key.startswith(("x-first-death", "x-last-death"))


def _user_headers(msg: AbstractIncomingMessage) -> dict[str, str]:
    """The headers ``decode`` should see, as text: no broker or seamwork bookkeeping.

    Raises:
        InvalidMessage: a header is neither text nor UTF-8 bytes.
    """
    return {
        k: _text(v, k)
        for k, v in (msg.headers or {}).items()
        if k not in _OURS and not _broker_header(k)
    }


def _text(value: object, name: str) -> str:
    """A header value as text: a string as it is, bytes (an AMQP byte array, or a
    string that is not UTF-8) decoded as UTF-8; a missing header is empty.

    Raises:
        InvalidMessage: any other value (a number, a table...), or bytes that are not
            UTF-8 - not turned into text that only looks like one (``"b'...'"``).
    """
    if value is None or isinstance(value, str):
        return value or ""
    if isinstance(value, bytes | bytearray):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidMessage(f"header {name!r} is not UTF-8: {bytes(value)[:40]!r}") from None
    raise InvalidMessage(f"header {name!r} must be text, got {type(value).__name__}: {value!r}")


def _copy(msg: AbstractIncomingMessage, headers: dict[str, Any]) -> aio_pika.Message:
    return aio_pika.Message(
        msg.body,
        headers=headers,
        message_id=msg.message_id,
        correlation_id=msg.correlation_id,
        type=msg.type,
        content_type=msg.content_type,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
    )


def _letter(offset: int, body: bytes, headers: Mapping[str, Any]) -> DeadLetter:
    own: dict[str, str] = {}
    for k, v in headers.items():
        if (k in DLQ_HEADERS or k not in _OURS) and not _broker_header(k):
            with contextlib.suppress(InvalidMessage):  # listed without what is not text
                own[k] = _text(v, k)
    return read_dead_letter(str(offset), body, own)


def _int(value: object) -> int:
    try:
        return int(str(value)) if value is not None else 0
    except ValueError:
        return 0


async def _shut(
    subscriptions: list[RabbitSubscription],
    connection: AbstractRobustConnection | None,
    caller: asyncio.Task[Any] | None,
) -> None:
    """Stop ``subscriptions`` and close ``connection`` for ``caller``: a consumer
    among them (its handler closing the broker) is only told to stop - it ends by
    itself once that handler returns; waiting for it would wait for ourselves."""
    for subscription in subscriptions:  # none takes another message from now on
        subscription._stopping = True
    others = [s for s in subscriptions if s._task is None or s._task is not caller]
    try:  # the handlers in hand finish (or are cancelled) together, within one grace
        stopped = await asyncio.gather(*(s.stop() for s in others), return_exceptions=True)
    finally:  # even if cancelled: gather ends every stop, hence every consumer, first
        if connection is not None:
            await _close(connection)
    for outcome in stopped:
        if isinstance(outcome, Exception):  # the others and the connection still closed
            log.error("stopping a RabbitMQ subscription failed", exc_info=outcome)


async def _close(connection: AbstractRobustConnection) -> None:
    """Close ``connection``, whatever state it is in (a failed close leaves nothing)."""
    with contextlib.suppress(Exception):
        await connection.close()


def _reason(exc: BaseException) -> str:
    if isinstance(exc, aio_pika.exceptions.ChannelInvalidStateError):
        return "the channel is closed (connection lost; reconnecting)"
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


def _redact(url: str) -> str:
    """``url`` without its password."""
    scheme, sep, rest = url.partition("://")
    credentials, at, host = rest.rpartition("@")
    if not sep or not at:
        return url
    user = credentials.split(":", 1)[0]
    return f"{scheme}://{user}@{host}"


__all__ = ["RabbitBroker", "RabbitSubscription", "binding_key", "queue_name"]
