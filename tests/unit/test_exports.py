"""The public surface is pinned: a change to it is a deliberate change to this file."""

from __future__ import annotations

import seamwork.errors
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
        "PostgresStore",
        "SQLiteEventStore",
        "SQLiteLedger",
        "SQLiteReadModel",
        "SQLiteStore",
    ]
    assert "ManualClock" in seamwork.testing.__all__


def test_every_export_exists_and_lists_are_sorted() -> None:
    for module in (seamwork.errors, seamwork.saga, seamwork.storage, seamwork.testing):
        assert module.__all__ == sorted(module.__all__)
        for name in module.__all__:
            assert hasattr(module, name), f"{module.__name__}.{name}"


def test_every_error_derives_from_the_root() -> None:
    for name in seamwork.errors.__all__:
        assert issubclass(getattr(seamwork.errors, name), seamwork.errors.SeamworkError)
    assert issubclass(seamwork.errors.StepTimeout, TimeoutError)
    assert issubclass(seamwork.errors.ConfigError, ValueError)


def test_importing_seamwork_imports_no_driver() -> None:
    import subprocess
    import sys

    drivers = "('sqlite3', 'psycopg', 'nats', 'typer', 'rich')"
    code = f"import seamwork.saga, sys; print([m for m in {drivers} if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
