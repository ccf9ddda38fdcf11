"""Real SDKs over WebSocket: centrifuge-python and centrifuge-js, embedded server and real Centrifugo.

- `relay run` with the repository's default config.toml (only its ports changed to free ones)
  feeds chat:index from the ticker; both SDKs subscribe and get the ticks in order. Against real
  Centrifugo the same config runs with its embedded server off and the sink pointed at Centrifugo.
- A server-side drop (server API Disconnect with a reconnect code): the client reconnects, recovers
  what it missed, and says `recovered` as real Centrifugo does.
"""

from __future__ import annotations

import re
import uuid
from pathlib import Path
from typing import Any

import pytest
from cent import Client, DisconnectRequest, PublishRequest

from tests.harness.centrifugo import DEFAULT_API_KEY as CENTRIFUGO_GRPC_KEY
from tests.harness.client_targets import ClientTarget
from tests.harness.ports import free_port
from tests.harness.relay_process import RelayProcess
from tests.harness.subscriber import ChannelSubscriber

REPO = Path(__file__).resolve().parent.parent
KINDS = ["embedded", pytest.param("centrifugo", marks=pytest.mark.centrifugo)]


def default_config_run(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> tuple[RelayProcess, str]:
    """`relay run` of config.toml on free ports; returns it and the WebSocket URL to subscribe at."""
    text = (REPO / "config.toml").read_text()
    text = re.sub(r'(?m)^metrics_listen = .*\n', "", text)  # RelayProcess sets its own
    grpc_port, http_port = free_port(), free_port()
    text = text.replace("127.0.0.1:10000", f"127.0.0.1:{grpc_port}").replace("127.0.0.1:8000",
                                                                             f"127.0.0.1:{http_port}")
    env = {"RELAY_SERVER_API_KEY": "dev-key"}
    ws_url = f"ws://127.0.0.1:{http_port}/connection/websocket"
    if kind == "centrifugo":
        real = request.getfixturevalue("real_centrifugo")
        text = text.replace("enabled = true", "enabled = false", 1)
        text = text.replace(f'address = "127.0.0.1:{grpc_port}"', f'address = "{real.grpc_address}"')
        env = {"RELAY_SERVER_API_KEY": CENTRIFUGO_GRPC_KEY}
        ws_url = real.ws_url
    relay = RelayProcess(tmp_path / "relay", text, env=env).start()
    request.addfinalizer(relay.stop)
    relay.wait_http()
    return relay, ws_url


def assert_ticks_in_order(ticks: list[tuple[Any, int]]) -> None:
    seqs = [data["seq"] for data, _ in ticks]
    offsets = [offset for _, offset in ticks]
    assert all(data["type"] == "tick" for data, _ in ticks)
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), seqs
    assert offsets == list(range(offsets[0], offsets[0] + len(offsets))), offsets


@pytest.mark.parametrize("kind", KINDS)
def test_centrifuge_python_receives_the_default_configs_ticks(kind: str, request: pytest.FixtureRequest,
                                                              tmp_path: Path) -> None:
    _, ws_url = default_config_run(kind, request, tmp_path)
    with ChannelSubscriber(ws_url, "chat:index") as sub:
        sub.wait_for(3, timeout=30)
        assert_ticks_in_order([(r.data, r.offset) for r in sub.received])


@pytest.mark.parametrize("kind", KINDS)
def test_centrifuge_js_receives_the_default_configs_ticks(kind: str, request: pytest.FixtureRequest,
                                                          tmp_path: Path, js_subscriber: Any) -> None:
    _, ws_url = default_config_run(kind, request, tmp_path)
    sub = js_subscriber(ws_url, "chat:index")
    assert_ticks_in_order(sub.publications(3))


def test_python_client_recovers_after_a_server_side_drop(client_target: ClientTarget) -> None:
    channel = f"chat:{uuid.uuid4().hex[:10]}"
    api = Client(client_target.api_url, client_target.api_key)
    with ChannelSubscriber(client_target.ws_url, channel, recoverable=True) as sub:
        api.publish(PublishRequest(channel=channel, data={"n": 0}))
        sub.wait_for(1)
        # 3011 "force reconnect": the SDK reconnects; what is published meanwhile must be recovered.
        api.disconnect(DisconnectRequest(user="", disconnect={"code": 3011, "reason": "force reconnect"}))
        for n in range(1, 6):
            api.publish(PublishRequest(channel=channel, data={"n": n}))
        again = sub.wait_subscribed(2)
        assert sub.wait_for(6) == [{"n": n} for n in range(6)]
        assert [r.offset for r in sub.received] == list(range(1, 7))
    assert again.was_recovering is True and again.recovered is True


def test_js_client_recovers_after_a_server_side_drop(client_target: ClientTarget, js_subscriber: Any) -> None:
    channel = f"chat:{uuid.uuid4().hex[:10]}"
    api = Client(client_target.api_url, client_target.api_key)
    sub = js_subscriber(client_target.ws_url, channel)
    assert "subscribed" in sub.next_event()
    api.publish(PublishRequest(channel=channel, data={"n": 0}))
    assert sub.publications(1) == [({"n": 0}, 1)]
    api.disconnect(DisconnectRequest(user="", disconnect={"code": 3011, "reason": "force reconnect"}))
    for n in range(1, 6):
        api.publish(PublishRequest(channel=channel, data={"n": n}))
    events = []
    while sum("pub" in e for e in events) < 5:
        events.append(sub.next_event())
    resubscribed = [e["subscribed"] for e in events if "subscribed" in e]
    assert [(e["pub"], e["offset"]) for e in events if "pub" in e] == [({"n": n}, n + 1) for n in range(1, 6)]
    assert resubscribed and resubscribed[0]["wasRecovering"] is True and resubscribed[0]["recovered"] is True
