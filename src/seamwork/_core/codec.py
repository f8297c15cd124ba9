"""The JSON codec every store and broker uses.

Strict on the way in: NaN and infinities are refused, and a value JSON cannot hold
raises ``SerializationError`` naming where it sits (``data['order']['at']``), so bad
input is rejected before anything is written.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from seamwork.errors import SerializationError

_ENCODER = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":"))
_SCALARS = (str, int, float, bool, type(None))


def dumps(value: Any, *, what: str = "value") -> str:
    """Encode ``value`` as compact JSON; ``what`` names it in the error message."""
    try:
        return _ENCODER.encode(value)
    except (TypeError, ValueError) as exc:
        path, reason = _first_problem(value, what)
        raise SerializationError(f"{path} is not JSON-serializable: {reason}") from exc


def loads(text: str | bytes) -> Any:
    """Decode JSON text (raises ``ValueError`` on malformed input)."""
    return json.loads(text)


def _first_problem(value: Any, path: str) -> tuple[str, str]:
    if isinstance(value, float) and (value != value or value in (float("inf"), float("-inf"))):
        return path, f"{value!r} has no JSON form"
    if isinstance(value, _SCALARS):
        return path, "unknown"
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str | int | float | bool | type(None)):
                return f"{path}[{key!r}]", f"key of type {type(key).__name__}"
            found = _first_problem(item, f"{path}[{key!r}]")
            if found[1] != "unknown":
                return found
        return path, "unknown"
    if isinstance(value, list | tuple):
        for index, item in enumerate(value):
            found = _first_problem(item, f"{path}[{index}]")
            if found[1] != "unknown":
                return found
        return path, "unknown"
    return path, f"object of type {type(value).__name__}"
