"""NATS at its edges: streams made elsewhere, a server that will not start, and the
flow monitor after a fan-out."""

from __future__ import annotations

import asyncio
import glob
import json
import os
import re
import signal
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

import nats
import pytest

from seamwork.brokers import EmbeddedNats, NatsBroker
from seamwork.brokers.nats import DLQ_STREAM, stream_for
from seamwork.errors import (
    BrokerUnavailable,
    ConfigError,
    InvalidMessage,
    MessagingError,
    PublishError,
)
from seamwork.messaging import Delivery, FlowMonitor, Handler, Message, PoisonMessage
from seamwork.messaging._ports import DLQ_GROUP, DLQ_SUBJECT
from seamwork.testing.broker import eventually, until
from shared_helpers import open_sockets


async def test_a_batch_into_a_stream_made_without_atomic_publish_is_sent_one_by_one() -> None:
    async with EmbeddedNats() as server:
        nc = await nats.connect(server.url)
        made = {"name": "ORDERS", "subjects": ["orders.>"], "storage": "file"}
        reply = await nc.request("$JS.API.STREAM.CREATE.ORDERS", json.dumps(made).encode())
        assert "error" not in json.loads(reply.data)
        broker = NatsBroker(server.url)
        try:
            await broker.publish_batch(
                [("orders.created", Message("B", {"i": i})) for i in range(3)]
            )
            info = await nc.jetstream().stream_info("ORDERS")
        finally:
            await broker.aclose()
            await nc.close()
    assert info.state.messages == 3


@pytest.mark.parametrize("bad", ["orders..created", "orders.>.x", "orders.a b"])
async def test_a_malformed_subject_is_refused_before_any_stream_is_made(bad: str) -> None:
    async def handler(delivery: object) -> None:
        raise AssertionError("nothing is delivered to a refused subscription")

    async with EmbeddedNats() as server:
        broker = NatsBroker(server.url)
        try:
            with pytest.raises(ConfigError, match=repr(bad)):
                await broker.subscribe(bad, "g", handler)
            with pytest.raises(ConfigError, match=repr(bad)):
                await broker.publish(bad, Message("T"))
            _, js = await broker._context()
            made = [info.config.name for info in await js.streams_info()]
        finally:
            await broker.aclose()
    assert made == []


async def test_a_store_dir_with_quotes_in_its_path_keeps_the_data_there(tmp_path: Path) -> None:
    store = tmp_path / 'bob\'s "store" \\ é'
    async with EmbeddedNats(store_dir=store) as server:
        broker = NatsBroker(server.url)
        try:
            await broker.publish("orders.created", Message("T"))
        finally:
            await broker.aclose()
    assert (store / "jetstream").is_dir()
    assert list(store.rglob("ORDERS"))  # the stream is stored under the given path


async def test_a_server_that_will_not_start_leaves_no_temporary_store() -> None:
    pattern = os.path.join(tempfile.gettempdir(), "seamwork-nats-*")
    before = set(glob.glob(pattern))
    with pytest.raises(BrokerUnavailable):
        async with EmbeddedNats(binary="/bin/false"):
            pass
    with pytest.raises(BrokerUnavailable, match="cannot run"):
        async with EmbeddedNats(binary="/nonexistent/nats-server"):
            pass
    assert set(glob.glob(pattern)) == before


def test_a_flow_is_completed_when_its_end_arrives_after_a_side_branch() -> None:
    monitor = FlowMonitor({"OrderCompleted": "completed"})
    created = Message("OrderCreated", {}, correlation_id="order-1")
    reserved = created.caused("InventoryReserved", {})
    notified = created.caused("CustomerNotified", {})  # a side branch of the fan-out
    charged = reserved.caused("PaymentCharged", {})
    completed = charged.caused("OrderCompleted", {})
    for subject, message in [
        ("orders.created", created),
        ("inventory.reserved", reserved),
        ("notifications.sent", notified),
        ("payments.charged", charged),
        ("orders.completed", completed),
    ]:
        monitor.record(message, subject)
    flow = monitor.flow("order-1")
    assert flow is not None
    assert (flow.status, flow.where) == ("completed", "orders")


async def test_subjects_of_one_group_get_consumers_of_their_own() -> None:
    """orders.* and orders.>, orders.a_b and orders.a.b once spelt one durable name:
    the second subscription bound to the first one's consumer and its filter."""
    subjects = ["p.*", "p.>", "p.a_b", "p.a.b"]
    got: dict[str, list[str]] = {s: [] for s in subjects}

    def collect(name: str) -> Handler:
        async def handler(delivery: Delivery) -> None:
            got[name].append(delivery.subject)

        return handler

    async with EmbeddedNats() as server:
        broker = NatsBroker(server.url)
        try:
            for name in subjects:
                await broker.subscribe(name, "g", collect(name))
            for published in ["p.x", "p.a.b", "p.a_b"]:
                await broker.publish(published, Message("T"))
            expected = {
                "p.*": ["p.x", "p.a_b"],
                "p.>": ["p.x", "p.a.b", "p.a_b"],
                "p.a_b": ["p.a_b"],
                "p.a.b": ["p.a.b"],
            }
            await eventually(lambda: sum(map(len, got.values())) >= 7)
            await asyncio.sleep(0.3)
            _, js = await broker._context()
            names = {info.name for info in await js.consumers_info("P")}
        finally:
            await broker.aclose()
    assert {name: sorted(x) for name, x in got.items()} == {
        name: sorted(x) for name, x in expected.items()
    }
    assert len(names) == 4
    assert "g__p_a_b" in names  # a plain subject keeps the name earlier versions gave it


async def test_a_consumer_left_with_the_name_but_another_filter_is_refused_not_shared() -> None:
    async def handler(delivery: Delivery) -> None:
        raise AssertionError("nothing is delivered to a refused subscription")

    async with EmbeddedNats() as server:
        broker = NatsBroker(server.url)
        try:
            await broker.ensure_stream("p.a.b")
            _, js = await broker._context()
            # what an earlier version made for g on p.a_b, which p.a.b is named now
            await js.add_consumer("P", durable_name="g__p_a_b", filter_subject="p.a_b")
            with pytest.raises(ConfigError, match=re.escape("filters 'p.a_b', not 'p.a.b'")):
                await broker.subscribe("p.a.b", "g", handler)
        finally:
            await broker.aclose()


