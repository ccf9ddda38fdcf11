"""Sinks: where publications go. Today one, Centrifugo's GRPC server API (`grpc_centrifugo.py`);
the pipeline knows only the `Sink` protocol below, so a test can give it an in-memory sink."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from relay.routing import Publication


@dataclass(slots=True, frozen=True)
class Failure:
    """A publication (or one channel of a broadcast) that Centrifugo will not take."""

    channel: str
    code: int
    message: str


# Publication index in a delivered batch → what failed for good (one entry per channel).
Failures = dict[int, list[Failure]]


class Sink(Protocol):
    """What the pipeline and the daemon need of a sink."""

    # Whether the last call reached the server, and why not when it did not.
    healthy: bool
    last_error: str

    async def start(self) -> None:
        """Open connections; nothing is sent yet."""

    async def close(self) -> None:
        """Close connections; calls under way fail."""

    async def ping(self) -> bool:
        """One round trip to the server; updates `healthy`."""

    async def deliver(self, pubs: list[Publication]) -> Failures:
        """Publish in order, retrying what is worth retrying; returns what failed for good by
        publication index (empty when everything was accepted)."""
