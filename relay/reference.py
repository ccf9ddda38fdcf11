"""The README's option tables, made from the config models' field descriptions.

One source of truth for what an option means: the pydantic `Field(description=...)` next to the
code that uses it. `python -m relay.reference` prints the tables; tests/test_reference.py fails when
README.md's copy is out of date (`make docs` rewrites it).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from relay import sources

BEGIN = "<!-- options:{name} -->"
END = "<!-- /options:{name} -->"


def _default(info: Any) -> str:
    if info.default is PydanticUndefined:
        return "required" if info.default_factory is None else ""
    value = info.default
    if value is None or isinstance(value, BaseModel):
        return ""
    if isinstance(value, float) and info.metadata:  # durations are floats of seconds
        from relay.units import format_duration
        return f'"{format_duration(value)}"'
    if isinstance(value, str) and '"' in value:
        return f"'{value}'"
    return json.dumps(value)


def _submodel(info: Any) -> type[BaseModel] | None:
    candidates = [info.annotation, *getattr(info.annotation, "__args__", ())]
    for candidate in candidates:
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _rows(model: type[BaseModel], prefix: str = "") -> list[str]:
    rows = []
    for name, info in model.model_fields.items():
        if name == "type":
            continue
        key = prefix + (info.alias or name)
        sub = _submodel(info)
        if sub is not None:
            rows.extend(_rows(sub, key + "."))
            continue
        text = (info.description or "").replace("|", "\\|").replace("\n", " ")
        default = _default(info).replace("|", "\\|")
        rows.append(f"| `{key}` | {default} | {text} |")
    return rows


def table(model: type[BaseModel]) -> str:
    return "\n".join(["| key | default | what it does |", "|---|---|---|", *_rows(model)])


def tables() -> dict[str, str]:
    from relay.config import ServerSection  # relay.config reads the sources' models too

    out = {name: table(sources.config_model(name)) for name in sources.TYPES}
    out["server"] = table(ServerSection)
    return out


def rewrite(readme: str) -> str:
    for name, text in tables().items():
        begin, end = BEGIN.format(name=name), END.format(name=name)
        pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.DOTALL)
        if not pattern.search(readme):
            raise ValueError(f"README.md has no {begin} … {end} block")
        readme = pattern.sub(lambda _: f"{begin}\n{text}\n{end}", readme)  # noqa: B023
    return readme


def main() -> None:
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("README.md")
    path.write_text(rewrite(path.read_text()))


if __name__ == "__main__":
    main()
