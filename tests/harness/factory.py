"""Factory fixtures' shared lifecycle: start servers on demand, each in its own folder, and stop
every one of them when the test ends."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol, TypeVar


class Stoppable(Protocol):
    def stop(self) -> Any: ...


S = TypeVar("S", bound=Stoppable)


def servers_stopped_after(start: Callable[..., S], folder: Path, prefix: str) -> Iterator[Callable[..., S]]:
    """Yield `make(**options)`, which starts `start(folder/prefix-N, **options)`; stop all at the end."""
    servers: list[S] = []

    def make(**options: Any) -> S:
        server = start(folder / f"{prefix}-{len(servers)}", **options)
        servers.append(server)
        return server

    try:
        yield make
    finally:
        for server in servers:
            server.stop()
