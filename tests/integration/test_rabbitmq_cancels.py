"""``RabbitBroker`` calls cut short by a cancel, on the RabbitMQ service (127.0.0.1:5672,
guest/guest): each sweep cancels a call after 0, a fraction of a millisecond, ... up
to past its end, and checks that the cancel is raised and nothing is left open.
Each test uses its own exchange and deletes what it declared.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from seamwork.brokers import RabbitBroker, _rabbit_dlq
from seamwork.brokers.rabbitmq import RabbitSubscription
from seamwork.messaging import DeadLetter, Delivery, Message, PoisonMessage
from seamwork.testing.broker import until
from shared_helpers import delete_rabbit, open_sockets


@pytest.fixture
async def exchange(rabbitmq_service: str) -> AsyncIterator[str]:
    name = f"seamwork-cancel-{uuid.uuid4().hex[:10]}"
    yield name
    await delete_rabbit(rabbitmq_service, name, [f"{name}.deadletter"])


def _others() -> set[asyncio.Task[object]]:
    """The tasks running besides this test's own."""
    return {t for t in asyncio.all_tasks() if t is not asyncio.current_task()}


async def _left_running(before: set[asyncio.Task[object]]) -> set[asyncio.Task[object]]:
    """The tasks started since ``before`` still running after a second (aio-pika ends
    its close callbacks a few loop steps after a close returns)."""
    started = _others() - before
    if started:
        await asyncio.wait(started, timeout=1)
    return {t for t in started if not t.done()}


async def test_a_connect_cut_short_by_a_cancel_ends_at_once_leaving_nothing_open(
    rabbitmq_service: str, exchange: str
) -> None:
    # aio-pika connects in a task of its own: a cancel of the caller left that task
    # connecting, then holding an open connection no one could close. Cancelled in turn
    # as its handshake ended, that task dropped the connection it had just opened, or
    # went on to wait reconnect_interval before the close could end.
    first = RabbitBroker(rabbitmq_service, exchange=exchange)
    await first.connect()  # the exchange and the stream exist: a connect takes ms
    await first.aclose()
    span = await _connect_time(rabbitmq_service, exchange)
    open_before, running_before = open_sockets(), _others()
    cut = 0
    for step in range(80):  # cancels spread over a connect: handshake and set-up
        broker = RabbitBroker(rabbitmq_service, exchange=exchange, reconnect_interval=5)
        connecting = asyncio.create_task(broker.connect())
        await asyncio.sleep(step / 80 * span)
        cut += connecting.cancel()
        done, _ = await asyncio.wait({connecting}, timeout=2)
        assert done, f"a connect cancelled {step / 5} ms in did not end within 2 s"
        await broker.aclose()
        assert open_sockets() == open_before, f"a socket left by a cancel {step / 5} ms in"
        assert not await _left_running(running_before), f"tasks left {step / 5} ms in"
    assert cut > 40  # most cancels landed inside the call


async def _connect_time(url: str, exchange: str) -> float:
    """How long a connect takes here (the median of three): the cancels above are
    spread over it, however fast or loaded the machine is."""
    times = []
    for _ in range(3):
        broker = RabbitBroker(url, exchange=exchange)
        started = asyncio.get_running_loop().time()
        await broker.connect()
        times.append(asyncio.get_running_loop().time() - started)
        await broker.aclose()
    return sorted(times)[1]


async def _ignored(delivery: Delivery) -> None: ...


async def _stop(call: asyncio.Task[object]) -> None:
    """Stop the subscription a call made (one that ended before its cancel did)."""
    if not call.cancelled() and call.exception() is None:
        made = call.result()
        if isinstance(made, RabbitSubscription):
            await made.stop()


async def test_a_subscribe_cut_short_by_a_cancel_leaves_no_channel_open(
    rabbitmq_service: str, exchange: str
) -> None:
    # a cancel that landed between opening the subscription's channel and starting its
    # consumer left that channel open on the broker's connection for as long as it ran
    subject = f"cut{uuid.uuid4().hex[:6]}.created"
    broker = RabbitBroker(rabbitmq_service, exchange=exchange)
    cut = 0
    try:
        await (await broker.subscribe(subject, "g", _ignored)).stop()  # the queue exists
        running_before = _others()  # the connection's own tasks and the first channel's
        for step in range(80):  # cancels 0, 0.1, ... 7.9 ms in: through every request
            subscribing = asyncio.create_task(broker.subscribe(subject, "g", _ignored))
            await asyncio.sleep(step * 0.0001)
            cut += subscribing.cancel()
            done, _ = await asyncio.wait({subscribing}, timeout=5)
            assert done, f"a subscribe cancelled {step / 10} ms in did not end within 5 s"
            await _stop(subscribing)
            left = await _left_running(running_before)  # an open channel runs its reader
            assert not left, f"a cancel {step / 10} ms in left running: {left}"
    finally:
        names = broker.declared_queues
        await broker.aclose()
        await delete_rabbit(rabbitmq_service, exchange, names)
    assert cut > 30  # most cancels landed inside the call


