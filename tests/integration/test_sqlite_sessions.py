"""Interactive SQLite transactions (the outbox's and inbox's) at their edges: idle
roll-back, cancellation while queued, and a slow handler inside an inbox batch."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from seamwork.errors import StoreError
from seamwork.messaging import Delivery, Inbox, Message, Outbox, Transaction
from seamwork.storage._sqlite_session import session
from seamwork.storage._sqlite_writer import SQLiteWriter


async def test_a_statement_after_the_idle_roll_back_fails_instead_of_hanging(
    tmp_path: Path,
) -> None:
    writer = SQLiteWriter(tmp_path / "w.db")
    await writer.start()

    async def idle_then_execute() -> None:
        async with session(writer, idle_timeout=0.2) as open_session:
            await asyncio.sleep(0.5)  # the writer gives the session up meanwhile
            await asyncio.wait_for(open_session.execute("SELECT 1"), 3)

    try:
        started = time.monotonic()
        with pytest.raises(StoreError, match="idle"):
            await idle_then_execute()
        assert time.monotonic() - started < 1.5  # the statement failed at once
    finally:
        await writer.close()


async def test_a_session_cancelled_while_queued_does_not_park_the_writer(
    tmp_path: Path,
) -> None:
    writer = SQLiteWriter(tmp_path / "w.db")
    await writer.start()
    holding, release = asyncio.Event(), asyncio.Event()

    async def holder() -> None:
        async with session(writer, idle_timeout=3.0):
            holding.set()
            await release.wait()

    async def queued() -> None:
        async with session(writer, idle_timeout=3.0):
            pass

    try:
        held = asyncio.create_task(holder())
        await holding.wait()
        waiter = asyncio.create_task(queued())
        await asyncio.sleep(0.05)
        waiter.cancel()  # a consumer stopped, a handler timed out...
        await asyncio.gather(waiter, return_exceptions=True)
        release.set()
        await held
        started = time.monotonic()
        await writer.write(lambda conn: conn.execute("CREATE TABLE IF NOT EXISTS t (x)"))
        assert time.monotonic() - started < 1.0
    finally:
        await writer.close()


async def test_a_batch_handler_slower_than_the_idle_timeout_leaks_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(session.__wrapped__.__kwdefaults__, "idle_timeout", 0.3)  # type: ignore[attr-defined]
    path = tmp_path / "svc.db"
    outbox = Outbox.sqlite(path)
    await outbox.open()
    async with outbox.transaction() as tx:
        await tx.execute("CREATE TABLE charges (order_id INTEGER)")

    async def on_order(message: Message, tx: Transaction) -> None:
        if message.data["slow"]:
            await asyncio.sleep(0.8)  # a slow call to a payment provider
        await tx.execute("INSERT INTO charges VALUES (?)", (message.data["n"],))

    async def other_work() -> None:  # another transaction opens once the writer is free
        await asyncio.sleep(0.4)
        async with outbox.transaction() as tx:
            for _ in range(8):
                await tx.execute("SELECT 1")
                await asyncio.sleep(0.1)

    handler = Inbox.of(outbox).handler(on_order)
    deliveries = [
        Delivery(Message("OrderCreated", {"n": n, "slow": n == 1}), "orders.created", "g")
        for n in (1, 2)
    ]
    other = asyncio.create_task(other_work())
    with pytest.raises(StoreError, match="idle"):
        await handler.batch(deliveries)  # the broker will redeliver both
    await other
    await outbox.aclose()
    with sqlite3.connect(path) as conn:
        charges = conn.execute("SELECT count(*) FROM charges").fetchone()[0]
        recorded = conn.execute("SELECT count(*) FROM seamwork_inbox").fetchone()[0]
    assert (charges, recorded) == (0, 0)  # nothing applied, so nothing applied twice later


async def test_a_statement_raising_stop_iteration_fails_and_the_session_goes_on(
    tmp_path: Path,
) -> None:
    writer = SQLiteWriter(tmp_path / "w.db")
    await writer.start()
    try:
        async with session(writer) as open_session:
            await open_session.execute("CREATE TABLE t (id INTEGER PRIMARY KEY)")
            with pytest.raises(RuntimeError, match="StopIteration"):
                await asyncio.wait_for(
                    open_session.run(lambda conn: next(conn.execute("SELECT id FROM t"))), 5
                )
            await open_session.execute("INSERT INTO t VALUES (1)")
        assert await writer.read(lambda conn: conn.execute("SELECT id FROM t").fetchall()) == [(1,)]
    finally:
        await writer.close()


async def test_run_here_after_the_session_ended_is_refused_and_applies_nothing(
    tmp_path: Path,
) -> None:
    writer = SQLiteWriter(tmp_path / "w.db")
    await writer.start()
    try:
        await writer.write(lambda conn: conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY)"))
        async with session(writer) as committed_session:
            committed_session.run_here(lambda conn: conn.execute("INSERT INTO t VALUES (1)"))
        with pytest.raises(StoreError, match="ended"):  # e.g. a task the handler left behind
            committed_session.run_here(lambda conn: conn.execute("INSERT INTO t VALUES (2)"))
        with pytest.raises(ValueError, match="the block failed"):
            async with session(writer) as aborted_session:
                raise ValueError("the block failed")
        with pytest.raises(StoreError, match="ended"):
            aborted_session.run_here(lambda conn: conn.execute("INSERT INTO t VALUES (3)"))
        assert await writer.read(lambda conn: conn.execute("SELECT id FROM t").fetchall()) == [(1,)]
    finally:
        await writer.close()


async def test_run_here_waits_for_a_statement_another_task_runs_on_the_writer(
    tmp_path: Path,
) -> None:
    writer = SQLiteWriter(tmp_path / "w.db")
    await writer.start()
    started, running = threading.Event(), threading.Event()
    overlaps: list[str] = []

    def slow(conn: sqlite3.Connection) -> None:
        running.set()
        started.set()
        time.sleep(0.2)  # another thread using conn now would share it
        conn.execute("INSERT INTO t VALUES (1)")
        running.clear()

    def quick(conn: sqlite3.Connection) -> None:
        if running.is_set():
            overlaps.append("run_here ran while the writer thread was using the connection")
        conn.execute("INSERT INTO t VALUES (2)")

    try:
        await writer.write(lambda conn: conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY)"))
        async with session(writer) as shared:
            on_writer = asyncio.create_task(shared.run(slow))
            await asyncio.to_thread(started.wait, 5)
            shared.run_here(quick)
            await on_writer
        assert overlaps == []
        rows = await writer.read(lambda conn: conn.execute("SELECT id FROM t").fetchall())
        assert rows == [(1,), (2,)]
    finally:
        await writer.close()
