"""The ``IdempotencyLedger`` contract: behaviour every ledger adapter must have.

Subclass ``LedgerContract`` as ``Test...``; implement ``make_ledger`` (a new ledger on
empty storage) and the three small effect helpers in the adapter's SQL dialect.
Requires pytest with pytest-asyncio (``asyncio_mode=auto``).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from seamwork.errors import ConfigError, SerializationError, StoreError, StoreUnavailable
from seamwork.saga import IdempotencyLedger


class LedgerContract:
    """Behaviour shared by every ``IdempotencyLedger`` adapter."""

    async def make_ledger(self, tmp_path: Path) -> IdempotencyLedger:
        raise NotImplementedError

    def insert_effect(self, value: Any, *, fail: bool = False) -> Callable[[Any], Any]:
        """An effect that inserts ``value`` into table ``effects`` (created if need be),
        returns ``{"value": value}``, and raises after inserting when ``fail``."""
        raise NotImplementedError

    async def count_effects(self, ledger: IdempotencyLedger) -> int:
        raise NotImplementedError

    async def make_unopenable_ledger(self, tmp_path: Path) -> IdempotencyLedger:
        """A ledger whose storage cannot be opened (a missing directory, a closed
        port); the tests that need one are skipped unless this is implemented."""
        pytest.skip("make_unopenable_ledger is not implemented for this adapter")

    @pytest.fixture
    async def ledger(self, tmp_path: Path) -> AsyncIterator[IdempotencyLedger]:
        ledger = await self.make_ledger(tmp_path)
        async with ledger:
            await ledger.transaction(self.insert_effect("setup"))
            yield ledger

    async def test_a_ledger_never_opened_opens_on_first_use(self, tmp_path: Path) -> None:
        for first_use in ("once", "transaction", "result"):
            (tmp_path / first_use).mkdir()
            ledger = await self.make_ledger(tmp_path / first_use)
            try:
                if first_use == "once":
                    assert await ledger.once("k", self.insert_effect(1)) == {"value": 1}
                elif first_use == "transaction":
                    await ledger.transaction(self.insert_effect("first"))
                else:
                    assert await ledger.result("no-such-key") is None
            finally:
                await ledger.aclose()

    async def test_a_repeated_key_returns_the_first_result_and_applies_nothing(
        self, ledger: IdempotencyLedger
    ) -> None:
        first = await ledger.once("saga-1:charge", self.insert_effect(1))
        again = await ledger.once("saga-1:charge", self.insert_effect(2))
        assert first == again == {"value": 1}
        assert await ledger.result("saga-1:charge") == {"value": 1}
        assert await ledger.result("saga-1:other") is None
        assert await self.count_effects(ledger) == 2  # the setup row and one effect

    async def test_the_first_call_returns_the_result_as_every_repeat_will(
        self, ledger: IdempotencyLedger
    ) -> None:
        effect = self.insert_effect(7)
        shape = {"pair": (1, 2), "ids": ("a",)}

        def shaped(conn: Any) -> Any:
            applied = effect(conn)
            if asyncio.iscoroutine(applied):
                return _then(applied, shape)
            return shape

        first = await ledger.once("saga-6:x", shaped)
        again = await ledger.once("saga-6:x", shaped)
        assert first == again == {"pair": [1, 2], "ids": ["a"]}
        assert await ledger.result("saga-6:x") == first

    async def test_a_result_comes_back_exactly_as_the_effect_returned_it(
        self, ledger: IdempotencyLedger
    ) -> None:
        shape = {
            "zeta": {"b": 2, "a": 1},  # key order kept
            "alpha": [1e20, 1.0, -0.0, 12345678901234567890.0],  # floats stay floats
            "huge": 2**70,
            "text": "caf\u00e9 \U0001f600 a\x00b \\u0000",  # unicode, NUL, an escaped one
        }
        first = await ledger.once("saga-8:x", lambda conn: shape)
        again = await ledger.once("saga-8:x", lambda conn: {"second": True})
        stored = await ledger.result("saga-8:x")
        assert repr(first) == repr(again) == repr(stored) == repr(shape)

    @pytest.mark.parametrize(
        "key",
        [
            "",
            "saga\x00-1:x",
            "saga-\ud800:x",
            "k" * 1025,
            "\u00e9" * 513,
            "".join(chr(0x100 + i * 7919 % 0x1E00) for i in range(1500)),  # past a btree's
        ],
        ids=["empty", "nul", "lone-surrogate", "1025-bytes", "1026-utf8-bytes", "3000-bytes"],
    )
    async def test_a_key_no_ledger_can_hold_is_refused_and_nothing_is_applied(
        self, ledger: IdempotencyLedger, key: str
    ) -> None:
        with pytest.raises(ConfigError, match="idempotency key"):
            await ledger.once(key, self.insert_effect(1))
        with pytest.raises(ConfigError, match="idempotency key"):
            await ledger.result(key)
        assert await self.count_effects(ledger) == 1

    async def test_long_and_unicode_keys_up_to_1024_bytes_are_kept_apart(
        self, ledger: IdempotencyLedger
    ) -> None:
        keys = ["\u00e9" * 512, "\u00e9" * 511 + "e", "\U0001f600" * 256, "x" * 1024, "\t \n"]
        for n, key in enumerate(keys):
            assert await ledger.once(key, self.insert_effect(n)) == {"value": n}
        for n, key in enumerate(keys):
            assert await ledger.once(key, self.insert_effect(99)) == {"value": n}
            assert await ledger.result(key) == {"value": n}
        assert await self.count_effects(ledger) == 1 + len(keys)

    async def test_a_result_that_is_not_valid_unicode_is_refused_and_nothing_is_applied(
        self, ledger: IdempotencyLedger
    ) -> None:
        bad = _returning(self.insert_effect(5), {"name": "caf\ud800"})
        with pytest.raises(SerializationError, match="saga-9:x"):
            await ledger.once("saga-9:x", bad)
        assert await ledger.result("saga-9:x") is None
        assert await self.count_effects(ledger) == 1

    async def test_a_closed_ledger_opens_again(self, ledger: IdempotencyLedger) -> None:
        await ledger.once("saga-3:charge", self.insert_effect(5))
        await ledger.aclose()
        await ledger.open()  # (the fixture closes it again)
        assert await ledger.result("saga-3:charge") == {"value": 5}

    async def test_a_failing_effect_records_nothing_and_its_writes_roll_back(
        self, ledger: IdempotencyLedger
    ) -> None:
        with pytest.raises(RuntimeError, match="declined"):
            await ledger.once("saga-2:charge", self.insert_effect(9, fail=True))
        assert await ledger.result("saga-2:charge") is None
        assert await self.count_effects(ledger) == 1
        assert await ledger.once("saga-2:charge", self.insert_effect(3)) == {"value": 3}

    async def test_racing_calls_with_one_key_apply_the_effect_once(
        self, ledger: IdempotencyLedger
    ) -> None:
        results = await asyncio.gather(
            *(ledger.once("saga-3:reserve", self.insert_effect(n)) for n in range(8))
        )
        assert len({r["value"] for r in results}) == 1
        assert await self.count_effects(ledger) == 2

    async def test_concurrent_first_calls_on_a_ledger_that_cannot_open_all_fail(
        self, tmp_path: Path
    ) -> None:
        ledger = await self.make_unopenable_ledger(tmp_path)
        calls = [ledger.once(f"saga-7:{n % 2}", self.insert_effect(n)) for n in range(4)]
        calls.append(ledger.result("saga-7:0"))
        calls.append(ledger.transaction(self.insert_effect(9)))
        try:
            async with asyncio.timeout(15):
                outcomes = await asyncio.gather(*calls, return_exceptions=True)
        finally:
            await ledger.aclose()
        assert [type(o) for o in outcomes] == [StoreUnavailable] * len(calls), outcomes

    async def test_a_result_that_is_not_json_is_refused_and_nothing_is_applied(
        self, ledger: IdempotencyLedger
    ) -> None:
        bad = _returning(self.insert_effect(5), object())
        with pytest.raises(SerializationError, match="saga-4:x"):
            await ledger.once("saga-4:x", bad)
        assert await ledger.result("saga-4:x") is None
        assert await self.count_effects(ledger) == 1

    async def test_a_statement_failing_in_the_store_raises_store_error_and_applies_nothing(
        self, ledger: IdempotencyLedger
    ) -> None:
        effect = self.insert_effect(6)

        def bad(conn: Any) -> Any:
            applied = effect(conn)
            if asyncio.iscoroutine(applied):
                return _then(applied, None, conn, "SELECT * FROM seamwork_no_such_table")
            return conn.execute("SELECT * FROM seamwork_no_such_table")

        with pytest.raises(StoreError, match="seamwork_no_such_table"):
            await ledger.once("saga-5:x", bad)
        with pytest.raises(StoreError, match="seamwork_no_such_table"):
            await ledger.transaction(bad)
        assert await ledger.result("saga-5:x") is None
        assert await self.count_effects(ledger) == 1
        assert await ledger.once("saga-5:x", effect) == {"value": 6}


def _returning(effect: Any, value: Any) -> Any:
    """``effect`` (sync or async, as the ledger's connection needs), returning ``value``."""

    def run(conn: Any) -> Any:
        applied = effect(conn)
        return _then(applied, value) if asyncio.iscoroutine(applied) else value

    return run


async def _then(awaitable: Any, value: Any, conn: Any = None, sql: str = "") -> Any:
    await awaitable
    if sql:
        await conn.execute(sql)
    return value
