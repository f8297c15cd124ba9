"""The PostgreSQL section of ``saga_throughput.py``: seamwork vs DBOS vs the psycopg floor.

Run through ``saga_throughput.py --postgres DSN`` (DSN of a server where a fresh
database may be created; it is dropped afterwards). Each contender runs in its own
interpreter, one after the other, on its own database:

* the floor: a plain synchronous psycopg loop, per saga an INSERT and per step an
  UPDATE + timeline INSERT + COMMIT (what any durable orchestrator must write);
* seamwork: ``SagaOrchestrator`` on ``PostgresStore`` - sequential p50, 32 in flight,
  1 vs 3 worker processes (each starting its share of the sagas, 32 in flight), and
  recovery of 100 sagas parked in a SIGKILLed worker by the same worker id restarted;
* DBOS (PyPI ``dbos``) on PostgreSQL: the same saga as ``@DBOS.workflow`` + steps;
* ``sagas list --status`` on 100,000 rows (``PostgresStore.list``).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()
TARGETS = {"seq_ratio": 1.5, "rate": 400.0, "recovery_s": 0.5, "list_ms": 100.0}


def p50(values: list[float]) -> float:
    return statistics.median(values)


def with_db(dsn: str, name: str) -> str:
    parts = [p for p in dsn.split() if not p.startswith("dbname=")]
    return " ".join([*parts, f"dbname={name}"])


# --- contenders (each in a worker interpreter) ----------------------------------------


def floor(cfg: dict[str, Any]) -> dict[str, Any]:
    import psycopg

    with psycopg.connect(cfg["dsn"]) as conn:
        conn.execute(
            "CREATE TABLE fs (id text PRIMARY KEY, status text, step int, ctx jsonb, at float8)"
        )
        conn.execute("CREATE TABLE fe (id bigserial PRIMARY KEY, saga text, ev text, at float8)")
        conn.commit()

        def saga(i: int) -> None:
            sid = f"f-{i}"
            conn.execute("INSERT INTO fs VALUES (%s, 'running', 0, '{}', %s)", (sid, time.time()))
            conn.execute("INSERT INTO fe (saga, ev, at) VALUES (%s, 'started', %s)", (sid, 0.0))
            conn.commit()
            for step in range(4):
                conn.execute(
                    "UPDATE fs SET step = %s, ctx = ctx || %s::jsonb, at = %s WHERE id = %s",
                    (step + 1, json.dumps({f"s{step}": True}), time.time(), sid),
                )
                conn.execute("INSERT INTO fe (saga, ev, at) VALUES (%s, 'done', %s)", (sid, 0.0))
                conn.commit()

        for i in range(cfg["warmup"]):
            saga(-1 - i)
        lat = []
        for i in range(cfg["sequential"]):
            t0 = time.perf_counter()
            saga(i)
            lat.append(time.perf_counter() - t0)
    return {"seq_p50_ms": p50(lat) * 1e3}


def _saga(park: bool = False) -> Any:
    sys.path.insert(0, str(HERE.parent))
    from saga_throughput import order_saga

    return order_saga(park=park)


async def seamwork(cfg: dict[str, Any]) -> dict[str, Any]:
    from seamwork.saga import SagaOrchestrator
    from seamwork.storage import PostgresStore

    async with SagaOrchestrator(PostgresStore(cfg["dsn"]), [_saga()]) as orch:

        async def one(i: int) -> None:
            await (await orch.start("order", {"order_id": i})).wait()

        for i in range(cfg["warmup"]):
            await one(i)
        lat = []
        for i in range(cfg["sequential"]):
            t0 = time.perf_counter()
            await one(i)
            lat.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        await _closed_loop(cfg["concurrent"], cfg["in_flight"], one)
        rate = cfg["concurrent"] / (time.perf_counter() - t0)
    return {"seq_p50_ms": p50(lat) * 1e3, "rate": rate}


async def _closed_loop(count: int, in_flight: int, one: Any) -> None:
    numbers = iter(range(count))

    async def lane() -> None:
        for i in numbers:
            await one(i)

    await asyncio.gather(*(lane() for _ in range(in_flight)))


async def share(cfg: dict[str, Any]) -> dict[str, Any]:
    """One of several worker processes: its share of sagas, 32 in flight, from ``go_at``."""
    from seamwork.saga import SagaOrchestrator
    from seamwork.storage import PostgresStore

    orch = SagaOrchestrator(PostgresStore(cfg["dsn"]), [_saga()], owner=cfg["name"])
    async with orch:
        await asyncio.sleep(max(0.0, cfg["go_at"] - time.time()))
        t0 = time.time()
        await _closed_loop(
            cfg["count"],
            cfg["in_flight"],
            lambda i: _start_wait(orch, f"{cfg['name']}-{i}"),
        )
        return {"start": t0, "end": time.time()}


async def _start_wait(orch: Any, saga_id: str) -> None:
    await (await orch.start("order", {"order_id": 1}, saga_id=saga_id)).wait()


async def park(cfg: dict[str, Any]) -> None:
    from seamwork.saga import SagaOrchestrator
    from seamwork.storage import PostgresStore

    orch = SagaOrchestrator(PostgresStore(cfg["dsn"]), [_saga(park=True)], owner="bench")
    async with orch:
        for i in range(cfg["parked"]):
            await orch.start("order", {"order_id": i}, saga_id=f"parked-{i}")
        while (
            len([s for s in await orch.list(limit=1000) if s.current_step_index == 1])
            < (cfg["parked"])
        ):
            await asyncio.sleep(0.01)
        print("parked", flush=True)
        await asyncio.Event().wait()


async def recover(cfg: dict[str, Any]) -> dict[str, Any]:
    from seamwork.saga import SagaOrchestrator, SagaRun
    from seamwork.storage import PostgresStore

    orch = SagaOrchestrator(PostgresStore(cfg["dsn"]), [_saga()], owner="bench")
    t0 = time.perf_counter()
    await orch.open()
    try:
        ids = [f"parked-{i}" for i in range(cfg["parked"])]
        states = await asyncio.gather(*(SagaRun(orch, s).wait(poll=0.001) for s in ids))
        elapsed = time.perf_counter() - t0
    finally:
        await orch.aclose()
    return {"recovery_s": elapsed, "done": sum(s.status.value == "completed" for s in states)}


async def listing(cfg: dict[str, Any]) -> dict[str, Any]:
    import psycopg

    from seamwork.saga import SagaStatus
    from seamwork.storage import PostgresStore

    store = PostgresStore(cfg["dsn"])
    await store.open()
    try:
        async with await psycopg.AsyncConnection.connect(cfg["dsn"], autocommit=True) as conn:
            await conn.execute(
                "INSERT INTO seamwork_sagas SELECT 'bulk-' || i, 'order', 1, CASE "
                "WHEN i %% 1000 = 0 THEN 'stuck' WHEN i %% 5 = 0 THEN 'failed' "
                "ELSE 'completed' END, 4, '[]', '[]', '[]', '[]', '{}', i, i, NULL, NULL, "
                "'{}', '{}', NULL, NULL FROM generate_series(1, %s) AS i",
                (cfg["rows"],),
            )
            await conn.execute("ANALYZE seamwork_sagas")
        timings = {}
        for status in ("stuck", "failed", "completed"):
            lat = []
            for _ in range(20):
                t0 = time.perf_counter()
                rows = await store.list(status=SagaStatus(status), limit=50)
                lat.append(time.perf_counter() - t0)
            assert len(rows) == 50
            timings[status] = p50(lat) * 1e3
    finally:
        await store.aclose()
    return {"list_ms": max(timings.values()), "by_status": timings}


class Declined(Exception):
    """DBOS's definite failure (module level: DBOS pickles step errors)."""


