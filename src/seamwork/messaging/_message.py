"""Messages and their wire form.

A message is a type, JSON data and identity: ``id`` (what the broker de-duplicates
and the inbox records), ``correlation_id`` (the flow it belongs to - an order's
whole choreography shares one) and ``causation_id`` (the message that caused it).
On the wire the body is the JSON data and everything else rides in headers, so
any consumer - in any language - can route and trace without parsing the body.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import KW_ONLY, dataclass, field
from typing import Any, Final

from seamwork._core.codec import dumps, loads
from seamwork._core.ids import new_id
from seamwork.errors import ConfigError, InvalidMessage

TYPE: Final = "Seamwork-Type"
CORRELATION: Final = "Seamwork-Correlation-Id"
CAUSATION: Final = "Seamwork-Causation-Id"
MSG_ID: Final = "Seamwork-Id"
"""The message id header (NATS also gets it as ``Nats-Msg-Id``, RabbitMQ as ``message_id``)."""
MAX_HEADER_BYTES: Final = 8 * 1024
TRACE_HEADERS: Final = ("traceparent", "tracestate")
"""The trace context headers a follow-up carries over from its cause."""
_RESERVED = frozenset({TYPE, CORRELATION, CAUSATION, MSG_ID})
_BLANK = re.compile(r"[\s\x00-\x1f\x7f]")
_HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
"""A header name (an RFC 7230 token): what NATS accepts."""
_LINE_BREAK = re.compile(r"[\r\n]")
_BROKERS_OWN_PREFIXES = ("nats-", "seamwork-", "x-first-death-", "x-last-death-")
_BROKERS_OWN = frozenset({"x-delivery-count", "x-death", "x-stream-offset"})
"""Header names (any case) a broker or seamwork sets and reads on the wire: NATS acts
on ``Nats-*`` (``Nats-Msg-Id`` de-duplicates, ``Nats-Expected-*`` refuses) and drops
them on receipt; RabbitMQ's own and seamwork's delivery headers count retries."""


def check_subject(subject: object, *, wildcards: bool = False) -> str:
    """``subject`` if it is a well-formed subject, else ``ConfigError`` naming the flaw.

    Dot-separated, non-empty tokens without whitespace or control characters (what
    NATS takes, and what every adapter routes on). A token ``*`` (any one token) or a
    last token ``>`` (one or more) is a wildcard: allowed only to subscribe
    (``wildcards=True``), never to publish - a message has one subject.
    """
    if not isinstance(subject, str) or not subject:
        raise ConfigError(f"a subject must be a non-empty string, got {subject!r}")
    if _BLANK.search(subject):
        raise ConfigError(f"subject {subject!r} has whitespace or control characters")
    try:
        subject.encode()
    except UnicodeEncodeError:  # a lone surrogate: argv or file-name bytes
        raise ConfigError(f"subject {subject!r} is not valid Unicode") from None
    tokens = subject.split(".")
    if not all(tokens):
        raise ConfigError(f"subject {subject!r} has an empty token")
    for index, token in enumerate(tokens):
        if token not in ("*", ">"):
            continue
        if not wildcards:
            raise ConfigError(f"cannot publish to {subject!r}: wildcards only subscribe")
        if token == ">" and index != len(tokens) - 1:
            raise ConfigError(f"subject {subject!r}: '>' must be the last token")
    return subject


@dataclass(frozen=True, slots=True)
class Message:
    """A message to publish or one received.

    Args:
        type: the message type, e.g. ``"OrderCreated"``.
        data: a JSON-serializable mapping (the body).
        id: unique per message (default: a fresh UUIDv7); keep it when re-sending.
        correlation_id: the flow this message belongs to (default: its own id,
            i.e. it starts a flow).
        causation_id: the id of the message that caused this one.
        headers: extra string headers (trace context such as ``traceparent``...).
    """

    type: str
    data: Mapping[str, Any] = field(default_factory=dict)
    _: KW_ONLY  # Message(type, data, *, id=..., ...): a third positional is a mistake
    id: str = field(default_factory=new_id)
    correlation_id: str | None = None
    causation_id: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.type, str) or not self.type.strip():
            raise ConfigError(f"a message type must be a non-empty string, got {self.type!r}")
        if not isinstance(self.data, Mapping):
            raise ConfigError(f"message {self.type!r}: data must be a mapping")
        if not isinstance(self.id, str) or not self.id:
            raise ConfigError(f"message {self.type!r}: id must be a non-empty string")
        for name in ("correlation_id", "causation_id"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ConfigError(f"message {self.type!r}: {name} must be a non-empty string")
        if not isinstance(self.headers, Mapping):
            raise ConfigError(f"message {self.type!r}: headers must be a mapping")
        for key, value in self.headers.items():
            if not isinstance(key, str) or not isinstance(value, str):
                raise ConfigError(f"message {self.type!r}: headers must map str to str")
            if key in _RESERVED:
                raise ConfigError(f"message {self.type!r}: header {key!r} is set by seamwork")

    @property
    def flow(self) -> str:
        """The correlation id, or the message's own id when it starts a flow."""
        return self.correlation_id or self.id

    def caused(self, type: str, data: Mapping[str, Any] | None = None, **kw: Any) -> Message:
        """A message caused by this one, in the same flow (correlation kept, causation
        = this message); trace context headers are carried over. ``kw`` are
        ``Message``'s other fields (``id``, ``headers``)."""
        for name in ("correlation_id", "causation_id"):
            if name in kw:
                raise ConfigError(
                    f"message {type!r}: caused() sets {name} itself (this message's flow "
                    "and id); build a Message to set it"
                )
        extra = kw.pop("headers", {})
        if not isinstance(extra, Mapping):
            raise ConfigError(f"message {type!r}: headers must be a mapping")
        headers = {k: v for k, v in self.headers.items() if k in TRACE_HEADERS}
        headers.update(extra)
        return Message(
            type,
            {} if data is None else data,
            correlation_id=self.flow,
            causation_id=self.id,
            headers=headers,
            **kw,
        )


