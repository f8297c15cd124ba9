"""Every exception seamwork raises, in one tree.

Catch the area base (``SagaError``, ``ResilienceError``, ``StoreError``) or the root
``SeamworkError``; where a standard exception means the same thing, it is mixed in, so
``except TimeoutError`` and ``except ValueError`` keep working. Adapters translate
driver errors at their edge (``raise StoreError(...) from exc``), so no ``sqlite3``
or ``psycopg`` exception escapes a seamwork call.

::

    SeamworkError
    ├── ConfigError (ValueError)                 a setting or definition is invalid
    │   └── SagaDefinitionError (+ SagaError)    a Saga/Step/Parallel is malformed
    ├── SerializationError (TypeError)           data is not JSON-serializable
    ├── StoreError                               a store cannot be used as asked
    │   ├── StoreUnavailable (OSError)           path not writable, server unreachable
    │   ├── StoreLocked                          another process owns the store
    │   └── CorruptRecord                        a stored row cannot be decoded
    │       └── CorruptSagaError (+ SagaError)   ... and it is a saga row
    ├── SagaError
    │   ├── StepFailed                           a step's definite failure (not applied)
    │   ├── StepTimeout (TimeoutError)           a step or compensation ran out of time
    │   ├── UnknownSagaError (LookupError)       no definition with that name/version
    │   ├── SagaNotFound (LookupError)           no saga with that id
    │   ├── InvalidSagaOperation                 e.g. retry of a saga that is not stuck
    │   └── LeaseLost                            another owner took the saga over
    ├── EventStoreError
    │   ├── WrongExpectedVersion                 optimistic concurrency: the stream moved on
    │   ├── StreamNotFound (LookupError)         no such stream (or it was deleted)
    │   └── UpcastError                          an old event has no path to today's shape
    ├── MessagingError
    │   ├── InvalidMessage                       a message cannot be sent or decoded
    │   ├── PublishError                         the broker did not confirm a publish
    │   └── BrokerUnavailable (OSError)          the broker cannot be reached or started
    └── ResilienceError
        ├── CircuitOpenError                     the breaker rejected the call
        ├── BulkheadFullError                    no slot and no room in the queue
        ├── RateLimitedError                     the limiter has no token to give
        ├── RetryBudgetExhausted                 retries would exceed the budget
        └── CallTimeout (TimeoutError)           a guarded call ran out of time
"""

from __future__ import annotations


class SeamworkError(Exception):
    """Root of every exception seamwork raises."""


class ConfigError(SeamworkError, ValueError):
    """A setting or a definition is invalid; the message names the field."""


class SerializationError(SeamworkError, TypeError):
    """Data that must be stored or sent is not JSON-serializable."""


# --- stores -----------------------------------------------------------------------


class StoreError(SeamworkError):
    """A store cannot do what was asked."""


class StoreUnavailable(StoreError, OSError):
    """The store cannot be reached or written (bad path, server down)."""


class StoreLocked(StoreError):
    """Another process owns this store (one orchestrator per SQLite file)."""


class CorruptRecord(StoreError):
    """A stored record cannot be decoded. ``record_id`` names it."""

    def __init__(self, record_id: str, reason: str) -> None:
        super().__init__(f"record {record_id!r} is corrupt: {reason}")
        self.record_id = record_id
        self.reason = reason


# --- sagas ------------------------------------------------------------------------


class SagaError(SeamworkError):
    """Base of saga errors."""


class SagaDefinitionError(SagaError, ConfigError):
    """A Saga, Step or Parallel definition is malformed."""


class CorruptSagaError(CorruptRecord, SagaError):
    """A saga row cannot be decoded; ``saga_id`` names it and the row is left as is."""

    def __init__(self, saga_id: str, reason: str) -> None:
        super().__init__(saga_id, reason)
        self.saga_id = saga_id
        self.args = (f"saga {saga_id!r} is corrupt: {reason}",)


