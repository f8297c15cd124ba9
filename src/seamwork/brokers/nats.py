"""``NatsBroker``: the ``Broker`` port on NATS JetStream (nats-py).

Streams. A subject's first token names its stream (``orders.created`` -> ``ORDERS``
over ``orders`` and ``orders.>``; a token that is not plain lowercase ASCII gets a hash
in its name, ``stream_for``), created on first use with file storage and a duplicate
window (a stream an earlier version made over ``orders.>`` alone is widened),
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

Consumers. A group is one durable pull consumer per subject, shared by all its
members; each (group, subject) has a name of its own (``_consumer_name``:
``payments__orders_created`` for a plain one, a readable part and a hash for a
wildcard or any other character), and a consumer of that name left filtering another
subject is refused, not shared. A
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
import base64
import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import re
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from typing import Any, ParamSpec, TypeVar

try:
    from nats.aio.client import Client as NatsClient
    from nats.aio.msg import Msg
    from nats.errors import NoRespondersError
    from nats.js import JetStreamContext
    from nats.js.api import AckPolicy, ConsumerConfig, RawStreamMsg
    from nats.js.errors import APIError, NoStreamResponseError, NotFoundError
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("NATS support needs: pip install 'seamwork[nats]'") from exc

from seamwork._core.checks import check_seconds
from seamwork.brokers._nats_consumer import _Consumer
from seamwork.brokers._subscription import GracefulStop
from seamwork.errors import (
    BrokerUnavailable,
    ConfigError,
    InvalidMessage,
    MessagingError,
    PublishError,
)
from seamwork.messaging._message import MAX_HEADER_BYTES, TYPE, Message, check_subject, encode
from seamwork.messaging._ports import (
    DLQ_ERROR,
    DLQ_HEADERS,
    DLQ_SUBJECT,
    DeadLetter,
    Handler,
    check_subscribe_settings,
    dead_letter_headers,
    read_dead_letter,
)

log = logging.getLogger("seamwork.brokers")

DLQ_STREAM = "DEADLETTER"
_MAX_ATOMIC = 1000
_DUPLICATE_IN_BATCH = 10201
_NAME = re.compile(r"[^A-Za-z0-9_-]")
_PLAIN = re.compile(r"[A-Za-z0-9-]+")
_LOWER = re.compile(r"[a-z0-9_-]+")
"""A first token whose stream keeps the upper-cased name (``stream_for``)."""
_MAX_READABLE_STREAM = 64
_MAX_READABLE = 200
_MAX_CONSUMER_NAME = 255
_STREAM_NOT_FOUND = 10059
"""Characters of a hashed consumer name before its hash (JetStream takes 255)."""
_SUBJECTS_OVERLAP = 10065
P = ParamSpec("P")
T = TypeVar("T")


def _cancels() -> int:
    """How many cancels the running task has been asked for (``Task.cancelling``)."""
    task = asyncio.current_task()
    return task.cancelling() if task is not None else 0


def _keeps_cancels(method: Callable[P, Awaitable[T]]) -> Callable[P, Coroutine[Any, Any, T]]:
    """Raise, once ``method`` returns, a cancel that nats-py swallowed while it ran.

    nats-py awaits its connect, its requests and its publish acknowledgements through
    ``asyncio.wait_for``, which on Python 3.11 returns the answer that arrived as the
    cancel landed and drops the cancel: a cancelled start-up (a Ctrl-C) went on.
    """

    @functools.wraps(method)
    async def keeping(*args: P.args, **kwargs: P.kwargs) -> T:
        before = _cancels()
        result = await method(*args, **kwargs)
        if _cancels() > before:
            raise asyncio.CancelledError
        return result

    return keeping


def stream_for(subject: str) -> str:
    """The stream a subject belongs to, named after its first token.

    A token of lowercase ASCII letters, digits, ``_`` and ``-`` is upper-cased
    (``orders.created`` -> ``ORDERS``), the name earlier versions gave it. Any other
    token would share its upper-cased name with another (``Orders`` and ``orders``,
    ``café`` and ``caf_``), and the second would reuse a stream that does not hold
    its subjects; it is spelt readably (upper-cased, any other character ``_``) and
    followed by ``_h`` and a hash of the exact token. A plain name has no lowercase
    letter, so the two kinds cannot meet.
    """
    token = subject.split(".", 1)[0]
    if not token or token in ("*", ">"):
        raise ConfigError(f"subject {subject!r} needs a literal first token to name its stream")
    if _LOWER.fullmatch(token):
        return token.upper()
    readable = _NAME.sub("_", token).upper()[:_MAX_READABLE_STREAM]
    return f"{readable}_h{hashlib.sha256(token.encode()).hexdigest()[:16]}"


def _consumer_name(group: str, subject: str) -> str:
    """The durable consumer of ``group`` on ``subject``: one per pair, never shared.

    A group and a subject spelt with letters, digits and ``-`` only (dots between the
    subject's tokens) keep the name earlier versions gave them: ``<group>__<tokens
    joined by _>`` (``payments`` on ``orders.created`` -> ``payments__orders_created``).
    Those names are distinct, since neither part holds an ``_``. Any other pair - a
    wildcard, an ``_`` or another character in the group or the subject - would share
    its name with another (``orders.*`` and ``orders.>``, ``orders.a_b`` and
    ``orders.a.b``), so it is spelt readably (``*`` -> ``any``, ``>`` -> ``all``, any
    other character ``_``) and followed by ``___`` and a hash of the exact group and
    subject; so is a plain pair whose name would pass JetStream's 255 characters
    (no consumer of such a name can exist). A plain name never holds ``___``, so the
    two kinds cannot meet. (A group
    of such a pair made by an earlier version gets a new consumer, which starts at the
    stream's first message, as any new group does.)
    """
    tokens = subject.split(".")
    plain = f"{group}__{'_'.join(tokens)}"
    if (
        _PLAIN.fullmatch(group)
        and all(_PLAIN.fullmatch(token) for token in tokens)
        and len(plain) <= _MAX_CONSUMER_NAME
    ):
        return plain
    words = {"*": "any", ">": "all"}
    readable = _NAME.sub("_", f"{group}__{'_'.join(words.get(t, t) for t in tokens)}")
    digest = hashlib.sha256(json.dumps([group, subject]).encode()).hexdigest()[:32]
    return f"{readable[:_MAX_READABLE]}___{digest}"


def _wire_size(body: bytes, headers: Mapping[str, str]) -> int:
    """Bytes of a message as nats-server counts them against ``max_payload``: the
    header block nats-py writes (``NATS/1.0``, a ``key: value`` line each, a blank
    line) and the body."""
    lines = sum(len(k.encode()) + len(v.encode()) + 4 for k, v in headers.items())
    return len(b"NATS/1.0\r\n") + lines + 2 + len(body)


# Room that always holds a message's header block: encode() caps the headers at
# MAX_HEADER_BYTES; Nats-Msg-Id repeats the id, and a batch adds three short headers.
_HEADER_ROOM = 2 * MAX_HEADER_BYTES


def _over(limit: int, body: bytes, headers: Mapping[str, str]) -> bool:
    """Whether body and headers are over ``limit`` (counted only for a body near it)."""
    return len(body) + _HEADER_ROOM > limit and _wire_size(body, headers) > limit


def _refuse_oversize(limit: int, subject: str, body: bytes, headers: Mapping[str, str]) -> None:
    """Refuse a message the server would not take: one over its ``max_payload`` (body
    and headers) makes it close the connection, which nats-py then gives up. Counted
    only for a body near the limit (the relay's hot path skips it).

    Raises:
        InvalidMessage: the message with its headers is over ``max_payload``.
    """
    if _over(limit, body, headers):
        size = _wire_size(body, headers)
        raise InvalidMessage(
            f"message {headers.get(TYPE)!r} {headers.get('Nats-Msg-Id')} to {subject}: "
            f"{size} bytes with its headers, over the server's max_payload of {limit}"
        )


_MAX_SUBJECT = 4096 - 256
"""Bytes of a subject to publish: nats-server closes a connection whose control line
(``HPUB``, the subject, the reply inbox, two sizes) passes its ``max_control_line``,
4096 bytes by default, and nats-py then gives the connection up."""


def _publishable(subject: str) -> str:
    """``subject`` if it is well formed and short enough to publish, else
    ``ConfigError`` (a longer one timed out, and every publish after it failed)."""
    check_subject(subject)
    size = len(subject.encode())
    if size > _MAX_SUBJECT:
        raise ConfigError(
            f"subject {subject[:60]!r}... is too long to publish to NATS: {size} bytes, "
            f"at most {_MAX_SUBJECT}"
        )
    return subject


def _stored_headers(raw: RawStreamMsg) -> dict[str, str]:
    """The headers of a message read back from a stream, as the text that was sent.

    nats-py parses a read-back message's headers with ``email``'s parser, which gives
    a non-ASCII value as a ``Header`` object, not text: a dead letter was listed
    without such headers (its subject, error, causation id...) and replayed broken.
    """
    if not raw.hdrs:
        return {}
    headers: dict[str, str] = {}
    for line in base64.b64decode(raw.hdrs).split(b"\r\n")[1:]:  # after NATS/1.0
        name, colon, value = line.partition(b":")
        key = name.strip().decode("ascii", errors="replace")
        if colon and key.isprintable() and " " not in key and "\ufffd" not in key:
            headers[key] = value.strip().decode("utf-8", errors="replace")
    return headers


def _covers(pattern: str, subject: str) -> bool:
    """Whether a stream subject ``pattern`` matches every subject that ``subject``
    (literal or wildcard) matches: ``*`` is one token, ``>`` one or more at the end."""
    tokens, wanted = pattern.split("."), subject.split(".")
    for index, token in enumerate(tokens):
        if token == ">":
            return len(wanted) > index
        if index >= len(wanted) or wanted[index] == ">":
            return False
        if token not in ("*", wanted[index]):
            return False
    return len(wanted) == len(tokens)


def _intersect(one: str, other: str) -> bool:
    """Whether two stream subject patterns match some subject in common."""
    first, second = one.split("."), other.split(".")
    for index in range(max(len(first), len(second))):
        if index >= len(first) or index >= len(second):
            return False
        a, b = first[index], second[index]
        if ">" in (a, b):
            return True
        if a != b and "*" not in (a, b):
            return False
    return True


def _refuse_overlapping(streams: Mapping[str, Sequence[str]]) -> None:
    """``ConfigError`` for configured streams whose subjects overlap (JetStream keeps
    a subject in one stream only)."""
    patterns = [(pattern, name) for name, subjects in streams.items() for pattern in subjects]
    for index, (pattern, name) in enumerate(patterns):
        for other, other_name in patterns[index + 1 :]:
            if other_name != name and _intersect(pattern, other):
                raise ConfigError(
                    f"streams=: subjects {pattern!r} of stream {name} and {other!r} of "
                    f"stream {other_name} overlap (a subject can be in one stream only)"
                )


class NatsSubscription(GracefulStop):
    """A running consumer of one group on one subject; ``stop()`` as in
    ``seamwork.brokers._subscription`` (a NATS batch in hand finishes too; a handler
    still running after ``ack_wait`` is cancelled and its message redelivered)."""

    def __init__(
        self,
        task: asyncio.Task[None] | None = None,
        pull: JetStreamContext.PullSubscription | None = None,
        *,
        grace: float = 30.0,
    ) -> None:
        super().__init__(grace)
        self._task = task
        self._pull = pull

    async def stop(self) -> None:
        if self._stopped_by_own_handler():
            return
        task, self._task = self._task, None
        try:
            if task is not None:
                await self._wait_for_hand("redelivered")
        finally:  # a cancel meanwhile still ends the consumer (its message redelivered)
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
            await self._release()

    async def _release(self) -> None:
        """Unsubscribe the consumer's inbox (once, whoever ends the subscription)."""
        pull, self._pull = self._pull, None
        if pull is not None:
            # its inbox would keep taking what a pending pull request still brings,
            # which no one reads: closing the connection would wait on it for 30 s
            with contextlib.suppress(Exception):
                await pull.unsubscribe()


def redacted_url(url: str) -> str:
    """``url`` without its credentials, to show: ``nats://***@host:4222``. All of the
    user part goes (``user:password@``, or ``token@``: a lone name is a token to
    NATS), up to its last ``@``, in each URL of a list."""
    return _CREDENTIALS.sub(r"\1***@", url)


_CREDENTIALS = re.compile(r"(\w+://)(?:(?!\w+://).)*@", re.DOTALL)


class NatsBroker:
    """``Broker`` on NATS JetStream.

    Args:
        url: ``nats://host:port`` (``EmbeddedNats().url`` for the embedded server).
        duplicate_window: seconds the server remembers message ids.
        publish_timeout: seconds to wait for a publish acknowledgement.
        streams: explicit stream name -> subjects, instead of one per first token.
            A subject goes to the stream whose subjects match it as NATS matches
            them (``*`` one token, ``>`` the rest; a wildcard subscription needs
            one pattern that covers all it matches); a subject that no configured
            stream covers is refused (``ConfigError``) before anything is sent,
            and so (at once) are streams whose subjects overlap.
            Dead letters keep their own ``DEADLETTER`` stream.
        ordered_recovery: after a (re)start or reconnect with messages in flight,
            wait ``ack_wait`` before fetching so they are redelivered first.
        crash_limit: a message handed out this many times more than failures can
            account for (``max_deliver``) - its members went down holding it, say a
            handler that takes its process down - is dead-lettered before a handler
            runs again ("consumer crash loop"), as on RabbitMQ.
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
        crash_limit: int = 20,
    ) -> None:
        check_seconds("duplicate_window", duplicate_window)
        if isinstance(crash_limit, bool) or not isinstance(crash_limit, int) or crash_limit < 1:
            raise ConfigError(f"crash_limit must be an int >= 1, got {crash_limit!r}")
        self.crash_limit = crash_limit
        self.url = url
        self._window = duplicate_window
        self._timeout = publish_timeout
        _refuse_overlapping(streams or {})
        self._explicit = {s: n for n, subjects in (streams or {}).items() for s in subjects}
        self._name = name
        self.ordered_recovery = ordered_recovery
        self._nc: NatsClient | None = None
        self._closes = 0  # aclose() calls so far: a connect they overtook discards its own
        self._js: JetStreamContext | None = None
        self._atomic = False
        self._streams: set[str] = set()
        self._atomic_streams: set[str] = set()  # streams that accept atomic batches
        self._subscriptions: list[NatsSubscription] = []
        self._lock = asyncio.Lock()

    def __repr__(self) -> str:
        return f"NatsBroker({redacted_url(self.url)!r})"

    # --- connection ------------------------------------------------------------------

    @_keeps_cancels
    async def connect(self) -> None:
        if self._nc is not None:
            return
        async with self._lock:
            if self._nc is not None:
                return
            closes = self._closes
            nc = NatsClient()
            try:
                # nats-py retries a first connection forever when reconnects are
                # unlimited; the first one gets a deadline, later ones retry.
                async with asyncio.timeout(self._timeout):
                    await nc.connect(
                        self.url,
                        name=self._name,
                        connect_timeout=2,
                        reconnect_time_wait=0.2,  # type: ignore[arg-type]  # seconds, a float
                        max_reconnect_attempts=-1,
                        allow_reconnect=True,
                        error_cb=_log_error,
                    )
            except BaseException as exc:
                # cut short (the deadline, a cancel) mid-handshake, nats-py leaves its
                # socket open
                with contextlib.suppress(Exception):
                    await nc.close()
                if not isinstance(exc, Exception):
                    raise
                reason = str(exc) or f"no answer within {self._timeout:g}s"
                raise BrokerUnavailable(
                    f"cannot connect to NATS at {redacted_url(self.url)}: {reason}"
                ) from exc
            if self._closes != closes:  # aclose() ran meanwhile: it found nothing to close
                with contextlib.suppress(Exception):
                    await nc.close()
                raise BrokerUnavailable(
                    f"NATS at {redacted_url(self.url)}: the broker was closed while it connected"
                )
            version = nc.connected_server_version
            self._atomic = (version.major, version.minor) >= (2, 12)
            self._js = nc.jetstream(timeout=self._timeout)
            self._nc = nc

    async def aclose(self) -> None:
        """Stop every subscription, drain and close the connection.

        The subscriptions stop together: none takes another message, and the handlers
        in hand get one grace (the longest ``ack_wait``) to finish, not one each.

        A cancel that lands meanwhile (a Ctrl-C under asyncio.run) still stops every
        subscription and closes the connection, without waiting for a drain, and is
        then raised (nats-py's drain() would swallow it). The close itself runs to its
        end: cut short, it left the socket open.
        """
        cancels = _cancels()
        self._closes += 1  # a connect under way stores no connection after this
        subscriptions, self._subscriptions = self._subscriptions, []
        nc, self._nc, self._js = self._nc, None, None
        interrupted = False
        me = asyncio.current_task()
        for subscription in subscriptions:  # none takes another message from now on
            subscription._stopping = True
        try:
            for subscription in subscriptions:
                if subscription._task is me:  # closed by its own handler: returns at once
                    await subscription.stop()
            await asyncio.gather(*(s.stop() for s in subscriptions if s._task is not me))
        except asyncio.CancelledError:
            interrupted = True
        if nc is not None:
            if not interrupted:
                try:
                    with contextlib.suppress(Exception):
                        await nc.drain()
                except asyncio.CancelledError:
                    interrupted = True
            interrupted |= await _close_through_cancels(nc)
        if interrupted or _cancels() > cancels:
            raise asyncio.CancelledError

    async def _context(self) -> tuple[NatsClient, JetStreamContext]:
        if self._nc is None:
            await self.connect()
        nc, js = self._nc, self._js
        if nc is None or js is None:  # closed by aclose() right after it connected
            raise BrokerUnavailable(f"NATS at {redacted_url(self.url)}: the broker is closed")
        return nc, js

    # --- streams ---------------------------------------------------------------------

    def _stream_name(self, subject: str) -> str:
        if not self._explicit or subject.split(".", 1)[0] == "deadletter":
            return stream_for(subject)
        exact = self._explicit.get(subject)
        if exact is not None:
            return exact
        for pattern, name in self._explicit.items():
            if _covers(pattern, subject):
                return name
        raise ConfigError(
            f"subject {subject!r} is in none of the configured streams "
            f"({', '.join(f'{n}: {p}' for p, n in self._explicit.items())}): add it to streams="
        )

    @_keeps_cancels
    async def ensure_stream(self, subject: str) -> str:
        """Create (or reuse) the stream that holds ``subject``; returns its name."""
        name = self._stream_name(subject)
        if name in self._streams:
            return name
        nc, _ = await self._context()
        token = subject.split(".", 1)[0]
        subjects = [s for s, n in self._explicit.items() if n == name] or [token, f"{token}.>"]
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
        if error and error.get("err_code") == _SUBJECTS_OVERLAP:
            await self._refuse_overlap(nc, name, subject, subjects)
        if error and error.get("err_code") != 10058:  # 10058: exists with this name
            raise BrokerUnavailable(f"cannot create stream {name}: {error.get('description')}")
        if error:  # made elsewhere (an operator, an older seamwork): use it as it is
            reply = await self._api(nc, f"$JS.API.STREAM.INFO.{name}", {})
            if not self._explicit:
                reply = await self._widened(nc, name, token, reply)
            reply = await self._lengthened(nc, name, reply)
            held = reply.get("config", {}).get("subjects") or []
            if not any(_covers(pattern, subject) for pattern in held):
                raise ConfigError(
                    f"stream {name} was made elsewhere over {held}, none of which takes "
                    f"{subject!r}: add the subject to it, or name a stream that takes "
                    "it in streams="
                )
        if self._atomic and reply.get("config", {}).get("allow_atomic"):
            self._atomic_streams.add(name)
        self._streams.add(name)
        return name

    async def _lengthened(self, nc: NatsClient, name: str, info: dict[str, Any]) -> dict[str, Any]:
        """A stream made with a shorter duplicate window (earlier, elsewhere, or by a
        broker configured otherwise) gets this broker's: a relay's page re-sent after
        a crash inside the configured window must be dropped. Never shortened."""
        config = info.get("config", {})
        window = int(self._window * 1e9)
        if not config or config.get("duplicate_window", 0) >= window:
            return info
        reply = await self._api(
            nc, f"$JS.API.STREAM.UPDATE.{name}", {**config, "duplicate_window": window}
        )
        if reply.get("error"):
            log.warning(
                "stream %s keeps its duplicate window of %gs, shorter than %gs: %s",
                name,
                config.get("duplicate_window", 0) / 1e9,
                self._window,
                reply["error"].get("description"),
            )
            return info
        log.info("stream %s: duplicate window lengthened to %gs", name, self._window)
        return reply

    async def _refuse_overlap(
        self, nc: NatsClient, name: str, subject: str, subjects: Sequence[str]
    ) -> None:
        """Raise ``ConfigError`` naming the streams, made elsewhere, whose subjects
        overlap the ones stream ``name`` would take."""
        found = await self._api(nc, "$JS.API.STREAM.NAMES", {"subject": subject})
        others: list[str] = found.get("streams") or []
        hint = ""
        if others:
            info = await self._api(nc, f"$JS.API.STREAM.INFO.{others[0]}", {})
            held = info.get("config", {}).get("subjects") or []
            hint = f"; to use it, configure streams={{{others[0]!r}: {held!r}}}"
        raise ConfigError(
            f"cannot make stream {name} over {list(subjects)} for {subject!r}: its subjects "
            f"overlap stream(s) {', '.join(others) or '(unnamed)'} made elsewhere{hint}"
        )

    async def _widened(
        self, nc: NatsClient, name: str, token: str, info: dict[str, Any]
    ) -> dict[str, Any]:
        """A stream made over ``<token>.>`` alone (by an earlier seamwork) takes the
        subject ``<token>`` too: ``>`` needs a token after the dot, and a message
        published to ``<token>`` found no stream."""
        config = info.get("config", {})
        if config.get("subjects") != [f"{token}.>"]:
            return info
        widened = {**config, "subjects": [token, f"{token}.>"]}
        reply = await self._api(nc, f"$JS.API.STREAM.UPDATE.{name}", widened)
        if reply.get("error"):
            log.warning(
                "stream %s takes %s.> only, so %r cannot be published to: %s",
                name,
                token,
                token,
                reply["error"].get("description"),
            )
            return info
        return reply

    async def _api(self, nc: NatsClient, subject: str, body: Mapping[str, Any]) -> dict[str, Any]:
        try:
            response = await nc.request(subject, json.dumps(body).encode(), timeout=self._timeout)
        except Exception as exc:
            raise BrokerUnavailable(f"JetStream API {subject} did not answer: {exc}") from exc
        answer: dict[str, Any] = json.loads(response.data)
        return answer

    # --- publishing ------------------------------------------------------------------

    @_keeps_cancels
    async def publish(
        self, subject: str, message: Message, headers: Mapping[str, str] | None = None
    ) -> None:
        _publishable(subject)
        body, wire = self._wire(message, headers)
        await self.ensure_stream(subject)
        await self._check_size(subject, body, wire)
        try:
            await self._stored(subject, body, wire)
        except ConfigError:  # its stream, made again, does not take it
            raise
        except Exception as exc:
            raise PublishError(
                f"publish of {message.type} {message.id} to {subject}: {exc}"
            ) from exc

    async def _stored(self, subject: str, body: bytes, headers: dict[str, str]) -> None:
        """Publish to the stream of ``subject``; one deleted since it was made (no
        stream answers) is made again and the message sent once more."""
        _, js = await self._context()
        try:
            await js.publish(subject, body, headers=headers)
        except NoStreamResponseError:
            self._forget(subject)
            await self.ensure_stream(subject)
            await js.publish(subject, body, headers=headers)

    def _forget(self, subject: str) -> None:
        """Take the stream of ``subject`` as not made (it was deleted under us)."""
        name = self._stream_name(subject)
        self._streams.discard(name)
        self._atomic_streams.discard(name)

    @_keeps_cancels
    async def publish_batch(self, items: Sequence[tuple[str, Message]]) -> None:
        if not items:
            return
        wired = [(_publishable(subject), *self._wire(message, None)) for subject, message in items]
        for subject, _, _ in wired:
            await self.ensure_stream(subject)
        nc, _ = await self._context()
        for subject, body, headers in wired:  # none sent unless all fit
            _refuse_oversize(nc.max_payload, subject, body, headers)
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
        body, headers = encode(message, extra)
        headers["Nats-Msg-Id"] = headers.get("Nats-Msg-Id", message.id)
        return body, headers

    async def _check_size(self, subject: str, body: bytes, headers: Mapping[str, str]) -> None:
        nc, _ = await self._context()
        _refuse_oversize(nc.max_payload, subject, body, headers)

    async def _pipelined(self, wired: Sequence[tuple[str, bytes, dict[str, str]]]) -> None:
        _, js = await self._context()
        results = await self._gathered(js, wired)
        missing = [
            s
            for (s, _, _), r in zip(wired, results, strict=True)
            if isinstance(r, NoStreamResponseError)
        ]
        if missing:  # a stream deleted since it was made: make it, send all again
            for subject in missing:  # (what was stored already is dropped as a duplicate)
                self._forget(subject)
            for subject in missing:
                await self.ensure_stream(subject)
            results = await self._gathered(js, wired)
        for (subject, _, headers), result in zip(wired, results, strict=True):
            if isinstance(result, BaseException):
                raise PublishError(
                    f"publish of {headers['Nats-Msg-Id']} to {subject}: {result}"
                ) from result

    @staticmethod
    async def _gathered(
        js: JetStreamContext, wired: Sequence[tuple[str, bytes, dict[str, str]]]
    ) -> list[Any]:
        return await asyncio.gather(
            *(js.publish(subject, body, headers=headers) for subject, body, headers in wired),
            return_exceptions=True,
        )

    async def _atomic_batch(self, wired: Sequence[tuple[str, bytes, dict[str, str]]]) -> bool:
        """Publish ``wired`` as one atomic batch; False if it holds a stored id."""
        nc, _ = await self._context()
        batch = uuid.uuid4().hex
        last = len(wired)
        marked = [
            (subject, body, {**headers, "Nats-Batch-Id": batch, "Nats-Batch-Sequence": str(i)})
            for i, (subject, body, headers) in enumerate(wired, start=1)
        ]
        marked[-1][2]["Nats-Batch-Commit"] = "1"
        if any(_over(nc.max_payload, body, headers) for _, body, headers in marked):
            return False  # a message that fits only without the batch's own headers
        for index, (subject, body, headers) in enumerate(marked, start=1):
            if index < last:
                try:
                    await nc.publish(subject, body, headers=headers)
                except Exception as exc:  # e.g. the buffer of a client reconnecting is full
                    raise PublishError(f"atomic batch of {last} to {subject}: {exc}") from exc
                continue
            try:
                reply = await nc.request(subject, body, headers=headers, timeout=self._timeout)
            except NoRespondersError:  # the stream was deleted: sent one by one, made again
                self._forget(subject)
                return False
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

    @_keeps_cancels
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
        check_subject(subject, wildcards=True)
        check_subscribe_settings(group, max_deliver, ack_wait, retry_delay)
        cancels = _cancels()
        stream = await self.ensure_stream(subject)
        await self.ensure_stream(f"deadletter.{group}")
        _, js = await self._context()
        durable = _consumer_name(group, subject)
        config = ConsumerConfig(
            name=durable,
            durable_name=durable,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=ack_wait,
            max_deliver=-1,
            max_ack_pending=1000,
            filter_subject=subject,
        )
        what = f"group {group!r} on {subject!r} (consumer {durable} in stream {stream})"
        try:
            try:
                pull = await self._bind(js, stream, subject, config)
            except NotFoundError as exc:
                if exc.err_code != _STREAM_NOT_FOUND:
                    raise
                self._forget(subject)  # deleted since it was made here: make it again
                stream = await self.ensure_stream(subject)
                pull = await self._bind(js, stream, subject, config)
        except ConfigError:
            raise
        except APIError as exc:
            if exc.code is not None and 400 <= exc.code < 500:  # refused: not transient
                raise ConfigError(f"JetStream refused {what}: {exc.description}") from exc
            raise BrokerUnavailable(f"cannot subscribe {what}: {exc.description}") from exc
        except Exception as exc:
            raise BrokerUnavailable(
                f"cannot subscribe {what}: {exc or type(exc).__name__}"
            ) from exc
        if _cancels() > cancels:  # a cancel nats-py dropped: start no consumer
            with contextlib.suppress(Exception):
                await pull.unsubscribe()
            raise asyncio.CancelledError
        subscription = NatsSubscription(pull=pull, grace=ack_wait)
        consumer = _Consumer(
            self, pull, subject, group, handler, max_deliver, retry_delay, ack_wait, config
        )
        subscription._task = asyncio.create_task(consumer.run(subscription))
        self._subscriptions.append(subscription)
        return subscription

    async def _bind(
        self, js: JetStreamContext, stream: str, subject: str, config: ConsumerConfig
    ) -> JetStreamContext.PullSubscription:
        """Pull from the group's durable consumer, made if missing."""
        durable = config.durable_name
        assert durable is not None
        made = await self._check_consumer(js, stream, durable, subject)
        if made is not None and made.ack_wait != config.ack_wait:
            # the consumer keeps the ack_wait it was made with, and a member marks what
            # it holds every third of its own: a longer one here would let the server
            # hand a running handler's message to another member
            log.info(
                "consumer %s in stream %s: ack_wait %gs -> %gs",
                durable,
                stream,
                made.ack_wait or 0,
                config.ack_wait or 0,
            )
            try:
                await js.add_consumer(
                    stream, config=dataclasses.replace(made, ack_wait=config.ack_wait)
                )
            except APIError as exc:
                log.warning(
                    "consumer %s in stream %s keeps ack_wait %gs, not %gs: %s",
                    durable,
                    stream,
                    made.ack_wait or 0,
                    config.ack_wait or 0,
                    exc.description,
                )
        return await js.pull_subscribe(subject, durable=durable, stream=stream, config=config)

    async def _remake_consumer(self, subject: str, config: ConsumerConfig) -> str:
        """Make the stream of ``subject`` (unless it is there) and the durable consumer
        ``config`` describes again, after either was deleted under a subscription."""
        self._forget(subject)
        stream = await self.ensure_stream(subject)
        _, js = await self._context()
        await js.add_consumer(stream, config=config)
        return stream

    async def _check_consumer(
        self, js: JetStreamContext, stream: str, durable: str, subject: str
    ) -> ConsumerConfig | None:
        """The config of the consumer of this name, None if there is none yet; refuse
        to bind to one that filters another subject (an earlier version gave
        ``orders.a_b`` the name ``orders.a.b`` has now)."""
        try:
            info = await js.consumer_info(stream, durable)
        except NotFoundError as exc:
            if exc.err_code == _STREAM_NOT_FOUND:
                raise
            return None
        made = info.config.filter_subject
        if made != subject:
            raise ConfigError(
                f"consumer {durable!r} in stream {stream} filters {made!r}, not {subject!r} "
                "(made by an earlier seamwork version for another subject): delete it "
                "(nats consumer rm) to subscribe"
            )
        config: ConsumerConfig = info.config
        return config

    async def _dead_letter(
        self, msg: Msg, subject: str, group: str, error: str, attempts: int
    ) -> None:
        original = dict(msg.headers or {})
        message_id = original.get("Nats-Msg-Id", f"seq-{msg.metadata.sequence.stream}")
        headers = {k: v for k, v in original.items() if not k.startswith("Nats-")}
        headers.update(dead_letter_headers(subject, group, error, attempts))
        headers["Nats-Msg-Id"] = f"dlq:{group}:{message_id}"
        nc, _ = await self._context()
        over = _wire_size(msg.data, headers) - nc.max_payload
        if over > 0:  # a message near max_payload: its letter keeps less of the error
            error_bytes = headers[DLQ_ERROR].encode()
            headers[DLQ_ERROR] = error_bytes[: max(0, len(error_bytes) - over)].decode(
                errors="ignore"
            )
        target = f"deadletter.{_NAME.sub('_', group)}.{subject}"
        await self._check_size(target, msg.data, headers)  # still over: left for redelivery
        await self._stored(target, msg.data, headers)

    @_keeps_cancels
    async def dead_letters(self, *, limit: int = 100) -> list[DeadLetter]:
        """The dead letters, oldest first; reads only (a missing stream lists as empty).

        Raises:
            BrokerUnavailable: the stream could not be read to its end (a partial
                list would pass for the whole).
        """
        _, js = await self._context()
        try:
            info = await js.stream_info(DLQ_STREAM)
        except NotFoundError:
            return []
        except Exception as exc:
            raise BrokerUnavailable(f"cannot read {DLQ_STREAM}: {exc}") from exc
        letters: list[DeadLetter] = []
        seq = info.state.first_seq
        while seq and seq <= info.state.last_seq and len(letters) < limit:
            try:
                raw = await js.get_msg(DLQ_STREAM, seq)
            except NotFoundError:  # a gap: replayed letters are deleted
                seq += 1
                continue
            except Exception as exc:
                raise BrokerUnavailable(f"cannot read {DLQ_STREAM} at {seq}: {exc}") from exc
            letters.append(read_dead_letter(str(seq), raw.data or b"", _stored_headers(raw)))
            seq += 1
        return letters

    @_keeps_cancels
    async def replay_dead_letter(self, key: str) -> None:
        missing = MessagingError(f"no dead letter with key {key!r} in {DLQ_STREAM}")
        if not key.isdigit() or int(key) < 1:  # keys are stream sequences: 1, 2, ...
            raise missing
        _, js = await self._context()
        try:
            raw = await js.get_msg(DLQ_STREAM, int(key))
        except NotFoundError as exc:
            raise missing from exc
        headers = _stored_headers(raw)
        subject = headers.get(DLQ_SUBJECT, "")
        try:
            check_subject(subject)
        except ConfigError as exc:  # filed by hand or by another tool: nowhere to send it
            raise MessagingError(
                f"dead letter {key} names no subject to replay to ({DLQ_SUBJECT}: {subject!r})"
            ) from exc
        for name in DLQ_HEADERS:
            headers.pop(name, None)
        original = headers.get("Nats-Msg-Id", "")
        headers = {k: v for k, v in headers.items() if not k.startswith("Nats-")}
        headers["Nats-Msg-Id"] = f"{original.removeprefix('dlq:')}:replay:{key}"
        await self.ensure_stream(subject)
        try:
            await self._stored(subject, raw.data or b"", headers)
        except Exception as exc:
            raise PublishError(f"replay of dead letter {key} to {subject}: {exc}") from exc
        await js.delete_msg(DLQ_STREAM, int(key))


async def _log_error(exc: Exception) -> None:
    log.warning("nats: %s: %s", type(exc).__name__, exc)


__all__ = ["DLQ_STREAM", "NatsBroker", "NatsSubscription", "stream_for"]


async def _close_through_cancels(nc: NatsClient) -> bool:
    """Close ``nc``, finishing the close even if cancelled meanwhile (a close cut short
    left its socket open, for the garbage collector to find); True if it was."""
    closing = asyncio.ensure_future(nc.close())
    cancelled = False
    while not closing.done():
        try:
            await asyncio.shield(closing)
        except asyncio.CancelledError:
            cancelled = True
        except Exception:  # (the close's own failure: the connection is gone all the same)
            break
    if closing.done() and not closing.cancelled():
        closing.exception()  # retrieved: a failed close is not logged as unretrieved
    # A cancel that cut drain() short inside its own close left the client marked
    # closed with its socket open, and close() then returns at once: close the socket.
    transport = getattr(nc, "_transport", None)
    if transport is not None:
        transport.close()
        try:
            await transport.wait_closed()
        except asyncio.CancelledError:
            cancelled = True
        except Exception:
            pass
    return cancelled
