"""The demo's orchestrator process: the one started after the SIGKILL is the same
worker as the one killed, so it takes over the sagas left in flight at once.

A PostgreSQL saga store releases, when an orchestrator opens, only the leases of
that same worker's earlier incarnations; any other worker's lease (the dead one's,
if the name differs) is claimable only when it runs out, 30 s later.
"""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from seamwork._core import ids
from seamwork.demo import worker
from seamwork.demo.scenario import prepare


async def test_the_restarted_orchestrator_is_the_same_worker_whatever_the_clock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    made: list[worker.SagaOrchestrator] = []

    class Recorded(worker.SagaOrchestrator):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(worker, "SagaOrchestrator", Recorded)
    monkeypatch.setattr(worker, "emit", lambda event, **fields: None)
    await prepare(tmp_path)
    await worker.run(tmp_path, 3, 4)  # orders 1-3: none with the slow carrier
    later = time.time_ns() + 70 * 10**9  # the restart, 70 s on
    monkeypatch.setattr(ids, "time", SimpleNamespace(time_ns=lambda: later))
    await worker.run(tmp_path, 3, 4)
    first, second = made
    assert first.worker == second.worker
