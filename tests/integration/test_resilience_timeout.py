"""Timeout on the system clock: one shared timer per loop, asyncio.timeout's semantics."""

from __future__ import annotations

import asyncio
import time

import pytest

from seamwork.errors import CallTimeout
from seamwork.resilience import Timeout


async def test_a_call_past_its_deadline_is_cancelled_with_call_timeout() -> None:
    cancelled: list[bool] = []

    async def hangs() -> None:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            cancelled.append(True)
            raise

    started = time.monotonic()
    with pytest.raises(CallTimeout):
        await Timeout(0.05).call(hangs)
    assert 0.04 <= time.monotonic() - started < 1.0
    assert cancelled == [True]
    assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]


async def test_calls_in_flight_each_expire_on_their_own_deadline() -> None:
    timeout = Timeout(0.1)

    async def takes(seconds: float) -> float:
        await asyncio.sleep(seconds)
        return seconds

    async def later(delay: float, seconds: float) -> float:
        await asyncio.sleep(delay)
        return await timeout.call(takes, seconds)

    results = await asyncio.gather(
        later(0.0, 0.02), later(0.0, 0.5), later(0.05, 0.08), later(0.05, 0.5),
        return_exceptions=True,
    )  # fmt: skip
    assert results[0] == 0.02
    assert isinstance(results[1], CallTimeout)
    assert results[2] == 0.08
    assert isinstance(results[3], CallTimeout)


async def test_a_fast_call_leaves_nothing_behind_and_a_timeout_error_of_its_own_passes() -> None:
    timeout = Timeout(5.0)

    async def ok() -> int:
        return 1

    async def own_timeout() -> None:
        raise TimeoutError("from the callee")

    assert [await timeout.call(ok) for _ in range(100)] == [1] * 100
    with pytest.raises(TimeoutError, match="from the callee") as raised:
        await timeout.call(own_timeout)
    assert type(raised.value) is TimeoutError  # unchanged, not wrapped in a CallTimeout
    assert not timeout._book[1].inflight  # type: ignore[index]


async def test_an_outer_cancellation_is_not_turned_into_a_timeout() -> None:
    timeout = Timeout(0.05)

    async def hangs() -> None:
        await asyncio.sleep(10)

    task = asyncio.create_task(timeout.call(hangs))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


def test_the_policy_works_across_event_loops() -> None:
    timeout = Timeout(0.05)

    async def hangs() -> None:
        await asyncio.sleep(10)

    async def once() -> None:
        with pytest.raises(CallTimeout):
            await timeout.call(hangs)

    asyncio.run(once())
    asyncio.run(once())
