"""The saga row both saga stores share: its columns, how a state becomes column values
and how a row becomes a state again (or a ``CorruptSagaError`` naming the saga)."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from seamwork._core.codec import dumps
from seamwork.errors import ConfigError, CorruptSagaError
from seamwork.saga._ports import ClaimResult
from seamwork.saga._state import SagaContext, SagaState, SagaStatus, StepEvent, as_status

COLUMNS = (
    "saga_id, saga_name, saga_version, status, current_step_index, completed_steps, "
    "compensated_steps, uncertain_steps, skipped_steps, context, started_at, updated_at, "
    "deadline_at, failure_reason, step_attempts, compensation_attempts, lease_owner, "
    "lease_expires_at"
)
_JSON_COLUMNS = (5, 6, 7, 8, 9, 14, 15)
MAX_LIMIT = 2**63 - 1
"""The largest ``list`` limit: what both databases' 64-bit integers hold."""


def state_values(state: SagaState) -> tuple[Any, ...]:
    """The changing columns, in ``status ... compensation_attempts`` order (JSON as text)."""
    return (
        state.status.value,
        state.current_step_index,
        _list(state.completed_steps),
        _list(state.compensated_steps),
        _list(state.uncertain_steps),
        _list(state.skipped_steps),
        dumps(state.context, what=f"context of saga {state.saga_id!r}"),
        state.updated_at,
        state.failure_reason,
        _map(state.step_attempts),
        _map(state.compensation_attempts),
    )


def insert_values(state: SagaState) -> tuple[Any, ...]:
    """Every column of a new row, in ``COLUMNS`` order."""
    changing = state_values(state)
    return (
        state.saga_id,
        state.saga_name,
        state.saga_version,
        *changing[:7],
        state.started_at,
        state.updated_at,
        state.deadline_at,
        state.failure_reason,
        changing[9],
        changing[10],
        state.lease_owner,
        state.lease_expires_at,
    )


def list_query(
    status: SagaStatus | None, name: str | None, limit: int, mark: str
) -> tuple[str, tuple[Any, ...]]:
    """``SagaStore.list`` as SQL with ``mark`` placeholders, and its parameters.

    Only the filters given, as plain equalities: a prepared (generic) plan keeps the
    (status, updated_at) index, where "$1 IS NULL OR status = $1" loses it.
    """
    if isinstance(limit, bool) or not isinstance(limit, int) or not 0 <= limit <= MAX_LIMIT:
        raise ConfigError(f"limit must be an int from 0 to 2**63 - 1, got {limit!r}")
    where, params = [], []
    if status is not None:
        where.append(f"status = {mark}")
        params.append(as_status(status).value)
    if name is not None:
        where.append(f"saga_name = {mark}")
        params.append(name)
    condition = f" WHERE {' AND '.join(where)}" if where else ""
    sql = f"SELECT {COLUMNS} FROM seamwork_sagas{condition} ORDER BY updated_at DESC LIMIT {mark}"
    return sql, (*params, limit)


def decode(row: Sequence[Any], parse: Callable[[Any], Any] | None = None) -> SagaState:
    """A state from a row in ``COLUMNS`` order; ``parse`` turns stored JSON into values
    (None when the driver already did)."""
    saga_id = str(row[0])
    try:
        if parse is not None:
            row = [parse(v) if i in _JSON_COLUMNS else v for i, v in enumerate(row)]
        return SagaState(
            saga_id=saga_id,
            saga_name=_text(row[1]),
            saga_version=int(row[2]),
            status=SagaStatus(row[3]),
            current_step_index=int(row[4]),
            completed_steps=_names(row[5]),
            compensated_steps=_names(row[6]),
            uncertain_steps=_names(row[7]),
            skipped_steps=_names(row[8]),
            context=_mapping(row[9]),
            started_at=float(row[10]),
            updated_at=float(row[11]),
            deadline_at=None if row[12] is None else float(row[12]),
            failure_reason=row[13],
            step_attempts=_counts(row[14]),
            compensation_attempts=_counts(row[15]),
            lease_owner=row[16],
            lease_expires_at=None if row[17] is None else float(row[17]),
        )
    except (ValueError, TypeError, KeyError) as exc:
        raise CorruptSagaError(saga_id, f"{type(exc).__name__}: {exc}") from exc


