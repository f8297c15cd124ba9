"""The order saga the PostgreSQL chaos tests run, over services that keep their books
in PostgreSQL.

The services' side lives in its own schema (the ``ledger`` DSN): ``ledger`` holds
each idempotency key with its result, written in the same transaction as the effect
it guards; ``effects`` records every applied effect and compensation, with the
process (``owner``) that applied it; ``calls`` records every invocation. The tests
check their invariants on these books, not on what the engine believes.

Scenarios (``ctx.data["scenario"]``): ``ok``; ``decline`` (charge_payment fails);
``late_decline`` (send_confirmation fails, three steps are undone); ``slow``
(charge_payment applies its effect, then takes ``SLOW_SECONDS`` to answer - the
zombie's step); ``park`` (charge_payment never answers - sagas left in flight).

``SAGAS`` (for ``seamwork worker --app pg_saga_app:SAGAS``) reads the ledger DSN from
``SEAMWORK_CHAOS_LEDGER`` and ``SEAMWORK_CHAOS_VERSIONS`` (default ``1``) at the edge.
"""

from __future__ import annotations

import asyncio
import json
import os
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool

from seamwork.saga import Retry, Saga, Step, StepContext, StepFailed

STEPS = ("reserve_inventory", "charge_payment", "ship_order", "send_confirmation")
STEP_DELAY = 0.01
SLOW_SECONDS = 2.5
BOOKS = (
    "CREATE TABLE IF NOT EXISTS ledger (key text PRIMARY KEY, result jsonb NOT NULL)",
    "CREATE TABLE IF NOT EXISTS effects (id bigserial PRIMARY KEY, saga_id text, step text,"
    " kind text, key text, owner text)",
    "CREATE TABLE IF NOT EXISTS calls (id bigserial PRIMARY KEY, saga_id text, step text,"
    " kind text, attempt int, key text, owner text)",
)


def create_books(dsn: str) -> None:
    """Create the services' tables (idempotent)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        for sql in BOOKS:
            conn.execute(sql.encode())


class Services:
    """The four services' books, one small pool per process (opened on first use)."""

    def __init__(self, dsn: str, owner: str | None = None) -> None:
        self.dsn = dsn
        self.owner = owner or f"pid-{os.getpid()}"
        self._pool: AsyncConnectionPool[Any] | None = None

    async def pool(self) -> AsyncConnectionPool[Any]:
        if self._pool is None:
            self._pool = AsyncConnectionPool(
                self.dsn, min_size=1, max_size=4, open=False, kwargs={"autocommit": True}
            )
            await self._pool.open(wait=True)
        return self._pool

    async def aclose(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    async def call(self, ctx: StepContext, kind: str) -> None:
        async with (await self.pool()).connection() as conn:
            await conn.execute(
                "INSERT INTO calls (saga_id, step, kind, attempt, key, owner)"
                " VALUES (%s, %s, %s, %s, %s, %s)",
                (ctx.saga_id, ctx.step, kind, ctx.attempt, ctx.idempotency_key, self.owner),
            )

    async def once(self, ctx: StepContext, kind: str) -> dict[str, Any]:
        """Apply (or undo) the step's effect once per idempotency key."""
        key = ctx.idempotency_key
        async with (await self.pool()).connection() as conn, conn.transaction():
            cursor = await conn.execute("SELECT result FROM ledger WHERE key = %s", (key,))
            seen = await cursor.fetchone()
            if seen is not None:
                return dict(seen[0])
            result: dict[str, Any] = {f"{ctx.step}_done": True}
            applied = kind == "apply" or await self._applied(conn, ctx)
            if applied:
                await conn.execute(
                    "INSERT INTO effects (saga_id, step, kind, key, owner)"
                    " VALUES (%s, %s, %s, %s, %s)",
                    (ctx.saga_id, ctx.step, kind, key, self.owner),
                )
            # A concurrent twin with the same key fails here on the primary key and
            # rolls its effect back with it: the effect exists once.
            await conn.execute(
                "INSERT INTO ledger (key, result) VALUES (%s, %s::jsonb)",
                (key, json.dumps(result if kind == "apply" else {"undone": applied})),
            )
            return result

    @staticmethod
    async def _applied(conn: psycopg.AsyncConnection[Any], ctx: StepContext) -> bool:
        cursor = await conn.execute(
            "SELECT 1 FROM effects WHERE saga_id = %s AND step = %s AND kind = 'apply'",
            (ctx.saga_id, ctx.step),
        )
        return await cursor.fetchone() is not None


def _declines(step: str, scenario: str) -> bool:
    if step == "charge_payment":
        return scenario == "decline"
    return step == "send_confirmation" and scenario == "late_decline"


def order_sagas(services: Services, versions: tuple[int, ...] = (1,)) -> list[Saga]:
    """The order saga in each of ``versions`` (identical steps)."""

    def action(step: str) -> Any:
        async def run(ctx: StepContext) -> dict[str, Any]:
            await services.call(ctx, "apply")
            scenario = ctx.data["scenario"]
            if _declines(step, scenario):
                raise StepFailed(f"{step} declined")
            if step == "charge_payment" and scenario == "park":
                await asyncio.sleep(3600)
            result = await services.once(ctx, "apply")
            if step == "charge_payment" and scenario == "slow":
                await asyncio.sleep(SLOW_SECONDS)
            await asyncio.sleep(STEP_DELAY)
            return result

        return run

    def compensation(step: str) -> Any:
        async def undo(ctx: StepContext) -> None:
            await services.call(ctx, "compensate")
            await services.once(ctx, "compensate")
            await asyncio.sleep(STEP_DELAY)

        return undo

    def step(name: str) -> Step:
        return Step(
            name,
            action(name),
            compensate=compensation(name),
            timeout=30,
            retry=Retry(5, backoff=0.05),
        )

    return [
        Saga("order", version=v, steps=[step(name) for name in STEPS], compensation_backoff=0.05)
        for v in versions
    ]


def SAGAS() -> list[Saga]:
    versions = tuple(int(v) for v in os.environ.get("SEAMWORK_CHAOS_VERSIONS", "1").split(","))
    return order_sagas(Services(os.environ["SEAMWORK_CHAOS_LEDGER"]), versions)
