"""How sagas look on a terminal (rich) and in ``--json`` output.

What the store holds (ids, names, failure reasons, event details) goes to rich as
``Text``, never as a markup string: brackets in it (a pydantic error's
``[type=int_parsing]``, a URL path's ``[/api]``) are shown as they are. Control
characters in it (an escape sequence quoted from a peer's answer, a carriage return)
are shown escaped, ``\x1b[2J``, never sent to the terminal to act on it.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

from rich.console import Console, Group, RenderableType
from rich.panel import Panel
from rich.syntax import Syntax
from rich.table import Table
from rich.text import Text

from seamwork.saga import SagaState, SagaStatus, StepEvent

STATUS_STYLE: Mapping[SagaStatus, str] = {
    SagaStatus.RUNNING: "cyan",
    SagaStatus.COMPENSATING: "magenta",
    SagaStatus.COMPLETED: "green",
    SagaStatus.FAILED: "yellow",
    SagaStatus.STUCK: "bold red",
}
EVENT_STYLE: Mapping[str, str] = {
    "saga_started": "dim",
    "started": "blue",
    "completed": "green",
    "skipped": "dim",
    "failed": "red",
    "errored": "yellow",
    "timed_out": "yellow",
    "cancelled": "magenta",
    "compensating": "magenta",
    "compensated": "cyan",
    "compensation_failed": "red",
    "stuck": "bold red",
    "retried": "bold cyan",
    "aborted": "bold red",
    "saga_completed": "bold green",
    "saga_failed": "bold yellow",
}


CONTROLS = {
    code: repr(chr(code))[1:-1]
    for code in (*range(0x20), *range(0x7F, 0xA0))
    if chr(code) not in "\t\n"
}
"""C0 and C1 control characters (but tab and newline) and DEL, by their escapes."""


def escaped(value: str) -> str:
    """``value`` with its control characters written as escapes (``\x1b``, ``\r``)."""
    return value.translate(CONTROLS)


def shown(value: str, style: str = "") -> Text:
    """Stored text for the terminal: plain (no markup), control characters escaped."""
    return Text(escaped(value), style=style)


def error_line(message: object) -> Text:
    """``error: <message>``, the message as plain text: an id, a path or a reason that
    holds brackets (``order[/42]``, ``[type=int_parsing]``) is printed as it is, never
    read as rich markup (which would drop it, or fail with a ``MarkupError``). A message
    of several lines (libpq puts its hint on a line of its own) is joined into one."""
    lines = [line.strip() for line in str(message).splitlines()]
    return Text.assemble(("error:", "bold red"), " ", escaped(" ".join(x for x in lines if x)))


def status_text(status: SagaStatus) -> Text:
    return Text(status.value, style=STATUS_STYLE.get(status, ""))


def _local(at: float) -> time.struct_time | None:
    """``at`` as local time, or None for a time no calendar holds (a row written by
    hand can hold 1e300 or infinity: shown as its number, never a traceback)."""
    try:
        return time.localtime(at)
    except (OverflowError, OSError, ValueError):
        return None


def clock_time(at: float) -> str:
    local = _local(at)
    return f"{at!r} (not a time)" if local is None else time.strftime("%Y-%m-%d %H:%M:%S", local)


def short_time(at: float, now: float) -> str:
    """``HH:MM:SS`` for today, the date too for older times."""
    local = _local(at)
    if local is None:
        return f"{at!r} (not a time)"
    today = time.localtime(now)[:3] == local[:3]
    return time.strftime("%H:%M:%S" if today else "%Y-%m-%d %H:%M", local)


def sagas_table(states: Sequence[SagaState], now: float, *, more: bool = False) -> Table:
    """One row per saga: id, name and version, status, step index, updated, failure;
    ``more``: the list was cut short by its limit (the title says so)."""
    title = f"{len(states)} saga{'' if len(states) == 1 else 's'} (most recently updated first)"
    if more:
        title += "; more match: raise --limit to see them"
    table = Table(title=title, title_justify="left")
    table.add_column("id", style="bold", overflow="fold")
    table.add_column("saga", overflow="fold")
    table.add_column("status", no_wrap=True)
    table.add_column("step", justify="right", no_wrap=True)
    table.add_column("updated", no_wrap=True)
    table.add_column("failure", overflow="fold", min_width=12, ratio=1)
    for s in states:
        table.add_row(
            shown(s.saga_id),
            shown(f"{s.saga_name} v{s.saga_version}"),
            status_text(s.status),
            str(s.current_step_index),
            short_time(s.updated_at, now),
            shown(s.failure_reason or ""),
        )
    return table


def saga_view(state: SagaState, timeline: Sequence[StepEvent]) -> RenderableType:
    """The saga's header, its timeline and its state."""
    return Group(_header(state), timeline_table(state, timeline), _state_table(state))


