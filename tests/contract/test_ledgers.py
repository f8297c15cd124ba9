"""The IdempotencyLedger contract on SQLite and PostgreSQL."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest

from seamwork.saga import IdempotencyLedger
from seamwork.testing.ledger import LedgerContract


class TestSQLiteLedger(LedgerContract):
    async def make_ledger(self, tmp_path: Path) -> IdempotencyLedger:
        return IdempotencyLedger.sqlite(tmp_path / "service.db")

    def insert_effect(self, value: Any, *, fail: bool = False) -> Any:
        def effect(conn: sqlite3.Connection) -> dict[str, Any]:
            conn.execute("CREATE TABLE IF NOT EXISTS effects (value TEXT)")
            conn.execute("INSERT INTO effects (value) VALUES (?)", (str(value),))
            if fail:
                raise RuntimeError("declined")
            return {"value": value}

        return effect

    async def count_effects(self, ledger: IdempotencyLedger) -> int:
        rows = await ledger.transaction(
            lambda conn: conn.execute("SELECT count(*) FROM effects").fetchone()
        )
        return int(rows[0])

    async def make_unopenable_ledger(self, tmp_path: Path) -> IdempotencyLedger:
        return IdempotencyLedger.sqlite(tmp_path / "no-such-directory" / "service.db")


@pytest.mark.postgres
class TestPostgresLedger(LedgerContract):
    @pytest.fixture(autouse=True)
    def _dsn(self, pg_dsn: str) -> None:
        self.dsn = pg_dsn

    async def make_ledger(self, tmp_path: Path) -> IdempotencyLedger:
        return IdempotencyLedger.postgres(self.dsn)

    def insert_effect(self, value: Any, *, fail: bool = False) -> Any:
        async def effect(conn: Any) -> dict[str, Any]:
            await conn.execute("CREATE TABLE IF NOT EXISTS effects (value text)")
            await conn.execute("INSERT INTO effects (value) VALUES (%s)", (str(value),))
            if fail:
                raise RuntimeError("declined")
            return {"value": value}

        return effect

    async def count_effects(self, ledger: IdempotencyLedger) -> int:
        async def count(conn: Any) -> int:
            cursor = await conn.execute("SELECT count(*) FROM effects")
            return int((await cursor.fetchone())[0])

        return await ledger.transaction(count)

    async def make_unopenable_ledger(self, tmp_path: Path) -> IdempotencyLedger:
        return IdempotencyLedger.postgres("host=127.0.0.1 port=1 user=postgres connect_timeout=2")

    async def test_a_ledger_made_by_an_earlier_version_keeps_its_results(self, pg_dsn: str) -> None:
        import psycopg

        from seamwork.storage._pg import migrate
        from seamwork.storage.postgres_ledger import LEDGER_MIGRATIONS

        async with await psycopg.AsyncConnection.connect(pg_dsn) as conn:
            await migrate(conn, LEDGER_MIGRATIONS[:1])  # result jsonb, as version 1 made it
            await conn.execute(
                "INSERT INTO seamwork_idempotency VALUES ('saga-1:x', '{\"b\": 1, \"a\": 2}', 0)"
            )
            await conn.commit()
        async with IdempotencyLedger.postgres(pg_dsn) as ledger:
            assert await ledger.once("saga-1:x", lambda conn: None) == {"a": 2, "b": 1}
            assert await ledger.once("saga-2:x", lambda conn: {"big": 1e20}) == {"big": 1e20}
            assert repr(await ledger.result("saga-2:x")) == repr({"big": 1e20})

    async def test_calls_go_past_pooled_connections_the_server_killed_while_idle(
        self, pg_dsn: str
    ) -> None:
        """``result``, ``once`` and ``transaction`` on a pooled connection the server had
        killed while idle (a failover, an idle timeout) failed with StoreUnavailable
        though the server was fine; each now goes past the dead connections (a
        transaction only at its BEGIN, before anything of it ran)."""
        import asyncio
        import uuid

        import psycopg

        application = f"sw-idle-{uuid.uuid4().hex[:8]}"
        ledger = IdempotencyLedger.postgres(f"{pg_dsn} application_name={application}")

        async def kill_idle_connections() -> None:
            await asyncio.gather(*(ledger.result("k") for _ in range(8)))  # the pool filled
            async with await psycopg.AsyncConnection.connect(pg_dsn, autocommit=True) as admin:
                cursor = await admin.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE application_name = %s AND state = 'idle'",
                    (application,),
                )
                assert len(await cursor.fetchall()) >= 1
            await asyncio.sleep(0.1)

        async with ledger:
            await kill_idle_connections()
            assert await ledger.result("k") is None
            await kill_idle_connections()
            assert await ledger.once("k", lambda conn: {"n": 1}) == {"n": 1}
            await kill_idle_connections()
            assert await ledger.transaction(lambda conn: 7) == 7
            await kill_idle_connections()
            assert await ledger.result("k") == {"n": 1}


@pytest.mark.parametrize(
    ("make", "named"),
    [
        (lambda tmp: IdempotencyLedger.sqlite(""), "path"),
        (lambda tmp: IdempotencyLedger.sqlite(tmp / "l.db", synchronous="off"), "synchronous"),
    ],
)
def test_a_bad_sqlite_ledger_setting_is_a_config_error_naming_it(
    tmp_path: Path, make: Any, named: str
) -> None:
    # an empty path failed at open with "WAL mode refused"; a bad synchronous mode was a
    # StoreError, as if the database had failed
    from seamwork.errors import ConfigError

    with pytest.raises(ConfigError, match=named):
        make(tmp_path)


async def test_an_async_effect_on_the_sqlite_ledger_is_refused_and_nothing_recorded(
    tmp_path: Path,
) -> None:
    # it ran on the writer thread as a plain call: the coroutine it made never ran, and
    # the refusal said its result was "not JSON"
    from seamwork.errors import ConfigError

    async def effect(conn: Any) -> int:
        return 1

    async with IdempotencyLedger.sqlite(tmp_path / "l.db") as ledger:
        with pytest.raises(ConfigError, match="plain function"):
            await ledger.once("k", effect)
        with pytest.raises(ConfigError, match="plain function"):
            await ledger.once("k", lambda conn: effect(conn))
        assert await ledger.result("k") is None