async def test_a_stream_deleted_under_a_running_broker_is_made_again_to_publish() -> None:
    async with EmbeddedNats() as server:
        broker = NatsBroker(server.url)
        try:
            await broker.publish("p.x", Message("T"))
            _, js = await broker._context()
            await js.delete_stream("P")
            await broker.publish("p.x", Message("T"))
            await js.delete_stream("P")
            await broker.publish_batch([("p.x", Message("T")), ("p.y", Message("T"))])
            info = await js.stream_info("P")
        finally:
            await broker.aclose()
    assert info.state.messages == 2


async def test_a_dead_letter_stream_deleted_under_a_subscription_is_made_again() -> None:
    calls: list[int] = []

    async def poisoned(delivery: Delivery) -> None:
        calls.append(delivery.attempt)
        raise PoisonMessage("cannot be handled")

    async with EmbeddedNats() as server:
        broker = NatsBroker(server.url)
        try:
            await broker.subscribe("p.x", "g", poisoned, ack_wait=1)
            _, js = await broker._context()
            await js.delete_stream(DLQ_STREAM)
            message = Message("T")
            await broker.publish("p.x", message)
            letters = await until(broker.dead_letters)
            await asyncio.sleep(1.5)  # past ack_wait: a letter not filed comes back
        finally:
            await broker.aclose()
    assert [x.message.id for x in letters] == [message.id]
    assert calls == [1]


async def test_a_dead_letter_replays_into_a_stream_deleted_since() -> None:
    fixed = False
    handled: list[str] = []

    async def poisoned(delivery: Delivery) -> None:
        if not fixed:
            raise PoisonMessage("cannot be handled")
        handled.append(delivery.message.id)

    async with EmbeddedNats() as server:
        broker = NatsBroker(server.url)
        try:
            await broker.subscribe("p.x", "g", poisoned)
            message = Message("T")
            await broker.publish("p.x", message)
            (letter,) = await until(broker.dead_letters)
            _, js = await broker._context()
            await js.delete_stream("P")
            fixed = True
            await broker.replay_dead_letter(letter.key)
            replayed = await js.get_last_msg("P", "p.x")
            await eventually(lambda: handled == [message.id])  # the group's consumer is back
            left = await broker.dead_letters()
        finally:
            await broker.aclose()
    assert replayed.headers is not None
    assert replayed.headers["Seamwork-Id"] == message.id
    assert left == []


async def test_a_dead_letter_that_names_no_subject_is_refused_by_key_on_replay() -> None:
    async with EmbeddedNats() as server:
        broker = NatsBroker(server.url)
        try:
            await broker.ensure_stream("deadletter.g")
            # filed by hand (an operator, another tool): no Seamwork-DLQ-Subject
            await broker.publish("deadletter.g.p.x", Message("T"))
            (letter,) = await broker.dead_letters()
            with pytest.raises(MessagingError, match=f"dead letter {letter.key} names no subject"):
                await broker.replay_dead_letter(letter.key)
            left = await broker.dead_letters()
        finally:
            await broker.aclose()
    assert letter.subject == "?"
    assert [x.key for x in left] == [letter.key]  # kept, not lost


async def test_listing_dead_letters_when_the_server_goes_away_raises_not_a_partial_list() -> None:
    server = EmbeddedNats()
    await server.start()
    broker = NatsBroker(server.url, publish_timeout=0.5)
    try:
        filed = {"Seamwork-Type": "T", DLQ_SUBJECT: "p.x", DLQ_GROUP: "g"}
        stream = await broker.ensure_stream("deadletter.g")
        nc, js = await broker._context()  # filed as the broker files them (a Message has
        for _ in range(3000):  # no Seamwork-DLQ-* headers of its own)
            await nc.publish("deadletter.g.p.x", b"{}", headers=filed)
        await nc.flush()

        async def filed_all() -> bool:
            return (await js.stream_info(stream)).state.messages == 3000

        await until(filed_all)
        listing = asyncio.create_task(broker.dead_letters(limit=10_000))
        await asyncio.sleep(0.02)
        await server.kill()
        with pytest.raises(BrokerUnavailable, match=f"{DLQ_STREAM} at"):
            async with asyncio.timeout(10):
                await listing
    finally:
        await broker.aclose()
        await server.stop()


class MiscountingBatch:
    """A batch handler that returns no outcome the first time, then one per delivery."""

    def __init__(self) -> None:
        self.calls = 0
        self.handled: list[tuple[int, int]] = []

    async def __call__(self, delivery: Delivery) -> None:
        self.handled.append((delivery.message.data["i"], delivery.attempt))

    async def batch(self, deliveries: Sequence[Delivery]) -> list[BaseException | None]:
        self.calls += 1
        if self.calls == 1:
            return []
        for delivery in deliveries:
            await self(delivery)
        return [None] * len(deliveries)


async def test_a_batch_handler_returning_the_wrong_number_of_outcomes_has_the_batch_retried() -> (
    None
):
    handler = MiscountingBatch()
    async with EmbeddedNats() as server:
        broker = NatsBroker(server.url)
        try:
            await broker.publish_batch([("p.x", Message("T", {"i": i})) for i in range(3)])
            subscription = await broker.subscribe("p.x", "g", handler, retry_delay=0.05)
            await eventually(lambda: len(handler.handled) == 3)
        finally:
            await broker.aclose()
    assert sorted(handler.handled) == [(0, 2), (1, 2), (2, 2)]
    assert subscription.stats.retried == 3


async def test_a_stopped_subscription_does_not_hold_up_closing_the_broker() -> None:
    """A stopped member's pull request kept its inbox subscribed: the status that ends
    the request waited in a queue nobody read, and aclose() drained it for 30 s."""

    async def handler(delivery: Delivery) -> None:
        pass

    async with EmbeddedNats() as server:
        broker = NatsBroker(server.url)
        subscription = await broker.subscribe("p.x", "g", handler)
        await broker.publish("p.x", Message("T"))
        await eventually(lambda: subscription.stats.acked == 1)
        await subscription.stop()
        await asyncio.sleep(1.5)  # the pull request expires
        started = time.monotonic()
        await broker.aclose()
        took = time.monotonic() - started
    assert took < 5


