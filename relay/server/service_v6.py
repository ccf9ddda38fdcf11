"""`centrifugal.centrifugo.api.CentrifugoApi`: the current server API (Centrifugo v3..v6).

Methods answer the way Centrifugo's API executor does: validation order, error codes, a result
present on success. Batch runs its commands and answers one reply per command, in order; a command
with no known field set gets 104. Batch never uses transport error mode (as in Centrifugo).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
from collections.abc import Callable
from typing import Any, TypeVar

import grpc
from google.protobuf.message import Message

from relay.proto.centrifugo import api_pb2, api_pb2_grpc
from relay.server.client_protocol import DISCONNECT_FORCE, UNSUBSCRIBE_SERVER, ClientContext
from relay.server.errors import (
    BAD_REQUEST,
    NOT_AVAILABLE,
    NOT_FOUND,
    STATUS_DETAILS_KEY,
    ApiError,
    grpc_code,
    status_details,
    wants_transport_errors,
)
from relay.server.node import NodeInfo
from relay.server.pattern import channel_matcher
from relay.server.state import Position, ServerState

ERROR_TYPE = "centrifugal.centrifugo.api.Error"
Response = TypeVar("Response")


def decode_data(data: bytes, b64data: str) -> bytes:
    """The publication data: b64data wins when set; undecodable base64 is 107."""
    if not b64data:
        return data
    try:
        return base64.b64decode(b64data, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(*BAD_REQUEST) from None


async def answer_error(context: grpc.aio.ServicerContext[Any, Any], err: ApiError,
                       make: Callable[..., Response], error_cls: Any, error_type: str,
                       transport: bool) -> Response:
    """The response carrying `err`, or, in transport mode, a GRPC status carrying it.

    `transport` is the server-wide mode; a call's `x-centrifugo-error-mode: transport` asks too.
    """
    error = error_cls(code=err.code, message=err.message)
    if transport or wants_transport_errors(context.invocation_metadata()):
        status = grpc_code(err.code)
        details = status_details(status, err.message, error_type, error.SerializeToString())
        await context.abort(status, err.message, trailing_metadata=((STATUS_DETAILS_KEY, details),))
    return make(error=error)


class CentrifugoApiService(api_pb2_grpc.CentrifugoApiServicer):
    """The v6 API over a ServerState."""

    def __init__(self, state: ServerState, node: NodeInfo, *, transport_errors: bool = False,
                 clients: ClientContext | None = None) -> None:
        self.state = state
        self.node = node
        self.transport_errors = transport_errors
        # The WebSocket side, when the HTTP side runs: presence and client counts come from it.
        self.clients = clients

    def operations(self) -> dict[str, tuple[type[Message], Callable[[Any], Message]]]:
        """The server API methods shared with the HTTP API: name → (request type, operation)."""
        return {
            "publish": (api_pb2.PublishRequest, self._publish_result),
            "broadcast": (api_pb2.BroadcastRequest, self._broadcast),
            "history": (api_pb2.HistoryRequest, self._history),
            "history_remove": (api_pb2.HistoryRemoveRequest, self._history_remove),
            "presence": (api_pb2.PresenceRequest, self._presence),
            "presence_stats": (api_pb2.PresenceStatsRequest, self._presence_stats),
            "info": (api_pb2.InfoRequest, lambda _req: self._info()),
            "channels": (api_pb2.ChannelsRequest, self._channels),
            "subscribe": (api_pb2.SubscribeRequest, self._subscribe),
            "unsubscribe": (api_pb2.UnsubscribeRequest, self._unsubscribe),
            "disconnect": (api_pb2.DisconnectRequest, self._disconnect),
        }

    def _publish_result(self, req: api_pb2.PublishRequest) -> api_pb2.PublishResult:
        offset, epoch = self._publish(req)
        return api_pb2.PublishResult(offset=offset, epoch=epoch)

    async def _fail(self, context: Any, err: ApiError, make: Callable[..., Response]) -> Response:
        return await answer_error(context, err, make, api_pb2.Error, ERROR_TYPE, self.transport_errors)

    # -- the operations, shared by the unary methods and Batch ---------------------------------

    def _publish(self, req: api_pb2.PublishRequest) -> Position:
        if not req.channel:
            raise ApiError(*BAD_REQUEST)
        data = decode_data(req.data, req.b64data)
        if req.delta and self.clients is not None:
            with self.clients.hub.delta_publishing(True):
                return self.state.publish(req.channel, data, dict(req.tags) if req.tags else None,
                                          req.idempotency_key, req.skip_history, req.version, req.version_epoch)
        return self.state.publish(req.channel, data, dict(req.tags) if req.tags else None,
                                  req.idempotency_key, req.skip_history, req.version, req.version_epoch)

    def _broadcast(self, req: api_pb2.BroadcastRequest) -> api_pb2.BroadcastResult:
        if not req.channels:
            raise ApiError(*BAD_REQUEST)
        data = decode_data(req.data, req.b64data)
        tags = dict(req.tags) if req.tags else None
        result = api_pb2.BroadcastResult()
        publish = self.state.publish
        with contextlib.ExitStack() as stack:
            if req.delta and self.clients is not None:
                stack.enter_context(self.clients.hub.delta_publishing(True))
            self._broadcast_each(req, data, tags, result, publish)
        return result

    def _broadcast_each(self, req: api_pb2.BroadcastRequest, data: bytes, tags: dict[str, str] | None,
                        result: api_pb2.BroadcastResult, publish: Callable[..., Position]) -> None:
        for channel in req.channels:
            reply = result.responses.add()
            try:
                offset, epoch = publish(channel, data, tags, req.idempotency_key, req.skip_history,
                                        req.version, req.version_epoch)
            except ApiError as err:
                reply.error.code, reply.error.message = err.code, err.message
            else:
                reply.result.offset, reply.result.epoch = offset, epoch
                reply.result.SetInParent()

    def _history(self, req: api_pb2.HistoryRequest) -> api_pb2.HistoryResult:
        since = (req.since.offset, req.since.epoch) if req.HasField("since") else None
        page = self.state.history(req.channel, req.limit, since, req.reverse)
        result = api_pb2.HistoryResult(offset=page.offset, epoch=page.epoch)
        add = result.publications.add
        for pub in page.publications:
            item = add(data=pub.data, offset=pub.offset)
            if pub.tags:
                item.tags.update(pub.tags)
        return result

    def _history_remove(self, req: api_pb2.HistoryRemoveRequest) -> api_pb2.HistoryRemoveResult:
        self.state.remove_history(req.channel)
        return api_pb2.HistoryRemoveResult()

    def _presence_channel(self, channel: str) -> ClientContext | None:
        """Validate a presence request: 107, 102, then 108 when the namespace keeps no presence."""
        self.state.check_channel(channel)
        if self.clients is not None and not self.clients.options(channel).presence:
            raise ApiError(*NOT_AVAILABLE)
        return self.clients

    def _presence(self, req: api_pb2.PresenceRequest) -> api_pb2.PresenceResult:
        result = api_pb2.PresenceResult()
        clients = self._presence_channel(req.channel)
        if clients is not None:
            for client, sub in clients.hub.channels.get(req.channel, {}).items():
                conn = sub.connection
                result.presence[client].CopyFrom(api_pb2.ClientInfo(
                    user=conn.user, client=client, conn_info=conn.conn_info or b"", chan_info=sub.chan_info or b""))
        return result

    def _presence_stats(self, req: api_pb2.PresenceStatsRequest) -> api_pb2.PresenceStatsResult:
        clients = self._presence_channel(req.channel)
        if clients is None:
            return api_pb2.PresenceStatsResult()
        num_clients, num_users = clients.hub.presence_stats(req.channel)
        return api_pb2.PresenceStatsResult(num_clients=num_clients, num_users=num_users)

    def _info(self) -> api_pb2.InfoResult:
        result = api_pb2.InfoResult()
        node = result.nodes.add()
        self.node.fill(node, self.state.num_channels)
        if self.clients is not None:
            hub = self.clients.hub
            node.num_clients, node.num_users, node.num_subs = hub.num_clients, hub.num_users, hub.num_subs
        return result

    def _channels(self, req: api_pb2.ChannelsRequest) -> api_pb2.ChannelsResult:
        result = api_pb2.ChannelsResult()
        entries = result.channels
        hub = self.clients.hub if self.clients is not None else None
        names = self.state.channel_names(req.pattern)
        if hub is not None:  # channels with subscribers but nothing stored are channels too
            held, matches = set(names), channel_matcher(req.pattern)
            names += [name for name in hub.channels if name not in held and matches(name)]
        for name in names:
            entry = entries.get_or_create(name)
            if hub is not None:
                entry.num_clients = hub.num_subscribers(name)
        return result

    # -- acting on WebSocket clients ----------------------------------------------------------

    def _connections(self, user: str, client: str) -> list[Any]:
        return self.clients.hub.find(user, client) if self.clients is not None else []

    def _subscribe(self, req: api_pb2.SubscribeRequest) -> api_pb2.SubscribeResult:
        self.state.check_channel(req.channel)
        for conn in self._connections(req.user, req.client):
            conn.server_subscribe(req.channel)
        return api_pb2.SubscribeResult()

    def _unsubscribe(self, req: api_pb2.UnsubscribeRequest) -> api_pb2.UnsubscribeResult:
        self.state.check_channel(req.channel)
        for conn in self._connections(req.user, req.client):
            conn.server_unsubscribe(req.channel, *UNSUBSCRIBE_SERVER)
        return api_pb2.UnsubscribeResult()

    def _disconnect(self, req: api_pb2.DisconnectRequest) -> api_pb2.DisconnectResult:
        code = req.disconnect.code or DISCONNECT_FORCE[0]
        reason = req.disconnect.reason or DISCONNECT_FORCE[1]
        spared = set(req.whitelist)
        for conn in self._connections(req.user, req.client):
            if conn.client_id not in spared:
                conn.disconnect(code, reason)
        return api_pb2.DisconnectResult()

    # -- Batch -----------------------------------------------------------------------------------

    async def Batch(self, request: api_pb2.BatchRequest, context: Any) -> api_pb2.BatchResponse:
        # `parallel` lets Centrifugo run commands concurrently; here they run on one thread
        # against memory, so running them in order gives every guarantee parallel gives.
        response = api_pb2.BatchResponse()
        add_reply = response.replies.add
        publish = self._publish
        for cmd in request.commands:
            reply = add_reply()
            try:
                if cmd.HasField("publish"):
                    offset, epoch = publish(cmd.publish)
                    result = reply.publish
                    result.offset, result.epoch = offset, epoch
                    result.SetInParent()
                else:
                    self._other_command(cmd, reply)
            except ApiError as err:
                reply.error.code, reply.error.message = err.code, err.message
        return response

    def _other_command(self, cmd: api_pb2.Command, reply: api_pb2.Reply) -> None:
        if cmd.HasField("broadcast"):
            reply.broadcast.CopyFrom(self._broadcast(cmd.broadcast))
        elif cmd.HasField("history"):
            reply.history.CopyFrom(self._history(cmd.history))
        elif cmd.HasField("history_remove"):
            reply.history_remove.CopyFrom(self._history_remove(cmd.history_remove))
        elif cmd.HasField("presence"):
            reply.presence.CopyFrom(self._presence(cmd.presence))
        elif cmd.HasField("presence_stats"):
            reply.presence_stats.CopyFrom(self._presence_stats(cmd.presence_stats))
        elif cmd.HasField("info"):
            reply.info.CopyFrom(self._info())
        elif cmd.HasField("channels"):
            reply.channels.CopyFrom(self._channels(cmd.channels))
        elif cmd.HasField("subscribe"):
            reply.subscribe.CopyFrom(self._subscribe(cmd.subscribe))
        elif cmd.HasField("unsubscribe"):
            reply.unsubscribe.CopyFrom(self._unsubscribe(cmd.unsubscribe))
        elif cmd.HasField("disconnect"):
            reply.disconnect.CopyFrom(self._disconnect(cmd.disconnect))
        else:
            raise ApiError(*NOT_FOUND)

    # -- unary methods ---------------------------------------------------------------------------

    async def Publish(self, request: api_pb2.PublishRequest, context: Any) -> api_pb2.PublishResponse:
        try:
            offset, epoch = self._publish(request)
        except ApiError as err:
            return await self._fail(context, err, api_pb2.PublishResponse)
        return api_pb2.PublishResponse(result=api_pb2.PublishResult(offset=offset, epoch=epoch))

    async def Broadcast(self, request: api_pb2.BroadcastRequest, context: Any) -> api_pb2.BroadcastResponse:
        try:
            return api_pb2.BroadcastResponse(result=self._broadcast(request))
        except ApiError as err:
            return await self._fail(context, err, api_pb2.BroadcastResponse)

    async def History(self, request: api_pb2.HistoryRequest, context: Any) -> api_pb2.HistoryResponse:
        try:
            return api_pb2.HistoryResponse(result=self._history(request))
        except ApiError as err:
            return await self._fail(context, err, api_pb2.HistoryResponse)

    async def HistoryRemove(self, request: api_pb2.HistoryRemoveRequest,
                            context: Any) -> api_pb2.HistoryRemoveResponse:
        try:
            return api_pb2.HistoryRemoveResponse(result=self._history_remove(request))
        except ApiError as err:
            return await self._fail(context, err, api_pb2.HistoryRemoveResponse)

    async def Presence(self, request: api_pb2.PresenceRequest, context: Any) -> api_pb2.PresenceResponse:
        try:
            return api_pb2.PresenceResponse(result=self._presence(request))
        except ApiError as err:
            return await self._fail(context, err, api_pb2.PresenceResponse)

    async def PresenceStats(self, request: api_pb2.PresenceStatsRequest,
                            context: Any) -> api_pb2.PresenceStatsResponse:
        try:
            return api_pb2.PresenceStatsResponse(result=self._presence_stats(request))
        except ApiError as err:
            return await self._fail(context, err, api_pb2.PresenceStatsResponse)

    async def Info(self, request: api_pb2.InfoRequest, context: Any) -> api_pb2.InfoResponse:
        return api_pb2.InfoResponse(result=self._info())

    async def Channels(self, request: api_pb2.ChannelsRequest, context: Any) -> api_pb2.ChannelsResponse:
        try:
            return api_pb2.ChannelsResponse(result=self._channels(request))
        except ApiError as err:
            return await self._fail(context, err, api_pb2.ChannelsResponse)

    async def Subscribe(self, request: api_pb2.SubscribeRequest, context: Any) -> api_pb2.SubscribeResponse:
        try:
            return api_pb2.SubscribeResponse(result=self._subscribe(request))
        except ApiError as err:
            return await self._fail(context, err, api_pb2.SubscribeResponse)

    async def Unsubscribe(self, request: api_pb2.UnsubscribeRequest, context: Any) -> api_pb2.UnsubscribeResponse:
        try:
            return api_pb2.UnsubscribeResponse(result=self._unsubscribe(request))
        except ApiError as err:
            return await self._fail(context, err, api_pb2.UnsubscribeResponse)

    async def Disconnect(self, request: api_pb2.DisconnectRequest, context: Any) -> api_pb2.DisconnectResponse:
        return api_pb2.DisconnectResponse(result=self._disconnect(request))
