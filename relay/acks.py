"""Contiguous acknowledgement tracking: the rule that makes commits at-least-once.

A position may be committed only when it and every earlier position of the same stream were
settled. Acks can arrive out of order (a message that no route takes settles at once while an
earlier one is still being retried), so each stream remembers what it handed out, in order.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from relay.message import Message

# `Message.pending` of a message whose chunk heard its ack (the pipeline is done with it by then).
SETTLED = -1


class Chunk:
    """Messages of one stream emitted together; one countdown instead of per-message bookkeeping.

    `end` is where reading resumes after the chunk. `on_done` runs once all of it settled."""

    __slots__ = ("end", "left", "messages", "nbytes", "on_done", "size", "watch")

    def __init__(self, messages: list[Message], end: int, nbytes: int, on_done: Callable[[Chunk], None]) -> None:
        self.messages = messages
        self.size = self.left = len(messages)
        self.end = end
        self.nbytes = nbytes
        self.on_done = on_done
        # Told of every ack, not only the last, while someone needs to know (a paused stream).
        self.watch: Callable[[Chunk], None] | None = None

    def ack(self, message: Message) -> None:
        message.pending = SETTLED
        self.left -= 1
        if self.left == 0:
            self.messages = []  # each message refers to this chunk (its ack): no cycle left for the GC
            self.on_done(self)
        elif self.watch is not None:
            self.watch(self)


class StreamAcks:
    """The chunks of one stream in emission order, and the position up to which all settled."""

    __slots__ = ("_chunks", "committable")

    def __init__(self) -> None:
        self._chunks: deque[Chunk] = deque()
        self.committable: int | None = None

    def emitted(self, chunk: Chunk) -> None:
        self._chunks.append(chunk)

    @property
    def chunks(self) -> deque[Chunk]:
        """The chunks not yet settled at the head, in order (complete ones may follow)."""
        return self._chunks

    def chunk_done(self) -> None:
        """A chunk settled completely: move past every complete chunk at the head."""
        chunks = self._chunks
        while chunks and chunks[0].left == 0:
            self.committable = chunks.popleft().end

    def position(self, after: Callable[[Message], int]) -> int | None:
        """Where everything before is settled: past the complete chunks and, within the first
        incomplete one, past its settled head (found only now, at commit time)."""
        if self._chunks:
            last = None
            for message in self._chunks[0].messages:
                if message.pending != SETTLED:
                    break
                last = message
            if last is not None:
                return after(last)
        return self.committable
