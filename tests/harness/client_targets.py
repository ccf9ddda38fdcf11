"""One server with WebSocket clients and the HTTP API, embedded or real Centrifugo v6, same options.

`client_target` runs a test twice: against `relay serve` with its HTTP side on, then against real
Centrifugo v6.9.1 with the same namespaces (named as Centrifugo names its options), the same HTTP
API key and the same client token secret. A test reads `ws_url`, `api_url` and `api_key`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest

from tests.harness.ports import free_port
from tests.harness.require import unavailable

TOKEN_SECRET = "client-token-secret-of-32-bytes-at-least"
SECRET_ENV = "RELAY_TEST_CLIENT_TOKEN_SECRET"
API_KEY = "http-key"
_SUBSCRIBE = {"allow_subscribe_for_client": True, "allow_subscribe_for_anonymous": True}
CLIENT_NAMESPACES: list[dict[str, Any]] = [
    # Recovery, presence, history and publishing for subscribers: what a dev setup turns on.
    {"name": "chat", "history_size": 1000, "history_ttl": "300s", "force_recovery": True, "presence": True,
     "allow_history_for_subscriber": True, "allow_presence_for_subscriber": True,
     "allow_publish_for_subscriber": True, **_SUBSCRIBE},
    # Only users with a token (not anonymous) may subscribe.
    {"name": "members", "history_size": 0, "allow_subscribe_for_client": True,
     "allow_subscribe_for_anonymous": False},
    # Fossil delta compression for subscribers that ask.
    {"name": "deltas", "history_size": 100, "history_ttl": "300s", "force_recovery": True,
     "allowed_delta_types": ["fossil"], **_SUBSCRIBE},
    # Presence with join/leave pushed to every subscriber.
    {"name": "rooms", "history_size": 0, "presence": True, "join_leave": True, "force_push_join_leave": True,
     **_SUBSCRIBE},
    # Nobody may subscribe without a subscription token.
    {"name": "closed", "history_size": 0, "allow_subscribe_for_client": False},
]


@dataclass
class ClientTarget:
    """A server to run a client test against: `kind` is "embedded" or "centrifugo"."""

    kind: str
    http_address: str
    api_key: str
    server: Any

    @property
    def ws_url(self) -> str:
        return f"ws://{self.http_address}/connection/websocket"

    @property
    def api_url(self) -> str:
        return f"http://{self.http_address}/api"


def centrifugo_options(namespaces: list[dict[str, Any]]) -> dict[str, Any]:
    """Config overrides for real Centrifugo matching the embedded server of `embedded_options`."""
    tables = [{k: v for k, v in ns.items()} for ns in namespaces]
    for ns in tables:
        if ns.get("history_size") == 0:
            ns.pop("history_ttl", None)
    return {"client": {"token": {"hmac_secret_key": TOKEN_SECRET},
                       "allow_anonymous_connect_without_token": True},
            "http_api": {"key": API_KEY},
            "channel": {"namespaces": tables}}


def embedded_options(namespaces: list[dict[str, Any]]) -> dict[str, Any]:
    return {"api_key": API_KEY, "namespaces": namespaces, "http_listen": f"127.0.0.1:{free_port()}",
            "client_token_hmac_secret_env": SECRET_ENV}


def start_target(request: pytest.FixtureRequest, kind: str, namespaces: list[dict[str, Any]] | None = None,
                 embedded: dict[str, Any] | None = None, centrifugo: dict[str, Any] | None = None) -> ClientTarget:
    """Start a server of `kind` with `namespaces` (CLIENT_NAMESPACES by default) for this test;
    `embedded` adds [server] options, `centrifugo` config overrides, for the same setting."""
    tables = namespaces if namespaces is not None else CLIENT_NAMESPACES
    if kind == "embedded":
        monkeypatch: pytest.MonkeyPatch = request.getfixturevalue("monkeypatch")
        monkeypatch.setenv(SECRET_ENV, TOKEN_SECRET)
        options = {**embedded_options(tables), **(embedded or {})}
        server = request.getfixturevalue("embedded_server_factory")(**options)
        return ClientTarget(kind, options["http_listen"], API_KEY, server)
    try:
        factory = request.getfixturevalue("centrifugo_factory")
    except pytest.FixtureLookupError:
        unavailable("the centrifugo_factory fixture is not available")
    overrides = centrifugo_options(tables)
    for section, values in (centrifugo or {}).items():
        overrides[section] = {**overrides.get(section, {}), **values}
    real = factory(config_overrides=overrides)
    return ClientTarget(kind, real.http_address, API_KEY, real)


@pytest.fixture(params=["embedded", pytest.param("centrifugo", marks=pytest.mark.centrifugo)])
def client_target(request: pytest.FixtureRequest) -> ClientTarget:
    """The embedded server with its HTTP side, then real Centrifugo v6, same namespaces and keys."""
    return start_target(request, request.param)
