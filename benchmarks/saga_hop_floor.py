"""Where a saga's time goes on SQLite: the floor, the hop, the engine - side by side.

Three contenders run the same 4-step saga's SQL (an INSERT, then an UPDATE and two
timeline rows per transition, one durable commit each), interleaved in one process so
they share the disk and the CPU:

* ``sync floor``: a plain loop on one thread (what ``saga_throughput.py`` calls the
  storage floor);
* ``async floor``: the same SQL handed to seamwork's SQLite writer thread from asyncio,
  with no saga engine at all - the cost of keeping I/O off the event loop;
* ``seamwork``: the orchestrator running the saga.

Sequentially and with 32 sagas in flight. Run: ``python benchmarks/saga_hop_floor.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sqlite3
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from seamwork._core import runtime
from seamwork.saga import Saga, SagaOrchestrator, Step, StepContext
from seamwork.storage import SQLiteStore
from seamwork.storage._sqlite_writer import Migration, SQLiteWriter

SCHEMA = (
    "CREATE TABLE s (id TEXT PRIMARY KEY, status TEXT, idx INT, completed TEXT, "
    "context TEXT, updated REAL, lease TEXT)",
    "CREATE TABLE e (id INTEGER PRIMARY KEY, sid TEXT, at REAL, event TEXT, step TEXT)",
    "CREATE INDEX e_by_saga ON e (sid, id)",
)
INSERT = "INSERT INTO s VALUES (?, ?, ?, ?, ?, ?, ?)"
UPDATE = "UPDATE s SET status=?, idx=?, completed=?, context=?, updated=? WHERE id=? AND lease=?"
EVENT = "INSERT INTO e (sid, at, event, step) VALUES (?, ?, ?, ?)"


def begin(conn: sqlite3.Connection, sid: str, n: int) -> None:
    conn.execute(INSERT, (sid, "running", 0, "[]", json.dumps({"n": n}), time.time(), "me"))
    conn.executemany(EVENT, [(sid, 1.0, "saga_started", None), (sid, 1.0, "started", "a")])


def advance(conn: sqlite3.Connection, sid: str, n: int, k: int) -> None:
    done = json.dumps(["abcd"[i] for i in range(k + 1)])
    conn.execute(UPDATE, ("running", k + 1, done, json.dumps({"n": n}), time.time(), sid, "me"))
    conn.executemany(EVENT, [(sid, 1.0, "completed", "a"), (sid, 1.0, "started", "b")])


def sync_floor(conn: sqlite3.Connection, n: int) -> None:
    sid = f"sync-{n}"
    for step in (
        lambda c: begin(c, sid, n),
        *(lambda c, k=k: advance(c, sid, n, k) for k in range(4)),
    ):
        conn.execute("BEGIN IMMEDIATE")
        step(conn)
        conn.execute("COMMIT")


async def async_floor(writer: SQLiteWriter, n: int) -> None:
    sid = f"async-{n}"
    await writer.write(lambda c: begin(c, sid, n))
    for k in range(4):
        await writer.write(lambda c, k=k: advance(c, sid, n, k))


async def step(ctx: StepContext) -> None:
    return None


SAGA = Saga("order", steps=[Step(name, step, compensate=step, timeout=5) for name in "abcd"])


async def timed(one: Callable[[int], Awaitable[None]], count: int, start: int) -> list[float]:
    times = []
    for n in range(start, start + count):
        began = time.perf_counter()
        await one(n)
        times.append(time.perf_counter() - began)
    return times


async def in_flight(one: Callable[[int], Awaitable[None]], count: int, start: int) -> float:
    gate = asyncio.Semaphore(32)

    async def guarded(n: int) -> None:
        async with gate:
            await one(n)

    began = time.perf_counter()
    await asyncio.gather(*(guarded(n) for n in range(start, start + count)))
    return count / (time.perf_counter() - began)


def sync_rate(conn: sqlite3.Connection, count: int, start: int) -> float:
    """The single-threaded group-commit loop: 32 sagas advance one transition per commit."""
    began = time.perf_counter()
    for first in range(start, start + count, 32):
        sids = [(f"gc-{n}", n) for n in range(first, min(first + 32, start + count))]
        for phase in range(5):
            conn.execute("BEGIN IMMEDIATE")
            for sid, n in sids:
                if phase == 0:
                    begin(conn, sid, n)
                else:
                    advance(conn, sid, n, phase - 1)
            conn.execute("COMMIT")
    return count / (time.perf_counter() - began)


async def main(rounds: int, sequential: int, concurrent: int) -> None:
    directory = Path(tempfile.mkdtemp(prefix="seamwork-hop-"))
    conn = sqlite3.connect(directory / "sync.db", isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    for statement in SCHEMA:
        conn.execute(statement)
    writer = SQLiteWriter(
        directory / "async.db", migrations=(Migration("bench", 1, SCHEMA),), rerun_safe=True
    )
    await writer.start()
    latencies: dict[str, list[float]] = {"sync floor": [], "async floor": [], "seamwork": []}
    rates: dict[str, list[float]] = {"sync floor": [], "async floor": [], "seamwork": []}
    async with SagaOrchestrator(SQLiteStore(directory / "sagas.db"), [SAGA]) as orch:

        async def saga(n: int) -> None:
            await (await orch.start("order", {"n": n})).wait()

        async def floor_one(n: int) -> None:
            sync_floor(conn, n)

        contenders: dict[str, Callable[[int], Awaitable[None]]] = {
            "sync floor": floor_one,
            "async floor": lambda n: async_floor(writer, n),
            "seamwork": saga,
        }
        base = 0
        for _ in range(rounds):
            for name, one in contenders.items():
                latencies[name] += await timed(one, sequential, base)
                base += sequential
            rates["sync floor"].append(sync_rate(conn, concurrent, base))
            base += concurrent
            for name in ("async floor", "seamwork"):
                rates[name].append(await in_flight(contenders[name], concurrent, base))
                base += concurrent
    await writer.close()
    _print(latencies, rates)


def _print(latencies: dict[str, list[float]], rates: dict[str, list[float]]) -> None:
    floor = statistics.median(latencies["sync floor"])
    print("4-step saga on SQLite (WAL, synchronous=FULL), one process, interleaved rounds")
    print(f"{'contender':14} {'seq p50 ms':>11} {'x floor':>8} {'32 in flight/s':>15}")
    for name in latencies:
        p50 = statistics.median(latencies[name])
        rate = max(rates[name])
        print(f"{name:14} {p50 * 1e3:11.3f} {p50 / floor:7.2f}x {rate:15,.0f}")
    note = "sync floor's 32-in-flight figure is one thread group-committing 32 sagas per commit"
    print(f"({note})")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sequential", type=int, default=300)
    parser.add_argument("--concurrent", type=int, default=2000)
    parser.add_argument("--cpu", type=int, help="keep the process (all its threads) on this CPU")
    args = parser.parse_args()
    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})
    where = "all CPUs" if args.cpu is None else f"CPU {args.cpu}"
    print(f"(on {runtime.loop_name()}, {where})")
    runtime.run(main(args.rounds, args.sequential, args.concurrent))
