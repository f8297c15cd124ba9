"""How ``NewEvent`` and stream names are checked: the common case and every other shape alike."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from types import MappingProxyType, SimpleNamespace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from seamwork.errors import ConfigError
from seamwork.events import MAX_KEY_BYTES, NewEvent
from seamwork.events._model import _check_new_event, check_stream_name


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


def _refusal(check: Callable[[], object]) -> str | None:
    try:
        check()
    except ConfigError as exc:
        return str(exc)
    return None


_ODD_TEXT = st.builds(
    str.__add__,
    st.sampled_from(["", "", "$", " ", "\x00"]),
    st.text(st.characters() | st.sampled_from(["\x00", " ", "$", "\U0001f600"])),
)
_KEYS = _ODD_TEXT | st.builds(
    str.__mul__, st.sampled_from(["x", "é", "\u20ac", "\U0001f600"]), st.integers(250, 1030)
)


@settings(max_examples=300)
@given(
    kind=_ODD_TEXT | st.integers() | st.none(),
    data=st.sampled_from([{}, {"a": 1}, [1], None]),
    metadata=st.sampled_from([None, {"user": "u"}, [1], "x"]),
    id_=_KEYS | st.integers() | st.none(),
    schema=st.integers(-1, 2) | st.sampled_from([2**31 - 1, 2**31, True, 1.0]),
)
def test_the_common_event_check_refuses_and_accepts_as_the_full_one(
    kind: object, data: object, metadata: object, id_: object, schema: object
) -> None:
    fields = {"type": kind, "data": data, "metadata": metadata, "id": id_}
    full = _refusal(lambda: _check_new_event(SimpleNamespace(**fields, schema_version=schema)))
    assert _refusal(lambda: NewEvent(**fields, schema_version=schema)) == full  # type: ignore[arg-type]


@settings(max_examples=300)
@given(_KEYS)
def test_the_common_stream_name_check_refuses_and_accepts_as_the_full_one(stream: str) -> None:
    # a str subclass never takes the common case's step
    assert _refusal(lambda: check_stream_name(stream)) == _refusal(
        lambda: check_stream_name(Name(stream))
    )
