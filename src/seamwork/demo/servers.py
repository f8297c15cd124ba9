"""Where a demo run keeps its data and sends its messages on real servers.

``--postgres DSN``: every service of the run owns a schema of its own in that
database, ``seamwork_demo_<run id>_<service>`` (act one: ``sagas``, ``inventory``,
``payment``, ``shipping``, ``notification``; act two: ``choreo_orders``,
``choreo_inventory``, ``choreo_payment``, ``choreo_notification``). A service
connects with ``options=-c search_path=<its schema>``, so its tables, ledger, outbox
and inbox land there and it sees no other service's tables. The run id is fresh for
every run: two runs on one server never meet.

``--nats URL``: act two's subjects start with ``seamwork-demo-<run id>.``, so they
live in one stream of their own (``SEAMWORK-DEMO-<RUN ID>``), and its consumer groups
are ``seamwork-demo-<run id>-<service>``. Dead letters go to the server's shared
``DEADLETTER`` stream under ``deadletter.<group>.<subject>``; the run counts and
removes only those of its own subjects.

Nothing here imports a driver at import time: the orchestrator process starts light.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from nats.aio.client import Client as NatsClient

    from seamwork.messaging import DeadLetter

SCHEMA_PREFIX = "seamwork_demo_"
SUBJECT_PREFIX = "seamwork-demo-"
ACT_ONE = ("sagas", "inventory", "payment", "shipping", "notification")
ACT_TWO = ("choreo_orders", "choreo_inventory", "choreo_payment", "choreo_notification")
DLQ_STREAM = "DEADLETTER"


class ServerError(Exception):
    """A server given on the command line cannot be used (one line, naming it)."""


def new_run_id() -> str:
    return uuid.uuid4().hex[:10]


@dataclass(frozen=True, slots=True)
class PgRun:
    """The PostgreSQL schemas of one demo run.

    Args:
        dsn: the libpq connection string given with ``--postgres``.
        run_id: names this run's schemas.
    """

    dsn: str
    run_id: str

    def schema(self, service: str) -> str:
        return f"{SCHEMA_PREFIX}{self.run_id}_{service}"

    @property
    def schemas(self) -> tuple[str, ...]:
        return tuple(self.schema(s) for s in (*ACT_ONE, *ACT_TWO))

    @property
    def pattern(self) -> str:
        return f"{SCHEMA_PREFIX}{self.run_id}_*"

    def dsn_for(self, service: str) -> str:
        """``dsn`` with the service's schema as its only search path."""
        return with_search_path(self.dsn, self.schema(service))

    def shown_for(self, service: str) -> str:
        """``dsn_for`` without the password, to print."""
        return redacted(self.dsn_for(service))

    def create(self) -> None:
        """Create the run's schemas, all or none; ``ServerError`` naming the server if
        it cannot (a DSN that does not parse, a server that does not answer, no right
        to create a schema)."""
        _parsed(self.dsn)
        self._run([f'CREATE SCHEMA "{name}"' for name in self.schemas], "create")

    def drop(self) -> None:
        """Drop the run's schemas with everything in them."""
        self._run([f'DROP SCHEMA IF EXISTS "{name}" CASCADE' for name in self.schemas], "drop")

    def _run(self, statements: list[str], doing: str) -> None:
        import psycopg

        where = f"PostgreSQL {redacted(self.dsn)!r}"
        try:
            conn = psycopg.connect(self.dsn, connect_timeout=10)
        except psycopg.Error as exc:
            from seamwork.storage._dsn import without_password

            reason = without_password(_first(exc), self.dsn)
            raise ServerError(f"cannot connect to {where}: {reason}") from exc
        try:
            with conn:  # one transaction: every schema, or none
                conn.execute("SET LOCAL lock_timeout = '10s'")  # never wait on a stray lock
                for statement in statements:
                    conn.execute(statement.encode())
        except psycopg.Error as exc:
            raise ServerError(
                f"cannot {doing} the demo's schemas on {where}: {_first(exc)}"
            ) from exc


def with_search_path(dsn: str, schema: str) -> str:
    """``dsn`` (key=value or URI) with ``-c search_path=<schema>`` added to its options."""
    params = _parsed(dsn)
    options = str(params.get("options") or "").strip()
    params["options"] = f"{options} -c search_path={schema}".strip()
    return _joined(params)


def redacted(dsn: str) -> str:
    """``dsn`` without its password (as key=value)."""
    try:
        params = _parsed(dsn)
    except ServerError:
        return "(unparsable DSN)"
    params.pop("password", None)
    return _joined(params)


def _parsed(dsn: str) -> dict[str, Any]:
    from psycopg import ProgrammingError
    from psycopg.conninfo import conninfo_to_dict

    try:
        return dict(conninfo_to_dict(dsn))
    except ProgrammingError as exc:
        from seamwork.storage._dsn import without_password

        reason = without_password(_first(exc), dsn)
        raise ServerError(f"--postgres is not a valid PostgreSQL DSN: {reason}") from exc


