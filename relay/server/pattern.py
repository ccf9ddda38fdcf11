"""Channel patterns of the Channels method: glob syntax as Centrifugo reads it (gobwas/glob).

`*` any run of characters, `?` one character, `[abc]` / `[a-z]` / `[!abc]` a class, `{a,b}`
alternatives, `\\` escapes the next character. An empty pattern matches every channel.
"""

from __future__ import annotations

import re
from collections.abc import Callable


def _translate(pattern: str) -> str:
    out: list[str] = []
    depth = 0
    i = 0
    while i < len(pattern):
        char = pattern[i]
        i += 1
        if char == "\\" and i < len(pattern):
            out.append(re.escape(pattern[i]))
            i += 1
        elif char == "*":
            out.append(".*")
        elif char == "?":
            out.append(".")
        elif char == "[":
            end = pattern.find("]", i + 1)
            if end < 0:
                out.append(re.escape(char))
                continue
            body = pattern[i:end]
            i = end + 1
            negate = body.startswith("!")
            body = body[1:] if negate else body
            escaped = "".join("\\" + c if c in "\\^[]" else c for c in body)
            out.append(f"[{'^' if negate else ''}{escaped}]")
        elif char == "{":
            depth += 1
            out.append("(?:")
        elif char == "}" and depth:
            depth -= 1
            out.append(")")
        elif char == "," and depth:
            out.append("|")
        else:
            out.append(re.escape(char))
    out.extend(")" * depth)
    return "".join(out)


def channel_matcher(pattern: str) -> Callable[[str], bool]:
    """A predicate telling whether a channel name matches `pattern`."""
    if not pattern:
        return lambda _channel: True
    try:
        compiled = re.compile(_translate(pattern), re.DOTALL)
    except re.error:
        # A pattern that cannot be read matches only itself, literally.
        return lambda channel: channel == pattern
    return lambda channel: compiled.fullmatch(channel) is not None
