"""Vector-style `{{ name }}` templates for channels, data and tags.

JSON braces need no escaping: only `{{` ... `}}` around a field name is a placeholder. Field names
are checked when the config is read, so a typo is a config error and not a dead letter per message.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

PLACEHOLDER = re.compile(r"\{\{\s*([^{}]*?)\s*\}\}")
_FIELD_PART = re.compile(r"^[A-Za-z0-9_\-]+$")


class TemplateError(ValueError):
    """A template that cannot be compiled (config time) or filled (message time)."""


def check_field(name: str) -> None:
    """A field some source provides (relay/sources/<type>.py FIELDS), spelled right; whether the
    route's own source provides it is checked with the whole config (relay/config.py)."""
    from relay import sources  # sources' configs compile templates: import at call time
    known = sources.all_fields()
    head, dot, rest = name.partition(".")
    if dot and f"{head}.*" in known:
        parts = rest.split(".") if head == "json" else [rest]
        if all(_FIELD_PART.match(p) for p in parts):
            return
        raise TemplateError(f"bad field name {{{{ {name} }}}}")
    if name in known:
        return
    raise TemplateError(f"unknown template field {{{{ {name} }}}} (known: {sources.describe_fields(known)})")


@dataclass(frozen=True, slots=True)
class Template:
    """A compiled template: literal text split around field names."""

    source: str
    literals: tuple[str, ...]
    fields: tuple[str, ...]

    @classmethod
    def compile(cls, text: str) -> Template:
        literals: list[str] = []
        fields: list[str] = []
        pos = 0
        for match in PLACEHOLDER.finditer(text):
            name = match.group(1)
            if not name:
                raise TemplateError(f"empty placeholder in {text!r}")
            check_field(name)
            literals.append(text[pos:match.start()])
            fields.append(name)
            pos = match.end()
        rest = text[pos:]
        if "{{" in rest or "}}" in rest:
            raise TemplateError(f"unbalanced {{{{ }}}} in {text!r}")
        literals.append(rest)
        return cls(text, tuple(literals), tuple(fields))

    @property
    def is_constant(self) -> bool:
        return not self.fields

    def render(self, lookup: Callable[[str], str | None], limit: int | None = None) -> str:
        """Fill the template; `lookup` returns None for a field the message does not have.

        With `limit`, a result longer than that many bytes (UTF-8) is a TemplateError, raised as
        soon as it is certain, so a field repeated in a template cannot build a huge string.
        """
        if not self.fields:
            text = self.literals[0]
        elif len(self.fields) == 1:  # the common `chat:{{ key }}`: no list, no join
            value = lookup(self.fields[0])
            if value is None:
                raise TemplateError(f"template {self.source!r}: message has no {self.fields[0]!r}")
            text = self.literals[0] + value + self.literals[1]
            if limit is not None and len(text) > limit:
                raise self._too_long(limit)
        else:
            out = [self.literals[0]]
            length = len(self.literals[0])
            for name, literal in zip(self.fields, self.literals[1:], strict=True):
                value = lookup(name)
                if value is None:
                    raise TemplateError(f"template {self.source!r}: message has no {name!r}")
                out.append(value)
                out.append(literal)
                length += len(value) + len(literal)
                if limit is not None and length > limit:  # characters: each is at least one byte
                    raise self._too_long(limit)
            text = "".join(out)
        if limit is not None and len(text) * 4 > limit and len(text.encode()) > limit:
            raise self._too_long(limit)
        return text

    def _too_long(self, limit: int) -> TemplateError:
        return TemplateError(f"template {self.source[:80]!r} renders longer than {limit} bytes")
