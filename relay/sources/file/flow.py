"""What a source engine will own (issue 13), kept in one place so it can move there whole: the cap of
unsettled lines per file (reading pauses at `max_in_flight` and resumes at half), the contiguous
settled offset of each file, and handing lines to the pipeline in batches of `batch_size`.
"""

from __future__ import annotations

from collections.abc import Callable

from relay.acks import ContiguousTracker
from relay.message import Message
from relay.sources import Emit


class Flow:
    """Per-stream caps and settled offsets of one source, and its batches to the pipeline."""

    def __init__(self, max_in_flight: int, batch_size: int, on_resume: Callable[[str], None]) -> None:
        self.tracker = ContiguousTracker()
        self.max_in_flight = max_in_flight
        self.batch_size = batch_size
        self._resume_below = max(1, max_in_flight // 2)
        self._on_resume = on_resume
        self._paused: set[str] = set()

    def room(self, stream: str) -> int:
        """How many more lines of this stream may be emitted now."""
        return self.max_in_flight - self.tracker.in_flight(stream)

    def pause_if_full(self, stream: str) -> bool:
        """True (and the stream paused until half its lines settle) when it is at its cap."""
        if self.tracker.in_flight(stream) >= self.max_in_flight:
            self._paused.add(stream)
            return True
        return False

    def settled(self, msg: Message) -> None:
        """A message's `on_settled`: its offset is settled; a paused stream resumes at half its cap."""
        self.tracker.settled(msg.stream, msg.offset)
        if self._paused and msg.stream in self._paused and self.tracker.in_flight(msg.stream) <= self._resume_below:
            self._paused.discard(msg.stream)
            self._on_resume(msg.stream)

    def idle(self, stream: str, committed: int) -> bool:
        """Nothing of the stream in flight, and its settled offset is `committed` (or nothing was emitted)."""
        return self.tracker.in_flight(stream) == 0 and self.tracker.committable(stream) in (None, committed)

    def forget(self, stream: str) -> None:
        self._paused.discard(stream)
        self.tracker.forget(stream)

    async def emit(self, emit: Emit, out: list[Message]) -> None:
        for i in range(0, len(out), self.batch_size):
            await emit(out[i:i + self.batch_size])
