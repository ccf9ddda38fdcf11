"""The embedded server as tests meet it: `relay serve` in a subprocess, on a free port, with a key.

Fixtures:
- `embedded_server`: one `relay serve` for this test (stop, kill, start again on the same port);
- `embedded_server_factory`: any number, with [server] options (`namespaces=`, `error_mode=`...);
- `shared_embedded_server`: one for the session, for tests that only publish and read;
- `centrifugo_api`: the same test against the embedded server and against real Centrifugo v6.

Every server has namespace `chat` (history 1000, 300s) and `nohistory` (history off), like the
real Centrifugo of tests/harness/centrifugo.py, so one test can run against both.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from relay.proto.centrifugo import api_pb2_grpc
from relay.proto.centrifugo_v2 import api_pb2_grpc as legacy_pb2_grpc
from tests.harness.factory import servers_stopped_after
from tests.harness.ports import free_port
from tests.harness.require import unavailable

DEFAULT_API_KEY = "test-key"
KEY_ENV = "RELAY_TEST_SERVER_API_KEY"
CONFORMANCE_NAMESPACES: list[dict[str, Any]] = [
    {"name": "chat", "history_size": 1000, "history_ttl": "300s"},
    {"name": "nohistory", "history_size": 0},
]
ROOT = Path(__file__).resolve().parents[2]


def _toml(value: Any) -> str:
    """A TOML value for the few shapes a [server] table has (JSON strings are TOML strings)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {value!r} as TOML")


def metadata_for(api_key: str | None) -> list[tuple[str, str]]:
    return [("authorization", f"apikey {api_key}")] if api_key else []


@dataclass
class Stubs:
    """Stubs of both APIs on one channel, and the metadata that carries the key."""

    v6: api_pb2_grpc.CentrifugoApiStub
    v2: legacy_pb2_grpc.CentrifugoStub
    metadata: list[tuple[str, str]]


@contextmanager
def open_stubs(address: str, api_key: str | None) -> Iterator[Stubs]:
    """Blocking stubs for both APIs (the channel is closed on exit)."""
    with grpc.insecure_channel(address) as chan:
        yield Stubs(api_pb2_grpc.CentrifugoApiStub(chan), legacy_pb2_grpc.CentrifugoStub(chan),  # type: ignore[no-untyped-call]
                    metadata_for(api_key))


@asynccontextmanager
async def open_aio_stubs(address: str, api_key: str | None) -> AsyncIterator[Stubs]:
    """grpc.aio stubs for both APIs (the channel is closed on exit)."""
    async with grpc.aio.insecure_channel(address) as chan:
        yield Stubs(api_pb2_grpc.CentrifugoApiStub(chan), legacy_pb2_grpc.CentrifugoStub(chan),  # type: ignore[no-untyped-call]
                    metadata_for(api_key))


class EmbeddedServerProcess:
    """`relay serve -c <generated config>` in a subprocess; restarts keep the same port."""

    def __init__(self, workdir: Path, *, api_key: str = DEFAULT_API_KEY,
                 namespaces: list[dict[str, Any]] | None = None, port: int | None = None,
                 **server_options: Any) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.workdir = workdir
        self.api_key = api_key
        self.port = port or free_port()
        self.address = f"127.0.0.1:{self.port}"
        tables = namespaces if namespaces is not None else CONFORMANCE_NAMESPACES
        self.namespaces = [ns["name"] for ns in tables]
        table: dict[str, Any] = {"listen": self.address, "api_key_env": KEY_ENV, "namespaces": tables,
                                 **server_options}
        self.config_path = workdir / "server.toml"
        self.config_path.write_text("[server]\n" + "".join(f"{k} = {_toml(v)}\n" for k, v in table.items()))
        self.log_path = workdir / "server.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        if self.process is None:
            raise RuntimeError("the server is not running")
        return self.process.pid

    @property
    def metadata(self) -> list[tuple[str, str]]:
        return metadata_for(self.api_key)

    def stubs(self) -> Any:
        return open_stubs(self.address, self.api_key)

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self, timeout: float = 30.0) -> EmbeddedServerProcess:
        """Start (or start again, same port); returns once it printed "listening on"."""
        if self.running():
            raise RuntimeError("the server is already running")
        env = dict(os.environ, **{KEY_ENV: self.api_key})
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with open(self.log_path, "ab") as log:
            command = [sys.executable, "-m", "relay", "serve", "-c", str(self.config_path)]
            self.process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"relay serve exited with {self.process.returncode}: {self.log_tail()}")
            with open(self.log_path, "rb") as log:
                log.seek(offset)
                if b"listening on " in log.read():
                    return self
            time.sleep(0.02)
        self.kill()
        raise TimeoutError(f"relay serve not listening after {timeout}s: {self.log_tail()}")

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM and wait (SIGKILL if it lingers); the exit status, None if it was not running."""
        if self.process is None:
            return None
        process, self.process = self.process, None
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                return process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
        return process.wait()

    def kill(self) -> None:
        """SIGKILL: everything the server held is gone."""
        if self.process is None:
            return
        process, self.process = self.process, None
        if process.poll() is None:
            process.kill()
        process.wait()

    def rss_bytes(self, field: str = "VmRSS") -> int:
        """Resident memory of the server process, from /proc (`field="VmHWM"`: its peak so far)."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError(f"no {field} in /proc status")

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


EmbeddedServerFactory = Callable[..., EmbeddedServerProcess]


@pytest.fixture
def embedded_server_factory(tmp_path: Path) -> Iterator[EmbeddedServerFactory]:
    """Start `relay serve` processes with [server] options; all stopped after the test."""
    yield from servers_stopped_after(lambda folder, **options: EmbeddedServerProcess(folder, **options).start(),
                                     tmp_path, "embedded")


@pytest.fixture
def embedded_server(embedded_server_factory: EmbeddedServerFactory) -> EmbeddedServerProcess:
    """A `relay serve` of this test's own (key "test-key", namespaces chat and nohistory)."""
    return embedded_server_factory()


@pytest.fixture(scope="session")
def shared_embedded_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedServerProcess]:
    """One `relay serve` for the session; tests must not stop it and should use their own channels."""
    server = EmbeddedServerProcess(tmp_path_factory.mktemp("embedded-shared")).start()
    try:
        yield server
    finally:
        server.stop()


@dataclass
class ApiTarget:
    """A server to test a behaviour against: `kind` is "embedded" or "centrifugo"."""

    kind: str
    address: str
    api_key: str

    @property
    def metadata(self) -> list[tuple[str, str]]:
        return metadata_for(self.api_key)

    def stubs(self) -> Any:
        return open_stubs(self.address, self.api_key)


@pytest.fixture(params=["embedded", pytest.param("centrifugo", marks=pytest.mark.centrifugo)])
def centrifugo_api(request: pytest.FixtureRequest) -> ApiTarget:
    """The embedded server, then real Centrifugo v6: tests written once, checked against both."""
    if request.param == "embedded":
        server: Any = request.getfixturevalue("shared_embedded_server")
        return ApiTarget("embedded", server.address, server.api_key)
    try:
        real: Any = request.getfixturevalue("real_centrifugo")
    except pytest.FixtureLookupError:
        unavailable("the real_centrifugo fixture is not available")
    return ApiTarget("centrifugo", real.grpc_address, real.api_key)
