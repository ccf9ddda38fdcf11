"""TLS and mTLS on both GRPC ends, with certificates from trustme.

The embedded server serves TLS and, with a client CA, demands client certificates; the relay's sink
talks TLS to it (CA file, client certificate, server name) and to real Centrifugo v6 with mTLS. A
wrong CA, a missing or foreign client certificate, a wrong server name and a TLS mismatch each give
one error line in the relay's log and a /readyz 503 that says what to fix, publish nothing, and
leave a relay that still stops cleanly on SIGTERM. The server's certificate names only
`centrifugo.test`, so every working case also proves `sink.tls.server_name`.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import trustme

from relay.config import ServerSection
from relay.proto.centrifugo import api_pb2 as pb
from relay.proto.centrifugo import api_pb2_grpc
from relay.server.app import EmbeddedServer, ServerStartError
from tests.harness.centrifugo import GrpcTls, RealCentrifugo
from tests.harness.embedded import EmbeddedServerFactory
from tests.harness.ports import free_port
from tests.harness.relay_process import RelayProcess

SERVER_NAME = "centrifugo.test"
TICKS = 200


@dataclass(frozen=True)
class Pki:
    """Files of two CAs: `ca` signed the server and the good client; `other_ca` a foreign client."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path
    other_cert: Path
    other_key: Path

    def client_credentials(self, with_cert: bool = True) -> grpc.ChannelCredentials:
        if not with_cert:
            return grpc.ssl_channel_credentials(self.ca.read_bytes())
        return grpc.ssl_channel_credentials(self.ca.read_bytes(), self.client_key.read_bytes(),
                                            self.client_cert.read_bytes())


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    ca, other = trustme.CA(), trustme.CA()
    server = ca.issue_cert(SERVER_NAME)
    client = ca.issue_cert("relay-client")
    foreign = other.issue_cert("relay-client")
    files = {"ca": ca.cert_pem, "server_cert": server.cert_chain_pems[0],
             "server_key": server.private_key_pem,
             "client_cert": client.cert_chain_pems[0], "client_key": client.private_key_pem,
             "other_ca": other.cert_pem, "other_cert": foreign.cert_chain_pems[0],
             "other_key": foreign.private_key_pem}
    for name, blob in files.items():
        blob.write_to_path(str(d / f"{name}.pem"))
    return Pki(**{name: d / f"{name}.pem" for name in files})


def server_tls(pki: Pki, mtls: bool = True) -> dict[str, Any]:
    table: dict[str, Any] = {"enabled": True, "cert_file": str(pki.server_cert),
                             "key_file": str(pki.server_key)}
    if mtls:
        table["client_ca_file"] = str(pki.ca)
    return table


def tls_history(address: str, channel: str, api_key: str, pki: Pki) -> list[Any]:
    """A channel's History read over mTLS."""
    options = [("grpc.ssl_target_name_override", SERVER_NAME)]
    with grpc.secure_channel(address, pki.client_credentials(), options=options) as chan:
        stub = api_pb2_grpc.CentrifugoApiStub(chan)  # type: ignore[no-untyped-call]
        resp = stub.History(pb.HistoryRequest(channel=channel, limit=-1),
                            metadata=[("authorization", f"apikey {api_key}")], timeout=10)
    assert resp.error.code == 0, resp.error
    return [json.loads(p.data) for p in resp.result.publications]


def relay_config(address: str, channel: str, tls: str, count: int = TICKS) -> str:
    return f"""
[relay]
shutdown_timeout = "2s"

[sink]
address = "{address}"
api_key_env = "SINK_KEY"
timeout = "2s"
retry = {{ initial_backoff = "20ms", max_backoff = "200ms" }}
{tls}

[sources.tick]
type = "ticker"
interval = "1ms"
count = {count}
data = '{{"seq": {{{{ seq }}}}}}'

[[routes]]
source = "tick"
channel = "{channel}"
"""


def sink_tls(**fields: str | bool) -> str:
    body = ", ".join(f"{k} = {json.dumps(v)}" for k, v in {"enabled": True, **fields}.items())
    return f"tls = {{ {body} }}"


def wait_readyz(relay: RelayProcess, status: int, contains: str, timeout: float = 20.0) -> str:
    deadline = time.monotonic() + timeout
    seen: tuple[int, str] | None = None
    while time.monotonic() < deadline:
        try:
            seen = relay.get("/readyz")
            if seen[0] == status and contains in seen[1]:
                return seen[1]
        except OSError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"/readyz never answered {status} {contains!r} (last {seen}):\n"
                         f"{relay.logs()[-3000:]}")


