"""``async with`` for the two lifecycles components have: open/aclose and start/stop.

Constructors do no I/O; ``open()`` (or ``start()``) connects or spawns, ``aclose()`` (or
``stop()``) releases. These mixins give every such component the same ``async with``.
"""

from __future__ import annotations

from types import TracebackType
from typing import Self


class OpenClose:
    """``async with component:`` calls ``open()`` then, on the way out, ``aclose()``."""

    async def open(self) -> None:
        raise NotImplementedError

    async def aclose(self) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


class StartStop:
    """``async with component:`` calls ``start()`` then, on the way out, ``stop()``."""

    async def start(self) -> None:
        raise NotImplementedError

    async def stop(self) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()
