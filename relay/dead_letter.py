"""The dead letter file: one JSON object per line for every message the relay could not publish.

Lines are written and fsynced before their messages are acknowledged, so a committed source
position never hides a message that is in neither Centrifugo nor this file. Secrets never reach
it: a line holds the message, not the config.

When the file cannot be written (a full disk, a parent that is not a directory, no permission),
the lines wait in memory and their messages stay unacknowledged, so their positions are not
committed; the relay says so loudly (an ERROR line naming the file, /readyz not ready,
`relay_dead_letter_write_errors_total`) and tries again with backoff. Other publications flow on.
An attempt is all or nothing: what it wrote before failing is cut off again, so the file never
holds half a line.

Rotation: before each write the path is compared with the open file (device and inode); when it
names another file or none (moved or deleted, as logrotate does), the path is opened again.
`reopen()` (SIGUSR1) closes the file at once, so a deleted file's space is freed without waiting
for the next dead letter.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from relay import events
from relay.message import Message

log = logging.getLogger("relay.dead_letter")

RETRY_INITIAL = 0.1
RETRY_MAX = 5.0


class DeadLetterFile:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.problem = ""  # why the file cannot be written now; "" while it can
        self._fd: int | None = None
        self._identity: tuple[int, int] = (0, 0)  # (device, inode) of the open file
        self._queued: list[bytes] = []  # lines of the commit being put together
        self._waiting: deque[tuple[bytes, Callable[[], None]]] = deque()  # lines not yet durable
        self._retrying: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._failures = 0  # failed attempts in a row

    def write(self, message: Message, reason: str, *, channel: str = "", code: int = 0,
              data: bytes | None = None, channels: tuple[str, ...] = ()) -> None:
        """Queue one dead letter; `commit` writes what was queued."""
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
        self._queued.append((json.dumps(record, ensure_ascii=False) + "\n").encode())

    def commit(self, on_written: Callable[[], None]) -> None:
        """Write and fsync the queued lines, then call `on_written`: at once, or, when the file
        cannot be written now, after a retry wrote them (their messages wait until then)."""
        if not self._queued:
            on_written()
            return
        self._waiting.append((b"".join(self._queued), on_written))
        self._queued = []
        if self._retrying is None:
            self._write_waiting()

    def reopen(self) -> None:
        """Close the file now and open the path again for the next line (SIGUSR1, after rotation)."""
        self._close()
        self._wake.set()  # a retry waiting for its backoff tries again now

    def close(self) -> None:
        """Close the file; lines still waiting are dropped, their messages never acknowledged (they
        are read again after a restart)."""
        if self._retrying is not None:
            self._retrying.cancel()
            self._retrying = None
        self._waiting.clear()
        self._close()

    # -- writing -----------------------------------------------------------------------------

    def _write_waiting(self) -> bool:
        """Try once to make every waiting line durable; on failure start (or keep) retrying."""
        fd, size = -1, -1
        try:
            fd = self._open()
            size = os.fstat(fd).st_size
            for data, _ in self._waiting:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
            os.fsync(fd)
        except OSError as err:
            if size >= 0:
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, size)  # no half-written line stays behind
            self._close()
            self._failed(err)
            return False
        done = list(self._waiting)
        self._waiting.clear()
        self._retrying = None  # a retry that got here ends now
        if self.problem:
            events.DeadLetterWriteRecovered(str(self.path), sum(d.count(b"\n") for d, _ in done),
                                            self._failures).emit()
            self.problem, self._failures = "", 0
        for _, on_written in done:
            on_written()
        return True

    def _open(self) -> int:
        if self._fd is not None and self._identity != _identity_of(self.path):
            log.info("dead letter file %s was moved or deleted; opening it again", self.path)
            self._close()
        if self._fd is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            created = not self.path.exists()
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o666)
            stat = os.fstat(fd)
            self._fd, self._identity = fd, (stat.st_dev, stat.st_ino)
            if created:
                _fsync_directory(self.path.parent)  # the new name survives a power loss too
        return self._fd

    def _close(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None

    def _failed(self, err: OSError) -> None:
        self.problem = f"cannot write dead letters to {self.path}: {err.strerror or err}"
        self._failures += 1
        lines = sum(data.count(b"\n") for data, _ in self._waiting)
        events.DeadLetterWriteFailed(self.problem, lines, self._failures).emit()
        if self._retrying is None:
            self._retrying = asyncio.get_running_loop().create_task(self._retry(), name="dead-letter-retry")

    async def _retry(self) -> None:
        delay = RETRY_INITIAL
        while True:
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), delay)
            if self._write_waiting():
                return
            delay = min(delay * 2, RETRY_MAX)


def _identity_of(path: Path) -> tuple[int, int]:
    """(device, inode) of the file the path names now; (0, 0) when it names none."""
    try:
        stat = os.stat(path)
    except OSError:
        return (0, 0)
    return (stat.st_dev, stat.st_ino)


def _fsync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
