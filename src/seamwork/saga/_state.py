"""The persisted shape of a saga: ``SagaState`` and its timeline of ``StepEvent``s."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from enum import StrEnum
from operator import attrgetter
from typing import Any


class SagaStatus(StrEnum):
    """Where a saga is. ``completed``, ``failed`` and ``stuck`` are terminal for the engine;
    an operator moves a ``stuck`` saga on with retry (back to compensating) or abort."""

    RUNNING = "running"
    COMPENSATING = "compensating"
    COMPLETED = "completed"
    FAILED = "failed"
    STUCK = "stuck"

    @property
    def active(self) -> bool:
        """The engine still has work to do on a saga in this status."""
        return self in (SagaStatus.RUNNING, SagaStatus.COMPENSATING)


TERMINAL = frozenset({SagaStatus.COMPLETED, SagaStatus.FAILED, SagaStatus.STUCK})


@dataclass(frozen=True, slots=True)
class SagaState:
    """A saga as stored after a transition. Immutable: transitions return a new one.

    ``completed_steps`` lists steps in order of completion; ``uncertain_steps`` those
    whose outcome is unknown (timed out or died) and that will be compensated too;
    ``compensated_steps`` those undone, in order. ``current_step_index`` is the next
    stage to run. Times are wall-clock seconds since the epoch.
    """

    saga_id: str
    saga_name: str
    saga_version: int
    status: SagaStatus
    current_step_index: int = 0
    completed_steps: tuple[str, ...] = ()
    compensated_steps: tuple[str, ...] = ()
    uncertain_steps: tuple[str, ...] = ()
    skipped_steps: tuple[str, ...] = ()
    context: Mapping[str, Any] = field(default_factory=dict)
    started_at: float = 0.0
    updated_at: float = 0.0
    deadline_at: float | None = None
    failure_reason: str | None = None
    step_attempts: Mapping[str, int] = field(default_factory=dict)
    compensation_attempts: Mapping[str, int] = field(default_factory=dict)
    lease_owner: str | None = None
    lease_expires_at: float | None = None

    def evolve(self, **changes: Any) -> SagaState:
        """A copy with ``changes`` applied: ``dataclasses.replace`` at a third of the cost
        (it runs on every transition)."""
        new = object.__new__(SagaState)
        for name, value in zip(_FIELD_NAMES, _read_fields(self), strict=True):
            _set(new, name, value)
        for name, value in changes.items():
            if name not in _FIELD_SET:
                raise TypeError(f"SagaState has no field {name!r}")
            _set(new, name, value)
        return new

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL

    @property
    def to_compensate(self) -> tuple[str, ...]:
        """Steps still to undo, in the order they will be undone (newest first)."""
        done = set(self.compensated_steps)
        applied = self.completed_steps + self.uncertain_steps
        return tuple(s for s in reversed(applied) if s not in done)


_FIELD_NAMES = tuple(f.name for f in fields(SagaState))
_FIELD_SET = frozenset(_FIELD_NAMES)
_read_fields = attrgetter(*_FIELD_NAMES)
_set = object.__setattr__


@dataclass(frozen=True, slots=True)
class StepEvent:
    """One line of a saga's timeline (kept for the CLI and the dashboard).

    ``event`` is one of: ``saga_started``, ``started``, ``completed``, ``failed``
    (definite), ``errored`` (uncertain), ``timed_out``, ``skipped``,
    ``compensating``, ``compensated``, ``compensation_failed``, ``saga_completed``,
    ``saga_failed``, ``stuck``, ``cancelled``, ``retried``, ``aborted``.
    """

    saga_id: str
    at: float
    event: str
    step: str | None = None
    attempt: int | None = None
    detail: str | None = None
