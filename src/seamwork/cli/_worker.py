"""``seamwork worker``: a saga worker process - claims, runs and recovers sagas.

Run any number of them on one PostgreSQL database; each saga is leased to one worker
at a time, and a worker that dies has its sagas taken over when their leases expire
(or at once, by the same ``--worker-id`` restarted).
"""

from __future__ import annotations

import asyncio
import importlib
import itertools
import os
import signal
import sys
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console

from seamwork._core import runtime
from seamwork.cli._params import utf8
from seamwork.cli._render import error_line
from seamwork.errors import ConfigError, SeamworkError
from seamwork.saga import Saga, SagaOrchestrator, SagaStore

T = TypeVar("T")

MAX_SAGAS = 10_000
"""The most definitions ``--app`` may hold: past that, it is taken for an endless iterator."""


def load_sagas(spec: str) -> list[Saga]:
    """``module:attribute`` naming a list of ``Saga`` (or a callable returning one).

    The module is looked up in the current directory too, as by ``python -m``: the
    installed ``seamwork`` script does not put it on ``sys.path`` by itself.
    """
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise _bad_app(f"expected module:attribute, got {spec!r}")
    _importable_here()
    module = _user_code(
        spec, f"importing {module_name}", lambda: importlib.import_module(module_name)
    )
    target: Any = _user_code(spec, f"reading {spec}", lambda: getattr(module, attribute))
    if callable(target) and not isinstance(target, Saga):
        target = _user_code(spec, f"running {spec}()", target)
    return [target] if isinstance(target, Saga) else _definitions(target, spec)


def _user_code(spec: str, doing: str, call: Callable[[], T]) -> T:
    """``call()`` runs the user's code: whatever it raises is the ``--app`` error, even
    ``sys.exit()`` (which would otherwise end the CLI silently, with the user's exit
    code); a Ctrl-C still interrupts."""
    try:
        return call()
    except (ImportError, AttributeError) as exc:
        raise _bad_app(f"cannot load {spec}: {exc}") from exc
    except Exception as exc:  # the module, factory or iterator itself failed: say how
        raise _bad_app(f"cannot load {spec}: {type(exc).__name__}: {exc}") from exc
    except SystemExit as exc:
        called = "sys.exit()" if exc.code is None else f"sys.exit({exc.code!r})"
        raise _bad_app(f"cannot load {spec}: {doing} called {called}") from exc


def _bad_app(message: str) -> typer.BadParameter:
    return typer.BadParameter(message, param_hint="--app")


def _importable_here() -> None:
    """Put the current directory first on ``sys.path`` unless it is there already
    (``""`` under ``python -m`` and ``python -c``)."""
    here = os.getcwd()
    if "" not in sys.path and here not in sys.path:
        sys.path.insert(0, here)


def _definitions(target: Any, spec: str) -> list[Saga]:
    """The ``Saga`` items of ``target``, reading at most one past ``MAX_SAGAS``: an
    endless iterator is refused, not read until memory runs out."""
    if isinstance(target, (str, bytes, Mapping)) or not isinstance(target, Iterable):
        raise _not_sagas(spec, f"it is of type {type(target).__name__}")
    found = _user_code(
        spec, f"iterating {spec}", lambda: list(itertools.islice(target, MAX_SAGAS + 1))
    )
    if len(found) > MAX_SAGAS:
        raise _bad_app(f"{spec} yields more than {MAX_SAGAS:,} items; is it endless?")
    if not found:
        raise _not_sagas(spec, "it is empty")
    for index, item in enumerate(found):
        if not isinstance(item, Saga):
            raise _not_sagas(spec, f"item {index} is of type {type(item).__name__}")
    return found


def _not_sagas(spec: str, found: str) -> typer.BadParameter:
    return _bad_app(f"{spec} is not a list of Saga definitions: {found}")


def worker(
    ctx: typer.Context,
    app: Annotated[str, typer.Option("--app", help="module:attribute with the Saga definitions.")],
    postgres: Annotated[
        str | None,
        typer.Option("--postgres", envvar="SEAMWORK_PG_DSN", help="PostgreSQL DSN.", callback=utf8),
    ] = None,
    sqlite: Annotated[Path | None, typer.Option("--sqlite", help="A SQLite saga store.")] = None,
    worker_id: Annotated[
        str | None,
        typer.Option("--worker-id", help="Stable name; a restart resumes at once.", callback=utf8),
    ] = None,
    lease: Annotated[float, typer.Option(help="Lease seconds.", min=0.1)] = 30.0,
    interval: Annotated[float, typer.Option(help="Seconds between claims.", min=0.01)] = 1.0,
    max_running: Annotated[
        int | None, typer.Option(help="Most sagas this worker runs at once.", min=1)
    ] = None,
) -> None:
    """Run sagas from a store until stopped (SIGTERM / Ctrl-C)."""
    if sqlite is not None and _from_environment(ctx, "postgres"):
        postgres = None  # --sqlite was asked for; SEAMWORK_PG_DSN is only the everyday default
    if (postgres is None) == (sqlite is None):
        raise typer.BadParameter("give exactly one of --postgres or --sqlite")
    sagas = load_sagas(app)
    store: SagaStore
    try:
        if postgres is not None:
            from seamwork.storage import PostgresStore

            store = PostgresStore(postgres)
        else:
            from seamwork.storage import SQLiteStore

            assert sqlite is not None
            store = SQLiteStore(sqlite)
        orchestrator = SagaOrchestrator(
            store,
            sagas,
            owner=worker_id,
            lease_seconds=lease,
            recovery_interval=interval,
            max_running=max_running,
        )
    except ConfigError as exc:  # the options (or the definitions) do not fit together
        Console(stderr=True, highlight=False).print(error_line(exc), soft_wrap=True)
        raise typer.Exit(2) from exc
    try:
        runtime.run(_serve(orchestrator))
    except SeamworkError as exc:
        Console(stderr=True, highlight=False).print(error_line(exc), soft_wrap=True)
        raise typer.Exit(1) from exc


def _from_environment(ctx: typer.Context, option: str) -> bool:
    """``option`` was read from its environment variable, not given on the line."""
    source = ctx.get_parameter_source(option)
    return source is not None and source.name == "ENVIRONMENT"


async def _serve(orchestrator: SagaOrchestrator) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    console = Console(highlight=False)
    async with orchestrator:
        console.print(f"worker {orchestrator.owner} running", soft_wrap=True, markup=False)
        await stop.wait()
        console.print(f"worker stopping; stats {orchestrator.stats}", soft_wrap=True, markup=False)