def _header(state: SagaState) -> Panel:
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column(overflow="fold")
    grid.add_row("id", shown(state.saga_id))
    grid.add_row("saga", shown(f"{state.saga_name} v{state.saga_version}"))
    grid.add_row("status", status_text(state.status))
    grid.add_row("started", clock_time(state.started_at))
    duration = state.updated_at - state.started_at
    grid.add_row("updated", f"{clock_time(state.updated_at)} ({duration:+.3f}s)")
    if state.deadline_at is not None:
        grid.add_row("deadline", clock_time(state.deadline_at))
    if state.failure_reason:
        grid.add_row("failure", shown(state.failure_reason, style="red"))
    if state.lease_owner and state.status.active:
        until = clock_time(state.lease_expires_at or 0)
        grid.add_row("lease", shown(f"{state.lease_owner} until {until}"))
    return Panel(grid, title=shown(state.saga_id, style="bold"), title_align="left")


def timeline_table(state: SagaState, timeline: Sequence[StepEvent]) -> Table:
    """Every stored step event, with its time relative to the saga's start."""
    table = Table(title="timeline", title_justify="left")
    table.add_column("time", justify="right", no_wrap=True)
    table.add_column("event", no_wrap=True)
    table.add_column("step", overflow="fold")
    table.add_column("attempt", justify="right", no_wrap=True)
    table.add_column("detail", overflow="fold", min_width=16, ratio=1)
    for event in timeline:
        style = EVENT_STYLE.get(event.event, "")
        table.add_row(
            f"{event.at - state.started_at:+.3f}s",  # "-": stamped by a clock behind
            shown(event.event, style=style),
            shown(event.step or ""),
            "" if event.attempt is None else str(event.attempt),
            shown(event.detail or ""),
        )
    return table


def _state_table(state: SagaState) -> Table:
    grid = Table(title="state", title_justify="left", show_header=False)
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column(overflow="fold")
    grid.add_row("step index", str(state.current_step_index))
    grid.add_row("completed", _names(state.completed_steps, "green"))
    grid.add_row("uncertain", _names(state.uncertain_steps, "yellow"))
    grid.add_row("compensated", _names(state.compensated_steps, "cyan"))
    if state.skipped_steps:
        grid.add_row("skipped", _names(state.skipped_steps, "dim"))
    if state.status.active or state.status is SagaStatus.STUCK:
        grid.add_row("to compensate", _names(state.to_compensate, "magenta"))
    if state.step_attempts:
        grid.add_row("failed attempts", _counts(state.step_attempts))
    if state.compensation_attempts:
        grid.add_row("failed compensations", _counts(state.compensation_attempts))
    context = json.dumps(state.context, indent=2, sort_keys=True, default=str, ensure_ascii=False)
    grid.add_row(
        "context",
        Syntax(
            escaped(context), "json", theme="ansi_dark", background_color="default", word_wrap=True
        ),
    )
    return grid


def _names(names: Sequence[str], style: str) -> Text:
    if not names:
        return Text("-", style="dim")
    return shown(" → ".join(names), style=style)


def _counts(counts: Mapping[str, int]) -> Text:
    return shown(", ".join(f"{k}: {v}" for k, v in counts.items()))


def print_json_page(documents: list[Any], more: bool, limit: int, what: str) -> None:
    """Print a listing as JSON on stdout; when ``--limit`` cut it short (``more``), say
    so on stderr (the JSON stays a plain list). ``what``: "sagas match", say."""
    sys.stdout.write(json_text(documents) + "\n")
    if more:
        note = f"note: more {what}; --limit {limit} printed only the first {limit}"
        Console(stderr=True, highlight=False).print(note, soft_wrap=True, markup=False)


def json_text(document: Any) -> str:
    """``document`` as strict JSON: a number JSON has no word for (a corrupted row can
    hold infinity or NaN) is written as a string, ``"inf"``, ``"-inf"`` or ``"nan"``,
    never as the ``Infinity`` / ``NaN`` that JSON parsers refuse."""
    return json.dumps(_finite(document), indent=2, allow_nan=False)


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def state_json(state: SagaState) -> dict[str, Any]:
    """A saga as plain JSON-able data."""
    return {
        "saga_id": state.saga_id,
        "saga_name": state.saga_name,
        "saga_version": state.saga_version,
        "status": state.status.value,
        "current_step_index": state.current_step_index,
        "completed_steps": list(state.completed_steps),
        "uncertain_steps": list(state.uncertain_steps),
        "compensated_steps": list(state.compensated_steps),
        "skipped_steps": list(state.skipped_steps),
        "context": dict(state.context),
        "started_at": state.started_at,
        "updated_at": state.updated_at,
        "deadline_at": state.deadline_at,
        "failure_reason": state.failure_reason,
        "step_attempts": dict(state.step_attempts),
        "compensation_attempts": dict(state.compensation_attempts),
        "lease_owner": state.lease_owner,
        "lease_expires_at": state.lease_expires_at,
    }


def event_json(event: StepEvent, started_at: float) -> dict[str, Any]:
    return {
        "at": event.at,
        "offset": event.at - started_at,
        "event": event.event,
        "step": event.step,
        "attempt": event.attempt,
        "detail": event.detail,
    }
