"""The pipeline with an in-memory sink (the `Sink` protocol): order per channel, acks only after
delivery, dead letters for what the sink refuses, bounded lanes, drain. The same guarantees against
real servers: tests/test_sink.py, test_daemon.py, test_real_centrifugo*.py."""

from __future__ import annotations

import asyncio
import collections
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from relay.config import parse_config
from relay.dead_letter import DeadLetterFile
from relay.message import Message
from relay.pipeline import Pipeline
from relay.routing import Publication, RoutingTable
from relay.sinks import Failure, Failures, Sink


class MemorySink:
    """Keeps what it was given per channel; `gate` closed = the server does not answer."""

    def __init__(self, refuse: Callable[[Publication], bool] = lambda pub: False) -> None:
        self.healthy = True
        self.last_error = ""
        self.by_channel: dict[str, list[bytes]] = {}
        self.calls = 0
        self.gate = asyncio.Event()
        self.gate.set()
        self.refuse = refuse

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def ping(self) -> bool:
        return True

    async def deliver(self, pubs: list[Publication]) -> Failures:
        await self.gate.wait()
        self.calls += 1
        failures: Failures = {}
        for i, pub in enumerate(pubs):
            if self.refuse(pub):
                failures[i] = [Failure(c, 102, "unknown channel") for c in pub.channels]
                continue
            for channel in pub.channels:
                self.by_channel.setdefault(channel, []).append(pub.data)
        return failures


def pipeline(sink: Sink, tmp_path: Path, lanes: int = 4, batch_max_size: int = 10) -> Pipeline:
    config = parse_config('[sources.events]\ntype = "ticker"\n'
                          '[[routes]]\nsource = "events"\nchannel = "chat:{{ json.room }}"\n')
    routes = RoutingTable(config.routes, config.relay.unmatched)
    p = Pipeline(routes, sink, DeadLetterFile(tmp_path / "dead.jsonl"), lanes=lanes,
                 batch_max_size=batch_max_size, batch_linger=0.0)
    p.start()
    return p


def messages(n: int, rooms: int, settled: list[int]) -> list[Message]:
    def ack(msg: Message) -> None:
        settled.append(msg.offset)
    return [Message("events", json.dumps({"room": i % rooms, "n": i}).encode(), "s", offset=i, on_settled=ack)
            for i in range(n)]


async def test_every_channel_gets_its_messages_in_order_and_each_is_acked_after_delivery(tmp_path: Path) -> None:
    sink = MemorySink()
    p = pipeline(sink, tmp_path)
    settled: list[int] = []
    batch = messages(1000, rooms=7, settled=settled)
    for start in range(0, 1000, 50):
        await p.emit(batch[start:start + 50])
    assert await p.drain(5)
    assert sorted(settled) == list(range(1000))
    for room in range(7):
        got = [json.loads(d)["n"] for d in sink.by_channel[f"chat:{room}"]]
        assert got == list(range(room, 1000, 7))
    await p.stop()


async def test_nothing_is_acked_while_the_sink_does_not_answer_and_emit_blocks_at_the_lane_bound(
        tmp_path: Path) -> None:
    sink = MemorySink()
    sink.gate.clear()
    p = pipeline(sink, tmp_path, lanes=1, batch_max_size=10)  # a lane holds 4 batches: 40
    settled: list[int] = []
    batch = messages(200, rooms=1, settled=settled)
    emitted = 0

    async def feed() -> None:
        nonlocal emitted
        for start in range(0, 200, 10):
            await p.emit(batch[start:start + 10])
            emitted = start + 10

    feeder = asyncio.create_task(feed())
    await asyncio.sleep(0.1)
    assert settled == [] and not feeder.done()
    assert emitted <= 60, emitted  # 40 queued, 10 in the call that blocks, one put past the bound
    assert not await p.drain(0.05)
    sink.gate.set()
    await feeder
    assert await p.drain(5)
    assert sorted(settled) == list(range(200))
    await p.stop()


async def test_a_refused_publication_is_a_dead_letter_and_still_settles(tmp_path: Path) -> None:
    sink = MemorySink(refuse=lambda pub: pub.channels == ["chat:3"])
    p = pipeline(sink, tmp_path)
    settled: list[int] = []
    await p.emit(messages(10, rooms=5, settled=settled))
    assert await p.drain(5)
    await p.stop()
    assert sorted(settled) == list(range(10))
    lines = [json.loads(line) for line in (tmp_path / "dead.jsonl").read_text().splitlines()]
    assert sorted(json.loads(line["data"])["n"] for line in lines) == [3, 8]
    assert all("unknown channel" in line["reason"] for line in lines)
    assert "chat:3" not in sink.by_channel


class SizesSink(MemorySink):
    """A MemorySink that notes how many publications each call carried."""

    def __init__(self) -> None:
        super().__init__()
        self.sizes: list[int] = []

    async def deliver(self, pubs: list[Publication]) -> Failures:
        self.sizes.append(len(pubs))
        await asyncio.sleep(0.001)  # a server's round trip: the source goes on meanwhile
        return await super().deliver(pubs)


async def test_batches_fill_under_a_backlog(tmp_path: Path) -> None:
    """A source that keeps emitting chunks of 50, one chunk per loop turn (as the source engine
    does, with larger chunks), fills the lane's batches to batch_max_size instead of sending what
    the first chunks held."""
    sink = SizesSink()
    p = pipeline(sink, tmp_path, lanes=1, batch_max_size=500)
    settled: list[int] = []
    batch = messages(5000, rooms=1, settled=settled)
    for start in range(0, 5000, 50):
        await p.emit(batch[start:start + 50])
        await asyncio.sleep(0)
    assert await p.drain(5)
    assert len(settled) == 5000
    assert sum(sink.sizes) == 5000
    assert sum(sink.sizes) / len(sink.sizes) >= 400, sink.sizes


async def test_a_lone_message_is_sent_at_once(tmp_path: Path) -> None:
    """Filling a batch waits only while more keeps coming: one message does not wait for company."""
    sink = SizesSink()
    p = pipeline(sink, tmp_path, lanes=1, batch_max_size=500)
    settled: list[int] = []
    await p.emit(messages(1, rooms=1, settled=settled))
    loop = asyncio.get_running_loop()
    started = loop.time()
    while not settled:
        await asyncio.sleep(0)
    assert sink.sizes == [1]
    assert loop.time() - started < 0.05
    await p.stop()


def test_channels_keep_their_lanes_from_one_start_to_the_next() -> None:
    # Python's string hash changes with every process; lanes picked by it made every run share the
    # channels out differently (12 channels: 3 to 10 on the busiest of 4 lanes).
    script = ("import asyncio, sys\n"
              "from relay.pipeline import Pipeline\n"
              "async def main():\n"
              "    p = Pipeline(None, None, None, 4, 500, 0.0)\n"
              "    print([p._lane_of(f'chat:room-{i}') for i in range(50)])\n"
              "asyncio.run(main())\n")
    runs = [subprocess.run([sys.executable, "-c", script], env={**os.environ, "PYTHONHASHSEED": seed},
                           capture_output=True, text=True, check=True).stdout for seed in ("1", "2", "3")]
    assert runs[0] == runs[1] == runs[2]
    lanes = json.loads(runs[0])
    assert sorted(collections.Counter(lanes).values()) == [12, 12, 13, 13]  # and spread
