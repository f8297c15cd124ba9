"""The ``seamwork`` command."""

from seamwork.cli._app import app, main

__all__ = ["app", "main"]
