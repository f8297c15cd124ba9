"""The JSON codec every store and broker uses.

Strict on the way in: NaN and infinities are refused, and a value JSON cannot hold
raises ``SerializationError`` naming where it sits (``data['order']['at']``), so bad
input is rejected before anything is written.
"""

from __future__ import annotations

import json
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
        if isinstance(value, dict) and not isinstance(key, str | int | float | bool | type(None)):
            return f"{path}[{key!r}]", f"key of type {type(key).__name__}"
        label = f"{path}[{key!r}]" if isinstance(value, dict) else f"{path}[{key}]"
        found = _first_problem(item, label, seen)
        if found[1] != "unknown":
            return found
    seen.discard(id(value))
    return path, "unknown"
