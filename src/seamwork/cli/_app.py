"""``seamwork``: operate sagas and run the demo."""

from __future__ import annotations

import typer

from seamwork.cli._demo import demo
from seamwork.cli._sagas import sagas
from seamwork.cli._worker import worker

app = typer.Typer(
    help="seamwork: microservices patterns, durable and tested.", no_args_is_help=True
)
app.add_typer(sagas, name="sagas")
app.command("demo")(demo)
app.command("worker")(worker)


@app.callback()
def _root() -> None:
    """seamwork command line."""


def main() -> None:
    """Entry point of the ``seamwork`` script."""
    app()