def _joined(params: dict[str, Any]) -> str:
    from psycopg.conninfo import make_conninfo

    return make_conninfo("", **params)


def _first(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


@dataclass(frozen=True, slots=True)
class NatsRun:
    """Act two's names on a shared NATS server for one demo run."""

    url: str
    run_id: str

    @property
    def shown_url(self) -> str:
        """``url`` without its credentials, to print."""
        from seamwork.brokers.nats import redacted_url

        return redacted_url(self.url)

    @property
    def token(self) -> str:
        return f"{SUBJECT_PREFIX}{self.run_id}"

    @property
    def prefix(self) -> str:
        """What every subject of the run starts with."""
        return f"{self.token}."

    @property
    def stream(self) -> str:
        """The one stream the run's subjects land in (``stream_for`` of its token)."""
        return self.token.upper()

    def group(self, service: str) -> str:
        return f"{self.token}-{service}"

    @property
    def dead_letter_filter(self) -> str:
        """The subjects of the run's dead letters: ``deadletter.<group>.<subject>``."""
        return f"deadletter.*.{self.prefix}>"

    async def check(self) -> None:
        """Connect once; ``ServerError`` naming the URL if no NATS answers there or it
        has no JetStream."""
        from nats.errors import NoRespondersError
        from nats.js.errors import ServiceUnavailableError

        try:
            nc = await self._connect()
        except Exception as exc:  # nats-py: refused, unknown host, timeout, bad URL
            raise ServerError(
                f"cannot connect to NATS at {self.shown_url!r}: {_first(exc)}"
            ) from exc
        try:
            await nc.jsm().account_info()
        except (NoRespondersError, ServiceUnavailableError) as exc:
            raise ServerError(
                f"NATS at {self.shown_url!r} has no JetStream (start nats-server with -js)"
            ) from exc
        except Exception as exc:
            raise ServerError(f"NATS at {self.shown_url!r} cannot be used: {_first(exc)}") from exc
        finally:
            await nc.close()

    async def dead_letters(self, limit: int = 1000) -> list[DeadLetter]:
        """The run's dead letters, oldest first (not the other letters on the server)."""
        from nats.js.errors import NotFoundError

        from seamwork.brokers.nats import _stored_headers
        from seamwork.messaging._ports import read_dead_letter

        nc = await self._connect()
        letters: list[DeadLetter] = []
        try:
            js, seq = nc.jsm(), 1
            while len(letters) < limit:
                try:
                    raw = await js.get_msg(
                        DLQ_STREAM, seq=seq, subject=self.dead_letter_filter, next=True
                    )
                except NotFoundError:  # no stream, or no letter of the run after seq
                    break
                letters.append(
                    read_dead_letter(str(raw.seq), raw.data or b"", _stored_headers(raw))
                )
                seq = (raw.seq or seq) + 1
        finally:
            await nc.close()
        return letters

    async def clean(self) -> None:
        """Delete the run's stream (its consumers with it) and its dead letters."""
        from nats.js.errors import NotFoundError

        nc = await self._connect()
        try:
            js = nc.jsm()
            with contextlib.suppress(NotFoundError):  # never made (act one failed first)
                await js.delete_stream(self.stream)
            with contextlib.suppress(NotFoundError):  # no letter anywhere on the server
                await js.purge_stream(DLQ_STREAM, subject=self.dead_letter_filter)
        finally:
            await nc.close()

    async def _connect(self) -> NatsClient:
        """A connection to ``url``; the first failed attempt (refused, unknown host, no
        NATS answering within 2 s) is raised, where nats-py would retry it forever."""
        from nats.aio.client import Client

        failed: asyncio.Future[Exception] = asyncio.get_running_loop().create_future()

        async def first_failure(exc: Exception) -> None:
            if isinstance(exc, TimeoutError) and not str(exc):
                exc = TimeoutError("nothing answered as NATS within 2 s")
            if not failed.done():
                failed.set_result(exc)

        nc = Client()
        connecting: asyncio.Future[Any] = asyncio.ensure_future(
            nc.connect(self.url, connect_timeout=2, error_cb=first_failure)
        )
        try:
            either: set[asyncio.Future[Any]] = {connecting, failed}
            done, _ = await asyncio.wait(either, timeout=10, return_when="FIRST_COMPLETED")
            if connecting in done:
                connecting.result()
                return nc
            raise failed.result() if failed.done() else TimeoutError("no answer within 10 s")
        except BaseException:
            connecting.cancel()
            await asyncio.gather(connecting, return_exceptions=True)
            with contextlib.suppress(Exception):  # cut short mid-handshake: its socket
                await nc.close()
            raise
