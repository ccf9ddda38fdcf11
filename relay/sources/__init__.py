"""Source plugins, one module per `type`, found by name: `relay/sources/<type>.py`.

A source module (or package, like `relay/sources/file/`) defines `Config` (its pydantic model, with
`type: Literal["<type>"]`), `FIELDS` (the template fields and `when` keys its messages carry) and
`build(name, config, state_dir)`, which returns a reader that relay/sources/engine.py runs (see that
module for the contract).
Nothing else lists the sources: a new module in this package is a new `type`.
"""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from relay.sources.engine import ByteBudget, Emit, Reader, SourceEngine

# Modules of this package that are not sources.
_NOT_SOURCES = frozenset({"engine"})
# Fields every message has, whatever its source.
COMMON_FIELDS = ("source",)


def _discover() -> tuple[str, ...]:
    names = [m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")]
    return tuple(sorted(n for n in names if n not in _NOT_SOURCES))


TYPES = _discover()


def _module(type_name: str) -> Any:
    return importlib.import_module(f"relay.sources.{type_name}")


def config_model(type_name: str) -> type[BaseModel]:
    model: type[BaseModel] = _module(type_name).Config
    return model


def fields(type_name: str) -> tuple[str, ...]:
    """Template fields and `when` keys that messages of this source type carry ("json.*": any
    name after the dot)."""
    declared: tuple[str, ...] = getattr(_module(type_name), "FIELDS", ())
    return COMMON_FIELDS + declared


def all_fields() -> tuple[str, ...]:
    """Every field some source type provides, each once, in a stable order."""
    return tuple(dict.fromkeys(f for t in TYPES for f in fields(t)))


def provides(available: tuple[str, ...], name: str) -> bool:
    """Whether a field `name` is among `available` (where "header.*" stands for any header.NAME)."""
    if name in available:
        return True
    head, dot, rest = name.partition(".")
    return bool(dot and rest) and f"{head}.*" in available


def describe_fields(available: tuple[str, ...]) -> str:
    """The fields as a user writes them: "seq, now, json.PATH"."""
    names = {"json.*": "json.PATH", "header.*": "header.NAME", "column.*": "column.NAME"}
    return ", ".join(names.get(f, f.replace("*", "NAME")) for f in available)


def build(name: str, config: BaseModel, state_dir: Path, budget: ByteBudget | None = None) -> SourceEngine:
    type_name: str = config.type  # type: ignore[attr-defined]  # every source Config has `type`
    reader: Reader = _module(type_name).build(name, config, state_dir)
    return SourceEngine(name, reader, budget)


__all__ = [
    "TYPES",
    "ByteBudget",
    "Emit",
    "Reader",
    "SourceEngine",
    "all_fields",
    "build",
    "config_model",
    "describe_fields",
    "fields",
    "provides",
]
