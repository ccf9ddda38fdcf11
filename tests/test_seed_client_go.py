"""The seed document's Go client, built from the project's legacy proto, publishes to `relay serve`
(the `embedded_server` fixture: a `relay serve` subprocess with key and namespace chat).

The client is generated the way a Go user would: protoc-gen-go and protoc-gen-go-grpc from the Go
module proxy, protoc from grpcio-tools, google.golang.org/grpc, and a main.go whose call is the seed
document's `NewCentrifugoClient(conn).Publish(ctx, &PublishRequest{Channel: "chat:index", ...})`.
The built binary is cached by a hash of everything that goes into it, so reruns take seconds.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.harness.centrifugo import GOBIN, go_env
from tests.harness.embedded import EmbeddedServerProcess
from tests.harness.history import history, history_json
from tests.harness.require import CACHE, unavailable

ROOT = Path(__file__).resolve().parent.parent
LEGACY_PROTO = ROOT / "protos" / "centrifugo_v2" / "api.proto"
PLUGINS = {
    "protoc-gen-go": "google.golang.org/protobuf/cmd/protoc-gen-go@v1.36.11",
    "protoc-gen-go-grpc": "google.golang.org/grpc/cmd/protoc-gen-go-grpc@v1.6.2",
}
GO_MOD = """module seedclient

go 1.22

require (
\tgoogle.golang.org/grpc v1.82.0
\tgoogle.golang.org/protobuf v1.36.11
)
"""
# The seed document's client: per-RPC key credentials, one Publish, errors reported both ways.
MAIN_GO = """package main

import (
\t"context"
\t"log"
\t"os"
\t"time"

\t"google.golang.org/grpc"

\t. "seedclient/api"
)

type keyAuth struct {
\tkey string
}

func (t keyAuth) GetRequestMetadata(ctx context.Context, uri ...string) (map[string]string, error) {
\treturn map[string]string{"authorization": "apikey " + t.key}, nil
}

func (t keyAuth) RequireTransportSecurity() bool {
\treturn false
}

func main() {
\taddress, channel := os.Args[1], os.Args[2]
\tkey := keyAuth{os.Getenv("CENTRIFUGO_API_KEY")}
\tconn, err := grpc.Dial(address, grpc.WithInsecure(), grpc.WithPerRPCCredentials(key))
\tif err != nil {
\t\tlog.Fatalln(err)
\t}
\tdefer conn.Close()
\tctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
\tdefer cancel()
\tresp, err := NewCentrifugoClient(conn).Publish(ctx, &PublishRequest{
\t\tChannel: channel,
\t\tData:    []byte(`{"input":"hello"}`),
\t})
\tif err != nil {
\t\tlog.Fatalf("Transport level error: %v", err)
\t}
\tif resp.GetError() != nil {
\t\tlog.Fatalf("Error %d (%s)", resp.GetError().Code, resp.GetError().Message)
\t}
\tlog.Println("Successfully published")
}
"""
BUILD_TIMEOUT = 900.0


def _run(cmd: list[str], cwd: Path, env: dict[str, str], what: str) -> None:
    try:
        out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=BUILD_TIMEOUT)
    except subprocess.TimeoutExpired:
        unavailable(f"{what}: no result after {BUILD_TIMEOUT:.0f}s")
    if out.returncode != 0:
        unavailable(f"{what} failed ({out.returncode}): {(out.stdout + out.stderr)[-2000:]}")


def _plugins(env: dict[str, str]) -> dict[str, Path]:
    paths = {name: GOBIN / name for name in PLUGINS}
    stamp = GOBIN / "protoc-plugins.version"
    wanted = "\n".join(PLUGINS.values())
    if not (all(p.exists() for p in paths.values()) and stamp.exists() and stamp.read_text() == wanted):
        for module in PLUGINS.values():
            _run(["go", "install", module], ROOT, env, f"go install {module}")
        stamp.write_text(wanted)
    return paths


def seed_client_binary() -> Path:
    """Build (or reuse) the Go client; its cache key covers the proto, the sources and the plugins."""
    if shutil.which("go") is None:
        unavailable("Go toolchain not found on PATH: needed to build the seed Go client")
    key = hashlib.sha256()
    for part in (LEGACY_PROTO.read_bytes(), GO_MOD.encode(), MAIN_GO.encode(), repr(PLUGINS).encode()):
        key.update(part)
    binary = CACHE / "seed-client-go" / key.hexdigest()[:16] / "seedclient"
    if binary.exists():
        return binary
    env = go_env() | {"GOFLAGS": "-mod=mod"}
    GOBIN.mkdir(parents=True, exist_ok=True)
    plugins = _plugins(env)
    with tempfile.TemporaryDirectory(prefix="seedclient-") as tmp:
        module = Path(tmp)
        (module / "api").mkdir()
        (module / "go.mod").write_text(GO_MOD)
        (module / "main.go").write_text(MAIN_GO)
        _run([sys.executable, "-m", "grpc_tools.protoc", f"-I{LEGACY_PROTO.parent}",
              f"--plugin=protoc-gen-go={plugins['protoc-gen-go']}",
              f"--plugin=protoc-gen-go-grpc={plugins['protoc-gen-go-grpc']}",
              "--go_out=api", "--go-grpc_out=api", "api.proto"], module, env, "protoc with the Go plugins")
        binary.parent.mkdir(parents=True, exist_ok=True)
        built = binary.parent / "seedclient.partial"
        _run(["go", "build", "-o", str(built), "."], module, env, "go build of the seed client")
        built.rename(binary)
    return binary


@pytest.fixture(scope="module")
def go_client() -> Path:
    return seed_client_binary()


def _client(binary: Path, server: EmbeddedServerProcess, channel: str,
            key: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, CENTRIFUGO_API_KEY=key)
    return subprocess.run([str(binary), server.address, channel], env=env, capture_output=True, text=True,
                          timeout=60)


def test_seed_go_client_publishes_and_history_shows_it(
        go_client: Path, embedded_server: EmbeddedServerProcess) -> None:
    for _ in range(2):
        done = _client(go_client, embedded_server, "chat:index", embedded_server.api_key)
        assert done.returncode == 0, done.stderr
        assert "Successfully published" in done.stderr
    server = embedded_server
    assert history_json(server.address, "chat:index", server.api_key) == [{"input": "hello"}] * 2
    assert [p.offset for p in history(server.address, "chat:index", server.api_key)] == [1, 2]


def test_seed_go_client_sees_unknown_namespace_in_the_response(
        go_client: Path, embedded_server: EmbeddedServerProcess) -> None:
    done = _client(go_client, embedded_server, "nowhere:index", embedded_server.api_key)
    assert done.returncode == 1
    assert "Error 102 (unknown channel)" in done.stderr


def test_seed_go_client_with_a_wrong_key_is_unauthenticated(
        go_client: Path, embedded_server: EmbeddedServerProcess) -> None:
    done = _client(go_client, embedded_server, "chat:index", "not-the-key")
    assert done.returncode == 1
    assert "Transport level error" in done.stderr and "Unauthenticated" in done.stderr
    assert history(embedded_server.address, "chat:index", embedded_server.api_key) == []
