"""Shared, I/O-free building blocks: clocks, ids, the JSON codec, retry schedules."""

from seamwork._core.clock import Clock, SystemClock
from seamwork._core.codec import dumps, loads
from seamwork._core.ids import new_id
from seamwork._core.retry import Retry

__all__ = ["Clock", "Retry", "SystemClock", "dumps", "loads", "new_id"]
