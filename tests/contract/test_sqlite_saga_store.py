"""The SagaStore contract on SQLite, plus what only the SQLite store promises."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import pytest

import seamwork as seamwork_src
from seamwork.errors import StoreLocked, StoreUnavailable
from seamwork.saga import SagaStore
from seamwork.storage import SQLiteStore
from seamwork.testing.saga_store import OWNER, SagaStoreContract, saga_state


class TestSQLiteSagaStore(SagaStoreContract):
    single_orchestrator = True

    async def make_store(self, tmp_path: Path) -> SagaStore:
        return SQLiteStore(tmp_path / "sagas.db")

    async def reopen(self, store: SagaStore, tmp_path: Path) -> SagaStore:
        return SQLiteStore(tmp_path / "sagas.db")

    async def corrupt(self, store: SagaStore, saga_id: str) -> None:
        assert isinstance(store, SQLiteStore)
        with sqlite3.connect(store.path) as conn:
            conn.execute(
                "UPDATE seamwork_sagas SET context = '{not json' WHERE saga_id = ?", (saga_id,)
            )


async def test_database_runs_in_wal_mode_with_full_sync(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "sagas.db")
    await store.open()
    try:
        mode, sync = await store._writer.read(
            lambda c: (
                c.execute("PRAGMA journal_mode").fetchone()[0],
                c.execute("PRAGMA synchronous").fetchone()[0],
            )
        )
    finally:
        await store.aclose()
    assert (mode, sync) == ("wal", 2)  # 2 = FULL


async def test_relaxed_durability_is_an_explicit_opt_in(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "sagas.db", synchronous="normal")
    await store.open()
    try:
        sync = await store._writer.read(lambda c: c.execute("PRAGMA synchronous").fetchone()[0])
    finally:
        await store.aclose()
    assert sync == 1  # NORMAL


async def test_a_second_orchestrator_on_the_same_file_is_refused(tmp_path: Path) -> None:
    first, second = SQLiteStore(tmp_path / "s.db"), SQLiteStore(tmp_path / "s.db")
    await first.open()
    await first.attach("one")
    await second.open()
    try:
        with pytest.raises(StoreLocked, match="another orchestrator"):
            await second.attach("two")
        await first.aclose()
        await second.attach("two")
    finally:
        await first.aclose()
        await second.aclose()


async def test_a_second_orchestrator_through_a_symlink_to_the_file_is_refused(
    tmp_path: Path,
) -> None:
    """The lock file was named after the path as given: an orchestrator opening the
    same database through a symbolic link locked '<link>.lock' and attached too, each
    freeing the other's leases and running its sagas."""
    (tmp_path / "link.db").symlink_to(tmp_path / "s.db")
    first, second = SQLiteStore(tmp_path / "s.db"), SQLiteStore(tmp_path / "link.db")
    await first.open()
    await first.attach("one")
    await second.open()
    try:
        with pytest.raises(StoreLocked, match="another orchestrator"):
            await second.attach("two")
    finally:
        await first.aclose()
        await second.aclose()


async def test_attaching_frees_the_leases_of_the_dead_previous_owner(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "s.db")
    await store.open()
    await store.create(saga_state("s1", lease_owner="dead", lease_expires_at=9e12), [])
    await store.aclose()
    again = SQLiteStore(tmp_path / "s.db")
    await again.open()
    await again.attach(OWNER)
    try:
        result = await again.claim(OWNER, [("order", 1)], now=1.0, lease_seconds=30, limit=10)
    finally:
        await again.aclose()
    assert [s.saga_id for s in result.claimed] == ["s1"]


async def test_concurrent_transitions_share_commits(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "s.db")
    await store.open()
    try:
        before = store.commits
        await asyncio.gather(*(store.create(saga_state(f"s{i}"), []) for i in range(300)))
        commits = store.commits - before
    finally:
        await store.aclose()
    assert 1 <= commits < 300