def in_flow_of(message: Message, cause: Message) -> Message:
    """``message`` as published while ``cause`` is handled: one that names neither a
    flow nor a cause of its own (no ``correlation_id``, no ``causation_id``) gets
    what ``cause.caused()`` gives - correlation = ``cause.flow``, causation =
    ``cause.id`` and, if it carries no trace context of its own, ``cause``'s - in a
    copy with the same id; any other (``cause`` itself, forwarded, too) is returned
    as it is."""
    if message.correlation_id is not None or message.causation_id is not None:
        return message
    if message.id == cause.id:  # forwarded: it would be its own cause
        return message
    headers = dict(message.headers)
    if not any(name in headers for name in TRACE_HEADERS):
        headers.update({k: v for k, v in cause.headers.items() if k in TRACE_HEADERS})
    return dataclasses.replace(
        message, correlation_id=cause.flow, causation_id=cause.id, headers=headers
    )


def encode(
    message: Message, extra: Mapping[str, str] | None = None
) -> tuple[bytes, dict[str, str]]:
    """The body and headers of ``message``, with ``extra`` headers (those given to a
    broker's ``publish``) checked like the message's own; ``InvalidMessage`` if it
    cannot be sent."""
    text = dumps(message.data, what=f"data of message {message.type!r}")
    try:
        body = text.encode()
    except UnicodeEncodeError as exc:  # a lone surrogate: argv or file-name bytes
        raise InvalidMessage(
            f"message {message.type!r}: data holds text that is not valid Unicode "
            f"({text[max(exc.start - 20, 0) : exc.end + 20]!r}); no broker or store takes it"
        ) from None
    _check_own_names(message)
    headers = {**message.headers, **_extra(message, extra or {})}
    _check_wire(message, headers)
    headers[TYPE] = message.type
    headers[MSG_ID] = message.id
    headers[CORRELATION] = message.flow
    if message.causation_id:
        headers[CAUSATION] = message.causation_id
    size = sum(len(k.encode()) + len(v.encode()) + 4 for k, v in headers.items())
    if size > MAX_HEADER_BYTES:
        raise InvalidMessage(
            f"message {message.type!r} {message.id}: headers are {size} bytes, "
            f"over the {MAX_HEADER_BYTES}-byte limit"
        )
    return body, headers


