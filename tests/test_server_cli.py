"""`relay serve` as a command (flags, exit status, signals) and `EmbeddedServer` in-process."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
import trustme

from relay.config import ServerSection
from relay.proto.centrifugo import api_pb2 as pb
from relay.proto.centrifugo import api_pb2_grpc
from relay.server.app import EmbeddedServer, ServerStartError
from tests.harness.embedded import EmbeddedServerProcess, open_aio_stubs, open_stubs
from tests.harness.ports import free_port

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parent.parent


def serve(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "relay", "serve", *args], cwd=ROOT, text=True,
                            env=dict(os.environ, **(env or {})), stderr=subprocess.PIPE)


def test_relay_serve_defaults_to_chat_and_stops_cleanly_on_sigterm() -> None:
    address = f"127.0.0.1:{free_port()}"
    proc = serve("--listen", address)
    assert proc.stderr is not None
    assert proc.stderr.readline() == f"listening on {address}\n"
    with open_stubs(address, None) as stubs:  # no --api-key-env: no key needed
        codes = [stubs.v6.Publish(pb.PublishRequest(channel=ch, data=b"{}")).error.code
                 for ch in ("chat:a", "nohistory:a", "top")]
        hist = stubs.v6.History(pb.HistoryRequest(channel="chat:a", limit=-1))
    assert codes == [0, 102, 0]
    assert [p.offset for p in hist.result.publications] == [1]
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(10) == 0
    assert proc.stderr.read() == ""


def test_relay_serve_with_a_config_file_and_flags_on_top(tmp_path: Path) -> None:
    server = EmbeddedServerProcess(tmp_path, namespaces=[{"name": "news", "history_size": 2}])
    server.start()
    try:
        with server.stubs() as stubs:
            offsets = [stubs.v6.Publish(pb.PublishRequest(channel="news:x", data=b"{}"),
                                        metadata=stubs.metadata).result.offset for _ in range(3)]
            kept = stubs.v6.History(pb.HistoryRequest(channel="news:x", limit=-1), metadata=stubs.metadata)
            unknown = stubs.v6.Publish(pb.PublishRequest(channel="chat:x", data=b"{}"),
                                       metadata=stubs.metadata)
    finally:
        assert server.stop() == 0
    assert offsets == [1, 2, 3]
    assert [p.offset for p in kept.result.publications] == [2, 3]
    assert unknown.error.code == 102


@pytest.mark.parametrize(("args", "expected"), [
    (["--namespace", "x"], "relay serve: --namespace: namespace name 'x' must match"),
    (["--listen", "nowhere"], "relay serve: server.listen: expected host:port, got 'nowhere'"),
])
def test_relay_serve_bad_usage_is_exit_2_with_one_line(args: list[str], expected: str) -> None:
    proc = serve(*args)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 2
    assert err.startswith(expected) and err.count("\n") == 1, err


def test_relay_serve_on_a_taken_port_is_exit_1() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = serve("--listen", f"127.0.0.1:{port}")
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 1
    assert err == f"relay: cannot listen on 127.0.0.1:{port}: Address already in use\n"


def test_relay_serve_refuses_other_hosts_without_a_key() -> None:
    proc = serve("--listen", f"0.0.0.0:{free_port()}")
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 1
    assert "reachable from other hosts and no API key is set" in err


async def test_embedded_server_in_process_on_port_0() -> None:
    config = ServerSection.model_validate({"listen": "127.0.0.1:0", "namespaces": ["chat"]})
    server = EmbeddedServer(config)
    with pytest.raises(RuntimeError):
        _ = server.address
    await server.start()
    try:
        host, port = server.address.rsplit(":", 1)
        assert host == "127.0.0.1" and int(port) > 0
        async with open_aio_stubs(server.address, None) as stubs:
            resp = await stubs.v6.Publish(pb.PublishRequest(channel="chat:in-process", data=b"{}"))
        assert (resp.error.code, resp.result.offset) == (0, 1)
        assert server.state.num_channels == 1
    finally:
        await server.stop(0.5)
    with grpc.insecure_channel(server.address) as chan, pytest.raises(grpc.RpcError):
        chan.unary_unary("/centrifugal.centrifugo.api.CentrifugoApi/Info")(b"", timeout=1)


async def test_embedded_server_reports_an_unreadable_key_file(tmp_path: Path) -> None:
    missing = str(tmp_path / "missing")
    config = ServerSection.model_validate({"listen": "127.0.0.1:0", "api_key_file": missing})
    with pytest.raises(ServerStartError, match="cannot read secret file"):
        await EmbeddedServer(config).start()


async def test_embedded_server_serves_tls(tmp_path: Path) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("localhost")
    cert.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
    config = ServerSection.model_validate({"listen": "127.0.0.1:0", "namespaces": ["chat"], "tls": {
        "enabled": True, "cert_file": str(tmp_path / "cert.pem"), "key_file": str(tmp_path / "key.pem")}})
    server = EmbeddedServer(config)
    await server.start()
    try:
        creds = grpc.ssl_channel_credentials(root_certificates=ca.cert_pem.bytes())
        options = [("grpc.ssl_target_name_override", "localhost")]
        async with grpc.aio.secure_channel(server.address, creds, options=options) as chan:
            stub = api_pb2_grpc.CentrifugoApiStub(chan)  # type: ignore[no-untyped-call]
            resp = await stub.Publish(pb.PublishRequest(channel="chat:tls", data=b"{}"), timeout=10)
        assert (resp.error.code, resp.result.offset) == (0, 1)
        async with grpc.aio.insecure_channel(server.address) as plain:
            with pytest.raises(grpc.RpcError) as caught:
                await api_pb2_grpc.CentrifugoApiStub(plain).Info(  # type: ignore[no-untyped-call]
                    pb.InfoRequest(), timeout=2)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await server.stop(0.5)
