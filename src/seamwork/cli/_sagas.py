"""``seamwork sagas list|show|retry|abort``: inspect and operate a saga store.

The store is a SQLite file (``--db PATH``) or a PostgreSQL database (``--postgres
DSN``). The commands read it without the orchestrator's lock (readers need none).
``retry`` and ``abort`` are operator writes fenced on the ``stuck`` status, so they
are safe while orchestrators run: a retried saga is released (no lease owner) and a
running orchestrator's recovery loop claims it and compensates again.

``list --stranded --app module:sagas`` lists the running or compensating sagas whose
name and version none of those definitions can run (left behind by a deploy).
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, TypeVar

import typer
from rich.console import Console
from rich.text import Text

from seamwork.cli._params import abort_reason, utf8
from seamwork.cli._render import (
    error_line,
    escaped,
    event_json,
    json_text,
    print_json_page,
    saga_view,
    sagas_table,
    state_json,
)
from seamwork.errors import SagaError, StoreError
from seamwork.saga import SagaState, SagaStatus, SagaStore, StepEvent, abort_stuck, retry_stuck
from seamwork.storage import SQLiteStore
from seamwork.storage._saga_rows import MAX_LIMIT

T = TypeVar("T")

sagas = typer.Typer(
    help="Inspect sagas in a saga store and move stuck ones on.", no_args_is_help=True
)

Db = Annotated[
    Path | None,
    typer.Option(
        "--db",
        envvar="SEAMWORK_DB",
        help="The saga store: a seamwork SQLite file (env: SEAMWORK_DB).",
        show_default=False,
    ),
]
Postgres = Annotated[
    str | None,
    typer.Option(
        "--postgres",
        help="The saga store: a PostgreSQL DSN (instead of --db).",
        show_default=False,
        callback=utf8,
    ),
]
SagaId = Annotated[str, typer.Argument(help="The saga's id.", show_default=False, callback=utf8)]
Json = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


class CliError(Exception):
    """A one-line error for the operator, and the exit code that goes with it."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def _console() -> Console:
    return Console(highlight=False, soft_wrap=False)


def _open_store(db: Path | None, postgres: str | None, readonly: bool) -> SagaStore:
    if db is not None and postgres is not None and _from_environment(db):
        db = None  # --postgres was asked for; SEAMWORK_DB is only the everyday default
    if (db is None) == (postgres is None):
        raise CliError("give exactly one of --db PATH or --postgres DSN", code=2)
    if postgres is not None:
        try:
            from seamwork.storage.postgres import PostgresStore
        except ImportError as exc:
            raise CliError(str(exc), code=2) from exc
        return PostgresStore(postgres, pool_size=1, create=False)
    assert db is not None
    if not db.is_file():
        raise CliError(f"no saga database at {db}", code=2)
    return SQLiteStore(db, create=False, readonly=readonly)


def _from_environment(db: Path) -> bool:
    """``--db`` came from ``SEAMWORK_DB`` (or names the same file)."""
    value = os.environ.get("SEAMWORK_DB")
    return value is not None and Path(value) == db


def run_on_store(
    db: Path | None,
    work: Callable[[SagaStore], Awaitable[T]],
    *,
    readonly: bool = True,
    postgres: str | None = None,
) -> T:
    """Open the existing store - the SQLite file ``db`` (nothing is created; read-only
    unless asked) or the PostgreSQL ``postgres`` DSN - run ``work``, close; errors as
    ``CliError``, never a traceback."""
    store = _open_store(db, postgres, readonly)

    async def go() -> T:
        try:
            await store.open()
            return await work(store)
        finally:
            await store.aclose()

    try:
        return asyncio.run(go())
    except (SagaError, StoreError) as exc:
        raise CliError(str(exc)) from exc


def fail(exc: CliError) -> typer.Exit:
    Console(stderr=True, highlight=False).print(error_line(exc), soft_wrap=True)
    return typer.Exit(exc.code)


async def existing(store: SagaStore, saga_id: str) -> SagaState:
    state = await store.get(saga_id)
    if state is None:
        where = store.path if isinstance(store, SQLiteStore) else "the PostgreSQL store"
        raise CliError(f"no saga with id {saga_id!r} in {where}")
    return state


