"""``seamwork demo`` end to end: a real run in a subprocess, its output, its files.

The demo spawns orchestrator processes, SIGKILLs one mid-run and checks its
invariants against the services' own databases; these tests also make sure those
checks are not vacuous by breaking a service's data and watching them fail.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import shlex
import shutil
import socket
import sqlite3
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

import seamwork as seamwork_package
from seamwork.demo.invariants import check_all, gather_evidence
from seamwork.demo.saga import make_orders, saga_store
from seamwork.demo.scenario import DemoConfig, DemoRun
from seamwork.demo.servers import NatsRun, PgRun

SOURCE = str(Path(seamwork_package.__file__).parents[1])
"""Where the seamwork under test lives: the subprocesses run it, not an installed one."""
ORDERS = 60
INVARIANTS = (
    "every saga terminal",
    "outcomes as planned",
    "completed sagas applied every step exactly once",
    "failed sagas compensated exactly their applied steps",
    "compensation in reverse order (timeline)",
    "stuck sagas are exactly the W-13 ones with a failed release",
    "stock conserved (initial = on shelf + held)",
    "idempotency keys stable (rows = ledger)",
    "SIGKILL mid-run, all in-flight sagas recovered",
    # act two: the saga choreographed over an embedded nats-server
    "every flow follows its planned path",
    "orders' own status matches the flow",
    "payments charged or declined as planned",
    "stock conserved (available + reserved)",
    "reservations held or released as planned",
    "a notification for each completed order only",
    "no message left in any outbox",
    "no message dead-lettered",
)


@dataclass(frozen=True)
class Ran:
    directory: Path
    code: int
    out: str
    err: str


def seamwork(
    *args: str, cwd: Path, timeout: float = 60, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "seamwork.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={"COLUMNS": "200", "PATH": "/usr/bin:/bin", "PYTHONPATH": SOURCE, **(env or {})},
        check=False,
    )


@pytest.fixture(scope="module")
def ran(tmp_path_factory: pytest.TempPathFactory) -> Ran:
    cwd = tmp_path_factory.mktemp("demo")
    done = seamwork("demo", "--orders", str(ORDERS), cwd=cwd)
    return Ran(cwd / ".seamwork-demo", done.returncode, done.stdout, done.stderr)


def test_the_demo_exits_0_with_every_invariant_checked(ran: Ran) -> None:
    assert ran.code == 0, ran.out + ran.err
    assert f"all {len(INVARIANTS)} invariants checked and hold" in ran.out
    lines = ran.out.splitlines()
    for name in INVARIANTS:
        assert any(name in line and "✓" in line for line in lines), name


def test_the_demo_prints_its_summary_alerts_and_where_its_files_are(ran: Ran) -> None:
    for text in ("completed", "compensated (failed)", "stuck (alert fired)", "p50 / p99"):
        assert text in ran.out
    assert "recovery: all in-flight done" in ran.out
    assert "throughput" in ran.out
    assert "ALERT saga saga-order-0005 is stuck" in ran.out
    assert f"Files left in {ran.directory}" in ran.out
    assert f"seamwork sagas list --db {ran.directory / 'sagas.db'}" in ran.out
    for name in ("sagas.db", "inventory.db", "payment.db", "shipping.db", "notification.db"):
        assert (ran.directory / name).is_file()


def test_the_cli_inspects_what_the_demo_left(ran: Ran) -> None:
    db = str(ran.directory / "sagas.db")
    listed = seamwork("sagas", "list", "--db", db, "--status", "stuck", "--json", cwd=ran.directory)
    assert listed.returncode == 0, listed.stderr
    stuck = {row["saga_id"] for row in json.loads(listed.stdout)}
    assert stuck == {"saga-order-0005", "saga-order-0029"}  # the failing W-13 orders
    shown = seamwork("sagas", "show", "saga-order-0005", "--db", db, cwd=ran.directory)
    assert shown.returncode == 0
    assert "WarehouseUnavailable" in shown.stdout
    assert "compensation_failed" in shown.stdout


async def load(directory: Path, orders: int = ORDERS, pg: PgRun | None = None) -> DemoRun:
    demo = DemoRun(DemoConfig(directory, orders), make_orders(orders))
    store = saga_store(directory, pg)
    await store.open()
    try:
        demo.states = {s.saga_id: s for s in await store.list(limit=10 * orders)}
        demo.timelines = {sid: await store.timeline(sid) for sid in demo.states}
    finally:
        await store.aclose()
    demo.alerts = {sid: None for sid, s in demo.states.items() if s.status.value == "stuck"}
    return demo


def failing(directory: Path, orders: int = ORDERS, pg: PgRun | None = None) -> dict[str, str]:
    async def go() -> dict[str, str]:
        demo = await load(directory, orders, pg)
        checks = check_all(demo, await gather_evidence(directory, demo.orders, pg))
        return {c.name: c.detail for c in checks if not c.ok}

    found = asyncio.run(go())
    found.pop("SIGKILL mid-run, all in-flight sagas recovered")  # not known after the run
    return found


@pytest.fixture
def copy(ran: Ran, tmp_path: Path) -> Path:
    assert ran.code == 0
    target = tmp_path / "copy"
    shutil.copytree(ran.directory, target)
    return target


def test_the_checks_hold_on_the_untouched_files(copy: Path) -> None:
    assert failing(copy) == {}


def test_a_refund_applied_twice_is_caught(copy: Path) -> None:
    # order 19 shipped with the slow carrier: charged, then refunded once.
    with sqlite3.connect(copy / "payment.db") as conn:
        conn.execute(
            "INSERT INTO refunds (order_id, payment_id, amount_cents, idempotency_key) "
            "SELECT order_id, payment_id, amount_cents, idempotency_key FROM refunds "
            "WHERE order_id = 'order-0019'"
        )
    found = failing(copy)
    assert "saga-order-0019" in found["failed sagas compensated exactly their applied steps"]


def test_a_lost_release_is_caught_by_stock_conservation(copy: Path) -> None:
    with sqlite3.connect(copy / "inventory.db") as conn:
        conn.execute("UPDATE reservations SET released = 0 WHERE order_id = 'order-0002'")
    found = failing(copy)
    assert "stock conserved (initial = on shelf + held)" in found
    assert "saga-order-0002" in found["failed sagas compensated exactly their applied steps"]


def test_a_shipment_under_a_foreign_key_is_caught(copy: Path) -> None:
    with sqlite3.connect(copy / "shipping.db") as conn:
        conn.execute(
            "UPDATE shipments SET idempotency_key = 'retry-2:ship_order' "
            "WHERE order_id = 'order-0001'"
        )
    assert "idempotency keys stable (rows = ledger)" in failing(copy)


def _children(pid: int) -> dict[int, str]:
    """The live child processes of ``pid``: their pids and command lines."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        state, ppid = stat.rsplit(")", 1)[1].split()[:2]
        if int(ppid) == pid and state != "Z":
            found[int(entry.name)] = cmdline
    return found


