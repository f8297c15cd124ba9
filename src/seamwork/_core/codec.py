"""The JSON codec every store and broker uses.

Strict on the way in: NaN and infinities are refused, and so are mapping keys that
are not strings (json would write ``{1: "x"}`` as ``{"1": "x"}``, so what is read back
would differ from what was given); a value JSON cannot hold raises
``SerializationError`` naming where it sits (``data['order']['at']``), so bad input
is rejected before anything is written.

The value is walked only when something is wrong: when encoding fails, or when the
text holds a key that reads like a number, ``true``, ``false`` or ``null`` (how json
writes a non-string key; a string key like ``"1"`` looks the same, and passes).
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable
from json.encoder import c_make_encoder, encode_basestring  # type: ignore[attr-defined]
from typing import Any

from seamwork.errors import SerializationError

_ENCODER = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":"))
_Encode = Callable[[Any, int], Any]  # value, indent level -> the text's chunks
_SCALARS = (str, int, float, bool, type(None))
# What a key json wrote from an int, float, bool or None looks like: a whole quoted
# key (`":` ends only keys) that reads as a number or a constant. A quote escaped in a
# string cannot end one. Searched on the text (a sixth of the cost of encoding it).
_ODD_KEY = re.compile(r'"(?:[-0-9][0-9.eE+-]*|true|false|null)":')


def dumps(value: Any, *, what: str = "value") -> str:
    """Encode ``value`` as compact JSON; ``what`` names it in the error message."""
    try:
        text = _encode(value)
    except (TypeError, ValueError) as exc:
        path, reason = _first_problem(value, what)
        raise SerializationError(f"{path} is not JSON-serializable: {reason}") from exc
    if _ODD_KEY.search(text) is not None:
        path, reason = _first_problem(value, what)
        if reason != "unknown":  # not just a string key that reads like a number
            raise SerializationError(f"{path} is not JSON-serializable: {reason}")
    return text


def dumps_clean(value: Any) -> str | None:
    """``value`` as ``dumps`` encodes it, or None when ``dumps`` would look closer (the
    value does not encode, or its text holds a key that may not have been a string):
    the hot path, which builds no error label."""
    try:
        text = _encode(value)
    except (TypeError, ValueError):
        return None
    return None if _ODD_KEY.search(text) is not None else text


def _encode(value: Any) -> str:
    encode, markers = _thread_encoder()
    try:
        return "".join(encode(value, 0))
    except BaseException:
        markers.clear()  # the containers it was inside when it failed
        raise


# ``_ENCODER.encode`` builds a new C encoder for every value, which costs as much as
# encoding a small event: each thread keeps one, with the dict in which it notes the
# containers it is inside (to refuse a circular reference), empty between calls.
_encoders = threading.local()


def _thread_encoder() -> tuple[_Encode, dict[int, Any]]:
    try:
        encoder: tuple[_Encode, dict[int, Any]] = _encoders.encoder
    except AttributeError:
        encoder = _encoders.encoder = _new_encoder()
    if encoder[1]:  # a call on this thread is under way: this one was made inside it
        encoder = _encoders.encoder = _new_encoder()
    return encoder


def _new_encoder() -> tuple[_Encode, dict[int, Any]]:
    markers: dict[int, Any] = {}
    if c_make_encoder is None:  # no C accelerator: the pure-Python encoder
        return lambda value, _: _ENCODER.iterencode(value, _one_shot=True), markers
    encode = c_make_encoder(
        markers, _ENCODER.default, encode_basestring, None, ":", ",", False, False, False
    )
    return encode, markers


def loads(text: str | bytes) -> Any:
    """Decode JSON text (raises ``ValueError`` on malformed input)."""
    return json.loads(text)


def _first_problem(value: Any, path: str, seen: set[int] | None = None) -> tuple[str, str]:
    if isinstance(value, float) and (value != value or value in (float("inf"), float("-inf"))):
        return path, f"{value!r} has no JSON form"
    if isinstance(value, _SCALARS):
        return path, "unknown"
    if not isinstance(value, dict | list | tuple):  # what json encodes; other Mappings fail
        return path, f"object of type {type(value).__name__}"
    seen = set() if seen is None else seen
    if id(value) in seen:
        return path, "circular reference"
    seen.add(id(value))
    items = value.items() if isinstance(value, dict) else enumerate(value)
    for key, item in items:
        if isinstance(value, dict) and not isinstance(key, str):
            return f"{path}[{key!r}]", f"key of type {type(key).__name__} (keys must be str)"
        label = f"{path}[{key!r}]" if isinstance(value, dict) else f"{path}[{key}]"
        found = _first_problem(item, label, seen)
        if found[1] != "unknown":
            return found
    seen.discard(id(value))
    return path, "unknown"
