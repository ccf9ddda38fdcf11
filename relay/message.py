"""The message envelope: the one type every source emits and the pipeline routes.

A message carries its source position (`stream` and `offset`) and an acknowledgement callback.
The pipeline calls `settle()` once every publication made from the message was accepted by
Centrifugo or written to the dead letter file; only then may the source commit that position.
Sources never learn which sink delivered; the sink never learns what a source is.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from relay.centrifugo_records import CentrifugoRecord, PlainRecord

Ack = Callable[["Message"], None]
# The headers or attributes of a message that has none: one shared, read-only mapping, not a dict each.
NOTHING: Mapping[str, Any] = MappingProxyType({})


def _no_ack(_: Message) -> None:
    return None


@dataclass(slots=True, eq=False)
class Message:
    """One record from a source.

    `stream` names the ordered sequence the message belongs to within its source (a Kafka
    "topic/partition", a file identity, "" for the ticker); `offset` is its position there.
    Order is kept per (source, stream) all the way to every channel.
    """

    source: str
    data: bytes
    stream: str = ""
    offset: int = 0
    key: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    # Template fields a route may use besides key/headers/json: topic, partition, file.path, seq ...
    attributes: Mapping[str, Any] = field(default_factory=dict)
    read_at: float = field(default_factory=time.monotonic)
    # A record in Centrifugo's own consumer format, read by the source (relay/centrifugo_records.py,
    # a CentrifugoRecord, or a PlainRecord pair when it is the common one): it names its channels
    # itself and no route applies.
    record: CentrifugoRecord | PlainRecord | None = None
    # Why the source could not read this message (a dead letter says so); "" when it could.
    error: str = ""
    # Set by the engine and the pipeline, never by a source (last, so a source's hot loop can pass
    # everything above by position: keyword arguments cost a third of building a message).
    on_settled: Ack = _no_ack
    # Publications made from this message that are not yet settled (set by the pipeline).
    pending: int = 0

    @property
    def position(self) -> str:
        """A stable, printable source position; idempotency keys derive from it."""
        return self.position_key("")

    def position_key(self, suffix: str) -> str:
        """An idempotency key: `position` and `suffix` (which says what made it of this message),
        in one formatting (this runs for every publication)."""
        if self.stream:
            return f"{self.source}/{self.stream}/{self.offset}{suffix}"
        return f"{self.source}/{self.offset}{suffix}"

    def settle(self) -> None:
        """Called by the pipeline when nothing more is owed for this message."""
        self.on_settled(self)