def take_claimable(
    found: ClaimResult,
    rows: Sequence[Sequence[Any]],
    limit: int,
    seen: list[str],
    asked: int,
    parse: Callable[[Any], Any] | None = None,
) -> int:
    """Decode a page of claim candidates (``rows``: at most ``asked`` rows, read without
    the ids in ``seen``; the first page asks for ``limit``) into ``found``: at most
    ``limit`` claimed, corrupt ones reported, every id read added to ``seen``. Returns
    the next page's size, 0 when done.

    Corrupt rows are never leased, so they stay the oldest claimable ones: counted
    against the limit, they would fill every claim of a worker with little room. The
    next page reads past every row read so far (the claimed ones too: read again, they
    would be claimed twice), and asks for at least as many rows as were found corrupt,
    so a long run of them costs a few pages, their count doubling, not one page each.
    A row read again all the same (SQLite's json_each cuts an id at NUL) is passed
    over, and a page of nothing new ends the claim: paging on would read the same rows
    for ever."""
    known, before = set(seen), len(seen)
    for row in rows:
        if len(found.claimed) == limit:
            return 0
        saga_id = str(row[0])
        if saga_id in known:
            continue
        known.add(saga_id)
        seen.append(saga_id)
        try:
            found.claimed.append(decode(row, parse))
        except CorruptSagaError as error:
            found.corrupt.append(error)
    if len(found.claimed) == limit or len(rows) < asked or len(seen) == before:
        return 0  # (a short page: nothing more to claim)
    return max(limit - len(found.claimed), len(found.corrupt))


def split_claimed(found: ClaimResult, owner: str, expires: float) -> ClaimResult:
    """What a claim leased to ``owner`` until ``expires``: stuck sagas (an alert owed)
    apart from the ones to run."""
    result = ClaimResult(corrupt=found.corrupt)
    for state in found.claimed:
        leased = state.evolve(lease_owner=owner, lease_expires_at=expires)
        (result.alerts if state.status is SagaStatus.STUCK else result.claimed).append(leased)
    return result


def decode_event(row: Sequence[Any]) -> StepEvent:
    """A timeline event from ``saga_id, at, event, step, attempt, detail``, or a
    ``CorruptSagaError`` naming the saga when a column is not what the engine writes."""
    saga_id, at, event, step, attempt, detail = row
    problem = None
    if isinstance(at, bool) or not isinstance(at, int | float) or not math.isfinite(at):
        problem = f"time {at!r:.80}"
    elif not isinstance(event, str) or not event:
        problem = f"kind {event!r:.80}"
    elif step is not None and not isinstance(step, str):
        problem = f"step {step!r:.80}"
    elif attempt is not None and (isinstance(attempt, bool) or not isinstance(attempt, int)):
        problem = f"attempt {attempt!r:.80}"
    elif detail is not None and not isinstance(detail, str):
        problem = f"detail {detail!r:.80}"
    if problem is not None:
        raise CorruptSagaError(str(saga_id), f"a timeline event has the {problem}")
    return StepEvent(saga_id, float(at), event, step, attempt, detail)


def decode_or_none(
    row: Sequence[Any], parse: Callable[[Any], Any] | None = None
) -> SagaState | None:
    try:
        return decode(row, parse)
    except CorruptSagaError:
        return None


def _list(names: Sequence[str]) -> str:
    return dumps(names) if names else "[]"  # most are empty on the happy path


def _map(counts: Mapping[str, int]) -> str:
    return dumps(counts) if counts else "{}"


def _text(value: object) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"expected a non-empty string, got {value!r}")
    return value


def _names(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"expected a list of step names, got {value!r:.80}")
    return tuple(value)


def _mapping(value: Any) -> SagaContext:
    if not isinstance(value, dict):
        raise ValueError(f"expected a JSON object as context, got {value!r:.80}")
    return SagaContext(value)


def _counts(value: Any) -> dict[str, int]:
    if not isinstance(value, dict) or not all(isinstance(v, int) for v in value.values()):
        raise ValueError(f"expected a map of attempt counts, got {value!r:.80}")
    return value
