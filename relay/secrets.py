"""Secrets come from environment variables (`*_env`) or files (`*_file`), never from the config text.

A `Secret` hides its value from repr/str/format so it cannot reach a log line or `relay check` by
accident; code that needs the value asks for `.reveal()`. As a second line of defence every secret
value the process has loaded is remembered, and `redact()` (used by the log formatter and the fatal
error line) blanks it out of any text, so a library that echoes its settings, or an exception that
quotes a header, still cannot leak one.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path

REDACTED = "***"
# Shorter values are not blanked out of text: they would match everywhere and hide nothing.
MIN_REDACTED_LENGTH = 4

_known: set[str] = set()
_known_lock = threading.Lock()
# Longest first, so a secret that contains another is blanked out whole.
_patterns: tuple[str, ...] = ()


def _remember(value: str) -> None:
    global _patterns
    if len(value) < MIN_REDACTED_LENGTH or value in _known:
        return
    with _known_lock:
        _known.add(value)
        forms: set[str] = set()
        for known in _known:
            # As it is, as repr() writes it (a dict or a bytes value in a message), and each of those
            # as a JSON string holds it (a JSON log line escapes quotes, backslashes, control characters).
            written = {known, repr(known)[1:-1], repr(known.encode())[2:-1]}
            forms |= written
            forms.update(json.dumps(w, ensure_ascii=False)[1:-1] for w in written)
            forms.update(json.dumps(w)[1:-1] for w in written)
        _patterns = tuple(sorted((f for f in forms if len(f) >= MIN_REDACTED_LENGTH), key=len, reverse=True))


def redact(text: str) -> str:
    """`text` with every secret this process has loaded replaced by ***."""
    for value in _patterns:
        if value in text:
            text = text.replace(value, REDACTED)
    return text


class Secret:
    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value
        _remember(value)

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
    """A secret or credential named by the config could not be read (names the variable or file,
    never a value)."""


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
        except UnicodeDecodeError:
            raise SecretError(f"secret file {file} is not UTF-8 text") from None
        return Secret(value) if value else None
    if env:
        value = os.environ.get(env, "")
        return Secret(value) if value else None
    return None


class RedactingFormatter(logging.Formatter):
    """Wraps a formatter and blanks every known secret out of what it writes (message, fields,
    tracebacks), whatever logger the record came from."""

    def __init__(self, inner: logging.Formatter) -> None:
        super().__init__()
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        return redact(self.inner.format(record))
