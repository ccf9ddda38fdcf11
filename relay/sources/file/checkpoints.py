"""The file tail's checkpoint entries (`state_dir/file-<source>.json`), validated by these models.

For each file identity: the path, device, inode, checksum window, generation, the offset up to which
every line was settled and a checksum of the bytes before it. Besides them, `pending:` entries (a
file found empty, known by device and inode) and `retired:` entries (a forgotten file's last
generation, kept `RETIRED_KEEP` so a new file on that inode never repeats its keys). Storing,
atomic replacement and moving a bad file aside are relay/checkpoints.py's.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from relay.checkpoints import Checkpoints
from relay.sources.file.identity import PENDING, RETIRED, TAIL, Key, digest, pending_key, retired_key
from relay.sources.file.reader import TailedFile

# Twice Centrifugo's idempotency window.
RETIRED_KEEP = 600.0
_HEX16 = r"^[0-9a-f]{16}$"
_STREAM_KEY = re.compile(r"[^.:/]+\.[0-9a-f]+\.[0-9a-f]+\.[0-9a-f]{12}(\.[0-9]+)?")


class _Ident(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    dev: int = Field(ge=0, lt=2**64)
    ino: int = Field(ge=0, lt=2**64)


class FileEntry(_Ident):
    """A file identity and the offset up to which every line of it was settled."""

    path: str
    window: int = Field(ge=1, le=65536)
    digest: str = Field(pattern=_HEX16)
    gen: int = Field(ge=0, lt=2**31)
    offset: int = Field(ge=0, lt=2**62)
    tail: str = Field(pattern=_HEX16)  # checksum of the bytes just before `offset`


class PendingEntry(_Ident):
    """A file found empty: known by device and inode until it has bytes."""

    path: str


class RetiredEntry(_Ident):
    """A forgotten file's last generation, so a new file on its inode never repeats its keys."""

    gen: int = Field(ge=0, lt=2**31)
    at: float = Field(ge=0)


Entry = FileEntry | PendingEntry | RetiredEntry


def entry_model(key: str) -> type[Entry] | None:
    """The model of a checkpoint entry by the form of its key; None for a key the tail never writes."""
    if key.startswith(RETIRED):
        return RetiredEntry
    if key.startswith(PENDING):
        return PendingEntry
    return FileEntry if _STREAM_KEY.fullmatch(key) else None


class FileCheckpoints(Checkpoints[Entry]):
    """The entries of one file source, written from its files' state."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, entry_model)

    def save(self, f: TailedFile, offset: int) -> None:
        """Put a file's checkpoint at `offset` (a line end, settled) with the bytes before it."""
        t = min(TAIL, offset)
        if offset == f.read_pos:
            tail = f.tail[-t:] if t else b""
        else:
            tail = os.pread(f.fd, t, offset - t)
            n = len(f.tail)
            if os.pread(f.fd, n, f.read_pos - n) != f.tail:
                return  # truncated since the last read: those bytes are new content; the next read sees it
        f.committed = offset
        self.put(f.stream, FileEntry(path=f.path, dev=f.dev, ino=f.ino, window=f.window, digest=f.digest,
                                     gen=f.gen, offset=offset, tail=digest(tail)))

    def pending(self, f: TailedFile) -> None:
        self.put(pending_key(f.key), PendingEntry(path=f.path, dev=f.dev, ino=f.ino))

    def retire(self, key: Key, gen: int) -> None:
        """Remember the last generation of an inode whose file was forgotten."""
        previous = self.get(retired_key(key))
        gen = max(gen, previous.gen) if isinstance(previous, RetiredEntry) else gen
        self.put(retired_key(key), RetiredEntry(dev=key[0], ino=key[1], gen=gen, at=round(time.time(), 3)))

    def expire_retired(self) -> list[Key]:
        """Drop retired entries older than RETIRED_KEEP; their (device, inode) pairs."""
        now = time.time()
        gone = []
        for key, entry in list(self.entries.items()):
            if isinstance(entry, RetiredEntry) and now - entry.at > RETIRED_KEEP:
                self.remove(key)
                gone.append((entry.dev, entry.ino))
        return gone
