"""The ``SagaStore`` contract: behaviour every saga store adapter must have.

Subclass ``SagaStoreContract`` in a test module, name the subclass ``Test...`` and
implement ``make_store`` (a new, empty store) and ``corrupt`` (damage one row the way
a bad disk or a bad hand edit would)::

    class TestMyStore(SagaStoreContract):
        async def make_store(self, tmp_path: Path) -> SagaStore:
            return MyStore(...)

        async def corrupt(self, store: SagaStore, saga_id: str) -> None:
            ...

Every adapter seamwork ships runs this suite; third-party adapters should too.
Requires pytest and pytest-asyncio (``asyncio_mode = "auto"``).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from seamwork.errors import (
    ConfigError,
    CorruptSagaError,
    InvalidSagaOperation,
    LeaseLost,
    SerializationError,
)
from seamwork.saga import SagaState, SagaStatus, SagaStore, StepEvent

OWNER = "owner-a"
OTHER = "owner-b"
KEY = ("order", 1)


def saga_state(saga_id: str, **changes: object) -> SagaState:
    """A valid saga row, leased to ``OWNER``, with ``changes`` applied."""
    base = SagaState(
        saga_id=saga_id,
        saga_name="order",
        saga_version=1,
        status=SagaStatus.RUNNING,
        context={"order_id": 7, "lines": [{"sku": "A", "qty": 2}], "note": "café"},
        started_at=1000.0,
        updated_at=1000.0,
        lease_owner=OWNER,
        lease_expires_at=2000.0,
    )
    return base.evolve(**changes)


def started(saga_id: str, at: float = 1000.0) -> list[StepEvent]:
    return [StepEvent(saga_id, at, "saga_started"), StepEvent(saga_id, at, "started", "a")]


class SagaStoreContract:
    """Behaviour shared by every ``SagaStore`` adapter."""

    single_orchestrator = False
    """True for stores one orchestrator process owns whole (SQLite's file lock): there,
    attaching frees every lease; elsewhere only the worker's earlier incarnations'."""

    async def make_store(self, tmp_path: Path) -> SagaStore:
        """Return a new, unopened store over empty storage."""
        raise NotImplementedError

    async def reopen(self, store: SagaStore, tmp_path: Path) -> SagaStore:
        """Return a new store over the same storage as ``store`` (after it closed)."""
        raise NotImplementedError

    async def corrupt(self, store: SagaStore, saga_id: str) -> None:
        """Make the row of ``saga_id`` undecodable (e.g. invalid JSON in its context)."""
        raise NotImplementedError

    @pytest.fixture
    async def store(self, tmp_path: Path) -> AsyncIterator[SagaStore]:
        store = await self.make_store(tmp_path)
        await store.open()
        await store.attach(OWNER)
        try:
            yield store
        finally:
            await store.aclose()

    # --- create / get -----------------------------------------------------------------

    async def test_created_saga_reads_back_field_for_field(self, store: SagaStore) -> None:
        state = saga_state(
            "s1",
            completed_steps=("a",),
            uncertain_steps=("b",),
            skipped_steps=("c",),
            step_attempts={"b": 2},
            compensation_attempts={"a": 1},
            deadline_at=1500.5,
            failure_reason="why",
        )
        assert await store.create(state, started("s1")) is True
        assert await store.get("s1") == state

    async def test_create_with_an_existing_id_writes_nothing(self, store: SagaStore) -> None:
        first = saga_state("s1")
        await store.create(first, started("s1"))
        again = saga_state("s1", context={"order_id": 99})
        assert await store.create(again, started("s1", 2000.0)) is False
        assert await store.get("s1") == first
        assert len(await store.timeline("s1")) == 2

    async def test_a_closed_store_opens_again(self, store: SagaStore) -> None:
        await store.create(saga_state("a"), started("a"))
        await store.aclose()
        await store.open()  # (the fixture closes it again)
        found = await store.get("a")
        assert found is not None
        assert found.saga_id == "a"

    async def test_get_of_an_unknown_id_is_none(self, store: SagaStore) -> None:
        assert await store.get("nope") is None

    # --- fenced saves ----------------------------------------------------------------

    async def test_owner_save_stores_the_transition_and_its_events(self, store: SagaStore) -> None:
        await store.create(saga_state("s1"), started("s1"))
        moved = saga_state("s1", current_step_index=1, completed_steps=("a",), updated_at=1001.0)
        await store.save(moved, [StepEvent("s1", 1001.0, "completed", "a", 1)], owner=OWNER)
        assert await store.get("s1") == moved
        events = await store.timeline("s1")
        assert [e.event for e in events] == ["saga_started", "started", "completed"]
        assert events[-1] == StepEvent("s1", 1001.0, "completed", "a", 1)

    async def test_save_by_a_non_owner_is_rejected_and_changes_nothing(
        self, store: SagaStore
    ) -> None:
        await store.create(saga_state("s1"), started("s1"))
        stale = saga_state("s1", status=SagaStatus.COMPLETED, lease_owner=OTHER)
        with pytest.raises(LeaseLost):
            await store.save(stale, [StepEvent("s1", 1.0, "saga_completed")], owner=OTHER)
        assert await store.get("s1") == saga_state("s1")
        assert len(await store.timeline("s1")) == 2

    async def test_status_fenced_save_applies_only_in_the_expected_status(
        self, store: SagaStore
    ) -> None:
        await store.create(saga_state("s1", status=SagaStatus.STUCK), started("s1"))
        retried = saga_state("s1", status=SagaStatus.COMPENSATING, lease_owner=None)
        await store.save(retried, [], expect_status=SagaStatus.STUCK)
        stored = await store.get("s1")
        assert stored is not None
        assert stored.status is SagaStatus.COMPENSATING
        assert stored.lease_owner is None
        with pytest.raises(InvalidSagaOperation):
            await store.save(retried, [], expect_status=SagaStatus.STUCK)

    async def test_unserializable_context_is_refused_before_anything_is_written(
        self, store: SagaStore
    ) -> None:
        await store.create(saga_state("s1"), started("s1"))
        bad = saga_state("s1", context={"when": object()})
        with pytest.raises(SerializationError, match="when"):
            await store.save(bad, [StepEvent("s1", 1.0, "completed", "a")], owner=OWNER)
        assert await store.get("s1") == saga_state("s1")
        assert len(await store.timeline("s1")) == 2

    async def test_a_failed_save_does_not_disturb_concurrent_saves(self, store: SagaStore) -> None:
        for i in range(20):
            await store.create(saga_state(f"s{i}"), started(f"s{i}"))
        good = [
            store.save(saga_state(f"s{i}", current_step_index=1), [], owner=OWNER)
            for i in range(20)
        ]
        bad = store.save(saga_state("s3", lease_owner=OTHER), [], owner=OTHER)
        results = await asyncio.gather(bad, *good, return_exceptions=True)
        assert isinstance(results[0], LeaseLost)
        assert all(r is None for r in results[1:])
        for i in range(20):
            state = await store.get(f"s{i}")
            assert state is not None
            assert state.current_step_index == 1

    # --- queries ---------------------------------------------------------------------

    async def test_list_filters_by_status_and_name_newest_first(self, store: SagaStore) -> None:
        await store.create(saga_state("a", updated_at=1.0), [])
        await store.create(saga_state("b", updated_at=3.0, status=SagaStatus.STUCK), [])
        await store.create(saga_state("c", updated_at=2.0), [])
        await store.create(saga_state("d", updated_at=4.0, saga_name="refund"), [])
        assert [s.saga_id for s in await store.list()] == ["d", "b", "c", "a"]
        running = await store.list(status=SagaStatus.RUNNING)
        assert [s.saga_id for s in running] == ["d", "c", "a"]
        assert [s.saga_id for s in await store.list(name="order", limit=2)] == ["b", "c"]

    @pytest.mark.parametrize(
        ("bad", "field"),
        [
            ({"limit": -1}, "limit"),
            ({"limit": True}, "limit"),
            ({"limit": "2"}, "limit"),
            ({"limit": 2.5}, "limit"),
            ({"limit": 2**63}, "limit"),
            ({"status": "sleeping"}, "status"),
        ],
    )
    async def test_list_refuses_a_bad_limit_or_status_naming_it(
        self, store: SagaStore, bad: dict[str, object], field: str
    ) -> None:
        await store.create(saga_state("a"), [])
        with pytest.raises(ConfigError, match=field):
            await store.list(**bad)  # type: ignore[arg-type]
        assert await store.list(limit=0) == []

    async def test_timeline_keeps_the_order_events_were_stored(self, store: SagaStore) -> None:
        await store.create(saga_state("s1"), started("s1"))
        for n in range(5):
            event = StepEvent("s1", 1000.0 + n, "errored", "a", n + 1, f"boom {n}")
            await store.save(saga_state("s1"), [event], owner=OWNER)
        details = [e.detail for e in await store.timeline("s1") if e.event == "errored"]
        assert details == [f"boom {n}" for n in range(5)]

    # --- leases ----------------------------------------------------------------------

    async def test_claim_takes_active_runnable_sagas_with_free_leases(
        self, store: SagaStore
    ) -> None:
        await store.create(saga_state("run", lease_owner=None), [])
        await store.create(saga_state("comp", lease_owner=None, status=SagaStatus.COMPENSATING), [])
        await store.create(saga_state("done", lease_owner=None, status=SagaStatus.COMPLETED), [])
        await store.create(saga_state("stuck", lease_owner=None, status=SagaStatus.STUCK), [])
        await store.create(saga_state("v2", lease_owner=None, saga_version=2), [])
        result = await store.claim(OWNER, [KEY], now=1500.0, lease_seconds=30.0, limit=10)
        assert sorted(s.saga_id for s in result.claimed) == ["comp", "run"]
        assert all(s.lease_owner == OWNER for s in result.claimed)
        assert all(s.lease_expires_at == 1530.0 for s in result.claimed)
        stored = await store.get("run")
        assert stored is not None
        assert stored.lease_owner == OWNER

    async def test_a_live_lease_is_not_claimed_and_an_expired_one_is(
        self, store: SagaStore
    ) -> None:
        await store.create(saga_state("s1", lease_owner=OTHER, lease_expires_at=1600.0), [])
        early = await store.claim(OWNER, [KEY], now=1500.0, lease_seconds=30.0, limit=10)
        assert early.claimed == []
        late = await store.claim(OWNER, [KEY], now=1700.0, lease_seconds=30.0, limit=10)
        assert [s.saga_id for s in late.claimed] == ["s1"]

    async def test_claim_respects_its_limit(self, store: SagaStore) -> None:
        for i in range(7):
            await store.create(saga_state(f"s{i}", lease_owner=None), [])
        first = await store.claim(OWNER, [KEY], now=1.0, lease_seconds=30.0, limit=5)
        second = await store.claim(OWNER, [KEY], now=1.0, lease_seconds=30.0, limit=5)
        assert len(first.claimed) == 5
        assert len(second.claimed) == 2
        assert {s.saga_id for s in first.claimed}.isdisjoint(s.saga_id for s in second.claimed)

    async def test_a_corrupt_row_is_reported_by_id_and_not_claimed(self, store: SagaStore) -> None:
        await store.create(saga_state("good", lease_owner=None), [])
        await store.create(saga_state("bad", lease_owner=None), [])
        await self.corrupt(store, "bad")
        result = await store.claim(OWNER, [KEY], now=1.0, lease_seconds=30.0, limit=10)
        assert [s.saga_id for s in result.claimed] == ["good"]
        assert [e.saga_id for e in result.corrupt] == ["bad"]
        with pytest.raises(CorruptSagaError, match="bad"):
            await store.get("bad")
        assert [s.saga_id for s in await store.list()] == ["good"]

    async def test_corrupt_rows_do_not_use_up_a_claims_limit(self, store: SagaStore) -> None:
        """Corrupt rows are never leased, so they stay the oldest claimable ones: counted
        against the limit, they filled every claim of a worker with little room (a
        ``max_running=1`` worker claimed nothing ever again)."""
        for at, saga_id in enumerate(("bad1", "bad2", "good"), start=1):
            await store.create(saga_state(saga_id, lease_owner=None, updated_at=float(at)), [])
        await self.corrupt(store, "bad1")
        await self.corrupt(store, "bad2")
        result = await store.claim(OWNER, [KEY], now=1.0, lease_seconds=30.0, limit=1)
        assert [s.saga_id for s in result.claimed] == ["good"]
        assert sorted(e.saga_id for e in result.corrupt) == ["bad1", "bad2"]

    async def test_a_claim_past_corrupt_rows_claims_each_saga_once(self, store: SagaStore) -> None:
        """A claim that read on past a corrupt row read the sagas it had already claimed
        again: the next page must start after them, not return them twice."""
        for at, saga_id in enumerate(("good1", "bad", "good2", "good3"), start=1):
            await store.create(saga_state(saga_id, lease_owner=None, updated_at=float(at)), [])
        await self.corrupt(store, "bad")
        result = await store.claim(OWNER, [KEY], now=1.0, lease_seconds=30.0, limit=2)
        assert [s.saga_id for s in result.claimed] == ["good1", "good2"]
        assert [e.saga_id for e in result.corrupt] == ["bad"]

    async def test_renew_extends_only_the_owners_leases(self, store: SagaStore) -> None:
        await store.create(saga_state("mine"), [])
        await store.create(saga_state("theirs", lease_owner=OTHER), [])
        kept = await store.renew(OWNER, ["mine", "theirs"], now=1900.0, lease_seconds=60.0)
        assert kept == {"mine"}
        mine, theirs = await store.get("mine"), await store.get("theirs")
        assert mine is not None
        assert mine.lease_expires_at == 1960.0
        assert theirs is not None
        assert (theirs.lease_owner, theirs.lease_expires_at) == (OTHER, 2000.0)

    async def test_released_sagas_can_be_claimed_by_another_owner(self, store: SagaStore) -> None:
        await store.create(saga_state("s1"), [])
        await store.release(OWNER, ["s1"])
        result = await store.claim(OTHER, [KEY], now=1.0, lease_seconds=30.0, limit=10)
        assert [s.saga_id for s in result.claimed] == ["s1"]

    async def test_a_restarted_worker_takes_back_its_earlier_incarnations_sagas(
        self, tmp_path: Path
    ) -> None:
        store = await self.make_store(tmp_path)
        await store.open()
        try:
            await store.create(saga_state("s1", lease_owner="w1:old", lease_expires_at=9e12), [])
            await store.create(saga_state("s2", lease_owner="w2:x", lease_expires_at=9e12), [])
            await store.attach("w1:new")
            result = await store.claim("w1:new", [KEY], now=1.0, lease_seconds=30, limit=10)
            claimed = [s.saga_id for s in result.claimed]
            if self.single_orchestrator:
                assert "s1" in claimed
            else:  # another worker's live lease is not taken (nor "w10:"'s for "w1")
                assert claimed == ["s1"]
                other = await store.get("s2")
                assert other is not None
                assert other.lease_owner == "w2:x"
            with pytest.raises(LeaseLost):  # the old incarnation is fenced off
                await store.save(saga_state("s1", lease_owner="w1:old"), [], owner="w1:old")
        finally:
            await store.aclose()

    # --- alerts owed by stuck sagas --------------------------------------------------

    async def test_a_final_save_stores_the_lease_its_state_carries(self, store: SagaStore) -> None:
        for saga_id in ("done", "stuck"):
            await store.create(saga_state(saga_id, status=SagaStatus.COMPENSATING), [])
        done = saga_state("done", status=SagaStatus.FAILED, lease_owner=None, lease_expires_at=None)
        await store.save(done, [], owner=OWNER)
        stuck = saga_state("stuck", status=SagaStatus.STUCK, lease_expires_at=1530.0)
        await store.save(stuck, [], owner=OWNER)
        assert await store.get("done") == done
        assert await store.get("stuck") == stuck  # still OWNER's: its alert is owed

    async def test_claim_hands_over_a_stuck_saga_whose_alert_lease_expired(
        self, store: SagaStore
    ) -> None:
        owed = saga_state("owed", status=SagaStatus.STUCK, lease_expires_at=1400.0)
        await store.create(owed, [])
        live = saga_state("live", status=SagaStatus.STUCK, lease_expires_at=1600.0)
        await store.create(live, [])
        sent = saga_state("sent", status=SagaStatus.STUCK, lease_owner=None, lease_expires_at=None)
        await store.create(sent, [])
        await store.create(saga_state("v2", status=SagaStatus.STUCK, saga_version=2), [])
        await store.create(saga_state("run", lease_owner=None), [])
        result = await store.claim(OTHER, [KEY], now=1500.0, lease_seconds=30.0, limit=10)
        assert [s.saga_id for s in result.claimed] == ["run"]
        assert result.alerts == [owed.evolve(lease_owner=OTHER, lease_expires_at=1530.0)]
        again = await store.claim(OWNER, [KEY], now=1510.0, lease_seconds=30.0, limit=10)
        assert (again.claimed, again.alerts) == ([], [])  # OTHER holds it now
        await store.release(OTHER, ["owed"])
        released = await store.get("owed")
        assert released is not None
        assert (released.status, released.lease_owner) == (SagaStatus.STUCK, None)
        later = await store.claim(OWNER, [KEY], now=9000.0, lease_seconds=30.0, limit=10)
        # "owed" went out; any worker sends an owed alert, of any name and version
        assert sorted(s.saga_id for s in later.alerts) == ["live", "v2"]

    async def test_a_release_fenced_on_a_status_leaves_a_saga_that_moved_on(
        self, store: SagaStore
    ) -> None:
        await store.create(saga_state("stuck", status=SagaStatus.STUCK), [])
        await store.create(saga_state("retried", status=SagaStatus.COMPENSATING), [])
        await store.release(OWNER, ["stuck", "retried"], status=SagaStatus.STUCK)
        stuck, retried = await store.get("stuck"), await store.get("retried")
        assert stuck is not None
        assert retried is not None
        assert (stuck.lease_owner, stuck.lease_expires_at) == (None, None)
        assert (retried.lease_owner, retried.lease_expires_at) == (OWNER, 2000.0)

    async def test_an_operator_write_to_a_stuck_saga_settles_its_alert(
        self, store: SagaStore
    ) -> None:
        await store.create(saga_state("s1", status=SagaStatus.STUCK, lease_expires_at=1.0), [])
        aborted = saga_state("s1", status=SagaStatus.FAILED, lease_owner=None)
        await store.save(aborted.evolve(lease_expires_at=None), [], expect_status=SagaStatus.STUCK)
        result = await store.claim(OWNER, [KEY], now=1500.0, lease_seconds=30.0, limit=10)
        assert (result.claimed, result.alerts) == ([], [])

    async def test_a_restarted_worker_sends_the_alerts_its_earlier_incarnation_owed(
        self, tmp_path: Path
    ) -> None:
        store = await self.make_store(tmp_path)
        await store.open()
        try:
            mine = saga_state("mine", status=SagaStatus.STUCK, lease_owner="w1:old")
            await store.create(mine.evolve(lease_expires_at=9e12), [])
            theirs = saga_state("theirs", status=SagaStatus.STUCK, lease_owner="w2:x")
            await store.create(theirs.evolve(lease_expires_at=9e12), [])
            await store.attach("w1:new")
            result = await store.claim("w1:new", [KEY], now=1.0, lease_seconds=30, limit=10)
            alerts = sorted(s.saga_id for s in result.alerts)
            assert result.claimed == []
            assert alerts == (["mine", "theirs"] if self.single_orchestrator else ["mine"])
        finally:
            await store.aclose()

    async def test_stranded_lists_active_sagas_no_registered_definition_runs(
        self, store: SagaStore
    ) -> None:
        await store.create(saga_state("v1"), [])
        await store.create(saga_state("v3", saga_version=3), [])
        await store.create(saga_state("v3done", saga_version=3, status=SagaStatus.FAILED), [])
        await store.create(saga_state("other", saga_name="refund"), [])
        stranded = await store.stranded([KEY])
        assert sorted(s.saga_id for s in stranded) == ["other", "v3"]

    # --- durability ------------------------------------------------------------------

    async def test_concurrent_writes_all_survive_a_reopen(
        self, store: SagaStore, tmp_path: Path
    ) -> None:
        states = [saga_state(f"s{i}", context={"i": i}) for i in range(200)]
        await asyncio.gather(*(store.create(s, started(s.saga_id)) for s in states))
        moved = [s.evolve(current_step_index=1, completed_steps=("a",)) for s in states]
        await asyncio.gather(*(store.save(s, [], owner=OWNER) for s in moved))
        await store.aclose()
        again = await self.reopen(store, tmp_path)
        await again.open()
        try:
            for state in moved:
                assert await again.get(state.saga_id) == state
        finally:
            await again.aclose()
