"""Who is connected and subscribed where: the embedded server's WebSocket clients, over one state.

The hub keeps every client connection and, per channel, its subscribers. `ServerState` calls
`Hub.deliver` for each new publication (whoever published it: GRPC, HTTP API or a client), which
encodes the push once and queues the same frame for every subscriber, in publication order.
Presence is what the hub holds: a channel's subscribers are its presence.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

from relay.server import delta
from relay.server.client_encoding import Encoding
from relay.server.state import Position


class Connection(Protocol):
    """What the hub needs of a client connection (relay/server/client_protocol.py's Session)."""

    client_id: str
    user: str
    conn_info: bytes | None
    encoding: Encoding

    def push(self, frame: bytes) -> None:
        """Queue one message, already in the connection's encoding."""

    def server_subscribe(self, channel: str) -> None:
        """Subscribe on the server's behalf and tell the client."""

    def server_unsubscribe(self, channel: str, code: int, reason: str) -> None:
        """Drop a subscription on the server's behalf and tell the client."""

    def disconnect(self, code: int, reason: str) -> None:
        """Close the connection with a Centrifugo disconnect code."""


@dataclass(slots=True)
class Subscriber:
    """One connection's subscription to one channel."""

    connection: Connection
    chan_info: bytes | None = None
    push_join_leave: bool = False
    delta: bool = False  # asked for fossil deltas, and the namespace allows them
    delta_ready: bool = False  # has had a whole publication since subscribing: deltas may follow


@dataclass
class Hub:
    """Connections and subscriptions; presence is derived from them."""

    connections: dict[str, Connection] = field(default_factory=dict)
    channels: dict[str, dict[str, Subscriber]] = field(default_factory=dict)
    # The ClientInfo of a client publishing right now (a client publication carries `info`).
    _publisher: dict[str, Any] | None = None
    # Whether the publication being made was published with `delta`.
    _delta: bool = False
    # Whether a channel's namespace has delta_publish, and the data of a channel's publication
    # at an offset (the base of a delta): given by the server that owns the hub.
    delta_publish: Callable[[str], bool] = lambda channel: False
    previous_data: Callable[[str, int], bytes | None] = lambda channel, offset: None

    # -- connections --------------------------------------------------------------------------

    def add_connection(self, conn: Connection) -> None:
        self.connections[conn.client_id] = conn

    def remove_connection(self, conn: Connection) -> None:
        self.connections.pop(conn.client_id, None)

    def find(self, user: str = "", client: str = "") -> list[Connection]:
        """Connections of a user, or the one client id (both given: both must match)."""
        if client:
            conn = self.connections.get(client)
            return [conn] if conn is not None and (not user or conn.user == user) else []
        return [conn for conn in self.connections.values() if conn.user == user]

    @property
    def num_clients(self) -> int:
        return len(self.connections)

    @property
    def num_users(self) -> int:
        return len({conn.user for conn in self.connections.values()})

    @property
    def num_subs(self) -> int:
        return sum(len(subs) for subs in self.channels.values())

    # -- subscriptions ------------------------------------------------------------------------

    def subscribe(self, channel: str, sub: Subscriber) -> None:
        self.channels.setdefault(channel, {})[sub.connection.client_id] = sub

    def unsubscribe(self, channel: str, conn: Connection) -> None:
        subs = self.channels.get(channel)
        if subs is not None:
            subs.pop(conn.client_id, None)
            if not subs:
                del self.channels[channel]

    def is_subscribed(self, channel: str, conn: Connection) -> bool:
        return conn.client_id in self.channels.get(channel, {})

    def num_subscribers(self, channel: str) -> int:
        return len(self.channels.get(channel, {}))

    # -- presence -----------------------------------------------------------------------------

    def presence(self, channel: str) -> dict[str, dict[str, Any]]:
        """ClientInfo of each subscriber, by client id."""
        return {client: client_info(sub.connection, sub.chan_info)
                for client, sub in self.channels.get(channel, {}).items()}

    def presence_stats(self, channel: str) -> tuple[int, int]:
        """(clients, distinct users) subscribed to a channel."""
        subs = self.channels.get(channel, {})
        return len(subs), len({sub.connection.user for sub in subs.values()})

    # -- delivery -----------------------------------------------------------------------------

    @contextmanager
    def publishing_as(self, info: dict[str, Any]) -> Iterator[None]:
        """Publications made inside carry this ClientInfo (a client's own publish)."""
        self._publisher = info
        try:
            yield
        finally:
            self._publisher = None

    @contextmanager
    def delta_publishing(self, on: bool) -> Iterator[None]:
        """Publications made inside were published with `delta` (API publish's `delta` field)."""
        self._delta = on
        try:
            yield
        finally:
            self._delta = False

    def deliver(self, channel: str, data: bytes, tags: Mapping[str, str] | None, position: Position) -> None:
        """Queue a publication for every subscriber of `channel` (the state's on_publication)."""
        subs = self.channels.get(channel)
        if not subs:
            return
        pub: dict[str, Any] = {"data": data}
        offset, epoch = position
        if offset:
            pub["offset"] = offset
            if offset == 1:  # Centrifugo names the epoch in a stream's first publication
                pub["epoch"] = epoch
        if tags:
            pub["tags"] = dict(tags)
        if self._publisher is not None:
            pub["info"] = self._publisher
        plain = [sub for sub in subs.values() if not sub.delta]
        if plain:
            self._send_to(plain, {"push": {"channel": channel, "pub": pub}})
        if len(plain) < len(subs):
            use_delta = self._delta or self.delta_publish(channel)
            previous = self.previous_data(channel, offset) if use_delta and offset > 1 else None
            self._deliver_deltas(channel, pub, previous, [sub for sub in subs.values() if sub.delta])

    def _deliver_deltas(self, channel: str, pub: dict[str, Any], previous: bytes | None,
                        subs: list[Subscriber]) -> None:
        frames: dict[tuple[str, bool], bytes] = {}
        for sub in subs:
            encoding = sub.connection.encoding
            key = (encoding.name, sub.delta_ready)
            frame = frames.get(key)
            if frame is None:
                json = not encoding.binary
                shaped = delta.against(previous, pub, json) if sub.delta_ready else delta.whole(pub, json)
                frame = frames[key] = encoding.encode({"push": {"channel": channel, "pub": shaped}})
            sub.delta_ready = True
            sub.connection.push(frame)

    def join_leave(self, channel: str, kind: str, info: dict[str, Any]) -> None:
        """Push a join or leave to the subscribers that asked for them."""
        wanting = [sub for sub in self.channels.get(channel, {}).values() if sub.push_join_leave]
        self._send_to(wanting, {"push": {"channel": channel, kind: {"info": info}}})

    @staticmethod
    def _send_to(subs: Iterable[Subscriber], message: dict[str, Any]) -> None:
        """Encode once per encoding in use, queue the same bytes for every subscriber."""
        frames: dict[str, bytes] = {}
        for sub in list(subs):
            encoding = sub.connection.encoding
            frame = frames.get(encoding.name)
            if frame is None:
                frame = frames[encoding.name] = encoding.encode(message)
            sub.connection.push(frame)


def client_info(conn: Connection, chan_info: bytes | None = None) -> dict[str, Any]:
    """Centrifugo's ClientInfo of a connection (zero values left out; bytes fields as bytes)."""
    info: dict[str, Any] = {"client": conn.client_id}
    if conn.user:
        info["user"] = conn.user
    if conn.conn_info:
        info["conn_info"] = conn.conn_info
    if chan_info:
        info["chan_info"] = chan_info
    return info