async def test_first_tokens_differing_in_case_or_odd_characters_get_streams_of_their_own() -> None:
    """``Orders.x`` and ``café.x`` were named ORDERS and CAF_ like ``orders.x`` and
    ``caf_.x``: the second reused a stream not covering it and every publish failed."""
    subjects = ["orders.x", "Orders.x", "ORDERS.x", "caf_.x", "café.x", "caf-.x", "a_b-9.x"]
    async with EmbeddedNats() as server:
        broker = NatsBroker(server.url)
        try:
            for subject in subjects:
                await broker.publish(subject, Message("T", {"subject": subject}))
            _, js = await broker._context()
            streams = {info.config.name: info for info in await js.streams_info()}
        finally:
            await broker.aclose()
    names = [stream_for(subject) for subject in subjects]
    assert len(set(names)) == len(subjects)
    assert names[0] == "ORDERS"  # plain lowercase tokens keep the name they had
    assert names[3] == "CAF_"
    assert names[-1] == "A_B-9"
    for subject, name in zip(subjects, names, strict=True):
        token = subject.split(".")[0]
        assert streams[name].config.subjects == [token, f"{token}.>"]
        assert streams[name].state.messages == 1


async def test_a_group_too_long_for_a_plain_consumer_name_gets_a_hashed_one() -> None:
    """``<group>__<subject>`` over JetStream's 255 characters was refused by the server
    with a raw BadRequestError."""
    got: list[str] = []

    async def handler(delivery: Delivery) -> None:
        got.append(delivery.group)

    group = "g" * 300
    async with EmbeddedNats() as server:
        broker = NatsBroker(server.url)
        try:
            await broker.subscribe("p.x", group, handler)
            await broker.publish("p.x", Message("T"))
            await eventually(lambda: got == [group])
            _, js = await broker._context()
            (name,) = [info.name for info in await js.consumers_info("P")]
        finally:
            await broker.aclose()
    assert len(name) <= 255
    assert "___" in name


async def test_a_consumer_the_server_refuses_is_a_config_error_naming_the_group() -> None:
    async def handler(delivery: Delivery) -> None:
        pass

    async with EmbeddedNats() as server:
        nc = await nats.connect(server.url)
        made = {"name": "P", "subjects": ["p.>"], "storage": "file", "max_consumers": 1}
        reply = await nc.request("$JS.API.STREAM.CREATE.P", json.dumps(made).encode())
        assert "error" not in json.loads(reply.data)
        await nc.close()
        broker = NatsBroker(server.url)
        try:
            await broker.subscribe("p.x", "first", handler)
            with pytest.raises(ConfigError, match=r"'second'.*maximum consumers"):
                await broker.subscribe("p.x", "second", handler)
        finally:
            await broker.aclose()


async def test_a_server_that_does_not_answer_while_subscribing_is_broker_unavailable() -> None:
    async def handler(delivery: Delivery) -> None:
        pass

    async with EmbeddedNats() as server:
        broker = NatsBroker(server.url, publish_timeout=0.5)
        try:
            await broker.ensure_stream("p.x")
            await broker.ensure_stream("deadletter.g")
            assert server.pid is not None
            os.kill(server.pid, signal.SIGSTOP)
            try:
                with pytest.raises(BrokerUnavailable, match="'g'"):
                    async with asyncio.timeout(10):
                        await broker.subscribe("p.x", "g", handler)
            finally:
                os.kill(server.pid, signal.SIGCONT)
        finally:
            await broker.aclose()


