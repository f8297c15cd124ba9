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

from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from seamwork.errors import MessagingError
from seamwork.messaging._message import Message


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
    """A running consumer; ``stop()`` lets the message in hand finish first."""

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
        that drops duplicate ids makes a repeated batch harmless."""
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