async def test_a_cancel_while_a_channel_closes_leaves_the_connection_up(
    rabbitmq_service: str, exchange: str, caplog: pytest.LogCaptureFixture
) -> None:
    # aiormq answers a cancel that lands as a channel's Channel.Close is answered with
    # a second Channel.Close, which RabbitMQ takes as a protocol error (504
    # CHANNEL_ERROR): it closed the whole connection, every subscription's channel with it
    subject = f"cut{uuid.uuid4().hex[:6]}.created"
    broker = RabbitBroker(rabbitmq_service, exchange=exchange)
    cut = 0
    try:
        await (await broker.subscribe(subject, "g", _ignored)).stop()  # the queue exists
        for step in range(150):  # cancels 0, 0.05, ... 7.45 ms in: subscribe closes a probe
            subscribing = asyncio.create_task(broker.subscribe(subject, "g", _ignored))
            await asyncio.sleep(step * 0.00005)
            cut += subscribing.cancel()
            await asyncio.wait({subscribing}, timeout=5)
            await _stop(subscribing)
        for step in range(100):  # cancels 0, 0.02, ... 1.98 ms into a stop(): its close
            stopping = asyncio.create_task((await broker.subscribe(subject, "g", _ignored)).stop())
            await asyncio.sleep(step * 0.00002)
            cut += stopping.cancel()
            await asyncio.wait({stopping}, timeout=5)
    finally:
        names = broker.declared_queues
        await broker.aclose()
        await delete_rabbit(rabbitmq_service, exchange, names)
    closed = [r.args[1:] for r in caplog.records if "Unexpected connection close" in str(r.msg)]
    assert closed == []  # (reply code and text)
    assert cut > 100


async def test_a_stop_cut_short_by_a_cancel_still_ends_its_consumer(
    rabbitmq_service: str, exchange: str
) -> None:
    # stop() let go of its consumer's task before closing the channel: a cancel that
    # landed meanwhile left that task running, waiting for a channel that never came back
    subject = f"cut{uuid.uuid4().hex[:6]}.created"
    broker = RabbitBroker(rabbitmq_service, exchange=exchange)
    cut = 0
    try:
        await (await broker.subscribe(subject, "g", _ignored)).stop()  # the queue exists
        running_before = _others()
        for step in range(100):  # cancels 0, 0.02, ... 1.98 ms in: through its close
            stopping = asyncio.create_task((await broker.subscribe(subject, "g", _ignored)).stop())
            await asyncio.sleep(step * 0.00002)
            cut += stopping.cancel()
            done, _ = await asyncio.wait({stopping}, timeout=5)
            assert done, f"a stop cancelled {step / 50} ms in did not end within 5 s"
            left = await _left_running(running_before)
            assert not left, f"a cancel {step / 50} ms in left running: {left}"
    finally:
        names = broker.declared_queues
        await broker.aclose()
        await delete_rabbit(rabbitmq_service, exchange, names)
    assert cut > 30


async def _filed(broker: RabbitBroker, subject: str, count: int) -> list[DeadLetter]:
    """``count`` dead letters, filed by the broker itself."""

    async def poisoned(delivery: Delivery) -> None:
        raise PoisonMessage("filed for the test")

    subscription = await broker.subscribe(subject, "filed", poisoned)
    await broker.publish_batch([(subject, Message("T", {"i": i})) for i in range(count)])
    letters = await until(lambda: _at_least(broker.dead_letters(limit=count), count))
    await subscription.stop()
    return letters


async def _at_least(letters: Awaitable[list[DeadLetter]], count: int) -> list[DeadLetter] | None:
    found = await letters
    return found if len(found) >= count else None


async def test_a_dead_letter_listing_cut_short_by_a_cancel_leaves_the_connection_working(
    rabbitmq_service: str, exchange: str
) -> None:
    # a cancel of the listing's Basic.Consume made aiormq stop reading the channel while
    # the stream kept sending it letters: the connection's reader, blocked on that full
    # channel, stopped reading for every channel (publishes, subscriptions) on it
    subject = f"cut{uuid.uuid4().hex[:6]}.created"
    broker = RabbitBroker(rabbitmq_service, exchange=exchange)
    cut = 0
    try:
        await _filed(broker, subject, 20)  # more frames in flight than a channel buffers
        running_before = _others()
        for step in range(80):  # cancels 0, 0.1, ... 7.9 ms in: until it consumes
            listing = asyncio.create_task(broker.dead_letters())
            await asyncio.sleep(step * 0.0001)
            cut += listing.cancel()
            done, _ = await asyncio.wait({listing}, timeout=5)
            assert done, f"a listing cancelled {step / 10} ms in did not end within 5 s"
            left = await _left_running(running_before)  # an open channel runs its reader
            assert not left, f"a cancel {step / 10} ms in left running: {left}"
        async with asyncio.timeout(5):
            await broker.publish(subject, Message("T", {"after": True}))
    finally:
        names = broker.declared_queues
        await broker.aclose()
        await delete_rabbit(rabbitmq_service, exchange, names)
    assert cut > 60