def _alive(pid: int, cmdline: str) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        now = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return False
    return now == cmdline and stat.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.mark.parametrize(
    ("child", "sigint_ignored"),
    [("seamwork.demo.worker", False), ("nats-server", False), ("seamwork.demo.worker", True)],
)
def test_sigterm_stops_the_demo_and_everything_it_started(
    tmp_path: Path, child: str, sigint_ignored: bool
) -> None:
    """SIGTERM to the demo alone (not its group: a service manager or ``kill PID``)
    while an orchestrator (act one) or the nats-server (act two) runs; also when the
    demo started with SIGINT ignored (``seamwork demo &`` in a script), where a SIGTERM
    passed on as SIGINT was dropped and the run went on to exit 0."""
    import os
    import signal
    import time

    def ignore_sigint() -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)

    env = {k: v for k, v in os.environ.items() if k not in ("SEAMWORK_PG_DSN", "SEAMWORK_NATS_URL")}
    demo = subprocess.Popen(
        [sys.executable, "-m", "seamwork.cli", "demo", "--orders", "20", "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**env, "COLUMNS": "200"},  # (the embedded servers, whatever CI's environment says)
        preexec_fn=ignore_sigint if sigint_ignored else None,
    )
    orders_db = tmp_path / "choreography" / "orders.db"

    def ready() -> bool:  # act two: once its services run and take orders
        if child != "nats-server":
            return True
        try:
            with contextlib.closing(sqlite3.connect(f"file:{orders_db}?mode=ro", uri=True)) as db:
                return bool(db.execute("SELECT count(*) FROM orders").fetchone()[0])
        except sqlite3.Error:
            return False

    started: dict[int, str] = {}
    try:
        deadline = time.monotonic() + 120
        while not any(child in cmd for cmd in started.values()) or not ready():
            assert demo.poll() is None, f"the demo ended before {child} ran"
            assert time.monotonic() < deadline, f"no {child} within 120 s"
            time.sleep(0.02)
            started = _children(demo.pid)
        demo.send_signal(signal.SIGTERM)
        assert demo.wait(timeout=15) != 0
        deadline = time.monotonic() + 5
        while (left := [cmd for pid, cmd in started.items() if _alive(pid, cmd)]) and (
            time.monotonic() < deadline
        ):
            time.sleep(0.05)
        assert left == []
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()
        for pid, cmd in started.items():  # whatever outlived it is ours to stop
            if _alive(pid, cmd):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize(
    ("where", "reason"),
    [
        ("notes.txt", "File exists"),  # --dir names a file
        ("notes.txt/demo", "Not a directory"),  # --dir lies beneath a file
        ("taken", "Is a directory"),  # a demo database's name is taken by a directory
        ("notes.txt/[/runs]", "Not a directory"),  # brackets are no rich markup
    ],
)
def test_a_demo_dir_it_cannot_use_is_a_one_line_error(
    tmp_path: Path, where: str, reason: str
) -> None:
    (tmp_path / "notes.txt").write_text("keep me\n")
    (tmp_path / "taken" / "sagas.db").mkdir(parents=True)
    done = seamwork("demo", "--orders", "20", "--dir", where, cwd=tmp_path)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "Traceback" not in done.stdout + done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith(f"error: cannot use {tmp_path / where} for the demo's files: ")
    assert reason in line
    assert (tmp_path / "notes.txt").read_text() == "keep me\n"


def test_a_demo_dir_it_cannot_use_is_the_error_when_postgres_is_turned_off(
    tmp_path: Path,
) -> None:
    """``--postgres ''`` runs on SQLite files even when SEAMWORK_PG_DSN names a server."""
    (tmp_path / "notes.txt").write_text("keep me\n")
    done = seamwork(
        "demo",
        "--orders",
        "20",
        "--dir",
        "notes.txt",
        "--postgres",
        "",
        cwd=tmp_path,
        env={"SEAMWORK_PG_DSN": "host=127.0.0.1 port=1 user=postgres"},
    )
    assert done.returncode == 2, done.stdout + done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith(f"error: cannot use {tmp_path / 'notes.txt'} for the demo's files: ")


# --- on real servers: --postgres DSN and --nats URL ---------------------------------------

SERVER_ORDERS = 40


@pytest.mark.parametrize(
    ("args", "env", "error"),
    [
        (
            ("--postgres", "host=127.0.0.1 port=1 user=postgres password=s3cret"),
            {},
            "error: cannot connect to PostgreSQL 'user=postgres host=127.0.0.1 port=1': ",
        ),
        (
            (),
            {"SEAMWORK_PG_DSN": "host=127.0.0.1 port=1 user=postgres"},
            "error: cannot connect to PostgreSQL 'user=postgres host=127.0.0.1 port=1': ",
        ),
        (
            ("--postgres", "postgresql://postgres:s3cret%zz@127.0.0.1:1/db"),
            {},
            "error: --postgres is not a valid PostgreSQL DSN: ",
        ),
        (
            ("--postgres", "not a dsn"),
            {},
            "error: --postgres is not a valid PostgreSQL DSN: ",
        ),
        (
            ("--nats", "nats://127.0.0.1:1"),
            {},
            "error: cannot connect to NATS at 'nats://127.0.0.1:1': ",
        ),
        (
            ("--nats", "nats://demo:s3cret@127.0.0.1:1"),
            {},
            "error: cannot connect to NATS at 'nats://***@127.0.0.1:1': ",
        ),
        (
            (),
            {"SEAMWORK_NATS_URL": "nats://no-such-host.invalid:4222"},
            "error: cannot connect to NATS at 'nats://no-such-host.invalid:4222': ",
        ),
    ],
)
def test_a_server_that_does_not_answer_is_a_one_line_error_naming_it(
    tmp_path: Path, args: tuple[str, ...], env: dict[str, str], error: str
) -> None:
    done = seamwork("demo", "--orders", "20", *args, cwd=tmp_path, env=env)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "Traceback" not in done.stdout + done.stderr
    assert "s3cret" not in done.stdout + done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith(error), line
    assert not (tmp_path / ".seamwork-demo").exists()  # nothing ran


NOT_UTF8 = b"\xff".decode("utf-8", "surrogateescape")  # argv bytes Python cannot decode


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("--postgres", f"host=127.0.0.1 port=1 application_name=demo{NOT_UTF8}"),
        ("--nats", f"nats://127.0.0.1:1/{NOT_UTF8}"),
    ],
)
def test_a_server_argument_that_is_not_utf8_is_a_usage_error(
    tmp_path: Path, option: str, value: str
) -> None:
    done = seamwork("demo", "--orders", "20", option, value, cwd=tmp_path)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "Traceback" not in done.stdout + done.stderr
    said = " ".join(done.stderr.replace("│", " ").split())
    assert f"Invalid value for '{option}'" in said
    assert "is not valid UTF-8" in said
    assert not (tmp_path / ".seamwork-demo").exists()  # nothing ran


