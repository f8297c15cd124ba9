"""How ``NewEvent`` checks its fields: the common event and every other shape alike."""

from __future__ import annotations

from collections import OrderedDict
from types import MappingProxyType
from typing import Any

import pytest

from seamwork.errors import ConfigError
from seamwork.events import MAX_KEY_BYTES, NewEvent


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
