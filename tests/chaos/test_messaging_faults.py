"""Outbox -> relay -> JetStream -> inbox while everything in between is killed.

A producer (this test) writes 5,000 ``Tick`` rows over 4 aggregates, plus one
``Poison`` row, into its outbox while it runs. A relay process publishes them into an
embedded nats-server (``sync_interval: always``, a persistent store) that is
SIGKILLed and restarted 5 times and stopped gracefully twice; the relay kills itself
once between the broker's acknowledgement and marking rows sent, and the consumer
process once between committing a batch and acknowledging it (see
``messaging_runner.py``); both are restarted by the test. After the drain:

* effects = 5,000, and no message id applied twice;
* no outbox row left unpublished, and the stream holds each message once;
* every aggregate's sequence increases in the order effects were applied, and the
  consumer never saw a tick skip ahead (``NatsBroker(ordered_recovery=True)``: after
  a crash or reconnect, messages left in flight come back before newer ones);
* the poison message is dead-lettered (and counted) once, while the rest flowed.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from seamwork.brokers import EmbeddedNats, NatsBroker
from seamwork.messaging import Message, Outbox
from seamwork.testing.broker import until

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(150)]

RUNNER = Path(__file__).with_name("messaging_runner.py")
TICKS = 5_000
AGGREGATES = 4
POISON_AT = 2_500
ROWS_PER_TX = 25
OUTAGES = ("kill", "kill", "stop", "kill", "kill", "stop", "kill")


class Process:
    """One runner process, restarted whenever it dies; crash env on its first life only."""

    def __init__(self, mode: str, workdir: Path, url: str, prefix: str, crash: str) -> None:
        self.args = (str(RUNNER), mode, str(workdir), url, prefix, str(AGGREGATES))
        self.mode, self.workdir, self.crash = mode, workdir, crash
        self.proc: asyncio.subprocess.Process | None = None
        self.lives = 0

    async def ensure_running(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            return
        env = {**os.environ}
        env.pop("SEAMWORK_CHAOS_CRASH", None)
        if self.lives == 0:
            env["SEAMWORK_CHAOS_CRASH"] = self.crash
        log = open(self.workdir / f"{self.mode}.log", "ab")  # noqa: SIM115 - owned by the child
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, *self.args, env=env, stdout=log, stderr=log
        )
        log.close()
        self.lives += 1

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.terminate()
            await self.proc.wait()


def query(path: Path, sql: str) -> list[tuple[int, ...]]:
    conn = sqlite3.connect(path, timeout=10)
    try:
        return conn.execute(sql).fetchall()
    except sqlite3.OperationalError:  # the consumer has not created its table yet
        return []
    finally:
        conn.close()


async def produce(outbox: Outbox, prefix: str) -> None:
    messages = [
        (f"{prefix}.agg.{n % AGGREGATES}", Message("Tick", {"agg": n % AGGREGATES, "n": n}))
        for n in range(TICKS)
    ]
    messages.insert(POISON_AT, (f"{prefix}.agg.0", Message("Poison", {"agg": 0, "n": -1})))
    for start in range(0, len(messages), ROWS_PER_TX):
        async with outbox.transaction() as tx:
            for subject, message in messages[start : start + ROWS_PER_TX]:
                await tx.publish(subject, message)
        await asyncio.sleep(0.05)


async def outages(server: EmbeddedNats, log: list[str]) -> None:
    for kind in OUTAGES:
        await asyncio.sleep(1.2)
        await (server.kill() if kind == "kill" else server.stop())
        log.append(kind)
        await asyncio.sleep(0.3)
        await server.start()


async def supervise(processes: list[Process], done: Callable[[], bool]) -> None:
    while not done():
        for process in processes:
            await process.ensure_running()
        await asyncio.sleep(0.1)


async def test_no_message_is_lost_or_applied_twice_through_kills_and_restarts(
    tmp_path: Path,
) -> None:
    prefix = f"c{uuid.uuid4().hex[:8]}"
    consumer_db, producer_db = tmp_path / "consumer.db", tmp_path / "producer.db"
    server = EmbeddedNats(store_dir=tmp_path / "nats")
    await server.start()
    outbox = Outbox.sqlite(producer_db)
    await outbox.open()
    processes = [
        Process("relay", tmp_path, server.url, prefix, "after_ack:3"),
        Process("consumer", tmp_path, server.url, prefix, "after_commit:4"),
    ]
    finished = False
    supervisor = asyncio.create_task(supervise(processes, lambda: finished))
    broker = NatsBroker(server.url)
    try:
        done_outages: list[str] = []
        started = time.monotonic()
        await asyncio.gather(produce(outbox, prefix), outages(server, done_outages))

        async def drained() -> bool:
            effects = query(consumer_db, "SELECT count(*) FROM effects")
            return await outbox.pending_count() == 0 and effects == [(TICKS,)]

        await until(drained, seconds=60)
        letters = [x for x in await until(broker.dead_letters) if x.subject.startswith(prefix)]
        elapsed = time.monotonic() - started
    finally:
        finished = True
        await supervisor
        for process in processes:
            await process.stop()
        await outbox.aclose()

    try:
        _, js = await broker._context()
        stream = await js.stream_info(await broker.ensure_stream(f"{prefix}.agg.0"))
        assert stream.state.messages == TICKS + 1  # re-sent batches were dropped by id
    finally:
        await broker.aclose()
        await server.stop()

    assert done_outages == list(OUTAGES)
    crashes = (tmp_path / "crashes.log").read_text().splitlines()
    assert sorted(crashes) == ["consumer after_commit", "relay after_ack"]
    assert all(p.lives >= 2 for p in processes)
    assert query(producer_db, "SELECT count(*) FROM seamwork_outbox WHERE sent_at IS NULL") == [
        (0,)
    ]
    assert query(consumer_db, "SELECT count(*), count(DISTINCT message_id) FROM effects") == [
        (TICKS, TICKS)
    ]
    # each aggregate's ticks applied in order, none skipped, none twice
    assert query(consumer_db, "SELECT count(*) FROM effects WHERE n <= prev") == [(0,)]
    skipped = f"n != CASE WHEN prev = -1 THEN agg ELSE prev + {AGGREGATES} END"
    assert query(consumer_db, f"SELECT count(*) FROM effects WHERE {skipped}") == [(0,)]
    assert not (tmp_path / "reorders.log").exists()
    assert query(consumer_db, "SELECT sum(n) FROM effects") == [(TICKS * (TICKS - 1) // 2,)]
    (letter,) = letters
    assert letter.message.type == "Poison"
    assert "no handler for message type 'Poison'" in letter.error
    assert elapsed < 90
