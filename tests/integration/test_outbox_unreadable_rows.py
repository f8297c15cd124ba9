"""An outbox row no message can be built from is parked; the messages after it flow.

Such a row was written by hand, by another version of a service, or damaged. On
SQLite and PostgreSQL outboxes, written with plain SQL, relayed through a real
(embedded) nats-server.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from test_outbox_parking import stored, write
from typer.testing import CliRunner, Result

from seamwork.brokers import EmbeddedNats, NatsBroker
from seamwork.cli import app
from seamwork.errors import StoreError
from seamwork.messaging import Message, Outbox, OutboxRelay
from seamwork.storage.sqlite_messaging import SQLiteOutbox
from seamwork.testing.broker import until


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def outbox(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Outbox]:
    if request.param == "sqlite":
        box = Outbox.sqlite(tmp_path / "orders.db")
    else:
        box = Outbox.postgres(request.getfixturevalue("pg_dsn"))
    async with box:
        yield box


@pytest.fixture
async def broker() -> AsyncIterator[NatsBroker]:
    async with EmbeddedNats() as server:
        broker = NatsBroker(server.url)
        yield broker
        await broker.aclose()


def subject() -> str:
    return f"u{uuid.uuid4().hex[:10]}.created"


async def write_row(outbox: Outbox, to: str, **columns: str) -> str:
    """Insert an outbox row with plain SQL, as a hand or an older version would;
    returns its id."""
    row = {"id": str(uuid.uuid4()), "type": "Odd", "data": "{}", "headers": "{}", **columns}
    mark, json = ("?", "?") if isinstance(outbox, SQLiteOutbox) else ("%s", "%s::json")
    async with outbox.transaction() as tx:
        await tx.execute(
            "INSERT INTO seamwork_outbox (id, subject, type, data, headers, created_at) "
            f"VALUES ({mark}, {mark}, {mark}, {json}, {json}, 0)",
            (row["id"], to, row["type"], row["data"], row["headers"]),
        )
    return row["id"]


# what is wrong with the row, and what the error names
BAD_ROWS = {
    "data-not-a-mapping": ({"data": "[1, 2]"}, "data must be a mapping"),
    "data-null": ({"data": "null"}, "data must be a mapping"),
    "headers-not-strings": ({"headers": '{"trace": 1}'}, "headers must map str to str"),
    "headers-not-a-mapping": ({"headers": '"x"'}, "headers must be a mapping"),
    "empty-type": ({"type": ""}, "type must be a non-empty string"),
}


@pytest.mark.parametrize("bad", BAD_ROWS.values(), ids=BAD_ROWS.keys())
async def test_an_unreadable_row_is_parked_and_the_messages_after_it_are_published(
    outbox: Outbox,
    broker: NatsBroker,
    bad: tuple[dict[str, str], str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    columns, problem = bad
    to = subject()
    first, last = Message("Small", {"n": 1}), Message("Small", {"n": 3})
    await write(outbox, to, first)
    odd = await write_row(outbox, to, **columns)
    await write(outbox, to, last)
    relay = OutboxRelay(outbox, broker, page_size=2)
    with caplog.at_level(logging.ERROR, logger="seamwork.messaging"):
        assert await relay.drain() == 2
    assert await stored(broker, to) == [first.id, last.id]
    assert (relay.published, relay.parked) == (2, 1)
    assert await outbox.pending_count() == 0
    (parked,) = await outbox.parked()
    assert (parked.id, parked.subject, parked.message) == (odd, to, None)
    assert problem in parked.error
    assert "seq 2" in parked.error
    assert repr(odd) in parked.error
    assert parked.raw is not None
    assert {k: parked.raw[k] for k in columns} == columns  # as stored
    (alert,) = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert odd in alert.getMessage()
    assert problem in alert.getMessage()
    assert await relay.drain() == 0


async def test_a_row_whose_data_is_not_json_is_parked_on_sqlite(
    tmp_path: Path, broker: NatsBroker
) -> None:
    to = subject()
    good = Message("Small")
    async with Outbox.sqlite(tmp_path / "orders.db") as outbox:
        odd = await write_row(outbox, to, data="{not json")
        broken_headers = await write_row(outbox, to, headers="")
        await write(outbox, to, good)
        with pytest.raises(StoreError, match=f"seq 1 \\(id '{odd}'\\).*data is not valid JSON"):
            await outbox.pending(10)  # a clear error, not json's own
        assert await OutboxRelay(outbox, broker).drain() == 1
        parked = await outbox.parked()
    assert await stored(broker, to) == [good.id]
    assert [p.id for p in parked] == [odd, broken_headers]
    assert "data is not valid JSON" in parked[0].error
    assert "headers is not valid JSON" in parked[1].error
    assert parked[0].raw is not None
    assert parked[0].raw["data"] == "{not json"


async def test_a_running_relay_parks_an_unreadable_row_and_goes_on(
    outbox: Outbox, broker: NatsBroker, caplog: pytest.LogCaptureFixture
) -> None:
    to = subject()
    good = Message("Small")
    with caplog.at_level(logging.WARNING, logger="seamwork.messaging"):
        async with OutboxRelay(outbox, broker, poll_interval=0.05) as relay:
            odd = await write_row(outbox, to, data="[]")
            await write(outbox, to, good)
            await until(lambda: _published(broker, to, [good.id]))
            assert relay.parked == 1
    assert [r.levelname for r in caplog.records] == ["ERROR"]  # no "retrying" warning
    assert [p.id for p in await outbox.parked()] == [odd]


async def _published(broker: NatsBroker, to: str, ids: list[str]) -> bool:
    return await stored(broker, to) == ids


async def test_an_unreadable_row_can_be_discarded_or_requeued_without_holding_up_the_rest(
    outbox: Outbox, broker: NatsBroker
) -> None:
    to = subject()
    kept = await write_row(outbox, to, data="[]")
    dropped = await write_row(outbox, to, data="[]")
    relay = OutboxRelay(outbox, broker)
    assert await relay.drain() == 0
    assert [p.id for p in await outbox.parked()] == [kept, dropped]
    assert await outbox.discard([dropped]) == 1
    # requeued while still unreadable: parked again at the next drain, nothing held up
    assert await outbox.requeue([kept]) == 1
    after = Message("Small")
    await write(outbox, to, after)
    assert await relay.drain() == 1
    assert await stored(broker, to) == [after.id]
    (parked,) = await outbox.parked()
    assert parked.id == kept
    assert "data must be a mapping" in parked.error
    # fixed by hand, then requeued: published in its place
    mark = "?" if isinstance(outbox, SQLiteOutbox) else "%s"
    async with outbox.transaction() as tx:
        await tx.execute(f"UPDATE seamwork_outbox SET data = '{{}}' WHERE id = {mark}", (kept,))
    assert await outbox.requeue([kept]) == 1
    assert await relay.drain() == 1
    assert await stored(broker, to) == [after.id, kept]
    assert await outbox.parked() == []


async def test_the_cli_lists_an_unreadable_row_with_its_stored_text_and_discards_it(
    tmp_path: Path, broker: NatsBroker
) -> None:
    path = tmp_path / "orders.db"
    to = subject()
    async with Outbox.sqlite(path) as outbox:
        odd = await write_row(outbox, to, data="{not json", type="Odd[bold]")
        await OutboxRelay(outbox, broker).drain()

    def cli(*args: str) -> Result:
        return CliRunner().invoke(app, ["outbox", *args, "--db", str(path)], env={"COLUMNS": "250"})

    listed = await asyncio.to_thread(cli, "parked", "--json")
    assert listed.exit_code == 0, listed.output
    (row,) = json.loads(listed.stdout)
    assert (row["id"], row["subject"], row["type"], row["data"]) == (odd, to, "Odd[bold]", None)
    assert row["raw"]["data"] == "{not json"
    assert "data is not valid JSON" in row["error"]
    table = await asyncio.to_thread(cli, "parked")
    assert table.exit_code == 0, table.output
    assert odd in table.stdout
    assert "Odd[bold]" in table.stdout
    discarded = await asyncio.to_thread(cli, "discard", odd)
    assert discarded.exit_code == 0, discarded.output
    async with Outbox.sqlite(path) as outbox:
        assert await outbox.parked() == []
