"""How ``NewEvent`` and stream names are checked: the common case and every other shape alike."""

from __future__ import annotations

from collections import OrderedDict
from types import MappingProxyType
from typing import Any

import pytest

from seamwork.errors import ConfigError
from seamwork.events import MAX_KEY_BYTES, NewEvent
from seamwork.events._model import check_stream_name


class Name(str):
    pass


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"type": ""}, "an event type must be a non-empty string"),
        ({"type": " \t"}, "an event type must be a non-empty string"),
        ({"type": 5}, "an event type must be a non-empty string"),
        ({"type": "A\x00"}, "an event type must not contain a NUL"),
        ({"data": [1]}, "data must be a mapping, got list"),
        ({"metadata": [1]}, "metadata must be a mapping or None"),
        ({"schema_version": True}, "schema_version must be an int"),
        ({"schema_version": 1.0}, "schema_version must be an int"),
        ({"schema_version": 0}, "schema_version must be >= 1"),
        ({"schema_version": 2**31}, "schema_version must be <= 2147483647"),
        ({"id": ""}, "id must be a non-empty string"),
        ({"id": 5}, "id must be a non-empty string"),
        ({"id": "a\x00"}, "the id must not contain a NUL"),
        ({"id": "\U0001f600" * 257}, "the id must be at most 1024 bytes"),
        ({"id": "x" * (MAX_KEY_BYTES + 1)}, "the id must be at most 1024 bytes"),
    ],
)
def test_a_bad_field_is_refused_by_name(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        NewEvent(**{"type": "A", **kwargs})


@pytest.mark.parametrize(
    "kwargs",
    [
        {"type": Name("A")},
        {"data": OrderedDict(a=1)},
        {"data": MappingProxyType({"a": 1})},
        {"metadata": MappingProxyType({"user": "u"})},
        {"id": Name("id-1")},
        {"id": "x" * MAX_KEY_BYTES},
        {"id": "\U0001f600" * (MAX_KEY_BYTES // 4)},
        {"schema_version": 2**31 - 1},
    ],
)
def test_a_good_event_of_any_shape_is_accepted(kwargs: dict[str, Any]) -> None:
    event = NewEvent(**{"type": "A", **kwargs})
    assert all(getattr(event, field) is value for field, value in kwargs.items())


@pytest.mark.parametrize(
    ("stream", "message"),
    [
        ("", "must be a non-empty string"),
        (" \n", "must be a non-empty string"),
        (5, "must be a non-empty string"),
        ("$all", "starting with '\\$' are reserved"),
        ("a\x00", "must not contain a NUL"),
        ("x" * (MAX_KEY_BYTES + 1), "must be at most 1024 bytes"),
        ("\U0001f600" * 257, "must be at most 1024 bytes"),
    ],
)
def test_a_bad_stream_name_is_refused_by_name(stream: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        check_stream_name(stream)


@pytest.mark.parametrize("stream", [Name("s"), " $s", "x" * MAX_KEY_BYTES, "é" * 512])
def test_a_good_stream_name_of_any_shape_is_accepted(stream: str) -> None:
    assert check_stream_name(stream) is stream
