"""The client protocol over WebSocket, frame by frame, against the embedded server and real Centrifugo.

A raw aiohttp WebSocket client sends the commands the SDKs send, so codes, close frames and the
recovery answer can be compared exactly; the SDK tests (centrifuge-python, centrifuge-js) are in
tests/test_websocket_clients.py.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import jwt
import orjson
import pytest
from cent import Client, DisconnectRequest, PublishRequest, UnsubscribeRequest

from tests.harness.client_targets import TOKEN_SECRET, ClientTarget

TIMEOUT = 10.0


def fresh(ns: str = "chat") -> str:
    return f"{ns}:{uuid.uuid4().hex[:10]}"


def token(secret: str = TOKEN_SECRET, **claims: Any) -> str:
    return jwt.encode(claims, secret, algorithm="HS256")


class RawClient:
    """Commands out, replies and pushes in, as decoded JSON objects."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.next_id = 0
        self.pending: list[dict[str, Any]] = []
        self.close_code: int | None = None
        self.close_reason = ""

    async def send(self, **command: Any) -> int:
        self.next_id += 1
        await self.ws.send_str(orjson.dumps({"id": self.next_id, **command}).decode())
        return self.next_id

    async def receive(self) -> dict[str, Any] | None:
        """The next object from the server (pings answered); None once the server closed."""
        while not self.pending:
            msg = await asyncio.wait_for(self.ws.receive(), TIMEOUT)
            if msg.type != aiohttp.WSMsgType.TEXT:
                code = msg.data if msg.type == aiohttp.WSMsgType.CLOSE else self.ws.close_code
                self.close_code, self.close_reason = code, str(msg.extra or "")
                return None
            for line in msg.data.split("\n"):
                obj = orjson.loads(line)
                if obj == {}:
                    await self.ws.send_str("{}")
                    continue
                self.pending.append(obj)
        return self.pending.pop(0)

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        """Send a command and return its reply (pushes before it are kept for `push`)."""
        cid = await self.send(**{method: params})
        kept: list[dict[str, Any]] = []
        while True:
            obj = await self.receive()
            if obj is None:
                raise ConnectionError(f"closed {self.close_code} {self.close_reason}")
            if obj.get("id") == cid:
                self.pending[:0] = kept
                return obj
            kept.append(obj)

    async def push(self) -> dict[str, Any]:
        obj = await self.receive()
        assert obj is not None and "push" in obj, obj
        return obj["push"]  # type: ignore[no-any-return]

    async def closed(self) -> tuple[int | None, str]:
        while await self.receive() is not None:
            pass
        return self.close_code, self.close_reason


@asynccontextmanager
async def raw_client(target: ClientTarget) -> AsyncIterator[RawClient]:
    async with aiohttp.ClientSession() as session, session.ws_connect(target.ws_url) as ws:
        yield RawClient(ws)


def api(target: ClientTarget) -> Client:
    return Client(target.api_url, target.api_key)


async def test_connect_subscribe_and_live_publications(client_target: ClientTarget) -> None:
    channel = fresh()
    async with raw_client(client_target) as c:
        connected = (await c.call("connect", token=token(sub="u1"), name="test"))["connect"]
        assert connected["client"] and connected["ping"] == 25 and connected["pong"] is True
        sub = (await c.call("subscribe", channel=channel))["subscribe"]
        assert sub["recoverable"] is True and sub["positioned"] is True and len(sub["epoch"]) == 8
        assert sub.get("offset", 0) == 0
        for n in range(3):
            api(client_target).publish(PublishRequest(channel=channel, data={"n": n}))
        pushes = [await c.push() for _ in range(3)]
        assert [(p["channel"], p["pub"]["data"], p["pub"]["offset"]) for p in pushes] == [
            (channel, {"n": n}, n + 1) for n in range(3)]
        again = await c.call("subscribe", channel=channel)
        assert again["error"] == {"code": 105, "message": "already subscribed"}
        history = (await c.call("history", channel=channel, limit=-1))["history"]
        assert [p["offset"] for p in history["publications"]] == [1, 2, 3]
        stats = (await c.call("presence_stats", channel=channel))["presence_stats"]
        assert stats == {"num_clients": 1, "num_users": 1}
        assert (await c.call("publish", channel=channel, data={"from": "client"}))["publish"] == {}
        own = await c.push()
        assert own["pub"]["data"] == {"from": "client"} and own["pub"]["info"]["client"] == connected["client"]
        assert (await c.call("unsubscribe", channel=channel))["unsubscribe"] == {}
        nope = await c.call("publish", channel=channel, data={"late": True})  # no longer a subscriber
        assert nope["error"]["code"] == 103


