"""The relay and consumer processes the messaging chaos test kills.

Usage: ``python messaging_runner.py relay|consumer WORKDIR NATS_URL PREFIX AGGREGATES``.

* ``relay``: an ``OutboxRelay`` over ``WORKDIR/producer.db`` into NATS, forever.
* ``consumer``: an ``Inbox`` over ``WORKDIR/consumer.db`` consuming ``PREFIX.>`` as
  group ``chaos``; each ``Tick`` inserts ``(message_id, agg, n, prev)`` where ``prev``
  is the highest ``n`` applied for that aggregate before it, so the test can check
  that every aggregate's sequence only increases and no message was applied twice
  (there is deliberately no UNIQUE constraint on ``message_id``: a double apply must
  show up, not be hidden as a failed retry). Only ``Tick`` is declared.

  The broker is built with ``ordered_recovery=True``, which promises stream order for
  a one-member group across consumer crashes and server restarts. The handler still
  checks: a ``Tick`` that skips ahead of its aggregate's next ``n`` (aggregate ``k``
  gets ``k, k + AGGREGATES, ...``) is appended to ``WORKDIR/reorders.log`` (which the
  test expects to stay empty) and raises ``OutOfOrder``, to be retried after the
  missing ones.

Environment (read here, at the edge): ``SEAMWORK_CHAOS_CRASH=after_ack:N`` makes the
relay SIGKILL itself right after the broker acknowledged its N-th batch, before it
marks the rows sent; ``SEAMWORK_CHAOS_CRASH=after_commit:N`` makes the consumer
SIGKILL itself right after its N-th batch committed, before it acknowledges it.
Each crash is appended to ``WORKDIR/crashes.log`` first.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from seamwork.brokers import NatsBroker
from seamwork.messaging import (
    Delivery,
    Inbox,
    InboxHandler,
    Message,
    Outbox,
    OutboxRelay,
    Transaction,
)

MODE, WORKDIR, URL, PREFIX = sys.argv[1], Path(sys.argv[2]), sys.argv[3], sys.argv[4]
AGGREGATES = int(sys.argv[5])
CRASH_POINT, _, CRASH_AT = os.environ.get("SEAMWORK_CHAOS_CRASH", "").partition(":")


class Countdown:
    """SIGKILLs this process the N-th time ``tick(point)`` is called at its point."""

    def __init__(self) -> None:
        self.left = int(CRASH_AT) if CRASH_AT else 0

    def tick(self, point: str) -> None:
        if point != CRASH_POINT or self.left <= 0:
            return
        self.left -= 1
        if self.left:
            return
        with open(WORKDIR / "crashes.log", "a") as log:
            log.write(f"{MODE} {point}\n")
            log.flush()
            os.fsync(log.fileno())
        os.kill(os.getpid(), signal.SIGKILL)


COUNTDOWN = Countdown()


class CrashAfterAck:
    """The relay's broker: after the broker stored a batch, maybe die before mark-sent."""

    def __init__(self, broker: NatsBroker) -> None:
        self.broker = broker

    async def publish_batch(self, items: Sequence[tuple[str, Message]]) -> None:
        await self.broker.publish_batch(items)
        COUNTDOWN.tick("after_ack")


class CrashAfterCommit:
    """The consumer's handler: after a batch committed, maybe die before the acks."""

    def __init__(self, inner: InboxHandler) -> None:
        self.inner = inner

    async def __call__(self, delivery: Delivery) -> None:
        await self.inner(delivery)
        COUNTDOWN.tick("after_commit")

    async def batch(self, deliveries: Sequence[Delivery]) -> list[BaseException | None]:
        outcomes = await self.inner.batch(deliveries)
        COUNTDOWN.tick("after_commit")
        return outcomes


class OutOfOrder(Exception):
    """An aggregate's earlier message has not been applied yet: retry this one later."""


async def apply(message: Message, tx: Transaction) -> None:
    agg, n = message.data["agg"], message.data["n"]
    (prev,) = (await tx.execute("SELECT max(n) FROM effects WHERE agg = ?", (agg,)))[0]
    expected = agg if prev is None else prev + AGGREGATES
    if n > expected:
        with open(WORKDIR / "reorders.log", "a") as log:
            log.write(f"{agg} {n} expected {expected}\n")
        raise OutOfOrder(f"aggregate {agg}: got {n}, expected {expected}")
    await tx.execute(
        "INSERT INTO effects (message_id, agg, n, prev) VALUES (?, ?, ?, ?)",
        (message.id, agg, n, -1 if prev is None else prev),
    )


async def relay() -> None:
    async with Outbox.sqlite(WORKDIR / "producer.db") as outbox:
        broker = NatsBroker(URL, publish_timeout=1.0)
        runner = OutboxRelay(outbox, CrashAfterAck(broker), page_size=200, poll_interval=0.05)  # type: ignore[arg-type]
        async with runner:
            await asyncio.Event().wait()


async def consumer() -> None:
    async with Inbox.sqlite(WORKDIR / "consumer.db") as inbox:
        async with inbox._transaction(Message("Setup")) as tx:
            if tx is not None:
                await tx.execute(
                    "CREATE TABLE IF NOT EXISTS effects (message_id TEXT NOT NULL,"
                    " agg INTEGER NOT NULL, n INTEGER NOT NULL, prev INTEGER NOT NULL)"
                )
        handler = CrashAfterCommit(inbox.handler(apply, types={"Tick"}))
        while True:  # the server may be down right now: keep trying to subscribe
            broker = NatsBroker(URL, publish_timeout=1.0, ordered_recovery=True)
            try:
                await broker.subscribe(
                    f"{PREFIX}.>",
                    "chaos",
                    handler,
                    ack_wait=2.0,
                    retry_delay=0.05,
                    max_deliver=100,
                )
                break
            except Exception as exc:
                print(f"consumer: subscribe failed ({exc}); retrying", flush=True)
                with contextlib.suppress(Exception):
                    await broker.aclose()
                await asyncio.sleep(0.2)
        await asyncio.Event().wait()


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    asyncio.run(relay() if MODE == "relay" else consumer())
