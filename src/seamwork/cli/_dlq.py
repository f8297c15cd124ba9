"""``seamwork dlq list|replay --nats URL | --rabbitmq URL``: operate dead letters.

Both commands talk to the broker through the same ``Broker`` port the services use,
so what they show is what ``broker.dead_letters()`` returns, and a replay is
``broker.replay_dead_letter(key)``: the letter is published to its subject again
and removed from the dead-letter store. ``replay --all`` calls the broker's
``replay_dead_letters(keys)`` where it has one (RabbitMQ: one read of the stream for
all of them, not one a letter).
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Annotated, Any, TypeVar
from urllib.parse import urlsplit

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from seamwork.cli._render import escaped, print_json_page, short_time, shown
from seamwork.cli._sagas import CliError, fail
from seamwork.errors import ConfigError, MessagingError
from seamwork.messaging import Broker, DeadLetter

T = TypeVar("T")

dlq = typer.Typer(
    help="List dead letters and publish them again once the cause is fixed.",
    no_args_is_help=True,
)

NatsUrl = Annotated[
    str | None,
    typer.Option(
        "--nats",
        envvar="SEAMWORK_NATS_URL",
        help="A NATS JetStream server, nats://host:port (env: SEAMWORK_NATS_URL).",
        show_default=False,
    ),
]
RabbitUrl = Annotated[
    str | None,
    typer.Option(
        "--rabbitmq",
        envvar="SEAMWORK_RABBITMQ_URL",
        help="A RabbitMQ server, amqp://user:pass@host:port/ (env: SEAMWORK_RABBITMQ_URL).",
        show_default=False,
    ),
]
Exchange = Annotated[
    str,
    typer.Option("--exchange", help="RabbitMQ only: the exchange the services publish to."),
]
Timeout = Annotated[
    float, typer.Option("--timeout", min=0.1, help="Seconds before giving up on the broker.")
]


DEFAULT_PORTS: Mapping[str, int] = {
    "nats": 4222,
    "tls": 4222,
    "ws": 80,
    "wss": 443,
    "amqp": 5672,
    "amqps": 5671,
}
"""The port each client library connects to when the URL names none, by scheme."""


def _endpoint(url: str, default_port: int) -> tuple[str, int]:
    try:
        parts = urlsplit(url)
        port = parts.port or DEFAULT_PORTS.get(parts.scheme.lower(), default_port)
        return parts.hostname or "127.0.0.1", port
    except ValueError as exc:
        raise CliError(f"not a broker URL: {url!r} ({exc})", code=2) from exc


async def _reachable(url: str, default_port: int, seconds: float) -> None:
    """Fail fast with one line when nothing listens (a NATS client retries forever),
    probing the port the client will use: an ``amqps://`` URL without one is 5671."""
    host, port = _endpoint(url, default_port)
    try:
        async with asyncio.timeout(seconds):
            _, writer = await asyncio.open_connection(host, port)
    except (OSError, TimeoutError) as exc:
        raise CliError(f"cannot reach the broker at {host}:{port}: {exc or 'timed out'}") from exc
    writer.close()


def _choose(
    nats: str | None, rabbitmq: str | None, exchange: str, seconds: float
) -> tuple[Broker, str, int]:
    if (nats is None) == (rabbitmq is None):
        raise CliError("give exactly one of --nats URL or --rabbitmq URL", code=2)
    try:
        if nats is not None:
            from seamwork.brokers import NatsBroker

            return NatsBroker(nats, name="seamwork-cli"), nats, 4222
        assert rabbitmq is not None
        from seamwork.brokers import RabbitBroker

        # its connect finishes even when cancelled, up to connect_timeout: no longer
        broker = RabbitBroker(rabbitmq, exchange=exchange, connect_timeout=seconds)
        return broker, rabbitmq, 5672
    except ImportError as exc:
        raise CliError(str(exc), code=2) from exc
    except ConfigError as exc:
        raise CliError(str(exc), code=2) from exc


def run_on_broker(
    nats: str | None,
    rabbitmq: str | None,
    exchange: str,
    seconds: float,
    work: Callable[[Broker], Awaitable[T]],
    *,
    connect: bool = True,
) -> T:
    """Connect to the chosen broker, run ``work``, close; errors as ``CliError``.

    ``connect=False`` leaves connecting to ``work``: ``dead_letters`` alone connects
    read-only on RabbitMQ (declares nothing; a missing exchange is an error).
    """
    broker, url, default_port = _choose(nats, rabbitmq, exchange, seconds)
    for noisy in ("nats", "aiormq", "aio_pika"):
        logging.getLogger(noisy).setLevel(logging.CRITICAL)

    async def go() -> T:
        await _reachable(url, default_port, seconds)
        try:
            async with asyncio.timeout(seconds):
                if connect:
                    await broker.connect()
                return await work(broker)
        finally:
            await broker.aclose()

    try:
        return asyncio.run(go())
    except CliError:
        raise
    except TimeoutError as exc:
        raise CliError(f"the broker did not answer within {seconds} s") from exc
    except MessagingError as exc:
        raise CliError(str(exc)) from exc
    except Exception as exc:  # a driver error the adapter did not translate
        raise CliError(f"{type(exc).__name__}: {exc}") from exc


