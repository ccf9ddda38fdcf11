"""The relay's CPU per record on the path every source shares, in one process, without the network.

Sources → engine → routing → lanes → the GRPC sink's encoding and reply check → acks, as `relay run`
wires them (uvloop, the GC tuned as the CLI tunes it), with one thing left out: the Batch call. The
sink's call answers at once with a plain publish result per command (of one size, as a server's
usually are), so what is measured is the relay's own Python, steadily, on a shared machine: the
gRPC call itself (about 0.2-0.3 ms of client CPU per Batch) and the socket work are not in it.

Scenarios:
- ticker16:   16 tickers (`interval = "0s"`), each routed to a channel of its own (bench/pipeline_bench.py's);
- records:    Centrifugo publish commands (`format = "centrifugo"`'s common record), read as the
              Kafka source reads them, 12 channels, one stream;
- json-key:   JSON records routed by key (`channel = "chat:{{ key }}"`, data checked as JSON), 50 keys.

Trees take turns (`--tree`, default this checkout): each turn runs each tree once, in a child process
with PYTHONPATH set to it, alternating the order; the median and the minimum of the turns count.

    .venv/bin/python bench/hotpath_bench.py [--count 200000] [--turns 5] [--tree /tmp/main --tree .]
"""

from __future__ import annotations

import argparse
import asyncio
import contextvars
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = ("ticker16", "records", "json-key")
# One plain publish result per command: Reply.publish = {offset: 257, epoch: "abcd"}.
REPLY = b'\n\x0b"\t\x08\x81\x02\x12\x04abcd'


