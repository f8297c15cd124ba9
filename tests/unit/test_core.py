"""The shared building blocks: manual clock, codec, ids, retry schedule, hooks."""

from __future__ import annotations

import asyncio
import enum
import functools
import json
import logging
import operator
import os
import random
import re
import threading
import time
import uuid
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from seamwork._core import Retry, codec, dumps, loads, new_id
from seamwork._core.codec import dumps_clean
from seamwork._core.hooks import Hooks
from seamwork.errors import ConfigError, SerializationError
from seamwork.testing import ManualClock


async def test_manual_clock_wakes_sleepers_only_when_advanced_past_them() -> None:
    clock = ManualClock()
    woke: list[str] = []

    async def sleeper(name: str, seconds: float) -> None:
        await clock.sleep(seconds)
        woke.append(name)

    tasks = [asyncio.create_task(sleeper("30s", 30)), asyncio.create_task(sleeper("5s", 5))]
    await asyncio.sleep(0)
    clock.advance(4.9)
    await asyncio.sleep(0)
    assert woke == []
    clock.advance(0.1)
    await asyncio.sleep(0)
    assert woke == ["5s"]
    clock.advance(25)
    await asyncio.gather(*tasks)
    assert woke == ["5s", "30s"]
    assert clock.monotonic() == 30


async def test_manual_clock_timeout_fires_on_advance_not_on_real_time() -> None:
    clock = ManualClock()
    blocked = asyncio.Event()

    async def guarded() -> None:
        async with clock.timeout(30):
            await blocked.wait()

    task = asyncio.create_task(guarded())
    await asyncio.sleep(0.01)
    assert not task.done()
    clock.advance(30)
    with pytest.raises(TimeoutError):
        await task


async def test_manual_clock_timeout_rescheduled_by_its_holder_keeps_the_new_deadline() -> None:
    """As asyncio.Timeout: reschedule(None) turns the timeout off, and a deadline set
    by the holder is the one in force - the manual deadline fired all the same."""
    clock = ManualClock()
    blocked = asyncio.Event()

    async def guarded() -> str:
        async with clock.timeout(30) as scope:
            scope.reschedule(None)
            await blocked.wait()
        return "ran to its end"

    task = asyncio.create_task(guarded())
    await asyncio.sleep(0.01)
    clock.advance(60)
    await asyncio.sleep(0.01)
    assert not task.done()
    blocked.set()
    assert await task == "ran to its end"


async def test_manual_clock_nan_sleep_or_timeout_ends_at_once_and_later_timers_still_fire() -> None:
    """A NaN deadline compares false with every other: pushed on the timer heap it sat
    at the top, never due, and no sleep or timeout behind it ever fired again."""
    clock = ManualClock()
    await asyncio.wait_for(clock.sleep(float("nan")), 1)  # like sleep(0), not forever
    with pytest.raises(TimeoutError):
        async with clock.timeout(float("nan")):  # like asyncio.timeout(nan): expired
            await asyncio.sleep(0)
    later = asyncio.create_task(clock.sleep(1))
    await asyncio.sleep(0)
    clock.advance(1)
    await asyncio.wait_for(later, 1)
    assert clock.pending_timers == 0
    with pytest.raises(ValueError, match="NaN"):
        clock.advance(float("nan"))  # would leave the clock at NaN for good
    auto = ManualClock(auto_advance=True)
    await auto.sleep(float("nan"))
    assert auto.monotonic() == 0


async def test_manual_clock_auto_advance_makes_sleeps_instant() -> None:
    clock = ManualClock(auto_advance=True)
    await clock.sleep(3600)
    clock.sleep_blocking(60)
    assert clock.monotonic() == 3660
    assert clock.now() == 1_700_000_000.0 + 3660


def test_codec_names_the_path_of_an_unserializable_value() -> None:
    with pytest.raises(SerializationError, match=r"data\['order'\]\['lines'\]\[0\]"):
        dumps({"order": {"lines": [b"bytes"]}}, what="data")
    with pytest.raises(SerializationError, match="inf"):
        dumps({"total": float("inf")})


