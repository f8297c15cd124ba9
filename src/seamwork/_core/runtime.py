"""How seamwork's own processes run their event loop: on uvloop where it is installed.

A saga worker spends much of its time handing work to its SQLite writer thread and
back; uvloop's cross-thread wake-up and its loop iteration are cheaper than asyncio's
(``benchmarks/saga_hop_floor.py`` run as is and with ``SEAMWORK_LOOP=asyncio``:
a sequential saga 10-20% faster on uvloop; no gain with 32 in flight). Code that embeds
seamwork keeps the loop its application chose; ``SEAMWORK_LOOP=asyncio`` makes
seamwork's commands use the standard loop too.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop, unless it is missing or ``SEAMWORK_LOOP=asyncio`` asks otherwise."""
    if os.environ.get("SEAMWORK_LOOP", "").lower() == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def loop_name() -> str:
    """``"uvloop"`` or ``"asyncio"``: the loop ``run`` will use (for reports)."""
    return "asyncio" if loop_factory() is None else "uvloop"


def run(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run(main)`` on the loop ``loop_factory`` picks."""
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        return runner.run(main)
