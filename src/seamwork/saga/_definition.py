"""Saga definitions: ``Saga``, ``Step``, ``Parallel`` and the ``StepContext`` steps receive.

Definitions are validated when they are built, so a malformed saga fails at import
time of the module that defines it, never halfway through a run.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from seamwork._core.retry import Retry
from seamwork.errors import SagaDefinitionError

StepResult = Mapping[str, Any] | None
StepAction = Callable[["StepContext"], Awaitable[StepResult]]
Compensation = Callable[["StepContext"], Awaitable[object]]
Condition = Callable[[Mapping[str, Any]], bool]


class StepContext(NamedTuple):
    """What a step (or its compensation) is given.

    Attributes:
        saga_id: the saga's id.
        saga_name: the saga definition's name.
        step: this step's name.
        attempt: 1 for the first attempt of this run, then 2, 3, ... on retries.
        idempotency_key: ``"<saga_id>:<step>"`` for the action, the same on every
            attempt and after recovery; ``"<saga_id>:<step>:compensate"`` for the
            compensation. Pass it to the service so a repeated call applies nothing.
        data: the saga context so far (read-only): the start data merged with every
            completed step's result.
        compensating: True when this is the step's compensation.
    """

    saga_id: str
    saga_name: str
    step: str
    attempt: int
    idempotency_key: str
    data: Mapping[str, Any]
    compensating: bool = False


MAX_NAME_BYTES = 200
"""The longest saga or step name, in bytes of UTF-8 (an idempotency key is
``<saga_id>:<step>[:compensate]``, and a ledger holds keys of up to 1,024 bytes)."""
MAX_SAGA_ID_BYTES = 512
"""The longest saga id, in bytes of UTF-8 (see ``MAX_NAME_BYTES``)."""


def check_name(
    what: str,
    value: object,
    error: type[Exception],
    limit: int = MAX_NAME_BYTES,
    *,
    blank: bool = False,
) -> None:
    """Raise ``error`` unless ``value`` is a non-empty string (non-blank unless
    ``blank``) both stores and every ledger can hold: no NUL, valid Unicode, at most
    ``limit`` bytes of UTF-8."""
    if not isinstance(value, str) or not (value if blank else value.strip()):
        raise error(f"{what} must be a non-empty string, got {value!r}")
    if "\x00" in value:
        raise error(f"{what} must not contain NUL (\\u0000), got {value!r}")
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError as exc:
        raise error(f"{what} must be valid Unicode ({exc.reason}), got {value!r}") from None
    if size > limit:
        raise error(f"{what} must be at most {limit} bytes of UTF-8, got {size}: {value[:40]!r}...")


def _check_callable(owner: str, what: str, fn: object) -> None:
    if not callable(fn):
        raise SagaDefinitionError(f"{owner}: {what} must be callable, got {type(fn).__name__}")
    dunder_call = type(fn).__dict__.get("__call__")
    if not (inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(dunder_call)):
        raise SagaDefinitionError(
            f"{owner}: {what} must be an async function (async def), "
            f"got {getattr(fn, '__qualname__', type(fn).__name__)}"
        )


def _check_timeout(owner: str, what: str, value: float | None) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise SagaDefinitionError(f"{owner}: {what} must be a number of seconds > 0, got {value!r}")


@dataclass(frozen=True, slots=True)
class Step:
    """One step of a saga: an action and the compensation that undoes it.

    Args:
        name: unique within the saga; part of the idempotency key.
        action: ``async def action(ctx) -> Mapping | None``; a returned mapping is
            merged into the saga context. Raise ``StepFailed`` for a definite failure.
        compensate: ``async def compensate(ctx)``; must tolerate "nothing to undo"
            (it also runs for steps whose outcome is uncertain).
        timeout: seconds the action may take; a timeout is an uncertain failure.
        compensate_timeout: seconds the compensation may take (default: ``timeout``).
        retry: how uncertain failures of the action are retried (default: no retry).
        when: ``when(data) -> bool``; the step is skipped when it returns False.
    """

    name: str
    action: StepAction
    compensate: Compensation | None = None
    timeout: float | None = None
    compensate_timeout: float | None = None
    retry: Retry | None = None
    when: Condition | None = field(default=None)

    def __post_init__(self) -> None:
        check_name("a step name", self.name, SagaDefinitionError)
        owner = f"step {self.name!r}"
        _check_callable(owner, "action", self.action)
        if self.compensate is not None:
            _check_callable(owner, "compensate", self.compensate)
        _check_timeout(owner, "timeout", self.timeout)
        _check_timeout(owner, "compensate_timeout", self.compensate_timeout)
        if self.retry is not None and not isinstance(self.retry, Retry):
            raise SagaDefinitionError(f"{owner}: retry must be a Retry, got {self.retry!r}")
        if self.when is not None and not callable(self.when):
            raise SagaDefinitionError(f"{owner}: when must be callable, got {self.when!r}")

    @property
    def effective_compensate_timeout(self) -> float | None:
        return self.compensate_timeout if self.compensate_timeout is not None else self.timeout


class Parallel:
    """Steps that run concurrently as one stage of the saga.

    The stage completes when every step in it has; if one fails, the others are let
    finish and everything applied is compensated in reverse order of completion.
    """

    __slots__ = ("steps",)

    def __init__(self, *steps: Step) -> None:
        if len(steps) < 2:
            raise SagaDefinitionError("Parallel needs at least two steps")
        for step in steps:
            if not isinstance(step, Step):
                raise SagaDefinitionError(f"Parallel takes Step objects, got {step!r}")
        self.steps: tuple[Step, ...] = steps

    def __repr__(self) -> str:
        return f"Parallel({', '.join(s.name for s in self.steps)})"


class Saga:
    """A saga definition: a name, a version and its stages in order.

    Args:
        name: the saga's name (``orch.start(name, ...)``).
        version: bump it when the steps change; a saga always finishes on the
            version it started with, so keep old versions registered until their
            sagas are done.
        steps: ``Step`` and ``Parallel`` stages, run in order.
        deadline: seconds from start after which a still-running saga is cancelled
            and compensated.
        max_compensation_attempts: attempts per compensation before the saga is
            marked ``stuck`` and the alert fires.
        compensation_backoff: base delay in seconds between compensation attempts
            (exponential with full jitter, capped at 60 s).
    """

    __slots__ = (
        "compensation_retry",
        "deadline",
        "name",
        "stages",
        "steps_by_name",
        "version",
    )

    def __init__(
        self,
        name: str,
        *,
        version: int = 1,
        steps: Sequence[Step | Parallel],
        deadline: float | None = None,
        max_compensation_attempts: int = 3,
        compensation_backoff: float = 0.5,
    ) -> None:
        check_name("a saga name", name, SagaDefinitionError)
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise SagaDefinitionError(
                f"saga {name!r}: version must be an int >= 1, got {version!r}"
            )
        if not steps:
            raise SagaDefinitionError(f"saga {name!r} has no steps")
        _check_timeout(f"saga {name!r}", "deadline", deadline)
        attempts = max_compensation_attempts
        if isinstance(attempts, bool) or not isinstance(attempts, int) or attempts < 1:
            raise SagaDefinitionError(
                f"saga {name!r}: max_compensation_attempts must be an int >= 1, got {attempts!r}"
            )
        backoff = compensation_backoff
        if (
            isinstance(backoff, bool)
            or not isinstance(backoff, int | float)
            or not 0 <= backoff < math.inf  # NaN fails too
        ):
            raise SagaDefinitionError(
                f"saga {name!r}: compensation_backoff must be a finite number of seconds >= 0, "
                f"got {backoff!r}"
            )
        self.name = name
        self.version = version
        self.deadline = deadline
        self.stages: tuple[tuple[Step, ...], ...] = tuple(_stage(name, s) for s in steps)
        self.steps_by_name: dict[str, Step] = {}
        for stage in self.stages:
            for step in stage:
                if step.name in self.steps_by_name:
                    raise SagaDefinitionError(f"saga {name!r}: duplicate step name {step.name!r}")
                self.steps_by_name[step.name] = step
        self.compensation_retry = Retry(
            max_attempts=max_compensation_attempts,
            backoff=compensation_backoff,
            max_backoff=max(60.0, compensation_backoff),
        )

    @property
    def key(self) -> tuple[str, int]:
        return (self.name, self.version)

    @property
    def max_compensation_attempts(self) -> int:
        return self.compensation_retry.max_attempts

    def __repr__(self) -> str:
        return f"Saga({self.name!r}, version={self.version}, stages={len(self.stages)})"


def _stage(saga: str, item: object) -> tuple[Step, ...]:
    if isinstance(item, Step):
        return (item,)
    if isinstance(item, Parallel):
        return item.steps
    raise SagaDefinitionError(f"saga {saga!r}: steps must be Step or Parallel, got {item!r}")
