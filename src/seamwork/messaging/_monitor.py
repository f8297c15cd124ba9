"""The flow monitor: where is each choreographed flow right now?

Choreography has no orchestrator to ask, so the monitor rebuilds every flow from
the messages themselves. Each message carries its flow (``correlation_id``) and the
message that caused it (``causation_id``); a flow is the tree of its messages, and
read along the causation links it is the story of one order: who published what,
in response to what, and where it stopped.

The core (``FlowMonitor``) is synchronous and does no I/O: ``record(message,
subject)`` folds one message in (idempotent: a redelivered message is ignored),
``flows()`` answers. ``FlowMonitor.watch(broker, subjects)`` is the thin driver that
feeds it from broker subscriptions.

It keeps every flow in memory until it is forgotten: ``max_ended=N`` keeps the N
flows that ended last (a flow in progress is kept whatever its age), ``forget(cid)``
drops one. A late message of a flow forgotten lately is ignored, not taken for the
start of a new flow that would never end.

Invariants: a flow's ``path`` lists every recorded message of the flow exactly once,
each after the message that caused it (messages whose cause was not seen come first,
by arrival); ``status`` is the terminal status named by the type of the last message
to arrive that has one, leaving out any that caused (directly or not) another such
message seen - an end caused by an earlier end (a completed order refunded and
cancelled) decides even if it arrives first - or ``"in progress"``: a message
arriving after the end (a late side branch, a stray retry) does not reopen a
finished flow, but it is in ``path`` and ``where`` names its service. ``where`` is
the service of the last message to arrive that caused no other recorded one: a
message that arrives after a message it caused (the streams are consumed apart) does
not move the flow back to it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from seamwork.errors import ConfigError
from seamwork.messaging._message import Message
from seamwork.messaging._ports import Broker, Delivery, Subscription

IN_PROGRESS = "in progress"
FORGOTTEN_KEPT = 10_000
"""How many forgotten flows' correlation ids a monitor keeps at least, to ignore their
late messages."""


def publisher_of(subject: str) -> str:
    """The service that published on ``subject``: its first token (``orders.created``)."""
    return subject.split(".", 1)[0]


@dataclass(frozen=True, slots=True)
class FlowStep:
    """One message of a flow, as the monitor saw it."""

    type: str
    service: str
    message_id: str
    causation_id: str | None


@dataclass(frozen=True, slots=True)
class Flow:
    """One flow, rebuilt: its messages in causal order and where it stands."""

    correlation_id: str
    steps: tuple[FlowStep, ...]
    status: str
    where: str = ""
    """The service that published the message that arrived last, of those that caused
    no other message of the flow seen so far."""

    @property
    def path(self) -> list[tuple[str, str]]:
        """``[(message type, publishing service), ...]`` in causal order."""
        return [(step.type, step.service) for step in self.steps]


@dataclass
class _Tree:
    arrivals: list[FlowStep] = field(default_factory=list)
    ids: set[str] = field(default_factory=set)


class FlowMonitor:
    """Rebuilds choreographed flows from their messages.

    Every flow is kept in memory, so a monitor that runs for good should be given
    ``max_ended`` (or ``forget`` flows itself): a flow in progress is always kept.

    Args:
        terminal: message type -> the flow status it ends in, e.g.
            ``{"OrderCompleted": "completed", "OrderCancelled": "cancelled"}``.
        service_of: the publishing service of a subject (default: its first token).
        max_ended: keep at most this many ended flows; past it, the flow that ended
            first is forgotten (None: keep every flow).
    """

    def __init__(
        self,
        terminal: Mapping[str, str] | None = None,
        *,
        service_of: Callable[[str], str] = publisher_of,
        max_ended: int | None = None,
    ) -> None:
        if max_ended is not None and (
            not isinstance(max_ended, int) or isinstance(max_ended, bool) or max_ended < 1
        ):
            raise ConfigError(f"max_ended must be an int >= 1 or None, got {max_ended!r}")
        self.terminal = _terminal(terminal)
        self.service_of = service_of
        self.max_ended = max_ended
        self.ignored = 0
        """Messages ignored because their flow was forgotten."""
        self._trees: dict[str, _Tree] = {}
        self._ended: dict[str, None] = {}  # ended flows, in the order they ended
        self._forgotten: dict[str, None] = {}  # the last FORGOTTEN_KEPT forgotten flows

    def record(self, message: Message, subject: str) -> None:
        """Fold one message in; a message already recorded is ignored, and so is one
        of a flow forgotten lately (it would start that flow over, never to end)."""
        if not isinstance(message, Message):
            raise ConfigError(f"record takes a Message, got {type(message).__name__}")
        if not isinstance(subject, str) or not subject:
            # any subject a broker delivers is taken (a routing key another producer
            # chose may hold an empty token)
            raise ConfigError(f"record takes the subject as a non-empty string, got {subject!r}")
        if message.flow in self._forgotten:
            self.ignored += 1
            return
        tree = self._trees.setdefault(message.flow, _Tree())
        if message.id in tree.ids:
            return
        tree.ids.add(message.id)
        step = FlowStep(message.type, self.service_of(subject), message.id, message.causation_id)
        tree.arrivals.append(step)
        if step.type in self.terminal and message.flow not in self._ended:
            self._ended[message.flow] = None
            while self.max_ended is not None and len(self._ended) > self.max_ended:
                self.forget(next(iter(self._ended)))

    def forget(self, correlation_id: str) -> bool:
        """Drop a flow (ended or not); False if it is not kept. Its messages arriving
        later are ignored (counted in ``ignored``) while it is among the last
        ``FORGOTTEN_KEPT`` (or ``max_ended``, if more) flows forgotten."""
        if self._trees.pop(correlation_id, None) is None:
            return False
        self._ended.pop(correlation_id, None)
        self._forgotten[correlation_id] = None
        while len(self._forgotten) > max(FORGOTTEN_KEPT, self.max_ended or 0):
            del self._forgotten[next(iter(self._forgotten))]
        return True

    def flow(self, correlation_id: str) -> Flow | None:
        """The flow with this correlation id, or None if no message of it was seen."""
        if not isinstance(correlation_id, str):
            raise ConfigError(f"a correlation id is a string, got {correlation_id!r}")
        tree = self._trees.get(correlation_id)
        if tree is None:
            return None
        steps = tuple(_causal_order(tree.arrivals, tree.ids))
        return Flow(correlation_id, steps, self._status(tree.arrivals), _where(tree.arrivals))

    def _status(self, arrivals: list[FlowStep]) -> str:
        # Where a flow stands is decided by what arrived last, not by the last step
        # in causal order: after a fan-out a side branch may sort after the end. But
        # an end that caused a later end (a refund after completion) is superseded
        # by it whatever the order they arrived in.
        ends = [step for step in arrivals if step.type in self.terminal]
        by_id = {step.message_id: step for step in arrivals}
        superseded: set[str] = set()
        for end in ends:
            cause = by_id.get(end.causation_id or "")
            while cause is not None and cause.message_id not in superseded:
                superseded.add(cause.message_id)
                cause = by_id.get(cause.causation_id or "")
        return next(
            (self.terminal[s.type] for s in reversed(ends) if s.message_id not in superseded),
            # a causation cycle (forged messages) supersedes every end in it
            self.terminal[ends[-1].type] if ends else IN_PROGRESS,
        )

    def flows(self) -> dict[str, Flow]:
        """Every flow kept, by correlation id, in the order their first message
        arrived (not always the order they started: the streams are consumed apart)."""
        return {cid: flow for cid in self._trees if (flow := self.flow(cid)) is not None}

    def render(self) -> str:
        """A text table: one line per flow, its status, the service it is at, its path."""
        lines = []
        for cid, flow in self.flows().items():
            path = " -> ".join(f"{kind}({service})" for kind, service in flow.path)
            lines.append(f"{cid:<24} {flow.status:<12} at {flow.where:<14} {path}")
        return "\n".join(lines)

    async def watch(
        self, broker: Broker, subjects: Iterable[str], *, group: str = "flow-monitor"
    ) -> list[Subscription]:
        """Subscribe to ``subjects`` as ``group`` and record every message seen.

        ``group`` is a consumer group like any other: monitors sharing one split the
        messages between them and each rebuilds broken flows, so give each monitor
        that must see every flow a group of its own. The group is durable: a monitor
        started again under it goes on from where the last one stopped, without the
        messages that one saw (the flows then in progress lack their start).
        """

        async def handler(delivery: Delivery) -> None:
            self.record(delivery.message, delivery.subject)

        return [await broker.subscribe(subject, group, handler) for subject in subjects]


def _terminal(terminal: Mapping[str, str] | None) -> dict[str, str]:
    if terminal is None:
        return {}
    if not isinstance(terminal, Mapping):
        raise ConfigError(
            "terminal maps message types to statuses, e.g. {'OrderCompleted': 'completed'}; "
            f"got {terminal!r}"
        )
    for kind, status in terminal.items():
        if not isinstance(kind, str) or not kind:
            raise ConfigError(f"terminal: a message type must be a non-empty string, got {kind!r}")
        if not isinstance(status, str) or not status:
            raise ConfigError(
                f"terminal status of {kind!r} must be a non-empty string, got {status!r}"
            )
        if status == IN_PROGRESS:
            raise ConfigError(f"terminal: {IN_PROGRESS!r} is no end state (for {kind!r})")
    return dict(terminal)


def _where(arrivals: list[FlowStep]) -> str:
    """The service of the last step to arrive that caused no other recorded step (a
    cause that arrives after its effect is not where the flow is); in a causation
    cycle, which only forged messages make, the last to arrive."""
    causes = {step.causation_id for step in arrivals}
    leaf = next((s for s in reversed(arrivals) if s.message_id not in causes), arrivals[-1])
    return leaf.service


def _causal_order(arrivals: list[FlowStep], ids: set[str]) -> list[FlowStep]:
    """Depth-first along causation links; roots and siblings by arrival."""
    children: dict[str | None, list[FlowStep]] = {}
    for step in arrivals:
        parent = step.causation_id if step.causation_id in ids else None
        children.setdefault(parent, []).append(step)
    ordered: list[FlowStep] = []
    reached: set[str] = set()
    stack = list(reversed(children.get(None, [])))
    while stack:
        step = stack.pop()
        if step.message_id in reached:
            continue
        reached.add(step.message_id)
        ordered.append(step)
        stack.extend(reversed(children.get(step.message_id, [])))
    # a causation cycle (only a forged message can make one) is listed by arrival
    return ordered + [step for step in arrivals if step.message_id not in reached]