async def test_recovery_answers_like_centrifugo(client_target: ClientTarget) -> None:
    channel = fresh()
    async with raw_client(client_target) as c:
        await c.call("connect")
        first = (await c.call("subscribe", channel=channel, recoverable=True, flag=1))["subscribe"]
    epoch = first["epoch"]
    for n in range(1, 4):
        api(client_target).publish(PublishRequest(channel=channel, data={"n": n}))
    async with raw_client(client_target) as c:
        await c.call("connect")
        back = (await c.call("subscribe", channel=channel, recover=True, offset=0, epoch=epoch))["subscribe"]
        assert back["recovered"] is True and back["was_recovering"] is True
        assert [(p["data"], p["offset"]) for p in back["publications"]] == [({"n": n}, n) for n in range(1, 4)]
        assert all(p.get("epoch", epoch) == epoch for p in back["publications"])
        assert back.get("offset", 0) == 0 and back["epoch"] == epoch
    async with raw_client(client_target) as c:  # up to date: recovered, nothing to send
        await c.call("connect")
        top = (await c.call("subscribe", channel=channel, recover=True, offset=3, epoch=epoch))["subscribe"]
        assert top["recovered"] is True and "publications" not in top and top["offset"] == 3
    async with raw_client(client_target) as c:  # another epoch: the stream was lost
        await c.call("connect")
        lost = (await c.call("subscribe", channel=channel, recover=True, offset=1, epoch="xxxxxxxx"))["subscribe"]
        assert lost.get("recovered", False) is False and "publications" not in lost
        assert (lost["offset"], lost["epoch"]) == (3, epoch)


async def test_tokens_and_permissions_refused_like_centrifugo(client_target: ClientTarget) -> None:
    async with raw_client(client_target) as c:  # wrong signature: closed, 3500
        await c.send(connect={"token": token("not-the-secret-but-just-as-long-as-it", sub="u1")})
        assert await c.closed() == (3500, "invalid token")
    async with raw_client(client_target) as c:  # expired: error 109, then closed
        reply = await c.call("connect", token=token(sub="u1", exp=int(time.time()) - 60))
        assert reply["error"] == {"code": 109, "message": "token expired"}
        code, _ = await c.closed()
        assert code is not None and code < 3000  # dropped, no close code: SDKs get a fresh token and retry
    async with raw_client(client_target) as c:  # anonymous where only users may subscribe: 103
        await c.call("connect")
        refused = await c.call("subscribe", channel=fresh("members"))
        assert refused["error"] == {"code": 103, "message": "permission denied"}
        assert (await c.call("subscribe", channel=fresh("closed")))["error"]["code"] == 103
        assert (await c.call("subscribe", channel=fresh("nowhere")))["error"]["code"] == 102
        # Anonymous subscribers need allow_*_for_anonymous as well, as in Centrifugo.
        chat = fresh()
        await c.call("subscribe", channel=chat)
        assert (await c.call("history", channel=chat, limit=-1))["error"]["code"] == 103
        assert (await c.call("presence_stats", channel=chat))["error"]["code"] == 103
        assert (await c.call("publish", channel=chat, data={}))["error"]["code"] == 103
    async with raw_client(client_target) as c:  # a user may; server-side channels from the token
        server_side = fresh()
        connected = (await c.call("connect", token=token(sub="u1", info={"name": "Ann"},
                                                         exp=int(time.time()) + 600, channels=[server_side])))
        result = connected["connect"]
        assert result["expires"] is True and 0 < result["ttl"] <= 600 and server_side in result["subs"]
        assert "subscribe" in await c.call("subscribe", channel=fresh("members"))
        api(client_target).publish(PublishRequest(channel=server_side, data={"to": "u1"}))
        pushed = await c.push()
        assert (pushed["channel"], pushed["pub"]["data"]) == (server_side, {"to": "u1"})


async def test_server_api_unsubscribe_and_disconnect_act_on_connections(client_target: ClientTarget) -> None:
    channel = fresh()
    async with raw_client(client_target) as c:
        await c.call("connect", token=token(sub="u2"))
        await c.call("subscribe", channel=channel)
        api(client_target).unsubscribe(UnsubscribeRequest(channel=channel, user="u2"))
        push = await c.push()
        assert push == {"channel": channel, "unsubscribe": {"code": 2000, "reason": "server unsubscribe"}}
        api(client_target).disconnect(DisconnectRequest(user="u2"))
        assert await c.closed() == (3503, "force disconnect")