# -- the embedded server ---------------------------------------------------------------------


async def test_embedded_server_with_a_client_ca_demands_client_certificates(pki: Pki) -> None:
    server = EmbeddedServer(ServerSection.model_validate(
        {"listen": "127.0.0.1:0", "namespaces": ["chat"], "tls": server_tls(pki)}))
    await server.start()
    options = [("grpc.ssl_target_name_override", SERVER_NAME)]
    foreign = grpc.ssl_channel_credentials(pki.ca.read_bytes(), pki.other_key.read_bytes(),
                                           pki.other_cert.read_bytes())
    outcomes: dict[str, Any] = {}
    try:
        for name, creds in (("good", pki.client_credentials()), ("no cert", pki.client_credentials(False)),
                            ("foreign cert", foreign)):
            began = time.monotonic()
            async with grpc.aio.secure_channel(server.address, creds, options=options) as chan:
                try:
                    stub = api_pb2_grpc.CentrifugoApiStub(chan)  # type: ignore[no-untyped-call]
                    resp = await stub.Publish(pb.PublishRequest(channel="chat:mtls", data=b"{}"), timeout=5)
                    outcomes[name] = resp.result.offset
                except grpc.aio.AioRpcError as err:
                    outcomes[name] = err.code()
            assert time.monotonic() - began < 5, f"{name}: a refused handshake must fail at once"
    finally:
        await server.stop(0.5)
    assert outcomes == {"good": 1, "no cert": grpc.StatusCode.UNAVAILABLE,
                        "foreign cert": grpc.StatusCode.UNAVAILABLE}


@pytest.mark.parametrize(("change", "message"), [
    ({"cert_file": "missing.pem"}, "server.tls.cert_file: cannot read {d}/missing.pem: No such file"),
    ({"key_file": "ca.pem"}, "are not a PEM certificate and its (unencrypted) private key"),
    ({"cert_file": "garbage.pem"}, "server.tls.cert_file: {d}/garbage.pem is not a PEM file"),
    ({"client_ca_file": "garbage.pem"}, "server.tls.client_ca_file: {d}/garbage.pem is not a PEM file"),
    ({"key_file": "client_key.pem"}, "are not a PEM certificate and its (unencrypted) private key"),
])
async def test_embedded_server_names_a_bad_tls_file(pki: Pki, change: dict[str, str], message: str) -> None:
    d = pki.ca.parent
    (d / "garbage.pem").write_text("not a certificate\n")
    tls = {**server_tls(pki), **{k: str(d / v) for k, v in change.items()}}
    server = EmbeddedServer(ServerSection.model_validate({"listen": "127.0.0.1:0", "tls": tls}))
    with pytest.raises(ServerStartError) as caught:
        await server.start()
    assert message.format(d=d) in str(caught.value)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(("listen", "options", "starts"), [
    ("0.0.0.0:0", {}, False),
    ("[::]:0", {}, False),
    ("0.0.0.0:0", {"allow_unauthenticated_remote": True}, True),
    ("0.0.0.0:0", {"api_key_env": "TEST_TLS_SERVER_KEY"}, True),
    ("127.0.0.1:0", {}, True),
    ("localhost:0", {}, True),
    ("[::1]:0", {}, True),
])
async def test_a_remote_listen_address_needs_an_api_key(listen: str, options: dict[str, Any], starts: bool,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_TLS_SERVER_KEY", "a-server-key")
    server = EmbeddedServer(ServerSection.model_validate({"listen": listen, **options}))
    if not starts:
        with pytest.raises(ServerStartError) as caught:
            await server.start()
        assert str(caught.value) == (
            f"server.listen: {listen} is reachable from other hosts and no API key is set; set "
            "server.api_key_env (or allow_unauthenticated_remote = true)")
        return
    try:
        await server.start()
    except ServerStartError as err:
        if "Cannot assign" in str(err) or "not available" in str(err):
            pytest.skip(f"this host has no {listen} (no IPv6 loopback)")  # the address, not the rule
        raise
    await server.stop(0.1)


@pytest.mark.parametrize("command", ["serve", "run"])
def test_remote_listen_without_a_key_exits_1_with_one_line(command: str, tmp_path: Path) -> None:
    port = free_port()
    config = tmp_path / "relay.toml"
    config.write_text(f'[relay]\nstate_dir = "{tmp_path}/state"\nmetrics_listen = ""\n'
                      f'[server]\nenabled = true\nlisten = "0.0.0.0:{port}"\n'
                      f'[sink]\naddress = "127.0.0.1:{port}"\n')
    done = subprocess.run([sys.executable, "-m", "relay", command, "-c", str(config)], capture_output=True,
                          text=True, timeout=30, cwd=tmp_path)
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        f"relay: server.listen: 0.0.0.0:{port} is reachable from other hosts and no API key is set; set "
        "server.api_key_env (or allow_unauthenticated_remote = true)"], done.stderr


