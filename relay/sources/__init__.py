"""Source plugins, one module per `type`, and the contract they share.

Each module `relay/sources/<type>.py` defines:
- `Config`: a pydantic model of its `[sources.NAME]` table (with `type: Literal["<type>"]`);
- a class implementing `Source`, built by `build(name, config, state_dir)`.

The pipeline owns batching, retries, backpressure and shutdown; a source only reads, emits, and
commits what was settled (see relay/message.py and relay/acks.py).
"""

from __future__ import annotations

import importlib
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol

from pydantic import BaseModel

from relay.message import Message

# Hands a batch of messages to the pipeline; awaiting it is the backpressure.
Emit = Callable[[list[Message]], Awaitable[None]]

TYPES = ("ticker", "file", "kafka", "postgres")


class Source(Protocol):
    name: str

    async def run(self, emit: Emit) -> None:
        """Read and emit until `stop()` is called or the input is exhausted."""

    async def stop(self) -> None:
        """Stop reading soon; `run` returns. Messages already emitted keep settling."""

    async def close(self) -> None:
        """After the pipeline drained: commit what was settled and release resources."""


def _module(type_name: str) -> Any:
    return importlib.import_module(f"relay.sources.{type_name}")


def config_model(type_name: str) -> type[BaseModel]:
    model: type[BaseModel] = _module(type_name).Config
    return model


def build(name: str, config: BaseModel, state_dir: Path) -> Source:
    type_name: str = config.type  # type: ignore[attr-defined]  # every source Config has `type`
    source: Source = _module(type_name).build(name, config, state_dir)
    return source
