"""The source engine: runs any source's reader and owns the plumbing every source needs.

A source module (`relay/sources/<type>.py`, found by its name, no list to edit) declares:
- `Config`: its pydantic model (the spec: validation, `relay check`, README's option table);
- `FIELDS`: the template fields and `when` keys its messages carry (`"header.*"` = any name after
  the dot); routes that use anything else are refused by `relay check`;
- `build(name, config, state_dir)`: its `Reader`.

A reader says what to read; the engine decides when (the Redpanda Connect input shape):
- `connect()` opens the input; `SourceUnavailable` = try again later (the engine backs off with
  tenacity and /readyz says "connecting to source NAME"); any other error is fatal.
- `read()` returns batches (one stream each, in order), `[]` for "nothing now", or None at the end
  of the input. `SourceUnavailable` = the connection is gone: the engine closes and reconnects.
- `commit({stream: position})`: every message of those streams before `position` is settled.
- `close()`: release the input (the engine commits first).
Optional: `position_after(message)` (where reading resumes after one message; default offset + 1),
`async pending() -> {stream: n}` (what is left to read per stream: the `relay_source_lag` metric),
`pause(stream)` / `resume(stream)` (stop fetching one stream; without them the engine
stops calling `read()`), `bind(revoke)` (the reader gets `await revoke(streams)`, which commits and
forgets those streams, ignoring late acks); attributes `max_in_flight` (the per-stream cap, default
5000), `commit_interval` (seconds, default 1), `connect_timeout` (seconds; 0 = retry forever).

The engine owns: per-stream caps in messages (pause at `max_in_flight`, resume at half) and a
byte budget shared by every source (`relay.max_buffer_bytes`), contiguous commits (periodic,
on revoke, at close), connecting with backoff, emission in chunks of `EMIT_CHUNK`, the tasks and
their stop. An ack is one countdown per emitted chunk, not per-message bookkeeping; where the
settled run ends inside a chunk is found only when committing (relay/acks.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol, runtime_checkable

from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_delay, stop_never, wait_exponential

from relay import events
from relay.acks import Chunk, StreamAcks
from relay.message import Message

# Most messages handed to the pipeline in one call: small enough that the lanes get the loop back
# often (500 messages route in about a millisecond), large enough that the per-call cost is shared
# (50 → 200 cut the pipeline's CPU per message by about a tenth; 200 → 500, one read's worth, 2.6%
# more on Kafka → Centrifugo). The one chunk size.
EMIT_CHUNK = 500
# Most messages, and about the most bytes, one read() should return (at least one message): enough
# to share the call's cost, little enough that what is read beyond a cap or the byte budget is small.
READ_MAX = 500
READ_MAX_BYTES = 1024 * 1024
# Caps up to this resume exactly at half (see SourceEngine._exact).
EXACT_CAP = 1000
# Default for `max_in_flight` when a reader does not set it.
DEFAULT_MAX_IN_FLIGHT = 5000
# Default byte budget of everything read and not yet settled, across all sources.
DEFAULT_MAX_BUFFER_BYTES = 256 * 1024 * 1024
# After stop(), how long an emit under way may take before it is cancelled.
STOP_GRACE = 2.0
# Connect back-off bounds (seconds).
CONNECT_BACKOFF_MIN = 0.1
CONNECT_BACKOFF_MAX = 5.0

# Hands a batch of messages to the pipeline; awaiting it is the backpressure.
Emit = Callable[[list[Message]], Awaitable[None]]
Revoke = Callable[[Iterable[str]], Awaitable[None]]


class SourceUnavailable(Exception):
    """The input cannot be reached now (connect) or the connection was lost (read): retry later."""

    def fatal(self, seconds: float) -> Exception:
        """The error to fail with when connecting did not succeed within `seconds`."""
        return SourceFatal(f"{self} (still after {seconds:g}s)")


class SourceFatal(Exception):
    """The input cannot run and waiting will not help (bad credentials, a missing secret)."""


@dataclass(slots=True)
class Batch:
    """Messages of one stream, in order; `end` is where reading resumes after the last one (the
    position after any one message is the reader's `position_after(message)`, default offset + 1)."""

    stream: str
    messages: list[Message]
    end: int


@runtime_checkable
class Reader(Protocol):
    """What a source implements; see the module docstring."""

    name: str

    async def connect(self) -> None: ...

    async def read(self) -> Sequence[Batch] | None: ...

    async def commit(self, positions: dict[str, int]) -> None: ...

    async def close(self) -> None: ...


class ByteBudget:
    """Bytes of message data read and not yet settled, shared by every source of a relay.

    A source over budget pauses everything it reads; all of them resume when it fell to half."""

    def __init__(self, limit: int = DEFAULT_MAX_BUFFER_BYTES) -> None:
        self.limit = limit
        self.used = 0
        self._listeners: list[Callable[[], None]] = []

    @property
    def over(self) -> bool:
        return self.used >= self.limit

    def take(self, n: int) -> None:
        self.used += n

    def give(self, n: int) -> None:
        before = self.used
        self.used -= n
        if before > self.limit // 2 >= self.used:
            for listener in list(self._listeners):
                listener()

    def listen(self, listener: Callable[[], None]) -> None:
        self._listeners.append(listener)

    def unlisten(self, listener: Callable[[], None]) -> None:
        with contextlib.suppress(ValueError):
            self._listeners.remove(listener)


class _Stream:
    """One stream while the engine knows it: unsettled messages, held batches, pause state."""

    __slots__ = ("acks", "gone", "held", "in_flight", "name", "nbytes", "partly", "paused")

    def __init__(self, name: str) -> None:
        self.name = name
        self.acks = StreamAcks()
        self.in_flight = 0  # messages of chunks not settled completely
        self.partly = 0  # of those, settled ones (counted only while paused, to resume on time)
        self.nbytes = 0
        self.held: deque[Batch] = deque()  # read beyond the cap, emitted once it has room
        self.paused = False
        self.gone = False


def _next_offset(message: Message) -> int:
    return message.offset + 1


class SourceEngine:
    """Runs one reader: connect, read, cap, emit, commit, stop. `run(emit)` is the source task."""

    def __init__(self, name: str, reader: Reader, budget: ByteBudget | None = None,
                 max_in_flight: int | None = None) -> None:
        self.name = name
        self.reader = reader
        self.budget = budget or ByteBudget()
        self.cap = max_in_flight or getattr(reader, "max_in_flight", None) or DEFAULT_MAX_IN_FLIGHT
        self._resume_at = max(1, self.cap // 2)
        # With a small cap a chunk is a large share of it: a paused stream then counts its acks one
        # by one to resume exactly at half. With a large one, whole chunks are counted (cheaper; it
        # may resume a few chunks late).
        self._exact = self.cap <= EXACT_CAP
        self._connect_timeout = float(getattr(reader, "connect_timeout", 0.0))
        self._can_pause = callable(getattr(reader, "pause", None)) and callable(getattr(reader, "resume", None))
        self._after: Callable[[Message], int] = getattr(reader, "position_after", None) or _next_offset
        self._streams: dict[str, _Stream] = {}
        self._committed: dict[str, int] = {}
        self._queue: deque[tuple[_Stream, list[Message]]] = deque()
        self._queued = asyncio.Event()
        self._emptied = asyncio.Event()  # the emitter handed over everything queued
        self._room = asyncio.Event()  # set while reading may go on (readers without pause)
        self._room.set()
        self._stopping = asyncio.Event()
        self._commit_lock = asyncio.Lock()
        self._bytes_paused = False
        self._connected = False
        self.connecting = True
        self.last_error = ""
        bind = getattr(reader, "bind", None)
        if callable(bind):
            bind(self.revoke)
        self.budget.listen(self._budget_freed)

    # -- what the daemon sees ----------------------------------------------------------------

    def readiness(self) -> tuple[bool, str]:
        """(up, why not): not up while connecting to the input."""
        if self.connecting:
            why = f": {self.last_error}" if self.last_error else ""
            return False, f"connecting to source {self.name}{why}"
        return True, ""

    def in_flight(self) -> dict[str, int]:
        """Unsettled messages per stream (the cap counts these)."""
        return {s.name: s.in_flight - s.partly for s in self._streams.values()}

    # -- lifecycle ---------------------------------------------------------------------------

    async def run(self, emit: Emit) -> None:
        """Connect, then read and emit until stop() or the end of the input."""
        emitter = asyncio.create_task(self._emit_loop(emit), name=f"source-{self.name}-emit")
        committer = asyncio.create_task(self._commit_loop(), name=f"source-{self.name}-commit")
        try:
            ended = await self._read_loop(emitter)
            # At the end of the input, what was read still goes out before run returns.
            while ended and (self._queue or any(s.held for s in self._streams.values())) and not emitter.done():
                self._emptied.clear()
                emptied = asyncio.ensure_future(self._emptied.wait())
                await asyncio.wait([emitter, emptied], return_when=asyncio.FIRST_COMPLETED)
                emptied.cancel()
        finally:
            self._stopping.set()
            self._queued.set()
            await asyncio.wait([emitter], timeout=STOP_GRACE)
            for task in (emitter, committer):
                task.cancel()
            results = await asyncio.gather(emitter, committer, return_exceptions=True)
            for result in results:
                if isinstance(result, Exception):
                    raise result

    async def stop(self) -> None:
        """Stop reading soon; run returns. What was emitted keeps settling."""
        self._stopping.set()
        self._room.set()
        self._queued.set()  # the emitter wakes up, and returns

    async def close(self) -> None:
        """After the drain: commit what settled, then close the reader."""
        self.budget.unlisten(self._budget_freed)
        try:
            if self._connected:
                await self._commit(list(self._streams.values()))
        finally:
            self._connected = False
            await self.reader.close()

    # -- connecting --------------------------------------------------------------------------

    async def _connect(self) -> None:
        self.connecting = True
        timeout = self._connect_timeout
        retrying = AsyncRetrying(retry=retry_if_exception_type(SourceUnavailable),
                                 wait=wait_exponential(multiplier=CONNECT_BACKOFF_MIN, max=CONNECT_BACKOFF_MAX),
                                 stop=stop_after_delay(timeout) if timeout > 0 else stop_never,
                                 before_sleep=self._connect_failed, reraise=True)
        try:
            async for attempt in retrying:
                with attempt:
                    if self._stopping.is_set():
                        return
                    await self.reader.connect()
        except SourceUnavailable as err:
            raise err.fatal(timeout) from None
        self._connected = True
        self.connecting = False
        self.last_error = ""

    def _connect_failed(self, state: Any) -> None:
        error = state.outcome.exception() if state.outcome else None
        self.last_error = str(error) if error else ""
        events.SourceUnreachable(self.name, self.last_error, state.attempt_number).emit()

    # -- reading -----------------------------------------------------------------------------

    async def _read_loop(self, emitter: asyncio.Task[None]) -> bool:
        """Read until stop (False) or the end of the input (True)."""
        stop = asyncio.ensure_future(self._stopping.wait())
        try:
            await self._race(self._connect(), stop)
            while not self._stopping.is_set():
                if not self._room.is_set():
                    await self._race(self._room.wait(), stop)
                    continue
                if emitter.done():
                    return False  # the emitter failed: run() raises its error
                try:
                    done, batches = await self._race(self.reader.read(), stop)
                except SourceUnavailable as err:
                    await self._lost(err)
                    await self._race(self._connect(), stop)
                    continue
                if not done:
                    return False
                if batches is None:
                    return True
                for batch in batches:
                    self._accept(batch)
            return False
        finally:
            stop.cancel()

    @staticmethod
    async def _race(work: Awaitable[Any], stop: asyncio.Future[Any]) -> tuple[bool, Any]:
        """Run `work` unless stop comes first (then it is cancelled): (finished, result)."""
        task = asyncio.ensure_future(work)
        await asyncio.wait([task, stop], return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return True, task.result()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        return False, None

    async def _lost(self, err: SourceUnavailable) -> None:
        self.last_error = str(err)
        events.SourceUnreachable(self.name, self.last_error, lost=True).emit()
        # Every stream starts again from its committed position: what is in flight is forgotten
        # (its acks are ignored) and what was read and not emitted is read again.
        await self.revoke(list(self._streams))
        self._connected = False
        with contextlib.suppress(Exception):
            await self.reader.close()

    def _accept(self, batch: Batch) -> None:
        if not batch.messages:
            return
        stream = self._streams.get(batch.stream)
        if stream is None:
            stream = self._streams[batch.stream] = _Stream(batch.stream)
        stream.held.append(batch)
        self._release(stream)
        if stream.held or stream.in_flight - stream.partly >= self.cap or self.budget.over:
            self._pause(stream)
            if self.budget.over:
                self._pause_all_for_bytes()

    def _release(self, stream: _Stream) -> None:
        """Queue held batches of `stream` up to its cap; the rest stays held for the next acks."""
        while stream.held and stream.in_flight - stream.partly < self.cap and not self.budget.over:
            batch = stream.held.popleft()
            room = self.cap - (stream.in_flight - stream.partly)
            messages = batch.messages
            if len(messages) > room:  # split at the cap; the tail waits, already read
                rest = Batch(batch.stream, messages[room:], batch.end)
                stream.held.appendleft(rest)
                messages, end = messages[:room], self._after(messages[room - 1])
            else:
                end = batch.end
            self._queue_messages(stream, messages, end)

    def _queue_messages(self, stream: _Stream, messages: list[Message], end: int) -> None:
        # One countdown per emitted chunk: an ack costs one decrement.
        for start in range(0, len(messages), EMIT_CHUNK):
            piece = messages[start:start + EMIT_CHUNK]
            piece_end = end if start + EMIT_CHUNK >= len(messages) else self._after(piece[-1])
            chunk = Chunk(piece, piece_end, 0, partial(self._chunk_done, stream))
            ack = chunk.ack
            nbytes = 0
            for msg in piece:
                msg.on_settled = ack
                nbytes += len(msg.data)
            chunk.nbytes = nbytes
            stream.in_flight += chunk.size
            stream.nbytes += nbytes
            self.budget.take(nbytes)
            if stream.paused and self._exact:
                chunk.watch = partial(self._chunk_progress, stream)
            stream.acks.emitted(chunk)
            self._queue.append((stream, piece))
        self._queued.set()

    # -- pausing -----------------------------------------------------------------------------

    def _pause(self, stream: _Stream) -> None:
        if stream.paused:
            return
        stream.paused = True
        if not self._exact:
            return self._stop_fetching(stream)
        # From now on every ack counts, so the stream resumes as soon as half of it settled.
        watch = partial(self._chunk_progress, stream)
        for chunk in stream.acks.chunks:
            if chunk.left and chunk.watch is None:
                chunk.watch = watch
                stream.partly += chunk.size - chunk.left
        self._stop_fetching(stream)

    def _stop_fetching(self, stream: _Stream) -> None:
        if self._can_pause:
            self.reader.pause(stream.name)  # type: ignore[attr-defined]
        else:
            self._room.clear()

    def _resume(self, stream: _Stream) -> None:
        if not stream.paused or stream.held or self._bytes_paused:
            return
        stream.paused = False  # chunks watched so far stay watched: `partly` stays exact
        if self._can_pause:
            self.reader.resume(stream.name)  # type: ignore[attr-defined]
        elif not any(s.paused for s in self._streams.values()):
            self._room.set()

    def _pause_all_for_bytes(self) -> None:
        if self._bytes_paused:
            return
        self._bytes_paused = True
        for stream in self._streams.values():
            self._pause(stream)
        if not self._can_pause:
            self._room.clear()

    def _budget_freed(self) -> None:
        self._bytes_paused = False
        for stream in list(self._streams.values()):
            if not stream.gone:
                self._release(stream)
                if stream.in_flight - stream.partly <= self._resume_at:
                    self._resume(stream)

    # -- emitting ----------------------------------------------------------------------------

    async def _emit_loop(self, emit: Emit) -> None:
        while True:
            await self._queued.wait()
            if self._stopping.is_set() and not self._queue:
                return
            chunk = self._next_chunk()
            if not self._queue:
                self._queued.clear()
            if chunk:
                await emit(chunk)
                # Routing chunk after chunk would hold the loop while a lane's reply waits; a lane
                # that can send its next batch right away keeps the server busy.
                await asyncio.sleep(0)
            if not self._queue:
                self._emptied.set()
            if self._stopping.is_set():
                return  # what is still queued was never emitted: read again after a restart

    def _next_chunk(self) -> list[Message]:
        """Up to EMIT_CHUNK queued messages: a full piece as it is, small pieces put together."""
        queue = self._queue
        chunk: list[Message] = []
        while queue and len(chunk) < EMIT_CHUNK:
            stream, messages = queue[0]
            if stream.gone:
                queue.popleft()
                continue
            if not chunk and len(messages) == EMIT_CHUNK:
                queue.popleft()
                return messages
            room = EMIT_CHUNK - len(chunk)
            if len(messages) <= room:
                chunk += messages
                queue.popleft()
            else:
                chunk += messages[:room]
                queue[0] = (stream, messages[room:])
        return chunk

    # -- settling and committing -----------------------------------------------------------------

    def _chunk_done(self, stream: _Stream, chunk: Chunk) -> None:
        if stream.gone:
            return  # revoked: the new owner reads it again
        stream.acks.chunk_done()
        stream.in_flight -= chunk.size
        if chunk.watch is not None:
            stream.partly -= chunk.size - 1  # its earlier acks were counted one by one
        stream.nbytes -= chunk.nbytes
        self.budget.give(chunk.nbytes)
        self._maybe_resume(stream)

    def _chunk_progress(self, stream: _Stream, chunk: Chunk) -> None:
        if stream.gone:
            return
        stream.partly += 1
        self._maybe_resume(stream)

    def _maybe_resume(self, stream: _Stream) -> None:
        if stream.paused and stream.in_flight - stream.partly <= self._resume_at:
            self._release(stream)
            self._resume(stream)

    async def _commit_loop(self) -> None:
        pending = getattr(self.reader, "pending", None)
        last = time.monotonic()
        while True:
            # The interval is read again at least every second: a reader may learn its pace only on
            # connecting (a NATS durable made elsewhere tells its window then).
            wait = last + float(getattr(self.reader, "commit_interval", 1.0)) - time.monotonic()
            if wait > 0:
                await asyncio.sleep(min(wait, 1.0))
                continue
            last = time.monotonic()
            if self._connected:
                await self._commit(list(self._streams.values()))
                if callable(pending):
                    events.SourceLagMeasured(self.name, await pending()).emit()

    async def _commit(self, streams: list[_Stream]) -> None:
        """Commit the contiguous settled position of each known stream that moved."""
        async with self._commit_lock:
            positions: dict[str, int] = {}
            for stream in streams:
                position = stream.acks.position(self._after)
                if position is not None and position != self._committed.get(stream.name):
                    positions[stream.name] = position
            if not positions:
                return
            try:
                await self.reader.commit(positions)
            except Exception as err:  # not committed: the next commit tries again
                events.SourceCommitFailed(self.name, str(err)).emit()
                return
            self._committed.update(positions)

    async def revoke(self, names: Iterable[str]) -> None:
        """The reader gives up these streams (a rebalance): commit what settled, then forget them;
        acks that arrive later are ignored and what is queued is dropped."""
        streams = [self._streams[n] for n in names if n in self._streams]
        if self._connected:
            await self._commit(streams)
        if streams and callable(getattr(self.reader, "pending", None)):
            events.SourceLagMeasured(self.name, {}, gone=[s.name for s in streams]).emit()
        for stream in streams:
            stream.gone = True
            self.budget.give(stream.nbytes)
            self._committed.pop(stream.name, None)
            del self._streams[stream.name]
        if streams:
            self._queue = deque(item for item in self._queue if not item[0].gone)
            if not self._can_pause and not any(s.paused for s in self._streams.values()):
                self._room.set()
