"""Sagas on PostgreSQL after a deploy, and ``seamwork sagas ... --postgres``.

Sagas are left in flight by a worker running version 1; the next worker has only
version 2 registered. Each old saga must be reported as stranded (log, hook) and left
untouched, and ``seamwork sagas list --stranded --app ... --postgres DSN`` lists them.
Listing by status on a large table must use the (status, updated_at) index.
"""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

import psycopg
import pytest
from typer.testing import CliRunner

from seamwork.cli import app
from seamwork.saga import Saga, SagaOrchestrator, SagaState, SagaStatus, Step, StepContext
from seamwork.storage import PostgresStore


async def reserve(ctx: StepContext) -> dict[str, bool]:
    return {"reserved": True}


async def charge(ctx: StepContext) -> None:
    await asyncio.sleep(3600)  # parked until its orchestrator stops


def definitions(version: int) -> list[Saga]:
    return [
        Saga("order", version=version, steps=[Step("reserve", reserve), Step("charge", charge)])
    ]


def V1() -> list[Saga]:  # the --app targets of the CLI tests
    return definitions(1)


def V2() -> list[Saga]:
    return definitions(2)


async def park_three(dsn: str) -> None:
    """Three order sagas on version 1, stopped mid-saga (as by a deploy)."""
    async with SagaOrchestrator(PostgresStore(dsn), V1()) as orch:
        for i in range(3):
            await orch.start("order", {}, saga_id=f"old-{i}")
        while len([s for s in await orch.list() if s.current_step_index == 1]) < 3:
            await asyncio.sleep(0.02)


def cli(*args: str) -> list[dict[str, object]]:
    result = CliRunner().invoke(app, ["sagas", *args, "--json"])
    assert result.exit_code == 0, result.output
    rows: list[dict[str, object]] = json.loads(result.output)
    return rows


