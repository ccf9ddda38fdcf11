"""A real Centrifugo v6 for tests: built with Go's own tool into the cache, run on free ports.

`real_centrifugo` (one per session) serves tests that only publish and read; `fresh_centrifugo` (one
per test) is for tests that kill and restart it; `centrifugo_factory` makes any number with options
(TLS on the GRPC API, extra config such as Centrifugo's own Kafka `consumers`).
"""

from __future__ import annotations

import copy
import fcntl
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from relay.proto.centrifugo import api_pb2, api_pb2_grpc
from tests.harness.factory import servers_stopped_after
from tests.harness.ports import free_port, wait_for_port
from tests.harness.require import CACHE, unavailable

CENTRIFUGO_VERSION = "6.9.1"
CENTRIFUGO_MODULE = f"github.com/centrifugal/centrifugo/v6@v{CENTRIFUGO_VERSION}"
# `go install` leaves the version at 0.0.0 unless told, and Info reports it.
_VERSION_FLAG = f"-X github.com/centrifugal/centrifugo/v6/internal/build.Version={CENTRIFUGO_VERSION}"
GOBIN = CACHE / "gobin"
BUILD_TIMEOUT = 1800.0

DEFAULT_API_KEY = "grpc-key"
HTTP_API_KEY = "http-key"


def go_env() -> dict[str, str]:
    """Environment for Go builds: binaries, modules and build cache all live in the cache dir."""
    env = dict(os.environ)
    env.update(GOBIN=str(GOBIN), GOMODCACHE=str(CACHE / "gomod"), GOCACHE=str(CACHE / "gobuild"))
    return env


