"""Asynchronous messaging: transactional outbox, idempotent inbox, dead letters.

``Outbox`` / ``OutboxRelay`` publish a service's messages exactly when its state
changes; ``Inbox`` applies each received message at most once; the ``Broker`` port
has adapters for NATS JetStream and RabbitMQ in ``seamwork.brokers``; ``FlowMonitor``
rebuilds choreographed flows from their messages' correlation and causation ids.
"""

from seamwork.errors import BrokerUnavailable, InvalidMessage, MessagingError, PublishError
from seamwork.messaging._message import Message, decode, encode
from seamwork.messaging._monitor import Flow, FlowMonitor, FlowStep
from seamwork.messaging._outbox import (
    Inbox,
    InboxBatch,
    InboxHandler,
    Outbox,
    OutboxRecord,
    OutboxRelay,
    ParkedMessage,
    Transaction,
)
from seamwork.messaging._ports import (
    Broker,
    DeadLetter,
    Delivery,
    Handler,
    PoisonMessage,
    Subscription,
    SubscriptionStats,
)

__all__ = [
    "Broker",
    "BrokerUnavailable",
    "DeadLetter",
    "Delivery",
    "Flow",
    "FlowMonitor",
    "FlowStep",
    "Handler",
    "Inbox",
    "InboxBatch",
    "InboxHandler",
    "InvalidMessage",
    "Message",
    "MessagingError",
    "Outbox",
    "OutboxRecord",
    "OutboxRelay",
    "ParkedMessage",
    "PoisonMessage",
    "PublishError",
    "Subscription",
    "SubscriptionStats",
    "Transaction",
    "decode",
    "encode",
]
