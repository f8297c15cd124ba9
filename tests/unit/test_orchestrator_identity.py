"""A worker's default name: unique per orchestrator, not per clock tick."""

from __future__ import annotations

from pathlib import Path

from seamwork.saga import Saga, SagaOrchestrator, Step
from seamwork.storage import SQLiteStore


async def _step(ctx: object) -> None:
    return None


def test_orchestrators_made_together_get_worker_names_of_their_own(tmp_path: Path) -> None:
    """The default name took a UUIDv7's first 8 hex digits - the top of its clock,
    the same for 65.5 s: two orchestrators opening one PostgreSQL store within that
    time were one worker, and the later one's start freed the earlier one's leases
    (its attach releases its own earlier incarnations') and ran its sagas too."""
    saga = Saga("s", steps=[Step("a", _step)])
    names = {
        SagaOrchestrator(SQLiteStore(str(tmp_path / f"{i}.db")), [saga]).worker for i in range(50)
    }
    assert len(names) == 50
    assert all(name.startswith("orchestrator-") for name in names)
