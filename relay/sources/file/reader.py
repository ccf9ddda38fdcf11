"""The reader of one file: where it is, and its bytes cut into line messages.

A line ends at `\n` (a `\r` before it is dropped); the unfinished last line waits in `pending` for its
newline. A line over `max_line_bytes` is never held whole: its first bytes are kept as a preview and
the rest skipped as it arrives; it becomes one message with an `error` attribute (the dead letter).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

from relay.message import NOTHING, Message
from relay.sources.file.identity import CHUNK, TAIL, Key

log = logging.getLogger("relay.sources.file")

# What an oversized line keeps as data for the dead letter file.
PREVIEW = 1024


@dataclass(slots=True)
class Skip:
    """An oversized line being skipped: where it started, how long it is so far, its first bytes."""

    start: int
    length: int
    preview: bytes


@dataclass(slots=True, eq=False)
class TailedFile:
    """One file being followed: its descriptor, identity and read position."""

    path: str
    fd: int            # -1 while closed to save descriptors (or once done)
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
    skip: Skip | None = None
    committed: int = 0  # the checkpoint: every line before it settled
    emitted: int = 0    # the end of the last line handed over (all settled once committed reaches it)
    eof_since: float | None = None
    at_eof: bool = False  # read to its end: a candidate to close while descriptors are short
    start_at_end: bool = False  # read_from = "end" applies when it is identified
    done: bool = False

    @property
    def key(self) -> Key:
        return (self.dev, self.ino)

    @property
    def name(self) -> str:
        return os.path.basename(self.path)


def read_next(f: TailedFile) -> bytes | None:
    """The next chunk after the read position (b"" at the end), or None when the bytes before the
    read position changed: the file was truncated."""
    tl = len(f.tail)
    data = os.pread(f.fd, CHUNK + tl, f.read_pos - tl)
    if data[:tl] != f.tail:
        return None
    return data[tl:] if tl else data


class LineSplitter:
    """Cuts chunks of one source's files into messages; a message's offset is the byte past its line."""

    def __init__(self, source: str, max_line_bytes: int) -> None:
        self.source = source
        self.max_line_bytes = max_line_bytes

    def split(self, f: TailedFile, data: bytes, out: list[Message]) -> None:
        """Split a chunk into lines; the unfinished last line waits in `pending` for its newline."""
        start = f.read_pos - len(f.pending)
        f.read_pos += len(data)
        f.tail = data[-TAIL:] if len(data) >= TAIL else (f.tail + data)[-TAIL:]
        buf = f.pending + data if f.pending else data
        if f.skip is not None:
            i = buf.find(b"\n")
            if i < 0:
                f.skip.length += len(buf)
                return
            skip, f.skip = f.skip, None
            end = start + i + 1
            f.line_no += 1
            out.append(self.oversized(f, skip.start, end, skip.length + i, skip.preview))
            f.emitted = end
            buf, start = buf[i + 1:], end
        last = buf.rfind(b"\n")
        rest, rest_start = buf, start
        if last >= 0:
            rest, rest_start = buf[last + 1:], start + last + 1
            self._lines(f, buf[:last], start, out)
        if len(rest) > self.max_line_bytes:
            f.skip = Skip(start=rest_start, length=len(rest), preview=rest[:PREVIEW])
            f.pending = b""
        else:
            f.pending = rest

    def _lines(self, f: TailedFile, lines: bytes, start: int, out: list[Message]) -> None:
        """`lines` (without the last newline) starting at `start` as messages; a line over the limit
        is a dead letter with its preview, a `\r` before the newline is dropped."""
        name, stream, path, file_name = self.source, f.stream, f.path, f.name
        limit = self.max_line_bytes
        append = out.append
        read_at = time.monotonic()  # one clock reading for the chunk: its lines were read together
        n, pos = f.line_no, start
        for line in lines.split(b"\n"):
            n += 1
            length = len(line)
            end = pos + length + 1
            if length > limit:
                f.line_no = n
                append(self.oversized(f, pos, end, length, line[:PREVIEW]))
            else:
                if line[-1:] == b"\r":
                    line = line[:-1]
                append(Message(name, line, stream, end, None, NOTHING, {
                    "file.path": path, "file.name": file_name, "file.line": n, "file.offset": pos},
                    read_at))
            pos = end
        f.line_no, f.emitted = n, pos

    def last_line(self, f: TailedFile, out: list[Message]) -> None:
        """A file that is finished for good: its unfinished last line is complete as it is."""
        if not (f.stream and f.fd >= 0 and (f.pending or f.skip is not None)):
            return
        end = f.read_pos
        f.line_no += 1
        if f.skip is not None:
            out.append(self.oversized(f, f.skip.start, end, f.skip.length, f.skip.preview))
        else:
            line = f.pending[:-1] if f.pending.endswith(b"\r") else f.pending
            out.append(Message(self.source, line, f.stream, end, attributes={
                "file.path": f.path, "file.name": f.name, "file.line": f.line_no,
                "file.offset": end - len(f.pending)}))
        f.emitted = end
        f.pending, f.skip = b"", None

    def oversized(self, f: TailedFile, start: int, end: int, length: int, preview: bytes) -> Message:
        text = preview[:80].decode("utf-8", "replace")
        error = (f"line over max_line_bytes ({length} bytes, limit {self.max_line_bytes}) "
                 f"at {f.path}:{f.line_no}: {text!r}...")
        log.warning("%s: %s", self.source, error)
        return Message(self.source, preview[:PREVIEW], f.stream, end, attributes={
            "file.path": f.path, "file.name": f.name, "file.line": f.line_no, "file.offset": start},
            error=error)