async def dbos(cfg: dict[str, Any]) -> dict[str, Any]:
    import logging

    from dbos import DBOS

    url = f"postgresql://postgres@127.0.0.1:{cfg['port']}/{cfg['dbname']}"
    DBOS(config={"name": "saga-bench-pg", "system_database_url": url, "log_level": "WARNING"})
    logging.getLogger("dbos").setLevel(logging.WARNING)

    @DBOS.step()
    async def step(order_id: int) -> dict[str, Any]:
        return {"ok": order_id}

    @DBOS.workflow()
    async def order(order_id: int) -> str:
        for _ in range(4):
            await step(order_id)
        return "completed"

    DBOS.launch()
    try:
        for i in range(cfg["warmup"]):
            await order(i)
        lat = []
        for i in range(cfg["dbos_sagas"]):
            t0 = time.perf_counter()
            await order(i)
            lat.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        await _closed_loop(cfg["dbos_sagas"], cfg["in_flight"], order)
        rate = cfg["dbos_sagas"] / (time.perf_counter() - t0)
    finally:
        DBOS.destroy()
    return {"seq_p50_ms": p50(lat) * 1e3, "rate": rate}


WORKERS: dict[str, Any] = {
    "floor": floor,
    "seamwork": seamwork,
    "share": share,
    "park": park,
    "recover": recover,
    "listing": listing,
    "dbos": dbos,
}


