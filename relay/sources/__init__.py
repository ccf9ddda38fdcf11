"""Source plugins, one module per `type`, found by name: `relay/sources/<type>.py`.

A source module defines `Config` (its pydantic model, with `type: Literal["<type>"]`), `FIELDS`
(the template fields and `when` keys its messages carry) and `build(name, config, state_dir)`,
which returns a reader that relay/sources/engine.py runs (see that module for the contract).
Nothing else lists the sources: a new module in this package is a new `type`.
"""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path
from typing import Any, Protocol

from pydantic import BaseModel

from relay.sources.engine import ByteBudget, Emit, Reader, SourceEngine, chunked

# Modules of this package that are not sources.
_NOT_SOURCES = frozenset({"engine"})
# Fields every message has, whatever its source.
COMMON_FIELDS = ("source",)


def _discover() -> tuple[str, ...]:
    names = [m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")]
    return tuple(sorted(n for n in names if n not in _NOT_SOURCES))


TYPES = _discover()


class Source(Protocol):
    """What the daemon runs for one `[sources.NAME]`: a `SourceEngine` (or, until the file source
    moves onto the engine, a source that runs its own loop)."""

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


def fields(type_name: str) -> tuple[str, ...]:
    """Template fields and `when` keys that messages of this source type carry."""
    declared: tuple[str, ...] = getattr(_module(type_name), "FIELDS", ())
    return COMMON_FIELDS + declared


def build(name: str, config: BaseModel, state_dir: Path, budget: ByteBudget | None = None) -> Source:
    type_name: str = config.type  # type: ignore[attr-defined]  # every source Config has `type`
    built = _module(type_name).build(name, config, state_dir)
    if isinstance(built, Reader):
        return SourceEngine(name, built, budget)
    source: Source = built
    return source


__all__ = ["TYPES", "ByteBudget", "Emit", "Reader", "Source", "SourceEngine", "build", "chunked",
           "config_model", "fields"]