async def test_a_store_in_a_missing_directory_fails_with_the_path(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "missing" / "sagas.db")
    with pytest.raises(StoreUnavailable, match="missing"):
        await store.open()


async def test_a_store_path_that_is_a_directory_fails_clearly(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path)
    with pytest.raises(StoreUnavailable, match=str(tmp_path)):
        await store.open()


@pytest.mark.parametrize(
    ("sagas", "limit"),
    [
        (("g\x00", "bad", "h"), 2),  # the next page read g\x00 again: claimed twice
        (("bad\x00",), 1),  # read again on every page: the claim never ended
    ],
)
async def test_a_claim_reads_a_saga_whose_id_holds_nul_once_and_ends(
    tmp_path: Path, sagas: tuple[str, ...], limit: int
) -> None:
    """Each page of a claim reads past the ids read so far by a json_each list, which
    cuts a text at NUL: a saga with such an id (the store takes one) was read again,
    and the claim, holding the write lock, read on for as long as that gave it more."""
    store = SQLiteStore(tmp_path / "s.db")
    await store.open()
    try:
        for at, saga_id in enumerate(sagas, start=1):
            await store.create(saga_state(saga_id, lease_owner=None, updated_at=float(at)), [])
        with sqlite3.connect(store.path) as conn:
            conn.execute(
                "UPDATE seamwork_sagas SET context = '{not json' WHERE saga_id LIKE 'bad%'"
            )
        result = await asyncio.wait_for(
            store.claim(OWNER, [("order", 1)], now=1.0, lease_seconds=30.0, limit=limit), 5
        )
    finally:
        await store.aclose()
    read = [s.saga_id for s in result.claimed] + [e.saga_id for e in result.corrupt]
    assert sagas[0] in read
    assert len(read) == len(set(read))


async def test_a_close_cancelled_while_the_writer_drains_still_lets_go_of_the_file(
    tmp_path: Path,
) -> None:
    """The OS lock was let go only after the writer's thread had ended: a close cut
    short while it finished its last transactions (a shutdown under a timeout) kept
    the lock for the life of the process, and every later orchestrator on the file,
    this process's own included, was refused as 'in use'."""
    first = SQLiteStore(tmp_path / "s.db")
    await first.open()
    await first.attach("one")
    release = threading.Event()
    slow = first._writer.write(lambda conn: release.wait(5.0))
    closing = asyncio.create_task(first.aclose())
    await asyncio.sleep(0.05)  # close() waits for the slow transaction
    closing.cancel()
    await asyncio.gather(closing, return_exceptions=True)
    release.set()
    await slow
    second = SQLiteStore(tmp_path / "s.db")
    await second.open()
    try:
        await second.attach("two")
    finally:
        await second.aclose()
        await first.aclose()


FORK_AND_DIE = """
import asyncio, os, signal, sys, time
from seamwork.storage import SQLiteStore

async def main() -> None:
    store = SQLiteStore(sys.argv[1])
    await store.open()
    await store.attach("parent")
    child = os.fork()
    if child == 0:  # a helper process the service forked: it lives on
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        time.sleep(10)
        os._exit(0)
    print(child, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)

asyncio.run(main())
"""


async def test_a_forked_child_of_a_dead_orchestrator_does_not_keep_its_file_locked(
    tmp_path: Path,
) -> None:
    """A child forked by the orchestrator's process (multiprocessing's default on
    Linux) shared the lock, so while it lived on after the orchestrator died, the
    restarted orchestrator was refused with StoreLocked, naming the dead pid."""
    path = tmp_path / "s.db"
    src = str(Path(seamwork_src.__file__).parents[1])
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-c", FORK_AND_DIE, str(path)],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "PYTHONPATH": src},
    )
    child = int(done.stdout.split()[0])
    try:
        store = SQLiteStore(path)
        await store.open()
        try:
            await store.attach("restarted")
        finally:
            await store.aclose()
    finally:
        os.kill(child, signal.SIGKILL)
