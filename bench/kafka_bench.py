"""A Kafka backlog drained by the relay into `relay serve`, beside a bare aiokafka consumer.

A real Kafka broker (tests/harness/kafka.py) gets a backlog of `--count` keyed JSON records
(~100 bytes, keys room-0..room-49, 3 partitions). Then:

- relay:  `relay run` (another process) with the Kafka source and route `chat:{{ key }}` drains it
          into `relay serve` (a third process). Drained means committed: the relay commits an offset
          only after the server accepted every publication up to it, so the rate is read from the
          group's committed offsets (commit_interval 100ms), from the first commit to the last.
          Three drains, each with a group of its own: the median rate counts, and the median CPU.
- bare:   an aiokafka consumer in this process reads the same backlog and does nothing with it
          (no group, no commits): the ceiling of the client library on this machine. It takes well
          under a second, so it is read three times and the median counts.

The ratio relay / bare says what routing, publishing over GRPC and acknowledging cost.

    .venv/bin/python bench/kafka_bench.py [--count 200000]

`run()` returns the figures as a dict.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import rig  # noqa: E402
from tests.harness.kafka import KafkaBroker, Record  # noqa: E402

PARTITIONS = 3
KEYS = 50
# The relay drains the backlog this many times, each with a consumer group of its own; the drain of
# the median rate counts, and the median of the drains' CPU per record (one short drain is at the
# mercy of a shared machine).
RELAY_DRAINS = 3


def _records(count: int) -> list[Record]:
    pad = "x" * 48
    return [Record(json.dumps({"k": f"room-{i % KEYS}", "seq": i, "pad": pad}).encode(),
                   key=f"room-{i % KEYS}") for i in range(count)]


async def _committed_total(broker: KafkaBroker, group: str, topic: str) -> int:
    offsets = await broker.committed(group, topic, PARTITIONS)
    return sum(v or 0 for v in offsets.values())


async def relay_rate(broker: KafkaBroker, server_address: str, topic: str, count: int,
                     workdir: Path, group: str = "bench") -> dict[str, Any]:
    """Run `relay run` until the group committed the whole backlog."""
    body = "\n".join([
        "[sources.events]", 'type = "kafka"', f'brokers = ["{broker.bootstrap}"]', f'topics = ["{topic}"]',
        f'group_id = "{group}"', 'commit_interval = "100ms"',
        "[[routes]]", 'source = "events"', 'channel = "chat:{{ key }}"'])
    started = time.perf_counter()
    relay = rig.start_relay(workdir, server_address, body, metrics=True)
    pid: int = relay.process.pid  # type: ignore[union-attr]
    first: tuple[float, int] | None = None
    cpu_first = 0.0
    try:
        while True:
            done = await _committed_total(broker, group, topic)
            now = time.perf_counter()
            if done > 0 and first is None:
                first, cpu_first = (now, done), rig.cpu_seconds(pid)
            if done >= count:
                break
            if not relay.alive():
                raise RuntimeError(f"relay exited: {relay.logs()[-2000:]}")
            if now - started > 600:
                raise TimeoutError(f"relay committed {done} of {count} in 600s")
            await asyncio.sleep(0.05)
        # CPU per record between the first and the last commit seen: start-up excluded.
        cpu = rig.cpu_seconds(pid) - cpu_first
        peak = rig.peak_rss_mib(pid)
        batch = rig.batch_mean(relay)
    finally:
        relay.stop()
    assert first is not None
    seconds = now - first[0]
    records = done - first[1]
    return {"records": count, "seconds": round(seconds, 3),
            "records_per_second": round(records / seconds) if seconds > 0 else 0,
            "wall_seconds_with_startup": round(now - started, 3), "peak_rss_mib": round(peak, 1),
            "cpu_us_per_record": round(cpu / records * 1e6, 2) if records else None,
            "publications_per_batch": batch}


async def bare_rate(broker: KafkaBroker, topic: str, count: int) -> dict[str, Any]:
    """A bare aiokafka consumer reading the backlog from the start, doing nothing with it."""
    from aiokafka import AIOKafkaConsumer, TopicPartition
    started = time.perf_counter()
    consumer = AIOKafkaConsumer(bootstrap_servers=broker.bootstrap, enable_auto_commit=False,
                                auto_offset_reset="earliest")
    await consumer.start()
    try:
        consumer.assign([TopicPartition(topic, p) for p in range(PARTITIONS)])
        await consumer.seek_to_beginning()
        read = 0
        first: tuple[float, int] | None = None
        while read < count:
            batches = await consumer.getmany(timeout_ms=1000)
            read += sum(len(records) for records in batches.values())
            if first is None and batches:
                first = (time.perf_counter(), read)
        now = time.perf_counter()
    finally:
        await consumer.stop()
    assert first is not None
    # As for the relay: what came after the first sight of records, over the time since then.
    seconds = now - first[0]
    rate = round((read - first[1]) / seconds) if seconds > 0 else 0
    return {"records": read, "seconds": round(seconds, 3), "records_per_second": rate,
            "first_batch": first[1], "wall_seconds_with_startup": round(now - started, 3)}


async def _run(broker: KafkaBroker, server_address: str, count: int) -> dict[str, dict[str, Any]]:
    topic = f"bench-events-{time.monotonic_ns()}"  # a broker may serve several runs
    await broker.create_topic(topic, PARTITIONS)
    produced_at = time.perf_counter()
    await broker.produce(topic, _records(count))
    produce_seconds = time.perf_counter() - produced_at
    with tempfile.TemporaryDirectory(prefix="relay-kafka-bench-") as tmp:
        drains = [await relay_rate(broker, server_address, topic, count, Path(tmp) / f"relay-{n}", f"bench-{n}")
                  for n in range(RELAY_DRAINS)]
    relay = dict(sorted(drains, key=lambda r: r["records_per_second"])[RELAY_DRAINS // 2])
    relay["all_records_per_second"] = [r["records_per_second"] for r in drains]
    cpu = [r["cpu_us_per_record"] for r in drains if r["cpu_us_per_record"] is not None]  # None: one commit saw all
    relay["all_cpu_us_per_record"] = cpu
    relay["median_cpu_us_per_record"] = sorted(cpu)[len(cpu) // 2] if cpu else None
    reads = [await bare_rate(broker, topic, count) for _ in range(3)]
    bare = sorted(reads, key=lambda r: r["records_per_second"])[1]
    bare["all_records_per_second"] = [r["records_per_second"] for r in reads]
    return {"relay kafka→serve": relay, "bare aiokafka read": bare,
            "backlog": {"records": count, "produce_seconds": round(produce_seconds, 3),
                        "broker_start_seconds": round(broker.started_in, 3)}}


def run(count: int = 200_000, broker: KafkaBroker | None = None) -> dict[str, dict[str, Any]]:
    """Measure both rates against `broker` (or a broker of its own); the figures as a dict."""
    own = broker is None
    broker = broker or rig.kafka_broker()
    try:
        with rig.ServerProcess() as server:
            return asyncio.run(_run(broker, server.address, count))
    finally:
        if own:
            broker.stop()


def table(results: dict[str, dict[str, Any]]) -> str:
    relay = results["relay kafka→serve"]
    bare = results["bare aiokafka read"]
    lines = [f"{'what':<20} {'records/s':>10} {'seconds':>8} {'with start-up':>14}"]
    for name in ("relay kafka→serve", "bare aiokafka read"):
        r = results[name]
        lines.append(f"{name:<20} {r['records_per_second']:>10,} {r['seconds']:>8} "
                     f"{r['wall_seconds_with_startup']:>14}")
    lines.append(f"relay / bare: {relay['records_per_second'] / max(1, bare['records_per_second']):.2f} "
                 f"({results['backlog']['records']:,} records, 3 partitions, 50 keys)")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=200_000)
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args()
    results = run(args.count)
    print(json.dumps(results, indent=2) if args.json else table(results))


if __name__ == "__main__":
    main()
