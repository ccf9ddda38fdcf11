"""The pipeline: sources → routing table → ordered lanes → sink → acknowledgements.

Every publication to one channel goes through the same lane, and a lane has one batch in flight
at a time, so each channel gets its publications in source order while different channels proceed
in parallel (`sink.max_in_flight` lanes), even when they come from one partition or one file. A
broadcast whose channels fall into several lanes is split into one broadcast per lane (same
idempotency key: Centrifugo keeps keys per channel). Acknowledgements may then come back out of
order; sources commit only contiguous positions (relay/acks.py). Lanes are bounded: when the sink is
slow or down, `emit` blocks and sources stop reading.
"""

from __future__ import annotations

import asyncio
import logging
import zlib
from collections.abc import Callable

from relay import events
from relay.dead_letter import DeadLetterFile
from relay.message import Message
from relay.routing import Publication, Rejection, RoutingTable
from relay.sinks import Failures, Sink

log = logging.getLogger("relay.pipeline")

# Loop turns without a new chunk from any source before the lanes send batches that are not full:
# under a backlog the sources refill them within a turn or two, so batches fill (a Batch call costs
# about the same whatever its size); when input is sparse the batch goes at once.
FILL_TURNS = 4
# Channels whose lane is remembered (a few thousand: the busy ones are found again at once).
LANES_OF_MAX = 4096


class Lane:
    """An ordered, bounded queue of publications feeding one batch at a time to the sink."""

    def __init__(self, limit: int, max_size: int, filling: Callable[[], None]) -> None:
        # A list, not a deque: a batch is taken from the front in one slice (at most 4 batches stay).
        self._items: list[Publication] = []
        self._limit = limit
        self._max_size = max_size
        self._space = asyncio.Event()
        self._ready = asyncio.Event()
        self._go = asyncio.Event()  # a batch that is filling may go: full, or no more input for now
        self._filling = filling  # tells the pipeline a lane waits to fill (it decides when input paused)

    def __len__(self) -> int:
        return len(self._items)

    async def put(self, pubs: list[Publication]) -> None:
        # A put may overshoot the limit by one source batch: the bound stays fixed all the same.
        while len(self._items) >= self._limit:
            self._space.clear()
            await self._space.wait()
        self._items.extend(pubs)
        self._ready.set()
        if len(self._items) >= self._max_size:
            self._go.set()

    def go(self) -> None:
        """Send what is there: no more input is coming for now."""
        self._go.set()

    async def take(self, linger: float) -> list[Publication]:
        while not self._items:
            self._ready.clear()
            await self._ready.wait()
        max_size = self._max_size
        if len(self._items) < max_size:
            if linger > 0:
                await asyncio.sleep(linger)
            else:
                # Wait (without polling the loop: one check for all lanes) while sources keep adding.
                self._go.clear()
                self._filling()
                await self._go.wait()
        batch = self._items[:max_size]
        del self._items[:max_size]
        self._space.set()
        return batch


