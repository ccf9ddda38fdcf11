"""Peak RSS of `relay run` draining a large Kafka backlog into real Centrifugo (goal: ≤ 150 MB on 1M).

A topic of one partition gets `--count` records (1,000,000) in Centrifugo's command form, about 110
bytes each (bench/centrifugo_bench.py's records, 12 channels). Then, for each `--format`, a relay
with a consumer group of its own drains it into a fresh Centrifugo (memory engine):
`format = "centrifugo"` as written, and `format = "data"` with the route
`channel = "{{ json.payload.channel }}"`, `data = "{{ json.payload.data }}"`. Reported per format:
the relay's peak RSS (VmHWM, read at the end of the drain), its CPU µs per record and the rate;
delivery is checked as in centrifugo_bench (every record once, each channel's last one last).

    .venv/bin/python bench/kafka_memory_bench.py [--count 1000000] [--format centrifugo --format data]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import rig  # noqa: E402
from bench.centrifugo_bench import CHANNELS, source_rate  # noqa: E402
from tests.harness.kafka import KafkaBroker, Record, run_sync  # noqa: E402

GOAL_MIB = 150 * 1000 * 1000 / 2**20  # 150 MB
FORMATS = ("centrifugo", "data")
PRODUCE_CHUNK = 200_000


def records(start: int, count: int) -> list[Record]:
    """Records start .. start+count-1 of centrifugo_bench's backlog (made in chunks: a million
    Records at once take ~0.5 GB in this process)."""
    pad = "x" * 40
    return [Record(json.dumps({"method": "publish", "payload": {"channel": CHANNELS[i % len(CHANNELS)],
                                                                "data": {"seq": i, "pad": pad}}},
                              separators=(",", ":")).encode(), partition=0) for i in range(start, start + count)]


def body(broker: KafkaBroker, topic: str, fmt: str, group: str) -> str:
    lines = ["[sources.events]", 'type = "kafka"', f'format = "{fmt}"', f'brokers = ["{broker.bootstrap}"]',
             f'topics = ["{topic}"]', f'group_id = "{group}"']
    if fmt == "data":
        lines += ["[[routes]]", 'source = "events"', 'channel = "{{ json.payload.channel }}"',
                  'data = "{{ json.payload.data }}"']
    return "\n".join(lines)


def run(count: int = 1_000_000, formats: tuple[str, ...] = FORMATS) -> dict[str, Any]:
    broker = rig.kafka_broker()
    try:
        topic = f"memory-{time.monotonic_ns()}"
        run_sync(broker.create_topic(topic, 1))
        for start in range(0, count, PRODUCE_CHUNK):
            run_sync(broker.produce(topic, records(start, min(PRODUCE_CHUNK, count - start))))
        results: dict[str, Any] = {}
        for fmt in formats:
            with tempfile.TemporaryDirectory() as tmp:
                result = source_rate(body(broker, topic, fmt, f"memory-{fmt}"), count, Path(tmp))
            results[fmt] = {k: result[k] for k in ("relay_peak_rss_mib", "cpu_us_per_record", "per_second",
                                                   "delivered", "cpu_seconds_relay")}
            results[fmt]["within_goal"] = result["relay_peak_rss_mib"] <= GOAL_MIB
        return {"count": count, "partitions": 1, "goal_mib": round(GOAL_MIB, 1), "formats": results}
    finally:
        broker.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=1_000_000)
    parser.add_argument("--format", action="append", choices=FORMATS, dest="formats")
    args = parser.parse_args()
    print(json.dumps(run(args.count, tuple(args.formats or FORMATS)), indent=2))


if __name__ == "__main__":
    main()