async def test_sagas_of_an_unregistered_version_are_reported_stranded_and_left_untouched(
    pg_dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    await park_three(pg_dsn)
    reported: list[list[SagaState]] = []
    caplog.set_level(logging.WARNING, logger="seamwork.saga")
    async with SagaOrchestrator(PostgresStore(pg_dsn), V2(), on_stranded=reported.append) as orch:
        await asyncio.sleep(0.3)  # a few recovery rounds: none of them may touch the rows
        states = await orch.list()
    assert [sorted(s.saga_id for s in batch) for batch in reported] == [["old-0", "old-1", "old-2"]]
    for i in range(3):
        assert f"saga old-{i} cannot be resumed: order version 1" in caplog.text
    assert {(s.status, s.saga_version, s.current_step_index) for s in states} == {
        (SagaStatus.RUNNING, 1, 1)
    }
    assert all(s.lease_owner is None for s in states)


async def test_sagas_list_stranded_lists_what_the_app_cannot_run(pg_dsn: str) -> None:
    await park_three(pg_dsn)
    here = __name__
    stranded = await asyncio.to_thread(
        cli, "list", "--stranded", "--app", f"{here}:V2", "--postgres", pg_dsn
    )
    assert sorted(row["saga_id"] for row in stranded) == ["old-0", "old-1", "old-2"]
    runnable = await asyncio.to_thread(
        cli, "list", "--stranded", "--app", f"{here}:V1", "--postgres", pg_dsn
    )
    assert runnable == []
    running = await asyncio.to_thread(cli, "list", "--status", "running", "--postgres", pg_dsn)
    assert len(running) == 3


def test_sagas_show_on_postgres_prints_the_timeline(pg_dsn: str) -> None:
    asyncio.run(park_three(pg_dsn))
    result = CliRunner().invoke(app, ["sagas", "show", "old-1", "--postgres", pg_dsn, "--json"])
    assert result.exit_code == 0, result.output
    document = json.loads(result.output)
    assert document["saga"]["saga_id"] == "old-1"
    assert "completed" in [e["event"] for e in document["timeline"]]


def test_sagas_list_needs_exactly_one_store(pg_dsn: str) -> None:
    result = CliRunner().invoke(app, ["sagas", "list", "--postgres", pg_dsn, "--db", "x.db"])
    assert result.exit_code == 2
    assert "exactly one of --db PATH or --postgres DSN" in result.output


def test_sagas_list_stranded_needs_the_app(pg_dsn: str) -> None:
    result = CliRunner().invoke(app, ["sagas", "list", "--stranded", "--postgres", pg_dsn])
    assert result.exit_code == 2
    assert "--stranded needs --app" in result.output


def test_listing_by_status_on_100k_sagas_reads_an_index_not_the_table(pg_dsn: str) -> None:
    asyncio.run(_open_and_close(pg_dsn))
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(FILL, (100_000,))
        conn.execute("ANALYZE seamwork_sagas")
        for status in ("completed", "stuck", "running"):  # common, rare, rare
            for _ in range(8):  # past psycopg's prepare threshold: the generic plan too
                plan = conn.execute(f"EXPLAIN {LIST_BY_STATUS}", (status, 50)).fetchall()
            text = "\n".join(row[0] for row in plan)
            assert "Index Scan" in text, text
            assert "Seq Scan" not in text, text
            assert "Sort" not in text, text


async def _open_and_close(dsn: str) -> None:
    store = PostgresStore(dsn)
    await store.open()
    await store.aclose()


FILL = (
    "INSERT INTO seamwork_sagas SELECT 'bulk-' || i, 'order', 1, "
    "CASE WHEN i %% 1000 = 0 THEN 'stuck' WHEN i %% 997 = 0 THEN 'running' "
    "WHEN i %% 5 = 0 THEN 'failed' ELSE 'completed' END, 0, "
    "'[]', '[]', '[]', '[]', '{}', i, i, NULL, NULL, '{}', '{}', NULL, NULL "
    "FROM generate_series(1, %s) AS i"
)
LIST_BY_STATUS = (
    "SELECT saga_id FROM seamwork_sagas WHERE status = %s ORDER BY updated_at DESC LIMIT %s"
)


def test_listing_a_database_without_a_saga_store_creates_nothing(pg_dsn: str) -> None:
    import psycopg
    from typer.testing import CliRunner

    from seamwork.cli import app

    result = CliRunner().invoke(app, ["sagas", "list", "--postgres", pg_dsn])
    assert result.exit_code == 1
    assert "no seamwork saga store" in result.output
    with psycopg.connect(pg_dsn) as conn:
        tables = conn.execute(
            "SELECT count(*) FROM information_schema.tables WHERE table_schema = current_schema()"
        ).fetchone()
    assert tables is not None
    assert tables[0] == 0


async def test_a_saga_store_of_a_newer_schema_is_refused_and_left_alone(pg_dsn: str) -> None:
    from seamwork.testing.saga_store import saga_state, started

    store = PostgresStore(pg_dsn)
    await store.open()
    try:
        await store.create(saga_state("s-1", status=SagaStatus.STUCK), started("s-1"))
    finally:
        await store.aclose()
    with psycopg.connect(pg_dsn) as conn:
        conn.execute("UPDATE seamwork_migrations SET version = 99 WHERE component = 'saga'")
    for argv in (["list"], ["show", "s-1"], ["abort", "s-1"], ["retry", "s-1"]):
        result = await asyncio.to_thread(
            CliRunner().invoke, app, ["sagas", *argv, "--postgres", pg_dsn]
        )
        assert result.exit_code == 1, result.output
        assert "the saga schema v99 is from a newer seamwork" in " ".join(result.stderr.split())
    with psycopg.connect(pg_dsn) as conn:
        row = conn.execute("SELECT status, updated_at FROM seamwork_sagas").fetchone()
    assert row == ("stuck", 1000.0)


def test_a_malformed_dsn_is_a_one_line_error() -> None:
    from typer.testing import CliRunner

    from seamwork.cli import app

    result = CliRunner().invoke(app, ["sagas", "list", "--postgres", "garbage=="])
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    assert "cannot connect" in result.output


@pytest.mark.parametrize(
    ("module", "source", "expected"),
    [
        ("bad_syntax", "def broken(:\n", "SyntaxError"),
        ("raises_on_import", "raise RuntimeError('no config here')\n", "no config here"),
        ("bad_factory", "def SAGAS():\n    raise ValueError('factory failed')\n", "factory failed"),
    ],
)
def test_a_worker_whose_app_cannot_be_loaded_says_so_without_a_traceback(
    pg_dsn: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    module: str,
    source: str,
    expected: str,
) -> None:
    (tmp_path / f"{module}.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    result = CliRunner().invoke(app, ["worker", "--postgres", pg_dsn, "--app", f"{module}:SAGAS"])
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    said = _unboxed(result.output)
    assert f"cannot load {module}:SAGAS" in said
    assert expected in said


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        (["--worker-id", "w:1"], "owner must be a non-empty name without ':'"),
        (["--lease", "1", "--interval", "1"], "recovery_interval"),
        (["--app", f"{__name__}:TWICE"], "registered twice"),
    ],
)
def test_a_worker_with_a_bad_option_is_refused_with_a_one_line_error(
    pg_dsn: str, options: list[str], expected: str
) -> None:
    argv = ["worker", "--postgres", pg_dsn, "--app", f"{__name__}:V1", *options]
    result = CliRunner().invoke(app, argv)
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert expected in _unboxed(result.output)
    assert "Traceback" not in result.output


