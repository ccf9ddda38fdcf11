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

from relay.sources.file.identity import Key, matches, open_file


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
