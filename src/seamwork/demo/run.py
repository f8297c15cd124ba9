"""``run_demo``: what ``seamwork demo`` runs.

It runs the scenario (``scenario``) against four services that each own
a SQLite database (``services``) - or with ``--postgres`` a PostgreSQL schema of the
run's (``servers``) - prints a summary and checks the invariants against the
services' own tables and ledgers (``invariants``); then act two (``choreo_act``), on
an embedded nats-server or with ``--nats`` the user's. What the run made on the
servers is removed at the end unless ``--keep``. It returns the exit status: 0 only
when every invariant holds.
"""

from __future__ import annotations

import asyncio
import shlex

from rich.console import Console
from rich.markup import escape
from rich.text import Text

from seamwork.demo.invariants import Check, check_all, gather_evidence
from seamwork.demo.report import RichReporter, checks_table, stuck_ids, summary_table
from seamwork.demo.scenario import DemoConfig, DemoError, DemoRun, run_scenario
from seamwork.demo.servers import PgRun, ServerError, redacted
from seamwork.errors import SeamworkError


def run_demo(config: DemoConfig, console: Console) -> int:
    """Run the demo, print what happened; 0 when every invariant held, 1 otherwise.

    Raises:
        DemoError: the demo could not run: a server given with ``--postgres`` or
            ``--nats`` cannot be used, a process misbehaved.
    """
    where = "one SQLite database each"
    if config.pg is not None:
        where = f"one PostgreSQL schema each, {config.pg.pattern}"
    console.print(
        f"[bold]seamwork demo[/]: {config.orders} orders through the order saga "
        f"(inventory, payment, shipping, notification: {where})"
    )
    _open_servers(config)
    try:
        checks = _acts(config, console)
    finally:
        _close_servers(config, console)
    failed = [c for c in checks if not c.ok]
    if failed:
        console.print(f"[bold red]{len(failed)} of {len(checks)} invariants FAILED")
        return 1
    console.print(f"[bold green]all {len(checks)} invariants checked and hold")
    return 0


def _acts(config: DemoConfig, console: Console) -> list[Check]:
    with RichReporter(console, config.orders) as reporter:
        demo = asyncio.run(run_scenario(config, reporter))
    checks = asyncio.run(_check(demo))
    console.print(summary_table(demo))
    console.print(checks_table(checks))
    checks += _act_two(config, console)
    _print_where(console, config, demo)
    return checks


def _open_servers(config: DemoConfig) -> None:
    """Make sure the servers answer (NATS first: it leaves nothing behind), then make
    the run's PostgreSQL schemas; a one-line ``DemoError`` if one cannot be used."""
    try:
        if config.nats_run is not None:
            asyncio.run(config.nats_run.check())
        if config.pg is not None:
            config.pg.create()
    except ServerError as exc:
        raise DemoError(str(exc)) from exc
    except ImportError as exc:  # seamwork[postgres] or seamwork[nats] not installed
        raise DemoError(str(exc)) from exc


def _close_servers(config: DemoConfig, console: Console) -> None:
    """Remove what the run made on the servers, unless ``--keep``; a failure to is
    reported, not raised (the run's outcome stands)."""
    if config.keep:
        return
    pg, nats = config.pg, config.nats_run
    try:
        if pg is not None:
            pg.drop()
            console.print(f"PostgreSQL schemas {pg.pattern} dropped (--keep leaves them)")
        if nats is not None:
            asyncio.run(nats.clean())
            console.print(
                f"NATS stream {nats.stream} and the run's dead letters deleted "
                "(--keep leaves them)",
                markup=False,
            )
    except Exception as exc:  # reported, not raised: the run's outcome stands
        Console(stderr=True, highlight=False).print(
            f"warning: could not remove the run's data from the servers: {exc}",
            markup=False,
            soft_wrap=True,
        )
    except KeyboardInterrupt:  # a second Ctrl-C: say what is left, then stop
        left = [f"PostgreSQL schemas {pg.pattern}"] if pg is not None else []
        left += [f"NATS stream {nats.stream}"] if nats is not None else []
        Console(stderr=True, highlight=False).print(
            f"warning: interrupted while removing the run's data; it may have left "
            f"{' and '.join(left)} on the servers",
            markup=False,
            soft_wrap=True,
        )
        raise


def _act_two(config: DemoConfig, console: Console) -> list[Check]:
    """The same saga choreographed: four services reacting to events over NATS."""
    from seamwork.demo.choreo_act import check, prepare, run_choreography, summary

    count = max(20, config.orders // 10)
    server = "an embedded nats-server"
    nats = config.nats_run
    if nats is not None:
        server = f"the NATS server at {nats.shown_url} (subjects {nats.prefix}>)"
    console.print(
        f"\n[bold]act two[/]: {count} orders through the same saga, choreographed - four "
        f"services with their own outbox and inbox, on {escape(server)}"
    )
    directory = config.directory / "choreography"
    try:
        prepare(directory)
        run = asyncio.run(run_choreography(directory, count, pg=config.pg, nats=config.nats_run))
    except (SeamworkError, OSError) as exc:  # no nats-server, no broker, no disk
        raise DemoError(f"act two could not run: {exc}") from exc
    checks = check(run)
    console.print(summary(run))
    console.print(checks_table(checks))
    return checks


async def _check(demo: DemoRun) -> list[Check]:
    config = demo.config
    evidence = await gather_evidence(config.directory, demo.orders, config.pg)
    return check_all(demo, evidence)


def _print_where(console: Console, config: DemoConfig, demo: DemoRun) -> None:
    nats = config.nats_run
    if nats is not None:
        console.print(
            f"\nNATS: act two's stream {nats.stream} (subjects {nats.prefix}>, groups "
            f"{nats.group('*')}) on {nats.shown_url}",
            markup=False,
        )
    if config.pg is not None:
        _print_schemas(console, config, config.pg, demo)
        return
    db = shlex.quote(str(config.sagas_db))
    where = Text.assemble(
        "\nFiles left in ",
        (str(config.directory), "bold"),
        " (sagas.db, one .db per service, logs)",
    )
    console.print(where)  # (Text: brackets in the path are not rich markup)
    _print_commands(console, f"--db {db}", demo)


def _print_schemas(console: Console, config: DemoConfig, pg: PgRun, demo: DemoRun) -> None:
    console.print(
        Text.assemble(
            "\nData of this run in PostgreSQL ",
            (redacted(pg.dsn), "bold"),
            ": schemas ",
            (pg.pattern, "bold"),
            f" ({', '.join(s.removeprefix(pg.schema('')) for s in pg.schemas)}); logs in ",
            (str(config.directory), "bold"),
        )
    )
    if not config.keep:
        return
    _print_commands(console, f"--postgres {shlex.quote(pg.shown_for('sagas'))}", demo)


def _print_commands(console: Console, store: str, demo: DemoRun) -> None:
    console.print("Inspect them:")
    console.print(f"  seamwork sagas list {store}", markup=False)
    stuck = stuck_ids(demo)
    if stuck:
        console.print(f"  seamwork sagas list {store} --status stuck", markup=False)
        console.print(f"  seamwork sagas show {stuck[0]} {store}", markup=False)
        console.print(f"  seamwork sagas abort {stuck[0]} {store}", markup=False)
