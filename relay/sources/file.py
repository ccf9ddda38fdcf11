"""`type = "file"`: tails the files that globs match, one line per message, through rotation and crashes.

Identity. A file is known by its device, inode and a checksum of its first bytes (`fingerprint_bytes`,
or the whole file while it is shorter). The checksum window is fixed when the file is first read and
saved in the checkpoint before any of its lines is emitted, so a file shorter than the window is read
at once and keeps one identity as it grows; two files with the same first line differ by inode. The
stream id, `<dev>.<inode>.<checksum>[.<generation>]`, is stable across restarts, so a line delivered
again after a crash carries the same idempotency key (source, file identity, byte offset).

Rotation. A file that leaves the glob (renamed or deleted) is still read through its open handle to
its end, and followed for `rotate_wait` in case its writer appends late, then forgotten. A file whose
bytes before the read position changed or that became shorter was truncated (copytruncate): the rest
of the old content is read from the copy beside it (same first bytes, long enough, same bytes before
the read position), and the truncated file starts again at 0 under a new generation of its identity.

Checkpoints (`state_dir/file-<source>.json`) hold, for each file identity, the offset up to which
every line was settled; they are written every `checkpoint_interval` when something changed and on
close. A restart finds each file again by device and inode and checks its first bytes and the bytes
before the saved offset; a file renamed while the relay was down is found in its directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import glob
import hashlib
import logging
import os
import re
import resource
import stat
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from relay import metrics
from relay.acks import ContiguousTracker
from relay.checkpoints import Checkpoints, instance_id
from relay.message import Message
from relay.sources import Emit
from relay.units import Duration, Size

log = logging.getLogger("relay.sources.file")

CHUNK = 64 * 1024
# Bytes before the read position compared on every read: a change means the file was truncated.
TAIL = 32
# What an oversized line keeps as data for the dead letter file.
PREVIEW = 1024
# Chunks read from one file before the others get a turn.
CHUNKS_PER_TURN = 16
# A forgotten file's generation is remembered this long (twice Centrifugo's idempotency window),
# so a new file that reuses its inode and first bytes never repeats its idempotency keys.
RETIRED_KEEP = 600.0
RETIRED = "retired:"
# A file found empty: saved by device and inode, so that if it is renamed away while the relay is
# down, the restart still finds it (its identity is fixed once it has bytes).
PENDING = "pending:"
# Change events are grouped for this long at most, and yielded after this much quiet (ms).
WATCH_DEBOUNCE_MS = 50
WATCH_STEP_MS = 2
RESCAN_MIN_GAP = 0.05
_MAGIC = re.compile(r"[*?[]")
# File descriptors left to the rest of the process (sockets, the checkpoint and dead letter files,
# the glob's directory listings): the tail holds at most the soft limit minus this many files open.
FD_RESERVE = 128
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


CheckpointEntry = FileEntry | PendingEntry | RetiredEntry


def entry_model(key: str) -> type[CheckpointEntry] | None:
    """The model of a checkpoint entry by the form of its key; None for a key the tail never writes."""
    if key.startswith(RETIRED):
        return RetiredEntry
    if key.startswith(PENDING):
        return PendingEntry
    return FileEntry if _STREAM_KEY.fullmatch(key) else None


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["file"]
    paths: list[str] = Field(min_length=1, description=(
        'Globs of the files to tail, like "/var/log/app/*.log"; "**" matches any depth of directories. '
        "Relative globs are taken from the working directory. Keep rotated names out of them."))
    exclude: list[str] = Field(default_factory=list, description=(
        'Globs of files to skip; one without "/" is matched against the file name, like "*.gz".'))
    read_from: Literal["beginning", "end"] = Field("beginning", description=(
        "Where the files found at the very first start (no checkpoint file yet) begin; files that appear "
        "later are always read from the beginning, and a file with a checkpoint resumes there."))
    max_line_bytes: Size = Field(1024 * 1024, description=(
        "A longer line goes to the dead letter file with a short preview, and reading goes on at the "
        "next line."))
    fingerprint_bytes: int = Field(256, ge=1, le=65536, description=(
        "How many first bytes of a file (with its device and inode) identify it."))
    glob_interval: Duration = Field(1.0, description="How often the globs are matched again.")
    poll_interval: Duration = Field(0.25, description=(
        "How often every file is checked for new data even without a change event."))
    rotate_wait: Duration = Field(5.0, description=(
        "How long a file that left the glob (renamed or deleted) is followed after reaching its end."))
    checkpoint_interval: Duration = Field(1.0, description="How often settled positions are saved.")
    max_in_flight: int = Field(10_000, ge=1, description=(
        "Lines of one file emitted and not yet settled before reading that file pauses."))
    batch_size: int = Field(500, ge=1, le=10_000, description="Most lines handed to the pipeline at once.")

    @field_validator("paths", "exclude")
    @classmethod
    def _globs(cls, value: list[str]) -> list[str]:
        for item in value:
            if not item.strip():
                raise ValueError("an empty glob")
        return value

    @field_validator("glob_interval", "poll_interval", "checkpoint_interval")
    @classmethod
    def _positive(cls, value: float) -> float:
        if value <= 0:
            raise ValueError("must be more than 0s")
        return value

    @field_validator("rotate_wait")
    @classmethod
    def _not_negative(cls, value: float) -> float:
        if value < 0:
            raise ValueError("must not be negative")
        return value


@dataclass(slots=True)
class _Skip:
    """An oversized line being skipped: where it started, how long it is so far, its first bytes."""

    start: int
    length: int
    preview: bytes


@dataclass(slots=True, eq=False)
class _File:
    path: str
    fd: int
    dev: int
    ino: int
    live: bool = True  # matched by the globs; False once renamed away or deleted
    stream: str = ""   # "" until identified (the file had no bytes yet)
    window: int = 0
    digest: str = ""
    gen: int = 0
    read_pos: int = 0  # every byte before it was read; `pending` holds the unfinished last line
    line_no: int = 0
    pending: bytes = b""
    tail: bytes = b""  # the bytes just before read_pos
    skip: _Skip | None = None
    committed: int = 0
    eof_since: float | None = None
    at_eof: bool = False  # read to its end: a candidate to close while descriptors are short
    start_at_end: bool = False  # read_from = "end" applies when it is identified
    done: bool = False

    @property
    def key(self) -> tuple[int, int]:
        return (self.dev, self.ino)

    @property
    def name(self) -> str:
        return os.path.basename(self.path)


def _digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=8).hexdigest()


def _stream_id(instance: str, dev: int, ino: int, digest: str, gen: int) -> str:
    base = f"{instance}.{dev:x}.{ino:x}.{digest[:12]}"
    return f"{base}.{gen}" if gen else base


def _pending_key(f: _File) -> str:
    return f"{PENDING}{f.dev:x}.{f.ino:x}"


def _count_lines(fd: int, end: int) -> int:
    count, pos = 0, 0
    while pos < end:
        chunk = os.pread(fd, min(1 << 20, end - pos), pos)
        if not chunk:
            break
        count += chunk.count(b"\n")
        pos += len(chunk)
    return count


def _last_line_end(fd: int, size: int) -> int:
    """Where reading from "the end" starts: after the last complete line (a line being written is kept)."""
    span = min(size, CHUNK)
    data = os.pread(fd, span, size - span)
    i = data.rfind(b"\n")
    if i >= 0:
        return size - span + i + 1
    return 0 if span == size else size


def _matches(fd: int, size: int, window: int, digest: str, offset: int, tail_digest: str) -> bool:
    """Does this file hold the same first `window` bytes and the same bytes before `offset`?"""
    if size < offset or size < window:
        return False
    if _digest(os.pread(fd, window, 0)) != digest:
        return False
    t = min(TAIL, offset)
    return _digest(os.pread(fd, t, offset - t)) == tail_digest


def _open(path: str) -> tuple[int, os.stat_result] | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    return fd, os.fstat(fd)


def _find_inode(directory: str, key: tuple[int, int]) -> str | None:
    """The path of the file with this device and inode in `directory` (a file renamed beside itself)."""
    with contextlib.suppress(OSError):
        for item in os.scandir(directory):
            if item.inode() == key[1] and item.stat(follow_symlinks=False).st_dev == key[0]:
                return item.path
    return None


def _listable(directory: str) -> bool:
    """Can the directory be listed? (A directory that does not exist is listed: it holds nothing.)"""
    try:
        with os.scandir(directory):
            return True
    except (FileNotFoundError, NotADirectoryError):
        return True
    except OSError:
        return False


def _fd_budget() -> int:
    """How many files the tail may hold open: the soft limit (raised to the hard one, as Go programs
    do at start) minus what the rest of the process needs."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = min(hard, 1 << 20) if hard != resource.RLIM_INFINITY else 1 << 20
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
    return max(8, soft - max(FD_RESERVE, soft // 8))


def _cut_in_place(fd: int, size: int, window: int, digest: str) -> bool:
    """Does a file that is now shorter still begin with its first bytes (`truncate -s`, not new content)?"""
    return size >= window and _digest(os.pread(fd, window, 0)) == digest


class FileTail:
    """Tails every file the globs match; positions are (file identity, byte offset past the line)."""

    def __init__(self, name: str, config: Config, state_dir: Path) -> None:
        self.name = name
        self.config = config
        self._patterns = [os.path.abspath(os.path.expanduser(p)) for p in config.paths]
        # fnmatch lets "*" cross "/", so it over-matches glob: good enough to tell which events matter.
        self._event_patterns = sorted({q for p in self._patterns for q in (p, p.replace("**" + os.sep, ""))})
        self._checkpoints: Checkpoints[CheckpointEntry] = Checkpoints(state_dir / f"file-{name}.json",
                                                                       entry_model)
        self._instance_path = state_dir / f"file-{name}.instance"
        self._instance = ""
        self._tracker = ContiguousTracker()
        self._files: dict[tuple[int, int], _File] = {}
        self._by_path: dict[str, _File] = {}
        self._by_stream: dict[str, _File] = {}
        self._finishing: list[_File] = []
        self._gen_floor: dict[tuple[int, int], int] = {}
        self._due: dict[_File, None] = {}  # an ordered set: files to read on the next turn
        self._blocked: dict[str, _File] = {}
        self._wake = asyncio.Event()
        self._stopped = False
        self._unsaved = False  # identities not yet in the checkpoint file: saved before their lines go out
        self._rescan_wanted = False
        self._last_scan = 0.0
        self._watch_stop: asyncio.Event | None = None
        self._watch_roots: tuple[list[str], bool] = ([], False)
        self._force_polling = False
        self._tasks: list[asyncio.Task[None]] = []
        self._warned: set[str] = set()
        self._unlisted: set[str] = set()  # paths kept while their directory cannot be listed
        self._unresolved: list[tuple[str, FileEntry]] = []  # saved files whose directory could not be read
        self._watched = 0
        self._resume_below = max(1, config.max_in_flight // 2)
        self._fd_budget = 0
        self._held = 0  # files holding an open descriptor
        self._no_room = False
        self.started = asyncio.Event()  # set once the first scan is done

    # -- the Source protocol -------------------------------------------------------------------

    async def run(self, emit: Emit) -> None:
        self._instance = instance_id(self._instance_path)
        self._fd_budget = self._fd_budget or _fd_budget()
        self._checkpoints.load()
        await self._scan(initial=True)
        self._tasks = [asyncio.create_task(self._watch(), name=f"file-{self.name}-watch"),
                       asyncio.create_task(self._checkpoint_loop(), name=f"file-{self.name}-checkpoints")]
        self.started.set()
        try:
            await self._loop(emit)
        finally:
            self._stop_watcher()

    async def stop(self) -> None:
        self._stopped = True
        self._stop_watcher()
        self._wake.set()

    async def close(self) -> None:
        self._stopped = True
        self._stop_watcher()
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

    @property
    def checkpoint_path(self) -> Path:
        return self._checkpoints.path

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
                self._no_room = False
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
                if f.stream and self._tracker.in_flight(f.stream) >= self.config.max_in_flight:
                    self._blocked[f.stream] = f
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

    async def _emit(self, emit: Emit, out: list[Message]) -> None:
        if self._unsaved:
            self._unsaved = False
            await self._save()
        size = self.config.batch_size
        for i in range(0, len(out), size):
            await emit(out[i:i + size])

    async def _read_chunk(self, f: _File, out: list[Message]) -> bool:
        """Read the next chunk of a file into messages; False at its end."""
        try:
            if not f.stream:
                size = os.fstat(f.fd).st_size
                if size == 0:
                    return self._at_end(f, out)
                await self._identify(f, size, at_end=f.start_at_end)
            tl = len(f.tail)
            data = os.pread(f.fd, CHUNK + tl, f.read_pos - tl)
        except OSError as err:
            log.error("%s: cannot read (%s); giving it up", f.path, err)
            self._finish(f, out)
            return False
        if data[:tl] != f.tail:
            await self._truncated(f)
            return True
        if len(data) == tl:
            return self._at_end(f, out)
        f.eof_since, f.at_eof = None, False
        budget = self.config.max_in_flight - self._tracker.in_flight(f.stream)
        self._lines(f, data[tl:] if tl else data, out, budget)
        return True

    def _lines(self, f: _File, data: bytes, out: list[Message], budget: int) -> None:
        """Split a chunk into lines, at most `budget` of them; the unfinished last line waits in
        `pending` for its newline."""
        start = f.read_pos - len(f.pending)
        f.read_pos += len(data)
        f.tail = data[-TAIL:] if len(data) >= TAIL else (f.tail + data)[-TAIL:]
        buf = f.pending + data if f.pending else data
        stream = f.stream
        emitted = self._tracker.emitted
        if f.skip is not None:
            i = buf.find(b"\n")
            if i < 0:
                f.skip.length += len(buf)
                return
            skip, f.skip = f.skip, None
            end = start + i + 1
            f.line_no += 1
            out.append(self._oversized(f, skip.start, end, skip.length + i, skip.preview))
            emitted(stream, end)
            buf, start = buf[i + 1:], end
        last = buf.rfind(b"\n")
        rest, rest_start = buf, start
        if last >= 0:
            rest, rest_start = buf[last + 1:], start + last + 1
            name, path, file_name, ack = self.name, f.path, f.name, self._on_settled
            limit = self.config.max_line_bytes
            append = out.append
            n, pos = f.line_no, start
            lines = buf[:last].split(b"\n")
            if len(lines) > budget:
                del lines[max(budget, 1):]
                last = -1  # the rest is read again once lines settle
            for line in lines:
                n += 1
                length = len(line)
                end = pos + length + 1
                if length > limit:
                    f.line_no = n
                    append(self._oversized(f, pos, end, length, line[:PREVIEW]))
                else:
                    if line[-1:] == b"\r":
                        line = line[:-1]
                    append(Message(name, line, stream, end, None, {}, {
                        "file.path": path, "file.name": file_name, "file.line": n, "file.offset": pos}, ack))
                emitted(stream, end)
                pos = end
            f.line_no = n
            if last < 0:
                f.read_pos, f.pending = pos, b""
                t = min(TAIL, pos)
                f.tail = os.pread(f.fd, t, pos - t)
                return
        if len(rest) > self.config.max_line_bytes:
            f.skip = _Skip(start=rest_start, length=len(rest), preview=rest[:PREVIEW])
            f.pending = b""
        else:
            f.pending = rest

    def _oversized(self, f: _File, start: int, end: int, length: int, preview: bytes) -> Message:
        text = preview[:80].decode("utf-8", "replace")
        error = (f"line over max_line_bytes ({length} bytes, limit {self.config.max_line_bytes}) "
                 f"at {f.path}:{f.line_no}: {text!r}...")
        log.warning("%s: %s", self.name, error)
        return Message(self.name, preview[:PREVIEW], f.stream, end, attributes={
            "file.path": f.path, "file.name": f.name, "file.line": f.line_no, "file.offset": start,
            "error": error}, on_settled=self._on_settled)

    def _at_end(self, f: _File, out: list[Message]) -> bool:
        f.at_eof = True
        if not f.live:
            now = time.monotonic()
            if f.eof_since is None:
                f.eof_since = now
            elif now - f.eof_since >= self.config.rotate_wait:
                self._finish(f, out)
        return False

    def _on_settled(self, msg: Message) -> None:
        self._tracker.settled(msg.stream, msg.offset)
        if self._blocked:
            f = self._blocked.get(msg.stream)
            if f is not None and self._tracker.in_flight(msg.stream) <= self._resume_below:
                del self._blocked[msg.stream]
                self._due[f] = None
                self._wake.set()

    # -- identity ------------------------------------------------------------------------------

    async def _identify(self, f: _File, size: int, at_end: bool) -> None:
        """Fix a file's identity from its first bytes; it is saved before any of its lines is emitted."""
        head = os.pread(f.fd, min(self.config.fingerprint_bytes, size), 0)
        f.window, f.digest = len(head), _digest(head)
        await self._new_generation(f, _last_line_end(f.fd, size) if at_end else 0)

    async def _new_generation(self, f: _File, start: int) -> None:
        """Give a file (window and digest known) the next generation of its identity, read from `start`."""
        key = f.key
        f.gen = self._gen_floor[key] + 1 if key in self._gen_floor else 0
        self._gen_floor[key] = f.gen
        f.stream = _stream_id(self._instance, f.dev, f.ino, f.digest, f.gen)
        await self._position(f, start)
        self._by_stream[f.stream] = f
        self._checkpoints.remove(_pending_key(f))
        self._save_entry(f, f.read_pos)
        self._unsaved = True

    async def _position(self, f: _File, offset: int) -> None:
        f.read_pos = f.committed = offset
        t = min(TAIL, offset)
        f.tail = os.pread(f.fd, t, offset - t)
        if offset > 8 * CHUNK:
            f.line_no = await asyncio.to_thread(_count_lines, f.fd, offset)
        else:
            f.line_no = _count_lines(f.fd, offset)

    def _save_entry(self, f: _File, offset: int) -> None:
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
        self._checkpoints.put(f.stream, FileEntry(
            path=f.path, dev=f.dev, ino=f.ino, window=f.window, digest=f.digest, gen=f.gen, offset=offset,
            tail=_digest(tail)))

    def _register(self, f: _File) -> None:
        self._files[f.key] = f
        if f.fd >= 0:
            self._held += 1
        if f.live:
            self._by_path[f.path] = f
        if f.stream:
            self._by_stream[f.stream] = f
        self._due[f] = None

    # -- open descriptors ----------------------------------------------------------------------

    def _room(self) -> bool:
        """Make room for one more open file, closing idle ones (read to their end, all settled)."""
        if self._held < self._fd_budget:
            return True
        if self._no_room:
            return False  # looked already and found none idle: look again at the next poll
        want = max(1, self._fd_budget // 16)
        idle = [f for f in self._files.values() if self._parkable(f)]
        idle.sort(key=lambda f: not f.at_eof)  # those read to their end first
        for f in idle[:want]:
            self._close_fd(f)
        self._no_room = self._held >= self._fd_budget
        return not self._no_room

    def _parkable(self, f: _File) -> bool:
        if f.fd < 0 or not f.live or f.done or f.skip is not None or f in self._due:
            return False
        if not f.stream:
            return f.at_eof
        return self._tracker.in_flight(f.stream) == 0 and self._tracker.committable(f.stream) in (None, f.committed)

    async def _unpark(self, f: _File) -> bool:
        """Open a file closed to save descriptors again, if it has anything to read; True if open."""
        path: str | None = f.path
        if f.live:
            try:
                st = os.stat(f.path)
            except OSError:
                st = None
            if st is not None and (st.st_dev, st.st_ino) == f.key:
                if st.st_size == f.read_pos:
                    return False  # nothing new: it stays closed
            else:
                path = None
        if path is None or not f.live:
            path = _find_inode(os.path.dirname(f.path), f.key)
            if path is None:
                log.info("%s: %s went away while closed to save descriptors; lines written to it after "
                         "offset %d, if any, were not read", self.name, f.path, f.read_pos)
                self._finish(f, [])
                return False
        if not self._room():
            return False  # every open file is busy: tried again at the next poll
        opened = _open(path)
        if opened is None or (opened[1].st_dev, opened[1].st_ino) != f.key:
            if opened is not None:
                os.close(opened[0])
            return False
        f.fd = opened[0]
        self._held += 1
        if path != f.path:  # renamed away while closed: it left the glob
            self._leave(f)
            f.path = path
        return True

    # -- finding files -------------------------------------------------------------------------

    def _excluded(self, path: str) -> bool:
        name = os.path.basename(path)
        return any(fnmatch.fnmatchcase(path if os.sep in pattern else name, pattern)
                   for pattern in self.config.exclude)

    def _glob(self) -> dict[tuple[int, int], str]:
        found: dict[tuple[int, int], str] = {}
        for pattern in self._patterns:
            for path in glob.iglob(pattern, recursive=True):
                if self._excluded(path):
                    continue
                try:
                    st = os.stat(path)
                except OSError:
                    continue
                if stat.S_ISREG(st.st_mode):
                    found.setdefault((st.st_dev, st.st_ino), path)
        return found

    def _gone(self, f: _File) -> bool:
        """Did a file the glob did not list really leave its path? A failed listing (a directory that
        cannot be read, no file descriptors left) is not an empty one: the file is kept."""
        try:
            st = os.stat(f.path)
        except (FileNotFoundError, NotADirectoryError):
            return True
        except OSError as err:
            if f.path not in self._unlisted:
                self._unlisted.add(f.path)
                log.warning("%s: cannot list %s (%s); keeping it and trying again", self.name, f.path,
                            err.strerror)
            return False
        if (st.st_dev, st.st_ino) != f.key:
            return True
        if f.path not in self._unlisted:
            self._unlisted.add(f.path)
            log.warning("%s: the glob did not list %s, which is still there (a directory listing failed); "
                        "keeping it and trying again", self.name, f.path)
        return False

    def _leave(self, f: _File) -> None:
        f.live = False
        if self._by_path.get(f.path) is f:
            del self._by_path[f.path]
        self._due[f] = None
        log.info("%s: %s left the glob (renamed or deleted); reading it to its end", self.name, f.path)

    async def _scan(self, initial: bool = False) -> None:
        self._rescan_wanted = False
        self._last_scan = time.monotonic()
        found = self._glob()
        if initial:
            await self._resume_from_checkpoints(found)
        elif self._unresolved:
            saved, self._unresolved = self._unresolved, []
            await self._resume_saved(saved, found)
        at_end = initial and not self._checkpoints.existed and self.config.read_from == "end"
        for key, path in found.items():
            if self._unlisted and path in self._unlisted:
                self._unlisted.discard(path)
                log.info("%s: %s is listed again", self.name, path)
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
            if f.live and key not in found and self._gone(f):
                self._leave(f)
        self._set_watched(len(self._files))
        if self._unsaved:
            self._unsaved = False
            await self._save()
        if self._watch_stop is not None and self._roots() != self._watch_roots:
            self._watch_stop.set()  # directories appeared or went: the watcher starts again on the new set

    async def _discover(self, key: tuple[int, int], path: str, at_end: bool, initial: bool) -> None:
        """A file the glob lists for the first time: opened and identified now, or, while every
        descriptor the tail may use is busy, remembered closed and opened at its turn."""
        if not self._room():
            f = _File(path=path, fd=-1, dev=key[0], ino=key[1], start_at_end=at_end)
            self._checkpoints.put(_pending_key(f), PendingEntry(path=path, dev=f.dev, ino=f.ino))
            self._unsaved = True
            self._register(f)
            return
        opened = _open(path)
        if opened is None:
            if path not in self._warned:
                self._warned.add(path)
                log.warning("%s: cannot open %s; trying again at the next scan", self.name, path)
            return
        fd, st = opened
        if (st.st_dev, st.st_ino) != key or key in self._files:
            os.close(fd)  # replaced between glob and open: the next scan sees the new one
            return
        f = _File(path=path, fd=fd, dev=st.st_dev, ino=st.st_ino)
        if st.st_size > 0:
            await self._identify(f, st.st_size, at_end=at_end)
        else:
            self._checkpoints.put(_pending_key(f), PendingEntry(path=path, dev=f.dev, ino=f.ino))
            self._unsaved = True
        self._register(f)
        if not initial:
            log.info("%s: new file %s", self.name, path)

    async def _resume_from_checkpoints(self, found: dict[tuple[int, int], str]) -> None:
        """Match saved identities to files: by device and inode, or in their directory if renamed."""
        now = time.time()
        saved = []
        for key, entry in list(self._checkpoints.entries.items()):
            ident = (entry.dev, entry.ino)
            if isinstance(entry, PendingEntry):
                self._resume_pending(key, entry, found)
                continue
            self._gen_floor[ident] = max(self._gen_floor.get(ident, -1), entry.gen)
            if isinstance(entry, RetiredEntry):
                if now - entry.at > RETIRED_KEEP:
                    self._checkpoints.remove(key)
            else:
                saved.append((key, entry))
        await self._resume_saved(saved, found)

    async def _resume_saved(self, saved: list[tuple[str, FileEntry]], found: dict[tuple[int, int], str]) -> None:
        lost = []
        for stream, entry in saved:
            ident = (entry.dev, entry.ino)
            path = found.get(ident)
            opened = _open(path) if path is not None and ident not in self._files else None
            if opened is not None:
                fd, st = opened
                if (st.st_dev, st.st_ino) == ident:
                    if _matches(fd, st.st_size, entry.window, entry.digest, entry.offset, entry.tail):
                        await self._resume(stream, entry, path or "", fd, st, live=True)
                        continue
                    if st.st_size < entry.offset and _cut_in_place(fd, st.st_size, entry.window, entry.digest):
                        await self._resume_cut(stream, entry, path or "", fd, st)
                        continue
                os.close(fd)
            lost.append((stream, entry))
        for stream, entry in lost:
            directory = os.path.dirname(entry.path)
            match = self._find_match(directory, entry.window, entry.digest, entry.offset, entry.tail,
                                     prefer=(entry.dev, entry.ino))
            if match is None and not _listable(directory):
                # Not knowing is not gone: the entry stays, and is matched again at every scan.
                log.warning("%s: cannot list %s to find %s; keeping its checkpoint and trying again",
                            self.name, directory, entry.path)
                self._unresolved.append((stream, entry))
                continue
            if match is None:
                log.warning("%s: %s (%s) is gone or changed; forgetting its checkpoint at offset %d",
                            self.name, entry.path, stream, entry.offset)
                self._checkpoints.remove(stream)
                self._retire_mark(entry.dev, entry.ino, entry.gen)
                continue
            path, fd, st = match
            log.info("%s: %s was rotated while stopped; resuming it as %s at offset %d",
                     self.name, entry.path, path, entry.offset)
            await self._resume(stream, entry, path, fd, st, live=(st.st_dev, st.st_ino) in found)

    def _resume_pending(self, key: str, entry: PendingEntry, found: dict[tuple[int, int], str]) -> None:
        """A file that was empty when last seen: the same inode, in the glob or renamed in its directory."""
        ident = (entry.dev, entry.ino)
        path = found.get(ident) or _find_inode(os.path.dirname(entry.path), ident)
        opened = _open(path) if path is not None else None
        if opened is None or (opened[1].st_dev, opened[1].st_ino) != ident or ident in self._files:
            if opened is not None:
                os.close(opened[0])
            self._checkpoints.remove(key)
            return
        fd, st = opened
        self._register(_File(path=path or "", fd=fd, dev=st.st_dev, ino=st.st_ino, live=ident in found))

    async def _resume(self, stream: str, entry: FileEntry, path: str, fd: int, st: os.stat_result,
                      live: bool) -> None:
        f = _File(path=path, fd=fd, dev=st.st_dev, ino=st.st_ino, live=live, stream=stream,
                  window=entry.window, digest=entry.digest, gen=entry.gen)
        await self._position(f, entry.offset)
        self._gen_floor[f.key] = max(self._gen_floor.get(f.key, -1), f.gen)
        self._register(f)
        self._save_entry(f, f.read_pos)

    async def _resume_cut(self, stream: str, entry: FileEntry, path: str, fd: int, st: os.stat_result) -> None:
        """Cut shorter in place while stopped (`truncate -s`, or a checkpoint ahead of the file): what
        is left was read; new lines go on after it under a new generation, nothing is read again."""
        log.warning("%s: %s is shorter (%d bytes) than its checkpoint (offset %d) but begins with the same "
                    "bytes: cut in place; reading on at its end", self.name, path, st.st_size, entry.offset)
        self._checkpoints.remove(stream)
        self._retire_mark(entry.dev, entry.ino, entry.gen)
        f = _File(path=path, fd=fd, dev=st.st_dev, ino=st.st_ino, window=entry.window, digest=entry.digest)
        await self._new_generation(f, _last_line_end(fd, st.st_size))
        self._register(f)

    def _find_match(self, directory: str, window: int, digest: str, offset: int, tail_digest: str,
                    prefer: tuple[int, int] | None = None) -> tuple[str, int, os.stat_result] | None:
        """A file in `directory` with the given first bytes and bytes before `offset`, not yet followed:
        a renamed file (the same inode, preferred) or a copy (copytruncate); the newest one wins."""
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
            key = (st.st_dev, st.st_ino)
            if not stat.S_ISREG(st.st_mode) or key in self._files or st.st_size < offset:
                continue
            opened = _open(item.path)
            if opened is None:
                continue
            fd, st = opened
            if not _matches(fd, st.st_size, window, digest, offset, tail_digest):
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

    async def _truncated(self, f: _File) -> None:
        """The bytes before the read position changed: copytruncate. Finish from the copy, restart at 0;
        or, with no copy and the same first bytes, cut in place (`truncate -s`): go on at the new end."""
        fresh = _File(path=f.path, fd=f.fd, dev=f.dev, ino=f.ino, live=f.live)
        self._files[f.key] = fresh
        if self._by_path.get(f.path) is f:
            self._by_path[f.path] = fresh
        self._due[fresh] = None
        if not f.stream:
            f.fd, f.done = -1, True
            return
        match = self._find_match(os.path.dirname(f.path), f.window, f.digest, f.read_pos, _digest(f.tail))
        if match is None:
            size = os.fstat(fresh.fd).st_size
            if size < f.read_pos and _cut_in_place(fresh.fd, size, f.window, f.digest):
                log.warning("%s: %s was cut to %d bytes in place; reading on at its new end", self.name,
                            f.path, size)
                fresh.window, fresh.digest = f.window, f.digest
                await self._new_generation(fresh, _last_line_end(fresh.fd, size))
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
        self._held += 1
        self._files[f.key] = f
        self._gen_floor[f.key] = max(self._gen_floor.get(f.key, -1), f.gen)
        self._save_entry(f, f.committed)
        self._due[f] = None

    # -- forgetting ------------------------------------------------------------------------------

    def _finish(self, f: _File, out: list[Message]) -> None:
        """Stop reading a file that is gone: its last line is complete even without a newline."""
        if f.stream and f.fd >= 0 and (f.pending or f.skip is not None):
            end = f.read_pos
            f.line_no += 1
            if f.skip is not None:
                out.append(self._oversized(f, f.skip.start, end, f.skip.length, f.skip.preview))
            else:
                line = f.pending[:-1] if f.pending.endswith(b"\r") else f.pending
                out.append(Message(self.name, line, f.stream, end, attributes={
                    "file.path": f.path, "file.name": f.name, "file.line": f.line_no,
                    "file.offset": end - len(f.pending)}, on_settled=self._on_settled))
            self._tracker.emitted(f.stream, end)
            f.pending, f.skip = b"", None
        f.done = True
        if self._files.get(f.key) is f:
            del self._files[f.key]
        if self._by_path.get(f.path) is f:
            del self._by_path[f.path]
        self._due.pop(f, None)
        self._blocked.pop(f.stream, None)
        self._finishing.append(f)
        self._set_watched(len(self._files))
        log.info("%s: done with %s", self.name, f.path)

    def _retire_finished(self) -> None:
        """Forget finished files once all their lines settled; their generation is remembered."""
        keep = []
        for f in self._finishing:
            if f.stream and self._tracker.in_flight(f.stream):
                keep.append(f)
                continue
            self._close_fd(f)
            if not f.stream:
                self._checkpoints.remove(_pending_key(f))
            else:
                self._tracker.forget(f.stream)
                self._by_stream.pop(f.stream, None)
                self._checkpoints.remove(f.stream)
                self._retire_mark(f.dev, f.ino, f.gen)
        self._finishing = keep

    def _retire_mark(self, dev: int, ino: int, gen: int) -> None:
        key = f"{RETIRED}{dev:x}.{ino:x}"
        previous = self._checkpoints.get(key)
        gen = max(gen, previous.gen) if isinstance(previous, RetiredEntry) else gen
        self._checkpoints.put(key, RetiredEntry(dev=dev, ino=ino, gen=gen, at=round(time.time(), 3)))

    def _close_fd(self, f: _File) -> None:
        if f.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(f.fd)
            f.fd = -1
            self._held -= 1

    # -- checkpoints -----------------------------------------------------------------------------

    def _snapshot(self) -> None:
        """Move each file's checkpoint to the position up to which everything is settled."""
        for f in self._by_stream.values():
            if f.done or f.fd < 0:
                continue
            offset = self._tracker.committable(f.stream)
            if offset is None or offset == f.committed:
                continue
            try:
                self._save_entry(f, offset)
            except OSError as err:
                log.error("%s: checkpoint of %s: %s", self.name, f.path, err)
        now = time.time()
        for key, entry in list(self._checkpoints.entries.items()):
            if isinstance(entry, RetiredEntry) and now - entry.at > RETIRED_KEEP:
                self._checkpoints.remove(key)
                ident = (entry.dev, entry.ino)
                if ident not in self._files:
                    self._gen_floor.pop(ident, None)

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

    def _roots(self) -> tuple[list[str], bool]:
        """The existing directories to watch, and whether any glob needs them watched recursively."""
        roots: set[str] = set()
        recursive = False
        for pattern in self._patterns:
            parts = pattern.split(os.sep)
            fixed = next((i for i, part in enumerate(parts) if _MAGIC.search(part)), len(parts))
            if fixed < len(parts) - 1:
                recursive = True
            root = os.sep.join(parts[:min(fixed, len(parts) - 1)]) or os.sep
            # A directory that does not exist yet is found by the next glob scan, then watched.
            if os.path.isdir(root):
                roots.add(root)
        return sorted(roots), recursive

    async def _watch(self) -> None:
        from watchfiles import awatch
        while not self._stopped:
            self._watch_roots = self._roots()
            roots, recursive = self._watch_roots
            stop = self._watch_stop = asyncio.Event()
            if not roots:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self.config.glob_interval)
                continue
            try:
                async for changes in awatch(*roots, watch_filter=None, debounce=WATCH_DEBOUNCE_MS,
                                            step=WATCH_STEP_MS, stop_event=stop, recursive=recursive,
                                            force_polling=self._force_polling, poll_delay_ms=100,
                                            ignore_permission_denied=True):
                    self._on_changes(changes)
            except Exception as err:
                if self._stopped:
                    break
                if not self._force_polling:
                    log.warning("%s: change events unavailable (%s); polling for changes instead",
                                self.name, err)
                    self._force_polling = True
                else:
                    log.warning("%s: watching %s failed (%s); checking every %gs", self.name, roots, err,
                                self.config.poll_interval)
                    await asyncio.sleep(self.config.glob_interval)

    def _stop_watcher(self) -> None:
        if self._watch_stop is not None:
            self._watch_stop.set()

    def _on_changes(self, changes: Iterable[tuple[Any, str]]) -> None:
        from watchfiles import Change
        for change, path in changes:
            f = self._by_path.get(path)
            if f is not None:
                self._due[f] = None
                if change == Change.modified:
                    continue
            if f is not None or self._wanted(path) or (change == Change.added and os.path.isdir(path)):
                self._rescan_wanted = True
        for f in self._files.values():
            if not f.live:
                self._due[f] = None
        self._wake.set()

    def _wanted(self, path: str) -> bool:
        return any(fnmatch.fnmatchcase(path, p) for p in self._event_patterns) and not self._excluded(path)

    def _set_watched(self, count: int) -> None:
        metrics.FILES_WATCHED.inc(count - self._watched)
        self._watched = count


def build(name: str, config: Config, state_dir: Path) -> FileTail:
    return FileTail(name, config, state_dir)
