"""The public surface is pinned: a change to it is a deliberate change to this file."""

from __future__ import annotations

import seamwork.brokers
import seamwork.errors
import seamwork.events
import seamwork.messaging
import seamwork.saga
import seamwork.storage
import seamwork.testing


def test_saga_exports() -> None:
    assert seamwork.saga.__all__ == [
        "ClaimResult",
        "CorruptSagaError",
        "IdempotencyLedger",
        "InvalidSagaOperation",
        "LeaseLost",
        "Parallel",
        "Retry",
        "Saga",
        "SagaDefinitionError",
        "SagaError",
        "SagaMachine",
        "SagaNotFound",
        "SagaOrchestrator",
        "SagaRun",
        "SagaState",
        "SagaStatus",
        "SagaStore",
        "Step",
        "StepContext",
        "StepEvent",
        "StepFailed",
        "StepFailure",
        "StepTimeout",
        "Transition",
        "UnknownSagaError",
        "abort_stuck",
        "retry_stuck",
    ]


def test_storage_and_testing_exports() -> None:
    assert seamwork.storage.__all__ == [
        "PostgresEventStore",
        "PostgresLedger",
        "PostgresReadModel",
        "PostgresStore",
        "SQLiteEventStore",
        "SQLiteLedger",
        "SQLiteReadModel",
        "SQLiteStore",
    ]
    assert "ManualClock" in seamwork.testing.__all__


def test_events_messaging_and_brokers_exports() -> None:
    assert seamwork.events.__all__ == [
        "ANY",
        "MAX_KEY_BYTES",
        "NO_STREAM",
        "STREAM_EXISTS",
        "Aggregate",
        "AppendResult",
        "BatchResult",
        "Decision",
        "EventStore",
        "EventStoreError",
        "ExpectedVersion",
        "Loaded",
        "NewEvent",
        "ParkedEvent",
        "Projection",
        "ProjectionRunner",
        "ReadModelStore",
        "RecordedEvent",
        "Snapshots",
        "StreamInfo",
        "StreamNotFound",
        "UpcastError",
        "Upcasters",
        "WrongExpectedVersion",
        "handles",
    ]
    assert seamwork.messaging.__all__ == [
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
    assert seamwork.brokers.__all__ == [
        "EmbeddedNats",
        "NatsBroker",
        "RabbitBroker",
        "find_nats_server",
    ]


def test_every_export_exists_and_lists_are_sorted() -> None:
    for module in (
        seamwork.brokers,
        seamwork.errors,
        seamwork.events,
        seamwork.messaging,
        seamwork.saga,
        seamwork.storage,
        seamwork.testing,
    ):
        assert module.__all__ == sorted(module.__all__, key=_export_order)
        for name in module.__all__:
            assert hasattr(module, name), f"{module.__name__}.{name}"


def _export_order(name: str) -> tuple[bool, str]:
    return (not name.isupper(), name)  # constants first, then sorted


def test_every_error_derives_from_the_root() -> None:
    for name in seamwork.errors.__all__:
        assert issubclass(getattr(seamwork.errors, name), seamwork.errors.SeamworkError)
    assert issubclass(seamwork.errors.StepTimeout, TimeoutError)
    assert issubclass(seamwork.errors.ConfigError, ValueError)


def test_importing_seamwork_imports_no_driver() -> None:
    import subprocess
    import sys

    drivers = "('sqlite3', 'psycopg', 'nats', 'aio_pika', 'typer', 'rich')"
    cores = "seamwork.saga, seamwork.events, seamwork.messaging, seamwork.resilience"
    code = f"import {cores}, sys; print([m for m in {drivers} if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
