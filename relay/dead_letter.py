"""The dead letter file: one JSON object per line for every message the relay could not publish.

A line is flushed and fsynced before the message is acknowledged, so a committed source position
never hides a message that is in neither Centrifugo nor this file. Secrets never reach it: a line
holds the message, not the config.
"""

from __future__ import annotations

import base64
import json
import os
import time
from pathlib import Path
from typing import IO, Any

from relay.message import Message


class DeadLetterFile:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: IO[str] | None = None
        self._dirty = False

    def _open(self) -> IO[str]:
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - kept open for appends
        return self._file

    def write(self, message: Message, reason: str, *, channel: str = "", code: int = 0,
              data: bytes | None = None, channels: tuple[str, ...] = ()) -> None:
        """Append one dead letter (buffered until `flush`)."""
        payload = message.data if data is None else data
        record: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "source": message.source,
            "position": message.position,
            "channel": channel,
            **({"channels": list(channels)} if len(channels) > 1 else {}),
            "error_code": code,
            "reason": reason,
        }
        if message.key is not None:
            record["key"] = message.key
        try:
            record["data"] = payload.decode("utf-8")
        except UnicodeDecodeError:
            record["data_base64"] = base64.b64encode(payload).decode()
        self._open().write(json.dumps(record, ensure_ascii=False) + "\n")
        self._dirty = True

    def flush(self) -> None:
        """Make every written line durable; called before the messages are acknowledged."""
        if self._file is not None and self._dirty:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._dirty = False

    def close(self) -> None:
        if self._file is not None:
            self.flush()
            self._file.close()
            self._file = None
