"""The README's first-screen example runs as written."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"


def _first_python_block() -> str:
    match = re.search(r"```python\n(.*?)```", README.read_text(), re.S)
    assert match, "README has no python example"
    return match.group(1)


def test_the_readme_example_is_short_enough_for_a_first_screen() -> None:
    assert len(_first_python_block().strip().splitlines()) <= 17


def test_the_readme_example_runs_and_compensates(tmp_path: Path) -> None:
    script = tmp_path / "example.py"
    script.write_text(_first_python_block())
    first = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert first.returncode == 0, first.stderr
    assert first.stdout.splitlines() == ["released r-42", "failed"]
    again = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert again.stdout.splitlines() == ["failed"]  # same saga id: nothing runs twice
