"""The demo's console lines print paths and reasons as they are: brackets in them are
not rich markup (a --dir like ``runs[/1]`` crashed the demo after its whole run)."""

from __future__ import annotations

from pathlib import Path

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
