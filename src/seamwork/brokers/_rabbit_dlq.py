"""Reading the RabbitMQ dead-letter stream, without writing anything to the broker.

The stream is append-only: a replayed letter is followed, later in the stream, by a
tombstone naming its offset, and a listing drops tombstoned letters. AMQP tells a
stream consumer neither where the stream ends nor (on RabbitMQ 3.x) how many
messages it holds, so a listing reads from the first offset until no message has
come for ``IDLE_GAP`` seconds - seconds the event loop was free to read the socket:
the gap is counted in short ticks, and a tick the loop ran late (other work in the
process held it) counts as one tick, not as the time it took. Counted in wall time,
a loop held past the gap while letters were on their way ended the listing early,
without them (an empty list, or ``replay`` finding no such key). (Earlier versions
appended an end marker per listing, which grew the stream forever; markers still in a
stream carry no letter headers and are skipped like anything else that is not a
letter.)
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from typing import Any

import aio_pika
import aiormq
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection

from seamwork.brokers._cancels import to_the_end
from seamwork.errors import BrokerUnavailable
from seamwork.messaging._ports import DLQ_SUBJECT

TOMBSTONE = "Seamwork-DLQ-Replayed"
"""Header of a tombstone: the offset of the letter it replaced."""
IDLE_GAP = 0.2
"""Seconds without a new message after which a listing takes the stream as read."""
_TICK = 0.02
"""The gap is waited for in ticks this long, ``IDLE_GAP / _TICK`` of them in a row."""

Raw = tuple[int, bytes, dict[str, Any]]
"""A letter as stored: offset, body, headers."""


async def read_letters(connection: AbstractRobustConnection, name: str) -> list[Raw] | None:
    """The live letters of stream ``name``, oldest first; None if there is no stream.

    Only passive declares and a consumer: a missing stream is not created. (The
    caller bounds the time.)
    """
    try:
        channel = await connection.channel(publisher_confirms=False)
    except (aiormq.exceptions.AMQPError, ConnectionError, OSError) as exc:
        raise BrokerUnavailable(f"cannot read {name}: {_first_line(exc)}") from exc
    try:
        return await _read(channel, name)
    finally:
        with contextlib.suppress(Exception):
            await to_the_end(channel.close())


async def _read(channel: aio_pika.abc.AbstractChannel, name: str) -> list[Raw] | None:
    await channel.set_qos(prefetch_count=500)
    try:
        queue = await channel.declare_queue(name, passive=True)
    except aiormq.exceptions.ChannelNotFoundEntity:
        return None
    # A plain consumer, not ``queue.iterator()``: leaving an iterator early nacks what
    # it prefetched, and a stream answers a nack by closing the connection.
    inbox: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()

    async def take(msg: AbstractIncomingMessage) -> None:
        inbox.put_nowait(msg)

    tag = f"seamwork-listing-{uuid.uuid4().hex}"
    try:
        # Not cut by a cancel: aiormq would stop reading the channel at once while the
        # stream goes on sending it letters, and the connection's reader, blocked on
        # that full channel, would stop reading every channel. Ended unhurried (the
        # consumer cancelled, then the channel closed), the channel is read to the end.
        first: dict[str, Any] = {"x-stream-offset": "first"}
        await to_the_end(queue.consume(take, arguments=first, consumer_tag=tag))
        return await _live_letters(inbox)
    finally:
        with contextlib.suppress(Exception):
            await to_the_end(queue.cancel(tag))


async def _live_letters(inbox: asyncio.Queue[AbstractIncomingMessage]) -> list[Raw]:
    """The letters the consumer puts in ``inbox``, read until it stays empty for
    ``IDLE_GAP`` (in ticks, see the module), without the tombstoned ones.

    Each is acknowledged here, as it is read, not by the consumer: an acknowledgement
    sent after the channel's close would be a frame on a channel the broker closed
    (504 CHANNEL_ERROR, which closes the whole connection).
    """
    letters: dict[int, Raw] = {}
    replayed: set[str] = set()
    quiet = 0  # ticks in a row without a message
    while quiet * _TICK < IDLE_GAP:
        try:
            # not wait_for: on Python 3.11 it drops a cancel that lands as a letter
            # arrives or the gap ends, and the listing went on as if not cancelled
            async with asyncio.timeout(_TICK):
                msg = await inbox.get()
        except TimeoutError:
            quiet += 1  # however late the loop woke us: one tick
            continue
        quiet = 0
        await msg.ack()
        headers = dict(msg.headers or {})
        offset = _int(headers.get("x-stream-offset"))
        if TOMBSTONE in headers:
            replayed.add(str(headers[TOMBSTONE]))
        elif DLQ_SUBJECT in headers:
            letters[offset] = (offset, msg.body, headers)
    return [letter for offset, letter in sorted(letters.items()) if str(offset) not in replayed]


def _int(value: object) -> int:
    try:
        return int(str(value)) if value is not None else 0
    except ValueError:
        return 0


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


__all__ = ["IDLE_GAP", "TOMBSTONE", "Raw", "read_letters"]