async def test_grpc_subscribe_unsubscribe_disconnect_act_on_connections(client_target: ClientTarget) -> None:
    from relay.proto.centrifugo import api_pb2 as pb
    from tests.harness.embedded import open_aio_stubs

    server = client_target.server
    channel = fresh()
    async with raw_client(client_target) as c, open_aio_stubs(server.grpc_address if client_target.kind ==
                                                              "centrifugo" else server.address,
                                                              server.api_key) as stubs:
        await c.call("connect", token=token(sub="u3"))
        md = stubs.metadata
        assert not (await stubs.v6.Subscribe(pb.SubscribeRequest(channel=channel, user="u3"), metadata=md)).error.code
        pushed = await c.push()
        assert pushed["channel"] == channel and "subscribe" in pushed
        await stubs.v6.Publish(pb.PublishRequest(channel=channel, data=b'{"x": 1}'), metadata=md)
        assert (await c.push())["pub"]["data"] == {"x": 1}
        await stubs.v6.Unsubscribe(pb.UnsubscribeRequest(channel=channel, user="u3"), metadata=md)
        assert (await c.push())["unsubscribe"]["code"] == 2000
        reply = await stubs.v6.Subscribe(pb.SubscribeRequest(channel=fresh("nowhere"), user="u3"), metadata=md)
        assert reply.error.code == 102
        await stubs.v6.Disconnect(pb.DisconnectRequest(user="u3", disconnect=pb.Disconnect(code=4000, reason="bye")),
                                  metadata=md)
        assert await c.closed() == (4000, "bye")


@pytest.mark.parametrize("kind", ["embedded", pytest.param("centrifugo", marks=pytest.mark.centrifugo)])
async def test_users_personal_channel(kind: str, request: pytest.FixtureRequest) -> None:
    from tests.harness.client_targets import start_target

    target = start_target(
        request, kind, embedded={"subscribe_to_user_personal_channel": {"enabled": True,
                                                                         "personal_channel_namespace": "chat"}},
        centrifugo={"client": {"subscribe_to_user_personal_channel": {"enabled": True,
                                                                      "personal_channel_namespace": "chat"}}})
    async with raw_client(target) as c:
        result = (await c.call("connect", token=token(sub="u9")))["connect"]
        assert "chat:#u9" in result["subs"]
        api(target).publish(PublishRequest(channel="chat:#u9", data={"to": "u9"}))
        assert (await c.push())["pub"]["data"] == {"to": "u9"}
    async with raw_client(target) as c:  # anonymous: no personal channel
        assert "subs" not in (await c.call("connect"))["connect"]


async def test_join_and_leave_pushed(client_target: ClientTarget) -> None:
    channel = fresh("rooms")
    async with raw_client(client_target) as a:
        a_id = (await a.call("connect", token=token(sub="ann")))["connect"]["client"]
        await a.call("subscribe", channel=channel)
        own = await a.push()  # a subscriber hears its own join too, as in Centrifugo
        assert own == {"channel": channel, "join": {"info": {"user": "ann", "client": a_id}}}
        async with raw_client(client_target) as b:
            b_id = (await b.call("connect", token=token(sub="bob")))["connect"]["client"]
            await b.call("subscribe", channel=channel)
            joined = await a.push()
            assert joined == {"channel": channel, "join": {"info": {"user": "bob", "client": b_id}}}
            await b.call("unsubscribe", channel=channel)
            left = await a.push()
            assert left == {"channel": channel, "leave": {"info": {"user": "bob", "client": b_id}}}


async def test_subscription_tokens(client_target: ClientTarget) -> None:
    channel = "$" + fresh()
    async with raw_client(client_target) as c:
        await c.call("connect", token=token(sub="u5"))
        assert (await c.call("subscribe", channel=channel))["error"]["code"] == 103  # no token
        expired = await c.call("subscribe", channel=channel,
                               token=token(sub="u5", channel=channel, exp=int(time.time()) - 60))
        assert expired["error"] == {"code": 109, "message": "token expired"}
        good = await c.call("subscribe", channel=channel, token=token(sub="u5", channel=channel))
        assert "subscribe" in good
    async with raw_client(client_target) as c:
        await c.call("connect", token=token(sub="u5"))
        await c.send(subscribe={"channel": channel,
                                "token": token("not-the-secret-but-just-as-long-as-it", sub="u5", channel=channel)})
        bad = await c.receive()
        assert bad is not None and bad["error"] == {"code": 103, "message": "permission denied"}
    async with raw_client(client_target) as c:  # a token for another channel: disconnected
        await c.call("connect", token=token(sub="u5"))
        await c.send(subscribe={"channel": channel, "token": token(sub="u5", channel=channel + "x")})
        assert await c.closed() == (3500, "invalid token")
