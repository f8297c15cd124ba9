"""``seamwork demo --nats`` on a shared server: a run sees and removes only its own.

The run's dead letters share the server's ``DEADLETTER`` stream with everyone's; the
"no message dead-lettered" invariant must count only the run's, and the cleanup at
the end must purge only the run's.
"""

from __future__ import annotations

import contextlib
import uuid

import nats
import pytest
from nats.js.errors import NotFoundError

from seamwork.brokers import NatsBroker
from seamwork.brokers.nats import DLQ_STREAM, stream_for
from seamwork.demo.servers import NatsRun, new_run_id
from seamwork.messaging import Delivery, Message, PoisonMessage
from seamwork.testing.broker import until


async def refuse(delivery: Delivery) -> None:
    raise PoisonMessage(f"cannot handle {delivery.message.type}")


async def letters_of(url: str, subject: str) -> int:
    nc = await nats.connect(url)
    try:
        info = await nc.jsm().stream_info(DLQ_STREAM, subjects_filter=f"deadletter.*.{subject}")
        return sum((info.state.subjects or {}).values())
    finally:
        await nc.close()


async def test_a_run_counts_and_removes_only_its_own_dead_letters_and_stream(
    nats_service: str,
) -> None:
    run = NatsRun(nats_service, new_run_id())
    ours = f"{run.prefix}orders.created"
    theirs = f"t{uuid.uuid4().hex[:10]}.orders.created"  # another application's
    broker = NatsBroker(nats_service)
    try:
        await broker.subscribe(ours, run.group("inventory"), refuse)
        await broker.subscribe(theirs, "inventory", refuse)
        await broker.publish(ours, Message("OrderCreated", {"n": 1}))
        await broker.publish(theirs, Message("OrderCreated", {"n": 2}))

        async def both_dead_lettered() -> bool:
            return (
                await letters_of(nats_service, ours) + await letters_of(nats_service, theirs) == 2
            )

        await until(both_dead_lettered)
        await broker.aclose()

        (letter,) = await run.dead_letters()
        assert (letter.subject, letter.group) == (ours, run.group("inventory"))
        await run.clean()

        assert await run.dead_letters() == []
        assert await letters_of(nats_service, theirs) == 1  # not the run's: kept
        nc = await nats.connect(nats_service)
        try:
            with pytest.raises(NotFoundError):
                await nc.jsm().stream_info(run.stream)
            await nc.jsm().stream_info(stream_for(theirs))  # not the run's: kept
        finally:
            await nc.close()
    finally:
        await broker.aclose()
        nc = await nats.connect(nats_service)
        try:
            js = nc.jsm()
            await js.purge_stream(DLQ_STREAM, subject=f"deadletter.*.{theirs}")
            for stream in (run.stream, stream_for(theirs)):
                with contextlib.suppress(NotFoundError):  # (the run's is gone already)
                    await js.delete_stream(stream)
        finally:
            await nc.close()
