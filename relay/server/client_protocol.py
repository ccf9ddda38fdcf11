"""Centrifugo's bidirectional client protocol (JSON): one `Session` per connected client.

A session reads commands (`{"id": N, "<method>": {...}}`), answers each with a reply carrying the
same id, and receives pushes from the hub. It knows nothing of sockets: the transport gives it
frames and takes its output through `Transport` (relay/server/websocket.py). Semantics, codes and
recovery follow Centrifugo v6 (see shared/reference/centrifugo-client-protocol.md):

- the first command must be `connect` (anonymous, or a JWT whose `channels` are subscribed at once);
- `subscribe` checks the namespace's options and answers the stream position; with `recover` it
  sends what the client missed, `recovered` true only when nothing is lost;
- errors are replies (`{"id": N, "error": {...}}`); protocol violations and bad tokens close the
  connection with a disconnect code.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson

from relay.config import ChannelOptions
from relay.server import delta
from relay.server.client_encoding import JSON, BadFrame, Encoding
from relay.server.errors import ApiError
from relay.server.hub import Hub, Subscriber, client_info
from relay.server.jwt import Claims, InvalidToken, TokenExpired, TokenVerifier, ttl
from relay.server.state import ServerState

RECOVERY_MAX_PUBLICATIONS = 300
PING_INTERVAL = 25
PONG_TIMEOUT = 8
# How long after its token's exp a connection may still refresh (Centrifugo's client_expired_close_delay).
EXPIRED_CLOSE_DELAY = 25
DISCONNECT_EXPIRED = (3005, "connection expired")

# Client error codes (centrifuge errors.go).
PERMISSION_DENIED = (103, "permission denied")
METHOD_NOT_FOUND = (104, "method not found")
ALREADY_SUBSCRIBED = (105, "already subscribed")
LIMIT_EXCEEDED = (106, "limit exceeded")
BAD_REQUEST = (107, "bad request")
NOT_AVAILABLE = (108, "not available")
TOKEN_EXPIRED = (109, "token expired")
EXPIRED = (110, "expired")
UNRECOVERABLE = (112, "unrecoverable position")
# Disconnect codes (centrifuge disconnect.go): the WebSocket close code and reason.
DISCONNECT_INVALID_TOKEN = (3500, "invalid token")
DISCONNECT_BAD_REQUEST = (3501, "bad request")
DISCONNECT_FORCE = (3503, "force disconnect")
UNSUBSCRIBE_SERVER = (2000, "server unsubscribe")
# Not a close frame: the connection is dropped once what is queued was sent (SDKs then reconnect).
DROP = (0, "")


class ClientError(Exception):
    """Answered as `{"id": N, "error": {"code", "message"}}`; the connection stays."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code, self.message = code, message


