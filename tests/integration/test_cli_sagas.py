"""``seamwork sagas list|show|retry|abort`` against a real SQLite saga store.

A stuck saga is made the honest way: a real orchestrator runs a saga whose
compensation keeps failing. ``retry`` then runs from another process (the CLI)
while a second orchestrator - whose compensation now works - holds the store.
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from seamwork.cli import app
from seamwork.saga import Saga, SagaOrchestrator, SagaRun, SagaState, Step, StepContext, StepFailed
from seamwork.storage import SQLiteStore


class Bank:
    """A compensation that fails while ``broken`` is set."""

    def __init__(self) -> None:
        self.broken = True
        self.refunds: list[str] = []

    def saga(self) -> Saga:
        async def debit(ctx: StepContext) -> dict[str, int]:
            return {"debited": 10}

        async def undo_debit(ctx: StepContext) -> None:
            if self.broken:
                raise RuntimeError("ledger unreachable")
            self.refunds.append(ctx.idempotency_key)

        async def credit(ctx: StepContext) -> None:
            raise StepFailed("account closed")

        return Saga(
            "transfer",
            steps=[Step("debit", debit, compensate=undo_debit, timeout=5), Step("credit", credit)],
            max_compensation_attempts=2,
            compensation_backoff=0.0,
        )


async def make_sagas(db: Path, bank: Bank) -> dict[str, SagaState]:
    """One stuck saga (``t-stuck``) and one that completed... as far as it could: failed."""
    async with SagaOrchestrator(SQLiteStore(db), [bank.saga()]) as orch:
        stuck = await (await orch.start("transfer", {"amount": 10}, saga_id="t-stuck")).wait()
    bank.broken = False
    async with SagaOrchestrator(SQLiteStore(db), [bank.saga()]) as orch:
        done = await (await orch.start("transfer", {"amount": 5}, saga_id="t-failed")).wait()
    bank.broken = True
    return {"stuck": stuck, "failed": done}


@pytest.fixture
def db(tmp_path: Path) -> Path:
    path = tmp_path / "sagas.db"
    states = asyncio.run(make_sagas(path, Bank()))
    assert states["stuck"].status.value == "stuck"
    assert states["failed"].status.value == "failed"
    return path


def invoke(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, list(args), env={"COLUMNS": "200"})
    return result.exit_code, result.stdout, result.stderr


def test_list_shows_sagas_with_status_and_failure(db: Path) -> None:
    code, out, _ = invoke("sagas", "list", "--db", str(db))
    assert code == 0
    assert "t-stuck" in out
    assert "t-failed" in out
    assert "transfer v1" in out
    assert "account closed" in out


def test_list_filters_by_status_and_prints_json(db: Path) -> None:
    code, out, _ = invoke("sagas", "list", "--db", str(db), "--status", "stuck", "--json")
    assert code == 0
    rows = json.loads(out)
    assert [r["saga_id"] for r in rows] == ["t-stuck"]
    assert rows[0]["compensation_attempts"] == {"debit": 2}


def test_list_filters_by_name_and_limit(db: Path) -> None:
    code, out, _ = invoke("sagas", "list", "--db", str(db), "--name", "nope", "--json")
    assert code == 0
    assert json.loads(out) == []
    code, out, _ = invoke("sagas", "list", "--db", str(db), "--limit", "1", "--json")
    assert len(json.loads(out)) == 1


def test_show_draws_the_timeline_and_the_state(db: Path) -> None:
    code, out, _ = invoke("sagas", "show", "t-stuck", "--db", str(db))
    assert code == 0
    for text in ("timeline", "completed", "failed", "compensation_failed", "stuck", "+0."):
        assert text in out
    assert "ledger unreachable" in out
    assert "to compensate" in out


def test_show_json_has_the_state_and_the_timeline_in_order(db: Path) -> None:
    code, out, _ = invoke("sagas", "show", "t-stuck", "--db", str(db), "--json")
    assert code == 0
    doc = json.loads(out)
    assert doc["saga"]["status"] == "stuck"
    events = [e["event"] for e in doc["timeline"]]
    assert events[0] == "saga_started"
    assert events[-2:] == ["compensation_failed", "stuck"]
    assert all(e["offset"] >= 0 for e in doc["timeline"])


async def test_retry_from_the_cli_is_finished_by_a_running_orchestrator(db: Path) -> None:
    bank = Bank()
    bank.broken = False
    orch = SagaOrchestrator(SQLiteStore(db), [bank.saga()], recovery_interval=0.05)
    async with orch:
        code, out, err = await run_cli("sagas", "retry", "t-stuck", "--db", str(db))
        assert code == 0, err
        assert "compensating" in out
        async with asyncio.timeout(10):
            state = await SagaRun(orch, "t-stuck").wait()
    assert state.status.value == "failed"
    assert state.compensated_steps == ("debit",)
    assert bank.refunds == ["t-stuck:debit:compensate"]
    timeline = await read_timeline(db, "t-stuck")
    assert [e for e in timeline if e in ("stuck", "retried", "compensated", "saga_failed")] == [
        "stuck",
        "retried",
        "compensated",
        "saga_failed",
    ]


def test_abort_marks_a_stuck_saga_failed_with_the_reason(db: Path) -> None:
    code, out, _ = invoke(
        "sagas", "abort", "t-stuck", "--db", str(db), "--reason", "refunded by hand"
    )
    assert code == 0
    assert "failed" in out
    state = asyncio.run(read_state(db, "t-stuck"))
    assert state.status.value == "failed"
    assert state.failure_reason is not None
    assert "refunded by hand" in state.failure_reason
    assert state.compensated_steps == ()
    assert "aborted" in asyncio.run(read_timeline(db, "t-stuck"))


@pytest.mark.parametrize("command", ["show", "retry", "abort"])
def test_an_unknown_id_is_a_one_line_error(db: Path, command: str) -> None:
    code, out, err = invoke("sagas", command, "no-such-saga", "--db", str(db))
    assert code == 1
    assert err.strip() == f"error: no saga with id 'no-such-saga' in {db}"
    assert "Traceback" not in out + err


@pytest.mark.parametrize("command", ["retry", "abort"])
def test_a_saga_that_is_not_stuck_is_refused_and_left_alone(db: Path, command: str) -> None:
    code, _, err = invoke("sagas", command, "t-failed", "--db", str(db))
    assert code == 1
    assert "saga 't-failed' is failed; only a stuck saga can be" in err
    assert asyncio.run(read_state(db, "t-failed")).status.value == "failed"


@pytest.mark.parametrize("command", [["list"], ["show", "x"], ["retry", "x"], ["abort", "x"]])
def test_a_missing_database_is_exit_2_and_not_created(tmp_path: Path, command: list[str]) -> None:
    missing = tmp_path / "nope.db"
    code, _, err = invoke("sagas", *command, "--db", str(missing))
    assert code == 2
    assert err.strip() == f"error: no saga database at {missing}"
    assert not missing.exists()


def test_an_unknown_status_is_a_usage_error(db: Path) -> None:
    code, _, err = invoke("sagas", "list", "--db", str(db), "--status", "bogus")
    assert code == 2
    assert "bogus" in err


@pytest.mark.parametrize("limit", ["0", "-1", str(2**63), "99999999999999999999999"])
def test_a_limit_out_of_range_is_a_usage_error(db: Path, limit: str) -> None:
    code, out, err = invoke("sagas", "list", "--db", str(db), "--limit", limit)
    assert code == 2
    assert "--limit" in err
    assert "Traceback" not in out + err


def test_the_largest_limit_lists_everything(db: Path) -> None:
    code, out, err = invoke("sagas", "list", "--db", str(db), "--limit", str(2**63 - 1), "--json")
    assert code == 0, err
    assert len(json.loads(out)) == 2


def test_the_db_can_come_from_the_environment(db: Path) -> None:
    result = CliRunner().invoke(app, ["sagas", "list", "--json"], env={"SEAMWORK_DB": str(db)})
    assert result.exit_code == 0
    assert len(json.loads(result.stdout)) == 2


async def run_cli(*args: str) -> tuple[int, str, str]:
    """The CLI as a separate process, as an operator would run it."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "seamwork.cli",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await process.communicate()
    return await process.wait(), out.decode(), err.decode()


