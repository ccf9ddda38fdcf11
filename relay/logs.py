"""Logging to stderr (journald picks it up): plain text, or one JSON object per line.

A JSON line always has `time` (RFC 3339 UTC, milliseconds), `level`, `component` (the part of the
relay that speaks: daemon, pipeline, sink, source.NAME ...), `message` and `fields` (the structured
values passed with `extra=`, e.g. source, position, reason; `{}` when there are none), so a log
pipeline can parse every line the same way. Text lines carry the same fields as `key=value`.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

from relay.secrets import RedactingFormatter

# Attributes every LogRecord has; anything else passed through `extra=` is a structured field.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "taskName"}


def component(record: logging.LogRecord) -> str:
    """`relay.sink` → `sink`; the root `relay` logger is the daemon; other libraries keep their name."""
    if record.name == "relay":
        return "daemon"
    return record.name.removeprefix("relay.")


def fields(record: logging.LogRecord) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in vars(record).items():
        if key in _STANDARD or key.startswith("_"):
            continue
        out[key] = value if isinstance(value, (str, int, float, bool, type(None))) else str(value)
    return out


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "component": component(record),
            "message": record.getMessage(),
            "fields": fields(record),
        }
        if record.exc_info:
            entry["fields"]["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = f"{self.formatTime(record)} {record.levelname} {component(record)}: {record.getMessage()}"
        extra = fields(record)
        if extra:
            line += " " + " ".join(f"{key}={_text_value(value)}" for key, value in extra.items())
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def _text_value(value: Any) -> str:
    text = str(value)
    return json.dumps(text) if (not text or any(c in text for c in ' ="\n')) else text


def setup(level: str = "info", fmt: str = "text") -> None:
    """Route every log record to stderr in `fmt`; safe to call again (a reload may change both)."""
    handler = logging.StreamHandler(sys.stderr)
    # Every line, whichever library logs it, passes the secret filter last (relay/secrets.py).
    handler.setFormatter(RedactingFormatter(JsonFormatter() if fmt == "json" else TextFormatter()))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Libraries are chatty; keep their noise at warning unless they fail, or unless debug was asked
    # for: then they are what is being looked into (secrets are blanked out of their lines too).
    library_level = root.level if root.level <= logging.DEBUG else max(logging.WARNING, root.level)
    for noisy in ("aiokafka", "kafka", "grpc", "asyncio", "watchfiles"):
        logging.getLogger(noisy).setLevel(library_level)
