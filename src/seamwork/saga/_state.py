"""The persisted shape of a saga: ``SagaState`` and its timeline of ``StepEvent``s."""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from typing import Any, NamedTuple

from seamwork.errors import ConfigError


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


def as_status(value: str) -> SagaStatus:
    """``value`` (a ``SagaStatus`` or its name) as a status; ``ConfigError`` if it is none."""
    try:
        return SagaStatus(value)
    except ValueError:
        names = ", ".join(s.value for s in SagaStatus)
        raise ConfigError(f"status must be one of {names}; got {value!r}") from None


class SagaContext(dict[str, Any]):
    """The saga context as steps see it (``ctx.data``) and states hold it: a plain
    ``dict`` for reading (``json.dumps``, ``{**data}``, ``data.copy()`` work as usual)
    whose in-place changes raise ``TypeError``. A step adds to the context only by
    returning a mapping, which is persisted; a change made in place would live in this
    process alone and be gone after recovery."""

    __slots__ = ()

    @classmethod
    def of(cls, data: Mapping[str, Any]) -> SagaContext:
        """``data`` as a ``SagaContext`` (itself if it is one already: no copy)."""
        return data if type(data) is cls else cls(data)

    def _read_only(self, *args: object, **kwargs: object) -> Any:
        raise TypeError(
            "the saga context is read-only: return a mapping from the step to add to it"
        )

    __setitem__ = __delitem__ = __ior__ = _read_only
    update = setdefault = pop = popitem = clear = _read_only

    @classmethod
    def merged(cls, base: Mapping[str, Any], result: Mapping[str, Any]) -> SagaContext:
        """A new context: ``base`` with ``result``'s keys set (one copy)."""
        merged = cls(base)
        dict.update(merged, result)
        return merged

    def __reduce__(self) -> Any:
        return (SagaContext, (dict(self),))


TERMINAL = frozenset({SagaStatus.COMPLETED, SagaStatus.FAILED, SagaStatus.STUCK})
_EMPTY: Mapping[str, Any] = {}  # shared default; SagaState's mappings are never mutated


class SagaState(NamedTuple):
    """A saga as stored after a transition. Immutable: transitions return a new one
    (``evolve``; a named tuple, because a copy is made on every transition).

    ``completed_steps`` lists steps in order of completion; ``uncertain_steps`` those
    whose outcome is unknown (timed out or died) and that will be compensated too;
    ``compensated_steps`` those undone, in order. ``current_step_index`` is the next
    stage to run. Times are wall-clock seconds since the epoch. The mappings are
    never changed in place.
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
    context: Mapping[str, Any] = _EMPTY
    started_at: float = 0.0
    updated_at: float = 0.0
    deadline_at: float | None = None
    failure_reason: str | None = None
    step_attempts: Mapping[str, int] = _EMPTY
    compensation_attempts: Mapping[str, int] = _EMPTY
    lease_owner: str | None = None
    lease_expires_at: float | None = None

    def evolve(self, **changes: Any) -> SagaState:
        """A copy with ``changes`` applied."""
        return self._replace(**changes)

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL

    @property
    def to_compensate(self) -> tuple[str, ...]:
        """Steps still to undo, in the order they will be undone (newest first)."""
        done = set(self.compensated_steps)
        applied = self.completed_steps + self.uncertain_steps
        return tuple(s for s in reversed(applied) if s not in done)


class StepEvent(NamedTuple):
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