async def read_state(db: Path, saga_id: str) -> SagaState:
    store = SQLiteStore(db)
    await store.open()
    try:
        state = await store.get(saga_id)
    finally:
        await store.aclose()
    assert state is not None
    return state


async def read_timeline(db: Path, saga_id: str) -> list[str]:
    store = SQLiteStore(db)
    await store.open()
    try:
        return [e.event for e in await store.timeline(saga_id)]
    finally:
        await store.aclose()


def test_a_file_that_is_not_a_database_is_a_one_line_error(tmp_path: Path) -> None:
    path = tmp_path / "notes.db"
    path.write_text("not sqlite at all\n")
    code, out, err = invoke("sagas", "list", "--db", str(path))
    assert code == 1
    assert err.strip() == f"error: {path} is not a seamwork saga store"
    assert "Traceback" not in out + err


def test_a_corrupt_row_is_named_and_left_alone(db: Path) -> None:
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE seamwork_sagas SET context = '[1, 2' WHERE saga_id = 't-stuck'")
    code, _, err = invoke("sagas", "show", "t-stuck", "--db", str(db))
    assert code == 1
    assert err.startswith("error: saga 't-stuck' is corrupt")
    assert len(err.strip().splitlines()) == 1
    code, _, err = invoke("sagas", "retry", "t-stuck", "--db", str(db))
    assert code == 1
    code, out, _ = invoke("sagas", "list", "--db", str(db), "--json")
    assert [r["saga_id"] for r in json.loads(out)] == ["t-failed"]