def worker_main(name: str, cfg: dict[str, Any], out: str | None) -> None:
    fn = WORKERS[name]
    result = asyncio.run(fn(cfg)) if asyncio.iscoroutinefunction(fn) else fn(cfg)
    if out:
        Path(out).write_text(json.dumps(result))


# --- the driver -------------------------------------------------------------------------


class Databases:
    """Fresh databases on the server of ``admin``, dropped at the end."""

    def __init__(self, admin: str) -> None:
        self.admin = admin
        self.names: list[str] = []

    def new(self) -> str:
        import psycopg

        name = f"saga_bench_{uuid.uuid4().hex[:10]}"
        with psycopg.connect(self.admin, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"'.encode())
        self.names.append(name)
        return name

    def drop(self) -> None:
        import psycopg

        with psycopg.connect(self.admin, autocommit=True) as conn:
            for name in self.names:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'.encode())


def spawn(name: str, cfg: dict[str, Any], out: Path | None) -> subprocess.Popen[str]:
    cmd = [sys.executable, str(HERE), "--worker", name, "--config", json.dumps(cfg)]
    if out is not None:
        cmd += ["--out", str(out)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)


def run(name: str, cfg: dict[str, Any]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="saga-pg-bench-") as tmp:
        out = Path(tmp) / "out.json"
        proc = spawn(name, cfg, out)
        proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"{name} worker failed ({proc.returncode})")
        result: dict[str, Any] = json.loads(out.read_text())
        return result


