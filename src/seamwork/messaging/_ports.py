"""The ``Broker`` port: publish durably, consume in groups, dead-letter what keeps failing.

Delivery is at-least-once. A handler that returns acknowledges its message; one that
raises has it redelivered after a delay, up to ``max_deliver`` deliveries, after which
the message goes to the dead-letter subject with the error and the delivery count.
``PoisonMessage`` (or an ``InvalidMessage`` that cannot even be decoded) skips the
retries and goes there at once. A dead letter never stalls the consumer.

Adapters: ``seamwork.brokers.NatsBroker`` (JetStream) and ``RabbitBroker``; each
passes ``seamwork.testing.broker.BrokerContract``.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Protocol, TypeVar, runtime_checkable

from seamwork._core.checks import check_seconds
from seamwork.errors import ConfigError, InvalidMessage, MessagingError
from seamwork.messaging._message import TYPE, Message, decode

N = TypeVar("N", int, float)


class PoisonMessage(MessagingError):
    """Raise from a handler to dead-letter the message now, without retries."""


@dataclass(frozen=True, slots=True)
class Delivery:
    """A message as a consumer receives it."""

    message: Message
    subject: str
    group: str
    attempt: int = 1
    """1 on the first delivery, 2 on the first redelivery, ..."""


Handler = Callable[[Delivery], Awaitable[None]]

DLQ_SUBJECT: Final = "Seamwork-DLQ-Subject"
DLQ_GROUP: Final = "Seamwork-DLQ-Group"
DLQ_ERROR: Final = "Seamwork-DLQ-Error"
DLQ_ATTEMPTS: Final = "Seamwork-DLQ-Attempts"
DLQ_AT: Final = "Seamwork-DLQ-At"
DLQ_HEADERS: Final = frozenset({DLQ_SUBJECT, DLQ_GROUP, DLQ_ERROR, DLQ_ATTEMPTS, DLQ_AT})
"""The headers a dead letter carries besides the message's own (every adapter)."""


def check_subscribe_settings(
    group: str, max_deliver: int, ack_wait: float, retry_delay: float
) -> None:
    """Refuse a ``subscribe`` setting no adapter can honour, naming it (every adapter)."""
    if not group or not isinstance(group, str):
        raise ConfigError(f"a consumer group must be a non-empty string, got {group!r}")
    if max_deliver < 1:
        raise ConfigError(f"max_deliver must be >= 1, got {max_deliver}")
    check_seconds("ack_wait", ack_wait)
    check_seconds("retry_delay", retry_delay)


def dead_letter_headers(subject: str, group: str, error: str, attempts: int) -> dict[str, str]:
    """What a broker adds to a message it dead-letters."""
    return {
        DLQ_SUBJECT: subject,
        DLQ_GROUP: group,
        DLQ_ERROR: error[:1000],
        DLQ_ATTEMPTS: str(attempts),
        DLQ_AT: repr(time.time()),
    }


def read_dead_letter(key: str, body: bytes, headers: Mapping[str, Any]) -> DeadLetter:
    """A ``DeadLetter`` from a stored message; a body that is not a valid message is
    kept as ``{"raw": text}`` so nothing is lost."""
    text = {k: v for k, v in headers.items() if isinstance(v, str)}
    own = {k: v for k, v in text.items() if k not in DLQ_HEADERS}
    try:
        message = decode(body, own, fallback_id=f"dlq-{key}")
    except InvalidMessage:
        type_ = text.get(TYPE, "")
        message = Message(type_ if type_.strip() else "?", {"raw": body.decode(errors="replace")})
    return DeadLetter(
        key=key,
        subject=text.get(DLQ_SUBJECT, "?"),
        group=text.get(DLQ_GROUP, "?"),
        message=message,
        error=text.get(DLQ_ERROR, ""),
        attempts=_number(text.get(DLQ_ATTEMPTS), int),
        dead_lettered_at=_number(text.get(DLQ_AT), float),
    )


def _number(value: str | None, kind: Callable[[str], N]) -> N:
    try:
        return kind(value or "0")
    except ValueError:
        return kind("0")


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A message that a consumer group gave up on."""

    key: str
    """Opaque id of this dead letter (for ``replay_dead_letter``)."""
    subject: str
    group: str
    message: Message
    error: str
    attempts: int
    dead_lettered_at: float


@dataclass(slots=True)
class SubscriptionStats:
    delivered: int = 0
    acked: int = 0
    retried: int = 0
    dead_lettered: int = 0
    errors: dict[str, int] = field(default_factory=dict)


@runtime_checkable
class Subscription(Protocol):
    """A running consumer; ``stop()`` starts no other message and lets the one in hand
    finish and settle first, waiting at most the subscription's ``ack_wait``: a
    handler still running then is cancelled and its message redelivered."""

    stats: SubscriptionStats

    async def stop(self) -> None: ...


@runtime_checkable
class Broker(Protocol):
    """Publish and consume messages on a real broker."""

    async def connect(self) -> None:
        """Connect (also done on first use)."""
        ...

    async def aclose(self) -> None:
        """Stop subscriptions and disconnect. Idempotent."""
        ...

    async def publish(
        self, subject: str, message: Message, headers: Mapping[str, str] | None = None
    ) -> None:
        """Publish one message; returns once the broker has stored it.

        Raises:
            InvalidMessage: the message cannot be sent (e.g. headers too large).
            PublishError: the broker did not confirm it.
        """
        ...

    async def publish_batch(self, items: Sequence[tuple[str, Message]]) -> None:
        """Publish several messages in order; returns once all are stored. A broker
        that drops duplicate ids makes a repeated batch harmless.

        Raises:
            InvalidMessage, ConfigError: a message the broker would refuse on every
                try (too large, a subject it cannot route), before any is sent; the
                outbox relay parks it and sends the others.
            PublishError, BrokerUnavailable: anything that may pass (the relay
                tries the batch again).
        """
        ...

    async def subscribe(
        self,
        subject: str,
        group: str,
        handler: Handler,
        *,
        max_deliver: int = 5,
        ack_wait: float = 30.0,
        retry_delay: float = 0.5,
    ) -> Subscription:
        """Consume ``subject`` as consumer group ``group`` (one durable consumer shared
        by every member; each message goes to one of them)."""
        ...

    async def dead_letters(self, *, limit: int = 100) -> list[DeadLetter]:
        """The dead letters kept by this broker, oldest first."""
        ...

    async def replay_dead_letter(self, key: str) -> None:
        """Publish a dead letter to its subject again and remove it from the DLQ."""
        ...
