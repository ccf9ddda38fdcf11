"""A real Redis server for the suite: Debian's `redis-server` on a free loopback port, in a temp dir.

Persistence is `appendonly yes` with `appendfsync always`: every write (XADD, XACK, group changes)
is on disk before Redis answers, so `restart()` can kill -9 the server mid-stream and the stream,
the group and its pending lists come back exactly as acknowledged. (A SHUTDOWN SAVE restart would
be gentler than what users see when a host dies; RDB snapshots alone would lose recent writes.)

When `redis-server` is missing it is installed with `apt-get install -y redis-server` if we run as
root; otherwise `unavailable()` names that command (CI fails, never skips).
Outside pytest (bench/), `RedisServer.start()` raises RedisUnavailable instead of skipping.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness.debian import MissingPackage, debian_tool
from tests.harness.ports import free_port
from tests.harness.require import unavailable

START_TIMEOUT = 30.0


class RedisUnavailable(RuntimeError):
    """redis-server could not be had or started; the text says why."""


def redis_binary() -> str:
    """Path of redis-server, installing Debian's package when missing and running as root."""
    try:
        return debian_tool("redis-server", "redis-server")
    except MissingPackage as err:
        raise RedisUnavailable(str(err)) from None


class RedisServer:
    """One redis-server process; `restart()` kills it with SIGKILL and starts it on the same port and dir."""

    def __init__(self, directory: Path, port: int | None = None) -> None:
        self.directory = directory
        self.port = port or free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = redis_binary()
        args = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.directory),
                "--appendonly", "yes", "--appendfsync", "always", "--save", "",
                "--protected-mode", "no", "--daemonize", "no", "--logfile", "redis.log"]
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self._wait_ready()

    def _wait_ready(self) -> None:
        import redis

        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                log = (self.directory / "redis.log").read_text(errors="replace")[-2000:]
                raise RedisUnavailable(f"redis-server exited with {self.process.returncode}: {log}")
            try:
                with redis.Redis(port=self.port, socket_timeout=1) as client:
                    if client.ping():
                        return
            except (redis.ConnectionError, redis.BusyLoadingError, redis.TimeoutError):
                time.sleep(0.05)
        raise RedisUnavailable(f"redis-server did not answer on port {self.port} within {START_TIMEOUT}s")

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)

    def restart(self, down_for: float = 0.0) -> None:
        """kill -9, stay down `down_for` seconds, start again with the append-only file."""
        self.kill()
        if down_for:
            time.sleep(down_for)
        self.start()

    def stop(self) -> None:
        self.kill()

    def client(self) -> object:
        """A synchronous redis-py client (decode_responses off: fields are bytes)."""
        import redis

        return redis.Redis(port=self.port)


def new_stream_name() -> str:
    return f"s-{uuid.uuid4().hex[:10]}"


def _served() -> Iterator[RedisServer]:
    """A started server in a temp dir of its own, stopped and deleted afterwards."""
    directory = Path(tempfile.mkdtemp(prefix="relay-redis-"))
    server = RedisServer(directory)
    try:
        server.start()
    except RedisUnavailable as err:
        shutil.rmtree(directory, ignore_errors=True)
        unavailable(str(err))
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """A session Redis server; tests use their own stream and group names."""
    yield from _served()


@pytest.fixture()
def own_redis_server() -> Iterator[RedisServer]:
    """A Redis server of the test's own, for tests that restart it."""
    yield from _served()
