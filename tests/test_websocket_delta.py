"""Fossil delta compression, where a namespace allows it: raw frames and centrifuge-python, both servers."""

from __future__ import annotations

import json
import uuid
from typing import Any

import fossil_delta
from cent import Client, PublishRequest

from tests.harness.client_targets import ClientTarget
from tests.harness.subscriber import ChannelSubscriber
from tests.test_websocket_protocol import raw_client


def payload(n: int) -> dict[str, Any]:
    # Large and alike, so a delta is much smaller than the data.
    return {"n": n, "text": "the same long text in every publication " * 20}


async def test_fossil_deltas_on_the_wire(client_target: ClientTarget) -> None:
    channel = f"deltas:{uuid.uuid4().hex[:10]}"
    api = Client(client_target.api_url, client_target.api_key)
    async with raw_client(client_target) as c:
        await c.call("connect")
        result = (await c.call("subscribe", channel=channel, delta="fossil"))["subscribe"]
        assert result["delta"] is True
        refused = await c.call("subscribe", channel=f"chat:{uuid.uuid4().hex[:10]}", delta="fossil")
        assert "delta" not in refused["subscribe"]  # chat does not allow deltas: plain subscription
        for n in range(3):
            api.publish(PublishRequest(channel=channel, data=payload(n), delta=True))
        pushes = [(await c.push())["pub"] for _ in range(3)]
    first, second, third = pushes
    assert "delta" not in first and isinstance(first["data"], str) and json.loads(first["data"]) == payload(0)
    assert second["delta"] is True and len(second["data"]) < len(first["data"]) / 4
    base = first["data"].encode()
    second_data = fossil_delta.apply_delta(base, second["data"].encode())
    assert json.loads(second_data) == payload(1)
    assert third["delta"] is True
    assert json.loads(fossil_delta.apply_delta(second_data, third["data"].encode())) == payload(2)


def test_centrifuge_python_applies_the_deltas(client_target: ClientTarget) -> None:
    channel = f"deltas:{uuid.uuid4().hex[:10]}"
    api = Client(client_target.api_url, client_target.api_key)
    with ChannelSubscriber(client_target.ws_url, channel, delta="fossil") as sub:
        for n in range(4):
            api.publish(PublishRequest(channel=channel, data=payload(n), delta=True))
        assert sub.wait_for(4) == [payload(n) for n in range(4)]


def test_centrifuge_js_in_protobuf_with_fossil_deltas(client_target: ClientTarget, js_subscriber: Any) -> None:
    channel = f"deltas:{uuid.uuid4().hex[:10]}"
    api = Client(client_target.api_url, client_target.api_key)
    sub = js_subscriber(client_target.ws_url, channel, "protobuf", "fossil")
    assert "subscribed" in sub.next_event()
    for n in range(4):
        api.publish(PublishRequest(channel=channel, data=payload(n), delta=True))
    got = sub.publications(4)
    assert [json.loads(data["bytes"]) for data, _ in got] == [payload(n) for n in range(4)]
    assert [offset for _, offset in got] == [1, 2, 3, 4]
