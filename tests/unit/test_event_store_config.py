"""How ``Upcasters`` and ``Snapshots`` check what they are given (no store involved)."""

from __future__ import annotations

from typing import Any

import pytest

from seamwork.errors import ConfigError
from seamwork.events import Snapshots, Upcasters


def same(data: dict[str, Any]) -> dict[str, Any]:
    return data


@pytest.mark.parametrize("bad", [1.0, 2.5, "1", None, True, 0, -1, 2**31 - 1])
def test_an_upcaster_from_version_that_is_not_a_schema_version_is_refused_by_name(
    bad: object,
) -> None:
    upcasters = Upcasters()
    with pytest.raises(ConfigError, match="from_version"):
        upcasters.register("Shipped", bad, same)  # type: ignore[arg-type]
    assert upcasters.current_version("Shipped") == 1  # nothing was registered


@pytest.mark.parametrize(
    ("args", "kwargs", "field"),
    [
        (("", 1, same), {}, "type"),
        ((None, 1, same), {}, "type"),
        (("Shipped", 1, same), {"to_type": 5}, "to_type"),
    ],
)
def test_an_upcaster_with_a_bad_event_type_is_refused_by_name(
    args: tuple[Any, ...], kwargs: dict[str, Any], field: str
) -> None:
    with pytest.raises(ConfigError, match=field):
        Upcasters().register(*args, **kwargs)


def test_a_good_upcaster_registers_and_raises_the_current_version() -> None:
    upcasters = Upcasters()
    upcasters.register("Shipped", 1, same)
    assert upcasters.current_version("Shipped") == 2


@pytest.mark.parametrize("bad", [1.5, 2.0, "10", None, True, 0, float("nan")])
def test_snapshots_every_that_is_not_a_whole_count_is_refused_by_name(bad: object) -> None:
    with pytest.raises(ConfigError, match=r"Snapshots\.every"):
        Snapshots("count", every=bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", ["", None, 5])
def test_a_snapshots_name_that_is_not_a_string_is_refused_by_name(bad: object) -> None:
    with pytest.raises(ConfigError, match=r"Snapshots\.name"):
        Snapshots(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 0, -1.0, "1", True])
@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_a_poll_interval_that_is_not_finite_seconds_above_0_is_refused(
    bad: object, backend: str, tmp_path: Any
) -> None:
    # NaN passed '<= 0': a live subscription's timeout(NaN) expired at once on asyncio
    # (the subscriber polled the store in a busy loop) and raised ValueError on uvloop
    from seamwork.events import EventStore

    def make() -> object:
        if backend == "sqlite":
            return EventStore.sqlite(tmp_path / "e.db", poll_interval=bad)
        return EventStore.postgres("dbname=unused", poll_interval=bad)

    with pytest.raises(ConfigError, match="poll_interval must be"):
        make()
