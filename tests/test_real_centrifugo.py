"""The real-Centrifugo harness proves itself: Info with the key, a GRPC publish reaching a WebSocket
subscriber, a wrong key refused, TLS on the GRPC API, a kill and restart on the same ports."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import pytest
import trustme

from relay.proto.centrifugo import api_pb2, api_pb2_grpc
from tests.harness.centrifugo import CENTRIFUGO_VERSION, CentrifugoFactory, GrpcTls, RealCentrifugo
from tests.harness.history import history_json
from tests.harness.subscriber import ChannelSubscriber

pytestmark = pytest.mark.centrifugo


def _publish(server: RealCentrifugo, channel: str, data: object) -> api_pb2.PublishResponse:
    with server.channel() as chan:
        resp: api_pb2.PublishResponse = api_pb2_grpc.CentrifugoApiStub(chan).Publish(
            api_pb2.PublishRequest(channel=channel, data=json.dumps(data).encode()),
            metadata=server.metadata, timeout=5)
    return resp


def test_info_answers_with_the_key(real_centrifugo: RealCentrifugo) -> None:
    resp = real_centrifugo.info()
    assert resp.error.code == 0
    assert len(resp.result.nodes) == 1
    assert resp.result.nodes[0].version.startswith(CENTRIFUGO_VERSION)  # "6.9.1 OSS"


def test_publish_reaches_a_websocket_subscriber_in_order(real_centrifugo: RealCentrifugo) -> None:
    with ChannelSubscriber(real_centrifugo.ws_url, "chat:smoke") as sub:
        offsets = []
        for n in range(20):
            resp = _publish(real_centrifugo, "chat:smoke", {"n": n})
            assert resp.error.code == 0
            offsets.append(resp.result.offset)
        assert sub.wait_for(20, timeout=10) == [{"n": n} for n in range(20)]
        assert [r.offset for r in sub.received] == offsets
    assert offsets == list(range(offsets[0], offsets[0] + 20))
    assert history_json(real_centrifugo.grpc_address, "chat:smoke", real_centrifugo.api_key)[-20:] == [
        {"n": n} for n in range(20)]


def test_nohistory_namespace_delivers_but_keeps_nothing(real_centrifugo: RealCentrifugo) -> None:
    with ChannelSubscriber(real_centrifugo.ws_url, "nohistory:smoke") as sub:
        resp = _publish(real_centrifugo, "nohistory:smoke", {"live": True})
        assert (resp.error.code, resp.result.offset) == (0, 0)
        assert sub.wait_for(1, timeout=10) == [{"live": True}]
    with real_centrifugo.channel() as chan:
        hist = api_pb2_grpc.CentrifugoApiStub(chan).History(
            api_pb2.HistoryRequest(channel="nohistory:smoke", limit=-1), metadata=real_centrifugo.metadata)
    assert hist.error.code == 108


@pytest.mark.parametrize("metadata", [[("authorization", "apikey wrong-key")], []],
                         ids=["wrong-key", "no-key"])
def test_wrong_key_is_unauthenticated(real_centrifugo: RealCentrifugo,
                                      metadata: list[tuple[str, str]]) -> None:
    with real_centrifugo.channel() as chan, pytest.raises(grpc.RpcError) as err:
        api_pb2_grpc.CentrifugoApiStub(chan).Info(api_pb2.InfoRequest(), metadata=metadata, timeout=5)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_kill_and_restart_keeps_the_ports_and_loses_the_memory_history(
        fresh_centrifugo: RealCentrifugo) -> None:
    server = fresh_centrifugo
    assert _publish(server, "chat:life", {"life": 1}).error.code == 0
    with ChannelSubscriber(server.ws_url, "chat:life") as sub:
        server.kill()
        server.start()
        sub.wait_subscribed(2, timeout=15)
        assert _publish(server, "chat:life", {"life": 2}).error.code == 0
        assert sub.wait_for(1, timeout=10) == [{"life": 2}]
    assert history_json(server.grpc_address, "chat:life", server.api_key) == [{"life": 2}]
    assert server.starts == 2


def test_grpc_api_over_tls_checks_the_server_name(centrifugo_factory: CentrifugoFactory,
                                                  tmp_path: Path) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("centrifugo.test")
    cert.private_key_pem.write_to_path(tmp_path / "key.pem")
    cert.cert_chain_pems[0].write_to_path(tmp_path / "cert.pem")
    ca.cert_pem.write_to_path(tmp_path / "ca.pem")
    server = centrifugo_factory(tls=GrpcTls(tmp_path / "cert.pem", tmp_path / "key.pem", tmp_path / "ca.pem",
                                            server_name="centrifugo.test"))
    assert server.info().error.code == 0
    wrong_name = grpc.secure_channel(server.grpc_address,
                                     grpc.ssl_channel_credentials((tmp_path / "ca.pem").read_bytes()),
                                     options=[("grpc.ssl_target_name_override", "other.test")])
    with wrong_name, pytest.raises(grpc.RpcError) as err:
        api_pb2_grpc.CentrifugoApiStub(wrong_name).Info(api_pb2.InfoRequest(), metadata=server.metadata,
                                                        timeout=5)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
