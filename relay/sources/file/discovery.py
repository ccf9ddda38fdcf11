"""Which files the source follows: its globs, matched again every `glob_interval` and on change
events from the directories they name.

A listing that fails is not an empty one: a file the glob did not list but that is still at its
path (a directory that cannot be read, no descriptor left for the listing) is kept, with one WARNING,
and the glob tried again at every scan. A file is gone only when its path is gone or names another.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import glob
import logging
import os
import re
import stat
from collections.abc import Callable, Iterable
from typing import Any

from relay.sources.file.identity import Key
from relay.sources.file.reader import TailedFile

log = logging.getLogger("relay.sources.file")

# Change events are grouped for this long at most, and yielded after this much quiet (ms).
WATCH_DEBOUNCE_MS = 50
WATCH_STEP_MS = 2
_MAGIC = re.compile(r"[*?[]")


def listable(directory: str) -> bool:
    """Can the directory be listed? (One that does not exist is: it holds nothing.)"""
    try:
        with os.scandir(directory):
            return True
    except (FileNotFoundError, NotADirectoryError):
        return True
    except OSError:
        return False


class Paths:
    """The globs and excludes of one source, and what they match now."""

    def __init__(self, source: str, paths: list[str], exclude: list[str]) -> None:
        self.source = source
        self.patterns = [os.path.abspath(os.path.expanduser(p)) for p in paths]
        self.exclude = exclude
        # fnmatch lets "*" cross "/", so it over-matches glob: good enough to tell which events matter.
        self._event_patterns = sorted({q for p in self.patterns for q in (p, p.replace("**" + os.sep, ""))})
        self._unlisted: set[str] = set()  # paths kept while their directory cannot be listed

    def excluded(self, path: str) -> bool:
        name = os.path.basename(path)
        return any(fnmatch.fnmatchcase(path if os.sep in pattern else name, pattern) for pattern in self.exclude)

    def glob(self) -> dict[Key, str]:
        """The regular files the globs match now, by (device, inode)."""
        found: dict[Key, str] = {}
        for pattern in self.patterns:
            for path in glob.iglob(pattern, recursive=True):
                if self.excluded(path):
                    continue
                try:
                    st = os.stat(path)
                except OSError:
                    continue
                if stat.S_ISREG(st.st_mode):
                    found.setdefault((st.st_dev, st.st_ino), path)
        for path in found.values():
            if path in self._unlisted:
                self._unlisted.discard(path)
                log.info("%s: %s is listed again", self.source, path)
        return found

    def gone(self, f: TailedFile) -> bool:
        """Did a file the glob did not list really leave its path?"""
        try:
            st = os.stat(f.path)
        except (FileNotFoundError, NotADirectoryError):
            return True
        except OSError as err:
            self._keep(f.path, f"cannot list {f.path} ({err.strerror})")
            return False
        if (st.st_dev, st.st_ino) != f.key:
            return True
        self._keep(f.path, f"the glob did not list {f.path}, which is still there (a directory listing failed)")
        return False

    def _keep(self, path: str, why: str) -> None:
        if path not in self._unlisted:
            self._unlisted.add(path)
            log.warning("%s: %s; keeping it and trying again", self.source, why)

    def wanted(self, path: str) -> bool:
        """Might this path be matched (for change events: over-matching is fine)?"""
        return any(fnmatch.fnmatchcase(path, p) for p in self._event_patterns) and not self.excluded(path)

    def roots(self) -> tuple[list[str], bool]:
        """The existing directories to watch, and whether any glob needs them watched recursively."""
        roots: set[str] = set()
        recursive = False
        for pattern in self.patterns:
            parts = pattern.split(os.sep)
            fixed = next((i for i, part in enumerate(parts) if _MAGIC.search(part)), len(parts))
            if fixed < len(parts) - 1:
                recursive = True
            root = os.sep.join(parts[:min(fixed, len(parts) - 1)]) or os.sep
            # A directory that does not exist yet is found by the next glob scan, then watched.
            if os.path.isdir(root):
                roots.add(root)
        return sorted(roots), recursive


class Watcher:
    """Change events (watchfiles) from the directories of the globs, handed to `on_changes`; falls
    back to polling when the platform has none. Restarted when the set of directories changes."""

    def __init__(self, source: str, paths: Paths, on_changes: Callable[[Iterable[tuple[Any, str]]], None],
                 glob_interval: float, poll_interval: float) -> None:
        self.source = source
        self.paths = paths
        self.on_changes = on_changes
        self.glob_interval = glob_interval
        self.poll_interval = poll_interval
        self._stop: asyncio.Event | None = None
        self._roots: tuple[list[str], bool] = ([], False)
        self._stopped = False
        self._force_polling = False

    async def run(self) -> None:
        from watchfiles import awatch
        while not self._stopped:
            self._roots = self.paths.roots()
            roots, recursive = self._roots
            stop = self._stop = asyncio.Event()
            if not roots:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self.glob_interval)
                continue
            try:
                async for changes in awatch(*roots, watch_filter=None, debounce=WATCH_DEBOUNCE_MS,
                                            step=WATCH_STEP_MS, stop_event=stop, recursive=recursive,
                                            force_polling=self._force_polling, poll_delay_ms=100,
                                            ignore_permission_denied=True):
                    self.on_changes(changes)
            except Exception as err:
                if self._stopped:
                    break
                if not self._force_polling:
                    log.warning("%s: change events unavailable (%s); polling for changes instead", self.source, err)
                    self._force_polling = True
                else:
                    log.warning("%s: watching %s failed (%s); checking every %gs", self.source, roots, err,
                                self.poll_interval)
                    await asyncio.sleep(self.glob_interval)

    def roots_changed(self) -> None:
        """After a scan: directories appeared or went, so watch the new set."""
        if self._stop is not None and self.paths.roots() != self._roots:
            self._stop.set()

    def stop(self) -> None:
        self._stopped = True
        if self._stop is not None:
            self._stop.set()
