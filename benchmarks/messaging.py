"""Messaging throughput: outbox relay, inbox consume, embedded boot; one table, one run.

Run: ``.venv/bin/python benchmarks/messaging.py [--rounds 3]``.

Every row is measured ``--rounds`` times in this process; the table shows the best
round and the spread (worst / best) next to the issue's target:

* relay into JetStream with fsync on (``EmbeddedNats``, ``sync_interval: always``):
  a page of outbox rows per atomic batch vs one message at a time (page size 1);
* the relay into a RabbitMQ quorum queue with publisher confirms (page 1000), if
  ``seamwork.brokers.rabbitmq`` exists and a server answers on 127.0.0.1:5672
  (else "not available");
* inbox consume with an exactly-once effect on SQLite (``synchronous=full``): each
  message inserts one row and records its id, through ``Inbox.handler`` with batches
  (one commit per fetched batch) and, for reference, one transaction per message;
* embedded boot: ``nats-server`` started, a stream created and a consumer ready.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import socket
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from seamwork.brokers import EmbeddedNats, NatsBroker
from seamwork.messaging import Delivery, Inbox, Message, Outbox, OutboxRelay, Transaction

RELAY_BATCHED = 20_000
RELAY_SINGLE = 1_000
RABBIT_N = 5_000
INBOX_BATCHED = 20_000
INBOX_SINGLE = 2_000


@dataclass
class Row:
    name: str
    unit: str
    target: str
    met: Callable[[float], bool] | None
    values: list[float]
    note: str = ""


async def fill_outbox(path: Path, n: int, subject: str) -> Outbox:
    outbox = Outbox.sqlite(path)
    await outbox.open()
    for start in range(0, n, 1000):
        async with outbox.transaction() as tx:
            for i in range(start, min(n, start + 1000)):
                await tx.publish(subject, Message("Tick", {"n": i, "agg": i % 4}))
    return outbox


async def relay_rate(n: int, page_size: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        async with EmbeddedNats() as server:
            subject = f"b{uuid.uuid4().hex[:8]}.tick"
            outbox = await fill_outbox(Path(tmp) / "producer.db", n, subject)
            broker = NatsBroker(server.url)
            await broker.ensure_stream(subject)
            relay = OutboxRelay(outbox, broker, page_size=page_size)
            started = time.perf_counter()
            sent = await relay.drain()
            elapsed = time.perf_counter() - started
            assert sent == n
            assert await outbox.pending_count() == 0
            await broker.aclose()
            await outbox.aclose()
    return n / elapsed


async def inbox_rate(n: int, batched: bool) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        async with EmbeddedNats() as server:
            subject = f"b{uuid.uuid4().hex[:8]}.tick"
            broker = NatsBroker(server.url)
            for start in range(0, n, 1000):
                await broker.publish_batch(
                    [
                        (subject, Message("Tick", {"n": i}))
                        for i in range(start, min(n, start + 1000))
                    ]
                )
            inbox = Inbox.sqlite(Path(tmp) / "consumer.db")
            await inbox.open()
            async with inbox._transaction(Message("Setup")) as tx:
                assert tx is not None
                await tx.execute("CREATE TABLE effects (n INTEGER PRIMARY KEY)")
            done = asyncio.Event()
            count = 0

            async def apply(message: Message, tx: Transaction) -> None:
                nonlocal count
                await tx.execute("INSERT INTO effects (n) VALUES (?)", (message.data["n"],))
                count += 1

            handler = inbox.handler(apply)

            async def one_at_a_time(delivery: Delivery) -> None:
                await handler(delivery)

            async def watch() -> None:
                while count < n:
                    await asyncio.sleep(0.005)
                done.set()

            started = time.perf_counter()
            watcher = asyncio.create_task(watch())
            await broker.subscribe(subject, "bench", handler if batched else one_at_a_time)
            await done.wait()
            elapsed = time.perf_counter() - started
            await watcher
            await broker.aclose()
            await inbox.aclose()
    return n / elapsed


async def boot_ms() -> float:
    started = time.perf_counter()
    async with EmbeddedNats() as server:
        broker = NatsBroker(server.url)

        async def nothing(delivery: Delivery) -> None:
            return None

        await broker.subscribe("boot.ready", "bench", nothing)
        elapsed = time.perf_counter() - started
        await broker.aclose()
    return elapsed * 1000


def rabbit_available() -> str | None:
    """None if the RabbitMQ row can run, else why not."""
    if importlib.util.find_spec("seamwork.brokers.rabbitmq") is None:
        return "not available (no seamwork.brokers.rabbitmq)"
    try:
        with socket.create_connection(("127.0.0.1", 5672), timeout=1.0):
            return None
    except OSError:
        return "not available (no server on 127.0.0.1:5672)"


async def rabbit_rate(n: int) -> float:
    """The relay into a RabbitMQ quorum queue (bound first: a topic exchange drops
    messages no queue is bound to), publisher confirms on, page size 1000."""
    import aio_pika

    from seamwork.brokers import RabbitBroker
    from seamwork.brokers.rabbitmq import queue_name

    url = "amqp://guest:guest@127.0.0.1:5672/"
    subject = f"b{uuid.uuid4().hex[:8]}.tick"
    broker = RabbitBroker(url)

    async def nothing(delivery: Delivery) -> None:
        return None

    await (await broker.subscribe(subject, "bench", nothing)).stop()  # the queue stays
    try:
        with tempfile.TemporaryDirectory() as tmp:
            outbox = await fill_outbox(Path(tmp) / "producer.db", n, subject)
            relay = OutboxRelay(outbox, broker, page_size=1000)
            started = time.perf_counter()
            sent = await relay.drain()
            elapsed = time.perf_counter() - started
            assert sent == n
            await outbox.aclose()
    finally:
        await broker.aclose()
        connection = await aio_pika.connect(url)
        async with connection:
            channel = await connection.channel()
            await channel.queue_delete(queue_name("bench", subject))
    return n / elapsed


async def measure(row: Row, rounds: int, fn: Callable[[], Awaitable[float]]) -> None:
    for _ in range(rounds):
        row.values.append(await fn())


def render(rows: list[Row], rounds: int) -> str:
    header = f"{'measurement':<46} {'best':>10} {'spread':>8}  {'unit':<7} {'target':<10} met"
    lines = [f"messaging benchmark, best of {rounds} rounds (spread = worst/best)", header]
    lines.append("-" * len(header))
    for row in rows:
        if not row.values:
            lines.append(f"{row.name:<46} {row.note}")
            continue
        lower_is_better = row.unit == "ms"
        best = min(row.values) if lower_is_better else max(row.values)
        worst = max(row.values) if lower_is_better else min(row.values)
        spread = worst / best if lower_is_better else best / worst
        met = "-" if row.met is None else ("yes" if row.met(best) else "NO")
        shown = f"{best:,.1f}" if row.unit == "ms" else f"{best:,.0f}"
        lines.append(
            f"{row.name:<46} {shown:>10} {spread:>7.2f}x  {row.unit:<7} {row.target:<10} {met}"
        )
    return "\n".join(lines)


async def main(rounds: int) -> None:
    rows = [
        Row(
            "relay -> JetStream fsync, batched (page 1000)",
            "msg/s",
            ">= 20,000",
            lambda v: v >= 20_000,
            [],
        ),
        Row("relay -> JetStream fsync, one at a time", "msg/s", "-", None, []),
        Row(
            "relay -> RabbitMQ quorum queue, confirms",
            "msg/s",
            ">= 3,000",
            lambda v: v >= 3_000,
            [],
        ),
        Row(
            "inbox consume exactly-once SQLite, batched",
            "msg/s",
            ">= 15,000",
            lambda v: v >= 15_000,
            [],
        ),
        Row("inbox consume exactly-once SQLite, per msg", "msg/s", "-", None, []),
        Row("embedded boot (server+stream+consumer)", "ms", "<= 250", lambda v: v <= 250, []),
    ]
    await measure(rows[0], rounds, lambda: relay_rate(RELAY_BATCHED, 1000))
    await measure(rows[1], rounds, lambda: relay_rate(RELAY_SINGLE, 1))
    missing = rabbit_available()
    if missing is None:
        await measure(rows[2], rounds, lambda: rabbit_rate(RABBIT_N))
    else:
        rows[2].note = missing
    await measure(rows[3], rounds, lambda: inbox_rate(INBOX_BATCHED, batched=True))
    await measure(rows[4], rounds, lambda: inbox_rate(INBOX_SINGLE, batched=False))
    await measure(rows[5], max(rounds, 5), boot_ms)
    print(render(rows, rounds))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    asyncio.run(main(args.rounds))
    sys.exit(0)
