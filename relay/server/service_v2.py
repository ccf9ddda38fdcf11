"""`api.Centrifugo`: the legacy server API of Centrifugo v2, the one the seed document uses.

Same store as the current API. Differences v2 clients can tell: Publish and Broadcast results are
empty; Broadcast answers one top-level error and publishes nothing when any channel is bad; History
has no filter (every retained publication, oldest first); Channels is a list of names.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from relay.proto.centrifugo_v2 import api_pb2, api_pb2_grpc
from relay.server.errors import BAD_REQUEST, ApiError
from relay.server.node import NodeInfo
from relay.server.service_v6 import answer_error
from relay.server.state import ServerState

ERROR_TYPE = "api.Error"
Response = TypeVar("Response")


class LegacyCentrifugoService(api_pb2_grpc.CentrifugoServicer):
    """The v2 API over a ServerState."""

    def __init__(self, state: ServerState, node: NodeInfo, *, transport_errors: bool = False) -> None:
        self.state = state
        self.node = node
        self.transport_errors = transport_errors

    async def _fail(self, context: Any, err: ApiError, make: Callable[..., Response]) -> Response:
        return await answer_error(context, err, make, api_pb2.Error, ERROR_TYPE, self.transport_errors)

    async def Publish(self, request: api_pb2.PublishRequest, context: Any) -> api_pb2.PublishResponse:
        try:
            # v2 checked data before the namespace.
            if not request.channel or not request.data:
                raise ApiError(*BAD_REQUEST)
            self.state.publish(request.channel, request.data)
        except ApiError as err:
            return await self._fail(context, err, api_pb2.PublishResponse)
        return api_pb2.PublishResponse(result=api_pb2.PublishResult())

    async def Broadcast(self, request: api_pb2.BroadcastRequest, context: Any) -> api_pb2.BroadcastResponse:
        try:
            if not request.channels or not request.data:
                raise ApiError(*BAD_REQUEST)
            for channel in request.channels:
                self.state.check_channel(channel)
            for channel in request.channels:
                self.state.publish(channel, request.data)
        except ApiError as err:
            return await self._fail(context, err, api_pb2.BroadcastResponse)
        return api_pb2.BroadcastResponse(result=api_pb2.BroadcastResult())

    async def History(self, request: api_pb2.HistoryRequest, context: Any) -> api_pb2.HistoryResponse:
        try:
            page = self.state.history(request.channel, limit=-1)
        except ApiError as err:
            return await self._fail(context, err, api_pb2.HistoryResponse)
        result = api_pb2.HistoryResult()
        add = result.publications.add
        for pub in page.publications:
            add(data=pub.data)
        return api_pb2.HistoryResponse(result=result)

    async def HistoryRemove(self, request: api_pb2.HistoryRemoveRequest,
                            context: Any) -> api_pb2.HistoryRemoveResponse:
        try:
            self.state.remove_history(request.channel)
        except ApiError as err:
            return await self._fail(context, err, api_pb2.HistoryRemoveResponse)
        return api_pb2.HistoryRemoveResponse(result=api_pb2.HistoryRemoveResult())

    async def Presence(self, request: api_pb2.PresenceRequest, context: Any) -> api_pb2.PresenceResponse:
        try:
            self.state.check_channel(request.channel)
        except ApiError as err:
            return await self._fail(context, err, api_pb2.PresenceResponse)
        return api_pb2.PresenceResponse(result=api_pb2.PresenceResult())

    async def PresenceStats(self, request: api_pb2.PresenceStatsRequest,
                            context: Any) -> api_pb2.PresenceStatsResponse:
        try:
            self.state.check_channel(request.channel)
        except ApiError as err:
            return await self._fail(context, err, api_pb2.PresenceStatsResponse)
        return api_pb2.PresenceStatsResponse(result=api_pb2.PresenceStatsResult())

    async def Channels(self, request: api_pb2.ChannelsRequest, context: Any) -> api_pb2.ChannelsResponse:
        try:
            names = self.state.channel_names()
        except ApiError as err:
            return await self._fail(context, err, api_pb2.ChannelsResponse)
        return api_pb2.ChannelsResponse(result=api_pb2.ChannelsResult(channels=names))

    async def Info(self, request: api_pb2.InfoRequest, context: Any) -> api_pb2.InfoResponse:
        result = api_pb2.InfoResult()
        self.node.fill(result.nodes.add(), self.state.num_channels)
        return api_pb2.InfoResponse(result=result)
