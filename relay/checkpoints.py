"""A source's committed positions in one JSON file in `state_dir`, replaced atomically.

The file is written to a temporary file in the same directory, fsynced, renamed over the old one
and the directory fsynced, so after a crash (kill -9, power loss) it holds either the old or the
new state, never a torn one. A source stores only positions that were settled, so the file is
never ahead of delivery.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from relay import metrics

log = logging.getLogger("relay.checkpoints")

VERSION = 1


class Checkpoints:
    """Entries (JSON objects) by key, loaded once and saved whole when something changed."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.entries: dict[str, dict[str, Any]] = {}
        # False until `load` found a file: a first start, where a source may apply its start policy.
        self.existed = False
        self.writes = 0
        self._dirty = False
        self._lock = asyncio.Lock()

    def load(self) -> None:
        """Read the file if there is one. An unreadable file is moved aside, never silently reused."""
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return
        self.existed = True
        try:
            document = json.loads(text)
            entries = document["entries"]
            if not isinstance(entries, dict):
                raise ValueError("entries is not an object")
            self.entries = {str(k): dict(v) for k, v in entries.items()}
        except (ValueError, KeyError, TypeError) as err:
            aside = self.path.with_name(f"{self.path.name}.corrupt-{int(time.time())}")
            os.replace(self.path, aside)
            # existed stays True: positions are unknown, so files are read from the beginning.
            log.error("checkpoint file %s is unreadable (%s); moved to %s, starting without it",
                      self.path, err, aside)

    def get(self, key: str) -> dict[str, Any] | None:
        return self.entries.get(key)

    def put(self, key: str, entry: dict[str, Any]) -> None:
        if self.entries.get(key) != entry:
            self.entries[key] = entry
            self._dirty = True

    def remove(self, key: str) -> None:
        if self.entries.pop(key, None) is not None:
            self._dirty = True

    @property
    def dirty(self) -> bool:
        return self._dirty

    def _document(self) -> str:
        return json.dumps({"version": VERSION, "written_at": time.time(), "entries": self.entries},
                          separators=(",", ":"), sort_keys=True)

    def write(self) -> bool:
        """Save now if anything changed (blocking); True if the file was written."""
        if not self._dirty:
            return False
        self._dirty = False
        try:
            _replace_atomically(self.path, self._document())
        except BaseException:
            self._dirty = True
            raise
        self._written()
        return True

    async def flush(self) -> bool:
        """Save if anything changed, the disk work in a thread; writes never overlap."""
        async with self._lock:
            if not self._dirty:
                return False
            self._dirty = False
            text = self._document()
            try:
                await asyncio.to_thread(_replace_atomically, self.path, text)
            except BaseException:
                self._dirty = True
                raise
            self._written()
            return True

    def _written(self) -> None:
        self.writes += 1
        metrics.FILE_CHECKPOINTS.inc()


def _replace_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)



def instance_id(path: Path) -> str:
    """A random id made once per state directory and kept in `path`.

    Positions restart from zero when state is lost (a new state_dir) while the things they point
    into can look the same (a new file on a reused inode with the same first bytes). Putting this
    id into idempotency keys keeps a fresh start from colliding with keys Centrifugo still
    remembers from before, which would silently drop new lines. It lives in its own file, written
    before any position is used, so a crash or an unreadable checkpoint file does not change it.
    """
    try:
        value = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        value = ""
    if not value:
        value = uuid.uuid4().hex[:8]
        _replace_atomically(path, value + "\n")
    return value
