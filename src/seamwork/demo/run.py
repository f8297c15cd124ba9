"""``run_demo``: what ``seamwork demo`` runs.

It runs the scenario (``scenario``) against four services that each own
a SQLite database (``services``), prints a summary and checks the invariants
against the services' own tables and ledgers (``invariants``). It returns the exit
status: 0 only when every invariant holds.
"""

from __future__ import annotations

import asyncio
import shlex

from rich.console import Console
from rich.text import Text

from seamwork.demo.invariants import Check, check_all, gather_evidence
from seamwork.demo.report import RichReporter, checks_table, stuck_ids, summary_table
from seamwork.demo.scenario import DemoConfig, DemoError, DemoRun, run_scenario
from seamwork.errors import SeamworkError


def run_demo(config: DemoConfig, console: Console) -> int:
    """Run the demo, print what happened; 0 when every invariant held, 1 otherwise."""
    console.print(
        f"[bold]seamwork demo[/]: {config.orders} orders through the order saga "
        "(inventory, payment, shipping, notification: one SQLite database each)"
    )
    with RichReporter(console, config.orders) as reporter:
        demo = asyncio.run(run_scenario(config, reporter))
    checks = asyncio.run(_check(demo))
    console.print(summary_table(demo))
    console.print(checks_table(checks))
    checks += _act_two(config, console)
    failed = [c for c in checks if not c.ok]
    _print_where(console, config, demo)
    if failed:
        console.print(f"[bold red]{len(failed)} of {len(checks)} invariants FAILED")
        return 1
    console.print(f"[bold green]all {len(checks)} invariants checked and hold")
    return 0


def _act_two(config: DemoConfig, console: Console) -> list[Check]:
    """The same saga choreographed: four services reacting to events over NATS."""
    from seamwork.demo.choreo_act import check, prepare, run_choreography, summary

    count = max(20, config.orders // 10)
    console.print(
        f"\n[bold]act two[/]: {count} orders through the same saga, choreographed - four "
        "services with their own outbox and inbox, on an embedded nats-server"
    )
    try:
        prepare(config.directory / "choreography")
        run = asyncio.run(run_choreography(config.directory / "choreography", count))
    except (SeamworkError, OSError) as exc:  # no nats-server, no broker, no disk
        raise DemoError(f"act two could not run: {exc}") from exc
    checks = check(run)
    console.print(summary(run))
    console.print(checks_table(checks))
    return checks


async def _check(demo: DemoRun) -> list[Check]:
    evidence = await gather_evidence(demo.config.directory, demo.orders)
    return check_all(demo, evidence)


def _print_where(console: Console, config: DemoConfig, demo: DemoRun) -> None:
    db = shlex.quote(str(config.sagas_db))
    where = Text.assemble(
        "\nFiles left in ",
        (str(config.directory), "bold"),
        " (sagas.db, one .db per service, logs)",
    )
    console.print(where)  # (Text: brackets in the path are not rich markup)
    console.print("Inspect them:")
    console.print(f"  seamwork sagas list --db {db}", markup=False)
    stuck = stuck_ids(demo)
    if stuck:
        console.print(f"  seamwork sagas list --db {db} --status stuck", markup=False)
        console.print(f"  seamwork sagas show {stuck[0]} --db {db}", markup=False)
        console.print(f"  seamwork sagas abort {stuck[0]} --db {db}", markup=False)