@pytest.mark.parametrize("deleted", ["stream", "consumer"])
async def test_a_subscription_whose_stream_or_consumer_is_deleted_makes_them_again(
    deleted: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The pull requests of a subscription whose consumer was gone ended with no
    responders, quietly, forever: nothing published afterwards reached it."""
    got: list[int] = []

    async def handler(delivery: Delivery) -> None:
        got.append(delivery.message.data["i"])

    async with EmbeddedNats() as server:
        broker = NatsBroker(server.url)
        try:
            await broker.subscribe("p.x", "g", handler)
            await broker.publish("p.x", Message("T", {"i": 0}))
            await eventually(lambda: got == [0])
            _, js = await broker._context()
            if deleted == "stream":
                await js.delete_stream("P")
            else:
                await js.delete_consumer("P", "g__p_x")
            await asyncio.sleep(1.5)  # past the pending pull request's expiry
            await broker.publish("p.x", Message("T", {"i": 1}))
            await eventually(lambda: 1 in got)
            (info,) = await js.consumers_info("P")
        finally:
            await broker.aclose()
    # made again, a consumer starts at the stream's first message: 0 again if it is kept
    assert got == ([0, 1] if deleted == "stream" else [0, 0, 1])
    assert info.name == "g__p_x"
    assert info.config.filter_subject == "p.x"
    assert any("consumer g on p.x was deleted" in r.getMessage() for r in caplog.records)


async def test_subscribing_to_a_stream_deleted_under_a_running_broker_makes_it_again() -> None:
    got: list[int] = []

    async def handler(delivery: Delivery) -> None:
        got.append(delivery.message.data["i"])

    async with EmbeddedNats() as server:
        broker = NatsBroker(server.url)
        try:
            await broker.publish("p.x", Message("T", {"i": 0}))
            _, js = await broker._context()
            await js.delete_stream("P")
            await broker.subscribe("p.x", "g", handler)
            await broker.publish("p.x", Message("T", {"i": 1}))
            await eventually(lambda: got == [1])
        finally:
            await broker.aclose()


async def test_a_cancel_while_the_broker_closes_is_not_swallowed() -> None:
    # nats-py's drain() catches CancelledError and returns; the caller cancelled (a
    # Ctrl-C in `seamwork demo` cancels the main task) must still see it
    import asyncio

    async with EmbeddedNats() as server:
        broker = NatsBroker(server.url)
        nc, _ = await broker._context()
        await nc.subscribe("unread.subject")  # a message nobody reads holds the drain
        await nc.publish("unread.subject", b"x")
        await nc.flush()
        closing = asyncio.create_task(broker.aclose())
        await asyncio.sleep(0.3)
        closing.cancel()
        async with asyncio.timeout(5):
            await asyncio.wait({closing})
        assert closing.cancelled()
        assert nc.is_closed


OWNER = """
import asyncio, socket, sys
from seamwork.brokers import EmbeddedNats

async def main():
    async with EmbeddedNats() as server:
        print(server.pid, server.port, server._store, flush=True)
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            await asyncio.sleep(0.5)  # the owner closes its clients first...
            try:
                socket.create_connection(("127.0.0.1", server.port), timeout=1).close()
                print("server still up", flush=True)  # ...while the server still serves
            except OSError:
                print("server already gone", flush=True)
            raise

asyncio.run(main())
"""


def test_a_terminal_ctrl_c_reaches_the_owner_not_the_embedded_server() -> None:
    # a terminal sends SIGINT to its whole foreground process group: the server must
    # not die under its owner, which still has clients to close (and then stops it)
    import signal
    import subprocess
    import sys

    child = subprocess.Popen(
        [sys.executable, "-c", OWNER],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own group, as a shell job would be
    )
    assert child.stdout is not None
    pid, _, store = child.stdout.readline().split(" ", 2)
    os.killpg(child.pid, signal.SIGINT)
    out, _ = child.communicate(timeout=20)
    assert out.strip() == "server still up"
    assert child.returncode != 0  # interrupted, as asked
    with pytest.raises(ProcessLookupError):
        os.kill(int(pid), 0)
    assert not os.path.exists(store.strip())


async def test_closing_a_broker_with_fetched_messages_unhandled_is_prompt() -> None:
    # messages a stopped consumer had fetched but not handled wait in its inbox; the
    # client's drain would wait for someone to read them until its 30 s timeout. The
    # stuck handler itself is cancelled once its ack_wait (the stop's grace) is over.
    async with EmbeddedNats() as server:
        broker = NatsBroker(server.url)
        started = asyncio.Event()

        async def stuck(delivery: Delivery) -> None:
            started.set()
            await asyncio.Event().wait()

        await broker.subscribe("backlog.item", "slow", stuck, ack_wait=1)
        await broker.publish("backlog.item", Message("Item", {"i": 0}))
        async with asyncio.timeout(5):
            await started.wait()
        for i in range(1, 20):  # the pending pull request brings them to the inbox
            await broker.publish("backlog.item", Message("Item", {"i": i}))
        await asyncio.sleep(0.3)
        began = time.perf_counter()
        await broker.aclose()
        assert time.perf_counter() - began < 5


@pytest.mark.parametrize("steps_before_cancel", [1, 2, 3])
async def test_a_cancel_while_the_embedded_server_stops_still_removes_it(
    steps_before_cancel: int,
) -> None:
    import asyncio

    server = EmbeddedNats()
    await server.start()
    pid, store = server.pid, server._store
    assert pid is not None
    assert store is not None
    stopping = asyncio.create_task(server.stop())
    for _ in range(steps_before_cancel):
        await asyncio.sleep(0)
    stopping.cancel()
    with pytest.raises(asyncio.CancelledError):
        await stopping
    assert not store.exists()
    async with asyncio.timeout(5):
        while True:  # SIGKILLed if the cancel cut the wait short: gone at once
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            await asyncio.sleep(0.05)


async def test_configured_streams_take_subjects_their_patterns_match_and_refuse_the_rest() -> None:
    got: list[str] = []

    async def handler(delivery: Delivery) -> None:
        got.append(delivery.subject)

    async with EmbeddedNats() as server:
        broker = NatsBroker(
            server.url, streams={"SHOP": ["orders.*", "payments.>"], "AUDIT": ["audit.log"]}
        )
        try:
            await broker.subscribe("orders.*", "g", handler)
            await broker.subscribe("payments.>", "g", handler)
            await broker.publish("orders.created", Message("A"))
            await broker.publish_batch(
                [("payments.card.taken", Message("B")), ("audit.log", Message("C"))]
            )
            await eventually(lambda: sorted(got) == ["orders.created", "payments.card.taken"])
            for uncovered in ("orders.created.late", "invoices.sent", "audit.other"):
                with pytest.raises(ConfigError, match=re.escape(f"{uncovered!r} is in none")):
                    await broker.publish(uncovered, Message("D"))
                with pytest.raises(ConfigError, match=re.escape(f"{uncovered!r} is in none")):
                    await broker.publish_batch(
                        [("orders.ok", Message("E")), (uncovered, Message("D"))]
                    )
            for uncovered in ("orders.>", "audit.*", "invoices.sent"):
                with pytest.raises(ConfigError, match=re.escape(f"{uncovered!r} is in none")):
                    await broker.subscribe(uncovered, "g", handler)
            _, js = await broker._context()
            made = {info.config.name: info.state.messages for info in await js.streams_info()}
        finally:
            await broker.aclose()
    assert made == {"SHOP": 2, "AUDIT": 1, DLQ_STREAM: 0}


def test_a_message_after_the_end_is_shown_but_does_not_reopen_the_flow() -> None:
    monitor = FlowMonitor({"OrderCompleted": "completed", "OrderCancelled": "cancelled"})
    created = Message("OrderCreated", {}, correlation_id="order-1")
    completed = created.caused("OrderCompleted", {})
    late = created.caused("CustomerNotified", {})  # a side branch, arriving last
    for subject, message in [
        ("orders.created", created),
        ("orders.completed", completed),
        ("notifications.sent", late),
    ]:
        monitor.record(message, subject)
    flow = monitor.flow("order-1")
    assert flow is not None
    assert (flow.status, flow.where) == ("completed", "notifications")
    assert [kind for kind, _ in flow.path] == ["OrderCreated", "OrderCompleted", "CustomerNotified"]
    monitor.record(completed.caused("OrderCancelled", {}), "orders.cancelled")
    flow = monitor.flow("order-1")
    assert flow is not None
    assert flow.status == "cancelled"  # a later end state does decide


async def test_a_connect_cut_short_by_a_cancel_leaves_no_socket_open() -> None:
    # nats-py's connect raises a cancel that lands mid-handshake with the socket it
    # opened still open, on a client the caller never gets to close
    import asyncio

    async with EmbeddedNats() as server:
        open_before = open_sockets()
        for step in range(40):  # cancels 0, 0.05, ... 1.95 ms in: through the handshake
            broker = NatsBroker(server.url)
            connecting = asyncio.create_task(broker.connect())
            await asyncio.sleep(step * 0.00005)
            connecting.cancel()
            done, _ = await asyncio.wait({connecting}, timeout=5)
            assert done
            await broker.aclose()
            assert open_sockets() == open_before, f"a socket left by a cancel {step / 20} ms in"


async def test_a_close_cut_short_by_a_cancel_leaves_no_socket_open() -> None:
    # a cancel landing in nats-py's close() (a Ctrl-C while the demo stops) ended it
    # before it closed its socket: the client, dropped, left it to the garbage collector
    import asyncio

    async with EmbeddedNats() as server:
        open_before = open_sockets()
        for steps in range(40):  # cancels 0 ... 39 loop steps into the close
            broker = NatsBroker(server.url)
            await broker.connect()
            closing = asyncio.create_task(broker.aclose())
            for _ in range(steps):
                await asyncio.sleep(0)
            closing.cancel()
            done, _ = await asyncio.wait({closing}, timeout=5)
            assert done
            await broker.aclose()  # (closes one whose close the cancel kept from starting)
            assert open_sockets() == open_before, f"a socket left by a cancel {steps} steps in"


async def test_a_cancel_while_a_broker_connects_or_subscribes_is_raised_not_swallowed() -> None:
    # nats-py awaits its connect and its requests through asyncio.wait_for, which on
    # Python 3.11 drops a cancel that lands as the awaited answer arrives: the cancel
    # (a Ctrl-C in the demo's start-up) must still end the call
    import asyncio

    async def handler(delivery: Delivery) -> None: ...

    async with EmbeddedNats() as server:
        warm = NatsBroker(server.url)  # the streams exist: each subscribe takes ms
        await warm.subscribe("cut.created", "g", handler)
        await warm.aclose()
        cut = 0
        for step in range(60):  # cancels 0, 0.1, ... 5.9 ms in: through every request
            broker = NatsBroker(server.url)
            subscribing = asyncio.create_task(broker.subscribe("cut.created", "g", handler))
            await asyncio.sleep(step * 0.0001)
            cancelled = subscribing.cancel()  # False: it had ended, nothing to cut
            try:
                done, _ = await asyncio.wait({subscribing}, timeout=5)
                consuming = len(broker._subscriptions)  # a cut subscribe starts no consumer
            finally:
                await broker.aclose()
            assert done, f"a subscribe cancelled {step / 10} ms in did not end within 5 s"
            if cancelled:
                cut += 1
                assert subscribing.cancelled(), f"a cancel {step / 10} ms in was swallowed"
                assert consuming == 0, f"a subscribe cancelled {step / 10} ms in consumes"
        others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        assert [t for t in others if "_drain_log" not in repr(t)] == []  # nats-py's are gone
        assert cut > 20  # most cancels landed inside the call


async def test_a_message_over_max_payload_with_its_headers_is_refused_and_the_broker_lives_on() -> (
    None
):
    got: list[str] = []

    async def handler(delivery: Delivery) -> None:
        got.append(delivery.message.id)

    async with EmbeddedNats() as server:
        broker = NatsBroker(server.url, publish_timeout=2)
        try:
            await broker.subscribe("p.x", "g", handler)
            nc, _ = await broker._context()
            # the body alone fits; with its headers (the server counts both) it does not
            big = Message("T", {"s": "x" * (nc.max_payload - 200)}, headers={"x-p": "y" * 500})
            with pytest.raises(InvalidMessage, match="max_payload"):
                await broker.publish("p.x", big)
            with pytest.raises(InvalidMessage, match="max_payload"):
                await broker.publish_batch([("p.x", Message("T")), ("p.x", big)])
            after = Message("T")
            await broker.publish("p.x", after)  # the connection is still there
            await eventually(lambda: after.id in got)
        finally:
            await broker.aclose()
    assert big.id not in got


async def test_a_message_that_fits_max_payload_exactly_is_sent_alone_and_in_a_batch() -> None:
    got: list[str] = []

    async def handler(delivery: Delivery) -> None:
        got.append(delivery.message.id)

    async with EmbeddedNats() as server:
        broker = NatsBroker(server.url, publish_timeout=2)
        try:
            await broker.subscribe("p.x", "g", handler)
            nc, _ = await broker._context()
            full = [Message("T", {"s": ""}) for _ in range(3)]
            body, headers = broker._wire(full[0], None)
            # what the server counts: a "key: value" line per header, the block's
            # first line and blank line, and the body
            size = 12 + sum(len(f"{k}: {v}\r\n".encode()) for k, v in headers.items())
            room = nc.max_payload - size - len(body)
            full = [Message("T", {"s": "x" * room}, id=m.id) for m in full]
            await broker.publish("p.x", full[0])
            await broker.publish_batch([("p.x", full[1]), ("p.x", full[2])])
            await eventually(lambda: len(got) == 3)
        finally:
            await broker.aclose()
    assert sorted(got) == sorted(m.id for m in full)


async def test_a_message_near_max_payload_is_dead_lettered_with_a_shorter_error() -> None:
    handled: list[str] = []

    async def handler(delivery: Delivery) -> None:
        if delivery.message.type == "Big":
            raise PoisonMessage("e" * 900)
        handled.append(delivery.message.id)

    async with EmbeddedNats() as server:
        broker = NatsBroker(server.url, publish_timeout=2)
        try:
            await broker.subscribe("p.x", "g", handler)
            nc, _ = await broker._context()
            big = Message("Big", {"s": "x" * (nc.max_payload - 600)})
            await broker.publish("p.x", big)
            (letter,) = await until(broker.dead_letters)
            after = Message("T")
            await broker.publish("p.x", after)  # the connection is still there
            await eventually(lambda: handled == [after.id])
        finally:
            await broker.aclose()
    assert (letter.message.id, letter.message.data) == (big.id, big.data)
    assert letter.error.startswith("PoisonMessage: eee")


async def test_a_stream_made_over_its_token_tail_only_takes_the_bare_token_too() -> None:
    got: list[str] = []

    async def handler(delivery: Delivery) -> None:
        got.append(delivery.subject)

    async with EmbeddedNats() as server:
        nc = await nats.connect(server.url)
        made = {"name": "P", "subjects": ["p.>"], "storage": "file"}  # as earlier versions
        reply = await nc.request("$JS.API.STREAM.CREATE.P", json.dumps(made).encode())
        assert "error" not in json.loads(reply.data)
        broker = NatsBroker(server.url)
        try:
            await broker.publish("p.x", Message("T"))
            await broker.subscribe("p", "g", handler)
            await broker.publish("p", Message("T"))
            await eventually(lambda: got == ["p"])
            info = await nc.jetstream().stream_info("P")
        finally:
            await broker.aclose()
            await nc.close()
    assert info.config.subjects == ["p", "p.>"]


async def test_a_port_in_use_is_named_as_the_reason_the_server_did_not_start() -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(BrokerUnavailable) as raised:
            async with EmbeddedNats(port=port):
                pass
    message = str(raised.value)
    assert f"port {port} is already in use" in message
    assert "(None)" not in message  # the exit status is known, not a process still running
    assert "exited with status 1" in message


async def test_a_store_dir_in_use_by_a_running_server_is_refused_to_a_second(
    tmp_path: Path,
) -> None:
    store = tmp_path / "js"
    async with EmbeddedNats(store_dir=store) as first:
        with pytest.raises(BrokerUnavailable) as refused:
            async with EmbeddedNats(store_dir=store):
                pass
        assert str(refused.value) == (
            f"the JetStream store in {store} is in use by another nats-server "
            f"(pid {first.pid}); two servers writing one store would corrupt it"
        )
        assert first.running
        await first.kill()  # a SIGKILLed server holds the store no longer
        async with EmbeddedNats(store_dir=store) as second:
            with pytest.raises(BrokerUnavailable, match="in use by another nats-server"):
                await first.start()  # nor does its owner, which would restart it
            assert second.running
    async with EmbeddedNats(store_dir=store) as third:  # stopped: free again
        assert third.running


STORE_OWNER = """
import asyncio, sys
from seamwork.brokers import EmbeddedNats

async def main():
    async with EmbeddedNats(store_dir=sys.argv[1]) as server:
        print(server.pid, flush=True)
        await asyncio.Event().wait()

asyncio.run(main())
"""


def test_a_store_dir_whose_owner_and_server_were_sigkilled_can_be_used_again(
    tmp_path: Path,
) -> None:
    import subprocess
    import sys

    store = tmp_path / "js"
    with subprocess.Popen(
        [sys.executable, "-c", STORE_OWNER, str(store)], stdout=subprocess.PIPE, text=True
    ) as owner:
        assert owner.stdout is not None
        pid = int(owner.stdout.readline())
        owner.kill()
    os.kill(pid, signal.SIGKILL)  # both gone, the lock file left behind

    async def again() -> None:
        async with EmbeddedNats(store_dir=store) as server:
            assert server.running

    async def gone() -> None:
        while True:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            await asyncio.sleep(0.05)

    async def both() -> None:
        async with asyncio.timeout(5):
            await gone()
        await again()

    asyncio.run(both())


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGKILL])
def test_an_owner_killed_without_a_chance_to_stop_its_server_takes_the_server_along(
    sig: signal.Signals,
) -> None:
    # SIGTERM (kill, docker stop), SIGHUP (a closed terminal) and SIGKILL end a Python
    # process without running its finally blocks: the server, in a process group of its
    # own, must not be left serving, holding its port and store, with no one to stop it
    import subprocess
    import sys

    with subprocess.Popen(
        [sys.executable, "-c", OWNER], stdout=subprocess.PIPE, text=True
    ) as owner:
        assert owner.stdout is not None
        pid_text, _, store = owner.stdout.readline().split(" ", 2)
        pid = int(pid_text)
        owner.send_signal(sig)
    deadline = time.monotonic() + 5
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            pytest.fail(f"nats-server {pid} outlived its owner killed with {sig.name}")
        time.sleep(0.05)
    import shutil

    # the temporary store its owner had no chance to remove (unless another embedded
    # server started meanwhile, by another test run on the machine, removed it first)
    shutil.rmtree(store.strip(), ignore_errors=True)


async def test_a_server_not_ready_in_time_says_so_and_what_it_last_logged(
    tmp_path: Path,
) -> None:
    slow = tmp_path / "slow-nats-server"
    slow.write_text("#!/bin/sh\necho 'Starting JetStream' >&2\nexec sleep 30\n")
    slow.chmod(0o755)
    with pytest.raises(BrokerUnavailable) as raised:
        async with EmbeddedNats(binary=str(slow), start_timeout=0.5):
            pass
    assert str(raised.value) == (
        "nats-server did not start: not ready within 0.5 s (last logged: Starting JetStream)"
    )


TEMP_OWNER = """
import asyncio
from seamwork.brokers import EmbeddedNats

async def main():
    async with EmbeddedNats() as server:
        print(server.pid, server._store, flush=True)
        await asyncio.Event().wait()

asyncio.run(main())
"""


def test_a_temporary_store_left_by_a_killed_owner_is_removed_by_the_next_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # an owner killed with SIGKILL runs no finally: its server follows it (SIGTERM from
    # the kernel), but the temporary store, JetStream data and all, stayed on disk for
    # good; the next embedded server started on the machine removes it
    import subprocess
    import sys

    env = {**os.environ, "TMPDIR": str(tmp_path)}
    with subprocess.Popen(
        [sys.executable, "-c", TEMP_OWNER], stdout=subprocess.PIPE, text=True, env=env
    ) as owner:
        assert owner.stdout is not None
        pid_text, store_text = owner.stdout.readline().split(" ", 1)
        owner.kill()
    pid, abandoned = int(pid_text), Path(store_text.strip())
    assert abandoned.parent == tmp_path
    assert abandoned.is_dir()
    deadline = time.monotonic() + 5
    while True:  # the server goes with its owner (and with it the store's lock)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        assert time.monotonic() < deadline, "the server outlived its owner"
        time.sleep(0.05)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))

    async def next_server() -> None:
        async with EmbeddedNats() as server:
            assert server.running
            assert not abandoned.exists()

    asyncio.run(next_server())


async def test_a_temporary_store_whose_owner_lives_is_kept_while_its_server_is_down(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a chaos test kills its server and starts it again on the same store: another
    # server starting meanwhile must not take the store for abandoned
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    first = EmbeddedNats()
    await first.start()
    try:
        broker = NatsBroker(first.url)
        await broker.publish("keep.it", Message("Kept", {"n": 1}))
        await broker.aclose()
        await first.kill()
        async with EmbeddedNats() as second:
            assert second.running
        await first.start()
        broker = NatsBroker(first.url)
        try:
            seen: asyncio.Queue[Message] = asyncio.Queue()

            async def handler(delivery: Delivery) -> None:
                await seen.put(delivery.message)

            await broker.subscribe("keep.it", group="reader", handler=handler)
            async with asyncio.timeout(5):
                assert (await seen.get()).data == {"n": 1}
        finally:
            await broker.aclose()
    finally:
        await first.stop()
    assert list(tmp_path.iterdir()) == []


async def test_an_embedded_server_takes_the_max_payload_it_is_given() -> None:
    with pytest.raises(ConfigError, match="max_payload"):
        EmbeddedNats(max_payload=0)
    async with EmbeddedNats(max_payload=4096) as server:
        broker = NatsBroker(server.url)
        try:
            nc, _ = await broker._context()
            assert nc.max_payload == 4096
            with pytest.raises(InvalidMessage, match="over the server's max_payload of 4096"):
                await broker.publish("orders.created", Message("T", {"s": "x" * 4096}))
            await broker.publish("orders.created", Message("T", {"s": "x" * 100}))
        finally:
            await broker.aclose()


@pytest.mark.parametrize(
    "url", ["nats://demo:s3cret@127.0.0.1:1", "nats://s3cret@127.0.0.1:1"], ids=["user", "token"]
)
async def test_a_url_with_credentials_is_never_shown_with_them(url: str) -> None:
    broker = NatsBroker(url, publish_timeout=1.0)
    assert "s3cret" not in repr(broker)
    shown = r"cannot connect to NATS at nats://\*\*\*@127\.0\.0\.1:1: "
    with pytest.raises(BrokerUnavailable, match=shown) as e:
        await broker.connect()
    assert "s3cret" not in str(e.value)


async def test_two_starts_at_once_start_one_server_both_can_use() -> None:
    # the second saw no server yet, spawned one on the same store, failed on its lock,
    # and its clean-up killed the first one's server and removed its store
    server = EmbeddedNats()
    try:
        await asyncio.gather(server.start(), server.start())
        assert server.running
        broker = NatsBroker(server.url)
        try:
            await broker.publish("twice.started", Message("T"))
        finally:
            await broker.aclose()
    finally:
        await server.stop()


async def _stuck_subscriptions(
    broker: NatsBroker, subjects: Sequence[str]
) -> list[asyncio.Task[None]]:
    """A subscription per subject (ack_wait 1 s) whose handler is in hand, stuck."""
    started = [asyncio.Event() for _ in subjects]
    consumers: list[asyncio.Task[None]] = []
    for subject, event in zip(subjects, started, strict=True):

        async def stuck(delivery: Delivery, event: asyncio.Event = event) -> None:
            event.set()
            await asyncio.Event().wait()

        subscription = await broker.subscribe(subject, "g", stuck, ack_wait=1)
        assert subscription._task is not None
        consumers.append(subscription._task)
        await broker.publish(subject, Message("T"))
    async with asyncio.timeout(5):
        for event in started:
            await event.wait()
    return consumers


async def test_closing_a_broker_stops_its_subscriptions_together() -> None:
    """aclose() stopped one subscription after the other: each waited its own grace for
    the handler in hand (two stuck handlers took 2 s of 1 s graces), and the others
    went on taking messages meanwhile."""
    async with EmbeddedNats() as server:
        broker = NatsBroker(server.url)
        await _stuck_subscriptions(broker, ["p.a", "p.b"])
        began = time.perf_counter()
        await broker.aclose()
        took = time.perf_counter() - began
        # the messages whose handlers never finished were not acknowledged: they come
        # back to the group's next member (after the 1 s ack_wait)
        back: list[str] = []

        async def handler(delivery: Delivery) -> None:
            back.append(delivery.subject)

        again = NatsBroker(server.url)
        try:
            for subject in ("p.a", "p.b"):
                await again.subscribe(subject, "g", handler, ack_wait=1)
            await eventually(lambda: sorted(back) == ["p.a", "p.b"], 5)
        finally:
            await again.aclose()
    assert 0.9 < took < 1.6


async def test_a_cancel_while_the_broker_waits_for_a_handler_still_stops_its_consumer() -> None:
    """A cancel landing while aclose() waited for a handler in hand left that
    subscription's consumer running after the connection was closed."""
    async with EmbeddedNats() as server:
        broker = NatsBroker(server.url)
        consumers = await _stuck_subscriptions(broker, ["p.a"])
        closing = asyncio.create_task(broker.aclose())
        await asyncio.sleep(0.2)
        closing.cancel()
        async with asyncio.timeout(5):
            await asyncio.wait({closing})
        assert closing.cancelled()
        assert all(consumer.done() for consumer in consumers)


async def test_a_stream_made_elsewhere_that_does_not_take_the_subject_is_a_config_error() -> None:
    """A stream ``P`` an operator made over ``p.a`` only: a publish to ``p.b`` found no
    stream and failed as a PublishError ('no response from stream'), which a relay
    retries for good; a stream over ``p.>`` under another name made creating ``P`` a
    BrokerUnavailable. Each is a ConfigError naming the stream, and nothing is stored."""
    async with EmbeddedNats() as server:
        nc = await nats.connect(server.url)
        for made in (
            {"name": "P", "subjects": ["p.a"], "storage": "file"},
            {"name": "SHOP", "subjects": ["q.>"], "storage": "file"},
        ):
            reply = await nc.request(
                f"$JS.API.STREAM.CREATE.{made['name']}", json.dumps(made).encode()
            )
            assert "error" not in json.loads(reply.data)
        broker = NatsBroker(server.url, publish_timeout=1)
        try:
            await broker.publish("p.a", Message("T"))  # P is taken as it is
            with pytest.raises(ConfigError, match=r"stream P .*'p\.a'.*'p\.b'"):
                await broker.publish("p.b", Message("T"))
            with pytest.raises(ConfigError, match=r"stream P .*'p\.a'.*'p\.c'"):
                await broker.publish_batch([("p.c", Message("T")), ("p.c", Message("T"))])
            with pytest.raises(ConfigError, match=r"overlap.*SHOP.*streams="):
                await broker.publish("q.x", Message("T"))
            info = await nc.jetstream().stream_info("P")
            shop = await nc.jetstream().stream_info("SHOP")
        finally:
            await broker.aclose()
            await nc.close()
    assert (info.state.messages, shop.state.messages) == (1, 0)


async def test_a_longer_duplicate_window_is_given_to_a_stream_made_with_a_shorter_one() -> None:
    """``duplicate_window=`` was only set on a stream seamwork created: a stream made
    earlier (or elsewhere) kept its window, so a relay's page re-sent after a crash,
    later than that window but inside the configured one, was stored twice."""
    async with EmbeddedNats() as server:
        nc = await nats.connect(server.url)
        js = nc.jetstream()
        first = NatsBroker(server.url, duplicate_window=5)
        try:
            await first.publish("p.x", Message("T"))
        finally:
            await first.aclose()
        windows = []
        for configured in (600, 60):  # a shorter one never shortens it
            broker = NatsBroker(server.url, duplicate_window=configured)
            try:
                await broker.publish("p.x", Message("T"))
            finally:
                await broker.aclose()
            windows.append((await js.stream_info("P")).config.duplicate_window)
        await nc.close()
    assert windows == [600, 600]


async def test_a_batch_the_client_cannot_buffer_while_the_server_is_down_is_a_publish_error() -> (
    None
):
    """With the server down, nats-py buffers what is published until its buffer is
    full; an atomic batch past that raised nats' own OutboundBufferLimitError out of
    publish_batch, naming nothing, where the port promises PublishError (which the
    relay retries). Once the server is back, the batch is stored, each message once."""
    big = "x" * 100_000
    items = [("p.x", Message("T", {"b": big, "i": i})) for i in range(40)]
    async with EmbeddedNats() as server:
        broker = NatsBroker(server.url, publish_timeout=1)
        try:
            await broker.publish("p.x", Message("T"))
            await server.kill()
            with pytest.raises(PublishError, match=r"batch of 40 to p\.x"):
                await broker.publish_batch(items)
            await server.start()
            await eventually(lambda: broker._nc is not None and broker._nc.is_connected)
            await broker.publish_batch(items)
            _, js = await broker._context()
            info = await js.stream_info("P")
        finally:
            await broker.aclose()
    assert info.state.messages == 41


async def test_a_group_subscribed_again_with_another_ack_wait_gets_it_on_the_server() -> None:
    """The durable consumer kept the ack_wait of the subscribe that made it, while a
    member marks what it holds in progress every third of its own: a group raised from
    1 s to 6 s was marked every 2 s on a server redelivering after 1 s, so a handler of
    1.5 s had its message handed to another member while it ran - handled twice."""
    handled: list[str] = []
    async with EmbeddedNats() as server:
        broker = NatsBroker(server.url)
        other = NatsBroker(server.url)

        async def slow(delivery: Delivery) -> None:
            handled.append(delivery.message.id)
            await asyncio.sleep(1.5)

        try:
            first = await broker.subscribe("p.x", "g", slow, ack_wait=1)
            await first.stop()
            members = [await b.subscribe("p.x", "g", slow, ack_wait=6) for b in (broker, other)]
            await broker.publish("p.x", Message("T", id="m1"))
            await eventually(lambda: sum(m.stats.acked for m in members) == 1)
            _, js = await broker._context()
            info = await js.consumer_info("P", "g__p_x")
        finally:
            await asyncio.gather(broker.aclose(), other.aclose())
    assert handled == ["m1"]
    assert info.config.ack_wait == 6


@pytest.mark.parametrize(
    ("streams", "named"),
    [
        ({"A": ["p.>"], "B": ["p.x"]}, "'p.>' of stream A and 'p.x' of stream B"),
        ({"A": ["p.*.x"], "B": ["p.y.*"]}, "'p.*.x' of stream A and 'p.y.*' of stream B"),
        ({"A": ["p.x"], "B": ["q", "p.x"]}, "'p.x' of stream A and 'p.x' of stream B"),
    ],
)
def test_configured_streams_whose_subjects_overlap_are_refused_by_name(
    streams: dict[str, list[str]], named: str
) -> None:
    """Streams configured over overlapping subjects were taken: a subject listed under
    two went to the last one silently, and the server refused to make the second
    stream only at its first publish (a BrokerUnavailable the relay retried)."""
    with pytest.raises(ConfigError, match=re.escape(named)):
        NatsBroker("nats://127.0.0.1:4222", streams=streams)


def test_configured_streams_that_do_not_overlap_are_taken() -> None:
    streams = {"A": ["p.x", "p.*.a"], "B": ["p.y", "p.*.b", "q.>"], "C": ["p"]}
    NatsBroker("nats://127.0.0.1:4222", streams=streams)


async def test_a_message_whose_consumers_keep_dying_on_it_is_dead_lettered_as_a_crash_loop() -> (
    None
):
    # a handler that takes its process down never raises, so max_deliver (failures)
    # never counted it: the message came back to each new member for good. Here each
    # member is closed while its handler still holds the message (as a crash would
    # leave it), and the message goes out again after ack_wait
    subject = f"crash{uuid.uuid4().hex[:6]}.loop"
    message = Message("Poison", {"n": 1})
    held = asyncio.Event()
    handled: list[int] = []

    async def dies_on_it(delivery: Delivery) -> None:
        handled.append(delivery.attempt)
        held.set()
        await asyncio.Event().wait()  # never settles: its member goes down holding it

    async with EmbeddedNats() as server:
        publisher = NatsBroker(server.url)
        try:
            await publisher.publish(subject, message)
            for _ in range(3):  # members 1 and 2 go down holding it
                member = NatsBroker(server.url, crash_limit=2)
                held.clear()
                await member.subscribe(subject, "g", dies_on_it, max_deliver=1, ack_wait=0.5)
                if len(handled) == 2:  # the third member: no handler run, dead-lettered
                    letters = await until(publisher.dead_letters, 5)
                    await member.aclose()
                    break
                async with asyncio.timeout(5):
                    await held.wait()
                subscription = member._subscriptions[0]
                subscription._grace = 0.05  # (its ack_wait: not worth waiting out)
                await member.aclose()
            assert handled == [1, 2]
            (letter,) = letters
            assert letter.message.id == message.id
            assert "crash loop" in letter.error
        finally:
            await publisher.aclose()


async def test_a_broker_closed_while_it_connects_leaves_no_connection_open() -> None:
    # aclose() took the client before the connect in progress stored it: it closed
    # nothing, and the connection the connect then stored stayed open on a closed
    # broker (a socket left to the garbage collector, after its loop was gone)
    async with EmbeddedNats() as server:
        open_before = open_sockets()
        for step in range(20):  # closes 0, 0.1, ... 1.9 ms into the connect
            broker = NatsBroker(server.url)
            connecting = asyncio.create_task(broker.connect())
            await asyncio.sleep(step * 0.0001)
            await broker.aclose()
            done, _ = await asyncio.wait({connecting}, timeout=5)
            assert done
            error = connecting.exception()  # overtaken by the close: said so
            assert error is None or isinstance(error, BrokerUnavailable), error
            assert open_sockets() == open_before, f"a connection left by a close {step / 10} ms in"
            await broker.aclose()  # (for the next round, whatever happened)