class Disconnect(Exception):
    """Closes the connection with a disconnect code and reason."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"{code}: {reason}")
        self.code, self.reason = code, reason


class Transport(Protocol):
    """How a session reaches its client."""

    def send(self, frame: bytes) -> None:
        """Queue one encoded JSON line."""

    def close(self, code: int, reason: str) -> None:
        """Send what is queued, then close with this code (0: drop the connection, no close frame)."""


@dataclass
class ClientContext:
    """Everything sessions share: the state, the hub, namespace options, tokens and limits."""

    state: ServerState
    hub: Hub
    namespaces: dict[str, ChannelOptions]
    without_namespace: ChannelOptions
    verifier: TokenVerifier
    allow_anonymous: bool = True
    max_subscriptions: int = 128
    # Namespace of users' personal channels ("" = none); None = no personal channels.
    personal_namespace: str | None = None
    version: str = ""
    clock: Callable[[], float] = field(default=time.time)

    def delta_publish(self, channel: str) -> bool:
        """Whether every publication to a channel is a delta publication (its namespace's delta_publish)."""
        try:
            return self.options(channel).delta_publish
        except ApiError:
            return False

    def options(self, channel: str) -> ChannelOptions:
        """The options of a channel's namespace; ApiError 102 when it is not configured."""
        name = self.state.policy_for(channel).name
        return self.namespaces[name] if name else self.without_namespace


def _allowed(for_client: bool, for_anonymous: bool, for_subscriber: bool, user: str, subscribed: bool) -> bool:
    # As Centrifugo: anonymous users need the *_for_anonymous option even as subscribers.
    return (for_client or (for_subscriber and subscribed)) and (bool(user) or for_anonymous)


class Session:
    """One client's connection state and its command handling."""

    def __init__(self, ctx: ClientContext, transport: Transport, encoding: Encoding = JSON) -> None:
        self.ctx = ctx
        self.transport = transport
        self.encoding = encoding
        self.client_id = str(uuid.uuid4())
        self.user = ""
        self.conn_info: bytes | None = None
        self.connected = False
        self.closed = False
        self.subscriptions: dict[str, Subscriber] = {}
        self.awaiting_pong = False
        self.expire_at = 0  # unix seconds from the token's exp; 0 = never

    # -- what the hub calls -------------------------------------------------------------------

    def push(self, frame: bytes) -> None:
        if not self.closed:
            self.transport.send(frame)

    def send(self, message: dict[str, Any]) -> None:
        """Encode and queue one reply or push."""
        self.push(self.encoding.encode(message))

    def server_unsubscribe(self, channel: str, code: int, reason: str) -> None:
        if channel in self.subscriptions:
            self._leave(channel)
            self.send({"push": {"channel": channel, "unsubscribe": {"code": code, "reason": reason}}})

    def server_subscribe(self, channel: str) -> None:
        """Subscribe on the server's behalf (server API Subscribe) and tell the client."""
        if channel not in self.subscriptions and not self.closed:
            result = self._join(channel, self.ctx.options(channel), {}, server_side=True)
            self.send({"push": {"channel": channel, "subscribe": result}})

    def disconnect(self, code: int, reason: str) -> None:
        if not self.closed:
            self.close()
            self.transport.close(code, reason)

    def close(self) -> None:
        """Forget the client's subscriptions and connection (the transport is gone or going)."""
        if self.closed:
            return
        self.closed = True
        for channel in list(self.subscriptions):
            self._leave(channel)
        self.ctx.hub.remove_connection(self)

    # -- input --------------------------------------------------------------------------------

    def handle_frame(self, frame: bytes | str) -> None:
        """Handle one WebSocket message: one or more commands, in order."""
        try:
            commands = self.encoding.decode(frame)
        except BadFrame:
            self.disconnect(*DISCONNECT_BAD_REQUEST)
            return
        for command in commands:
            if self.closed:
                return
            self.handle(command)

    def handle(self, command: dict[str, Any]) -> None:
        """Handle one command: its reply (or error reply) is queued before this returns."""
        cid = command.get("id", 0)
        method, params = next(((k, v) for k, v in command.items() if k != "id" and v is not None), ("", None))
        if not isinstance(cid, int) or (params is not None and not isinstance(params, dict)):
            self.disconnect(*DISCONNECT_BAD_REQUEST)
            return
        try:
            if not self.connected and method != "connect":
                raise Disconnect(*DISCONNECT_BAD_REQUEST)
            if not method or not cid:
                if method == "send":
                    return
                self.awaiting_pong = False  # any id-less command is a pong
                return
            result = self._dispatch(method, params or {})
        except Disconnect as err:
            self.disconnect(err.code, err.reason)
            return
        except (ClientError, ApiError) as err:
            error: dict[str, Any] = {"code": err.code, "message": err.message}
            if err.code in (100, 111):
                error["temporary"] = True
            self.send({"id": cid, "error": error})
            if method == "connect":  # as Centrifugo: the reply, then the socket is dropped (no close code)
                self.disconnect(*DROP)
            return
        self.send({"id": cid, method: result})

    def _dispatch(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        handler = {
            "connect": self._connect, "subscribe": self._subscribe, "unsubscribe": self._unsubscribe,
            "publish": self._publish, "history": self._history, "presence": self._presence,
            "presence_stats": self._presence_stats, "refresh": self._refresh, "sub_refresh": self._sub_refresh,
        }.get(method)
        if handler is None:
            raise ClientError(*METHOD_NOT_FOUND)
        return handler(params)

    # -- connect ------------------------------------------------------------------------------

    def _verify(self, token: str) -> Claims:
        try:
            return self.ctx.verifier.verify(token)
        except InvalidToken:
            raise Disconnect(*DISCONNECT_INVALID_TOKEN) from None
        except TokenExpired:
            raise ClientError(*TOKEN_EXPIRED) from None

    def _connect(self, params: dict[str, Any]) -> dict[str, Any]:
        if self.connected:
            raise Disconnect(*DISCONNECT_BAD_REQUEST)
        token = params.get("token") or ""
        channels: list[str] = []
        result: dict[str, Any] = {"client": self.client_id, "version": self.ctx.version,
                                  "ping": PING_INTERVAL, "pong": True}
        if token:
            claims = self._verify(str(token))
            if claims.expire_at and claims.expire_at <= self.ctx.clock():
                raise ClientError(*EXPIRED)
            self.user, self.conn_info, channels = claims.user, claims.info, claims.channels
            self.expire_at = claims.expire_at
            if claims.expire_at:
                result.update(expires=True, ttl=ttl(claims.expire_at))
        elif not self.ctx.allow_anonymous:
            raise Disconnect(*DISCONNECT_BAD_REQUEST)
        if self.user and self.ctx.personal_namespace is not None:
            ns = self.ctx.personal_namespace
            channels = [*channels, f"{ns}:#{self.user}" if ns else f"#{self.user}"]
        for channel in channels:
            self.ctx.options(channel)  # 102 for an unknown namespace, before anything is subscribed
        self.connected = True
        self.ctx.hub.add_connection(self)
        wanted = params.get("subs") or {}
        subs = {}
        for channel in channels:
            recover = wanted.get(channel) or {}
            subs[channel] = self._join(channel, self.ctx.options(channel), recover, server_side=True)
        if subs:
            result["subs"] = subs
        return result

    def _refresh(self, params: dict[str, Any]) -> dict[str, Any]:
        claims = self._verify(str(params.get("token") or ""))
        if claims.user != self.user:
            raise Disconnect(*DISCONNECT_INVALID_TOKEN)
        if claims.expire_at and claims.expire_at <= self.ctx.clock():
            raise ClientError(*EXPIRED)
        self.expire_at = claims.expire_at
        result: dict[str, Any] = {"client": self.client_id, "version": self.ctx.version}
        if claims.expire_at:
            result.update(expires=True, ttl=ttl(claims.expire_at))
        return result

    def expired(self) -> bool:
        """Whether the connection's token expired more than the refresh grace ago (then: 3005)."""
        return bool(self.expire_at) and self.ctx.clock() > self.expire_at + EXPIRED_CLOSE_DELAY

    def _sub_refresh(self, params: dict[str, Any]) -> dict[str, Any]:
        channel = str(params.get("channel") or "")
        if channel not in self.subscriptions:
            raise ClientError(*PERMISSION_DENIED)
        claims = self._subscription_claims(channel, str(params.get("token") or ""))
        return {"expires": True, "ttl": ttl(claims.expire_at)} if claims.expire_at else {}

    # -- subscribe ----------------------------------------------------------------------------

    def _subscription_claims(self, channel: str, token: str) -> Claims:
        try:
            claims = self.ctx.verifier.verify(token)
        except TokenExpired:
            raise ClientError(*TOKEN_EXPIRED) from None
        except InvalidToken:
            raise ClientError(*PERMISSION_DENIED) from None
        if claims.channel != channel or claims.user != self.user:
            raise Disconnect(*DISCONNECT_INVALID_TOKEN)
        return claims

    def _subscribe(self, params: dict[str, Any]) -> dict[str, Any]:
        channel = params.get("channel")
        if not channel or not isinstance(channel, str):
            raise Disconnect(*DISCONNECT_BAD_REQUEST)
        opts = self.ctx.options(channel)
        if channel in self.subscriptions:
            raise ClientError(*ALREADY_SUBSCRIBED)
        if len(self.subscriptions) >= self.ctx.max_subscriptions:
            raise ClientError(*LIMIT_EXCEEDED)
        token = str(params.get("token") or "")
        chan_info = None
        if token:
            chan_info = self._subscription_claims(channel, token).info
        elif channel.startswith("$") or not _allowed(
                opts.allow_subscribe_for_client, opts.allow_subscribe_for_anonymous, False, self.user, False):
            raise ClientError(*PERMISSION_DENIED)
        return self._join(channel, opts, params, chan_info=chan_info)

    def _join(self, channel: str, opts: ChannelOptions, params: dict[str, Any], *, server_side: bool = False,
              chan_info: bytes | None = None) -> dict[str, Any]:
        """Subscribe: answer the stream position (and what was missed), then receive live pushes.

        All in one step of the event loop, so no publication falls between the history read and
        the subscription, and the reply is queued before any push of the channel.
        """
        history = opts.history_size > 0 and opts.history_ttl > 0
        recovery = history and (opts.force_recovery or (bool(params.get("recoverable")) and opts.allow_recovery)
                                or (server_side and bool(params.get("recover"))))
        positioning = history and (recovery or opts.force_positioning
                                   or (bool(params.get("positioned")) and opts.allow_positioning))
        wanted_delta = str(params.get("delta") or "")
        if wanted_delta and wanted_delta not in delta.DELTA_TYPES:
            raise Disconnect(*DISCONNECT_BAD_REQUEST)
        use_delta = bool(wanted_delta) and wanted_delta in opts.allowed_delta_types
        result: dict[str, Any] = {"delta": True} if use_delta else {}
        if positioning:
            result.update(self._position(channel, opts, params, recovery))
        if use_delta and result.get("publications"):
            result["publications"] = delta.recovered(result["publications"], not self.encoding.binary)
        wants_join_leave = opts.force_push_join_leave or (
            bool(params.get("join_leave")) and opts.join_leave and self._may_presence(opts, True))
        sub = Subscriber(self, chan_info, push_join_leave=opts.join_leave and wants_join_leave, delta=use_delta,
                         delta_ready=use_delta and bool(result.get("recovered")))
        self.subscriptions[channel] = sub
        self.ctx.hub.subscribe(channel, sub)
        if opts.join_leave:
            self.ctx.hub.join_leave(channel, "join", client_info(self, chan_info))
        return result

    def _position(self, channel: str, opts: ChannelOptions, params: dict[str, Any],
                  recovery: bool) -> dict[str, Any]:
        top = self.ctx.state.history(channel, limit=0)
        result: dict[str, Any] = {"positioned": True, "offset": top.offset, "epoch": top.epoch}
        if not recovery:
            return result
        result["recoverable"] = True
        if not params.get("recover"):
            return result
        result["was_recovering"] = True
        offset, epoch = int(params.get("offset") or 0), str(params.get("epoch") or "")
        if epoch and epoch != top.epoch:
            return result
        page = self.ctx.state.history(channel, limit=RECOVERY_MAX_PUBLICATIONS, since=(offset, top.epoch))
        pubs = page.publications
        recovered = (offset == top.offset) if not pubs else (
            pubs[0].offset == offset + 1 and pubs[-1].offset == top.offset)
        if recovered:  # false is left out, as Centrifugo leaves out every zero value
            result["recovered"] = True
        if recovered and pubs:
            result["publications"] = [_publication(p.data, p.offset, p.tags) for p in pubs]
            if pubs[0].offset == 1:  # as Centrifugo: a stream's first publication names its epoch
                result["publications"][0]["epoch"] = top.epoch
            result["offset"] = offset
        return result

    def _unsubscribe(self, params: dict[str, Any]) -> dict[str, Any]:
        channel = str(params.get("channel") or "")
        if channel in self.subscriptions:
            self._leave(channel)
        return {}

    def _leave(self, channel: str) -> None:
        sub = self.subscriptions.pop(channel)
        self.ctx.hub.unsubscribe(channel, self)
        try:
            opts = self.ctx.options(channel)
        except ApiError:
            return
        if opts.join_leave:
            self.ctx.hub.join_leave(channel, "leave", client_info(self, sub.chan_info))

    # -- publish, history, presence -----------------------------------------------------------

    def _publish(self, params: dict[str, Any]) -> dict[str, Any]:
        channel = str(params.get("channel") or "")
        if not channel:
            raise ClientError(*BAD_REQUEST)
        opts = self.ctx.options(channel)
        if not _allowed(opts.allow_publish_for_client, opts.allow_publish_for_anonymous,
                        opts.allow_publish_for_subscriber, self.user, channel in self.subscriptions):
            raise ClientError(*PERMISSION_DENIED)
        data = params.get("data")
        if data is None:
            raise ClientError(*BAD_REQUEST)
        sub = self.subscriptions.get(channel)
        with self.ctx.hub.publishing_as(client_info(self, sub.chan_info if sub else None)):
            self.ctx.state.publish(channel, data if isinstance(data, bytes) else orjson.dumps(data))
        return {}

    def _may_presence(self, opts: ChannelOptions, subscribed: bool) -> bool:
        return _allowed(opts.allow_presence_for_client, opts.allow_presence_for_anonymous,
                        opts.allow_presence_for_subscriber, self.user, subscribed)

    def _presence_options(self, params: dict[str, Any]) -> str:
        channel = str(params.get("channel") or "")
        if not channel:
            raise ClientError(*BAD_REQUEST)
        opts = self.ctx.options(channel)
        if not opts.presence:
            raise ClientError(*NOT_AVAILABLE)
        if not self._may_presence(opts, channel in self.subscriptions):
            raise ClientError(*PERMISSION_DENIED)
        return channel

    def _presence(self, params: dict[str, Any]) -> dict[str, Any]:
        return {"presence": self.ctx.hub.presence(self._presence_options(params))}

    def _presence_stats(self, params: dict[str, Any]) -> dict[str, Any]:
        clients, users = self.ctx.hub.presence_stats(self._presence_options(params))
        return _nonzero(num_clients=clients, num_users=users)

    def _history(self, params: dict[str, Any]) -> dict[str, Any]:
        channel = str(params.get("channel") or "")
        if not channel:
            raise ClientError(*BAD_REQUEST)
        opts = self.ctx.options(channel)
        if not (opts.history_size > 0 and opts.history_ttl > 0):
            raise ClientError(*NOT_AVAILABLE)
        if not _allowed(opts.allow_history_for_client, opts.allow_history_for_anonymous,
                        opts.allow_history_for_subscriber, self.user, channel in self.subscriptions):
            raise ClientError(*PERMISSION_DENIED)
        since = params.get("since")
        position = (int(since.get("offset") or 0), str(since.get("epoch") or "")) if isinstance(since, dict) else None
        page = self.ctx.state.history(channel, int(params.get("limit") or 0), position, bool(params.get("reverse")))
        result = _nonzero(offset=page.offset, epoch=page.epoch)
        if page.publications:
            result["publications"] = [_publication(p.data, p.offset, p.tags) for p in page.publications]
        return result


def _publication(data: bytes, offset: int, tags: Any) -> dict[str, Any]:
    pub: dict[str, Any] = {"data": data, "offset": offset}
    if tags:
        pub["tags"] = dict(tags)
    return pub


def _nonzero(**values: Any) -> dict[str, Any]:
    return {k: v for k, v in values.items() if v}
