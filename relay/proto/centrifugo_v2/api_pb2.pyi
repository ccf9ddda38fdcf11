from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Error(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class ClientInfo(_message.Message):
    __slots__ = ("user", "client", "conn_info", "chan_info")
    USER_FIELD_NUMBER: _ClassVar[int]
    CLIENT_FIELD_NUMBER: _ClassVar[int]
    CONN_INFO_FIELD_NUMBER: _ClassVar[int]
    CHAN_INFO_FIELD_NUMBER: _ClassVar[int]
    user: str
    client: str
    conn_info: bytes
    chan_info: bytes
    def __init__(self, user: _Optional[str] = ..., client: _Optional[str] = ..., conn_info: _Optional[bytes] = ..., chan_info: _Optional[bytes] = ...) -> None: ...

class Publication(_message.Message):
    __slots__ = ("uid", "data", "info")
    UID_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    INFO_FIELD_NUMBER: _ClassVar[int]
    uid: str
    data: bytes
    info: ClientInfo
    def __init__(self, uid: _Optional[str] = ..., data: _Optional[bytes] = ..., info: _Optional[_Union[ClientInfo, _Mapping]] = ...) -> None: ...

class PublishRequest(_message.Message):
    __slots__ = ("channel", "data")
    CHANNEL_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    channel: str
    data: bytes
    def __init__(self, channel: _Optional[str] = ..., data: _Optional[bytes] = ...) -> None: ...

class PublishResponse(_message.Message):
    __slots__ = ("error", "result")
    ERROR_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    error: Error
    result: PublishResult
    def __init__(self, error: _Optional[_Union[Error, _Mapping]] = ..., result: _Optional[_Union[PublishResult, _Mapping]] = ...) -> None: ...

class PublishResult(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class BroadcastRequest(_message.Message):
    __slots__ = ("channels", "data")
    CHANNELS_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    channels: _containers.RepeatedScalarFieldContainer[str]
    data: bytes
    def __init__(self, channels: _Optional[_Iterable[str]] = ..., data: _Optional[bytes] = ...) -> None: ...

class BroadcastResponse(_message.Message):
    __slots__ = ("error", "result")
    ERROR_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    error: Error
    result: BroadcastResult
    def __init__(self, error: _Optional[_Union[Error, _Mapping]] = ..., result: _Optional[_Union[BroadcastResult, _Mapping]] = ...) -> None: ...

class BroadcastResult(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PresenceRequest(_message.Message):
    __slots__ = ("channel",)
    CHANNEL_FIELD_NUMBER: _ClassVar[int]
    channel: str
    def __init__(self, channel: _Optional[str] = ...) -> None: ...

class PresenceResponse(_message.Message):
    __slots__ = ("error", "result")
    ERROR_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    error: Error
    result: PresenceResult
    def __init__(self, error: _Optional[_Union[Error, _Mapping]] = ..., result: _Optional[_Union[PresenceResult, _Mapping]] = ...) -> None: ...

class PresenceResult(_message.Message):
    __slots__ = ("presence",)
    class PresenceEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: ClientInfo
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[ClientInfo, _Mapping]] = ...) -> None: ...
    PRESENCE_FIELD_NUMBER: _ClassVar[int]
    presence: _containers.MessageMap[str, ClientInfo]
    def __init__(self, presence: _Optional[_Mapping[str, ClientInfo]] = ...) -> None: ...

class PresenceStatsRequest(_message.Message):
    __slots__ = ("channel",)
    CHANNEL_FIELD_NUMBER: _ClassVar[int]
    channel: str
    def __init__(self, channel: _Optional[str] = ...) -> None: ...

class PresenceStatsResponse(_message.Message):
    __slots__ = ("error", "result")
    ERROR_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    error: Error
    result: PresenceStatsResult
    def __init__(self, error: _Optional[_Union[Error, _Mapping]] = ..., result: _Optional[_Union[PresenceStatsResult, _Mapping]] = ...) -> None: ...

class PresenceStatsResult(_message.Message):
    __slots__ = ("num_clients", "num_users")
    NUM_CLIENTS_FIELD_NUMBER: _ClassVar[int]
    NUM_USERS_FIELD_NUMBER: _ClassVar[int]
    num_clients: int
    num_users: int
    def __init__(self, num_clients: _Optional[int] = ..., num_users: _Optional[int] = ...) -> None: ...

class HistoryRequest(_message.Message):
    __slots__ = ("channel",)
    CHANNEL_FIELD_NUMBER: _ClassVar[int]
    channel: str
    def __init__(self, channel: _Optional[str] = ...) -> None: ...

class HistoryResponse(_message.Message):
    __slots__ = ("error", "result")
    ERROR_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    error: Error
    result: HistoryResult
    def __init__(self, error: _Optional[_Union[Error, _Mapping]] = ..., result: _Optional[_Union[HistoryResult, _Mapping]] = ...) -> None: ...

class HistoryResult(_message.Message):
    __slots__ = ("publications",)
    PUBLICATIONS_FIELD_NUMBER: _ClassVar[int]
    publications: _containers.RepeatedCompositeFieldContainer[Publication]
    def __init__(self, publications: _Optional[_Iterable[_Union[Publication, _Mapping]]] = ...) -> None: ...

class HistoryRemoveRequest(_message.Message):
    __slots__ = ("channel",)
    CHANNEL_FIELD_NUMBER: _ClassVar[int]
    channel: str
    def __init__(self, channel: _Optional[str] = ...) -> None: ...

class HistoryRemoveResponse(_message.Message):
    __slots__ = ("error", "result")
    ERROR_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    error: Error
    result: HistoryRemoveResult
    def __init__(self, error: _Optional[_Union[Error, _Mapping]] = ..., result: _Optional[_Union[HistoryRemoveResult, _Mapping]] = ...) -> None: ...

class HistoryRemoveResult(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ChannelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ChannelsResponse(_message.Message):
    __slots__ = ("error", "result")
    ERROR_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    error: Error
    result: ChannelsResult
    def __init__(self, error: _Optional[_Union[Error, _Mapping]] = ..., result: _Optional[_Union[ChannelsResult, _Mapping]] = ...) -> None: ...

class ChannelsResult(_message.Message):
    __slots__ = ("channels",)
    CHANNELS_FIELD_NUMBER: _ClassVar[int]
    channels: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, channels: _Optional[_Iterable[str]] = ...) -> None: ...

class InfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class InfoResponse(_message.Message):
    __slots__ = ("error", "result")
    ERROR_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    error: Error
    result: InfoResult
    def __init__(self, error: _Optional[_Union[Error, _Mapping]] = ..., result: _Optional[_Union[InfoResult, _Mapping]] = ...) -> None: ...

class InfoResult(_message.Message):
    __slots__ = ("nodes",)
    NODES_FIELD_NUMBER: _ClassVar[int]
    nodes: _containers.RepeatedCompositeFieldContainer[NodeResult]
    def __init__(self, nodes: _Optional[_Iterable[_Union[NodeResult, _Mapping]]] = ...) -> None: ...

class NodeResult(_message.Message):
    __slots__ = ("uid", "name", "version", "num_clients", "num_users", "num_channels", "uptime", "metrics")
    UID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    NUM_CLIENTS_FIELD_NUMBER: _ClassVar[int]
    NUM_USERS_FIELD_NUMBER: _ClassVar[int]
    NUM_CHANNELS_FIELD_NUMBER: _ClassVar[int]
    UPTIME_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    uid: str
    name: str
    version: str
    num_clients: int
    num_users: int
    num_channels: int
    uptime: int
    metrics: Metrics
    def __init__(self, uid: _Optional[str] = ..., name: _Optional[str] = ..., version: _Optional[str] = ..., num_clients: _Optional[int] = ..., num_users: _Optional[int] = ..., num_channels: _Optional[int] = ..., uptime: _Optional[int] = ..., metrics: _Optional[_Union[Metrics, _Mapping]] = ...) -> None: ...

class Metrics(_message.Message):
    __slots__ = ("interval", "items")
    class ItemsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    INTERVAL_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    interval: float
    items: _containers.ScalarMap[str, float]
    def __init__(self, interval: _Optional[float] = ..., items: _Optional[_Mapping[str, float]] = ...) -> None: ...
