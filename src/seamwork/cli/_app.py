"""``seamwork``: operate sagas, dead letters and parked outbox messages, run a local NATS
and the demo."""

from __future__ import annotations

import typer

from seamwork.cli._demo import demo
from seamwork.cli._dlq import dlq
from seamwork.cli._nats import serve_nats
from seamwork.cli._outbox import outbox_app
from seamwork.cli._sagas import sagas
from seamwork.cli._worker import worker

app = typer.Typer(
    help="seamwork: microservices patterns, durable and tested.", no_args_is_help=True
)
app.add_typer(sagas, name="sagas")
app.add_typer(dlq, name="dlq")
app.add_typer(outbox_app, name="outbox")
app.command("nats")(serve_nats)
app.command("demo")(demo)
app.command("worker")(worker)


@app.callback()
def _root() -> None:
    """seamwork command line."""


def main() -> None:
    """Entry point of the ``seamwork`` script."""
    app()
