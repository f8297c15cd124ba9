"""One inbox, several consumer groups: each group applies each message once."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import psycopg
import pytest

from seamwork.messaging import Delivery, Inbox, Message, Transaction
from seamwork.storage import postgres_messaging, sqlite_messaging
from seamwork.storage._pg import migrate
from seamwork.storage._sqlite_writer import SQLiteWriter

STORES = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


def ph(store: str) -> str:
    return "?" if store == "sqlite" else "%s"


@pytest.fixture(params=STORES)
async def inbox(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[tuple[str, Inbox]]:
    if request.param == "sqlite":
        box = Inbox.sqlite(tmp_path / "service.db")
    else:
        box = Inbox.postgres(request.getfixturevalue("pg_dsn"))
    async with box:
        async with box._transaction(Message("Setup")) as tx:
            assert tx is not None
            await tx.execute("CREATE TABLE effects (who TEXT, message_id TEXT)")
        yield request.param, box


async def effects(inbox: Inbox) -> list[tuple[str, str]]:
    async with inbox._transaction(Message("Read")) as tx:
        assert tx is not None
        return sorted(await tx.execute("SELECT who, message_id FROM effects"))


def recorder(store: str, who: str) -> object:
    async def record(message: Message, tx: Transaction) -> None:
        await tx.execute(
            f"INSERT INTO effects VALUES ({ph(store)}, {ph(store)})", (who, message.id)
        )

    return record


@pytest.mark.parametrize("batched", [False, True])
async def test_two_groups_on_one_inbox_each_apply_a_message_once(
    inbox: tuple[str, Inbox], batched: bool
) -> None:
    store, box = inbox
    message = Message("OrderCreated", {"n": 1})
    for group in ("stock", "email", "stock", "email"):  # each group gets it twice
        handler = box.handler(recorder(store, group))  # type: ignore[arg-type]
        delivery = Delivery(message, "orders.created", group)
        if batched:
            assert await handler.batch([delivery]) == [None]
        else:
            await handler(delivery)
    assert await effects(box) == [("email", message.id), ("stock", message.id)]
    assert await box.seen(message.id)


async def inbox_before_groups(store: str, request: pytest.FixtureRequest, path: Path) -> Inbox:
    """An inbox of the release that keyed handled ids by id alone, holding ``old``."""
    if store == "sqlite":
        writer = SQLiteWriter(path, migrations=sqlite_messaging.MESSAGING_MIGRATIONS[:2])
        await writer.start()
        await writer.write(
            lambda conn: conn.execute(
                "INSERT INTO seamwork_inbox (id, type, received_at) VALUES ('old', 'T', 0)"
            )
        )
        await writer.close()
        return Inbox.sqlite(path)
    dsn = request.getfixturevalue("pg_dsn")
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        await migrate(conn, postgres_messaging.MESSAGING_MIGRATIONS[:3])
        await conn.execute(
            "INSERT INTO seamwork_inbox (id, type, received_at) VALUES ('old', 'T', 0)"
        )
        await conn.commit()
    return Inbox.postgres(dsn)


@pytest.mark.parametrize("store", STORES)
async def test_an_id_handled_before_the_upgrade_is_still_applied_once(
    store: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    box = await inbox_before_groups(store, request, tmp_path / "old.db")
    async with box:
        async with box._transaction(Message("Setup")) as tx:
            assert tx is not None
            await tx.execute("CREATE TABLE effects (who TEXT, message_id TEXT)")
        handler = box.handler(recorder(store, "stock"))  # type: ignore[arg-type]
        old = Message("T", {}, id="old")
        await handler(Delivery(old, "orders.created", "stock"))  # a redelivery
        assert await handler.batch([Delivery(old, "orders.created", "stock")]) == [None]
        assert await effects(box) == []
        assert await box.seen("old")