def workers_together(dbs: Databases, cfg: dict[str, Any], count: int) -> float:
    """Sagas/s of ``count`` worker processes on one database, each running its share."""
    dsn = with_db(cfg["admin"], dbs.new())
    run("share", {**cfg, "dsn": dsn, "name": "init", "count": 1, "go_at": 0})  # migrations
    total = cfg["concurrent"]
    go_at = time.time() + 3.0  # every interpreter up before the start line
    with tempfile.TemporaryDirectory(prefix="saga-pg-share-") as tmp:
        procs, outs = [], []
        for k in range(count):
            out = Path(tmp) / f"{k}.json"
            sub = {**cfg, "dsn": dsn, "name": f"w{k}", "count": total // count, "go_at": go_at}
            procs.append(spawn("share", sub, out))
            outs.append(out)
        for proc in procs:
            proc.communicate()
        spans = [json.loads(out.read_text()) for out in outs]
    wall = float(max(s["end"] for s in spans) - min(s["start"] for s in spans))
    return float(total // count * count) / wall


def recovery(dbs: Databases, cfg: dict[str, Any]) -> dict[str, Any]:
    dsn = with_db(cfg["admin"], dbs.new())
    sub = {**cfg, "dsn": dsn}
    proc = spawn("park", sub, None)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        if line != "parked":
            raise RuntimeError(f"parking process said {line!r}")
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    result = run("recover", sub)
    if result["done"] != cfg["parked"]:
        raise RuntimeError(f"only {result['done']} of {cfg['parked']} parked sagas completed")
    return result


def measure(admin: str, cfg: dict[str, Any], have_dbos: bool) -> dict[str, Any]:
    dbs = Databases(admin)
    cfg = {**cfg, "admin": admin}
    port = next((p.split("=")[1] for p in admin.split() if p.startswith("port=")), "5432")
    try:
        res: dict[str, Any] = {}
        res["floor"] = run("floor", {**cfg, "dsn": with_db(admin, dbs.new())})
        res["seamwork"] = run("seamwork", {**cfg, "dsn": with_db(admin, dbs.new())})
        if have_dbos:
            res["dbos"] = run("dbos", {**cfg, "dbname": dbs.new(), "port": port})
        res["one_worker"] = workers_together(dbs, cfg, 1)
        res["three_workers"] = workers_together(dbs, cfg, 3)
        res["recovery"] = recovery(dbs, cfg)
        res["listing"] = run("listing", {**cfg, "dsn": with_db(admin, dbs.new()), "rows": 100_000})
        return res
    finally:
        dbs.drop()


def _cell(values: list[float], fmt: str, *, high: bool = False) -> str:
    """The best value, the worst in parentheses (best = highest when ``high``)."""
    if not values:
        return "-"
    best, worst = (max(values), min(values)) if high else (min(values), max(values))
    if len(values) == 1:
        return format(best, fmt)
    return f"{format(best, fmt)} ({format(worst, fmt)})"


def table(runs: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Cells: best of the runs, the worst in parentheses."""

    def got(*path: str) -> list[float]:
        out = []
        for r in runs:
            value: Any = r
            for key in path:
                value = value.get(key) if isinstance(value, dict) else None
            if value is not None:
                out.append(float(value))
        return out

    seq, floor_seq = got("seamwork", "seq_p50_ms"), got("floor", "seq_p50_ms")
    ratios = [s / f for s, f in zip(seq, floor_seq, strict=True)]
    rates, one, three = got("seamwork", "rate"), got("one_worker"), got("three_workers")
    rec, lst = got("recovery", "recovery_s"), got("listing", "list_ms")
    speedup = [t / o for t, o in zip(three, one, strict=True)]

    header = ["PostgreSQL", "seamwork", "DBOS", "psycopg floor", "target", "met"]
    rows = [
        ["sequential p50 (ms/saga)", _cell(sorted(seq), ".2f"),
         _cell(sorted(got("dbos", "seq_p50_ms")), ".2f"), _cell(sorted(floor_seq), ".2f"),
         "", ""],
        ["  ratio to floor (same run)", _cell(ratios, ".2f"), "", "1.00",
         f"<= {TARGETS['seq_ratio']}", _met(statistics.median(ratios) <= TARGETS["seq_ratio"])],
        ["  ratio, best to best", f"{min(seq) / min(floor_seq):.2f}", "", "", "", ""],
        ["32 in flight (sagas/s)", _cell(rates, ".0f", high=True),
         _cell(got("dbos", "rate"), ".0f", high=True), "", f">= {TARGETS['rate']:.0f}",
         _met(max(rates) >= TARGETS["rate"])],
        ["1 worker process (sagas/s)", _cell(one, ".0f", high=True), "", "", "", ""],
        ["3 worker processes (sagas/s)", _cell(three, ".0f", high=True), "", "",
         "> 1 worker", _met(max(speedup) > 1.0)],
        ["recover 100 parked (s)", _cell(sorted(rec), ".3f"), "", "",
         f"<= {TARGETS['recovery_s']}", _met(min(rec) <= TARGETS["recovery_s"])],
        ["list by status, 100k rows (ms)", _cell(sorted(lst), ".2f"), "", "",
         f"<= {TARGETS['list_ms']:.0f}", _met(min(lst) <= TARGETS["list_ms"])],
    ]  # fmt: skip
    return header, rows


def _met(ok: bool) -> str:
    return "yes" if ok else "MISSED"


if __name__ == "__main__":
    args = sys.argv[1:]
    worker_main(args[1], json.loads(args[3]), args[5] if len(args) > 5 else None)
