"""A source's committed positions in one JSON file in `state_dir`, replaced atomically.

The file is written to a temporary file in the same directory, fsynced, renamed over the old one
and the directory fsynced, so after a crash (kill -9, power loss) it holds either the old or the
new state, never a torn one. A source stores only positions that were settled, so the file is
never ahead of delivery.

A file is validated as strictly as the config: the document by `Document`, each entry by the
model the source names for its key. One that is not valid JSON or not of that shape is moved aside
(`.corrupt-TIME`) with one WARNING naming the first problem, and the source starts without it.
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
from collections.abc import Callable
from pathlib import Path
from typing import Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from relay import events

log = logging.getLogger("relay.checkpoints")

VERSION = 1

Entry = TypeVar("Entry", bound=BaseModel)


class Document(BaseModel):
    """The file as a whole; the entries are checked one by one with the source's own models."""

    model_config = ConfigDict(extra="forbid", strict=True)

    version: Literal[1] = 1
    written_at: float = Field(0.0, ge=0)
    entries: dict[str, dict[str, Any]]


class BadCheckpoint(ValueError):
    """A checkpoint file that is not what the source wrote: where and what, in one line."""


def _first_error(err: ValidationError, prefix: str = "") -> str:
    first = err.errors()[0]
    where = ".".join(str(part) for part in first["loc"])
    where = f"{prefix}.{where}" if prefix and where else (prefix or where)
    return f"{where}: {first['msg']}" if where else str(first["msg"])


def parse(text: str, model_for: Callable[[str], type[Entry] | None]) -> dict[str, Entry]:
    """The entries of a checkpoint file, each validated by `model_for(key)` (None: not a valid key).

    Raises BadCheckpoint naming the first problem, as a config error names its key."""
    try:
        raw = json.loads(text)
    except (ValueError, RecursionError) as err:
        raise BadCheckpoint(f"not JSON: {err}") from None
    try:
        document = Document.model_validate(raw)
    except ValidationError as err:
        raise BadCheckpoint(_first_error(err)) from None
    entries: dict[str, Entry] = {}
    for key, value in document.entries.items():
        model = model_for(key)
        if model is None:
            raise BadCheckpoint(f"entries.{key}: not a key this source writes")
        try:
            entries[key] = model.model_validate(value)
        except ValidationError as err:
            raise BadCheckpoint(_first_error(err, f"entries.{key}")) from None
    return entries


class Checkpoints(Generic[Entry]):
    """Entries (pydantic models) by key, loaded once and saved whole when something changed."""

    def __init__(self, path: Path, model_for: Callable[[str], type[Entry] | None]) -> None:
        self.path = path
        self.entries: dict[str, Entry] = {}
        self._model_for = model_for
        # False until `load` found a file: a first start, where a source may apply its start policy.
        self.existed = False
        self._dirty = False
        self._lock = asyncio.Lock()

    def load(self) -> None:
        """Read the file if there is one. A bad file is moved aside, never silently reused."""
        try:
            text = self.path.read_text(encoding="utf-8", errors="strict")
        except FileNotFoundError:
            return
        except (UnicodeDecodeError, OSError) as err:
            self.existed = True
            self._move_aside(f"cannot read it: {err}")
            return
        self.existed = True
        try:
            self.entries = parse(text, self._model_for)
        except BadCheckpoint as err:
            self._move_aside(str(err))

    def _move_aside(self, problem: str) -> None:
        # existed stays True: positions are unknown, so files are read from the beginning.
        aside = self.path.with_name(f"{self.path.name}.corrupt-{int(time.time())}")
        os.replace(self.path, aside)
        log.warning("checkpoint file %s: %s; moved to %s, starting without it", self.path, problem, aside)
        self.entries = {}

    def get(self, key: str) -> Entry | None:
        return self.entries.get(key)

    def put(self, key: str, entry: Entry) -> None:
        if self.entries.get(key) != entry:
            self.entries[key] = entry
            self._dirty = True

    def remove(self, key: str) -> None:
        if self.entries.pop(key, None) is not None:
            self._dirty = True

    def _document(self) -> str:
        entries = {key: entry.model_dump(mode="json") for key, entry in self.entries.items()}
        return json.dumps({"version": VERSION, "written_at": time.time(), "entries": entries},
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

    @staticmethod
    def _written() -> None:
        events.CheckpointsWritten().emit()


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
