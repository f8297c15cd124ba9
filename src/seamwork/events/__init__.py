"""Event sourcing and CQRS.

``EventStore.sqlite(path)`` / ``EventStore.postgres(dsn)``: append with optimistic
concurrency, read streams and ``$all``, subscribe (catch-up then live), replay into
state with snapshots, upcasting and time travel. ``Aggregate`` is the write model;
``Projection`` + ``ProjectionRunner`` build read models exactly once in effect.
"""

from seamwork.errors import EventStoreError, StreamNotFound, UpcastError, WrongExpectedVersion
from seamwork.events._aggregate import Aggregate, Decision
from seamwork.events._model import (
    ANY,
    MAX_KEY_BYTES,
    NO_STREAM,
    STREAM_EXISTS,
    AppendResult,
    ExpectedVersion,
    NewEvent,
    RecordedEvent,
    StreamInfo,
)
from seamwork.events._projection import (
    BatchResult,
    ParkedEvent,
    Projection,
    ProjectionRunner,
    ReadModelStore,
    handles,
)
from seamwork.events._store import EventStore, Loaded, Snapshots
from seamwork.events._upcast import Upcasters

__all__ = [
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
