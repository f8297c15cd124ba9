"""The ``Broker`` contract: behaviour every broker adapter must have.

Subclass ``BrokerContract`` as ``Test...`` and implement ``make_broker`` (a new,
unconnected broker on a real server). Subjects are made unique per test with
``self.subject()``, so runs on a shared server never collide. Requires pytest with
pytest-asyncio (``asyncio_mode=auto``).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import pytest

from seamwork.errors import ConfigError, InvalidMessage, MessagingError
from seamwork.messaging import (
    Broker,
    DeadLetter,
    Delivery,
    Message,
    PoisonMessage,
    Subscription,
)

T = TypeVar("T")


async def eventually(check: Callable[[], bool], seconds: float = 10.0) -> None:
    """Wait until ``check()`` holds, or fail."""

    async def probe() -> bool:
        return check()

    await until(probe, seconds)


async def until(probe: Callable[[], Awaitable[T | None]], seconds: float = 10.0) -> T:
    """Poll ``await probe()`` until it returns something truthy; return that, or fail.

    (Polling is the point: the tests watch a real server from the outside.)
    """
    async with asyncio.timeout(seconds):
        while not (found := await probe()):  # noqa: ASYNC110
            await asyncio.sleep(0.02)
    return found


class BrokerContract:
    """Behaviour shared by every ``Broker`` adapter."""

    async def make_broker(self) -> Broker:
        raise NotImplementedError

    def subject(self, name: str = "created") -> str:
        if not hasattr(self, "_prefix"):
            self._prefix = f"t{uuid.uuid4().hex[:10]}"
        return f"{self._prefix}.{name}"

    @pytest.fixture
    async def broker(self) -> AsyncIterator[Broker]:
        broker = await self.make_broker()
        await broker.connect()
        try:
            yield broker
        finally:
            await broker.aclose()

    async def test_a_published_message_reaches_a_group_with_its_identity(
        self, broker: Broker
    ) -> None:
        got: list[Delivery] = []

        async def handler(delivery: Delivery) -> None:
            got.append(delivery)

        subject = self.subject()
        await broker.subscribe(subject, "g1", handler)
        sent = Message(
            "OrderCreated",
            {"order_id": 42, "note": "café"},
            correlation_id="flow-1",
            causation_id="cmd-1",
            headers={"traceparent": "00-abc-def-01"},
        )
        await broker.publish(subject, sent)
        await eventually(lambda: len(got) == 1)
        received = got[0]
        assert received.message == sent
        assert (received.subject, received.group, received.attempt) == (subject, "g1", 1)

    def _long_and_unicode(self, id: str) -> Message:
        """(Ids unique per test: a server's duplicate window outlives a run.)"""
        return Message(
            "T" * 300,
            {"note": "é" * 10},
            id=f"{self.subject()}-{id * 300}",
            correlation_id="c" * 300,
            causation_id="cause-é✓" * 40,
            headers={"x-long": "v" * 3000, "x-uni": "naïve ✓ 日本", "x-empty": ""},
        )

    async def test_long_unicode_and_empty_identity_and_headers_arrive_exactly(
        self, broker: Broker
    ) -> None:
        got: list[Message] = []

        async def handler(delivery: Delivery) -> None:
            got.append(delivery.message)

        subject = self.subject()
        await broker.subscribe(subject, "g1", handler)
        sent = [
            self._long_and_unicode("i"),
            Message("Tÿpe", id=f"{self.subject()}-{'é' * 200}", correlation_id="日本" * 50),
        ]
        await broker.publish(subject, sent[0])
        await broker.publish_batch([(subject, sent[1])])
        await eventually(lambda: len(got) == 2)
        assert got == sent

    async def test_each_message_goes_to_one_member_of_a_group_and_to_every_group(
        self, broker: Broker
    ) -> None:
        seen: dict[str, list[int]] = {"a1": [], "a2": [], "b": []}

        def collect(name: str) -> Callable[[Delivery], asyncio.Future[None]]:
            async def handler(delivery: Delivery) -> None:
                seen[name].append(delivery.message.data["n"])

            return handler  # type: ignore[return-value]

        subject = self.subject()
        await broker.subscribe(subject, "a", collect("a1"))
        await broker.subscribe(subject, "a", collect("a2"))
        await broker.subscribe(subject, "b", collect("b"))
        await broker.publish_batch([(subject, Message("N", {"n": n})) for n in range(40)])
        await eventually(lambda: len(seen["a1"]) + len(seen["a2"]) == 40 and len(seen["b"]) == 40)
        assert sorted(seen["a1"] + seen["a2"]) == list(range(40))
        assert sorted(seen["b"]) == list(range(40))

    async def test_a_batch_arrives_in_order(self, broker: Broker) -> None:
        got: list[int] = []

        async def handler(delivery: Delivery) -> None:
            got.append(delivery.message.data["n"])

        subject = self.subject()
        await broker.subscribe(subject, "ordered", handler)
        await broker.publish_batch([(subject, Message("N", {"n": n})) for n in range(300)])
        await eventually(lambda: len(got) == 300)
        assert got == list(range(300))

    async def test_a_failing_message_is_redelivered_then_succeeds(self, broker: Broker) -> None:
        attempts: list[int] = []

        async def handler(delivery: Delivery) -> None:
            attempts.append(delivery.attempt)
            if delivery.attempt < 3:
                raise ConnectionError("downstream busy")

        subject = self.subject()
        await broker.subscribe(subject, "retry", handler, max_deliver=5, retry_delay=0.05)
        await broker.publish(subject, Message("N", {}))
        await eventually(lambda: len(attempts) == 3)
        await asyncio.sleep(0.3)
        assert attempts == [1, 2, 3]

    async def test_a_message_failing_max_deliver_times_is_dead_lettered_and_others_flow(
        self, broker: Broker
    ) -> None:
        handled: list[int] = []

        async def handler(delivery: Delivery) -> None:
            if delivery.message.data["n"] == 2:
                raise ValueError("cannot handle n=2")
            handled.append(delivery.message.data["n"])

        subject = self.subject()
        await broker.subscribe(subject, "dlq", handler, max_deliver=3, retry_delay=0.02)
        poison = Message("N", {"n": 2})
        first, last = Message("N", {"n": 1}), Message("N", {"n": 3})
        await broker.publish_batch([(subject, first), (subject, poison), (subject, last)])
        await eventually(lambda: sorted(handled) == [1, 3])

        async def dead() -> list[DeadLetter]:
            return [x for x in await broker.dead_letters() if x.subject == subject]

        (letter,) = await until(dead)
        assert letter.message.id == poison.id
        assert (letter.group, letter.attempts) == ("dlq", 3)
        assert "cannot handle n=2" in letter.error

    @pytest.mark.parametrize("error", [PoisonMessage, InvalidMessage])
    async def test_poison_and_invalid_messages_skip_the_retries(
        self, broker: Broker, error: type[MessagingError]
    ) -> None:
        attempts: list[int] = []

        async def handler(delivery: Delivery) -> None:
            attempts.append(delivery.attempt)
            raise error("never valid")

        subject = self.subject()
        await broker.subscribe(subject, "poison", handler, max_deliver=5)
        await broker.publish(subject, Message("N", {}))

        async def lettered() -> bool:
            return any(x.subject == subject for x in await broker.dead_letters())

        await until(lettered)
        await asyncio.sleep(0.2)
        assert attempts == [1]

    async def test_a_dead_letter_can_be_replayed_once_fixed(self, broker: Broker) -> None:
        fixed = False
        handled: list[str] = []

        async def handler(delivery: Delivery) -> None:
            if not fixed:
                raise PoisonMessage("not yet")
            handled.append(delivery.message.id)

        subject = self.subject()
        await broker.subscribe(subject, "replay", handler)
        message = Message("N", {})
        await broker.publish(subject, message)

        async def dead() -> DeadLetter | None:
            return next((x for x in await broker.dead_letters() if x.subject == subject), None)

        letter = await until(dead)
        fixed = True
        await broker.replay_dead_letter(letter.key)
        await eventually(lambda: handled == [message.id])
        assert all(x.key != letter.key for x in await broker.dead_letters())

    async def test_a_dead_letter_keeps_long_unicode_and_empty_identity_and_headers(
        self, broker: Broker
    ) -> None:
        """Listed and replayed exactly as sent; so are its subject and error."""
        got: list[Message] = []
        fixed = False

        async def handler(delivery: Delivery) -> None:
            if not fixed:
                raise PoisonMessage("refusé ✓")
            got.append(delivery.message)

        subject = self.subject("café")
        await broker.subscribe(self.subject("*"), "dl", handler)  # (no RabbitMQ queue name
        # holds "é": the group takes it through a wildcard)
        sent = self._long_and_unicode("j")
        await broker.publish(subject, sent)

        async def letter() -> DeadLetter | None:
            letters = await broker.dead_letters(limit=10_000)
            return next((x for x in letters if x.message.id == sent.id), None)

        found = await until(letter)
        assert (found.message, found.subject, found.error) == (
            sent,
            subject,
            "PoisonMessage: refusé ✓",
        )
        fixed = True
        await broker.replay_dead_letter(found.key)
        await eventually(lambda: got == [sent])

    async def test_a_dead_letter_of_a_wildcard_group_keeps_and_replays_to_its_own_subject(
        self, broker: Broker
    ) -> None:
        fixed = False
        handled: list[str] = []

        async def handler(delivery: Delivery) -> None:
            if not fixed:
                raise PoisonMessage("not yet")
            handled.append(delivery.subject)

        subject = self.subject("created")
        await broker.subscribe(self.subject("*"), "wild", handler)
        await broker.publish(subject, Message("N", {}))

        async def dead() -> DeadLetter | None:
            letters = await broker.dead_letters(limit=10_000)
            return next((x for x in letters if x.subject.startswith(self._prefix)), None)

        letter = await until(dead)
        assert letter.subject == subject
        fixed = True
        await broker.replay_dead_letter(letter.key)
        await eventually(lambda: handled == [subject])

    @pytest.mark.parametrize("key", ["999999999", "not-a-key", "0", "-1"])
    async def test_replaying_an_unknown_dead_letter_is_refused_by_its_key(
        self, broker: Broker, key: str
    ) -> None:
        with pytest.raises(MessagingError, match=f"no dead letter with key '{key}'"):
            await broker.replay_dead_letter(key)

    async def test_headers_too_large_are_refused_before_sending(self, broker: Broker) -> None:
        big = Message("N", {}, headers={"x-big": "a" * 20_000})
        with pytest.raises(InvalidMessage, match="headers"):
            await broker.publish(self.subject(), big)

    @pytest.mark.parametrize(
        ("extra", "named"),
        [
            ({"x-big": "a" * 20_000}, "headers are"),
            ({"bad name": "x"}, "header name 'bad name'"),
            ({"x-trace": "a\r\nb"}, "line break"),
            ({"x-trace": " padded"}, "surrounding whitespace"),
            ({"Seamwork-Type": "Other"}, "set by seamwork"),
        ],
    )
    async def test_extra_headers_given_to_publish_are_checked_like_the_messages_own(
        self, broker: Broker, extra: dict[str, str], named: str
    ) -> None:
        got: list[Delivery] = []

        async def handler(delivery: Delivery) -> None:
            got.append(delivery)

        subject = self.subject()
        await broker.subscribe(subject, "extra", handler)
        with pytest.raises(InvalidMessage, match=named):
            await broker.publish(subject, Message("N", {}), headers=extra)
        await broker.publish(subject, Message("N", {}), headers={"x-trace": "ok"})
        await eventually(lambda: len(got) == 1)
        assert got[0].message.headers == {"x-trace": "ok"}

    @pytest.mark.parametrize(
        ("name", "named"),
        [
            ("a..b", "empty token"),
            ("a b", "whitespace"),
            ("a\r\nb", "whitespace"),
            ("*", "wildcard"),
        ],
    )
    async def test_a_malformed_subject_is_refused_by_name_before_sending(
        self, broker: Broker, name: str, named: str
    ) -> None:
        with pytest.raises(ConfigError, match=named):
            await broker.publish(self.subject(name), Message("N"))
        with pytest.raises(ConfigError, match=named):
            await broker.publish_batch(
                [(self.subject(), Message("N")), (self.subject(name), Message("N"))]
            )

    @pytest.mark.parametrize(
        ("name", "named"), [("a..b", "empty token"), ("a b", "whitespace"), (">.a", "last token")]
    )
    async def test_subscribing_to_a_malformed_subject_is_refused_by_name(
        self, broker: Broker, name: str, named: str
    ) -> None:
        async def handler(delivery: Delivery) -> None:
            raise AssertionError("nothing is delivered to a refused subscription")

        with pytest.raises(ConfigError, match=named):
            await broker.subscribe(self.subject(name), "g", handler)

    @pytest.mark.parametrize(
        ("settings", "named"),
        [
            ({"group": ""}, "consumer group"),
            ({"max_deliver": 0}, "max_deliver"),
            ({"ack_wait": 0}, "ack_wait"),
            ({"retry_delay": -1}, "retry_delay"),
        ],
    )
    async def test_bad_subscribe_settings_are_refused_by_name(
        self, broker: Broker, settings: dict[str, object], named: str
    ) -> None:
        async def handler(delivery: Delivery) -> None:
            raise AssertionError("nothing is delivered to a refused subscription")

        options = {k: v for k, v in settings.items() if k != "group"}
        group = str(settings.get("group", "g"))
        with pytest.raises(ConfigError, match=named):
            await broker.subscribe(self.subject(), group, handler, **options)  # type: ignore[arg-type]

    async def test_a_subject_of_one_token_is_delivered_beside_longer_ones(
        self, broker: Broker
    ) -> None:
        got: dict[str, list[str]] = {"one": [], "longer": []}

        def collect(name: str) -> Callable[[Delivery], Awaitable[None]]:
            async def handler(delivery: Delivery) -> None:
                got[name].append(delivery.subject)

            return handler

        one = self.subject().split(".")[0]  # this test's prefix: a subject of its own
        await broker.subscribe(one, "g", collect("one"))
        await broker.subscribe(f"{one}.x", "g", collect("longer"))
        await broker.publish(one, Message("N", {}))
        await broker.publish_batch([(one, Message("N", {})), (f"{one}.x", Message("N", {}))])
        await eventually(lambda: got == {"one": [one, one], "longer": [f"{one}.x"]})

    async def test_a_tail_wildcard_takes_one_or_more_tokens_never_none(
        self, broker: Broker
    ) -> None:
        got: list[str] = []

        async def handler(delivery: Delivery) -> None:
            got.append(delivery.subject)

        one = self.subject().split(".")[0]
        await broker.subscribe(f"{one}.>", "tail", handler)
        await broker.subscribe(one, "bare", handler)  # so the bare subject is routed
        await broker.publish(one, Message("N", {}))
        await broker.publish(f"{one}.x.y", Message("N", {}))
        await eventually(lambda: sorted(got) == [one, f"{one}.x.y"])
        await asyncio.sleep(0.3)
        assert sorted(got) == [one, f"{one}.x.y"]  # the bare one reached "bare" only

    async def test_a_handler_slower_than_ack_wait_keeps_its_messages_handled_once(
        self, broker: Broker
    ) -> None:
        """A message in hand (and those a member has taken but not started) is not
        handed to another member while the handler runs, however long it takes."""
        handled: list[int] = []
        running: set[int] = set()
        overlaps: list[int] = []

        async def slow(delivery: Delivery) -> None:
            n = delivery.message.data["n"]
            if n in running:
                overlaps.append(n)
            running.add(n)
            handled.append(n)
            await asyncio.sleep(2.5 if n == 0 else 0.3)  # ack_wait is 1 s
            running.discard(n)

        subject = self.subject()
        await broker.subscribe(subject, "slow", slow, ack_wait=1)
        await broker.subscribe(subject, "slow", slow, ack_wait=1)
        await broker.publish(subject, Message("N", {"n": 0}))
        await eventually(lambda: handled == [0])
        await broker.publish_batch([(subject, Message("N", {"n": n})) for n in range(1, 9)])
        await eventually(lambda: set(handled) == set(range(9)), seconds=20)
        await asyncio.sleep(2.5)  # past ack_wait: nothing comes back
        assert overlaps == []
        assert sorted(handled) == list(range(9))

    async def test_stop_lets_the_message_in_hand_finish_and_starts_no_other(
        self, broker: Broker
    ) -> None:
        events: list[str] = []
        first_started = asyncio.Event()

        async def handler(delivery: Delivery) -> None:
            i = delivery.message.data["i"]
            events.append(f"start {i}")
            first_started.set()
            try:
                await asyncio.sleep(0.3)
            except asyncio.CancelledError:
                events.append(f"cancelled {i}")
                raise
            events.append(f"done {i}")

        subject = self.subject()
        subscription = await broker.subscribe(subject, "g", handler, ack_wait=1)
        await broker.publish_batch([(subject, Message("N", {"i": i})) for i in range(5)])
        await first_started.wait()
        await subscription.stop()
        assert events == ["start 0", "done 0"]
        rest: list[int] = []

        async def collect(delivery: Delivery) -> None:
            rest.append(delivery.message.data["i"])

        await broker.subscribe(subject, "g", collect, ack_wait=1)
        await eventually(lambda: sorted(rest) == [1, 2, 3, 4])
        await asyncio.sleep(1.5)  # past ack_wait: the message that finished was settled
        assert sorted(rest) == [1, 2, 3, 4]

    async def test_stop_called_by_its_own_handler_returns_at_once_and_settles_that_message(
        self, broker: Broker
    ) -> None:
        subject = self.subject()
        subscriptions: list[Subscription] = []
        events: list[str] = []
        stopped = asyncio.Event()
        loop = asyncio.get_running_loop()

        async def handler(delivery: Delivery) -> None:
            i = delivery.message.data["i"]
            events.append(f"start {i}")
            began = loop.time()
            try:
                await subscriptions[0].stop()
            except asyncio.CancelledError:
                events.append(f"cancelled {i}")
                raise
            events.append(f"stopped {i} in {loop.time() - began < 0.5}")
            stopped.set()

        subscriptions.append(await broker.subscribe(subject, "g", handler, ack_wait=2))
        await broker.publish_batch([(subject, Message("N", {"i": i})) for i in range(3)])
        async with asyncio.timeout(10):
            await stopped.wait()
        await asyncio.sleep(0.5)
        assert events == ["start 0", "stopped 0 in True"]  # returned at once, took no other
        rest: list[int] = []

        async def collect(delivery: Delivery) -> None:
            rest.append(delivery.message.data["i"])

        await broker.subscribe(subject, "g", collect, ack_wait=2)
        await eventually(lambda: sorted(rest) == [1, 2])
        await asyncio.sleep(2.5)  # past ack_wait: the message whose handler stopped was settled
        assert sorted(rest) == [1, 2]
        async with asyncio.timeout(5):
            await subscriptions[0].stop()  # stopping it again from outside is harmless

    async def test_stop_waits_for_a_handler_that_never_returns_only_ack_wait(
        self, broker: Broker
    ) -> None:
        started = asyncio.Event()

        async def stuck(delivery: Delivery) -> None:
            started.set()
            await asyncio.Event().wait()

        subject = self.subject()
        subscription = await broker.subscribe(subject, "g", stuck, ack_wait=1)
        sent = Message("N", {})
        await broker.publish(subject, sent)
        await started.wait()
        loop = asyncio.get_running_loop()
        began = loop.time()
        async with asyncio.timeout(10):
            await subscription.stop()
        assert loop.time() - began < 5
        got: list[str] = []

        async def collect(delivery: Delivery) -> None:
            got.append(delivery.message.id)

        await broker.subscribe(subject, "g", collect, ack_wait=1)
        await eventually(lambda: got == [sent.id])  # not lost: handed to another member