@sagas.command("list")
def list_sagas(
    db: Db = None,
    postgres: Postgres = None,
    status: Annotated[
        SagaStatus | None,
        typer.Option("--status", "-s", help="Only sagas in this status.", case_sensitive=False),
    ] = None,
    name: Annotated[
        str | None, typer.Option("--name", "-n", help="Only this saga.", callback=utf8)
    ] = None,
    limit: Annotated[
        int, typer.Option("--limit", "-l", min=1, max=MAX_LIMIT, help="At most this many.")
    ] = 50,
    stranded: Annotated[
        bool,
        typer.Option("--stranded", help="Only running sagas none of --app's definitions can run."),
    ] = False,
    app: Annotated[
        str | None,
        typer.Option("--app", help="module:attribute with the Saga definitions (--stranded)."),
    ] = None,
    as_json: Json = False,
) -> None:
    """List sagas, most recently updated first."""
    asked = limit + 1 if limit < MAX_LIMIT else limit  # one more: are there others?
    try:
        if stranded:
            work = _stranded_lister(app, status, name, asked)
        else:
            work = lambda s: s.list(status=status, name=name, limit=asked)  # noqa: E731
        states = run_on_store(db, work, postgres=postgres)
    except CliError as exc:
        raise fail(exc) from None
    more = len(states) > limit
    states = states[:limit]
    if as_json:
        print_json_page([state_json(s) for s in states], more, limit, "sagas match")
        return
    _console().print(sagas_table(states, time.time(), more=more))


def _stranded_lister(
    app: str | None, status: SagaStatus | None, name: str | None, limit: int
) -> Callable[[SagaStore], Awaitable[list[SagaState]]]:
    if app is None:
        raise CliError("--stranded needs --app module:attribute (the definitions to run)", 2)
    from seamwork.cli._worker import load_sagas

    keys = [saga.key for saga in load_sagas(app)]

    async def work(store: SagaStore) -> list[SagaState]:
        found = await store.stranded(keys)
        found.sort(key=lambda s: s.updated_at, reverse=True)
        wanted = [
            s
            for s in found
            if (status is None or s.status is status) and (name is None or s.saga_name == name)
        ]
        return wanted[:limit]

    return work


@sagas.command("show")
def show_saga(
    saga_id: SagaId, db: Db = None, postgres: Postgres = None, as_json: Json = False
) -> None:
    """Show one saga: its step timeline and its state."""

    async def load(store: SagaStore) -> tuple[SagaState, list[StepEvent]]:
        state = await existing(store, saga_id)
        return state, await store.timeline(saga_id)

    try:
        state, events = run_on_store(db, load, postgres=postgres)
    except CliError as exc:
        raise fail(exc) from None
    if as_json:
        document = {
            "saga": state_json(state),
            "timeline": [event_json(e, state.started_at) for e in events],
        }
        sys.stdout.write(json_text(document) + "\n")
        return
    _console().print(saga_view(state, events))


def _stuck(state: SagaState, what: str) -> None:
    if state.status is not SagaStatus.STUCK:
        raise CliError(
            f"saga {state.saga_id!r} is {state.status.value}; only a stuck saga can be {what}"
        )


@sagas.command("retry")
def retry_saga(saga_id: SagaId, db: Db = None, postgres: Postgres = None) -> None:
    """Compensate a stuck saga again, with fresh attempts.

    The saga goes back to ``compensating`` with no lease owner; a running
    orchestrator picks it up in its recovery loop (or the next one to start).
    """

    async def retry(store: SagaStore) -> SagaState:
        state = await existing(store, saga_id)
        _stuck(state, "retried")
        moved = retry_stuck(state, time.time())
        await store.save(moved.state, moved.events, expect_status=SagaStatus.STUCK)
        return moved.state

    try:
        state = run_on_store(db, retry, readonly=False, postgres=postgres)
    except CliError as exc:
        raise fail(exc) from None
    pending = ", ".join(state.to_compensate) or "nothing"
    _console().print(
        Text.assemble(
            "saga ",
            (escaped(saga_id), "bold"),
            " is ",
            ("compensating", "magenta"),
            f" again (to undo: {escaped(pending)}); a running orchestrator picks it up in its"
            " recovery loop",
        )
    )


@sagas.command("abort")
def abort_saga(
    saga_id: SagaId,
    db: Db = None,
    postgres: Postgres = None,
    reason: Annotated[
        str,
        typer.Option(
            "--reason", "-r", help="Recorded in the saga's failure reason.", callback=abort_reason
        ),
    ] = "aborted by operator",
) -> None:
    """Give up on a stuck saga: it is marked failed and left as it is."""

    async def abort(store: SagaStore) -> SagaState:
        state = await existing(store, saga_id)
        _stuck(state, "aborted")
        moved = abort_stuck(state, time.time(), reason)
        await store.save(moved.state, moved.events, expect_status=SagaStatus.STUCK)
        return moved.state

    try:
        state = run_on_store(db, abort, readonly=False, postgres=postgres)
    except CliError as exc:
        raise fail(exc) from None
    left = ", ".join(state.to_compensate) or "nothing"
    _console().print(
        Text.assemble(
            "saga ",
            (escaped(saga_id), "bold"),
            " aborted: now ",
            ("failed", "yellow"),
            f"; left un-compensated: {escaped(left)}",
        )
    )


__all__ = ["CliError", "sagas"]