def _extra(message: Message, extra: Mapping[str, str]) -> Mapping[str, str]:
    for key, value in extra.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise InvalidMessage(f"message {message.type!r}: headers must map str to str")
        if key in _RESERVED:
            raise InvalidMessage(f"message {message.type!r}: header {key!r} is set by seamwork")
    return extra


def _check_own_names(message: Message) -> None:
    """Refuse a message header named like one the broker keeps for itself: it would
    not arrive, and on the way it would change the delivery (a ``Nats-Msg-Id`` shared
    by two messages drops the second as a duplicate)."""
    for key in message.headers:
        folded = key.lower()
        if folded in _BROKERS_OWN or folded.startswith(_BROKERS_OWN_PREFIXES):
            raise InvalidMessage(
                f"message {message.type!r} {message.id}: header {key!r} is kept by the broker "
                "(Nats-*, Seamwork-*, x-delivery-count, x-death...); use another name"
            )


def _check_wire(message: Message, headers: Mapping[str, str]) -> None:
    """Refuse what a broker would not carry unchanged: NATS takes only token header
    names, and turns line breaks in a header into spaces and trims it."""
    for key in headers:
        if not _HEADER_NAME.fullmatch(key):
            raise InvalidMessage(
                f"message {message.type!r} {message.id}: header name {key!r} must be "
                "letters, digits and !#$%&'*+-.^_`|~ only"
            )
    fields = {
        "type": message.type,
        "id": message.id,
        "correlation_id": message.correlation_id or "",
        "causation_id": message.causation_id or "",
        **{f"header {key!r}": value for key, value in headers.items()},
    }
    for what, value in fields.items():
        try:
            value.encode()
        except UnicodeEncodeError:  # a lone surrogate: argv or file-name bytes
            raise InvalidMessage(
                f"message {message.type!r}: {what} {value!r} is not valid Unicode; no "
                "broker or store takes it"
            ) from None
        if _LINE_BREAK.search(value) or value != value.strip():
            raise InvalidMessage(
                f"message {message.type!r}: {what} {value!r} has a line break or "
                "surrounding whitespace, which would not arrive as sent"
            )


def decode(body: bytes, headers: Mapping[str, str] | None, *, fallback_id: str = "") -> Message:
    """A received message; ``InvalidMessage`` (never retried) if it is malformed."""
    headers = dict(headers or {})
    type_ = headers.pop(TYPE, "")
    message_id = headers.pop(MSG_ID, "") or fallback_id
    if not type_:
        raise InvalidMessage(f"message {message_id or '?'} has no {TYPE} header")
    try:
        data = loads(body) if body else {}
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidMessage(
            f"message {type_} {message_id}: body is not valid JSON: {exc}"
        ) from exc
    if not isinstance(data, dict):
        raise InvalidMessage(f"message {type_} {message_id}: body is not a JSON object")
    try:
        return Message(
            type_,
            data,
            id=message_id or new_id(),
            correlation_id=headers.pop(CORRELATION, None) or None,
            causation_id=headers.pop(CAUSATION, None) or None,
            headers={k: v for k, v in headers.items() if not k.startswith("Nats-")},
        )
    except ConfigError as exc:  # e.g. a type of spaces from another producer
        raise InvalidMessage(f"message {type_!r} {message_id}: {exc}") from exc
