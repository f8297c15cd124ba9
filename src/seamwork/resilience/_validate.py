"""Checks shared by the resilience settings; each error names the field it rejects."""

from __future__ import annotations

from seamwork.errors import ConfigError


def fraction(field: str, value: float) -> None:
    """``value`` must be a number in (0, 1]."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 < value <= 1.0:
        raise ConfigError(f"{field} must be a fraction in (0, 1], got {value!r}")


def count(field: str, value: int, minimum: int = 1) -> None:
    """``value`` must be an int >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{field} must be an int >= {minimum}, got {value!r}")


def seconds(field: str, value: float | None, *, allow_zero: bool = False) -> None:
    """``value`` must be None or a duration > 0 (>= 0 with ``allow_zero``)."""
    if value is None:
        return
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    if not ok or not (value >= 0 if allow_zero else value > 0) or value != value:
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{field} must be a number of seconds {bound}, got {value!r}")


def positive(field: str, value: float) -> None:
    """``value`` must be a finite number > 0."""
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    if not ok or not 0 < value < float("inf"):
        raise ConfigError(f"{field} must be a number > 0, got {value!r}")
