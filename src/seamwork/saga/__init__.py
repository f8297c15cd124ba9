"""Durable saga orchestration.

``Saga``/``Step``/``Parallel`` define a saga; ``SagaOrchestrator`` runs it on a
``SagaStore`` (``seamwork.storage.SQLiteStore`` embedded, PostgreSQL at scale),
persisting every transition, compensating in reverse order, recovering after a
crash. ``SagaMachine`` is the pure state machine underneath.
"""

from seamwork._core.retry import Retry
from seamwork.errors import (
    CorruptSagaError,
    InvalidSagaOperation,
    LeaseLost,
    SagaDefinitionError,
    SagaError,
    SagaNotFound,
    StepFailed,
    StepTimeout,
    UnknownSagaError,
)
from seamwork.saga._definition import Parallel, Saga, Step, StepContext
from seamwork.saga._idempotency import IdempotencyLedger
from seamwork.saga._machine import SagaMachine, StepFailure, Transition, retry_stuck
from seamwork.saga._machine import abort as abort_stuck
from seamwork.saga._orchestrator import SagaOrchestrator, SagaRun
from seamwork.saga._ports import ClaimResult, SagaStore
from seamwork.saga._state import SagaState, SagaStatus, StepEvent

__all__ = [
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
