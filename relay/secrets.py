"""Secrets come from environment variables (`*_env`) or files (`*_file`), never from the config text.

A `Secret` hides its value from repr/str/format so it cannot reach a log line or `relay check` by
accident; code that needs the value asks for `.reveal()`.
"""

from __future__ import annotations

import os
from pathlib import Path

REDACTED = "***"


class Secret:
    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return f"Secret({REDACTED})"

    __str__ = __repr__

    def __format__(self, spec: str) -> str:
        return repr(self)

    def __bool__(self) -> bool:
        return bool(self._value)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


class SecretError(ValueError):
    """A secret named by the config could not be read (names the variable or file, never a value)."""


def load_secret(env: str = "", file: str = "") -> Secret | None:
    """The secret named by an environment variable or a file; None when neither is set.

    An unset or empty variable means "no secret" (SPEC: no key = no auth); a named file that
    cannot be read is an error, since the user clearly meant to supply one.
    """
    if file:
        try:
            value = Path(file).read_text().strip()
        except OSError as err:
            raise SecretError(f"cannot read secret file {file}: {err.strerror}") from None
        return Secret(value) if value else None
    if env:
        value = os.environ.get(env, "")
        return Secret(value) if value else None
    return None