def TWICE() -> list[Saga]:  # the same definition listed twice
    return [*definitions(1), *definitions(1)]


def _unboxed(output: str) -> str:
    """The words of a CLI message, without the box and the line breaks around them."""
    return " ".join(output.replace("\u2502", " ").split())


def test_sagas_show_names_a_timeline_event_whose_time_is_not_a_number(pg_dsn: str) -> None:
    asyncio.run(park_three(pg_dsn))
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("UPDATE seamwork_saga_events SET at = 'NaN' WHERE saga_id = 'old-1'")
    result = CliRunner().invoke(app, ["sagas", "show", "old-1", "--postgres", pg_dsn])
    assert result.exit_code == 1
    assert "saga 'old-1' is corrupt: a timeline event has the time nan" in result.output
    assert "Traceback" not in result.output


async def test_postgres_on_the_command_line_wins_over_seamwork_db_in_the_environment(
    pg_dsn: str, tmp_path: Path
) -> None:
    """An operator with SEAMWORK_DB set for everyday SQLite use asks for a PostgreSQL
    store with --postgres: that is the store meant (it was refused as 'give exactly one
    of --db PATH or --postgres DSN', exit 2). --db and --postgres both on the command
    line are still refused."""
    await park_three(pg_dsn)
    sqlite_db = str(tmp_path / "sagas.db")
    runner = CliRunner()
    listed = await asyncio.to_thread(
        runner.invoke,
        app,
        ["sagas", "list", "--postgres", pg_dsn, "--json"],
        env={"SEAMWORK_DB": sqlite_db},
    )
    assert listed.exit_code == 0, listed.output
    assert sorted(row["saga_id"] for row in json.loads(listed.output)) == [
        "old-0",
        "old-1",
        "old-2",
    ]
    both = await asyncio.to_thread(
        runner.invoke, app, ["sagas", "list", "--db", sqlite_db, "--postgres", pg_dsn]
    )
    assert both.exit_code == 2
    assert "exactly one of --db PATH or --postgres DSN" in both.output


@pytest.fixture
def closed_port() -> int:
    """A port of 127.0.0.1 nothing listens on."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


@pytest.mark.parametrize(
    "argv",
    [
        ["sagas", "list"],
        ["sagas", "show", "order-1"],
        ["worker", "--app", f"{__name__}:V1"],
    ],
)
def test_an_unreachable_postgres_is_one_line_on_stderr(closed_port: int, argv: list[str]) -> None:
    dsn = f"host=127.0.0.1 port={closed_port} user=postgres dbname=postgres connect_timeout=5"
    result = CliRunner().invoke(app, [*argv, "--postgres", dsn], env={"COLUMNS": "200"})
    assert result.exit_code == 1, result.output
    assert result.stdout == ""
    (line,) = result.stderr.splitlines()  # libpq's hint came on a line of its own
    assert line.startswith("error: cannot connect the saga store to PostgreSQL: "), line
    assert f"port {closed_port} failed: Connection refused" in line
    assert "Is the server running" in line
