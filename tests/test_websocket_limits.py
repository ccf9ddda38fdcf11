"""Limits a developer cannot break by accident: connections, subscriptions, message size, slow readers."""

from __future__ import annotations

import base64
import os
import socket
import uuid

import aiohttp
import orjson
import pytest
from cent import Client, InfoRequest, PresenceStatsRequest, PublishRequest

from tests.harness.client_targets import CLIENT_NAMESPACES, SECRET_ENV, TOKEN_SECRET, embedded_options
from tests.test_websocket_protocol import RawClient


@pytest.fixture
def limited(embedded_server_factory, monkeypatch):  # type: ignore[no-untyped-def]
    monkeypatch.setenv(SECRET_ENV, TOKEN_SECRET)
    options = embedded_options(CLIENT_NAMESPACES)
    server = embedded_server_factory(**options, max_connections=2, max_subscriptions_per_connection=2,
                                     max_client_message_bytes=2048, client_queue_max_bytes=65536)
    return options["http_listen"], server


async def test_connection_subscription_and_message_limits(limited) -> None:  # type: ignore[no-untyped-def]
    address, _ = limited
    url = f"ws://{address}/connection/websocket"
    async with aiohttp.ClientSession() as session:
        first, second = await session.ws_connect(url), await session.ws_connect(url)
        third = RawClient(await session.ws_connect(url))
        assert await third.closed() == (3504, "connection limit")
        c = RawClient(first)
        await c.call("connect")
        for n in range(2):
            assert "subscribe" in await c.call("subscribe", channel=f"chat:limit-{n}")
        refused = await c.call("subscribe", channel="chat:limit-2")
        assert refused["error"] == {"code": 106, "message": "limit exceeded"}
        big = RawClient(second)
        await big.send(connect={"data": {"pad": "x" * 4096}})
        code, _ = await big.closed()
        assert code == 1009  # message too big: closed, and the server goes on
        await first.close()


def test_a_client_that_stops_reading_is_dropped_and_the_server_stays_up(limited) -> None:  # type: ignore[no-untyped-def]
    address, _ = limited
    host, port = address.split(":")
    channel = f"chat:{uuid.uuid4().hex[:8]}"
    sock = socket.create_connection((host, int(port)))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall((f"GET /connection/websocket HTTP/1.1\r\nHost: {address}\r\nUpgrade: websocket\r\n"
                  f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
    assert b" 101 " in sock.recv(4096)
    payload = b'{"id":1,"connect":{}}\n' + orjson.dumps({"id": 2, "subscribe": {"channel": channel}})
    mask = os.urandom(4)
    sock.sendall(bytes([0x81, 0x80 | len(payload)]) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))
    api = Client(f"http://{address}/api", "http-key")
    while api.presence_stats(PresenceStatsRequest(channel=channel)).num_clients == 0:
        pass
    # The client reads nothing from here on: 20 MB of publications cannot all fit in socket buffers.
    data = {"pad": "y" * 10_000}
    for _ in range(2000):
        api.publish(PublishRequest(channel=channel, data=data))
        if api.presence_stats(PresenceStatsRequest(channel=channel)).num_clients == 0:
            break
    assert api.presence_stats(PresenceStatsRequest(channel=channel)).num_clients == 0
    assert api.info(InfoRequest()).nodes[0].num_clients == 0
    sock.close()
