"""Where a rotated file's rest is: the file renamed beside it, or the copy copytruncate left.

A file that left the glob is read to its end through the descriptor the tail holds. A file whose
bytes before the read position changed was truncated: its rest is in the file of the same directory
with the same first bytes and the same bytes before the read position (the renamed file itself,
preferred, or the copy; the newest wins). With no such file but the same first bytes, the file was
cut in place (`truncate -s`). The same search finds files rotated while the relay was down.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Container
from dataclasses import dataclass
from typing import Literal

from relay.sources.file.checkpoints import FileEntry
from relay.sources.file.discovery import listable
from relay.sources.file.identity import Key, cut_in_place, matches, open_file


@dataclass(slots=True)
class Located:
    """Where a checkpointed file is now. With a path, `fd` is an open descriptor of it.

    `same`: at its saved offset, as saved; `cut`: shorter than its offset, same first bytes (cut in
    place); `moved`: renamed, or its rest in copytruncate's copy; `unknown`: its directory cannot be
    listed; `gone`: none of these."""

    how: Literal["same", "cut", "moved", "unknown", "gone"]
    path: str = ""
    fd: int = -1
    dev: int = 0
    ino: int = 0
    size: int = 0

    @property
    def key(self) -> Key:
        return (self.dev, self.ino)


def _located(how: Literal["same", "cut", "moved"], path: str, fd: int, st: os.stat_result) -> Located:
    return Located(how, path, fd, st.st_dev, st.st_ino, st.st_size)


def at_path(entry: FileEntry, path: str | None, followed: Container[Key]) -> Located | None:
    """The saved file still under a globbed path (same device and inode): as saved, or cut in place."""
    ident = (entry.dev, entry.ino)
    opened = open_file(path) if path is not None and ident not in followed else None
    if opened is None or path is None:
        return None
    fd, st = opened
    if (st.st_dev, st.st_ino) == ident:
        if matches(fd, st.st_size, entry.window, entry.digest, entry.offset, entry.tail):
            return _located("same", path, fd, st)
        if st.st_size < entry.offset and cut_in_place(fd, st.st_size, entry.window, entry.digest):
            return _located("cut", path, fd, st)
    os.close(fd)
    return None


def elsewhere(entry: FileEntry, followed: Container[Key]) -> Located:
    """The saved file, or its rest, in its directory under another name; or why not."""
    directory = os.path.dirname(entry.path)
    match = find_match(directory, entry.window, entry.digest, entry.offset, entry.tail, followed,
                       prefer=(entry.dev, entry.ino))
    if match is not None:
        return _located("moved", *match)
    return Located("gone" if listable(directory) else "unknown")


def find_match(directory: str, window: int, checksum: str, offset: int, tail_digest: str,
               followed: Container[Key], prefer: Key | None = None) -> tuple[str, int, os.stat_result] | None:
    """A file in `directory` with the given first bytes and bytes before `offset`, not followed yet:
    its path, an open descriptor and its stat."""
    best: tuple[bool, float, str, int, os.stat_result] | None = None
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return None
    for item in entries:
        try:
            st = item.stat()
        except OSError:
            continue
        if not stat.S_ISREG(st.st_mode) or (st.st_dev, st.st_ino) in followed or st.st_size < offset:
            continue
        opened = open_file(item.path)
        if opened is None:
            continue
        fd, st = opened
        if not matches(fd, st.st_size, window, checksum, offset, tail_digest):
            os.close(fd)
            continue
        rank = ((st.st_dev, st.st_ino) == prefer, st.st_mtime)
        if best is None or rank > best[:2]:
            if best is not None:
                os.close(best[3])
            best = (rank[0], rank[1], item.path, fd, st)
        else:
            os.close(fd)
    return None if best is None else (best[2], best[3], best[4])


def find_inode(directory: str, key: Key) -> str | None:
    """The path of the file with this device and inode in `directory` (a file renamed beside itself)."""
    with contextlib.suppress(OSError):
        for item in os.scandir(directory):
            if item.inode() == key[1] and item.stat(follow_symlinks=False).st_dev == key[0]:
                return item.path
    return None