def test_a_nats_server_without_jetstream_is_a_one_line_error_naming_it(tmp_path: Path) -> None:
    from seamwork.brokers.embedded_nats import find_nats_server

    with socket.socket() as probe:  # a free port for the server
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        [find_nats_server(), "-a", "127.0.0.1", "-p", str(port)],  # no -js
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stderr is not None
        for line in server.stderr:  # its log, until it takes connections
            if "Server is ready" in line:
                break
        url = f"nats://127.0.0.1:{port}"
        done = seamwork("demo", "--orders", "20", "--nats", url, cwd=tmp_path)
    finally:
        server.terminate()
        server.communicate()  # (closes its pipe)
    assert done.returncode == 2, done.stdout + done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert line == f"error: NATS at '{url}' has no JetStream (start nats-server with -js)"


@dataclass(frozen=True)
class OnServers:
    ran: Ran
    pg: PgRun
    nats: NatsRun


def on_servers(cwd: Path, dsn: str, url: str, orders: int, *more: str) -> OnServers:
    done = seamwork(
        "demo",
        "--orders",
        str(orders),
        "--postgres",
        dsn,
        "--nats",
        url,
        *more,
        cwd=cwd,
        timeout=120,
    )
    found = re.search(r"seamwork_demo_([0-9a-f]+)_\*", done.stdout)
    assert found, done.stdout + done.stderr
    run_id = found.group(1)
    ran = Ran(cwd / ".seamwork-demo", done.returncode, done.stdout, done.stderr)
    return OnServers(ran, PgRun(dsn, run_id), NatsRun(url, run_id))