# -- the relay's sink against the embedded server ----------------------------------------------


def test_relay_publishes_over_mtls_with_a_server_name(pki: Pki, tmp_path: Path,
                                                      embedded_server_factory: EmbeddedServerFactory) -> None:
    server = embedded_server_factory(tls=server_tls(pki))
    tls = sink_tls(ca_file=str(pki.ca), cert_file=str(pki.client_cert), key_file=str(pki.client_key),
                   server_name=SERVER_NAME)
    relay = RelayProcess(tmp_path / "relay", relay_config(server.address, "chat:mtls", tls),
                         env={"SINK_KEY": server.api_key}).start()
    try:
        assert relay.wait(60) == 0, relay.logs()
    finally:
        relay.stop()
    assert tls_history(server.address, "chat:mtls", server.api_key, pki) == [
        {"seq": n} for n in range(1, TICKS + 1)]
    assert " ERROR " not in relay.logs()


def test_tls_mistakes_are_one_clear_line_and_no_hang(pki: Pki, embedded_server_factory: EmbeddedServerFactory,
                                                    tmp_path: Path) -> None:
    server = embedded_server_factory(tls=server_tls(pki))
    good = {"ca_file": str(pki.ca), "cert_file": str(pki.client_cert), "key_file": str(pki.client_key),
            "server_name": SERVER_NAME}
    cases: dict[str, tuple[str, str]] = {
        "wrong-ca": (sink_tls(**{**good, "ca_file": str(pki.other_ca)}),
                     "the server's certificate is not trusted (unable to get local issuer certificate); "
                     "check sink.tls.ca_file"),
        "no-client-cert": (sink_tls(ca_file=str(pki.ca), server_name=SERVER_NAME),
                           "the server demands a client certificate (mTLS): set sink.tls.cert_file and "
                           "sink.tls.key_file"),
        "foreign-client-cert": (sink_tls(**{**good, "cert_file": str(pki.other_cert),
                                            "key_file": str(pki.other_key)}),
                                "the server refused our client certificate"),
        "wrong-server-name": (sink_tls(**{**good, "server_name": "other.test"}),
                              "Hostname mismatch, certificate is not valid for 'other.test'"),
        "no-server-name": (sink_tls(**{k: v for k, v in good.items() if k != "server_name"}),
                           "IP address mismatch, certificate is not valid for '127.0.0.1'"),
        "tls-off": ("", "the server speaks TLS: set sink.tls.enabled = true"),
    }
    relays = {name: RelayProcess(tmp_path / name, relay_config(server.address, f"chat:{name}", tls),
                                 env={"SINK_KEY": server.api_key}).start()
              for name, (tls, _) in cases.items()}
    try:
        for name, (_, expected) in cases.items():
            body = wait_readyz(relays[name], 503, expected)
            assert body.startswith("not ready: sink not connected: TLS: "), body
        time.sleep(1.0)  # retries go on meanwhile; the error line must not repeat
        for name, relay in relays.items():
            assert relay.alive(), f"{name}: the relay must keep trying, not exit"
            errors = [line for line in relay.logs().splitlines() if " ERROR " in line]
            assert len(errors) == 1 and "sink: TLS with Centrifugo at" in errors[0], (name, errors)
            assert cases[name][1] in errors[0]
            began = time.monotonic()
            assert relay.terminate(30) == 0, relay.logs()
            assert time.monotonic() - began < 10, f"{name}: SIGTERM must stop it after shutdown_timeout"
    finally:
        for relay in relays.values():
            relay.stop()
    for name in cases:
        assert tls_history(server.address, f"chat:{name}", server.api_key, pki) == []