class Pipeline:
    def __init__(self, router: RoutingTable, sink: Sink, dead_letters: DeadLetterFile,
                 lanes: int, batch_max_size: int, batch_linger: float) -> None:
        self.router = router
        self.sink = sink
        self.dead_letters = dead_letters
        self._batch_max_size = batch_max_size
        self._batch_linger = batch_linger
        self.lanes = [Lane(batch_max_size * 4, batch_max_size, self._watch_input) for _ in range(lanes)]
        self._lanes_of: dict[str, int] = {}  # channel → lane, for the channels seen most
        self._emits = 0  # chunks routed so far: the lanes' batches fill while this keeps growing
        self._unsettled = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._workers: list[asyncio.Task[None]] = []
        self._lane_failure = ""

    # -- source side -------------------------------------------------------------------------

    async def emit(self, batch: list[Message]) -> None:
        """Route a chunk of messages from one source; returns once they are queued (backpressure).

        The source engine hands chunks of `EMIT_CHUNK` (relay/sources/engine.py): routing a large
        batch at once would hold the loop for milliseconds while a lane's reply waits."""
        if not batch:
            return
        pubs: list[Publication] = []
        rejects: list[Rejection] = []
        self.router.route_chunk(batch, pubs, rejects)
        per_lane = self._assign(pubs)  # each message now owes one settle per lane part
        rejected = self._reject(rejects) if rejects else []
        settle_now = [msg for msg in batch if not msg.pending]
        routed = len(batch) - len(settle_now)
        self._unsettled += routed
        events.MessagesReceived(batch[0].source, len(batch), in_flight=routed).emit()
        for msg in settle_now:
            msg.settle()
        if routed:
            self._idle.clear()
        if rejected:
            self.dead_letters.commit(lambda: self._release(rejected))
        self._emits += 1
        self._watch_input()
        for lane, lane_pubs in zip(self.lanes, per_lane, strict=True):
            if lane_pubs:
                await lane.put(lane_pubs)

    def _watch_input(self) -> None:
        """Let filling batches go once FILL_TURNS loop turns pass without a new chunk. One callback
        chain for all lanes (the newest emit's; older chains see the count moved and stop)."""
        asyncio.get_running_loop().call_soon(self._input_paused, self._emits, FILL_TURNS)

    def _input_paused(self, emits: int, turns: int) -> None:
        if emits != self._emits:
            return  # a newer chunk came: its own chain watches
        if turns:
            asyncio.get_running_loop().call_soon(self._input_paused, emits, turns - 1)
            return
        for lane in self.lanes:
            lane.go()

    def _lane_of(self, channel: str) -> int:
        """A channel's lane: the same in every run (CRC-32, not Python's per-process string hash, so
        how channels share lanes does not change from one start to the next), remembered."""
        lane = self._lanes_of.get(channel)
        if lane is None:
            if len(self._lanes_of) >= LANES_OF_MAX:
                self._lanes_of.clear()  # recomputed alike: a channel never changes lane
            lane = self._lanes_of[channel] = zlib.crc32(channel.encode()) % len(self.lanes)
        return lane

    def _assign(self, pubs: list[Publication]) -> list[list[Publication]]:
        """The publications of each lane, by the lanes of their channels; counts each part in its
        message's `pending`."""
        per_lane: list[list[Publication]] = [[] for _ in self.lanes]
        lanes_of, lane_of = self._lanes_of, self._lane_of
        for pub in pubs:
            channels = pub.channels
            if len(channels) == 1:
                lane = lanes_of.get(channels[0])
                per_lane[lane_of(channels[0]) if lane is None else lane].append(pub)
                pub.message.pending += 1
                continue
            groups: dict[int, list[str]] = {}
            for channel in channels:
                groups.setdefault(lane_of(channel), []).append(channel)
            for index, group in groups.items():
                per_lane[index].append(pub if len(groups) == 1 else pub.to_channels(group))
                pub.message.pending += 1
        return per_lane

    def _reject(self, rejects: list[Rejection]) -> list[Message]:
        """Write the dead letters; each message rejected owes one settle more, until they are durable."""
        rejected: list[Message] = []
        for rejection in rejects:
            self._dead_letter(rejection)
            msg = rejection.message
            if not rejected or rejected[-1] is not msg:  # a message's rejections come together
                rejected.append(msg)
                msg.pending += 1
        return rejected

    def _dead_letter(self, rejection: Rejection) -> None:
        self.dead_letters.write(rejection.message, rejection.reason, channel=rejection.channel,
                                code=rejection.code, data=rejection.data, channels=rejection.channels)
        events.DeadLettered(rejection.message, rejection.reason, rejection.code, rejection.channel).emit()

    # -- sink side ---------------------------------------------------------------------------

    def start(self) -> None:
        self._workers = [asyncio.create_task(self._run_lane(lane), name=f"lane-{i}")
                         for i, lane in enumerate(self.lanes)]
        for task in self._workers:
            task.add_done_callback(self._lane_ended)

    @property
    def problem(self) -> str:
        """Why the pipeline cannot deliver everything now ("" when it can): for /readyz."""
        return self.dead_letters.problem or self._lane_failure

    def _lane_ended(self, task: asyncio.Task[None]) -> None:
        # A lane never ends by itself; one that failed must be loud, not a silent stall.
        if not task.cancelled() and task.exception() is not None:
            self._lane_failure = f"{task.get_name()} failed: {task.exception()!r}"
            log.error("%s; publications to its channels wait until a restart", self._lane_failure,
                      exc_info=task.exception())

    async def _run_lane(self, lane: Lane) -> None:
        # Settling a delivered batch (acks, dead letters, metrics) is done while the server works
        # on the next one: one batch in flight keeps order, and this keeps the wait off the clock.
        delivered: tuple[list[Publication], Failures] | None = None
        sending: asyncio.Future[Failures] | None = None
        try:
            while True:
                if delivered is not None and not len(lane):
                    self._finish(*delivered)  # nothing to send next: settle now, not later
                    delivered = None
                batch = await lane.take(self._batch_linger)
                sending = asyncio.ensure_future(self.sink.deliver(batch))
                if delivered is not None:
                    await asyncio.sleep(0)  # let the request go out first
                    self._finish(*delivered)
                    delivered = None
                delivered = (batch, await sending)
        finally:
            if sending is not None and not sending.done():
                sending.cancel()  # never settled: its messages are read again after a restart
            if delivered is not None:
                self._finish(*delivered)

    def _finish(self, batch: list[Publication], failures: Failures) -> None:
        failed: list[Message] = []
        for index, failures_of_pub in failures.items():
            if not failures_of_pub:
                continue
            pub = batch[index]
            # One line per distinct error, not per channel: a broadcast to 1,000 channels that all
            # fail the same way must not write its data 1,000 times.
            by_error: dict[tuple[int, str], list[str]] = {}
            for failure in failures_of_pub:
                by_error.setdefault((failure.code, failure.message), []).append(failure.channel)
            for (code, message), channels in by_error.items():
                reason = f"centrifugo error {code}: {message}" if code else message
                self._dead_letter(Rejection(pub.message, reason, channel=channels[0], code=code, data=pub.data,
                                            channels=tuple(channels)))
            failed.append(pub.message)
        events.PublicationsAccepted(len(batch) - len(failed)).emit()
        if failed:
            # A failed publication is owed until its dead letter is durable; the rest are done.
            done = {index for index, failures_of_pub in failures.items() if failures_of_pub}
            self._release([pub.message for index, pub in enumerate(batch) if index not in done])
            self.dead_letters.commit(lambda: self._release(failed))
        else:
            self._release([pub.message for pub in batch])

    def _release(self, messages: list[Message]) -> None:
        """One publication (or the dead letter lines) of each message is settled; messages with
        nothing left owed are acknowledged."""
        settled = []
        for msg in messages:
            pending = msg.pending - 1
            msg.pending = pending
            if not pending:
                settled.append(msg)
        self._unsettled -= len(settled)
        events.MessagesSettled(settled).emit()
        for msg in settled:
            msg.on_settled(msg)  # msg.settle(), one call fewer: this runs for every message
        if self._unsettled == 0:
            self._idle.set()

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def unsettled(self) -> int:
        return self._unsettled

    async def drain(self, timeout: float | None) -> bool:
        """Wait until every emitted message is settled; False if `timeout` (None = none) ran out first."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True

    async def stop(self) -> None:
        for task in self._workers:
            task.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        self._workers = []
        self.dead_letters.close()
