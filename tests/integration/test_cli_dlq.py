"""``seamwork dlq list|replay`` against real brokers, and ``seamwork nats`` as a process.

The CLI runs in a worker thread (it calls ``asyncio.run`` itself) while the test's
loop keeps the embedded server and the consumers going.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aio_pika
import aiormq
import nats
import pytest
from nats.js.errors import NotFoundError
from typer.testing import CliRunner, Result

from seamwork.brokers import EmbeddedNats, NatsBroker, RabbitBroker
from seamwork.brokers.nats import DLQ_STREAM
from seamwork.cli import app
from seamwork.messaging import Broker, Delivery, Message, PoisonMessage
from seamwork.testing.broker import eventually, until


async def cli(*args: str) -> Result:
    return await asyncio.to_thread(CliRunner().invoke, app, list(args), env={"COLUMNS": "200"})


class Flaky:
    """A handler that dead-letters everything until fixed, then records the ids."""

    def __init__(self) -> None:
        self.fixed = False
        self.handled: list[str] = []

    async def __call__(self, delivery: Delivery) -> None:
        if not self.fixed:
            raise PoisonMessage(f"cannot ship order {delivery.message.data['order']}")
        self.handled.append(delivery.message.id)


@pytest.fixture
async def nats_url() -> AsyncIterator[str]:
    async with EmbeddedNats() as server:
        yield server.url


async def dead_lettered(broker: Broker, subject: str, count: int) -> None:
    async def enough() -> bool:
        letters = await broker.dead_letters()
        return len([x for x in letters if x.subject == subject]) == count

    await until(enough)


async def listed(*target: str) -> list[dict[str, Any]]:
    result = await cli("dlq", "list", *target, "--json")
    assert result.exit_code == 0, result.output
    letters: list[dict[str, Any]] = json.loads(result.output)
    return letters


async def test_dlq_list_shows_a_dead_letter_and_replay_delivers_it_once_fixed(
    nats_url: str,
) -> None:
    broker, handler = NatsBroker(nats_url), Flaky()
    subject = f"orders{uuid.uuid4().hex[:6]}.created"
    try:
        await broker.subscribe(subject, "shipping", handler)
        message = Message("OrderCreated", {"order": 7}, correlation_id="flow-7")
        await broker.publish(subject, message)
        await dead_lettered(broker, subject, 1)

        (letter,) = await listed("--nats", nats_url)
        assert (letter["subject"], letter["group"], letter["type"]) == (
            subject,
            "shipping",
            "OrderCreated",
        )
        assert (letter["id"], letter["attempts"], letter["data"]) == (message.id, 1, {"order": 7})
        assert "cannot ship order 7" in letter["error"]
        table = await cli("dlq", "list", "--nats", nats_url)
        assert table.exit_code == 0
        assert "OrderCreated" in table.output
        assert "shipping" in table.output

        handler.fixed = True
        replay = await cli("dlq", "replay", letter["key"], "--nats", nats_url)
        assert replay.exit_code == 0, replay.output
        await eventually(lambda: handler.handled == [message.id])
        assert await listed("--nats", nats_url) == []
    finally:
        await broker.aclose()


async def test_dlq_replay_all_replays_every_dead_letter(nats_url: str) -> None:
    broker, handler = NatsBroker(nats_url), Flaky()
    subject = f"orders{uuid.uuid4().hex[:6]}.created"
    try:
        await broker.subscribe(subject, "shipping", handler)
        sent = [Message("OrderCreated", {"order": n}) for n in range(3)]
        await broker.publish_batch([(subject, m) for m in sent])
        await dead_lettered(broker, subject, 3)
        handler.fixed = True
        result = await cli("dlq", "replay", "--all", "--nats", nats_url)
        assert result.exit_code == 0, result.output
        assert "3 dead letter(s) replayed" in result.output
        await eventually(lambda: sorted(handler.handled) == sorted(m.id for m in sent))
        assert await listed("--nats", nats_url) == []
    finally:
        await broker.aclose()


async def test_dlq_replay_of_an_unknown_key_is_a_one_line_error(nats_url: str) -> None:
    result = await cli("dlq", "replay", "999", "--nats", nats_url)
    assert result.exit_code == 1
    assert "no dead letter with key '999'" in result.output
    assert "Traceback" not in result.output


async def test_dlq_list_on_a_server_without_dead_letters_creates_nothing(nats_url: str) -> None:
    assert await listed("--nats", nats_url) == []
    connection = await nats.connect(nats_url)
    try:
        with pytest.raises(NotFoundError):
            await connection.jetstream().stream_info(DLQ_STREAM)
    finally:
        await connection.close()


async def test_dlq_replay_with_a_mistyped_exchange_is_an_error_and_creates_it_not(
    rabbitmq_service: str,
) -> None:
    exchange = f"seamwork-typo-{uuid.uuid4().hex[:8]}"
    result = await cli(
        "dlq", "replay", "--all", "--rabbitmq", rabbitmq_service, "--exchange", exchange
    )
    assert result.exit_code == 1
    assert f"no seamwork exchange {exchange!r} on the broker" in result.output
    connection = await aio_pika.connect(rabbitmq_service)
    async with connection:
        channel = await connection.channel()
        with pytest.raises(aiormq.exceptions.ChannelNotFoundEntity):
            await channel.get_exchange(exchange, ensure=True)


async def test_dlq_on_an_unreachable_broker_is_a_one_line_error() -> None:
    result = await cli("dlq", "list", "--nats", "nats://127.0.0.1:1", "--timeout", "2")
    assert result.exit_code == 1
    assert "cannot reach the broker at 127.0.0.1:1" in result.output
    assert len(result.output.strip().splitlines()) == 1


@pytest.mark.parametrize("scheme", ["nats", "amqp"])
async def test_dlq_on_a_broker_that_never_answers_gives_up_after_timeout(scheme: str) -> None:
    held: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)  # accepted, never answered

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    option = "--nats" if scheme == "nats" else "--rabbitmq"
    try:
        began = time.monotonic()
        result = await cli("dlq", "list", option, f"{scheme}://127.0.0.1:{port}/", "--timeout", "1")
        waited = time.monotonic() - began
    finally:
        for writer in held:
            writer.close()
        server.close()
    assert result.exit_code == 1, result.output
    assert "the broker did not answer within 1.0 s" in result.output
    assert waited < 2.5, f"--timeout 1 gave up after {waited:.1f} s"


async def test_dlq_needs_exactly_one_broker_and_replay_a_key_or_all() -> None:
    neither = await cli("dlq", "list")
    both = await cli("dlq", "list", "--nats", "nats://x:1", "--rabbitmq", "amqp://x/")
    no_key = await cli("dlq", "replay", "--nats", "nats://x:1")
    assert [r.exit_code for r in (neither, both, no_key)] == [2, 2, 2]
    assert "exactly one of --nats URL or --rabbitmq URL" in neither.output
    assert "either a KEY or --all" in no_key.output


async def test_dlq_list_and_replay_on_rabbitmq(rabbitmq_service: str) -> None:
    exchange = f"seamwork-cli-{uuid.uuid4().hex[:8]}"
    broker, handler = RabbitBroker(rabbitmq_service, exchange=exchange), Flaky()
    subject = f"orders{uuid.uuid4().hex[:6]}.created"
    target = ("--rabbitmq", rabbitmq_service, "--exchange", exchange)
    try:
        await broker.subscribe(subject, "shipping", handler)
        message = Message("OrderCreated", {"order": 9})
        await broker.publish(subject, message)
        await dead_lettered(broker, subject, 1)
        (letter,) = await listed(*target)
        assert (letter["subject"], letter["group"], letter["id"]) == (
            subject,
            "shipping",
            message.id,
        )
        handler.fixed = True
        replay = await cli("dlq", "replay", letter["key"], *target)
        assert replay.exit_code == 0, replay.output
        await eventually(lambda: handler.handled == [message.id])
        assert await listed(*target) == []
    finally:
        await broker.aclose()
        await _delete_rabbit(rabbitmq_service, exchange, broker.declared_queues)


async def _delete_rabbit(url: str, exchange: str, queues: tuple[str, ...]) -> None:
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        for name in queues:
            await channel.queue_delete(name)
        await channel.exchange_delete(exchange)


async def test_seamwork_nats_serves_jetstream_until_sigterm(tmp_path: Any) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "seamwork.cli",
        "nats",
        "--store-dir",
        str(tmp_path / "js"),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "COLUMNS": "200"},
    )
    try:
        assert process.stdout is not None
        async with asyncio.timeout(20):
            first = (await process.stdout.readline()).decode()
        assert first.startswith("nats-server ready at nats://127.0.0.1:"), first
        url = first.split(" at ", 1)[1].split()[0]
        broker, got = NatsBroker(url), []

        async def handler(delivery: Delivery) -> None:
            got.append(delivery.message.id)

        try:
            await broker.subscribe("cli.ping", "probe", handler)
            message = Message("Ping", {})
            await broker.publish("cli.ping", message)
            await eventually(lambda: got == [message.id])
        finally:
            await broker.aclose()
        process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(15):
            rest, _ = await process.communicate()
        assert process.returncode == 0
        assert "nats-server stopped" in rest.decode()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


def _store_in_the_way(tmp_path: Any) -> list[tuple[str, str]]:
    """--store-dir values nats-server cannot keep its store in, and the reason."""
    a_file = tmp_path / "notes.txt"
    a_file.write_text("not a directory\n")
    cases = [(str(a_file), "File exists"), (str(a_file / "js"), "Not a directory")]
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
        cases.append((str(locked), "Permission denied"))
    return cases


def test_seamwork_nats_names_a_store_dir_it_cannot_use(tmp_path: Any) -> None:
    for store, reason in _store_in_the_way(tmp_path):
        result = CliRunner().invoke(app, ["nats", "--store-dir", store], env={"COLUMNS": "500"})
        assert result.exit_code == 1, result.output
        assert result.exception is None or isinstance(result.exception, SystemExit)
        assert result.output.strip() == (
            f"error: cannot keep the JetStream store in {store}: {reason}"
        )


def _refuse(constant: str) -> None:
    raise ValueError(f"{constant} is not JSON")


async def test_dlq_list_json_of_a_letter_holding_nan_or_infinity_is_valid_json(
    nats_url: str,
) -> None:
    broker, handler = NatsBroker(nats_url), Flaky()
    subject = f"orders{uuid.uuid4().hex[:6]}.created"
    connection = await nats.connect(nats_url)
    try:
        await broker.subscribe(subject, "shipping", handler)
        # another producer's body: Python's json reads NaN and Infinity, so the
        # message is taken, and dead-lettered by the handler with them in its data
        body = b'{"order": 7, "amount": NaN, "limit": Infinity}'
        headers = {"Seamwork-Type": "OrderCreated", "Seamwork-Id": "m-nan"}
        await connection.jetstream().publish(subject, body, headers=headers)
        await dead_lettered(broker, subject, 1)

        result = await cli("dlq", "list", "--nats", nats_url, "--json")
        assert result.exit_code == 0, result.output
        (letter,) = json.loads(result.output, parse_constant=_refuse)
        assert letter["data"] == {"order": 7, "amount": "nan", "limit": "inf"}
    finally:
        await connection.close()
        await broker.aclose()


async def test_dlq_list_and_replay_print_brackets_in_errors_and_types_as_they_are(
    nats_url: str,
) -> None:
    async def refuse(delivery: Delivery) -> None:
        raise PoisonMessage("no route for [/api/v1/ship] [type=missing]")

    broker = NatsBroker(nats_url)
    subject = f"orders{uuid.uuid4().hex[:6]}.created"
    try:
        await broker.subscribe(subject, "shipping", refuse)
        message = Message("Order[/v2]", {"order": 7}, id="m[/1]")
        await broker.publish(subject, message)
        await dead_lettered(broker, subject, 1)

        table = await cli("dlq", "list", "--nats", nats_url)
        assert table.exit_code == 0, table.output
        for text in ("no route for [/api/v1/ship] [type=missing]", "Order[/v2]"):
            assert text in table.output
        (letter,) = await listed("--nats", nats_url)
        replay = await cli("dlq", "replay", letter["key"], "--nats", nats_url)
        assert replay.exit_code == 0, replay.output
        said = f"replayed {letter['key']}: Order[/v2] m[/1] to {subject}"
        assert said in " ".join(replay.output.split())
    finally:
        await broker.aclose()


@pytest.fixture
async def rabbitmq_over_tls(rabbitmq_service: str, tmp_path: Any) -> AsyncIterator[str]:
    """The RabbitMQ server behind TLS, the way a managed broker is reached: only its
    amqps port (5671) listens, on 127.0.0.2, where nothing answers on 5672."""
    import ssl
    import subprocess

    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    request = ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"]
    subprocess.run(
        ["openssl", *request, "-subj", "/CN=127.0.0.2", "-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
    )
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()

    async def tunnel(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        server_r, server_w = await asyncio.open_connection("127.0.0.1", 5672)
        await asyncio.gather(pipe(client_r, server_w), pipe(server_r, client_w))

    server = await asyncio.start_server(tunnel, "127.0.0.2", 5671, ssl=context)
    async with server:
        yield "amqps://guest:guest@127.0.0.2/?no_verify_ssl=1"


async def test_dlq_on_an_amqps_url_without_a_port_reaches_the_tls_port(
    rabbitmq_service: str, rabbitmq_over_tls: str
) -> None:
    exchange = f"seamwork-cli-{uuid.uuid4().hex[:8]}"
    connection = await aio_pika.connect(rabbitmq_service)
    async with connection:
        channel = await connection.channel()
        await channel.declare_exchange(exchange, aio_pika.ExchangeType.TOPIC)
        try:
            target = ("--rabbitmq", rabbitmq_over_tls, "--exchange", exchange)
            result = await cli("dlq", "list", *target)
        finally:
            await channel.exchange_delete(exchange)
    assert result.exit_code == 0, result.output
    assert "0 dead letter(s)" in result.output


async def test_dlq_list_and_replay_show_control_characters_escaped(nats_url: str) -> None:
    async def refuse(delivery: Delivery) -> None:
        raise PoisonMessage("peer said \x1b[2J\x1b]0;owned\x07 go away")

    broker = NatsBroker(nats_url)
    subject = f"orders{uuid.uuid4().hex[:6]}.created"
    try:
        await broker.subscribe(subject, "shipping", refuse)
        await broker.publish(subject, Message("Order\x1b[8m", {"order": 7}, id="m\x1b[1A"))
        await dead_lettered(broker, subject, 1)

        table = await cli("dlq", "list", "--nats", nats_url)
        assert table.exit_code == 0, table.output
        assert "\x1b" not in table.output
        assert "\x07" not in table.output
        for text in ("peer said \\x1b[2J\\x1b]0;owned\\x07 go away", "Order\\x1b[8m"):
            assert text in table.output
        (letter,) = await listed("--nats", nats_url)
        replay = await cli("dlq", "replay", letter["key"], "--nats", nats_url)
        assert replay.exit_code == 0, replay.output
        assert "\x1b" not in replay.output
        assert "Order\\x1b[8m m\\x1b[1A to" in replay.output
    finally:
        await broker.aclose()


async def test_dlq_list_on_a_narrow_terminal_shows_long_subjects_and_errors_whole(
    nats_url: str,
) -> None:
    reason = "refused by https://shipping.example/api/v1/" + "b7" * 40
    subject = f"orders{uuid.uuid4().hex}.created.in.the.eu-west-region"

    async def refuse(delivery: Delivery) -> None:
        raise PoisonMessage(reason)

    broker = NatsBroker(nats_url)
    try:
        await broker.subscribe(subject, "shipping", refuse)
        await broker.publish(subject, Message("OrderCreated", {"order": 7}))
        await dead_lettered(broker, subject, 1)

        table = await asyncio.to_thread(
            CliRunner().invoke, app, ["dlq", "list", "--nats", nats_url], env={"COLUMNS": "80"}
        )
        assert table.exit_code == 0, table.output
        assert "…" not in table.output
        rows = [line.split("│") for line in table.output.splitlines() if line.startswith("│")]
        assert "".join(row[2].strip() for row in rows) == subject
        assert "".join("".join(row[6].split()) for row in rows) == "".join(
            f"PoisonMessage: {reason}".split()
        )
    finally:
        await broker.aclose()


async def test_dlq_list_cut_short_by_its_limit_says_so(nats_url: str) -> None:
    broker, handler = NatsBroker(nats_url), Flaky()
    subject = f"orders{uuid.uuid4().hex[:6]}.created"
    try:
        await broker.subscribe(subject, "shipping", handler)
        await broker.publish_batch(
            [(subject, Message("OrderCreated", {"order": n})) for n in range(3)]
        )
        await dead_lettered(broker, subject, 3)

        cut = await cli("dlq", "list", "--nats", nats_url, "--limit", "2")
        assert cut.exit_code == 0, cut.output
        assert "2 dead letter(s); more are dead-lettered: raise --limit to see them" in cut.stdout
        cut_json = await cli("dlq", "list", "--nats", nats_url, "--limit", "2", "--json")
        assert cut_json.exit_code == 0, cut_json.output
        assert len(json.loads(cut_json.stdout)) == 2
        assert cut_json.stderr.strip() == (
            "note: more letters are dead-lettered; --limit 2 printed only the first 2"
        )

        whole = await cli("dlq", "list", "--nats", nats_url, "--limit", "3")
        assert "3 dead letter(s)" in whole.stdout
        assert "more" not in whole.stdout
        whole_json = await cli("dlq", "list", "--nats", nats_url, "--limit", "3", "--json")
        assert len(json.loads(whole_json.stdout)) == 3
        assert whole_json.stderr == ""
    finally:
        await broker.aclose()
