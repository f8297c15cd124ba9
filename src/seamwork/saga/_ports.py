"""The ``SagaStore`` port: what the orchestrator needs from durable storage.

Adapters: ``seamwork.storage.SQLiteStore`` (embedded, one orchestrator process per
file) and, for scale-out, a PostgreSQL store with leases. Every adapter passes the
contract suite in ``seamwork.testing.saga_store``.

Ownership. An orchestrator ``attach``es to a store under an owner id. Each saga row
carries ``lease_owner`` / ``lease_expires_at``; every write made by a running saga is
*fenced*: it applies only while the row is still leased to the writer, otherwise it
raises ``LeaseLost`` and changes nothing. Operator writes (retry, abort) are fenced on
the status they expect instead.

The save that ends a saga stores the lease its state carries: none for a completed
or failed saga, and the owner's for a ``stuck`` one, which keeps it until its alert is
out (then ``release``). A stuck row still leased is an alert owed; once that lease
expires, ``claim`` hands the saga over in ``ClaimResult.alerts``.
"""

from __future__ import annotations

import builtins
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from seamwork.errors import CorruptSagaError
from seamwork.saga._state import SagaState, SagaStatus, StepEvent

SagaKey = tuple[str, int]


@dataclass(frozen=True, slots=True)
class ClaimResult:
    """Sagas now leased to the claimer, and rows that could not be decoded (left as is)."""

    claimed: list[SagaState] = field(default_factory=list)
    corrupt: list[CorruptSagaError] = field(default_factory=list)
    alerts: list[SagaState] = field(default_factory=list)
    """Stuck sagas whose alert never went out (their lease expired), now leased to the
    claimer: it sends each alert, then releases the lease."""


@runtime_checkable
class SagaStore(Protocol):
    """Durable saga state. Each method is one transaction; writes are durable on return."""

    async def open(self) -> None:
        """Connect and migrate the schema (safe when several processes start at once)."""
        ...

    async def aclose(self) -> None:
        """Release connections, threads and locks. Idempotent."""
        ...

    async def attach(self, owner: str) -> None:
        """Become an orchestrator of this store under ``owner`` (``"<worker>:<incarnation>"``).

        Leases held by earlier incarnations of the same worker are released (on stuck
        sagas: expired), so a restarted worker resumes its sagas, and sends the alerts
        they still owe, at once instead of waiting out their leases.

        Raises:
            StoreLocked: the store admits one orchestrator and another holds it.
        """
        ...

    async def create(self, state: SagaState, events: Sequence[StepEvent]) -> bool:
        """Insert a new saga; False (and nothing written) if the id already exists."""
        ...

    async def save(
        self,
        state: SagaState,
        events: Sequence[StepEvent],
        *,
        owner: str | None = None,
        expect_status: SagaStatus | None = None,
    ) -> None:
        """Store a transition, fenced on the lease ``owner`` and/or ``expect_status``.

        Raises:
            LeaseLost: the row is not leased to ``owner`` (or not in ``expect_status``).
            SerializationError: the context is not JSON-serializable (nothing written).
        """
        ...

    async def get(self, saga_id: str) -> SagaState | None:
        """One saga, or None. Raises ``CorruptSagaError`` if its row cannot be decoded."""
        ...

    async def list(
        self,
        *,
        status: SagaStatus | None = None,
        name: str | None = None,
        limit: int = 100,
    ) -> builtins.list[SagaState]:
        """Sagas, most recently updated first; corrupt rows are skipped."""
        ...

    async def timeline(self, saga_id: str) -> builtins.list[StepEvent]:
        """A saga's step events in the order they were stored."""
        ...

    async def claim(
        self,
        owner: str,
        runnable: Collection[SagaKey],
        *,
        now: float,
        lease_seconds: float,
        limit: int,
    ) -> ClaimResult:
        """Lease up to ``limit`` sagas to ``owner``: active ones of a ``runnable`` (name,
        version) whose lease is free or expired, and stuck ones of any name and version
        whose alert is owed by an expired lease (in ``alerts``: any worker can send an
        alert, and one whose definition is gone must not owe it for ever)."""
        ...

    async def renew(
        self, owner: str, saga_ids: Collection[str], *, now: float, lease_seconds: float
    ) -> set[str]:
        """Extend ``owner``'s leases; returns the ids it still owns."""
        ...

    async def release(
        self, owner: str, saga_ids: Collection[str], *, status: SagaStatus | None = None
    ) -> None:
        """Give up ``owner``'s leases (on shutdown) so another process may claim them;
        with ``status``, only on sagas still in it (a stuck saga's alert lease, released
        once the alert is out, must not take the lease of a retry made meanwhile)."""
        ...

    async def stranded(self, runnable: Collection[SagaKey]) -> builtins.list[SagaState]:
        """Active sagas whose (name, version) is not in ``runnable``: no process here can
        run them, and someone must be told."""
        ...