@pytest.mark.parametrize(
    ("value", "where"),
    [
        ({"lines": {1: "x"}}, r"data\['lines'\]\[1\]"),
        ([{"ok": 1}, {True: "x"}], r"data\[1\]\[True\]"),
        ({None: 1}, r"data\[None\]"),
        ({"total": {2.5: 1}}, r"data\['total'\]\[2\.5\]"),
    ],
)
def test_codec_refuses_a_key_json_would_turn_into_a_string(value: object, where: str) -> None:
    # json writes {1: "x"} as {"1": "x"}: what is read back would not be what was given.
    with pytest.raises(SerializationError, match=where + ".*str"):
        dumps(value, what="data")


def test_codec_keeps_string_keys_that_look_like_numbers_or_constants() -> None:
    value = {"1": {"true": [{"null": 0, "-2.5e3": "x", "ok": '{"7":'}]}, "false": None}
    assert loads(dumps(value)) == value


@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(),
        lambda c: st.lists(c) | st.dictionaries(st.text(), c),
    )
)
def test_codec_round_trips_json_values(value: object) -> None:
    assert loads(dumps(value)) == value


class _Dict(dict[Any, Any]):
    pass


class _List(list[Any]):
    pass


class _Str(str):
    pass


class _Int(int):
    def __repr__(self) -> str:
        return "not-json"


class _Float(float):
    def __repr__(self) -> str:
        return "not-json"


class _Count(enum.IntEnum):
    ONE = 1


class _Colour(enum.StrEnum):
    RED = "red"


_JSON_LIKE = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text()
    | st.integers().map(_Int)
    | st.floats(allow_nan=False, allow_infinity=False).map(_Float)
    | st.text().map(_Str)
    | st.sampled_from([_Count.ONE, _Colour.RED]),
    lambda c: (
        st.lists(c)
        | st.lists(c).map(_List)
        | st.lists(c).map(tuple)
        | st.dictionaries(st.text() | st.text().map(_Str), c)
        | st.dictionaries(st.text(), c).map(_Dict)
    ),
    max_leaves=20,
)