def _letter_json(letter: DeadLetter) -> dict[str, Any]:
    message = letter.message
    return {
        "key": letter.key,
        "subject": letter.subject,
        "group": letter.group,
        "type": message.type,
        "id": message.id,
        "correlation_id": message.flow,
        "attempts": letter.attempts,
        "error": letter.error,
        "dead_lettered_at": letter.dead_lettered_at,
        "data": dict(message.data),
    }


def letters_table(letters: Sequence[DeadLetter], now: float, *, more: bool = False) -> Table:
    """One row per dead letter: key, subject, group, type, attempts, error, when
    (the letter's text as plain ``Text``: brackets in an error are not rich markup);
    ``more``: the list was cut short by its limit (the title says so)."""
    title = f"{len(letters)} dead letter(s)"
    if more:
        title += "; more are dead-lettered: raise --limit to see them"
    table = Table(title=title, title_justify="left")
    for column in ("key", "subject", "group", "type"):  # folded, never cut with …
        table.add_column(column, overflow="fold")
    table.add_column("attempts", justify="right", no_wrap=True)
    table.add_column("error", overflow="fold")
    table.add_column("when", no_wrap=True)
    for letter in letters:
        table.add_row(
            shown(letter.key),
            shown(letter.subject),
            shown(letter.group),
            shown(letter.message.type),
            str(letter.attempts),
            shown(letter.error.splitlines()[0] if letter.error else ""),
            short_time(letter.dead_lettered_at, now) if letter.dead_lettered_at else "?",
        )
    return table


@dlq.command("list")
def list_letters(
    nats: NatsUrl = None,
    rabbitmq: RabbitUrl = None,
    exchange: Exchange = "seamwork",
    limit: Annotated[int, typer.Option("--limit", "-l", min=1, help="At most this many.")] = 100,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    timeout: Timeout = 10.0,
) -> None:
    """List dead letters, oldest first (reads only: creates and writes nothing)."""
    asked = limit + 1  # one more: are there others?
    try:
        letters = run_on_broker(
            nats, rabbitmq, exchange, timeout, lambda b: b.dead_letters(limit=asked), connect=False
        )
    except CliError as exc:
        raise fail(exc) from None
    more = len(letters) > limit
    letters = letters[:limit]
    if as_json:
        documents = [_letter_json(x) for x in letters]
        print_json_page(documents, more, limit, "letters are dead-lettered")
        return
    table = letters_table(letters, time.time(), more=more)
    Console(highlight=False, soft_wrap=False).print(table)


@dlq.command("replay")
def replay_letters(
    key: Annotated[
        str | None, typer.Argument(help="The dead letter's key (see `list`).", show_default=False)
    ] = None,
    nats: NatsUrl = None,
    rabbitmq: RabbitUrl = None,
    exchange: Exchange = "seamwork",
    replay_all: Annotated[bool, typer.Option("--all", help="Replay every dead letter.")] = False,
    timeout: Timeout = 30.0,
) -> None:
    """Publish a dead letter (or all of them) to its subject again and remove it."""
    if (key is None) == (not replay_all):
        raise fail(CliError("give either a KEY or --all", code=2))

    async def replay(broker: Broker) -> list[DeadLetter]:
        letters = await broker.dead_letters(limit=sys.maxsize)
        chosen = letters if replay_all else [x for x in letters if x.key == key]
        if not replay_all and not chosen:
            raise CliError(f"no dead letter with key {key!r}")
        many = getattr(broker, "replay_dead_letters", None)  # one read for all (RabbitMQ)
        if many is not None:
            await many([x.key for x in chosen])
            return chosen
        for letter in chosen:
            await broker.replay_dead_letter(letter.key)
        return chosen

    try:  # connects read-only first: a mistyped --exchange is an error, never created
        done = run_on_broker(nats, rabbitmq, exchange, timeout, replay, connect=False)
    except CliError as exc:
        raise fail(exc) from None
    console = Console(highlight=False, soft_wrap=True)
    for letter in done:
        message = letter.message
        console.print(
            Text.assemble(
                "replayed ",
                (escaped(letter.key), "bold"),
                escaped(f": {message.type} {message.id} to {letter.subject}"),
            )
        )
    if replay_all:
        console.print(f"{len(done)} dead letter(s) replayed")


__all__ = ["dlq", "letters_table", "run_on_broker"]
