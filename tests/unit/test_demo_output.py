"""The demo's console lines print paths and reasons as they are: brackets in them are
not rich markup (a --dir like ``runs[/1]`` crashed the demo after its whole run)."""

from __future__ import annotations

from pathlib import Path

import pytest
from rich.console import Console

from seamwork.demo.report import RichReporter
from seamwork.demo.run import _print_where
from seamwork.demo.scenario import DemoConfig, DemoRun


def _console() -> Console:
    return Console(record=True, width=200, color_system=None)


def test_the_files_line_prints_a_directory_with_brackets_as_it_is() -> None:
    console = _console()
    directory = Path("/tmp/runs[/1]/[bold]x")
    _print_where(console, DemoConfig(directory=directory), DemoRun(DemoConfig(directory), []))
    text = console.export_text()
    assert f"Files left in {directory} (sagas.db" in text
    assert f"--db {directory / 'sagas.db'}" in text or "--db '" in text


def test_an_alert_prints_a_reason_with_brackets_as_it_is() -> None:
    console = _console()
    RichReporter(console, 1).alert("order-1", "warehouse [/api/v1] said [type=missing]")
    assert "ALERT saga order-1 is stuck: warehouse [/api/v1] said [type=missing]" in (
        console.export_text()
    )


def test_the_latency_percentiles_are_nearest_rank() -> None:
    """The q quantile of n samples is the ceil(q * n)-th smallest: p99 of 100 is the
    99th, not the slowest (q * n an odd whole number was rounded up one rank)."""
    from seamwork.demo.report import percentile

    assert percentile([float(n) for n in range(1, 101)], 0.99) == 99.0
    assert percentile([float(n) for n in range(1, 301)], 0.99) == 297.0
    assert percentile([float(n) for n in range(1, 301)], 0.5) == 150.0
    assert percentile([float(n) for n in range(1, 62)], 0.5) == 31.0
    assert percentile([float(n) for n in range(1, 11)], 0.99) == 10.0
    assert percentile([3.0], 0.99) == 3.0
    assert percentile([], 0.5) == 0.0
    assert percentile([float(n) for n in range(1, 101)], 0.07) == 7.0  # 0.07 * 100 > 7


def test_a_second_ctrl_c_while_the_run_removes_its_schemas_says_what_may_be_left(
    capsys: pytest.CaptureFixture[str],
) -> None:
    import types

    from seamwork.demo.run import _close_servers

    class Interrupted:
        pattern = "seamwork_demo_abc123_*"

        def drop(self) -> None:
            raise KeyboardInterrupt

    config = types.SimpleNamespace(keep=False, pg=Interrupted(), nats_run=None)
    with pytest.raises(KeyboardInterrupt):
        _close_servers(config, Console())  # type: ignore[arg-type]
    assert "may have left PostgreSQL schemas seamwork_demo_abc123_*" in capsys.readouterr().err


def test_the_summary_breaks_down_the_sagas_that_failed_not_those_planned_to() -> None:
    """Orders 2, 11, 19 and 20 of 20 are planned to fail (three declined cards, one
    slow carrier); had order 2 completed, the breakdown must not still count it."""
    from seamwork.demo.report import summary_table
    from seamwork.demo.saga import expectation, make_orders, saga_id
    from seamwork.saga import SagaState, SagaStatus

    demo = DemoRun(DemoConfig(Path("unused"), 20), make_orders(20))
    for order in demo.orders:
        status = SagaStatus(expectation(order).status)
        if order.order_id == "order-0002":
            status = SagaStatus.COMPLETED
        sid = saga_id(order.order_id)
        demo.states[sid] = SagaState(sid, "order", 1, status)
    console = _console()
    console.print(summary_table(demo))
    assert "3  (2 declined, 1 shipment timed out)" in console.export_text()


def test_act_twos_summary_breaks_down_the_orders_cancelled_not_those_planned_to_be() -> None:
    """Of 20 choreographed orders, 4 are planned declined and 3 out of stock; had a
    declined one (choreo-0003) completed, the breakdown must not still count it."""
    from seamwork.demo.choreo_act import SUCCESS, ChoreographyRun, plan, summary
    from seamwork.messaging import Flow

    orders = plan(20)
    flows = {
        o.order_id: Flow(o.order_id, (), "completed" if o.expected == SUCCESS else "cancelled")
        for o in orders
    }
    flows["choreo-0003"] = Flow("choreo-0003", (), "completed")
    run = ChoreographyRun(orders, flows, {}, 20.0, 1.0, Path("unused"))
    console = _console()
    console.print(summary(run))
    assert "6  (3 declined, 3 out of stock)" in console.export_text()
