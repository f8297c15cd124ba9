"""``NatsBroker``: the ``Broker`` port on NATS JetStream (nats-py).

Streams. A subject's first token names its stream (``orders.created`` -> ``ORDERS``
over ``orders.>``), created on first use with file storage and a duplicate window,
so a message re-published with the same id inside the window is dropped by the
server (``Nats-Msg-Id``).

Batches. On nats-server 2.12+ a batch is one *atomic* publish: every message stored,
or none, one fsync for all. A batch that contains an id the stream already holds is
refused whole by the server; that only happens when a relay re-sends after a crash,
and then the batch is sent again one message at a time, letting the server drop the
duplicates. Older servers get the messages pipelined, each acknowledged.

Order. A subscription sees its subject in stream order while its consumer and the
server stay up. Messages a member had received but not acknowledged when it (or the
server) died come back only after ``ack_wait``, behind newer ones, unless the broker
is built with ``ordered_recovery=True``: then a member that starts or reconnects
while its group has messages in flight waits one ``ack_wait`` before fetching, so
those come back first (a single-member group then keeps stream order across
crashes, at the price of that pause). A retried message always comes back behind
the ones after it; a handler that needs per-key order checks a sequence number in
the message and raises to have an early one retried.

Consumers. A group is one durable pull consumer shared by all its members. A
handler with a ``batch(deliveries)`` method (``Inbox.handler`` builds one) gets each
fetched batch at once and returns one outcome per delivery, after its single
commit; the messages are then acknowledged, retried or dead-lettered in order. The
server's own ``max_deliver`` is left unlimited (JetStream drops a message silently
when it runs out); seamwork counts deliveries and dead-letters the message itself,
to ``deadletter.<group>.<subject>`` in the ``DEADLETTER`` stream, with the error and
the delivery count in its headers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

try:
    import nats
    from nats.aio.client import Client as NatsClient
    from nats.aio.msg import Msg
    from nats.js import JetStreamContext
    from nats.js.api import AckPolicy, ConsumerConfig
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("NATS support needs: pip install 'seamwork[nats]'") from exc

from seamwork.errors import BrokerUnavailable, ConfigError, InvalidMessage, PublishError
from seamwork.messaging._message import Message, decode, encode
from seamwork.messaging._ports import (
    DLQ_HEADERS,
    DLQ_SUBJECT,
    DeadLetter,
    Delivery,
    Handler,
    PoisonMessage,
    SubscriptionStats,
    dead_letter_headers,
    read_dead_letter,
)

log = logging.getLogger("seamwork.brokers")

DLQ_STREAM = "DEADLETTER"
_MAX_ATOMIC = 1000
_DUPLICATE_IN_BATCH = 10201
_NAME = re.compile(r"[^A-Za-z0-9_-]")
_FETCH = 64
_FETCH_BATCH = 256
BatchFn = Callable[[Sequence[Delivery]], Awaitable[Sequence[BaseException | None]]]


def stream_for(subject: str) -> str:
    """The stream a subject belongs to: its first token, upper-cased."""
    token = subject.split(".", 1)[0]
    if not token or token in ("*", ">"):
        raise ConfigError(f"subject {subject!r} needs a literal first token to name its stream")
    return _NAME.sub("_", token).upper()


def _consumer_name(group: str, subject: str) -> str:
    return _NAME.sub("_", f"{group}__{subject}").replace(">", "all").replace("*", "any")


class NatsSubscription:
    """A running consumer of one group on one subject."""

    def __init__(self, task: asyncio.Task[None] | None = None) -> None:
        self.stats = SubscriptionStats()
        self._task = task

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None


class NatsBroker:
    """``Broker`` on NATS JetStream.

    Args:
        url: ``nats://host:port`` (``EmbeddedNats().url`` for the embedded server).
        duplicate_window: seconds the server remembers message ids.
        publish_timeout: seconds to wait for a publish acknowledgement.
        streams: explicit stream name -> subjects, instead of one per first token.
        ordered_recovery: after a (re)start or reconnect with messages in flight,
            wait ``ack_wait`` before fetching so they are redelivered first.
    """

    def __init__(
        self,
        url: str,
        *,
        duplicate_window: float = 120.0,
        publish_timeout: float = 5.0,
        streams: Mapping[str, Sequence[str]] | None = None,
        name: str = "seamwork",
        ordered_recovery: bool = False,
    ) -> None:
        if duplicate_window <= 0:
            raise ConfigError(f"duplicate_window must be > 0, got {duplicate_window}")
        self.url = url
        self._window = duplicate_window
        self._timeout = publish_timeout
        self._explicit = {s: n for n, subjects in (streams or {}).items() for s in subjects}
        self._name = name
        self.ordered_recovery = ordered_recovery
        self._nc: NatsClient | None = None
        self._js: JetStreamContext | None = None
        self._atomic = False
        self._streams: set[str] = set()
        self._atomic_streams: set[str] = set()  # streams that accept atomic batches
        self._subscriptions: list[NatsSubscription] = []
        self._lock = asyncio.Lock()

    def __repr__(self) -> str:
        return f"NatsBroker({self.url!r})"

    # --- connection ------------------------------------------------------------------

    async def connect(self) -> None:
        if self._nc is not None:
            return
        async with self._lock:
            if self._nc is not None:
                return
            try:
                # nats-py retries a first connection forever when reconnects are
                # unlimited; the first one gets a deadline, later ones retry.
                async with asyncio.timeout(self._timeout):
                    nc = await nats.connect(
                        self.url,
                        name=self._name,
                        connect_timeout=2,
                        reconnect_time_wait=0.2,
                        max_reconnect_attempts=-1,
                        allow_reconnect=True,
                        error_cb=_log_error,
                    )
            except Exception as exc:
                reason = str(exc) or f"no answer within {self._timeout:g}s"
                raise BrokerUnavailable(f"cannot connect to NATS at {self.url}: {reason}") from exc
            version = nc.connected_server_version
            self._atomic = (version.major, version.minor) >= (2, 12)
            self._js = nc.jetstream(timeout=self._timeout)
            self._nc = nc

    async def aclose(self) -> None:
        for subscription in self._subscriptions:
            await subscription.stop()
        self._subscriptions.clear()
        nc, self._nc, self._js = self._nc, None, None
        if nc is not None:
            with contextlib.suppress(Exception):
                await nc.drain()
            with contextlib.suppress(Exception):
                await nc.close()

    async def _context(self) -> tuple[NatsClient, JetStreamContext]:
        if self._nc is None:
            await self.connect()
        assert self._nc is not None
        assert self._js is not None
        return self._nc, self._js

    # --- streams ---------------------------------------------------------------------

    def _stream_name(self, subject: str) -> str:
        return self._explicit.get(subject) or stream_for(subject)

    async def ensure_stream(self, subject: str) -> str:
        """Create (or reuse) the stream that holds ``subject``; returns its name."""
        name = self._stream_name(subject)
        if name in self._streams:
            return name
        nc, _ = await self._context()
        subjects = [s for s, n in self._explicit.items() if n == name] or [
            f"{subject.split('.', 1)[0]}.>"
        ]
        config: dict[str, Any] = {
            "name": name,
            "subjects": subjects,
            "storage": "file",
            "retention": "limits",
            "duplicate_window": int(self._window * 1e9),
            "num_replicas": 1,
        }
        if self._atomic:
            config["allow_atomic"] = True
        reply = await self._api(nc, f"$JS.API.STREAM.CREATE.{name}", config)
        error = reply.get("error")
        if error and error.get("err_code") != 10058:  # 10058: exists with this name
            raise BrokerUnavailable(f"cannot create stream {name}: {error.get('description')}")
        if error:  # made elsewhere (an operator, an older seamwork): use it as it is
            info = await self._api(nc, f"$JS.API.STREAM.INFO.{name}", {})
            reply = info
        if self._atomic and reply.get("config", {}).get("allow_atomic"):
            self._atomic_streams.add(name)
        self._streams.add(name)
        return name

    async def _api(self, nc: NatsClient, subject: str, body: Mapping[str, Any]) -> dict[str, Any]:
        try:
            response = await nc.request(subject, json.dumps(body).encode(), timeout=self._timeout)
        except Exception as exc:
            raise BrokerUnavailable(f"JetStream API {subject} did not answer: {exc}") from exc
        answer: dict[str, Any] = json.loads(response.data)
        return answer

    # --- publishing ------------------------------------------------------------------

    async def publish(
        self, subject: str, message: Message, headers: Mapping[str, str] | None = None
    ) -> None:
        body, wire = self._wire(message, headers)
        await self.ensure_stream(subject)
        _, js = await self._context()
        try:
            await js.publish(subject, body, headers=wire)
        except Exception as exc:
            raise PublishError(
                f"publish of {message.type} {message.id} to {subject}: {exc}"
            ) from exc

    async def publish_batch(self, items: Sequence[tuple[str, Message]]) -> None:
        if not items:
            return
        wired = [(subject, *self._wire(message, None)) for subject, message in items]
        for subject, _, _ in wired:
            await self.ensure_stream(subject)
        if len(wired) == 1:
            await self._pipelined(wired)
            return
        for start in range(0, len(wired), _MAX_ATOMIC):
            chunk = wired[start : start + _MAX_ATOMIC]
            streams = {self._stream_name(s) for s, _, _ in chunk}
            (stream, *others) = streams
            if others or stream not in self._atomic_streams:
                await self._pipelined(chunk)  # one stream per atomic batch, and it must allow it
            elif not await self._atomic_batch(chunk):
                await self._pipelined(chunk)

    def _wire(
        self, message: Message, extra: Mapping[str, str] | None
    ) -> tuple[bytes, dict[str, str]]:
        body, headers = encode(message)
        if extra:
            headers.update(extra)
        headers["Nats-Msg-Id"] = headers.get("Nats-Msg-Id", message.id)
        return body, headers

    async def _pipelined(self, wired: Sequence[tuple[str, bytes, dict[str, str]]]) -> None:
        _, js = await self._context()
        results = await asyncio.gather(
            *(js.publish(subject, body, headers=headers) for subject, body, headers in wired),
            return_exceptions=True,
        )
        for (subject, _, headers), result in zip(wired, results, strict=True):
            if isinstance(result, BaseException):
                raise PublishError(
                    f"publish of {headers['Nats-Msg-Id']} to {subject}: {result}"
                ) from result

    async def _atomic_batch(self, wired: Sequence[tuple[str, bytes, dict[str, str]]]) -> bool:
        """Publish ``wired`` as one atomic batch; False if it holds a stored id."""
        nc, _ = await self._context()
        batch = uuid.uuid4().hex
        last = len(wired)
        for index, (subject, body, headers) in enumerate(wired, start=1):
            headers = {**headers, "Nats-Batch-Id": batch, "Nats-Batch-Sequence": str(index)}
            if index < last:
                await nc.publish(subject, body, headers=headers)
                continue
            headers["Nats-Batch-Commit"] = "1"
            try:
                reply = await nc.request(subject, body, headers=headers, timeout=self._timeout)
            except Exception as exc:
                raise PublishError(f"atomic batch of {last} to {subject}: {exc}") from exc
        answer = json.loads(reply.data)
        error = answer.get("error")
        if error is None:
            return True
        if error.get("err_code") == _DUPLICATE_IN_BATCH:
            return False
        if "atomic publish is disabled" in str(error.get("description")):
            self._atomic_streams.discard(self._stream_name(wired[0][0]))  # changed since
            return False
        raise PublishError(f"atomic batch of {last} refused: {error.get('description')}")

    # --- consuming -------------------------------------------------------------------

    async def subscribe(
        self,
        subject: str,
        group: str,
        handler: Handler,
        *,
        max_deliver: int = 5,
        ack_wait: float = 30.0,
        retry_delay: float = 0.5,
    ) -> NatsSubscription:
        if not group or not isinstance(group, str):
            raise ConfigError(f"a consumer group must be a non-empty string, got {group!r}")
        if max_deliver < 1:
            raise ConfigError(f"max_deliver must be >= 1, got {max_deliver}")
        if ack_wait <= 0:
            raise ConfigError(f"ack_wait must be > 0, got {ack_wait}")
        stream = await self.ensure_stream(subject)
        await self.ensure_stream(f"deadletter.{group}")
        _, js = await self._context()
        config = ConsumerConfig(
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=ack_wait,
            max_deliver=-1,
            max_ack_pending=1000,
            filter_subject=subject,
        )
        pull = await js.pull_subscribe(
            subject, durable=_consumer_name(group, subject), stream=stream, config=config
        )
        subscription = NatsSubscription()
        consumer = _Consumer(
            self, pull, subject, group, handler, max_deliver, retry_delay, ack_wait
        )
        subscription._task = asyncio.create_task(consumer.run(subscription.stats))
        self._subscriptions.append(subscription)
        return subscription

    async def _dead_letter(
        self, msg: Msg, subject: str, group: str, error: str, attempts: int
    ) -> None:
        original = dict(msg.headers or {})
        message_id = original.get("Nats-Msg-Id", f"seq-{msg.metadata.sequence.stream}")
        headers = {k: v for k, v in original.items() if not k.startswith("Nats-")}
        headers.update(dead_letter_headers(subject, group, error, attempts))
        headers["Nats-Msg-Id"] = f"dlq:{group}:{message_id}"
        _, js = await self._context()
        await js.publish(f"deadletter.{_NAME.sub('_', group)}.{subject}", msg.data, headers=headers)

    async def dead_letters(self, *, limit: int = 100) -> list[DeadLetter]:
        await self.ensure_stream("deadletter.any")
        _, js = await self._context()
        info = await js.stream_info(DLQ_STREAM)
        letters: list[DeadLetter] = []
        seq = info.state.first_seq
        while seq and seq <= info.state.last_seq and len(letters) < limit:
            with contextlib.suppress(Exception):
                raw = await js.get_msg(DLQ_STREAM, seq)
                letters.append(read_dead_letter(str(seq), raw.data or b"", dict(raw.headers or {})))
            seq += 1
        return letters

    async def replay_dead_letter(self, key: str) -> None:
        _, js = await self._context()
        raw = await js.get_msg(DLQ_STREAM, int(key))
        headers = dict(raw.headers or {})
        subject = headers[DLQ_SUBJECT]
        for name in DLQ_HEADERS:
            headers.pop(name, None)
        original = headers.get("Nats-Msg-Id", "")
        headers = {k: v for k, v in headers.items() if not k.startswith("Nats-")}
        headers["Nats-Msg-Id"] = f"{original.removeprefix('dlq:')}:replay:{key}"
        await js.publish(subject, raw.data or b"", headers=headers)
        await js.delete_msg(DLQ_STREAM, int(key))


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
    ) -> None:
        self.broker, self.pull, self.subject, self.group = broker, pull, subject, group
        self.handler, self.max_deliver, self.retry_delay = handler, max_deliver, retry_delay
        self.ack_wait = ack_wait

    async def run(self, stats: SubscriptionStats) -> None:
        batch = getattr(self.handler, "batch", None)
        puller = _Puller(self.pull, _FETCH if batch is None else _FETCH_BATCH)
        connection = -1  # the client's reconnect count when in-flight messages were checked
        while True:
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
            except Exception as exc:
                log.warning(
                    "consumer %s on %s: fetch failed (%s); retrying", self.group, self.subject, exc
                )
                await asyncio.sleep(0.5)
                continue
            if batch is not None and len(messages) > 1:
                await self._handle_batch(batch, messages, stats)
                continue
            for msg in messages:
                await self._guarded(self._handle(msg, stats))

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

    async def _handle(self, msg: Msg, stats: SubscriptionStats) -> None:
        stats.delivered += 1
        attempt = msg.metadata.num_delivered
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
        await self.broker._dead_letter(msg, self.subject, self.group, reason, attempt)
        await msg.term()
        stats.dead_lettered += 1
        log.warning("dead-lettered a message on %s for %s: %s", self.subject, self.group, reason)


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
            if first.headers and first.headers.get("Status") != "408":  # not just expired
                log.debug("pull request ended: %s", first.headers.get("Description"))
                await asyncio.sleep(0.1)  # e.g. too many waiting requests: do not spin
            return []
        await asyncio.sleep(0)  # let the reader parse the rest of what arrived with it
        return [first, *self._drain()]

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


def _reconnects(pull: JetStreamContext.PullSubscription) -> int:
    """How often the client reconnected (counted before it resumes sending)."""
    client: Any = pull
    return int(client._nc.stats["reconnects"])


def _is_status(msg: Msg) -> bool:
    return not msg.data and msg.headers is not None and "Status" in msg.headers


async def _log_error(exc: Exception) -> None:
    log.warning("nats: %s: %s", type(exc).__name__, exc)


__all__ = ["DLQ_STREAM", "NatsBroker", "NatsSubscription", "stream_for"]
