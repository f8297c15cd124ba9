"""The SQLite writer on its own: a batch in which one call fails after writing, and
closing while another thread's event loop writes (every write either commits or is
refused - none is accepted and then left waiting)."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from seamwork.errors import StoreError
from seamwork.storage import _sqlite_writer
from seamwork.storage._sqlite_writer import Migration, SQLiteWriter


class SlowOp(_sqlite_writer._Op):
    """An op whose creation stalls once ``stall`` is set: the writing thread is
    preempted between being let in and handing its call over."""

    __slots__ = ()
    stall = threading.Event()
    stalled = threading.Event()

    def __init__(self, *args: Any) -> None:
        if SlowOp.stall.is_set() and threading.current_thread() is not threading.main_thread():
            SlowOp.stalled.set()
            time.sleep(0.3)
        super().__init__(*args)


def write_from_another_loop(writer: SQLiteWriter, outcomes: list[str]) -> None:
    async def go() -> None:
        for _ in range(2):  # one while open, one racing close()
            try:
                future = writer.write(lambda conn: conn.execute("SELECT 1").fetchone())
                await asyncio.wait_for(future, 2.0)
            except TimeoutError:
                outcomes.append("lost")
                return
            except StoreError:
                outcomes.append("refused")
                return
            outcomes.append("committed")
            SlowOp.stall.set()

    asyncio.run(go())


@pytest.mark.parametrize("coalesce", [False, True])
async def test_a_write_racing_close_from_another_thread_is_run_or_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, coalesce: bool
) -> None:
    monkeypatch.setattr(_sqlite_writer, "_Op", SlowOp)
    SlowOp.stall.clear()
    SlowOp.stalled.clear()
    writer = SQLiteWriter(tmp_path / "w.db", coalesce=coalesce)
    await writer.start()
    outcomes: list[str] = []
    thread = threading.Thread(target=write_from_another_loop, args=(writer, outcomes))
    thread.start()
    assert await asyncio.to_thread(SlowOp.stalled.wait, 5.0)
    await writer.close()  # while the other thread is between the door and the queue
    await asyncio.to_thread(thread.join, 10.0)
    assert outcomes == ["committed", "refused"]


async def test_a_call_failing_after_it_wrote_is_rolled_back_alone_in_a_rerun_batch(
    tmp_path: Path,
) -> None:
    table = Migration("t", 1, ("CREATE TABLE t (id INTEGER PRIMARY KEY)",))
    writer = SQLiteWriter(tmp_path / "w.db", migrations=[table], rerun_safe=True, coalesce=True)
    await writer.start()

    def insert(row: int, fail: bool = False) -> Any:
        def run(conn: Any) -> int:
            conn.execute("INSERT INTO t VALUES (?)", (row,))
            if fail:
                raise ValueError(f"call {row} failed after writing")
            return row

        return run

    try:
        commits = writer.commits
        # One loop iteration: the coalescing writer gets the three calls as one batch.
        calls = [
            writer.write(insert(1)),
            writer.write(insert(2, fail=True)),
            writer.write(insert(3)),
        ]
        outcomes = await asyncio.gather(*calls, return_exceptions=True)
        assert outcomes[0] == 1
        assert outcomes[2] == 3
        assert isinstance(outcomes[1], ValueError)
        assert writer.commits == commits + 1  # the plain try rolled back, the rerun committed
        rows = await writer.read(lambda conn: conn.execute("SELECT id FROM t").fetchall())
        assert rows == [(1,), (3,)]
    finally:
        await writer.close()


async def test_a_call_raising_stop_iteration_fails_instead_of_leaving_its_batch_waiting(
    tmp_path: Path,
) -> None:
    table = Migration("t", 1, ("CREATE TABLE t (id INTEGER PRIMARY KEY)",))
    writer = SQLiteWriter(tmp_path / "w.db", migrations=[table], coalesce=True)
    await writer.start()

    def first_row(conn: Any) -> Any:  # next() on an empty cursor raises StopIteration
        return next(conn.execute("SELECT id FROM t"))

    try:
        with pytest.raises(RuntimeError, match="StopIteration") as raised:
            await asyncio.wait_for(writer.write(first_row), 5)
        assert isinstance(raised.value.__cause__, StopIteration)
        failing = writer.write(first_row)  # coalesced: one batch with the insert
        insert = writer.write(lambda conn: conn.execute("INSERT INTO t VALUES (1)").rowcount)
        outcomes = await asyncio.wait_for(
            asyncio.gather(failing, insert, return_exceptions=True), 5
        )
        assert isinstance(outcomes[0], RuntimeError)
        assert outcomes[1] == 1
        assert await writer.read(lambda conn: conn.execute("SELECT id FROM t").fetchall()) == [(1,)]
    finally:
        await writer.close()


@pytest.mark.parametrize("hook", ["on_begin", "on_rollback"])
async def test_a_failing_hook_fails_its_batch_and_the_writer_serves_on(
    tmp_path: Path, hook: str
) -> None:
    table = Migration("t", 1, ("CREATE TABLE t (id INTEGER PRIMARY KEY)",))
    broken = threading.Event()

    def begin(conn: Any) -> None:
        if hook == "on_begin" and broken.is_set():
            raise ValueError("cache check broke")

    def rollback() -> None:
        if hook == "on_rollback" and broken.is_set():
            raise ValueError("cache reset broke")

    writer = SQLiteWriter(
        tmp_path / "w.db", migrations=[table], on_begin=begin, on_rollback=rollback
    )
    await writer.start()

    def insert(id_: int) -> Any:
        def run(conn: Any) -> int:
            conn.execute("INSERT INTO t VALUES (?)", (id_,))
            if hook == "on_rollback" and id_ == 1:
                raise KeyError("this call fails, so its transaction rolls back")
            return id_

        return run

    try:
        broken.set()
        with pytest.raises(StoreError, match="broke") as raised:
            await asyncio.wait_for(writer.write(insert(1)), 5)
        assert isinstance(raised.value.__cause__, ValueError)
        broken.clear()
        assert await asyncio.wait_for(writer.write(insert(2)), 5) == 2
        rows = await writer.read(lambda conn: conn.execute("SELECT id FROM t").fetchall())
        assert rows == [(2,)]
    finally:
        await asyncio.wait_for(writer.close(), 5)


async def test_a_start_cancelled_while_the_thread_opens_the_file_ends_and_leaves_no_thread(
    tmp_path: Path,
) -> None:
    table = Migration("t", 1, ("CREATE TABLE t (id INTEGER PRIMARY KEY)",))
    for step in range(31):  # cancels 0, 2, ... 60 ms into start(): before, during, after
        writer = SQLiteWriter(tmp_path / f"w{step}.db", migrations=[table], name=f"cut-{step}")
        start = asyncio.create_task(writer.start())
        await asyncio.sleep(step * 0.002)
        start.cancel()
        try:
            done, _ = await asyncio.wait({start}, timeout=5.0)
            assert done, f"start() cancelled after {step * 2} ms did not end within 5 s"
        finally:
            await writer.close()  # lets a hung start() go, so the failure shows
        if not start.cancelled():  # the cancel came after start() had finished
            assert start.exception() is None
        threads = [t.name for t in threading.enumerate() if t.name.startswith("seamwork-cut-")]
        assert threads == []
        assert not writer.running


async def test_a_second_close_returns_only_once_the_thread_has_stopped(tmp_path: Path) -> None:
    # the second of two concurrent closes found no thread and returned at once, while
    # the first still waited for queued work: a store's aclose() let go of its file
    # lock then, with its writer still writing
    writer = SQLiteWriter(tmp_path / "w.db")
    await writer.start()
    thread = writer._thread
    assert thread is not None
    slow = writer.write(lambda conn: time.sleep(0.3))
    first = asyncio.create_task(writer.close())
    await asyncio.sleep(0.05)  # the first close is waiting on the thread
    await writer.close()
    assert not thread.is_alive()
    await first
    await slow