def test_listing_a_foreign_database_changes_nothing_in_it(tmp_path: Path) -> None:
    path = tmp_path / "users.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE users (id INTEGER PRIMARY KEY)")
    code, _, err = invoke("sagas", "list", "--db", str(path))
    assert code == 1
    assert "is not a seamwork saga store" in err
    with sqlite3.connect(path) as conn:
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")]
    assert tables == ["users"]


@pytest.mark.parametrize("command", [["retry", "x"], ["abort", "x"]])
def test_a_write_refused_on_a_foreign_database_leaves_its_journal_mode(
    tmp_path: Path, command: list[str]
) -> None:
    path = tmp_path / "users.db"  # another service's database, in rollback-journal mode
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE users (id INTEGER PRIMARY KEY)")
    conn.close()
    code, _, err = invoke("sagas", *command, "--db", str(path))
    assert code == 1
    assert "is not a seamwork saga store" in err
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("delete",)
    conn.close()


@pytest.mark.parametrize(
    ("column", "value", "named"),
    [
        ("at", "'noon'", "time 'noon'"),
        ("at", "9e999", "time inf"),
        ("attempt", "'two'", "attempt 'two'"),
        ("step", "x'00'", "step b'\\x00'"),
    ],
)
@pytest.mark.parametrize("as_json", [[], ["--json"]])
def test_a_corrupt_timeline_event_is_named_not_a_traceback(
    db: Path, column: str, value: str, named: str, as_json: list[str]
) -> None:
    with sqlite3.connect(db) as conn:
        sql = f"UPDATE seamwork_saga_events SET {column} = {value} WHERE saga_id = 't-stuck'"
        conn.execute(sql)
    code, out, err = invoke("sagas", "show", "t-stuck", "--db", str(db), *as_json)
    assert code == 1
    assert err.strip() == f"error: saga 't-stuck' is corrupt: a timeline event has the {named}"
    assert "Traceback" not in out + err


@pytest.mark.parametrize(
    ("column", "value", "command"),
    [
        ("started_at", "1e300", ["show", "t-stuck"]),
        ("updated_at", "9e999", ["show", "t-stuck"]),
        ("updated_at", "-1e300", ["list"]),
        ("deadline_at", "9e999", ["show", "t-stuck"]),
    ],
)
def test_a_time_no_calendar_holds_is_shown_as_its_number(
    db: Path, column: str, value: str, command: list[str]
) -> None:
    with sqlite3.connect(db) as conn:
        conn.execute(f"UPDATE seamwork_sagas SET {column} = {value} WHERE saga_id = 't-stuck'")
    code, out, err = invoke("sagas", *command, "--db", str(db))
    assert code == 0, err
    assert "t-stuck" in out
    assert "(not a time)" in out
    assert "Traceback" not in out + err


APP_MODULE = """
from seamwork.saga import Saga, Step

async def noop(ctx):
    return None

SAGAS = [Saga("transfer", steps=[Step("debit", noop), Step("credit", noop)])]
"""


def installed_script(cwd: Path) -> tuple[list[str], dict[str, str]]:
    """The ``seamwork`` console script installed beside this Python, importing this tree
    (an absolute PYTHONPATH: nothing in it names the current directory)."""
    import os

    import seamwork

    script = Path(sys.executable).parent / "seamwork"
    assert script.is_file(), script
    src = str(Path(seamwork.__file__).parent.parent)
    env = {**os.environ, "PYTHONPATH": src, "COLUMNS": "200"}
    assert str(cwd) not in env["PYTHONPATH"].split(os.pathsep)
    return [str(script)], env