def child(scenario: str, count: int) -> float:
    """Run one scenario in this process (the relay tree is whatever PYTHONPATH gives); CPU µs per record."""
    import uvloop

    from relay.centrifugo_records import read_publication
    from relay.config import parse_config
    from relay.dead_letter import DeadLetterFile
    from relay.message import NOTHING, Message
    from relay.pipeline import Pipeline
    from relay.routing import RoutingTable
    from relay.sinks.grpc_centrifugo import GrpcCentrifugoSink
    from relay.sources import build
    from relay.sources.engine import READ_MAX, Batch, SourceEngine

    class Records:
        """An in-memory reader of `count` records, made the way the Kafka source makes them."""

        def __init__(self, name: str, values: list[bytes], keys: list[str] | None, centrifugo: bool) -> None:
            self.name, self.values, self.keys, self.centrifugo = name, values, keys, centrifugo
            self.offset = 0

        async def connect(self) -> None:
            return None

        async def read(self) -> list[Batch] | None:
            if self.offset >= count:
                return None
            await asyncio.sleep(0)
            n = min(READ_MAX, count - self.offset)
            read_at = time.monotonic()
            messages = []
            for offset in range(self.offset, self.offset + n):
                value = self.values[offset % len(self.values)]
                if self.centrifugo:
                    parsed, error = read_publication(value, NOTHING)
                    messages.append(Message(self.name, value, "bench/0", offset, None, NOTHING, NOTHING, read_at,
                                            parsed, error))
                else:
                    key = self.keys[offset % len(self.keys)] if self.keys else None
                    attributes = {"topic": "bench", "partition": 0, "offset": offset, "timestamp": 0}
                    messages.append(Message(self.name, value, "bench/0", offset, key, NOTHING, attributes, read_at))
            self.offset += n
            return [Batch("bench/0", messages, self.offset)]

        async def commit(self, positions: dict[str, int]) -> None:
            return None

        async def close(self) -> None:
            return None

    sink_table = '[sink]\naddress = "127.0.0.1:1"\n'
    if scenario == "ticker16":
        tables = [f'[sources.tick{i}]\ntype = "ticker"\ninterval = "0s"\ncount = {count // 16}\n'
                  f'[[routes]]\nsource = "tick{i}"\nchannel = "chat:pipeline-{i}"\n' for i in range(16)]
        config = parse_config(sink_table + "".join(tables))
        count = count // 16 * 16
    else:
        config = parse_config(sink_table + '[sources.events]\ntype = "kafka"\nbrokers = ["127.0.0.1:1"]\n'
                              'topics = ["bench"]\n'
                              + ('[[routes]]\nsource = "events"\nchannel = "chat:{{ key }}"\n'
                                 if scenario == "json-key" else ""))
    pad = "x" * 40
    if scenario == "records":
        values = [json.dumps({"method": "publish", "payload": {"channel": f"chat:cmp-{i % 12}",
                                                                "data": {"seq": i, "pad": pad}}},
                             separators=(",", ":")).encode() for i in range(1200)]
        readers = [Records("events", values, None, centrifugo=True)]
    elif scenario == "json-key":
        values = [json.dumps({"seq": i, "room": f"r{i % 50}", "pad": pad}).encode() for i in range(1200)]
        readers = [Records("events", values, [f"room-{i}" for i in range(50)], centrifugo=False)]

    replies: contextvars.ContextVar[int] = contextvars.ContextVar("replies")
    sink = GrpcCentrifugoSink(config.sink)
    deliver = sink.deliver

    async def counted(pubs: Any) -> Any:  # the fake call learns how many commands it answers
        replies.set(len(pubs))
        return await deliver(pubs)

    async def batch_call(request: bytes, metadata: Any = None, timeout: Any = None) -> bytes:
        await asyncio.sleep(0)
        return REPLY * replies.get()

    sink._batch_call = batch_call
    sink.deliver = counted  # type: ignore[method-assign]

    async def run() -> float:
        with tempfile.TemporaryDirectory(prefix="relay-hotpath-") as tmp:
            pipeline = Pipeline(RoutingTable(config.routes), sink, DeadLetterFile(Path(tmp) / "dead.jsonl"),
                                lanes=config.sink.max_in_flight, batch_max_size=config.sink.batch_max_size,
                                batch_linger=config.sink.batch_linger)
            pipeline.start()
            if scenario == "ticker16":
                engines = [build(name, cfg, Path(tmp)) for name, cfg in config.sources.items()]
            else:
                engines = [SourceEngine(r.name, r) for r in readers]
            started = time.process_time()
            await asyncio.gather(*(engine.run(pipeline.emit) for engine in engines))
            assert await pipeline.drain(60)
            used = time.process_time() - started
            await pipeline.stop()
        return used / count * 1e6

    gc.freeze()
    gc.set_threshold(50_000, 20, 20)
    return uvloop.run(run())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=200_000)
    parser.add_argument("--turns", type=int, default=5)
    parser.add_argument("--tree", action="append", help="a directory holding relay/ (repeatable)")
    parser.add_argument("--scenario", action="append", choices=SCENARIOS)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(child(args.child, args.count))
        return
    trees = [str(Path(t).resolve()) for t in args.tree or [ROOT]]
    scenarios = args.scenario or list(SCENARIOS)
    figures: dict[tuple[str, str], list[float]] = {(s, t): [] for s in scenarios for t in trees}
    for turn in range(args.turns):
        for scenario in scenarios:
            for tree in trees if turn % 2 == 0 else trees[::-1]:
                out = subprocess.run([sys.executable, __file__, "--child", scenario, "--count", str(args.count)],
                                     env={**os.environ, "PYTHONPATH": tree}, capture_output=True, text=True,
                                     check=True, cwd=tempfile.gettempdir())
                figures[scenario, tree].append(float(out.stdout.split()[-1]))
    print(f"{'scenario':<10} {'tree':<40} {'CPU µs/record median':>21} {'min':>6}  turns")
    for (scenario, tree), values in figures.items():
        print(f"{scenario:<10} {tree[-40:]:<40} {statistics.median(values):>21.2f} {min(values):>6.2f}  "
              + " ".join(f"{v:.2f}" for v in values))


if __name__ == "__main__":
    main()