@pytest.mark.parametrize(("tls", "message"), [
    ('tls = { enabled = true, ca_file = "{d}/none.pem" }', "sink.tls.ca_file: cannot read {d}/none.pem"),
    ('tls = { enabled = true, ca_file = "{d}/garbage.pem" }',
     "sink.tls.ca_file: {d}/garbage.pem is not a PEM"),
    ('tls = { enabled = true, cert_file = "{d}/client_cert.pem", key_file = "{d}/other_key.pem" }',
     "are not a PEM certificate and its (unencrypted) private key"),
])
@pytest.mark.parametrize("command", ["check", "run"])
def test_a_bad_sink_tls_file_is_a_config_error_of_one_line(pki: Pki, tmp_path: Path, tls: str,
                                                            message: str, command: str) -> None:
    """`relay check` finds what `relay run` would refuse: exit 2, one line naming the setting."""
    d = pki.ca.parent
    (d / "garbage.pem").write_text("not a certificate\n")
    config = tmp_path / "relay.toml"
    config.write_text(relay_config(f"127.0.0.1:{free_port()}", "chat:x", tls.replace("{d}", str(d)))
                      .replace("[relay]", f'[relay]\nstate_dir = "{tmp_path}/state"\nmetrics_listen = ""'))
    done = subprocess.run([sys.executable, "-m", "relay", command, "-c", str(config)], capture_output=True,
                          text=True, timeout=30, cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{config}: sink.tls") and message.format(d=d) in lines[0], lines


@pytest.mark.parametrize(("tls", "problem"), [
    ("tls = { enabled = true, cert_file = \"c.pem\" }",
     "sink.tls: tls.cert_file and tls.key_file go together"),
    ("tls = { ca_file = \"ca.pem\" }", "sink.tls: tls settings are given but tls.enabled is false"),
])
def test_incomplete_sink_tls_is_a_config_error(tmp_path: Path, tls: str, problem: str) -> None:
    config = tmp_path / "relay.toml"
    config.write_text(f"[sink]\n{tls}\n")
    done = subprocess.run([sys.executable, "-m", "relay", "check", "-c", str(config)], capture_output=True,
                          text=True, timeout=30)
    assert done.returncode == 2
    assert done.stderr.splitlines() == [f"{config}: {problem}"]


# -- real Centrifugo with mTLS -----------------------------------------------------------------


class MtlsCentrifugo(RealCentrifugo):
    """Real Centrifugo whose GRPC API demands client certificates signed by `pki.ca`."""

    def __init__(self, binary: Path, workdir: Path, pki: Pki) -> None:
        self.pki = pki
        super().__init__(binary, workdir, tls=GrpcTls(pki.server_cert, pki.server_key, pki.ca, SERVER_NAME),
                         config_overrides={"grpc_api": {"tls": {"client_ca_pem": str(pki.ca)}}})

    def channel(self) -> grpc.Channel:
        return grpc.secure_channel(self.grpc_address, self.pki.client_credentials(),
                                   options=[("grpc.ssl_target_name_override", SERVER_NAME)])


@pytest.fixture
def mtls_centrifugo(centrifugo_bin: Path, tmp_path: Path, pki: Pki) -> Iterator[MtlsCentrifugo]:
    server = MtlsCentrifugo(centrifugo_bin, tmp_path / "centrifugo", pki)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.mark.centrifugo
def test_relay_to_real_centrifugo_over_mtls(mtls_centrifugo: MtlsCentrifugo, pki: Pki,
                                            tmp_path: Path) -> None:
    server = mtls_centrifugo
    no_cert_channel = grpc.secure_channel(server.grpc_address, pki.client_credentials(False),
                                          options=[("grpc.ssl_target_name_override", SERVER_NAME)])
    with no_cert_channel, pytest.raises(grpc.RpcError):  # Centrifugo really demands a client certificate
        stub = api_pb2_grpc.CentrifugoApiStub(no_cert_channel)  # type: ignore[no-untyped-call]
        stub.Info(pb.InfoRequest(), metadata=server.metadata, timeout=5)
    good = sink_tls(ca_file=str(pki.ca), cert_file=str(pki.client_cert), key_file=str(pki.client_key),
                    server_name=SERVER_NAME)
    no_cert = sink_tls(ca_file=str(pki.ca), server_name=SERVER_NAME)
    refused = RelayProcess(tmp_path / "no-cert",
                           relay_config(server.grpc_address, "chat:mtls-refused", no_cert),
                           env={"SINK_KEY": server.api_key}).start()
    relay = RelayProcess(tmp_path / "good", relay_config(server.grpc_address, "chat:mtls", good),
                         env={"SINK_KEY": server.api_key}).start()
    try:
        assert relay.wait(60) == 0, relay.logs()
        wait_readyz(refused, 503, "TLS: the server demands a client certificate (mTLS)")
        assert refused.alive()
        assert refused.terminate(30) == 0
    finally:
        relay.stop()
        refused.stop()
    assert tls_history(server.grpc_address, "chat:mtls", server.api_key, pki) == [
        {"seq": n} for n in range(1, TICKS + 1)]
    assert tls_history(server.grpc_address, "chat:mtls-refused", server.api_key, pki) == []
