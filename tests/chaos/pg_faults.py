"""Fault injectors for the PostgreSQL fault tests: a TCP proxy that can stall or cut
connections, and a private PostgreSQL cluster that can be crashed and restarted."""

from __future__ import annotations

import asyncio
import contextlib
import glob
import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path


class Proxy:
    """Forwards 127.0.0.1:``port`` to a PostgreSQL server, with two faults on demand.

    ``stall()`` stops forwarding (connections stay open, nothing moves, new ones hang
    in their handshake) until ``resume()``. ``cut_after_commits(n)``: the next ``n``
    times the server finishes a saga transition (a statement carrying a ``completed``
    event or status) and reports itself idle again - committed - that answer is dropped
    and the connection closed: the commit happened, the client cannot know.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.cuts = 0
        self._cuts_left = 0
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def aclose(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def stall(self) -> None:
        self._flowing.clear()

    def resume(self) -> None:
        self._flowing.set()

    def cut_after_commits(self, count: int) -> None:
        self._cuts_left = count

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        armed = [False]
        ends = (writer, up_writer)
        for task in (
            asyncio.create_task(self._pump(reader, up_writer, armed, ends, upstream=True)),
            asyncio.create_task(self._pump(up_reader, writer, armed, ends, upstream=False)),
        ):
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pump(
        self,
        source: asyncio.StreamReader,
        sink: asyncio.StreamWriter,
        armed: list[bool],
        ends: tuple[asyncio.StreamWriter, ...],
        *,
        upstream: bool,
    ) -> None:
        try:
            while data := await source.read(65536):
                await self._flowing.wait()
                if upstream and self._cuts_left and _is_transition(data):
                    armed[0] = True
                elif not upstream and armed[0] and _READY_IDLE in data:
                    self._cuts_left -= 1
                    self.cuts += 1
                    break  # the server's answer (after its commit) never arrives
                sink.write(data)
                await sink.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            for end in ends:
                end.close()


_READY_IDLE = b"Z\x00\x00\x00\x05I"  # ReadyForQuery, idle: the transaction is over


def _is_transition(data: bytes) -> bool:
    return data.count(b"completed") > data.count(b"completed_steps")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def pg_bin(tool: str) -> str | None:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{tool}"))
    return found[-1] if found else shutil.which(tool)


class PrivateCluster:
    """A throwaway PostgreSQL cluster (initdb) on a free port, owned by this test.

    Run as the ``postgres`` OS user when the test runs as root (initdb refuses root).
    """

    def __init__(self) -> None:
        initdb, pg_ctl = pg_bin("initdb"), pg_bin("pg_ctl")
        assert initdb is not None
        assert pg_ctl is not None
        self.initdb, self.pg_ctl = initdb, pg_ctl
        self.dir = Path(tempfile.mkdtemp(prefix="seamwork-pg-"))
        self.data = self.dir / "data"
        self.port = _free_port()
        self.dsn = f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres"

    def _run(self, *argv: str) -> None:
        prefix: list[str] = []
        if os.geteuid() == 0:
            prefix = ["runuser", "-u", "postgres", "--"]
        subprocess.run([*prefix, *argv], check=True, capture_output=True, timeout=60)

    def create(self) -> None:
        if os.geteuid() == 0:
            shutil.chown(self.dir, "postgres", "postgres")
        self._run(self.initdb, "-D", str(self.data), "-A", "trust", "-U", "postgres", "-N")
        self.start()

    def start(self) -> None:
        options = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run(self.pg_ctl, "-D", str(self.data), "-o", options, "-l",
                  str(self.dir / "server.log"), "-w", "start")  # fmt: skip

    def crash(self) -> None:
        """``pg_ctl stop -m immediate``: every backend dies, no checkpoint (crash recovery)."""
        self._run(self.pg_ctl, "-D", str(self.data), "-m", "immediate", "stop")

    def destroy(self) -> None:
        with contextlib.suppress(Exception):
            self._run(self.pg_ctl, "-D", str(self.data), "-m", "immediate", "stop")
        shutil.rmtree(self.dir, ignore_errors=True)