@pytest.fixture(scope="module")
def servers_run(
    tmp_path_factory: pytest.TempPathFactory, pg_server: str, nats_service: str
) -> OnServers:
    cwd = tmp_path_factory.mktemp("demo-on-servers")
    return on_servers(cwd, pg_server, nats_service, SERVER_ORDERS)


def test_on_postgres_and_nats_the_demo_exits_0_with_every_invariant_checked(
    servers_run: OnServers,
) -> None:
    ran = servers_run.ran
    assert ran.code == 0, ran.out + ran.err
    assert f"all {len(INVARIANTS)} invariants checked and hold" in ran.out
    lines = ran.out.splitlines()
    for name in INVARIANTS:
        assert any(name in line and "✓" in line for line in lines), name
    assert "one PostgreSQL schema each" in ran.out
    assert f"on the NATS server at {servers_run.nats.url}" in ran.out
    assert "embedded nats-server" not in ran.out
    assert sorted(p.name for p in ran.directory.glob("**/*.db")) == []  # no SQLite at all


def test_on_postgres_and_nats_the_demo_leaves_nothing_of_its_run_on_the_servers(
    servers_run: OnServers,
) -> None:
    assert servers_run.ran.code == 0, servers_run.ran.out + servers_run.ran.err
    assert f"PostgreSQL schemas {servers_run.pg.pattern} dropped" in servers_run.ran.out
    assert run_schemas(servers_run.pg) == []
    assert asyncio.run(run_streams(servers_run.nats)) == ([], 0)


