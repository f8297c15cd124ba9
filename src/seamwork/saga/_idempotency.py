"""``IdempotencyLedger``: make a service's side of a saga step idempotent.

A step may run more than once (a retry, a crash between the effect and the saga's
checkpoint). The service keeps a ledger in its OWN database and records the step's
idempotency key, with the result, in the same transaction as its effect, so a
repeated call returns the first result and applies nothing.

The saga core stays free of drivers: the concrete ledgers live in
``seamwork.storage`` and the factories here load them on first use.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar, cast

from seamwork._core.codec import dumps
from seamwork._core.lifecycle import OpenClose
from seamwork.errors import ConfigError, SerializationError
from seamwork.saga._definition import check_name

T = TypeVar("T")

MAX_KEY_BYTES = 1024
"""The longest idempotency key, in bytes of UTF-8: PostgreSQL cannot index a key much
past 2,700 bytes, and a ledger must not take what another refuses."""


class IdempotencyLedger(OpenClose, ABC):
    """Records idempotency keys with results, atomically with the caller's effect.

    Example::

        ledger = IdempotencyLedger.sqlite("inventory.db")

        async def reserve(ctx: StepContext) -> dict[str, int]:
            def effect(conn) -> dict[str, int]:
                conn.execute("UPDATE stock SET qty = qty - 1 WHERE sku = ?", ("sku-1",))
                return {"reserved": 1}
            return await ledger.once(ctx.idempotency_key, effect)
    """

    @staticmethod
    def sqlite(path: str | Path, *, synchronous: str = "full") -> IdempotencyLedger:
        """A ledger in the SQLite database at ``path`` (the service's own)."""
        module = importlib.import_module("seamwork.storage.sqlite")
        factory = cast(Callable[..., IdempotencyLedger], module.SQLiteLedger)
        return factory(path, synchronous=synchronous)

    @staticmethod
    def postgres(dsn: str, **options: Any) -> IdempotencyLedger:
        """A ledger in the PostgreSQL database at ``dsn`` (``pip install 'seamwork[postgres]'``);
        effects get the transaction's ``psycopg.AsyncConnection`` and may be async."""
        module = importlib.import_module("seamwork.storage.postgres_ledger")
        factory = cast(Callable[..., IdempotencyLedger], module.PostgresLedger)
        return factory(dsn, **options)

    @abstractmethod
    async def open(self) -> None:
        """Connect and create the ledger table if needed (``once`` also opens)."""

    @abstractmethod
    async def aclose(self) -> None:
        """Release the connection."""

    @abstractmethod
    async def once(self, key: str, effect: Callable[[Any], T]) -> T:
        """Run ``effect(conn)`` and record ``key`` with its result in one transaction.

        If ``key`` was recorded before, return that first result and run nothing. If
        ``effect`` raises, nothing is recorded and its writes are rolled back. The
        result is returned as recorded, in its JSON form (a tuple comes back a list),
        on the first call as on every repeat.

        Raises:
            ConfigError: ``key`` is one no ledger can hold (see ``check_key``).
            SerializationError: the result is not JSON or not valid Unicode; the
                effect's writes are rolled back.
        """

    @abstractmethod
    async def result(self, key: str) -> Any | None:
        """The recorded result for ``key``, or None if it never ran."""

    @abstractmethod
    async def transaction(self, work: Callable[[Any], T]) -> T:
        """Run ``work(conn)`` in a transaction of the service's database (no key)."""


def check_key(key: str) -> None:
    """Raise ``ConfigError`` for a key some ledger cannot hold: empty, not a string,
    holding NUL (PostgreSQL's text cannot), not valid Unicode (a lone surrogate), or
    over ``MAX_KEY_BYTES`` bytes of UTF-8 - the checks saga names and ids get."""
    check_name("an idempotency key", key, ConfigError, MAX_KEY_BYTES, blank=True)


def encode_result(value: Any, key: str) -> str:
    """``value`` as the JSON text a ledger stores; ``SerializationError`` if it is not
    JSON or holds text that is not valid Unicode (a lone surrogate)."""
    text = dumps(value, what=f"result for key {key!r}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise SerializationError(
            f"result for key {key!r} is not valid Unicode: {exc.reason} at "
            f"{text[max(exc.start - 20, 0) : exc.end + 20]!r}"
        ) from None
    return text
