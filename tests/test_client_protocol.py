"""Unit tests of one client session (relay/server/client_protocol.py) with a recording transport."""

from __future__ import annotations

import time
from typing import Any

import jwt
import orjson

from relay.config import ChannelOptions
from relay.server.client_protocol import ClientContext, Session
from relay.server.hub import Hub
from relay.server.jwt import TokenVerifier
from relay.server.state import NamespacePolicy, ServerState

SECRET = "unit-test-secret-of-at-least-32-bytes"


class Recorder:
    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []
        self.closed: tuple[int, str] | None = None

    def send(self, frame: bytes) -> None:
        self.sent.append(orjson.loads(frame))

    def close(self, code: int, reason: str) -> None:
        self.closed = (code, reason)


def session(now: list[float]) -> tuple[Session, Recorder]:
    state = ServerState([NamespacePolicy("chat", 100, 300.0)])
    ctx = ClientContext(state=state, hub=Hub(), namespaces={"chat": ChannelOptions.model_validate({})},
                        without_namespace=ChannelOptions.model_validate({"history_size": 0}),
                        verifier=TokenVerifier(SECRET), clock=lambda: now[0])
    recorder = Recorder()
    return Session(ctx, recorder), recorder


def token(**claims: Any) -> str:
    return jwt.encode(claims, SECRET, algorithm="HS256")


def test_a_connection_expires_unless_refreshed() -> None:
    start = int(time.time())
    now = [float(start)]
    s, out = session(now)
    s.handle_frame(orjson.dumps({"id": 1, "connect": {"token": token(sub="u", exp=start + 10)}}))
    assert out.sent[-1]["connect"]["expires"] is True
    now[0] = start + 10 + 20
    assert not s.expired()  # within the grace a refresh may still come
    now[0] = start + 10 + 26
    assert s.expired()
    s.handle_frame(orjson.dumps({"id": 2, "refresh": {"token": token(sub="u", exp=start + 600)}}))
    assert out.sent[-1]["id"] == 2 and "refresh" in out.sent[-1]
    assert not s.expired()
    s.handle_frame(orjson.dumps({"id": 3, "refresh": {"token": token(sub="u", exp=start - 600)}}))
    assert out.sent[-1]["error"]["code"] == 109


def test_commands_before_connect_and_bad_frames_close_with_3501() -> None:
    s, out = session([0.0])
    s.handle_frame(orjson.dumps({"id": 1, "subscribe": {"channel": "chat:x"}}))
    assert out.closed == (3501, "bad request")
    s, out = session([0.0])
    s.handle_frame(b"{not json")
    assert out.closed == (3501, "bad request")
