"""``seamwork``: operate sagas and run the demo."""

from __future__ import annotations

import typer

app = typer.Typer(help="seamwork: microservices patterns, durable and tested.")


@app.callback()
def _root() -> None:
    """seamwork command line."""


def main() -> None:
    """Entry point of the ``seamwork`` script."""
    app()