class StepFailed(SagaError):
    """Raised by a step to report a *definite* failure: nothing was applied.

    Raise it only when nothing is applied under the step's idempotency key, by this
    attempt or an earlier one (a service that answers retries from its ledger gets
    this for free); the engine trusts it and does not compensate.

    A step that raises ``StepFailed`` is not retried and not compensated. Any other
    exception, or a timeout, leaves the outcome *uncertain*: the step is retried per
    its policy and compensated if it still fails.
    """

    def __init__(self, reason: str = "step failed") -> None:
        super().__init__(reason)
        self.reason = reason


class StepTimeout(SagaError, TimeoutError):
    """A step or a compensation did not finish within its timeout."""


class UnknownSagaError(SagaError, LookupError):
    """No registered definition has this saga name (and version)."""


class SagaNotFound(SagaError, LookupError):
    """No saga has this id."""


class InvalidSagaOperation(SagaError):
    """The saga's status does not allow the operation (e.g. retry of a running saga)."""


class LeaseLost(SagaError):
    """This process no longer owns the saga; its write was rejected (fencing)."""


# --- events -------------------------------------------------------------------------


class EventStoreError(SeamworkError):
    """Base of event store and projection errors."""


class WrongExpectedVersion(EventStoreError):
    """An append's expected version did not match the stream; nothing was written.

    ``actual`` is the stream's version when the append was tried (-1: no stream).
    """

    def __init__(self, stream: str, expected: int | str, actual: int) -> None:
        super().__init__(
            f"stream {stream!r}: expected version {expected}, but the stream is at {actual}"
        )
        self.stream = stream
        self.expected = expected
        self.actual = actual


class StreamNotFound(EventStoreError, LookupError):
    """The stream does not exist, or it was deleted."""


class UpcastError(EventStoreError):
    """A stored event's (type, schema_version) has no upcaster to the current shape."""


# --- messaging ----------------------------------------------------------------------


class MessagingError(SeamworkError):
    """Base of messaging errors."""


class InvalidMessage(MessagingError):
    """A message cannot be sent or decoded (bad JSON, missing type, headers too large).

    A consumer dead-letters such a message at once instead of retrying it.
    """


class PublishError(MessagingError):
    """The broker did not confirm a publish; it may or may not have stored it."""


class BrokerUnavailable(MessagingError, OSError):
    """The broker cannot be reached, or the embedded server would not start."""


# --- resilience -------------------------------------------------------------------


class ResilienceError(SeamworkError):
    """Base of resilience errors."""


class CircuitOpenError(ResilienceError):
    """The circuit breaker rejected the call without running it."""


class BulkheadFullError(ResilienceError):
    """The bulkhead had no free slot and no room (or time) in its queue."""


class RateLimitedError(ResilienceError):
    """The rate limiter had no token for the call."""


class RetryBudgetExhausted(ResilienceError):
    """A retry was refused because the retry budget is spent."""


class CallTimeout(ResilienceError, TimeoutError):
    """A guarded call did not finish within its timeout."""


__all__ = [
    "BrokerUnavailable",
    "BulkheadFullError",
    "CallTimeout",
    "CircuitOpenError",
    "ConfigError",
    "CorruptRecord",
    "CorruptSagaError",
    "EventStoreError",
    "InvalidMessage",
    "InvalidSagaOperation",
    "LeaseLost",
    "MessagingError",
    "PublishError",
    "RateLimitedError",
    "ResilienceError",
    "RetryBudgetExhausted",
    "SagaDefinitionError",
    "SagaError",
    "SagaNotFound",
    "SeamworkError",
    "SerializationError",
    "StepFailed",
    "StepTimeout",
    "StoreError",
    "StoreLocked",
    "StoreUnavailable",
    "StreamNotFound",
    "UnknownSagaError",
    "UpcastError",
    "WrongExpectedVersion",
]