@pytest.fixture(params=["c", "python"])
def encoder_kind(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The codec on json's C encoder, or (no C accelerator) on its pure-Python one."""
    if request.param == "python":
        monkeypatch.setattr(codec, "c_make_encoder", None)
        monkeypatch.setattr(json.encoder, "c_make_encoder", None)
    monkeypatch.setattr(codec, "_encoders", threading.local())
    return str(request.param)


@settings(max_examples=150, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(_JSON_LIKE)
def test_codec_writes_what_json_writes_and_refuses_what_it_refuses(
    encoder_kind: str, value: object
) -> None:
    try:
        expected = json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    except ValueError:  # NaN or an infinity
        with pytest.raises(SerializationError, match="has no JSON form"):
            dumps(value)
        assert dumps_clean(value) is None
    else:
        assert dumps(value) == expected
        assert dumps_clean(value) in (expected, None)  # None: a key that reads like a number
    assert dumps({"after": [1]}) == '{"after":[1]}'


def test_ids_are_version_7_uuids_in_time_order() -> None:
    ids = [new_id() for _ in range(1000)]
    assert all(uuid.UUID(i).version == 7 for i in ids)
    assert len(set(ids)) == 1000
    assert [i[:13] for i in ids] == sorted(i[:13] for i in ids)  # millisecond prefix


_UUID7 = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")


def test_ids_hold_the_milliseconds_and_74_random_bits_on_every_thread() -> None:
    before = time.time_ns() // 1_000_000
    with ThreadPoolExecutor(4) as pool:
        batches = list(pool.map(lambda _: [new_id() for _ in range(2000)], range(8)))
    after = time.time_ns() // 1_000_000
    ids = [i for batch in batches for i in batch]
    assert len(set(ids)) == len(ids)
    assert all(_UUID7.fullmatch(i) for i in ids)
    values = [uuid.UUID(i).int for i in ids]
    assert all(before <= v >> 80 <= after for v in values)
    random_bits = (0xFFF << 64) | (2**62 - 1)  # rand_a and rand_b: each varies
    assert functools.reduce(operator.or_, values) & random_bits == random_bits
    assert functools.reduce(operator.and_, values) & random_bits == 0


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_ids_of_a_forked_child_share_no_random_part_with_its_parent() -> None:
    new_id()  # the parent holds unused random bytes when it forks
    read, write = os.pipe()
    with warnings.catch_warnings():  # (3.12+ warns of a fork in a process with threads)
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.write(write, ",".join(new_id() for _ in range(200)).encode())
        os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    with os.fdopen(read) as pipe:
        child = pipe.read().split(",")
    parent = [new_id() for _ in range(200)]
    assert len(child) == 200
    assert not {i[13:] for i in child} & {i[13:] for i in parent}


@given(st.integers(1, 30), st.floats(0, 10), st.floats(10, 100))
def test_retry_delay_never_exceeds_the_cap(attempt: int, base: float, cap: float) -> None:
    for jitter in ("full", "equal", "none"):
        policy = Retry(5, backoff=base, max_backoff=cap, jitter=jitter)  # type: ignore[arg-type]
        delay = policy.delay(attempt, random.Random(attempt))
        assert 0 <= delay <= min(cap, base * 2 ** (attempt - 1))


def test_retry_gives_up_after_max_attempts_and_on_other_errors() -> None:
    policy = Retry(3, retry_on=(ConnectionError,))
    assert policy.should_retry(1, ConnectionError())
    assert not policy.should_retry(3, ConnectionError())
    assert not policy.should_retry(1, KeyError())
    assert Retry(2, retry_on=lambda e: "again" in str(e)).should_retry(1, OSError("again"))


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"max_attempts": 0}, "max_attempts"),
        ({"backoff": -1}, "backoff"),
        ({"backoff": 5, "max_backoff": 1}, "max_backoff"),
        ({"jitter": "some"}, "jitter"),
        ({"max_attempts": True}, "max_attempts"),
        ({"backoff": float("nan")}, "backoff"),
        ({"backoff": float("inf"), "max_backoff": float("inf")}, "backoff"),
        ({"backoff": "0.5"}, "backoff"),
        ({"max_backoff": float("nan")}, "max_backoff"),
        ({"max_backoff": None}, "max_backoff"),
        ({"retry_on": ("ConnectionError",)}, "retry_on"),
        ({"retry_on": (ConnectionError, 3)}, "retry_on"),
    ],
)
def test_bad_retry_settings_name_the_field(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        Retry(**kwargs)  # type: ignore[arg-type]


def test_hooks_call_subscribers_and_survive_a_failing_one(caplog: pytest.LogCaptureFixture) -> None:
    hooks = Hooks(["open"], logging.getLogger("test"))
    seen: list[int] = []

    def broken(n: int) -> None:
        raise RuntimeError("alert system down")

    hooks.on("open", broken)
    unsubscribe = hooks.on("open", seen.append)
    hooks.emit("open", 1)
    unsubscribe()
    hooks.emit("open", 2)
    assert seen == [1]
    assert "alert system down" in caplog.text
    with pytest.raises(ConfigError, match="unknown event 'close'"):
        hooks.on("close", print)


def test_codec_names_a_circular_reference_and_a_mapping_json_cannot_encode() -> None:
    from types import MappingProxyType

    loop: dict[str, object] = {"a": 1}
    loop["self"] = loop
    with pytest.raises(SerializationError, match="circular reference"):
        dumps({"outer": loop})
    shared = [1, 2]
    assert loads(dumps({"x": shared, "y": shared})) == {"x": [1, 2], "y": [1, 2]}
    with pytest.raises(SerializationError, match="mappingproxy"):
        dumps({"m": MappingProxyType({"k": 1})})


def test_codec_encodes_one_value_on_many_threads_at_once_and_after_a_failure() -> None:
    shared = {"items": [{"n": n, "tags": ["a", "b"]} for n in range(200)]}
    expected = dumps(shared)
    with ThreadPoolExecutor(8) as pool:
        assert set(pool.map(lambda _: dumps(shared), range(400))) == {expected}
    with pytest.raises(SerializationError, match=r"value\['a'\]\[1\]"):
        dumps({"a": [1, object()]})
    assert dumps(shared) == expected


def test_codec_called_again_while_it_encodes_gives_both_values() -> None:
    inner: list[str] = []

    class Noisy(dict[str, Any]):
        def items(self) -> Any:  # the C encoder calls it for a dict subclass
            with pytest.raises(SerializationError):
                dumps({"bad": object()})
            inner.append(dumps({"inner": 1}))
            return super().items()

    assert dumps({"outer": [Noisy(a=1)]}) == '{"outer":[{"a":1}]}'
    assert inner == ['{"inner":1}']


def test_retry_delay_of_a_huge_attempt_is_the_cap_not_an_overflow() -> None:
    policy = Retry(5, backoff=0.1, max_backoff=30, jitter="none")
    assert policy.delay(5000) == 30


def test_hooks_unsubscribing_twice_leaves_a_second_copy_subscribed() -> None:
    hooks = Hooks(["open"], logging.getLogger("test"))
    seen: list[int] = []
    first = hooks.on("open", seen.append)
    hooks.on("open", seen.append)
    first()
    first()
    hooks.emit("open", 1)
    assert seen == [1]


async def test_manual_clock_timeout_of_zero_expires_at_the_first_await() -> None:
    clock = ManualClock()
    with pytest.raises(TimeoutError):
        async with clock.timeout(0):
            await asyncio.sleep(0)
    async with clock.timeout(5):
        pass
    for _ in range(100):
        sleeper = asyncio.create_task(clock.sleep(1))
        await asyncio.sleep(0)
        clock.advance(1)
        await sleeper
    assert len(clock._cancelled) <= 1  # fired timers leave nothing behind


async def test_wakeup_wakes_current_waiters_and_times_out_otherwise() -> None:
    from seamwork._core.wakeup import Wakeup

    wakeup = Wakeup()
    waiter = asyncio.create_task(wakeup.wait(10.0))
    await asyncio.sleep(0)
    wakeup.notify()
    await asyncio.wait_for(waiter, 1.0)
    started = asyncio.get_running_loop().time()
    await wakeup.wait(0.05)  # the earlier notify is not replayed
    assert asyncio.get_running_loop().time() - started >= 0.04


async def test_wakeup_keeps_a_notify_nobody_waited_for_for_the_next_wait() -> None:
    # a relay draining when a commit notified was not waiting: the notify was dropped,
    # and the message waited a whole poll interval to be published
    from seamwork._core.wakeup import Wakeup

    wakeup = Wakeup()
    wakeup.notify()  # while nobody waits
    started = asyncio.get_running_loop().time()
    await wakeup.wait(10.0)
    assert asyncio.get_running_loop().time() - started < 1.0
    started = asyncio.get_running_loop().time()
    await wakeup.wait(0.05)  # kept once, not for ever
    assert asyncio.get_running_loop().time() - started >= 0.04


async def test_lifecycle_mixins_pair_entry_and_exit() -> None:
    from seamwork._core.lifecycle import OpenClose, StartStop

    calls: list[str] = []

    class Resource(OpenClose):
        async def open(self) -> None:
            calls.append("open")

        async def aclose(self) -> None:
            calls.append("aclose")

    class Service(StartStop):
        async def start(self) -> None:
            calls.append("start")

        async def stop(self) -> None:
            calls.append("stop")

    async def use() -> None:
        async with Resource() as resource, Service():
            calls.append(type(resource).__name__)
            raise RuntimeError("inside")

    with pytest.raises(RuntimeError, match="inside"):
        await use()
    assert calls == ["open", "start", "Resource", "stop", "aclose"]


async def _loop_module() -> str:
    return type(asyncio.get_running_loop()).__module__


def test_seamwork_processes_run_on_uvloop_unless_told_otherwise(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from seamwork._core import runtime

    assert runtime.run(_loop_module()).startswith("uvloop")
    monkeypatch.setenv("SEAMWORK_LOOP", "asyncio")
    assert runtime.run(_loop_module()).startswith("asyncio")


def test_hooks_refuse_an_async_callback_whose_coroutine_would_never_run() -> None:
    """Hooks are called synchronously: an ``async def`` alert (``on_stuck``) only made a
    coroutine that nobody awaited, so the alert never went out - and the stuck saga's
    lease, its mark of an alert owed, was released as if it had."""
    hooks = Hooks(["stuck"], logging.getLogger("test"))

    async def page_on_call(state: object) -> None:
        return None

    with pytest.raises(ConfigError, match="async"):
        hooks.on("stuck", page_on_call)


def test_hooks_report_a_callback_that_returned_a_coroutine(
    caplog: pytest.LogCaptureFixture,
) -> None:
    hooks = Hooks(["stuck"], logging.getLogger("test"))

    async def page_on_call(state: object) -> None:
        return None

    hooks.on("stuck", lambda state: page_on_call(state))
    hooks.emit("stuck", "s-1")  # (no "never awaited" warning either: it is closed)
    assert "returned a coroutine" in caplog.text
