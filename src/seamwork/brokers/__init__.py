"""Broker adapters: NATS JetStream (``NatsBroker``, ``EmbeddedNats``) and RabbitMQ
(``RabbitBroker``). Each is imported on first use, so a missing driver only matters
to the code that needs it (``pip install 'seamwork[nats]'`` / ``'seamwork[rabbitmq]'``).
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "EmbeddedNats": "seamwork.brokers.embedded_nats",
    "find_nats_server": "seamwork.brokers.embedded_nats",
    "NatsBroker": "seamwork.brokers.nats",
    "RabbitBroker": "seamwork.brokers.rabbitmq",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'seamwork.brokers' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
