"""``seamwork demo``: wires the command line to ``seamwork.demo``."""

from __future__ import annotations

import signal
from pathlib import Path
from types import FrameType
from typing import Annotated

import typer
from rich.console import Console

from seamwork.cli._params import utf8


def demo(
    orders: Annotated[
        int, typer.Option("--orders", min=20, help="How many orders (at least 20).")
    ] = 300,
    directory: Annotated[
        Path,
        typer.Option(
            "--dir", help="Where the SQLite databases and the logs are left (replaced each run)."
        ),
    ] = Path(".seamwork-demo"),
    concurrency: Annotated[
        int, typer.Option("--concurrency", min=1, help="Sagas in flight at once.")
    ] = 32,
    kill_at: Annotated[
        float,
        typer.Option(
            "--kill-at", min=0.05, max=0.95, help="Fraction of orders finished at the SIGKILL."
        ),
    ] = 0.4,
    postgres: Annotated[
        str | None,
        typer.Option(
            "--postgres",
            envvar="SEAMWORK_PG_DSN",
            help=(
                "Run on this PostgreSQL (a libpq DSN): the saga store "
                "and every service in a schema of its own, seamwork_demo_<run id>_<service>, "
                "dropped at the end unless --keep. Without it (or with '') each has a "
                "SQLite file in --dir."
            ),
            show_default=False,
            callback=utf8,
        ),
    ] = None,
    nats: Annotated[
        str | None,
        typer.Option(
            "--nats",
            envvar="SEAMWORK_NATS_URL",
            help=(
                "Run act two on this NATS JetStream server (nats://host:port) instead of "
                "an embedded nats-server (as without it, or with ''): its subjects, stream "
                "and consumer groups are the run's own (seamwork-demo-<run id>), deleted "
                "at the end with its dead letters unless --keep."
            ),
            show_default=False,
            callback=utf8,
        ),
    ] = None,
    keep: Annotated[
        bool,
        typer.Option(
            "--keep",
            help="Leave the run's PostgreSQL schemas and NATS stream on the servers to inspect.",
        ),
    ] = False,
) -> None:
    """Run the order saga demo: declines, timeouts, a stuck warehouse, a SIGKILL, recovery.

    On one machine with no server by default (SQLite files, an embedded nats-server);
    --postgres and --nats run the same on real servers. Exits non-zero if an invariant
    does not hold in the services' own databases, 2 if the demo cannot run (a --dir it
    cannot use, a server that does not answer).
    """
    from seamwork.cli._render import error_line
    from seamwork.demo.run import run_demo
    from seamwork.demo.scenario import DemoConfig, DemoError
    from seamwork.demo.servers import new_run_id

    console = Console(highlight=False)
    config = DemoConfig(
        directory.absolute(),
        orders,
        concurrency,
        kill_at,
        postgres=postgres or None,  # '' (or an empty variable): SQLite files
        nats=nats or None,
        run_id=new_run_id(),
        keep=keep,
    )
    terminated = False

    sigint_ignored = signal.getsignal(signal.SIGINT) is signal.SIG_IGN

    def interrupt(signum: int, frame: FrameType | None) -> None:
        nonlocal terminated
        terminated = True
        if sigint_ignored:  # (`seamwork demo &` in a script): a SIGINT would be dropped
            raise KeyboardInterrupt
        signal.raise_signal(signal.SIGINT)

    # SIGTERM stops the demo as Ctrl-C does: what is running is cancelled, and the
    # orchestrator processes and the nats-server it started are stopped (by default
    # SIGTERM ends the process at once and leaves them running). Passed on as SIGINT,
    # it takes asyncio's graceful path (the main task cancelled); where SIGINT is
    # ignored, asyncio has no such path and the KeyboardInterrupt is raised here
    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        code = run_demo(config, console)
    except DemoError as exc:
        Console(stderr=True, highlight=False).print(error_line(exc), soft_wrap=True)
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        if not terminated:
            raise
        Console(stderr=True, highlight=False).print("stopped by SIGTERM", soft_wrap=True)
        raise typer.Exit(128 + signal.SIGTERM) from None
    finally:
        signal.signal(signal.SIGTERM, previous)
    raise typer.Exit(code)
