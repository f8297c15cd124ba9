"""Event store benchmark: seamwork vs ``eventsourcing`` vs the raw-INSERT floor, one table.

Every contender stores the same rows (one small JSON event per append unless the
row says otherwise) in the same run, on the same machine:

* seamwork: ``EventStore.sqlite`` (WAL, ``synchronous=FULL``, its default) and
  ``EventStore.postgres`` (gap-safe ``$all``: positions by transaction id);
* ``eventsourcing`` 9.x (PyPI ``eventsourcing``, ``pip install 'seamwork[bench]'``):
  its application recorder (the one with a notification log, i.e. a ``$all``) on
  SQLite (WAL, the driver's default ``synchronous=FULL``) and PostgreSQL, given
  stored events (JSON-encoded in the loop, as seamwork encodes ``NewEvent`` data);
  it has no asyncio API, so concurrent writers are threads;
* the floor: plain ``sqlite3`` / ``psycopg`` inserting the same rows into a table
  with the same indexes, one commit per append (on PostgreSQL one autocommit
  multi-row INSERT), no version check at all. SQLite serializes writers, so the
  floor of the 64-appender row is the sequential one; on PostgreSQL the 4-writer
  floor is 4 threads with a connection each.

Targets (issue 4) are printed next to seamwork's figure. A database (PostgreSQL) and
a temporary directory (SQLite) unique to the run are created and dropped.

Usage::

    python benchmarks/eventstore.py [--quick] [--no-postgres] [--no-peers]
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import math
import os
import sqlite3
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from seamwork._core import runtime
from seamwork.events import (
    EventStore,
    NewEvent,
    Projection,
    ProjectionRunner,
    RecordedEvent,
    Snapshots,
    handles,
)
from seamwork.storage import SQLiteReadModel

PG_ADMIN = "host=127.0.0.1 port=5432 user=postgres dbname=postgres"
DATA = {"order_id": "order-0000", "amount": 4200, "currency": "EUR", "items": ["sku-1", "sku-2"]}
DATA_TEXT = json.dumps(DATA, separators=(",", ":"))
MISSING = "n/a"


@dataclass
class Row:
    name: str
    unit: str
    seamwork: float | None = None
    peer: float | None = None
    floor: float | None = None
    target: float | None = None
    higher_is_better: bool = True

    def met(self) -> str:
        if self.target is None or self.seamwork is None:
            return ""
        ok = self.seamwork >= self.target if self.higher_is_better else self.seamwork <= self.target
        return "yes" if ok else "NO"


def fmt(value: float | None, unit: str) -> str:
    if value is None:
        return MISSING
    if unit == "ev/s":
        return f"{value:,.0f}"
    return f"{value:.2f}"


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(1, math.ceil(q / 100 * len(ordered))) - 1]


def event() -> NewEvent:
    return NewEvent("OrderPlaced", DATA)


# --- seamwork ------------------------------------------------------------------------


async def sequential(store: EventStore, n: int, per_append: int = 1) -> float:
    appends = n // per_append
    started = time.perf_counter()
    for i in range(appends):
        await store.append(f"seq-{i % 100}", [event() for _ in range(per_append)])
    return appends * per_append / (time.perf_counter() - started)


async def concurrent(store: EventStore, n: int, writers: int, streams: int = 1000) -> float:
    per_writer = n // writers

    async def writer(w: int) -> None:
        for i in range(per_writer):
            await store.append(f"conc-{(w * per_writer + i) % streams}", [event()])

    started = time.perf_counter()
    await asyncio.gather(*(writer(w) for w in range(writers)))
    return per_writer * writers / (time.perf_counter() - started)


async def separate_writers(make: Callable[[], EventStore], n: int, writers: int) -> float:
    stores = [make() for _ in range(writers)]
    for store in stores:
        await store.open()
    per_writer = n // writers

    async def writer(w: int, store: EventStore) -> None:
        for i in range(per_writer):
            await store.append(f"w{w}-{i % 100}", [event()])

    try:
        started = time.perf_counter()
        await asyncio.gather(*(writer(w, s) for w, s in enumerate(stores)))
        return per_writer * writers / (time.perf_counter() - started)
    finally:
        for store in stores:
            await store.aclose()


async def fill(store: EventStore, n: int, per_append: int = 100) -> None:
    pending = []
    for i in range(n // per_append):
        pending.append(store.append(f"fill-{i % 50}", [event() for _ in range(per_append)]))
        if len(pending) >= 32:
            await asyncio.gather(*pending)
            pending = []
    await asyncio.gather(*pending)


async def read_all_rate(store: EventStore, n: int) -> float:
    started = time.perf_counter()
    position, seen = 0, 0
    while True:
        page = await store.read_all(from_position=position, limit=1000)
        if not page:
            break
        seen += len(page)
        position = page[-1].position
    elapsed = time.perf_counter() - started
    assert seen >= n, (seen, n)
    return seen / elapsed


def evolve(state: dict[str, int], e: RecordedEvent) -> dict[str, int]:
    return {"count": state["count"] + 1, "amount": state["amount"] + e.data["amount"]}


async def load_times(store: EventStore) -> tuple[float, float]:
    """ms to load a 5,001-event stream without, then with, a snapshot (best of 5)."""
    for start in range(0, 5001, 500):
        count = min(500, 5001 - start)
        await store.append("big", [event() for _ in range(count)])
    initial = {"count": 0, "amount": 0}
    snaps: Snapshots[dict[str, int]] = Snapshots("totals", every=100)
    without, with_ = [], []
    for _ in range(5):
        t = time.perf_counter()
        state = await store.load("big", evolve, initial)
        without.append(time.perf_counter() - t)
        assert state["count"] == 5001
    await store.load("big", evolve, initial, snapshots=snaps)  # writes the snapshot
    for _ in range(20):
        t = time.perf_counter()
        state = await store.load("big", evolve, initial, snapshots=snaps)
        with_.append(time.perf_counter() - t)
        assert state["count"] == 5001
    return min(without) * 1e3, min(with_) * 1e3


class Ledger(Projection):
    name = "ledger"

    def setup(self, conn: sqlite3.Connection) -> None:
        conn.execute(
            "CREATE TABLE IF NOT EXISTS ledger (position INTEGER PRIMARY KEY, id TEXT, amount INT)"
        )

    @handles("OrderPlaced")
    def placed(self, e: RecordedEvent, conn: sqlite3.Connection) -> None:
        conn.execute("INSERT INTO ledger VALUES (?, ?, ?)", (e.position, e.id, e.data["amount"]))


async def catch_up_rate(store: EventStore, tmp: Path, n: int) -> float:
    model = SQLiteReadModel(tmp / f"read-{uuid.uuid4().hex[:6]}.db")
    await model.open()
    try:
        runner = ProjectionRunner(store, Ledger(), model)
        started = time.perf_counter()
        await runner.catch_up()
        elapsed = time.perf_counter() - started
        rows = await model.query("SELECT count(*) AS n FROM ledger")
        return int(rows[0]["n"]) / elapsed
    finally:
        await model.aclose()


async def live_lag_p99(store: EventStore, rate: int = 1000, seconds: float = 3.0) -> float:
    """p99 ms from the moment an append is issued to its delivery by ``subscribe``."""
    tail = await store.read_all(from_position=0, limit=1)
    start_at = 0
    if tail:
        # subscribe from the current end: skip the history quickly
        position = 0
        while page := await store.read_all(from_position=position, limit=5000):
            position = page[-1].position
        start_at = position
    total = int(rate * seconds)
    lags: list[float] = []
    done = asyncio.Event()

    async def consume() -> None:
        async for e in store.subscribe(from_position=start_at):
            if e.type == "Tick":
                lags.append(time.time() - e.data["t"])
                if len(lags) >= total:
                    done.set()
                    return

    consumer = asyncio.create_task(consume())
    await asyncio.sleep(0.1)
    appends: list[asyncio.Task[Any]] = []
    started = time.perf_counter()
    for i in range(total):
        due = started + i / rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        appends.append(
            asyncio.create_task(
                store.append(f"tick-{i % 10}", [NewEvent("Tick", {"t": time.time()})])
            )
        )
    await asyncio.gather(*appends)
    try:
        await asyncio.wait_for(done.wait(), 10)
    finally:
        consumer.cancel()
        await asyncio.gather(consumer, return_exceptions=True)
    return percentile(lags, 99) * 1e3


# --- the raw floor -------------------------------------------------------------------

FLOOR_SCHEMA = (
    "CREATE TABLE events (position INTEGER PRIMARY KEY, stream TEXT NOT NULL, "
    "version INTEGER NOT NULL, id TEXT NOT NULL, type TEXT NOT NULL, data TEXT NOT NULL, "
    "recorded_at REAL NOT NULL)",
    "CREATE UNIQUE INDEX events_sv ON events(stream, version)",
    "CREATE UNIQUE INDEX events_id ON events(id)",
)


def floor_sqlite(path: Path, n: int, per_append: int = 1) -> float:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    for statement in FLOOR_SCHEMA:
        conn.execute(statement)
    versions: dict[str, int] = {}
    started = time.perf_counter()
    for i in range(n // per_append):
        stream = f"seq-{i % 100}"
        v = versions.get(stream, -1)
        rows = [
            (stream, v + 1 + k, str(uuid.uuid4()), "OrderPlaced", DATA_TEXT, time.time())
            for k in range(per_append)
        ]
        versions[stream] = v + per_append
        conn.execute("BEGIN")
        conn.executemany(
            "INSERT INTO events (stream, version, id, type, data, recorded_at) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            rows,
        )
        conn.execute("COMMIT")
    rate = (n // per_append) * per_append / (time.perf_counter() - started)
    conn.close()
    return rate


def floor_sqlite_read(path: Path) -> float:
    conn = sqlite3.connect(path)
    started = time.perf_counter()
    rows = conn.execute("SELECT position, stream, version, id, type, data FROM events").fetchall()
    decoded = [(r[0], r[1], r[2], r[3], r[4], json.loads(r[5])) for r in rows]
    rate = len(decoded) / (time.perf_counter() - started)
    conn.close()
    return rate


def floor_pg(dsn: str, n: int, per_append: int = 1, writers: int = 1) -> float:
    """One autocommit multi-row INSERT per append (one round trip, one commit each),
    from ``writers`` threads with a connection each."""
    import psycopg

    table = f"floor_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            f"CREATE TABLE {table} (position bigserial PRIMARY KEY, stream text NOT NULL, "
            "version bigint NOT NULL, id text NOT NULL UNIQUE, type text NOT NULL, "
            "data jsonb NOT NULL, recorded_at double precision NOT NULL, "
            "UNIQUE (stream, version))".encode()
        )
    values = ", ".join(["(%s, %s, %s, %s, %s, %s)"] * per_append)
    sql = (
        f"INSERT INTO {table} (stream, version, id, type, data, recorded_at) VALUES {values}"
    ).encode()
    appends = n // per_append // writers

    def work(w: int) -> None:
        versions: dict[str, int] = {}
        with psycopg.connect(dsn, autocommit=True) as conn:
            for i in range(appends):
                stream = f"w{w}-{i % 100}"
                v = versions.get(stream, -1)
                params: list[Any] = []
                for k in range(per_append):
                    params += [stream, v + 1 + k, str(uuid.uuid4()), "OrderPlaced", DATA_TEXT]
                    params.append(time.time())
                versions[stream] = v + per_append
                conn.execute(sql, params)

    threads = [threading.Thread(target=work, args=(w,)) for w in range(writers)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    rate = appends * per_append * writers / (time.perf_counter() - started)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"DROP TABLE {table}".encode())
    return rate


# --- eventsourcing -------------------------------------------------------------------


def es_available() -> bool:
    return importlib.util.find_spec("eventsourcing") is not None


def es_recorder(env: dict[str, str]) -> Any:
    from eventsourcing.persistence import InfrastructureFactory

    return InfrastructureFactory.construct(env=env).application_recorder()


def es_events(stream: uuid.UUID, first: int, count: int) -> list[Any]:
    from eventsourcing.persistence import StoredEvent

    return [
        StoredEvent(stream, first + k, "bench:OrderPlaced", json.dumps(DATA).encode())
        for k in range(count)
    ]


def es_write(recorder: Any, n: int, per_append: int = 1, writers: int = 1) -> float:
    per_writer = n // writers // per_append

    def work(w: int) -> None:
        streams = [uuid.uuid4() for _ in range(100)]
        versions = [0] * 100
        for i in range(per_writer):
            k = i % 100
            recorder.insert_events(es_events(streams[k], versions[k] + 1, per_append))
            versions[k] += per_append

    threads = [threading.Thread(target=work, args=(w,)) for w in range(writers)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return per_writer * per_append * writers / (time.perf_counter() - started)


def es_read(recorder: Any) -> float:
    started = time.perf_counter()
    seen, start = 0, 1
    while True:
        page = recorder.select_notifications(start=start, limit=1000)
        if not page:
            break
        for notification in page:
            json.loads(notification.state)
        seen += len(page)
        start = page[-1].id + 1
    return seen / (time.perf_counter() - started)


def es_load_ms(recorder: Any) -> float:
    stream = uuid.uuid4()
    for start in range(0, 5001, 500):
        recorder.insert_events(es_events(stream, start + 1, min(500, 5001 - start)))
    best = math.inf
    for _ in range(5):
        t = time.perf_counter()
        state = {"count": 0, "amount": 0}
        for stored in recorder.select_events(stream):
            data = json.loads(stored.state)
            state = {"count": state["count"] + 1, "amount": state["amount"] + data["amount"]}
        best = min(best, time.perf_counter() - t)
        assert state["count"] == 5001
    return best * 1e3


# --- the run -------------------------------------------------------------------------


async def run_sqlite(tmp: Path, rows: dict[str, Row], n: int, peers: bool) -> None:
    def path(tag: str) -> Path:
        return tmp / f"{tag}-{uuid.uuid4().hex[:8]}.db"

    async with EventStore.sqlite(path("seq")) as store:
        rows["sq_seq"].seamwork = await sequential(store, n)
    rows["sq_seq"].floor = rows["sq_conc"].floor = floor_sqlite(path("floor"), n)
    async with EventStore.sqlite(path("conc")) as store:
        rows["sq_conc"].seamwork = await concurrent(store, n * 10, 64)
    async with EventStore.sqlite(path("b100")) as store:
        rows["sq_b100"].seamwork = await sequential(store, n * 20, per_append=100)
    rows["sq_b100"].floor = floor_sqlite(path("floor100"), n * 20, per_append=100)
    floor_read = path("floor-read")
    floor_sqlite(floor_read, n * 10, per_append=100)
    async with EventStore.sqlite(path("read")) as store:
        await fill(store, n * 20)
        rows["sq_read"].seamwork = max([await read_all_rate(store, n * 20) for _ in range(3)])
        rows["sq_read"].floor = floor_sqlite_read(floor_read)
        rows["sq_catchup"].seamwork = await catch_up_rate(store, tmp, n * 20)
        rows["sq_load"].seamwork, rows["sq_snap"].seamwork = await load_times(store)
        rows["sq_lag"].seamwork = await live_lag_p99(store)
    if peers and es_available():
        env = {"PERSISTENCE_MODULE": "eventsourcing.sqlite", "SQLITE_DBNAME": str(path("es"))}
        recorder = es_recorder(env)
        rows["sq_seq"].peer = es_write(recorder, n)
        rows["sq_conc"].peer = es_write(recorder, n * 2, writers=64)
        rows["sq_b100"].peer = es_write(recorder, n * 20, per_append=100)
        rows["sq_read"].peer = es_read(recorder)
        rows["sq_load"].peer = es_load_ms(recorder)


async def run_postgres(rows: dict[str, Row], n: int, peers: bool) -> None:
    import psycopg

    name = f"seamwork_bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"'.encode())
    base = PG_ADMIN.replace("dbname=postgres", f"dbname={name}")
    try:
        with psycopg.connect(base, autocommit=True) as conn:
            for schema in ("seq", "w4", "b100", "live", "es"):
                conn.execute(f"CREATE SCHEMA {schema}".encode())

        def dsn(schema: str) -> str:
            return f"{base} options='-c search_path={schema}'"

        async with EventStore.postgres(dsn("seq")) as store:
            rows["pg_seq"].seamwork = await sequential(store, n)
        rows["pg_seq"].floor = floor_pg(base, n)
        rows["pg_w4"].seamwork = await separate_writers(
            lambda: EventStore.postgres(dsn("w4")), n * 2, 4
        )
        rows["pg_w4"].floor = floor_pg(base, n * 2, writers=4)
        async with EventStore.postgres(dsn("b100")) as store:
            rows["pg_b100"].seamwork = await sequential(store, n * 20, per_append=100)
        rows["pg_b100"].floor = floor_pg(base, n * 20, per_append=100)
        async with EventStore.postgres(dsn("live")) as store:
            rows["pg_lag"].seamwork = await live_lag_p99(store)
        if peers and es_available():
            env = {
                "PERSISTENCE_MODULE": "eventsourcing.postgres",
                "POSTGRES_DBNAME": name,
                "POSTGRES_HOST": "127.0.0.1",
                "POSTGRES_PORT": "5432",
                "POSTGRES_USER": "postgres",
                "POSTGRES_PASSWORD": "",
                "POSTGRES_SCHEMA": "es",
            }
            recorder = es_recorder(env)
            rows["pg_seq"].peer = es_write(recorder, n)
            rows["pg_w4"].peer = es_write(recorder, n, writers=4)
            rows["pg_b100"].peer = es_write(recorder, n * 20, per_append=100)
            recorder.datastore.close()
    finally:
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'.encode())


def make_rows() -> dict[str, Row]:
    return {
        "sq_seq": Row("SQLite FULL, 1 sequential writer", "ev/s", target=4000),
        "sq_conc": Row("SQLite FULL, 64 concurrent appenders", "ev/s", target=50000),
        "sq_b100": Row("SQLite FULL, 100-event appends", "ev/s"),
        "sq_read": Row("SQLite $all decoded read", "ev/s", target=250000),
        "sq_load": Row(
            "load 5,001-event stream, no snapshot", "ms", target=50, higher_is_better=False
        ),
        "sq_snap": Row("load 5,001-event stream, snapshot", "ms", target=1, higher_is_better=False),
        "sq_catchup": Row("projection catch-up into SQLite", "ev/s", target=50000),
        "sq_lag": Row("SQLite live lag p99 @1,000 ev/s", "ms", target=20, higher_is_better=False),
        "pg_seq": Row("PostgreSQL, 1 client", "ev/s", target=3000),
        "pg_w4": Row("PostgreSQL, 4 writers, gap-safe $all", "ev/s", target=3000),
        "pg_b100": Row("PostgreSQL, 100-event appends", "ev/s", target=50000),
        "pg_lag": Row(
            "PostgreSQL live lag p99 @1,000 ev/s", "ms", target=20, higher_is_better=False
        ),
    }


def print_table(rows: dict[str, Row], spread: dict[str, list[float]]) -> None:
    header = (
        f"{'measurement':<40} {'unit':>5} {'seamwork':>10} {'spread':>15} "
        f"{'eventsourcing':>13} {'raw floor':>10} {'target':>8} {'met':>4}"
    )
    print(header)
    print("-" * len(header))
    for key, row in rows.items():
        values = spread.get(key, [])
        low_high = (
            f"{fmt(min(values), row.unit)}-{fmt(max(values), row.unit)}" if len(values) > 1 else ""
        )
        target = "" if row.target is None else fmt(row.target, row.unit)
        print(
            f"{row.name:<40} {row.unit:>5} {fmt(row.seamwork, row.unit):>10} {low_high:>15} "
            f"{fmt(row.peer, row.unit):>13} {fmt(row.floor, row.unit):>10} {target:>8} "
            f"{row.met():>4}"
        )


def best(values: list[float], higher_is_better: bool) -> float:
    return max(values) if higher_is_better else min(values)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller runs")
    parser.add_argument("--repeat", type=int, default=1, help="runs; best-of is reported")
    parser.add_argument("--no-postgres", action="store_true")
    parser.add_argument("--no-peers", action="store_true")
    parser.add_argument("--cpu", type=int, help="keep the run (all its threads) on this CPU")
    args = parser.parse_args()
    if args.cpu is not None:  # before any store starts its threads: they inherit it
        os.sched_setaffinity(0, {args.cpu})
    n = 1000 if args.quick else 3000
    spread: dict[str, list[float]] = {}
    final = make_rows()
    for attempt in range(args.repeat):
        rows = make_rows()
        peers = not args.no_peers and attempt == 0
        with tempfile.TemporaryDirectory(prefix="seamwork-bench-") as tmp:
            await run_sqlite(Path(tmp), rows, n, peers)
        if not args.no_postgres:
            await run_postgres(rows, n, peers)
        for key, row in rows.items():
            if row.seamwork is not None:
                spread.setdefault(key, []).append(row.seamwork)
            for attr in ("peer", "floor"):
                if getattr(row, attr) is not None and getattr(final[key], attr) is None:
                    setattr(final[key], attr, getattr(row, attr))
    for key, row in final.items():
        if spread.get(key):
            row.seamwork = best(spread[key], row.higher_is_better)
    where = "all CPUs" if args.cpu is None else f"pinned to CPU {args.cpu}"
    print(
        f"python {sys.version.split()[0]}, seamwork on {runtime.loop_name()}, {where}, "
        f"best of {args.repeat} (spread: min-max)"
    )
    print_table(final, spread)
    if not es_available():
        print("eventsourcing not installed: pip install 'seamwork[bench]'")


if __name__ == "__main__":
    runtime.run(main())
