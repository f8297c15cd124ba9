"""The consume loop of a ``NatsBroker`` subscription: pull, handle (one message or a
batch), acknowledge after the handler's commit, retry with a growing delay, dead-letter.
Split from ``brokers/nats.py``, which owns connections, streams and publishing.

A member keeps what it holds: while the loop runs, every message it has taken and not
settled - the one in hand, the rest of its fetch, those waiting in its inbox - is
marked in progress every third of ``ack_wait``, so JetStream hands none of them to
another member while a slow handler runs (as RabbitMQ keeps a consumer's unacked
messages while its channel is open). A member that dies or stops stops marking, and
its messages come back after ``ack_wait``.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig
from nats.js.errors import NotFoundError

from seamwork.errors import InvalidMessage, MessagingError
from seamwork.messaging._message import decode
from seamwork.messaging._ports import Delivery, Handler, PoisonMessage, SubscriptionStats

if TYPE_CHECKING:
    from seamwork.brokers.nats import NatsBroker, NatsSubscription

log = logging.getLogger("seamwork.brokers")
BatchFn = Callable[[Sequence[Delivery]], Awaitable[Sequence[BaseException | None]]]
FETCH = 64
FETCH_BATCH = 256


class _Consumer:
    """The fetch-handle-ack loop of one subscription."""

    def __init__(
        self,
        broker: NatsBroker,
        pull: JetStreamContext.PullSubscription,
        subject: str,
        group: str,
        handler: Handler,
        max_deliver: int,
        retry_delay: float,
        ack_wait: float,
        config: ConsumerConfig,
    ) -> None:
        self.broker, self.pull, self.subject, self.group = broker, pull, subject, group
        self.handler, self.max_deliver, self.retry_delay = handler, max_deliver, retry_delay
        self.ack_wait = ack_wait
        self.config = config
        self.held: dict[int, Msg] = {}
        """Messages fetched and not settled yet, by ``id()``."""

    async def run(self, subscription: NatsSubscription) -> None:
        batch = getattr(self.handler, "batch", None)
        puller = _Puller(self.pull, FETCH if batch is None else FETCH_BATCH)
        keeping = asyncio.create_task(self._keep(puller))
        try:
            await self._consume(subscription, puller)
        finally:
            keeping.cancel()
            await asyncio.gather(keeping, return_exceptions=True)
        # stopped by its own handler (any other stop() cancels this task): nothing is
        # taken any more, so the inbox goes
        await subscription._release()

    async def _keep(self, puller: _Puller) -> None:
        """Mark what this member holds in progress, every third of ``ack_wait``."""
        while True:
            await asyncio.sleep(self.ack_wait / 3)
            for msg in [*self.held.values(), *puller.waiting()]:
                try:
                    await msg.in_progress()
                except asyncio.CancelledError:
                    raise
                except Exception:  # not connected: redelivered after ack_wait anyway
                    break

    async def _consume(self, subscription: NatsSubscription, puller: _Puller) -> None:
        stats = subscription.stats
        batch = getattr(self.handler, "batch", None)
        connection = -1  # the client's reconnect count when in-flight messages were checked
        while not subscription._stopping:
            # no await between this check and the fetch's request: a reconnect cannot
            # slip in between, so no request reaches a new server unchecked
            if self.broker.ordered_recovery and connection != _reconnects(self.pull):
                current = _reconnects(self.pull)
                if not await self._in_flight_first():
                    await asyncio.sleep(0.5)
                    continue
                connection = current
            try:
                messages = await puller.fetch()
            except asyncio.CancelledError:
                raise
            except _ConsumerGone as exc:
                await self._restore(exc)
                continue
            except Exception as exc:
                log.warning(
                    "consumer %s on %s: fetch failed (%s); retrying", self.group, self.subject, exc
                )
                await asyncio.sleep(0.5)
                continue
            # stop() waits while the subscription is not idle: a message (or batch)
            # started here is finished and settled; none is started once it stops
            if subscription._stopping:
                return
            self.held = {id(msg): msg for msg in messages}
            if batch is not None and len(messages) > 1:
                subscription._idle.clear()
                try:
                    await self._handle_batch(batch, messages, stats)
                finally:
                    self.held.clear()
                    subscription._idle.set()
                continue
            for msg in messages:
                if subscription._stopping:
                    return  # not started: redelivered after ack_wait
                subscription._idle.clear()
                try:
                    await self._guarded(self._handle(msg, stats))
                finally:
                    self.held.pop(id(msg), None)
                    subscription._idle.set()

    async def _restore(self, gone: _ConsumerGone) -> None:
        """Make the group's consumer (and its stream) again if it was deleted; a server
        that only had no responder for a moment (the consumer still there) is left."""
        try:
            await self.pull.consumer_info()
        except asyncio.CancelledError:
            raise
        except NotFoundError:
            pass
        except Exception:  # cannot tell now: ask again
            await asyncio.sleep(0.5)
            return
        else:
            await asyncio.sleep(0.5)
            return
        try:
            stream = await self.broker._remake_consumer(self.subject, self.config)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning(
                "consumer %s on %s was deleted (%s) and cannot be made again yet (%s); retrying",
                self.group,
                self.subject,
                gone,
                exc,
            )
            await asyncio.sleep(0.5)
            return
        log.warning(
            "consumer %s on %s was deleted (%s): made it again in stream %s, from the "
            "stream's first message",
            self.group,
            self.subject,
            gone,
            stream,
        )

    async def _in_flight_first(self) -> bool:
        """If the group has messages in flight (held by a member that died, or lost
        with a connection), wait one ack_wait so they are redelivered before anything
        newer. False if the server cannot be asked right now."""
        try:
            info = await self.pull.consumer_info()
        except asyncio.CancelledError:
            raise
        except Exception:
            return False
        if info.num_ack_pending:
            log.info(
                "consumer %s on %s: %d messages in flight; fetching again in %.1fs",
                self.group,
                self.subject,
                info.num_ack_pending,
                self.ack_wait,
            )
            await asyncio.sleep(self.ack_wait)
        return True

    async def _guarded(self, step: Awaitable[None]) -> None:
        try:
            await step
        except asyncio.CancelledError:
            raise
        except Exception:  # ack or dead-letter publish failed: redelivered later
            log.exception(
                "consumer %s on %s: message left for redelivery", self.group, self.subject
            )

    def _crash_loop(self, attempt: int) -> str | None:
        """Why a message delivered ``attempt`` times is a consumer crash loop, or None.
        Failures the handler raised are at most ``max_deliver - 1`` of the deliveries
        before this one (one more and it was dead-lettered); the rest were handed out
        and never settled - its members went down holding it."""
        unsettled = attempt - self.max_deliver
        if unsettled < self.broker.crash_limit:
            return None
        return (
            f"delivered {attempt} times, at least {unsettled} without an outcome "
            "(consumer crash loop)"
        )

    async def _handle(self, msg: Msg, stats: SubscriptionStats) -> None:
        stats.delivered += 1
        attempt = msg.metadata.num_delivered
        if (crash := self._crash_loop(attempt)) is not None:
            await self._give_up(msg, stats, crash, attempt)
            return
        try:
            message = decode(
                msg.data, msg.headers, fallback_id=f"seq-{msg.metadata.sequence.stream}"
            )
            await self.handler(Delivery(message, msg.subject, self.group, attempt))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            await self._settle(msg, stats, exc, attempt)
            return
        await self._settle(msg, stats, None, attempt)

    async def _handle_batch(
        self, batch: BatchFn, messages: Sequence[Msg], stats: SubscriptionStats
    ) -> None:
        """Hand every decodable message to ``batch`` at once; settle each after it
        returns (i.e. after its single commit), in order."""
        held: list[tuple[Msg, Delivery]] = []
        for msg in messages:
            stats.delivered += 1
            attempt = msg.metadata.num_delivered
            if (crash := self._crash_loop(attempt)) is not None:
                await self._guarded(self._give_up(msg, stats, crash, attempt))
                continue
            try:
                message = decode(
                    msg.data, msg.headers, fallback_id=f"seq-{msg.metadata.sequence.stream}"
                )
            except InvalidMessage as exc:
                await self._guarded(self._settle(msg, stats, exc, attempt))
                continue
            held.append((msg, Delivery(message, msg.subject, self.group, attempt)))
        if not held:
            return
        outcomes: Sequence[BaseException | None]
        try:
            outcomes = await batch([delivery for _, delivery in held])
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # nothing committed: every message is retried
            outcomes = [exc] * len(held)
        if len(outcomes) != len(held):  # which one failed is unknown: retry them all
            wrong = MessagingError(
                f"batch handler returned {len(outcomes)} outcomes for {len(held)} deliveries"
            )
            log.error("consumer %s on %s: %s", self.group, self.subject, wrong)
            outcomes = [wrong] * len(held)
        for (msg, delivery), error in zip(held, outcomes, strict=True):
            await self._guarded(self._settle(msg, stats, error, delivery.attempt))

    async def _settle(
        self, msg: Msg, stats: SubscriptionStats, error: BaseException | None, attempt: int
    ) -> None:
        """Ack a handled message; retry or dead-letter a failed one."""
        if error is None:
            await msg.ack()
            stats.acked += 1
            return
        reason = f"{type(error).__name__}: {error}"
        if isinstance(error, InvalidMessage | PoisonMessage):
            await self._give_up(msg, stats, reason, attempt)
            return
        stats.errors[type(error).__name__] = stats.errors.get(type(error).__name__, 0) + 1
        if attempt >= self.max_deliver:
            await self._give_up(msg, stats, reason, attempt)
            return
        stats.retried += 1
        await msg.nak(delay=min(self.retry_delay * 2 ** (attempt - 1), 30.0))

    async def _give_up(self, msg: Msg, stats: SubscriptionStats, reason: str, attempt: int) -> None:
        # the message's own subject, not the subscription's (``orders.*``): a replay
        # publishes the letter there
        await self.broker._dead_letter(msg, msg.subject, self.group, reason, attempt)
        await msg.term()
        stats.dead_lettered += 1
        log.warning("dead-lettered a message on %s for %s: %s", msg.subject, self.group, reason)


class _Puller:
    """Fetches from a pull consumer without a task per message.

    nats-py's ``fetch`` awaits each message of a batch with its own ``wait_for``; at
    tens of thousands of messages a second that is most of a consumer's cost. This
    sends one pull request, waits for its first message and takes whatever else has
    arrived; the request lingers until ``expires`` and keeps filling the queue, which
    the next call drains before asking again. Status messages (request expired, no
    messages, ...) only end a request; they are dropped.
    """

    def __init__(
        self, pull: JetStreamContext.PullSubscription, size: int, expires: float = 1.0
    ) -> None:
        self.pull = pull
        self.size = size
        self.expires = expires

    async def fetch(self) -> list[Msg]:
        messages = self._drain()
        if messages:
            return messages
        pull: Any = self.pull  # its pending queue and request subject are not typed public
        if not pull._nc.is_connected:  # a request buffered now would reach the next server
            await asyncio.sleep(0.1)
            return []
        request = {"batch": self.size, "expires": int(self.expires * 1e9)}
        await pull._nc.publish(pull._nms, json.dumps(request).encode(), reply=pull._deliver)
        try:
            async with asyncio.timeout(self.expires + 0.25):
                first = await pull._sub._pending_queue.get()
        except TimeoutError:
            return []
        pull._sub._pending_queue.task_done()
        pull._sub._pending_size -= len(first.data)
        if _is_status(first):
            assert first.headers is not None
            status, reason = first.headers.get("Status"), first.headers.get("Description", "")
            if status == "503" or (status == "409" and "Consumer Deleted" in reason):
                raise _ConsumerGone(reason or "no responders")  # its stream may be gone too
            if status != "408":  # not just expired
                log.debug("pull request ended: %s", first.headers.get("Description"))
                await asyncio.sleep(0.1)  # e.g. too many waiting requests: do not spin
            return []
        await asyncio.sleep(0)  # let the reader parse the rest of what arrived with it
        return [first, *self._drain()]

    def waiting(self) -> list[Msg]:
        """The messages that have arrived and not been fetched yet (left in place)."""
        pull: Any = self.pull
        queued: Sequence[Msg] = pull._sub._pending_queue._queue
        return [msg for msg in queued if not _is_status(msg)]

    def _drain(self) -> list[Msg]:
        pull: Any = self.pull
        queue: asyncio.Queue[Msg] = pull._sub._pending_queue
        messages: list[Msg] = []
        while not queue.empty() and len(messages) < self.size:
            msg = queue.get_nowait()
            queue.task_done()  # the client's drain() joins this queue
            pull._sub._pending_size -= len(msg.data)
            if not _is_status(msg):
                messages.append(msg)
        return messages


class _ConsumerGone(Exception):
    """A pull request found no consumer to answer it (deleted, or its stream was)."""


def _reconnects(pull: JetStreamContext.PullSubscription) -> int:
    """How often the client reconnected (counted before it resumes sending)."""
    client: Any = pull
    return int(client._nc.stats["reconnects"])


def _is_status(msg: Msg) -> bool:
    return not msg.data and msg.headers is not None and "Status" in msg.headers
