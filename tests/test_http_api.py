"""Centrifugo's HTTP server API through `cent` (its official Python client), embedded and real.

Each test runs against the embedded server's HTTP side and against real Centrifugo v6.9.1 with the
same namespaces and key (tests/harness/client_targets.py), so a difference fails one of the two.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
import uuid

import pytest
from cent import (
    BroadcastRequest,
    CentApiResponseError,
    CentUnauthorizedError,
    Client,
    HistoryRequest,
    InfoRequest,
    PresenceRequest,
    PresenceStatsRequest,
    PublishRequest,
)

from relay.proto.centrifugo import api_pb2
from tests.harness.client_targets import ClientTarget
from tests.harness.subscriber import ChannelSubscriber


def fresh(ns: str = "chat") -> str:
    return f"{ns}:{uuid.uuid4().hex[:10]}"


def test_cent_publish_broadcast_history(client_target: ClientTarget) -> None:
    api = Client(client_target.api_url, client_target.api_key)
    a, b = fresh(), fresh()
    first = api.publish(PublishRequest(channel=a, data={"n": 1}))
    second = api.publish(PublishRequest(channel=a, data={"n": 2}, tags={"k": "v"}))
    assert (first.offset, second.offset) == (1, 2) and first.epoch == second.epoch
    replies = api.broadcast(BroadcastRequest(channels=[a, b, fresh("nowhere")], data={"n": 3})).responses
    assert [r.result.offset if r.result else None for r in replies[:2]] == [3, 1]
    assert (replies[2].error.code, replies[2].error.message) == (102, "unknown channel")
    history = api.history(HistoryRequest(channel=a, limit=-1))
    assert [(p.data, p.offset, p.tags) for p in history.publications] == [
        ({"n": 1}, 1, None), ({"n": 2}, 2, {"k": "v"}), ({"n": 3}, 3, None)]
    assert (history.offset, history.epoch) == (3, first.epoch)
    with pytest.raises(CentApiResponseError) as err:
        api.publish(PublishRequest(channel=fresh("nowhere"), data={}))
    assert (err.value.code, err.value.message) == (102, "unknown channel")
    with pytest.raises(CentApiResponseError) as err:
        api.history(HistoryRequest(channel=fresh("members")))
    assert (err.value.code, err.value.message) == (108, "not available")


def test_cent_presence_and_info_count_a_real_subscriber(client_target: ClientTarget) -> None:
    api = Client(client_target.api_url, client_target.api_key)
    channel = fresh()
    assert api.presence_stats(PresenceStatsRequest(channel=channel)).num_clients == 0
    with ChannelSubscriber(client_target.ws_url, channel):
        presence = api.presence(PresenceRequest(channel=channel)).presence
        stats = api.presence_stats(PresenceStatsRequest(channel=channel))
        nodes = api.info(InfoRequest()).nodes
    assert len(presence) == 1 and next(iter(presence.values())).user == ""
    assert (stats.num_clients, stats.num_users) == (1, 1)
    assert len(nodes) == 1
    if client_target.kind == "embedded":  # Centrifugo refreshes its node counts every few seconds
        assert nodes[0].num_clients >= 1 and nodes[0].num_subs >= 1
    with pytest.raises(CentApiResponseError) as err:
        api.presence(PresenceRequest(channel=fresh("members")))  # presence off there
    assert err.value.code == 108


def test_wrong_key_is_refused_like_centrifugo(client_target: ClientTarget) -> None:
    with pytest.raises(CentUnauthorizedError):
        Client(client_target.api_url, "wrong").publish(PublishRequest(channel=fresh(), data={}))
    # What cent hides: 401 with an empty body, for each way of giving the key.
    for headers in ({"X-API-Key": "wrong"}, {"Authorization": "apikey wrong"}, {}):
        req = urllib.request.Request(client_target.api_url + "/info", data=b"{}", headers=headers)
        with pytest.raises(urllib.error.HTTPError) as http_err:
            urllib.request.urlopen(req, timeout=5)
        assert (http_err.value.code, http_err.value.read()) == (401, b"")
    ok = urllib.request.Request(client_target.api_url + "/info", data=b"{}",
                                headers={"Authorization": f"apikey {client_target.api_key}"})
    with urllib.request.urlopen(ok, timeout=5) as resp:
        assert "nodes" in json.loads(resp.read())["result"]


def test_legacy_api_endpoint_and_bad_json(client_target: ClientTarget) -> None:
    channel = fresh()
    body = b"\n".join(json.dumps(c).encode() for c in [
        {"method": "publish", "params": {"channel": channel, "data": {"a": 1}}},
        {"method": "history", "params": {"channel": channel, "limit": -1}}])
    req = urllib.request.Request(client_target.api_url, data=body, headers={"X-API-Key": client_target.api_key})
    with urllib.request.urlopen(req, timeout=5) as resp:
        lines = [json.loads(line) for line in resp.read().splitlines() if line.strip()]
    assert lines[0]["result"]["offset"] == 1
    assert lines[1]["result"]["publications"] == [{"data": {"a": 1}, "offset": 1}]
    batch = urllib.request.Request(client_target.api_url + "/batch", headers={"X-API-Key": client_target.api_key},
                                   data=json.dumps({"commands": [{"publish": {"channel": channel, "data": {}}},
                                                                 {"history": {"channel": fresh("nowhere")}}]}).encode())
    with urllib.request.urlopen(batch, timeout=5) as resp:  # a batch answer is not wrapped in "result"
        assert json.loads(resp.read()) == {"replies": [
            {"publish": {"offset": 2, "epoch": lines[0]["result"]["epoch"]}},
            {"error": {"code": 102, "message": "unknown channel"}}]}
    bad = urllib.request.Request(client_target.api_url + "/publish", data=b"{not json",
                                 headers={"X-API-Key": client_target.api_key})
    with pytest.raises(urllib.error.HTTPError) as http_err:
        urllib.request.urlopen(bad, timeout=5)
    assert http_err.value.code == 400


def test_grpc_publication_is_in_http_history_and_pushed_to_subscribers(embedded_server_factory, monkeypatch,
                                                                       request: pytest.FixtureRequest) -> None:
    from tests.harness.client_targets import start_target
    target = start_target(request, "embedded")
    channel = fresh()
    with ChannelSubscriber(target.ws_url, channel) as sub, target.server.stubs() as stubs:
        reply = stubs.v6.Publish(api_pb2.PublishRequest(channel=channel, data=b'{"via": "grpc"}'),
                                 metadata=stubs.metadata)
        assert reply.result.offset == 1
        assert sub.wait_for(1) == [{"via": "grpc"}]
    history = Client(target.api_url, target.api_key).history(HistoryRequest(channel=channel, limit=-1))
    assert [(p.data, p.offset) for p in history.publications] == [({"via": "grpc"}, 1)]
