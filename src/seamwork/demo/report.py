"""What the demo shows: a progress bar while it runs, a summary and the checks after."""

from __future__ import annotations

import math
from collections import Counter
from types import TracebackType
from typing import Self

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from seamwork.demo.invariants import Check
from seamwork.demo.saga import expectation, saga_id
from seamwork.demo.scenario import DemoRun


class RichReporter:
    """Shows the scenario's progress on a rich console (a ``scenario.Reporter``)."""

    def __init__(self, console: Console, total: int) -> None:
        self.console = console
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
            transient=False,
        )
        self._task = self._progress.add_task("orders", total=total)

    def __enter__(self) -> Self:
        self._progress.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._progress.stop()

    def phase(self, text: str) -> None:
        self.console.print(f"[cyan]·[/] {text}")

    def finished(self, count: int) -> None:
        self._progress.update(self._task, completed=count)

    def alert(self, saga_id: str, reason: str | None) -> None:
        self.console.print(
            Text.assemble(("ALERT", "bold red"), f" saga {saga_id} is stuck: {reason}")
        )


def percentile(values: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) by nearest rank; 0.0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    # the ceil(q * n)-th smallest; round() first, so 0.07 * 100 (7.000000000000001) is 7
    rank = math.ceil(round(q * len(ordered), 9))
    return ordered[max(0, min(len(ordered), rank) - 1)]


def summary_table(demo: DemoRun) -> Table:
    statuses = Counter(s.status.value for s in demo.states.values())
    failed = [expectation(o) for o in demo.orders if _status(demo, o.order_id) == "failed"]
    declined = sum(p.declined for p in failed)
    timed_out = sum(p.ship_times_out for p in failed)
    latencies = [s.updated_at - s.started_at for s in demo.states.values() if s.terminal]
    recovery = demo.recovery
    table = Table(title="seamwork demo: order sagas", show_header=False, title_justify="left")
    table.add_column("what", style="bold")
    table.add_column("value", justify="right")
    table.add_row("orders", str(len(demo.orders)))
    table.add_row("[green]completed", str(statuses["completed"]))
    table.add_row(
        "[yellow]compensated (failed)",
        f"{statuses['failed']}  ({declined} declined, {timed_out} shipment timed out)",
    )
    table.add_row("[red]stuck (alert fired)", f"{statuses['stuck']}  ({len(demo.alerts)} alerts)")
    table.add_row("saga latency p50 / p99", f"{_ms(latencies, 0.5)} / {_ms(latencies, 0.99)}")
    table.add_row("killed (SIGKILL) after", f"{demo.killed_after} finished orders")
    running = len(recovery.in_flight) - recovery.compensating
    table.add_row(
        "in flight at the kill",
        f"{len(recovery.in_flight)}  ({running} running, {recovery.compensating} compensating)",
    )
    table.add_row("recovery: resumed", _seconds(recovery.resume_seconds, "after restart"))
    table.add_row(
        "recovery: all in-flight done", _seconds(recovery.finish_seconds, "after restart")
    )
    rate = len(demo.orders) / demo.seconds if demo.seconds > 0 else 0.0
    table.add_row("throughput", f"{rate:.0f} sagas/s  ({demo.seconds:.2f} s, with the restart)")
    return table


def checks_table(checks: list[Check]) -> Table:
    table = Table(title="invariants (services' own databases)", title_justify="left")
    table.add_column("", width=2)
    table.add_column("invariant")
    table.add_column("detail", overflow="fold")
    for check in checks:
        mark = "[green]✓" if check.ok else "[bold red]✗"
        table.add_row(mark, check.name, check.detail)
    return table


def stuck_ids(demo: DemoRun) -> list[str]:
    return [
        saga_id(o.order_id)
        for o in demo.orders
        if demo.states.get(saga_id(o.order_id)) is not None
        and demo.states[saga_id(o.order_id)].status.value == "stuck"
    ]


def _status(demo: DemoRun, order_id: str) -> str | None:
    """How the order's saga ended (None: no saga), as the saga store says."""
    state = demo.states.get(saga_id(order_id))
    return None if state is None else state.status.value


def _ms(values: list[float], q: float) -> str:
    return f"{percentile(values, q) * 1000:.0f} ms"


def _seconds(value: float | None, suffix: str) -> str:
    return "n/a" if value is None else f"{value * 1000:.0f} ms {suffix}"
