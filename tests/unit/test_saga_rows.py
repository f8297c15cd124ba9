"""Paging a claim past corrupt rows (``take_claimable``), with the stores' query as a
list: the first ``page`` rows whose ids were not read yet."""

from __future__ import annotations

from typing import Any

from seamwork._core.codec import loads
from seamwork.saga import SagaState, SagaStatus
from seamwork.saga._ports import ClaimResult
from seamwork.storage._saga_rows import insert_values, take_claimable


def _row(saga_id: str, *, corrupt: bool = False) -> tuple[Any, ...]:
    row = list(insert_values(SagaState(saga_id, "order", 1, SagaStatus.RUNNING)))
    if corrupt:
        row[5] = "{not json"  # completed_steps
    return tuple(row)


def _claim(rows: list[tuple[Any, ...]], limit: int) -> tuple[ClaimResult, int]:
    found, seen, pages, page = ClaimResult(), [], 0, limit
    while page:
        pages += 1
        fresh = [row for row in rows if row[0] not in seen][:page]
        page = take_claimable(found, fresh, limit, seen, page, loads)
    return found, pages


def test_a_long_run_of_corrupt_rows_costs_a_few_pages_not_one_each() -> None:
    rows = [_row(f"bad{i}", corrupt=True) for i in range(1000)]
    found, pages = _claim([*rows, _row("good1"), _row("good2")], limit=1)
    assert [s.saga_id for s in found.claimed] == ["good1"]
    assert len(found.corrupt) == 1000
    assert pages <= 12


def test_a_claim_takes_at_most_its_limit_from_a_page_that_holds_more() -> None:
    rows = [_row("bad0", corrupt=True), _row("bad1", corrupt=True), _row("bad2", corrupt=True)]
    found, _ = _claim([*rows, *(_row(f"good{i}") for i in range(10))], limit=2)
    assert [s.saga_id for s in found.claimed] == ["good0", "good1"]
    assert [e.saga_id for e in found.corrupt] == ["bad0", "bad1", "bad2"]
