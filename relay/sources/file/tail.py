"""The file source's reader on the source engine (relay/sources/engine.py): finds files (discovery),
reads each (reader), follows rotation and keeps checkpoints.

The engine owns the cap of unsettled lines per file (it calls `pause`/`resume`), the byte budget,
the chunks handed to the pipeline and when to commit; `commit` moves checkpoints. A line's
`Message.offset` is the byte offset past it (its idempotency key), so `position_after` is that offset.
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

from relay import events
from relay.checkpoints import instance_id
from relay.message import Message
from relay.sources.engine import READ_MAX, READ_MAX_BYTES, Batch, Revoke
from relay.sources.file.checkpoints import FileCheckpoints, FileEntry, PendingEntry
from relay.sources.file.config import Config
from relay.sources.file.descriptors import Descriptors, fd_budget, reopen_path
from relay.sources.file.discovery import Paths, Watcher
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
        self.max_in_flight = config.max_in_flight  # the engine's cap of unsettled lines per file
        self.commit_interval = config.checkpoint_interval
        self._paths = Paths(name, config.paths, config.exclude)
        self._checkpoints = FileCheckpoints(state_dir / f"file-{name}.json")
        self._instance_path = state_dir / f"file-{name}.instance"
        self._instance = ""
        self._splitter = LineSplitter(name, config.max_line_bytes)
        self._paused: set[str] = set()  # streams at the engine's cap: not read until resumed
        self._revoke: Revoke | None = None
        self._retired: list[str] = []  # streams of forgotten files the engine has yet to forget
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
        self._next_glob = self._next_poll = 0.0
        self._tasks: list[asyncio.Task[None]] = []
        self._warned: set[str] = set()
        self._watched = 0
        self.started = asyncio.Event()  # set once the first scan is done

    # -- the Reader protocol (relay/sources/engine.py) ------------------------------------------

    def bind(self, revoke: Revoke) -> None:
        """The engine's `revoke`: finished files are forgotten by it once all their lines settled."""
        self._revoke = revoke

    @staticmethod
    def position_after(message: Message) -> int:
        """A line's offset is already the byte past it: where reading resumes (keys stay as they were)."""
        return message.offset

    async def connect(self) -> None:
        if self.started.is_set():
            return  # files never disconnect: nothing to open again
        self._instance = instance_id(self._instance_path)
        self._fds.budget = self._fds.budget or fd_budget()
        self._checkpoints.load()
        await self._scan(initial=True)
        self._tasks = [asyncio.create_task(self._watcher.run(), name=f"file-{self.name}-watch")]
        self._next_glob = self._next_poll = time.monotonic() + self.config.poll_interval
        self.started.set()

    async def read(self) -> list[Batch]:
        """The lines of the files due now (up to about READ_MAX), one batch per file; [] after waiting
        for a change, a poll or a scan."""
        self._wake.clear()
        cfg = self.config
        now = time.monotonic()
        if now >= self._next_glob or (self._rescan_wanted and now - self._last_scan >= RESCAN_MIN_GAP):
            await self._scan()
            self._next_glob = now + cfg.glob_interval
        if now >= self._next_poll:
            for f in self._files.values():
                self._due[f] = None
            await self._retire_finished()
            self._fds.retry()
            self._next_poll = now + cfg.poll_interval
        batches = await self._read_due()
        if batches:
            if self._unsaved:  # identities are saved before any of their lines goes out
                self._unsaved = False
                await self._flush()
            return batches
        if self._due:
            await asyncio.sleep(0)
            return []
        until = min(self._next_glob, self._next_poll)
        if self._rescan_wanted:
            until = min(until, self._last_scan + RESCAN_MIN_GAP)
        timeout = until - time.monotonic()
        if timeout > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)
        return []

    def pause(self, stream: str) -> None:
        self._paused.add(stream)

    def resume(self, stream: str) -> None:
        self._paused.discard(stream)
        f = self._by_stream.get(stream)
        if f is not None and not f.done:
            self._due[f] = None
            self._wake.set()

    async def commit(self, positions: dict[str, int]) -> None:
        """Move each file's checkpoint to the line end up to which everything settled, and write them."""
        for stream, offset in positions.items():
            f = self._by_stream.get(stream)
            if f is None:
                continue
            if f.done or f.fd < 0:
                f.committed = max(f.committed, offset)  # finished: its entry goes when it is retired
                continue
            try:
                self._checkpoints.save(f, offset)
            except OSError as err:
                log.error("%s: checkpoint of %s: %s", self.name, f.path, err)
        await self._flush()

    async def close(self) -> None:
        self._stopped = True
        self._watcher.stop()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        self._retire_settled()
        try:
            self._checkpoints.write()
        finally:
            for f in list(self._files.values()) + self._finishing:
                self._close_fd(f)
            self._set_watched(0)

    # -- reading ---------------------------------------------------------------------------------

    async def _read_due(self) -> list[Batch]:
        """One turn: up to CHUNKS_PER_TURN chunks of each due file, until about READ_MAX lines or
        READ_MAX_BYTES were read; files left over keep their turn for the next read."""
        batches: list[Batch] = []
        count = nbytes = 0
        files = list(self._due)
        self._due.clear()
        for i, f in enumerate(files):
            if count >= READ_MAX or nbytes >= READ_MAX_BYTES:
                for rest in files[i:]:
                    self._due[rest] = None
                break
            if f.done or f.stream in self._paused or (f.fd < 0 and not await self._unpark(f)):
                continue
            out: list[Message] = []
            for _ in range(CHUNKS_PER_TURN):
                before = f.read_pos
                more = await self._read_chunk(f, out)
                nbytes += max(0, f.read_pos - before)
                if not more or f.done or count + len(out) >= READ_MAX or nbytes >= READ_MAX_BYTES:
                    if more and not f.done:
                        self._due[f] = None
                    break
            else:
                self._due[f] = None
            if out:
                batches.append(Batch(f.stream, out, out[-1].offset))
                count += len(out)
        return batches

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
        self._splitter.split(f, data, out)
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
        f.read_pos = f.committed = f.emitted = offset
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
        return f.committed >= f.emitted

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
            await self._flush()
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

    async def _retire_finished(self) -> None:
        """Forget finished files whose lines all settled; the engine forgets their streams too."""
        if self._finishing:
            await self._flush()
        gone, self._retired = self._retired, []
        if gone and self._revoke is not None:
            await self._revoke(gone)

    def _retire_settled(self) -> list[str]:
        """Finished files whose lines are all committed are forgotten (their generation is
        remembered); their streams."""
        keep, gone = [], []
        for f in self._finishing:
            if f.stream and f.committed < f.emitted:
                keep.append(f)
                continue
            self._close_fd(f)
            if not f.stream:
                self._checkpoints.remove(pending_key(f.key))
            else:
                gone.append(f.stream)
                self._retired.append(f.stream)
                self._paused.discard(f.stream)
                self._by_stream.pop(f.stream, None)
                self._checkpoints.remove(f.stream)
                self._checkpoints.retire(f.key, f.gen)
        self._finishing = keep
        return gone

    async def _flush(self) -> None:
        """Write the checkpoint file if anything changed: finished files whose lines all settled are
        forgotten first (never written beside their next generation); retired entries past their time go."""
        self._retire_settled()
        for key in self._checkpoints.expire_retired():
            if key not in self._files:
                self._generations.forget(key)
        try:
            await self._checkpoints.flush()
        except OSError as err:
            log.error("%s: cannot write checkpoints to %s: %s", self.name, self._checkpoints.path, err)

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
        if count != self._watched:
            events.FilesWatched(count - self._watched).emit()
        self._watched = count
