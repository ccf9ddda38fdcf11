"""The protobuf encoding of the client protocol (centrifuge-python with use_protobuf), embedded and real.

Binary data travels as it is (no JSON needed); recovery after a server-side drop works as in JSON.
"""

from __future__ import annotations

import base64
import json
import urllib.request
import uuid

from cent import Client, DisconnectRequest, PublishRequest

from tests.harness.client_targets import ClientTarget
from tests.harness.subscriber import ChannelSubscriber


def test_protobuf_client_gets_json_and_binary_data_and_recovers(client_target: ClientTarget) -> None:
    channel = f"chat:{uuid.uuid4().hex[:10]}"
    api = Client(client_target.api_url, client_target.api_key)
    binary = bytes(range(256))
    with ChannelSubscriber(client_target.ws_url, channel, recoverable=True, use_protobuf=True) as sub:
        api.publish(PublishRequest(channel=channel, data={"n": 0}))
        # cent insists on `data`; b64data (binary) goes as Centrifugo's HTTP API takes it.
        body = json.dumps({"channel": channel, "b64data": base64.b64encode(binary).decode()}).encode()
        req = urllib.request.Request(client_target.api_url + "/publish", data=body,
                                     headers={"X-API-Key": client_target.api_key})
        with urllib.request.urlopen(req, timeout=5) as resp:
            assert json.loads(resp.read())["result"]["offset"] == 2
        sub.wait_for(2)
        api.disconnect(DisconnectRequest(user="", disconnect={"code": 3011, "reason": "force reconnect"}))
        for n in range(1, 4):
            api.publish(PublishRequest(channel=channel, data={"n": n}))
        again = sub.wait_subscribed(2)
        sub.wait_for(5)
    datas = [r.data for r in sub.received]
    assert datas[1] == binary
    # JSON as bytes; whitespace is the server's (Centrifugo keeps the sender's, the relay re-encodes).
    assert [json.loads(d) for d in datas[:1] + datas[2:]] == [{"n": n} for n in range(4)]
    assert [r.offset for r in sub.received] == [1, 2, 3, 4, 5]
    assert again.was_recovering is True and again.recovered is True