def run_schemas(pg: PgRun) -> list[str]:
    import psycopg

    with psycopg.connect(pg.dsn) as conn:
        rows = conn.execute(
            "SELECT nspname FROM pg_namespace WHERE nspname LIKE %s ORDER BY nspname",
            (pg.schema("") + "%",),
        ).fetchall()
    return [name for (name,) in rows]


async def run_streams(nats: NatsRun) -> tuple[list[str], int]:
    """The run's streams on the server, and how many dead letters of its subjects."""
    import nats as nats_py

    nc = await nats_py.connect(nats.url)
    try:
        js = nc.jsm()
        names = [s.config.name for s in await js.streams_info()]
        letters = 0
        if "DEADLETTER" in names:
            info = await js.stream_info("DEADLETTER", subjects_filter=nats.dead_letter_filter)
            letters = sum((info.state.subjects or {}).values())
        return [n for n in names if n == nats.stream], letters
    finally:
        await nc.close()


def test_with_keep_the_run_stays_on_the_servers_and_its_checks_read_postgres(
    tmp_path: Path, pg_server: str, nats_service: str
) -> None:
    run = on_servers(tmp_path, pg_server, nats_service, 20, "--keep")
    try:
        assert run.ran.code == 0, run.ran.out + run.ran.err
        assert run_schemas(run.pg) == sorted(run.pg.schemas)
        assert asyncio.run(run_streams(run.nats)) == ([run.nats.stream], 0)
        shown = run.pg.shown_for("sagas")
        assert f"seamwork sagas list --postgres {shlex.quote(shown)}" in run.ran.out
        listed = seamwork(
            "sagas", "list", "--postgres", shown, "--status", "stuck", "--json", cwd=tmp_path
        )
        assert listed.returncode == 0, listed.stderr
        assert {row["saga_id"] for row in json.loads(listed.stdout)} == {"saga-order-0005"}
        assert failing(tmp_path, 20, run.pg) == {}
        import psycopg

        # order 19 shipped with the slow carrier: charged, then refunded once
        with psycopg.connect(run.pg.dsn_for("payment")) as conn:
            conn.execute(
                "INSERT INTO refunds (order_id, payment_id, amount_cents, idempotency_key) "
                "SELECT order_id, payment_id, amount_cents, idempotency_key FROM refunds "
                "WHERE order_id = 'order-0019'"
            )
        found = failing(tmp_path, 20, run.pg)
        assert "saga-order-0019" in found["failed sagas compensated exactly their applied steps"]
    finally:
        run.pg.drop()
        asyncio.run(run.nats.clean())
    assert run_schemas(run.pg) == []
    assert asyncio.run(run_streams(run.nats)) == ([], 0)


class _Quiet:
    def phase(self, text: str) -> None: ...

    def finished(self, count: int) -> None: ...

    def alert(self, saga_id: str, reason: str | None) -> None: ...


@pytest.mark.parametrize("kill_at", [0.05, 0.95])
async def test_one_saga_at_a_time_the_sigkill_still_lands_on_a_saga_in_flight(
    tmp_path: Path, kill_at: float
) -> None:
    """With --concurrency 1 the orchestrator has a saga in flight nearly all the time,
    but not at the instant it reports one finished: a SIGKILL sent then hit nothing."""
    from seamwork.demo.invariants import check_recovery
    from seamwork.demo.scenario import run_scenario

    config = DemoConfig(tmp_path, orders=20, concurrency=1, kill_at=kill_at)
    demo = await run_scenario(config, _Quiet())
    assert len(demo.recovery.in_flight) == 1
    assert check_recovery(demo, await gather_evidence(tmp_path, demo.orders)).ok
    assert demo.killed_after >= max(1, int(20 * kill_at))
