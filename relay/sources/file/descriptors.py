"""How many files the tail may hold open, so that 2,000 files under `ulimit -n 1024` still work.

The soft RLIMIT_NOFILE is raised to the hard limit at start (as Go programs do); the tail holds at
most that many files open less `max(FD_RESERVE, limit / 8)`, kept for sockets, the checkpoint and
dead letter files and the glob's directory listings. Beyond it, idle files are closed (parked) and
opened again when they grow.
"""

from __future__ import annotations

import contextlib
import os
import resource
from collections.abc import Callable, Iterable

from relay.sources.file.reader import TailedFile
from relay.sources.file.rotation import find_inode

FD_RESERVE = 128


def fd_budget() -> int:
    """Raise the soft limit to the hard one; how many files the tail may hold open."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = 1 << 20 if hard == resource.RLIM_INFINITY else min(hard, 1 << 20)
    if target > soft:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
    return max(8, soft - max(FD_RESERVE, soft // 8))


def reopen_path(f: TailedFile) -> str | None:
    """For a file closed to save descriptors: the path to open it by again; "" when it has nothing new
    (it stays closed); None when it is gone (deleted while closed)."""
    if f.live:
        try:
            st = os.stat(f.path)
        except OSError:
            pass
        else:
            if (st.st_dev, st.st_ino) == f.key:
                return "" if st.st_size == f.read_pos else f.path
    return find_inode(os.path.dirname(f.path), f.key)  # renamed beside itself while closed


class Descriptors:
    """Counts the files holding a descriptor, and makes room by closing idle ones."""

    def __init__(self) -> None:
        self.budget = 0  # set at start (fd_budget), or by a test
        self.held = 0
        self._exhausted = False  # found none idle: looked for again after `retry()`

    def opened(self) -> None:
        self.held += 1

    def close(self, f: TailedFile) -> None:
        if f.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(f.fd)
            f.fd = -1
            self.held -= 1

    def retry(self) -> None:
        self._exhausted = False

    def room(self, idle: Callable[[], Iterable[TailedFile]], close: Callable[[TailedFile], None]) -> bool:
        """Is there room for one more open file? If not, close some idle files (read to their end
        first); one pass over the files per `retry()` at most."""
        if self.held < self.budget:
            return True
        if self._exhausted:
            return False
        candidates = sorted(idle(), key=lambda f: not f.at_eof)
        for f in candidates[:max(1, self.budget // 16)]:
            close(f)
        self._exhausted = self.held >= self.budget
        return not self._exhausted
