"""FlowMonitor's rebuilt view of a flow, fed messages as a broker hands them over:
each stream consumed on its own, so a flow's messages arrive in any order, some more
than once, some after the flow ended."""

from __future__ import annotations

import itertools

import pytest

from seamwork.errors import ConfigError
from seamwork.messaging import FlowMonitor, Message

TERMINAL = {"OrderCompleted": "completed", "OrderCancelled": "cancelled"}


def _success(correlation_id: str = "order-1") -> list[tuple[Message, str]]:
    """The success path's messages with their subjects, in causal order."""
    created = Message("OrderCreated", {}, correlation_id=correlation_id)
    reserved = created.caused("InventoryReserved")
    charged = reserved.caused("PaymentProcessed")
    notified = charged.caused("NotificationSent")
    completed = notified.caused("OrderCompleted")
    return [
        (created, "orders.created"),
        (reserved, "inventory.reserved"),
        (charged, "payment.processed"),
        (notified, "notification.sent"),
        (completed, "orders.completed"),
    ]


def test_a_flow_whose_end_arrives_before_its_cause_is_where_the_end_was_published() -> None:
    # the monitor's consumer of orders.> fetched OrderCompleted before its consumer
    # of notification.> fetched the NotificationSent that caused it
    created, reserved, charged, notified, completed = _success()
    monitor = FlowMonitor(TERMINAL)
    for message, subject in (created, reserved, charged, completed, notified):
        monitor.record(message, subject)
    flow = monitor.flow("order-1")
    assert flow is not None
    assert (flow.status, flow.where) == ("completed", "orders")
    assert [kind for kind, _ in flow.path][-2:] == ["NotificationSent", "OrderCompleted"]


def test_an_end_caused_by_an_earlier_end_decides_even_when_it_arrives_first() -> None:
    # a completed order refunded and cancelled: OrderCancelled (on refunds.>) is fetched
    # before the OrderCompleted that caused it (on orders.>)
    created, *_, (completed, completed_on) = _success()
    cancelled = completed.caused("OrderCancelled")
    monitor = FlowMonitor(TERMINAL)
    for message, subject in (created, (cancelled, "refunds.cancelled"), (completed, completed_on)):
        monitor.record(message, subject)
    flow = monitor.flow("order-1")
    assert flow is not None
    assert (flow.status, flow.where) == ("cancelled", "refunds")


def test_a_monitor_with_max_ended_keeps_only_the_flows_that_ended_last() -> None:
    # a monitor that runs for good must not keep every flow it ever saw
    monitor = FlowMonitor(TERMINAL, max_ended=2)
    stuck = Message("OrderCreated", {}, correlation_id="stuck")
    monitor.record(stuck, "orders.created")  # never ends: kept, whatever its age
    for n in range(5):
        for message, subject in _success(f"order-{n}"):
            monitor.record(message, subject)
    assert list(monitor.flows()) == ["stuck", "order-3", "order-4"]
    late = _success("order-0")[3]  # a NotificationSent of a forgotten flow, arriving late
    monitor.record(*late)
    assert list(monitor.flows()) == ["stuck", "order-3", "order-4"]
    assert monitor.ignored == 1
    assert monitor.forget("stuck") is True
    assert monitor.forget("stuck") is False
    assert list(monitor.flows()) == ["order-3", "order-4"]


def test_max_ended_below_one_is_refused() -> None:
    for bad in (0, -1, 2.5, "10", True):
        with pytest.raises(ConfigError, match=r"max_ended must be an int >= 1 or None"):
            FlowMonitor(TERMINAL, max_ended=bad)  # type: ignore[arg-type]


def test_bad_input_to_the_monitor_is_a_config_error_naming_it() -> None:
    monitor = FlowMonitor(TERMINAL)
    created = Message("OrderCreated", {}, correlation_id="order-1")
    with pytest.raises(ConfigError, match=r"record takes a Message, got dict"):
        monitor.record({"type": "OrderCreated"}, "orders.created")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"the subject as a non-empty string, got 7"):
        monitor.record(created, 7)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"a correlation id is a string, got 1"):
        monitor.flow(1)  # type: ignore[arg-type]
    assert monitor.flows() == {}  # nothing was recorded
    with pytest.raises(ConfigError, match=r"terminal maps message types to statuses"):
        FlowMonitor(["OrderCompleted"])  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"terminal status of 'OrderCompleted' .* None"):
        FlowMonitor({"OrderCompleted": None})  # type: ignore[dict-item]
    with pytest.raises(ConfigError, match=r"'in progress' is no end state"):
        FlowMonitor({"OrderCompleted": "in progress"})


def test_a_compensated_flow_ends_cancelled_in_any_arrival_order_with_redeliveries() -> None:
    # PaymentFailed is an end state of its own here, superseded by the OrderCancelled
    # its compensation leads to, whichever of the two the monitor is handed first
    ends = {**TERMINAL, "PaymentFailed": "failed"}
    created = Message("OrderCreated", {}, correlation_id="order-1")
    reserved = created.caused("InventoryReserved")
    failed = reserved.caused("PaymentFailed")
    released = failed.caused("InventoryReleased")
    cancelled = released.caused("OrderCancelled")
    messages = [
        (created, "orders.created"),
        (reserved, "inventory.reserved"),
        (failed, "payment.failed"),
        (released, "inventory.released"),
        (cancelled, "orders.cancelled"),
    ]
    for order in itertools.permutations(messages):
        monitor = FlowMonitor(ends)
        for message, subject in order:
            monitor.record(message, subject)
            monitor.record(message, subject)  # redelivered
        flow = monitor.flow("order-1")
        assert flow is not None
        assert (flow.status, flow.where) == ("cancelled", "orders")
        assert [step.message_id for step in flow.steps] == [m.id for m, _ in messages]
