"""Setting checks every area shares."""

from __future__ import annotations

import math

from seamwork.errors import ConfigError


def check_seconds(name: str, value: object) -> None:
    """Refuse ``value`` unless it is finite seconds above 0, naming ``name`` (NaN would
    pass a '<= 0' check, and then expire a timeout at once or fail deep in a driver)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < math.inf:
        raise ConfigError(f"{name} must be finite seconds > 0, got {value!r}")
