"""``seamwork nats``: run an embedded nats-server with JetStream in the foreground.

For local development and the demo: the server prints its URL and boot time, serves
until Ctrl-C or SIGTERM, then stops cleanly (a temporary store is removed; a
``--store-dir`` is kept for the next run).
"""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from seamwork.cli._sagas import CliError, fail
from seamwork.errors import ConfigError, MessagingError


def serve_nats(
    store_dir: Annotated[
        Path | None,
        typer.Option(
            "--store-dir",
            help="Keep JetStream data here across runs (default: a temporary directory).",
            show_default=False,
        ),
    ] = None,
    port: Annotated[
        int | None,
        typer.Option("--port", min=1, max=65535, help="Listen on this port (default: a free one)."),
    ] = None,
) -> None:
    """Run a local nats-server with JetStream until Ctrl-C or SIGTERM."""
    try:
        asyncio.run(_serve(store_dir, port))
    except CliError as exc:
        raise fail(exc) from None


async def _serve(store_dir: Path | None, port: int | None) -> None:
    try:
        from seamwork.brokers import EmbeddedNats
    except ImportError as exc:
        raise CliError(str(exc), code=2) from exc
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    console = Console(highlight=False, soft_wrap=True)
    try:
        server = EmbeddedNats(store_dir=store_dir, port=port)
        async with server:
            boot = (server.boot_seconds or 0.0) * 1000
            store = f" (store: {store_dir})" if store_dir is not None else ""
            console.print(
                f"nats-server ready at {server.url} in {boot:.0f} ms{store}", markup=False
            )
            console.print("Ctrl-C or SIGTERM stops it.")
            while server.running and not stop.is_set():
                try:
                    async with asyncio.timeout(0.5):
                        await stop.wait()
                except TimeoutError:
                    continue
            died = not server.running
    except (MessagingError, ConfigError) as exc:
        raise CliError(str(exc)) from exc
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
    if died:
        raise CliError("nats-server exited on its own")
    console.print("nats-server stopped")


__all__ = ["serve_nats"]
