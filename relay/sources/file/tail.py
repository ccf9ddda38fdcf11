"""The file source itself: finds files (discovery), reads each (reader), follows rotation, keeps
checkpoints, and hands lines to the pipeline through `Flow` (a cap of unsettled lines per file).

What a source engine would own (issue 13) is kept apart so it can move there whole: the cap and the
batches in flow.py, the commit loop in the section "checkpoints: the commit loop" below.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from relay import metrics
from relay.checkpoints import instance_id
from relay.message import Message
from relay.sources import Emit
from relay.sources.file.checkpoints import FileCheckpoints, FileEntry, PendingEntry
from relay.sources.file.config import Config
from relay.sources.file.descriptors import Descriptors, fd_budget, reopen_path
from relay.sources.file.discovery import Paths, Watcher
from relay.sources.file.flow import Flow
from relay.sources.file.identity import (
    CHUNK,
    TAIL,
    Generations,
    Key,
    count_lines,
    cut_in_place,
    digest,
    last_line_end,
    open_file,
    pending_key,
    stream_id,
)
from relay.sources.file.reader import LineSplitter, TailedFile, read_next
from relay.sources.file.rotation import Located, at_path, elsewhere, find_inode, find_match

log = logging.getLogger("relay.sources.file")

# Chunks read from one file before the others get a turn.
CHUNKS_PER_TURN = 16
RESCAN_MIN_GAP = 0.05


class FileTail:
    """Tails every file the globs match; positions are (file identity, byte offset past the line)."""

    def __init__(self, name: str, config: Config, state_dir: Path) -> None:
        self.name = name
        self.config = config
        self._paths = Paths(name, config.paths, config.exclude)
        self._checkpoints = FileCheckpoints(state_dir / f"file-{name}.json")
        self._instance_path = state_dir / f"file-{name}.instance"
        self._instance = ""
        self._flow = Flow(config.max_in_flight, config.batch_size, self._resume_stream)
        self._splitter = LineSplitter(name, config.max_line_bytes, self._flow.settled, self._flow.tracker.emitted)
        self._generations = Generations()
        self._fds = Descriptors()
        self._watcher = Watcher(name, self._paths, self._on_changes, config.glob_interval, config.poll_interval)
        self._files: dict[Key, TailedFile] = {}
        self._by_path: dict[str, TailedFile] = {}
        self._by_stream: dict[str, TailedFile] = {}
        self._finishing: list[TailedFile] = []
        self._due: dict[TailedFile, None] = {}  # an ordered set: files to read on the next turn
        self._unresolved: list[tuple[str, FileEntry]] = []  # saved files whose directory could not be read
        self._wake = asyncio.Event()
        self._stopped = False
        self._unsaved = False  # identities not yet in the checkpoint file: saved before their lines go out
        self._rescan_wanted = False
        self._last_scan = 0.0
        self._tasks: list[asyncio.Task[None]] = []
        self._warned: set[str] = set()
        self._watched = 0
        self.started = asyncio.Event()  # set once the first scan is done

    # -- the Source protocol -------------------------------------------------------------------

    async def run(self, emit: Emit) -> None:
        self._instance = instance_id(self._instance_path)
        self._fds.budget = self._fds.budget or fd_budget()
        self._checkpoints.load()
        await self._scan(initial=True)
        self._tasks = [asyncio.create_task(self._watcher.run(), name=f"file-{self.name}-watch"),
                       asyncio.create_task(self._checkpoint_loop(), name=f"file-{self.name}-checkpoints")]
        self.started.set()
        try:
            await self._loop(emit)
        finally:
            self._watcher.stop()

    async def stop(self) -> None:
        self._stopped = True
        self._watcher.stop()
        self._wake.set()

    async def close(self) -> None:
        self._stopped = True
        self._watcher.stop()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        self._retire_finished()
        self._snapshot()
        try:
            self._checkpoints.write()
        finally:
            for f in list(self._files.values()) + self._finishing:
                self._close_fd(f)
            self._set_watched(0)

    # -- the read loop ---------------------------------------------------------------------------

    async def _loop(self, emit: Emit) -> None:
        cfg = self.config
        next_glob = next_poll = time.monotonic() + cfg.poll_interval
        while not self._stopped:
            self._wake.clear()
            now = time.monotonic()
            if now >= next_glob or (self._rescan_wanted and now - self._last_scan >= RESCAN_MIN_GAP):
                await self._scan()
                next_glob = now + cfg.glob_interval
            if now >= next_poll:
                for f in self._files.values():
                    self._due[f] = None
                self._retire_finished()
                self._fds.retry()
                next_poll = now + cfg.poll_interval
            await self._read_due(emit)
            if self._due:
                await asyncio.sleep(0)
                continue
            until = min(next_glob, next_poll)
            if self._rescan_wanted:
                until = min(until, self._last_scan + RESCAN_MIN_GAP)
            timeout = until - time.monotonic()
            if timeout > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout)

    async def _read_due(self, emit: Emit) -> None:
        out: list[Message] = []
        files = list(self._due)
        self._due.clear()
        for f in files:
            if self._stopped:
                break
            if f.done or (f.fd < 0 and not await self._unpark(f)):
                continue
            for _ in range(CHUNKS_PER_TURN):
                if f.stream and self._flow.pause_if_full(f.stream):
                    break
                more = await self._read_chunk(f, out)
                if len(out) >= self.config.batch_size:
                    await self._emit(emit, out)
                    out = []
                if not more or f.done or self._stopped:
                    break
            else:
                self._due[f] = None
        if out:
            await self._emit(emit, out)

    async def _read_chunk(self, f: TailedFile, out: list[Message]) -> bool:
        """Read the next chunk of a file into messages; False at its end."""
        try:
            if not f.stream:
                size = os.fstat(f.fd).st_size
                if size == 0:
                    return self._at_end(f, out)
                await self._identify(f, size, at_end=f.start_at_end)
            data = read_next(f)
        except OSError as err:
            log.error("%s: cannot read (%s); giving it up", f.path, err)
            self._finish(f, out)
            return False
        if data is None:
            await self._truncated(f)
            return True
        if not data:
            return self._at_end(f, out)
        f.eof_since, f.at_eof = None, False
        self._splitter.split(f, data, out, self._flow.room(f.stream))
        return True

    def _at_end(self, f: TailedFile, out: list[Message]) -> bool:
        f.at_eof = True
        if not f.live:
            now = time.monotonic()
            if f.eof_since is None:
                f.eof_since = now
            elif now - f.eof_since >= self.config.rotate_wait:
                self._finish(f, out)
        return False

    # -- emitting (the cap per file and the batches are flow.py's) -------------------------------

    async def _emit(self, emit: Emit, out: list[Message]) -> None:
        if self._unsaved:  # identities are saved before any of their lines goes out
            self._unsaved = False
            await self._save()
        await self._flow.emit(emit, out)

    def _resume_stream(self, stream: str) -> None:
        f = self._by_stream.get(stream)
        if f is not None and not f.done:
            self._due[f] = None
            self._wake.set()

    # -- identity ------------------------------------------------------------------------------

    async def _identify(self, f: TailedFile, size: int, at_end: bool) -> None:
        """Fix a file's identity from its first bytes; it is saved before any of its lines is emitted."""
        head = os.pread(f.fd, min(self.config.fingerprint_bytes, size), 0)
        f.window, f.digest = len(head), digest(head)
        await self._new_generation(f, last_line_end(f.fd, size) if at_end else 0)

    async def _new_generation(self, f: TailedFile, start: int) -> None:
        """Give a file (window and digest known) the next generation of its identity, read from `start`."""
        f.gen = self._generations.next(f.key)
        f.stream = stream_id(self._instance, f.dev, f.ino, f.digest, f.gen)
        await self._position(f, start)
        self._by_stream[f.stream] = f
        self._checkpoints.remove(pending_key(f.key))
        self._checkpoints.save(f, f.read_pos)
        self._unsaved = True

    @staticmethod
    async def _position(f: TailedFile, offset: int) -> None:
        f.read_pos = f.committed = offset
        t = min(TAIL, offset)
        f.tail = os.pread(f.fd, t, offset - t)
        if offset > 8 * CHUNK:
            f.line_no = await asyncio.to_thread(count_lines, f.fd, offset)
        else:
            f.line_no = count_lines(f.fd, offset)

    def _register(self, f: TailedFile) -> None:
        self._files[f.key] = f
        if f.fd >= 0:
            self._fds.opened()
        if f.live:
            self._by_path[f.path] = f
        if f.stream:
            self._by_stream[f.stream] = f
        self._due[f] = None

    # -- open descriptors ----------------------------------------------------------------------

    def _room(self) -> bool:
        return self._fds.room(lambda: [f for f in self._files.values() if self._parkable(f)], self._close_fd)

    def _parkable(self, f: TailedFile) -> bool:
        """Can this file be closed for now? Read, nothing in flight, its checkpoint where it is."""
        if f.fd < 0 or not f.live or f.done or f.skip is not None or f in self._due:
            return False
        if not f.stream:
            return f.at_eof
        return self._flow.idle(f.stream, f.committed)

    async def _unpark(self, f: TailedFile) -> bool:
        """Open a file closed to save descriptors again, if it has anything to read; True if open."""
        path = reopen_path(f)
        if path == "":
            return False
        if path is None:
            log.info("%s: %s went away while closed to save descriptors; lines written to it after "
                     "offset %d, if any, were not read", self.name, f.path, f.read_pos)
            self._finish(f, [])
            return False
        if not self._room():
            return False  # every open file is busy: tried again at the next poll
        opened = open_file(path)
        if opened is None or (opened[1].st_dev, opened[1].st_ino) != f.key:
            if opened is not None:
                os.close(opened[0])
            return False
        f.fd = opened[0]
        self._fds.opened()
        if path != f.path:  # renamed away while closed: it left the glob
            self._leave(f)
            f.path = path
        return True

    def _close_fd(self, f: TailedFile) -> None:
        self._fds.close(f)

    # -- finding files -------------------------------------------------------------------------

    async def _scan(self, initial: bool = False) -> None:
        self._rescan_wanted = False
        self._last_scan = time.monotonic()
        found = self._paths.glob()
        if initial:
            await self._resume_from_checkpoints(found)
        elif self._unresolved:
            saved, self._unresolved = self._unresolved, []
            await self._resume_saved(saved, found)
        at_end = initial and not self._checkpoints.existed and self.config.read_from == "end"
        for key, path in found.items():
            f = self._files.get(key)
            if f is not None:
                if f.path != path or not f.live:
                    if self._by_path.get(f.path) is f:
                        del self._by_path[f.path]
                    f.path, f.live, f.eof_since = path, True, None
                    self._by_path[path] = f
                continue
            await self._discover(key, path, at_end, initial)
        for key, f in list(self._files.items()):
            if f.live and key not in found and self._paths.gone(f):
                self._leave(f)
        self._set_watched(len(self._files))
        if self._unsaved:
            self._unsaved = False
            await self._save()
        self._watcher.roots_changed()

    async def _discover(self, key: Key, path: str, at_end: bool, initial: bool) -> None:
        """A file the glob lists for the first time: opened and identified now, or, while every
        descriptor the tail may use is busy, remembered closed and opened at its turn."""
        if not self._room():
            f = TailedFile(path=path, fd=-1, dev=key[0], ino=key[1], start_at_end=at_end)
            self._checkpoints.pending(f)
            self._unsaved = True
            self._register(f)
            return
        opened = open_file(path)
        if opened is None:
            if path not in self._warned:
                self._warned.add(path)
                log.warning("%s: cannot open %s; trying again at the next scan", self.name, path)
            return
        fd, st = opened
        if (st.st_dev, st.st_ino) != key or key in self._files:
            os.close(fd)  # replaced between glob and open: the next scan sees the new one
            return
        f = TailedFile(path=path, fd=fd, dev=st.st_dev, ino=st.st_ino)
        if st.st_size > 0:
            await self._identify(f, st.st_size, at_end=at_end)
        else:
            self._checkpoints.pending(f)
            self._unsaved = True
        self._register(f)
        if not initial:
            log.info("%s: new file %s", self.name, path)

    def _leave(self, f: TailedFile) -> None:
        f.live = False
        if self._by_path.get(f.path) is f:
            del self._by_path[f.path]
        self._due[f] = None
        log.info("%s: %s left the glob (renamed or deleted); reading it to its end", self.name, f.path)

    # -- resuming from checkpoints -------------------------------------------------------------

    async def _resume_from_checkpoints(self, found: dict[Key, str]) -> None:
        """Match saved identities to files: by device and inode, or in their directory if renamed."""
        saved = []
        for key, entry in list(self._checkpoints.entries.items()):
            if isinstance(entry, PendingEntry):
                self._resume_pending(key, entry, found)
                continue
            self._generations.seen((entry.dev, entry.ino), entry.gen)
            if isinstance(entry, FileEntry):
                saved.append((key, entry))
        self._checkpoints.expire_retired()
        await self._resume_saved(saved, found)

    async def _resume_saved(self, saved: list[tuple[str, FileEntry]], found: dict[Key, str]) -> None:
        lost = []
        for stream, entry in saved:  # first those still in place, so a search never takes their file
            where = at_path(entry, found.get((entry.dev, entry.ino)), self._files)
            if where is None:
                lost.append((stream, entry))
            elif where.how == "same":
                await self._resume(stream, entry, where, live=True)
            else:
                await self._resume_cut(stream, entry, where)
        for stream, entry in lost:
            where = elsewhere(entry, self._files)
            if where.how == "moved":
                log.info("%s: %s was rotated while stopped; resuming it as %s at offset %d",
                         self.name, entry.path, where.path, entry.offset)
                await self._resume(stream, entry, where, live=where.key in found)
            elif where.how == "unknown":
                # Not knowing is not gone: the entry stays, and is matched again at every scan.
                if stream not in self._warned:
                    self._warned.add(stream)
                    log.warning("%s: cannot list the directory of %s; keeping its checkpoint and trying again",
                                self.name, entry.path)
                self._unresolved.append((stream, entry))
            else:
                log.warning("%s: %s (%s) is gone or changed; forgetting its checkpoint at offset %d",
                            self.name, entry.path, stream, entry.offset)
                self._checkpoints.remove(stream)
                self._checkpoints.retire((entry.dev, entry.ino), entry.gen)

    def _resume_pending(self, key: str, entry: PendingEntry, found: dict[Key, str]) -> None:
        """A file that was empty when last seen: the same inode, in the glob or renamed in its directory."""
        ident = (entry.dev, entry.ino)
        path = found.get(ident) or find_inode(os.path.dirname(entry.path), ident)
        opened = open_file(path) if path is not None else None
        if opened is None or (opened[1].st_dev, opened[1].st_ino) != ident or ident in self._files:
            if opened is not None:
                os.close(opened[0])
            self._checkpoints.remove(key)
            return
        fd, st = opened
        self._register(TailedFile(path=path or "", fd=fd, dev=st.st_dev, ino=st.st_ino, live=ident in found))

    async def _resume(self, stream: str, entry: FileEntry, where: Located, live: bool) -> None:
        f = TailedFile(path=where.path, fd=where.fd, dev=where.dev, ino=where.ino, live=live,
                       stream=stream, window=entry.window, digest=entry.digest, gen=entry.gen)
        await self._position(f, entry.offset)
        self._generations.seen(f.key, f.gen)
        self._register(f)
        self._checkpoints.save(f, f.read_pos)

    async def _resume_cut(self, stream: str, entry: FileEntry, where: Located) -> None:
        """Cut shorter in place while stopped (`truncate -s`, or a checkpoint ahead of the file): what
        is left was read; new lines go on after it under a new generation, nothing is read again."""
        log.warning("%s: %s is shorter (%d bytes) than its checkpoint (offset %d) but begins with the same "
                    "bytes: cut in place; reading on at its end", self.name, where.path, where.size, entry.offset)
        self._checkpoints.remove(stream)
        self._checkpoints.retire((entry.dev, entry.ino), entry.gen)
        f = TailedFile(path=where.path, fd=where.fd, dev=where.dev, ino=where.ino, window=entry.window,
                       digest=entry.digest)
        await self._new_generation(f, last_line_end(where.fd, where.size))
        self._register(f)

    # -- rotation ------------------------------------------------------------------------------

    async def _truncated(self, f: TailedFile) -> None:
        """The bytes before the read position changed: copytruncate. Finish from the copy, restart at 0;
        or, with no copy and the same first bytes, cut in place (`truncate -s`): go on at the new end."""
        fresh = TailedFile(path=f.path, fd=f.fd, dev=f.dev, ino=f.ino, live=f.live)
        self._files[f.key] = fresh
        if self._by_path.get(f.path) is f:
            self._by_path[f.path] = fresh
        self._due[fresh] = None
        if not f.stream:
            f.fd, f.done = -1, True
            return
        match = find_match(os.path.dirname(f.path), f.window, f.digest, f.read_pos, digest(f.tail), self._files)
        if match is None:
            size = os.fstat(fresh.fd).st_size
            if size < f.read_pos and cut_in_place(fresh.fd, size, f.window, f.digest):
                log.warning("%s: %s was cut to %d bytes in place; reading on at its new end", self.name,
                            f.path, size)
                fresh.window, fresh.digest = f.window, f.digest
                await self._new_generation(fresh, last_line_end(fresh.fd, size))
            else:
                log.warning("%s: %s was truncated and no copy holding its rest was found; lines after offset "
                            "%d that were not read yet are lost", self.name, f.path, f.read_pos)
            f.fd = -1
            f.pending, f.skip = b"", None
            self._finish(f, [])
            return
        path, fd, st = match
        log.info("%s: %s was truncated; reading the rest from its copy %s", self.name, f.path, path)
        f.path, f.fd, f.dev, f.ino, f.live, f.eof_since = path, fd, st.st_dev, st.st_ino, False, None
        self._fds.opened()
        self._files[f.key] = f
        self._generations.seen(f.key, f.gen)
        self._checkpoints.save(f, f.committed)
        self._due[f] = None

    # -- forgetting ------------------------------------------------------------------------------

    def _finish(self, f: TailedFile, out: list[Message]) -> None:
        """Stop reading a file that is gone: its last line is complete even without a newline."""
        self._splitter.last_line(f, out)
        f.done = True
        if self._files.get(f.key) is f:
            del self._files[f.key]
        if self._by_path.get(f.path) is f:
            del self._by_path[f.path]
        self._due.pop(f, None)
        self._finishing.append(f)
        self._set_watched(len(self._files))
        log.info("%s: done with %s", self.name, f.path)

    def _retire_finished(self) -> None:
        """Forget finished files once all their lines settled; their generation is remembered."""
        keep = []
        for f in self._finishing:
            if f.stream and self._flow.tracker.in_flight(f.stream):
                keep.append(f)
                continue
            self._close_fd(f)
            if not f.stream:
                self._checkpoints.remove(pending_key(f.key))
            else:
                self._flow.forget(f.stream)
                self._by_stream.pop(f.stream, None)
                self._checkpoints.remove(f.stream)
                self._checkpoints.retire(f.key, f.gen)
        self._finishing = keep

    # -- checkpoints: the commit loop ------------------------------------------------------------

    def _snapshot(self) -> None:
        """Move each file's checkpoint to the position up to which everything is settled."""
        for f in self._by_stream.values():
            if f.done or f.fd < 0:
                continue
            offset = self._flow.tracker.committable(f.stream)
            if offset is None or offset == f.committed:
                continue
            try:
                self._checkpoints.save(f, offset)
            except OSError as err:
                log.error("%s: checkpoint of %s: %s", self.name, f.path, err)
        for key in self._checkpoints.expire_retired():
            if key not in self._files:
                self._generations.forget(key)

    async def _save(self) -> None:
        self._snapshot()
        try:
            await self._checkpoints.flush()
        except OSError as err:
            log.error("%s: cannot write checkpoints to %s: %s", self.name, self._checkpoints.path, err)

    async def _checkpoint_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.checkpoint_interval)
            self._retire_finished()
            await self._save()

    # -- change events ---------------------------------------------------------------------------

    def _on_changes(self, changes: Iterable[tuple[Any, str]]) -> None:
        from watchfiles import Change
        for change, path in changes:
            f = self._by_path.get(path)
            if f is not None:
                self._due[f] = None
                if change == Change.modified:
                    continue
            if f is not None or self._paths.wanted(path) or (change == Change.added and os.path.isdir(path)):
                self._rescan_wanted = True
        for f in self._files.values():
            if not f.live:
                self._due[f] = None
        self._wake.set()

    def _set_watched(self, count: int) -> None:
        metrics.FILES_WATCHED.inc(count - self._watched)
        self._watched = count