def test_the_installed_script_finds_an_app_module_in_the_current_directory(
    db: Path, tmp_path: Path
) -> None:
    """A console script does not put the current directory on sys.path (``python -m``
    does); ``--app`` modules are found there anyway, as with uvicorn and celery."""
    import subprocess

    workdir = tmp_path / "project"
    workdir.mkdir()
    (workdir / "mysagas.py").write_text(APP_MODULE)
    script, env = installed_script(workdir)
    listed = subprocess.run(
        [*script, "sagas", "list", "--stranded", "--app", "mysagas:SAGAS", "--db", str(db)],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert listed.returncode == 0, listed.stderr
    assert "0 sagas" in listed.stdout
    with subprocess.Popen(
        [*script, "worker", "--app", "mysagas:SAGAS", "--sqlite", str(tmp_path / "w.db")],
        cwd=workdir,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as worker:
        try:
            assert worker.stdout is not None
            first = worker.stdout.readline()
            assert "running" in first, first + (worker.stderr.read() if worker.stderr else "")
        finally:
            worker.terminate()
            worker.wait(timeout=30)


def strict_json(text: str) -> Any:
    """``json.loads`` that refuses ``Infinity`` and ``NaN`` as JSON itself does."""

    def refuse(word: str) -> None:
        raise ValueError(f"{word} is not JSON")

    return json.loads(text, parse_constant=refuse)


def test_json_output_of_times_and_context_no_json_number_holds_is_valid_json(db: Path) -> None:
    with sqlite3.connect(db) as conn:
        conn.execute(
            "UPDATE seamwork_sagas SET started_at = 9e999, updated_at = 9e999,"
            " deadline_at = -9e999,"
            " context = '{\"amount\": NaN, \"limits\": [Infinity]}' WHERE saga_id = 't-stuck'"
        )
    code, out, err = invoke("sagas", "list", "--db", str(db), "--json")
    assert code == 0, err
    (row,) = [r for r in strict_json(out) if r["saga_id"] == "t-stuck"]
    assert (row["started_at"], row["updated_at"], row["deadline_at"]) == ("inf", "inf", "-inf")
    assert row["context"] == {"amount": "nan", "limits": ["inf"]}
    code, out, err = invoke("sagas", "show", "t-stuck", "--db", str(db), "--json")
    assert code == 0, err
    shown = strict_json(out)
    assert shown["saga"] == row
    assert shown["timeline"]
    assert all(e["offset"] == "-inf" for e in shown["timeline"])


def app_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, source: str) -> str:
    """A module of ``source`` for ``--app``, under a name no other test imported."""
    name = f"app_{uuid.uuid4().hex[:12]}"
    (tmp_path / f"{name}.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


def load_app(command: str, spec: str, db: Path) -> tuple[int, str]:
    """``--app spec`` through the worker or ``sagas list --stranded``: the exit code and
    the words of what was printed, without the box around them."""
    if command == "worker":
        argv = ["worker", "--app", spec, "--sqlite", str(db.with_name("worker.db"))]
    else:
        argv = ["sagas", "list", "--stranded", "--app", spec, "--db", str(db)]
    code, out, err = invoke(*argv)
    assert "Traceback" not in out + err
    return code, " ".join((out + err).replace("\u2502", " ").split())


EXITS = {
    "at import": ("import sys\nsys.exit(3)\n", "importing {m} called sys.exit(3)"),
    "with no code": ("import sys\nsys.exit()\n", "importing {m} called sys.exit()"),
    "with a message": (
        "raise SystemExit('no config')\n",
        "importing {m} called sys.exit('no config')",
    ),
    "in __getattr__": (
        "import sys\ndef __getattr__(name):\n    sys.exit(4)\n",
        "reading {m}:SAGAS called sys.exit(4)",
    ),
    "in the factory": (
        "import sys\ndef SAGAS():\n    sys.exit(5)\n",
        "running {m}:SAGAS() called sys.exit(5)",
    ),
}


@pytest.mark.parametrize("command", ["worker", "stranded"])
@pytest.mark.parametrize("how", list(EXITS))
def test_an_app_that_exits_while_loading_is_a_usage_error_not_its_exit(
    db: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, command: str, how: str
) -> None:
    source, said = EXITS[how]
    module = app_module(tmp_path, monkeypatch, source)
    code, words = load_app(command, f"{module}:SAGAS", db)
    assert code == 2, words
    assert f"--app: cannot load {module}:SAGAS: {said.format(m=module)}" in words


def test_ctrl_c_while_an_app_loads_still_interrupts_the_command(
    db: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    module = app_module(tmp_path, monkeypatch, "raise KeyboardInterrupt\n")
    code, words = load_app("worker", f"{module}:SAGAS", db)
    assert code == 130, words
    assert "cannot load" not in words


ENDLESS = {
    "itertools.count()": "import itertools\nSAGAS = itertools.count()\n",
    "a generator of sagas": APP_MODULE.replace("SAGAS = [", "BASE = [")
    + "def SAGAS():\n    while True:\n        yield BASE[0]\n",
}


@pytest.mark.parametrize("command", ["worker", "stranded"])
@pytest.mark.parametrize("what", list(ENDLESS))
def test_an_endless_app_attribute_is_refused_not_read_forever(
    db: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, command: str, what: str
) -> None:
    module = app_module(tmp_path, monkeypatch, ENDLESS[what])
    code, words = load_app(command, f"{module}:SAGAS", db)
    assert code == 2, words
    assert f"--app: {module}:SAGAS yields more than 10,000 items; is it endless?" in words


NOT_SAGAS = {
    "'transfer'": "it is of type str",
    "b'transfer'": "it is of type bytes",
    "42": "it is of type int",
    "None": "it is of type NoneType",
    "{'transfer': BASE[0]}": "it is of type dict",
    "[]": "it is empty",
    "iter(())": "it is empty",
    "[BASE[0], 'credit']": "item 1 is of type str",
    "(BASE[0], BASE[0], 7)": "item 2 is of type int",
}


@pytest.mark.parametrize("value", list(NOT_SAGAS))
def test_an_app_attribute_that_is_not_saga_definitions_is_named_for_what_it_is(
    db: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    source = APP_MODULE.replace("SAGAS = [", "BASE = [") + f"SAGAS = {value}\n"
    module = app_module(tmp_path, monkeypatch, source)
    code, words = load_app("stranded", f"{module}:SAGAS", db)
    assert code == 2, words
    said = f"--app: {module}:SAGAS is not a list of Saga definitions: {NOT_SAGAS[value]}"
    assert said in words


FAILS_WHILE_READ = {
    "raises": ("raise RuntimeError('ledger down')", "RuntimeError: ledger down"),
    "exits": ("import sys; sys.exit(6)", "iterating {m}:SAGAS called sys.exit(6)"),
}


@pytest.mark.parametrize("command", ["worker", "stranded"])
@pytest.mark.parametrize("how", list(FAILS_WHILE_READ))
def test_an_app_generator_that_fails_while_read_is_a_usage_error(
    db: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, command: str, how: str
) -> None:
    failure, said = FAILS_WHILE_READ[how]
    source = APP_MODULE.replace("SAGAS = [", "BASE = [")
    source += f"def SAGAS():\n    yield BASE[0]\n    {failure}\n"
    module = app_module(tmp_path, monkeypatch, source)
    code, words = load_app(command, f"{module}:SAGAS", db)
    assert code == 2, words
    assert f"--app: cannot load {module}:SAGAS: {said.format(m=module)}" in words


def test_a_worker_given_sqlite_runs_on_it_whatever_seamwork_pg_dsn_holds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    module = app_module(
        tmp_path,
        monkeypatch,
        "from seamwork.saga import Saga, Step\n\n"
        "async def act(ctx):\n    return None\n\n"
        "SAGAS = [Saga('s', steps=[Step('a', act)])]\n",
    )
    missing = tmp_path / "gone" / "sagas.db"  # the worker fails once it opens the store
    result = CliRunner().invoke(
        app,
        ["worker", "--app", f"{module}:SAGAS", "--sqlite", str(missing)],
        env={"COLUMNS": "200", "SEAMWORK_PG_DSN": "postgresql://127.0.0.1:1/elsewhere"},
    )
    assert result.exit_code == 1, result.output
    assert f"cannot open saga store {missing}" in " ".join(result.stderr.split())


@pytest.mark.parametrize("saga_id", ["order[/42]", "[bold]order-42", "order [sku-1]"])
@pytest.mark.parametrize("command", ["show", "retry", "abort"])
def test_an_error_naming_text_with_brackets_prints_it_as_it_is(
    db: Path, command: str, saga_id: str
) -> None:
    code, out, err = invoke("sagas", command, saga_id, "--db", str(db))
    assert code == 1
    assert err.strip() == f"error: no saga with id {saga_id!r} in {db}"
    assert "Traceback" not in out + err


def test_a_worker_error_naming_a_path_with_brackets_prints_it_as_it_is(tmp_path: Path) -> None:
    app_dir = tmp_path / "app"
    app_dir.mkdir()
    (app_dir / "bracket_app.py").write_text(
        "from seamwork.saga import Saga, Step\n\n"
        "async def act(ctx):\n    return None\n\n"
        "SAGAS = [Saga('s', steps=[Step('a', act)])]\n"
    )
    missing = tmp_path / "runs[/old]" / "sagas.db"
    sys.path.insert(0, str(app_dir))
    try:
        code, out, err = invoke("worker", "--app", "bracket_app:SAGAS", "--sqlite", str(missing))
    finally:
        sys.path.remove(str(app_dir))
        sys.modules.pop("bracket_app", None)
    assert code == 1
    assert " ".join(err.split()) == (
        f"error: cannot open saga store {missing}: directory {missing.parent} does not exist"
    )
    assert "Traceback" not in out + err


BRACKETED_ID = "order[/7]"
INVALID = "1 validation error for Charge: [type=int_parsing, input_value='x']"
UNREACHABLE = "ledger at [/api/v1] unreachable"


@pytest.fixture
def bracketed(tmp_path: Path) -> Path:
    """A stuck saga whose id, failure reason and timeline hold brackets, as a pydantic
    error or a URL path in an exception message do."""

    async def reserve(ctx: StepContext) -> None:
        return None

    async def release(ctx: StepContext) -> None:
        raise RuntimeError(UNREACHABLE)

    async def charge(ctx: StepContext) -> None:
        raise StepFailed(INVALID)

    saga = Saga(
        "pay[ment]",
        steps=[Step("reserve[sku]", reserve, compensate=release), Step("charge", charge)],
        max_compensation_attempts=1,
        compensation_backoff=0.0,
    )
    path = tmp_path / "sagas.db"

    async def make() -> None:
        async with SagaOrchestrator(SQLiteStore(path), [saga]) as orch:
            state = await (await orch.start("pay[ment]", {}, saga_id=BRACKETED_ID)).wait()
        assert state.status.value == "stuck"

    asyncio.run(make())
    return path


def test_list_prints_ids_names_and_failures_with_brackets_as_they_are(bracketed: Path) -> None:
    code, out, err = invoke("sagas", "list", "--db", str(bracketed))
    assert code == 0, err
    assert BRACKETED_ID in out
    assert "pay[ment] v1" in out
    assert INVALID in out


def test_show_prints_a_timeline_with_brackets_as_it_is(bracketed: Path) -> None:
    code, out, err = invoke("sagas", "show", BRACKETED_ID, "--db", str(bracketed))
    assert (code, err) == (0, "")
    texts = (BRACKETED_ID, "pay[ment] v1", INVALID, UNREACHABLE, "reserve[sku]: 1")
    for text in texts:  # the last one: the compensation attempts
        assert text in out, text


@pytest.mark.parametrize(
    ("command", "said"),
    [
        ("retry", f"saga {BRACKETED_ID} is compensating again (to undo: reserve[sku])"),
        ("abort", f"saga {BRACKETED_ID} aborted: now failed; left un-compensated: reserve[sku]"),
    ],
)
def test_retry_and_abort_print_ids_and_steps_with_brackets_as_they_are(
    bracketed: Path, command: str, said: str
) -> None:
    code, out, err = invoke("sagas", command, BRACKETED_ID, "--db", str(bracketed))
    assert (code, err) == (0, "")
    assert said in " ".join(out.split())


def test_python_dash_m_seamwork_runs_the_command() -> None:
    import subprocess

    src = str(Path(__file__).resolve().parents[2] / "src")
    env = {**os.environ, "PYTHONPATH": src}
    done = subprocess.run(
        [sys.executable, "-m", "seamwork", "sagas", "--help"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "list" in done.stdout
    assert "retry" in done.stdout


LONG_ID = "order-" + "-".join(uuid.UUID(int=n).hex for n in range(1, 4))
LONG_STEP = "reserve-stock-" + "-".join(["warehouse"] * 7)
LONG_WORD = "https://ledger.example/api/v1/accounts/" + "a1b2c3d4" * 12
CUSTOMER = "Zoë Ødegård 日本"


@pytest.fixture
def long_texts(tmp_path: Path) -> Path:
    """A stuck saga whose id, step name and failure are longer than an 80-column
    terminal holds, and whose context is not ASCII."""

    async def reserve(ctx: StepContext) -> None:
        return None

    async def release(ctx: StepContext) -> None:
        raise RuntimeError(f"cannot reach {LONG_WORD}")

    async def charge(ctx: StepContext) -> None:
        raise StepFailed(f"declined by {LONG_WORD}")

    saga = Saga(
        "fulfil",
        steps=[Step(LONG_STEP, reserve, compensate=release), Step("charge", charge)],
        max_compensation_attempts=1,
        compensation_backoff=0.0,
    )
    path = tmp_path / "sagas.db"

    async def make() -> None:
        async with SagaOrchestrator(SQLiteStore(path), [saga]) as orch:
            run = await orch.start("fulfil", {"customer": CUSTOMER}, saga_id=LONG_ID)
            assert (await run.wait()).status.value == "stuck"

    asyncio.run(make())
    return path


def narrow(*args: str) -> str:
    result = CliRunner().invoke(app, list(args), env={"COLUMNS": "80"})
    assert (result.exit_code, result.stderr) == (0, ""), result.output
    return result.stdout


def cells(out: str, column: int) -> str:
    """The text of one column of a table's body, its folded lines joined up."""
    rows = [line.split("│") for line in out.splitlines() if line.startswith("│")]
    return "".join(row[column + 1].strip() for row in rows if len(row) > column + 1)


def test_list_on_a_narrow_terminal_shows_a_long_id_whole_and_the_status(
    long_texts: Path,
) -> None:
    out = narrow("sagas", "list", "--db", str(long_texts))
    assert all(len(line) <= 80 for line in out.splitlines()), out
    assert cells(out, 0) == LONG_ID  # folded, never cut short: it is what `show` takes
    assert cells(out, 2) == "stuck"
    assert LONG_WORD in cells(out, 5)


def test_show_on_a_narrow_terminal_keeps_the_times_and_shows_every_text_whole(
    long_texts: Path,
) -> None:
    out = narrow("sagas", "show", LONG_ID, "--db", str(long_texts))
    assert all(len(line) <= 80 for line in out.splitlines()), out
    timeline = out[out.index("timeline") : out.index("state")]
    times = [cell.strip() for cell in cells(timeline, 0).split("s") if cell.strip()]
    events = json.loads(narrow("sagas", "show", LONG_ID, "--db", str(long_texts), "--json"))
    assert len(times) == len(events["timeline"])
    assert all(t.startswith("+") for t in times), times
    assert LONG_STEP in cells(timeline, 2)
    squashed = "".join(out.split()).replace("│", "")
    assert f"failurestep'charge'failed:declinedby{LONG_WORD}" in squashed  # not cut short
    assert LONG_ID in squashed
    assert f'"customer":"{CUSTOMER.replace(" ", "")}"' in squashed  # as stored, not \u00eb


CONTROL_FAILURE = "declined\x1b[2J\x1b]0;owned\x07 by\rbank\x9b31m"
CONTROL_SHOWN = "declined\\x1b[2J\\x1b]0;owned\\x07 by\\rbank\\x9b31m"


@pytest.fixture
def controlled(tmp_path: Path) -> Path:
    """A stuck saga whose failure reason and timeline hold terminal control sequences
    (an escape that clears the screen, one that sets the window title, a carriage
    return), as an exception quoting a peer's answer can."""

    async def reserve(ctx: StepContext) -> None:
        return None

    async def release(ctx: StepContext) -> None:
        raise RuntimeError(CONTROL_FAILURE)

    async def charge(ctx: StepContext) -> None:
        raise StepFailed(CONTROL_FAILURE)

    saga = Saga(
        "pay",
        steps=[Step("reserve\x1b[8m", reserve, compensate=release), Step("charge", charge)],
        max_compensation_attempts=1,
        compensation_backoff=0.0,
    )
    path = tmp_path / "sagas.db"

    async def make() -> None:
        async with SagaOrchestrator(SQLiteStore(path), [saga]) as orch:
            state = await (await orch.start("pay", {}, saga_id="pay-\x1b[1A1")).wait()
        assert state.status.value == "stuck"

    asyncio.run(make())
    return path


@pytest.mark.parametrize("command", ["list", "show", "retry", "abort"])
def test_control_characters_from_the_store_are_shown_escaped_never_sent_to_the_terminal(
    controlled: Path, command: str
) -> None:
    target = [] if command == "list" else ["pay-\x1b[1A1"]
    code, out, err = invoke("sagas", command, *target, "--db", str(controlled))
    assert (code, err) == (0, "")
    assert not [c for c in out if c not in "\n" and (ord(c) < 32 or 127 <= ord(c) < 160)]
    squashed = "".join(out.split()).replace("│", "")
    assert "pay-\\x1b[1A1" in squashed
    if command in ("list", "show"):
        assert "".join(CONTROL_SHOWN.split()) in squashed
    if command != "list":
        assert "reserve\\x1b[8m" in squashed


NOT_UTF8 = b"t-st\xffuck".decode("utf-8", "surrogateescape")  # argv bytes Python cannot decode


@pytest.mark.parametrize(
    ("args", "where"),
    [
        (["show", NOT_UTF8], "saga_id"),
        (["retry", NOT_UTF8], "saga_id"),
        (["abort", NOT_UTF8], "saga_id"),
        (["abort", "t-stuck", "--reason", f"gave up {NOT_UTF8}"], "--reason"),
        (["list", "--name", NOT_UTF8], "--name"),
        (["list", "--postgres", f"host=127.0.0.1 application_name={NOT_UTF8}"], "--postgres"),
    ],
)
def test_an_argument_that_is_not_utf8_is_a_usage_error_and_changes_nothing(
    db: Path, args: list[str], where: str
) -> None:
    before = json.loads(invoke("sagas", "list", "--db", str(db), "--json")[1])
    result = CliRunner().invoke(app, ["sagas", *args, "--db", str(db)], env={"COLUMNS": "200"})
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    said = " ".join(result.stderr.replace("│", " ").split())
    assert f"Invalid value for '{where}'" in said
    assert "is not valid UTF-8" in said
    assert json.loads(invoke("sagas", "list", "--db", str(db), "--json")[1]) == before


def test_a_worker_id_that_is_not_utf8_is_a_usage_error(tmp_path: Path) -> None:
    store = tmp_path / "sagas.db"
    result = CliRunner().invoke(
        app,
        ["worker", "--app", f"{__name__}:ONE", "--sqlite", str(store), "--worker-id", NOT_UTF8],
        env={"COLUMNS": "200"},
    )
    assert result.exit_code == 2, result.output
    assert "is not valid UTF-8" in " ".join(result.stderr.replace("│", " ").split())
    assert not store.exists()


def ONE() -> list[Saga]:  # a --app target
    return [Bank().saga()]


def test_list_cut_short_by_its_limit_says_so(db: Path) -> None:
    code, out, err = invoke("sagas", "list", "--db", str(db), "--limit", "1")
    assert (code, err) == (0, "")
    title = out.splitlines()[0]
    assert title.startswith("1 saga (most recently updated first)"), title
    assert "more match: raise --limit to see them" in title
    code, out, err = invoke("sagas", "list", "--db", str(db), "--limit", "1", "--json")
    assert code == 0
    assert len(json.loads(out)) == 1
    assert err.strip() == "note: more sagas match; --limit 1 printed only the first 1"
    code, out, err = invoke("sagas", "list", "--db", str(db), "--limit", "2")
    assert (code, err) == (0, "")
    assert out.splitlines()[0].strip() == "2 sagas (most recently updated first)"


@pytest.mark.parametrize("reason", ["", "   "])
def test_abort_with_a_blank_reason_is_a_usage_error_and_the_saga_stays_stuck(
    db: Path, reason: str
) -> None:
    result = CliRunner().invoke(
        app, ["sagas", "abort", "t-stuck", "--db", str(db), "--reason", reason]
    )
    assert result.exit_code == 2, result.output
    said = " ".join(result.stderr.replace("│", " ").split())
    assert "Invalid value for '--reason' / '-r': give the reason the saga is given up on" in said
    code, out, _ = invoke("sagas", "show", "t-stuck", "--db", str(db), "--json")
    assert code == 0
    assert json.loads(out)["saga"]["status"] == "stuck"


def test_an_event_stamped_before_the_saga_started_shows_a_minus_offset(db: Path) -> None:
    """Workers' clocks differ a little: a saga resumed by a worker whose clock is behind
    the one that started it has events stamped before its start."""
    with sqlite3.connect(db) as conn:
        conn.execute(
            "UPDATE seamwork_saga_events SET at = at - 1.5 WHERE saga_id = 't-stuck'"
            " AND event = 'stuck'"
        )
        conn.execute("UPDATE seamwork_sagas SET updated_at = started_at - 1.5")
    code, out, err = invoke("sagas", "show", "t-stuck", "--db", str(db))
    assert (code, err) == (0, "")
    assert "+-" not in out
    assert "(-1.5" in out
    (stuck,) = [line for line in out.splitlines() if "│ stuck " in line]
    assert stuck.split("│")[1].strip().startswith("-1.4")
