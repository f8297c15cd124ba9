"""``seamwork outbox parked|requeue|discard --db PATH | --postgres DSN``: operate the
messages a service's outbox relay parked because the broker refused them for good.

The commands open the service's own outbox (its SQLite file, which must exist, or
its PostgreSQL database, which must hold the outbox: nothing is created) through
``Outbox``, as the service does: what they show is
``outbox.parked()``, and ``requeue`` / ``discard`` are ``outbox.requeue(ids)`` /
``outbox.discard(ids)`` (an id that is not parked changes nothing and is an error).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from seamwork.cli._params import utf8, utf8_each
from seamwork.cli._render import print_json_page, short_time, shown
from seamwork.cli._sagas import CliError, fail
from seamwork.errors import ConfigError, MessagingError, StoreError
from seamwork.messaging import Outbox, ParkedMessage
from seamwork.messaging._outbox import MAX_LIMIT

T = TypeVar("T")

outbox_app = typer.Typer(
    help="List the messages an outbox relay parked, and requeue or discard them.",
    no_args_is_help=True,
)

Db = Annotated[
    Path | None,
    typer.Option("--db", help="The service's SQLite database.", show_default=False),
]
Postgres = Annotated[
    str | None,
    typer.Option(
        "--postgres", help="The service's PostgreSQL DSN.", show_default=False, callback=utf8
    ),
]
Ids = Annotated[
    list[str],
    typer.Argument(help="Message ids (see `parked`).", show_default=False, callback=utf8_each),
]


def _open(db: Path | None, postgres: str | None) -> Outbox:
    if (db is None) == (postgres is None):
        raise CliError("give exactly one of --db PATH or --postgres DSN", code=2)
    if postgres is not None:
        try:
            return Outbox.postgres(postgres, pool_size=1, create=False)
        except ImportError as exc:
            raise CliError(str(exc), code=2) from exc
    assert db is not None
    if not db.is_file():
        raise CliError(f"no database at {db}", code=2)
    return Outbox.sqlite(db, create=False)


def run_on_outbox(
    db: Path | None, postgres: str | None, work: Callable[[Outbox], Awaitable[T]]
) -> T:
    """Open the outbox, run ``work``, close; errors as ``CliError``."""
    outbox = _open(db, postgres)

    async def go() -> T:
        try:
            await outbox.open()
            return await work(outbox)
        finally:
            await outbox.aclose()

    try:
        return asyncio.run(go())
    except (ConfigError, MessagingError, StoreError) as exc:
        raise CliError(str(exc)) from exc


def _parked_json(parked: ParkedMessage) -> dict[str, Any]:
    """A parked message as JSON; a row no message can be built from has ``data``
    null and its stored columns, as text, under ``raw``."""
    message, raw = parked.message, parked.raw or {}
    item = {
        "id": parked.id,
        "subject": parked.subject,
        "type": message.type if message is not None else raw.get("type"),
        "correlation_id": message.flow if message is not None else raw.get("correlation_id"),
        "error": parked.error,
        "parked_at": parked.parked_at,
        "data": dict(message.data) if message is not None else None,
    }
    if message is None:
        item["raw"] = dict(raw)
    return item


def parked_table(parked: Sequence[ParkedMessage], now: float, *, more: bool = False) -> Table:
    """One row per parked message: id, subject, type, error, when - the stored text
    plain, its control characters escaped, folded (never cut with …) on a narrow
    terminal; ``more``: the list was cut short by its limit (the title says so)."""
    title = f"{len(parked)} parked message(s)"
    if more:
        title += "; more are parked: raise --limit to see them"
    table = Table(title=title, title_justify="left")
    for column in ("id", "subject", "type"):
        table.add_column(column, overflow="fold")
    table.add_column("error", overflow="fold", min_width=12, ratio=1)
    table.add_column("when", no_wrap=True)
    for item in parked:
        table.add_row(
            shown(item.id),
            shown(item.subject),
            shown(_type(item)),
            shown(item.error.splitlines()[0] if item.error else ""),
            short_time(item.parked_at, now),
        )
    return table


def _type(parked: ParkedMessage) -> str:
    if parked.message is not None:
        return parked.message.type
    return (parked.raw or {}).get("type") or "?"


@outbox_app.command("parked")
def list_parked(
    db: Db = None,
    postgres: Postgres = None,
    limit: Annotated[
        int, typer.Option("--limit", "-l", min=1, max=MAX_LIMIT, help="At most this many.")
    ] = 100,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """List parked messages, oldest first."""
    asked = limit + 1 if limit < MAX_LIMIT else limit  # one more: are there others?
    try:
        parked = run_on_outbox(db, postgres, lambda box: box.parked(limit=asked))
    except CliError as exc:
        raise fail(exc) from None
    more = len(parked) > limit
    parked = parked[:limit]
    if as_json:
        print_json_page([_parked_json(x) for x in parked], more, limit, "messages are parked")
        return
    Console(highlight=False, soft_wrap=False).print(parked_table(parked, time.time(), more=more))


@outbox_app.command("requeue")
def requeue_parked(ids: Ids, db: Db = None, postgres: Postgres = None) -> None:
    """Make parked messages pending again, once the cause is fixed (published next)."""
    try:
        count = run_on_outbox(db, postgres, lambda box: box.requeue(ids))
    except CliError as exc:
        raise fail(exc) from None
    Console(highlight=False).print(f"{count} parked message(s) requeued")


@outbox_app.command("discard")
def discard_parked(ids: Ids, db: Db = None, postgres: Postgres = None) -> None:
    """Delete parked messages for good (they are never published)."""
    try:
        count = run_on_outbox(db, postgres, lambda box: box.discard(ids))
    except CliError as exc:
        raise fail(exc) from None
    Console(highlight=False).print(f"{count} parked message(s) discarded")


__all__ = ["outbox_app", "parked_table", "run_on_outbox"]
