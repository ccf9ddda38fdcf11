"""Who a file is: device, inode and a checksum of its first bytes, and the generations of that identity.

The checksum window is fixed when a file is first read (`fingerprint_bytes`, or the whole file while
it is shorter) and saved before any of its lines is emitted, so a file keeps one identity as it
grows. The stream id, `<instance>.<dev>.<inode>.<checksum>[.<generation>]`, is stable across
restarts: a line delivered again after a crash carries the same idempotency key. A new generation
starts when the same inode holds new content (copytruncate, a cut in place, a reused inode).
"""

from __future__ import annotations

import hashlib
import os

# Bytes before the read position compared on every read: a change means the file was truncated.
TAIL = 32
CHUNK = 64 * 1024
# A file found empty: saved by device and inode, so that if it is renamed away while the relay is
# down, the restart still finds it (its identity is fixed once it has bytes).
PENDING = "pending:"
RETIRED = "retired:"

Key = tuple[int, int]  # (device, inode)


def digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=8).hexdigest()


def stream_id(instance: str, dev: int, ino: int, checksum: str, gen: int) -> str:
    base = f"{instance}.{dev:x}.{ino:x}.{checksum[:12]}"
    return f"{base}.{gen}" if gen else base


def pending_key(key: Key) -> str:
    return f"{PENDING}{key[0]:x}.{key[1]:x}"


def retired_key(key: Key) -> str:
    return f"{RETIRED}{key[0]:x}.{key[1]:x}"


def open_file(path: str) -> tuple[int, os.stat_result] | None:
    """A read-only descriptor and its stat, or None when the file cannot be opened now."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    return fd, os.fstat(fd)


def count_lines(fd: int, end: int) -> int:
    count, pos = 0, 0
    while pos < end:
        chunk = os.pread(fd, min(1 << 20, end - pos), pos)
        if not chunk:
            break
        count += chunk.count(b"\n")
        pos += len(chunk)
    return count


def last_line_end(fd: int, size: int) -> int:
    """Where reading from "the end" starts: after the last complete line (a line being written is kept)."""
    span = min(size, CHUNK)
    data = os.pread(fd, span, size - span)
    i = data.rfind(b"\n")
    if i >= 0:
        return size - span + i + 1
    return 0 if span == size else size


def matches(fd: int, size: int, window: int, checksum: str, offset: int, tail_digest: str) -> bool:
    """Does this file hold the same first `window` bytes and the same bytes before `offset`?"""
    if size < offset or size < window:
        return False
    if digest(os.pread(fd, window, 0)) != checksum:
        return False
    t = min(TAIL, offset)
    return digest(os.pread(fd, t, offset - t)) == tail_digest


def cut_in_place(fd: int, size: int, window: int, checksum: str) -> bool:
    """Does a file that is now shorter still begin with its first bytes (`truncate -s`, not new content)?"""
    return size >= window and digest(os.pread(fd, window, 0)) == checksum


class Generations:
    """The highest generation seen per (device, inode): the next identity on that inode is one more."""

    def __init__(self) -> None:
        self._floor: dict[Key, int] = {}

    def next(self, key: Key) -> int:
        gen = self._floor[key] + 1 if key in self._floor else 0
        self._floor[key] = gen
        return gen

    def seen(self, key: Key, gen: int) -> None:
        self._floor[key] = max(self._floor.get(key, -1), gen)

    def forget(self, key: Key) -> None:
        self._floor.pop(key, None)