Call = Callable[[RabbitBroker, int], Awaitable[object]]
"""The call of one step of a sweep (the step picks the dead letter a replay takes)."""

SWEEPS = {  # cancels, ms apart: from 0 to past the call's usual end on a quiet machine
    "connect": (60, 0.15),
    "subscribe": (80, 0.1),
    "publish": (40, 0.04),
    "publish_batch": (40, 0.1),
    "dead_letters": (80, 0.5),
    "replay_dead_letter": (80, 0.5),
}


def _calls(subject: str, keys: list[str]) -> dict[str, Call]:
    message = Message("T", {"i": 1})
    return {
        "connect": lambda broker, _: broker.connect(),
        "subscribe": lambda broker, _: broker.subscribe(subject, "g", _ignored),
        "publish": lambda broker, _: broker.publish(subject, message),
        "publish_batch": lambda broker, _: broker.publish_batch([(subject, message)] * 5),
        "dead_letters": lambda broker, _: broker.dead_letters(),
        "replay_dead_letter": lambda broker, step: broker.replay_dead_letter(keys[step]),
    }


@pytest.mark.parametrize("name", SWEEPS)
async def test_a_cancel_anywhere_in_a_call_is_raised_not_swallowed(
    rabbitmq_service: str, exchange: str, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Python 3.11's asyncio.wait_for drops a cancel that lands as its answer arrives
    # (the dead-letter listing awaited each letter through it, and went on as if not
    # cancelled; aio-pika and aiormq use it too): any call a cancel lands in must end
    # as cancelled, and leave nothing running
    monkeypatch.setattr(_rabbit_dlq, "IDLE_GAP", 0.02)  # a listing takes ms, not 200
    cancels, ms = SWEEPS[name]
    subject = f"cut{uuid.uuid4().hex[:6]}.created"
    warm = RabbitBroker(rabbitmq_service, exchange=exchange)
    cut = 0
    try:
        await (await warm.subscribe(subject, "g", _ignored)).stop()  # the queue exists
        filed = await _filed(warm, f"{subject}.poison", cancels) if "dead" in name else []
        call = _calls(subject, [letter.key for letter in filed])[name]
        running_before = _others()
        for step in range(cancels):
            broker = warm
            if name == "connect":
                broker = RabbitBroker(rabbitmq_service, exchange=exchange)
            calling = asyncio.create_task(call(broker, step))
            await asyncio.sleep(step * ms / 1000)
            cancelled = calling.cancel()  # False: it had ended, nothing to cut
            done, _ = await asyncio.wait({calling}, timeout=5)
            assert done, f"{name} cancelled {step * ms:g} ms in did not end within 5 s"
            if broker is not warm:
                await broker.aclose()
            if not cancelled:
                await _stop(calling)
                continue
            cut += 1
            outcome = "cancelled" if calling.cancelled() else repr(calling.exception())
            assert outcome == "cancelled", f"a cancel {step * ms:g} ms in ended as {outcome}"
            left = await _left_running(running_before)  # a subscription it made, say
            assert not left, f"a cancel {step * ms:g} ms in left running: {left}"
    finally:
        names = warm.declared_queues
        await warm.aclose()
        await delete_rabbit(rabbitmq_service, exchange, names)
    # enough cancels landed inside the call to exercise the cut (how many depends on
    # how fast the call is here: 13 of 40 publish_batch cancels on a fast machine)
    assert cut >= 5


async def test_a_close_cut_short_by_a_cancel_still_stops_everything(
    rabbitmq_service: str, exchange: str
) -> None:
    # a cancel that landed while aclose() stopped the first subscription left the
    # others consuming and the connection open, and the broker still holding both
    subject = f"cut{uuid.uuid4().hex[:6]}.created"
    names: set[str] = set()
    sockets_before = open_sockets()
    cut = 0
    try:
        for step in range(12):  # cancels 0, 1, ... 11 ms in: through the stops
            broker = RabbitBroker(rabbitmq_service, exchange=exchange)
            for group in ("a", "b", "c"):
                await broker.subscribe(subject, group, _ignored)
            names.update(broker.declared_queues)
            running_before = _others()
            closing = asyncio.create_task(broker.aclose())
            await asyncio.sleep(step * 0.001)
            cut += closing.cancel()
            done, _ = await asyncio.wait({closing}, timeout=10)
            assert done, f"an aclose cancelled {step} ms in did not end within 10 s"
            if not closing.cancelled():
                closing.result()
            assert broker._subscriptions == []
            assert broker._connection is None
            left = await _left_running(running_before - {closing})
            assert not left, f"an aclose cancelled {step} ms in left running: {left}"
            assert open_sockets() == sockets_before, (
                f"an aclose cancelled {step} ms in left a socket"
            )
    finally:
        await delete_rabbit(rabbitmq_service, exchange, sorted(names))
    assert cut > 3  # cancels landed inside the call