def _binary_version(binary: Path) -> str:
    try:
        out = subprocess.run([str(binary), "version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return out.stdout.strip()


def centrifugo_binary() -> Path:
    """The cached Centrifugo binary, built on first use (minutes); `unavailable` when it cannot be."""
    binary = GOBIN / "centrifugo"
    if f"v{CENTRIFUGO_VERSION} " in _binary_version(binary):
        return binary
    if shutil.which("go") is None:
        unavailable("Go toolchain not found on PATH: needed to build Centrifugo")
    CACHE.mkdir(parents=True, exist_ok=True)
    # One build at a time across test processes; the second waits, then finds the binary.
    with open(CACHE / "centrifugo-build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if f"v{CENTRIFUGO_VERSION} " in _binary_version(binary):
            return binary
        log = CACHE / "centrifugo-build.log"
        started = time.monotonic()
        try:
            with open(log, "w") as out:
                rc = subprocess.run(["go", "install", "-ldflags", _VERSION_FLAG, CENTRIFUGO_MODULE],
                                    env=go_env(), stdout=out, stderr=subprocess.STDOUT,
                                    timeout=BUILD_TIMEOUT).returncode
        except subprocess.TimeoutExpired:
            unavailable(f"building Centrifugo took more than {BUILD_TIMEOUT:.0f}s (log: {log})")
        if rc != 0 or not binary.exists():
            tail = log.read_text(errors="replace")[-2000:]
            unavailable(f"`go install {CENTRIFUGO_MODULE}` failed with status {rc}: {tail}")
        with open(log, "a") as out:
            out.write(f"built in {time.monotonic() - started:.1f}s\n")
    return binary


@dataclass(frozen=True)
class GrpcTls:
    """TLS for Centrifugo's GRPC API: the server's files, and the CA that tests trust."""

    cert_file: Path
    key_file: Path
    ca_file: Path
    server_name: str = "localhost"


def _deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


class RealCentrifugo:
    """One Centrifugo process with its config in `workdir`; restarts keep the same ports."""

    def __init__(self, binary: Path, workdir: Path, api_key: str = DEFAULT_API_KEY,
                 tls: GrpcTls | None = None, config_overrides: dict[str, Any] | None = None) -> None:
        self.binary = binary
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.api_key = api_key
        self.tls = tls
        self.grpc_port = free_port()
        self.http_port = free_port()
        self.grpc_address = f"127.0.0.1:{self.grpc_port}"
        self.http_address = f"127.0.0.1:{self.http_port}"
        self.ws_url = f"ws://{self.http_address}/connection/websocket"
        self.config_path = workdir / "config.json"
        self.log_path = workdir / "centrifugo.log"
        self.config = _deep_merge(self._base_config(), config_overrides or {})
        self.config_path.write_text(json.dumps(self.config, indent=2))
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.start_seconds: list[float] = []

    def _base_config(self) -> dict[str, Any]:
        grpc_api: dict[str, Any] = {"enabled": True, "address": "127.0.0.1", "port": self.grpc_port,
                                    "key": self.api_key}
        if self.tls:
            grpc_api["tls"] = {"enabled": True, "cert_pem": str(self.tls.cert_file),
                               "key_pem": str(self.tls.key_file)}
        subscribe = {"allow_subscribe_for_client": True, "allow_subscribe_for_anonymous": True}
        return {
            "log": {"level": "info"},
            "http_server": {"address": "127.0.0.1", "port": self.http_port},
            "client": {"allow_anonymous_connect_without_token": True},
            "http_api": {"key": HTTP_API_KEY},
            "grpc_api": grpc_api,
            "channel": {"namespaces": [
                {"name": "chat", "history_size": 1000, "history_ttl": "300s",
                 "allow_recovery": True, "allow_positioning": True, **subscribe},
                {"name": "nohistory", **subscribe},
            ]},
            "shutdown": {"timeout": "1s"},
            "usage_stats": {"disabled": True},
        }

    @property
    def metadata(self) -> list[tuple[str, str]]:
        return [("authorization", f"apikey {self.api_key}")]

    def channel(self) -> grpc.Channel:
        """A new GRPC channel to the API (TLS when configured); the caller closes it."""
        if self.tls is None:
            return grpc.insecure_channel(self.grpc_address)
        creds = grpc.ssl_channel_credentials(root_certificates=self.tls.ca_file.read_bytes())
        return grpc.secure_channel(self.grpc_address, creds,
                                   options=[("grpc.ssl_target_name_override", self.tls.server_name)])

    def info(self, timeout: float = 2.0) -> api_pb2.InfoResponse:
        with self.channel() as chan:
            resp: api_pb2.InfoResponse = api_pb2_grpc.CentrifugoApiStub(chan).Info(
                api_pb2.InfoRequest(), metadata=self.metadata, timeout=timeout)
            return resp

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self, timeout: float = 30.0) -> None:
        """Start (or restart) on the same ports; returns once the GRPC API answers Info."""
        if self.running():
            raise RuntimeError("Centrifugo is already running")
        started = time.monotonic()
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen([str(self.binary), "-c", str(self.config_path)],
                                            cwd=self.workdir, stdout=log, stderr=subprocess.STDOUT)
        self.starts += 1
        deadline = started + timeout
        last_error = "no answer yet"
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"Centrifugo exited with {self.process.returncode}: {self.log_tail()}")
            try:
                resp = self.info(timeout=1.0)
                if not resp.error.code:
                    wait_for_port(self.http_port, timeout=max(0.1, deadline - time.monotonic()))
                    self.start_seconds.append(time.monotonic() - started)
                    return
                last_error = f"Info error {resp.error.code} {resp.error.message}"
            except grpc.RpcError as exc:
                last_error = f"{exc.code()}: {exc.details()}"
            time.sleep(0.05)
        self.kill()
        raise TimeoutError(f"Centrifugo not answering Info after {timeout}s ({last_error}): "
                           f"{self.log_tail()}")

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM and wait (SIGKILL if it lingers)."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def kill(self) -> None:
        """SIGKILL: the memory engine's history and the clients' connections are gone."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.process = None

    def restart(self, timeout: float = 30.0) -> None:
        self.stop()
        self.start(timeout)

    def set_api_key(self, api_key: str) -> None:
        """Change the GRPC API key; Centrifugo reads it at start, so call this while it is stopped."""
        if self.running():
            raise RuntimeError("stop Centrifugo before changing its API key")
        self.api_key = api_key
        self.config["grpc_api"]["key"] = api_key
        self.config_path.write_text(json.dumps(self.config, indent=2))

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


CentrifugoFactory = Callable[..., RealCentrifugo]


def _started(binary: Path, workdir: Path, **options: Any) -> RealCentrifugo:
    server = RealCentrifugo(binary, workdir, **options)
    server.start()
    return server


@pytest.fixture(scope="session")
def centrifugo_bin() -> Path:
    """The Centrifugo binary (built once into the cache, reused after)."""
    return centrifugo_binary()


@pytest.fixture(scope="session")
def real_centrifugo(centrifugo_bin: Path,
                    tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealCentrifugo]:
    """One real Centrifugo v6 for the session: GRPC API with key `grpc-key`, namespaces chat and
    nohistory. Tests must not stop it; use `fresh_centrifugo` to kill or restart."""
    server = _started(centrifugo_bin, tmp_path_factory.mktemp("centrifugo"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def centrifugo_factory(centrifugo_bin: Path, tmp_path: Path) -> Iterator[CentrifugoFactory]:
    """Start real Centrifugos with options: `api_key=`, `tls=GrpcTls(...)`, `config_overrides=`
    (deep-merged into the config, e.g. {"consumers": [...]}). All stopped after the test."""
    yield from servers_stopped_after(lambda folder, **options: _started(centrifugo_bin, folder, **options),
                                     tmp_path, "centrifugo")


@pytest.fixture
def fresh_centrifugo(centrifugo_factory: CentrifugoFactory) -> RealCentrifugo:
    """A real Centrifugo of this test's own, free to stop, kill and restart."""
    return centrifugo_factory()
