"""Latency from the source to accepted by the server, at fixed rates, for the file and Kafka sources.

For each source and rate, a relay runs against `relay serve` (another process) and this process
writes at the fixed rate, each message carrying the CLOCK_MONOTONIC time of its write as `{"t": ...}`:

- file:  lines appended to a tailed file (unbuffered; the lines due in one step go in one write);
- kafka: records handed to an aiokafka producer (linger 0) for a 1-partition topic; the time is
         taken just before `send`, so the producer, the broker and the relay's fetch are all in it.

A History follower in a process of its own (bench/rig.py `Tail`) asks the server for what came after
its last position every millisecond and notes, per publication, arrival minus `t`: p50, p99, p99.9
and max. The follower's polling adds up to about a millisecond (the interval plus one History call).

For Kafka, the same records at the same rate are also read by a bare aiokafka consumer in a process
of its own (no group, no commits, the relay's fetch_max_wait of 100 ms), on a topic of its own, in the
same run: producer → consumer, the floor any Kafka reader has here (`bare_p99_ms` beside `p99_ms`).

Beside it, the relay's own histogram `relay_publish_latency_seconds` (from the source read to
accepted, no polling in it): the share of publications within 10 ms, one of its bucket bounds.

    .venv/bin/python bench/latency_bench.py [--rate 1000 --rate 10000] [--seconds 10] [--source file]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import rig  # noqa: E402
from bench.file_bench import file_source  # noqa: E402
from tests.harness.relay_process import RelayProcess  # noqa: E402

RATES = (1000, 10000)
SOURCES = ("file", "kafka")
# The follower must never fall out of the history it follows.
HISTORY_SIZE = 200_000


def paced(count: int, rate: float, write: Callable[[int, int], None]) -> float:
    """Call write(first, n) so that k items are written by k/rate seconds; returns the seconds taken."""
    started = time.monotonic()
    sent = 0
    while sent < count:
        due = min(count, int((time.monotonic() - started) * rate) + 1)
        if due > sent:
            write(sent, due - sent)
            sent = due
        else:
            time.sleep(max(0.0, started + sent / rate - time.monotonic()))
    return time.monotonic() - started


def _histogram(relay: RelayProcess) -> tuple[float, float]:
    """Observations of relay_publish_latency_seconds within 10 ms, and in all."""
    return (relay.metric("relay_publish_latency_seconds_bucket", 'le="0.01"'),
            relay.metric("relay_publish_latency_seconds_count"))


def _wait_first(address: str, channel: str, relay: RelayProcess, send: Callable[[], object]) -> int:
    """Send a message and wait until the relay delivered it: the relay is up and reading.

    A message not delivered in 10 s is followed by another (at most 6); returns how many were sent,
    which is more than 1 only if the relay missed a message written right after it started.
    """
    with rig.StreamCounter(address, [channel]) as counter:
        for attempt in range(1, 7):
            send()
            try:
                counter.wait_for(1, alive=relay.alive, timeout=10)
                return attempt
            except TimeoutError:
                print(f"latency bench: warm-up message {attempt} not delivered in 10 s", file=sys.stderr)
    raise RuntimeError(f"the relay delivered none of 6 warm-up messages: {relay.logs()[-2000:]}")


def _measure(address: str, channel: str, relay: RelayProcess, rate: float, seconds: float,
             drive: Callable[[int, float], float], warm_ups: int) -> dict[str, Any]:
    """`drive(count, rate)` sends the messages and returns the seconds it took."""
    count = max(1, int(rate * seconds))
    before = _histogram(relay)
    tail = rig.Tail(address, channel, count, interval=0.001, timeout=seconds + 90)
    try:
        took = drive(count, rate)
        latencies = tail.result()
    finally:
        tail.kill()
    after = _histogram(relay)
    within, total = after[0] - before[0], after[1] - before[1]
    share = round(within / total, 4) if total else None
    return {"rate": rate, "messages": count, "achieved_rate": round(count / took),
            **rig.percentiles(latencies), "histogram_within_10ms": share, "warm_up_messages": warm_ups}


def file_latency(address: str, rate: float, seconds: float, workdir: Path) -> dict[str, Any]:
    """Append lines at `rate` to a tailed file; append → accepted."""
    channel = "chat:latency-file"
    logs = workdir / "logs"
    logs.mkdir()
    path = logs / "app.log"
    path.write_bytes(b"")
    relay = rig.start_relay(workdir, address, file_source(f"{logs}/*.log", channel), metrics=True)
    try:
        relay.wait_http()
        with open(path, "ab", buffering=0) as out:
            # Unique first bytes: a file of an earlier run may have had this inode, and the same
            # identity would give the same idempotency keys, which the server drops as duplicates.
            warm_ups = _wait_first(address, channel, relay,
                                   lambda: out.write(b'{"t": 0, "warmup": %d}\n' % time.monotonic_ns()))

            def write(first: int, n: int) -> None:
                t = time.monotonic()
                out.write(b"".join(b'{"t": %.6f, "n": %d}\n' % (t, i) for i in range(first, first + n)))

            def drive(count: int, rate: float) -> float:
                return paced(count, rate, write)

            return {"source": "file", **_measure(address, channel, relay, rate, seconds, drive, warm_ups)}
    finally:
        relay.stop()


def kafka_latency(address: str, broker: Any, rate: float, seconds: float, workdir: Path) -> dict[str, Any]:
    """Produce records at `rate` to a 1-partition topic the relay consumes; produce → accepted."""
    from aiokafka import AIOKafkaProducer

    from tests.harness.kafka import run_sync

    channel = "chat:latency-kafka"
    topic = f"latency-{int(rate)}-{time.monotonic_ns()}"
    run_sync(broker.create_topic(topic, 1))
    body = "\n".join([
        "[sources.events]", 'type = "kafka"', f'brokers = ["{broker.bootstrap}"]', f'topics = ["{topic}"]',
        'group_id = "latency"', "[[routes]]", 'source = "events"', f'channel = "{channel}"'])
    relay = rig.start_relay(workdir, address, body, metrics=True)
    loop = asyncio.new_event_loop()

    async def start_producer() -> Any:
        producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap, linger_ms=0, acks=1)
        await producer.start()
        return producer

    producer = None
    try:
        relay.wait_http()
        producer = loop.run_until_complete(start_producer())

        async def produce(count: int, rate: float) -> float:
            started = time.monotonic()
            pending = []
            for i in range(count):
                pause = started + i / rate - time.monotonic()
                if pause > 0:
                    await asyncio.sleep(pause)
                pending.append(await producer.send(topic, b'{"t": %.6f, "n": %d}' % (time.monotonic(), i)))
            took = time.monotonic() - started
            await asyncio.gather(*pending)
            return took

        def warm_up() -> None:
            loop.run_until_complete(producer.send_and_wait(topic, b'{"t": 0, "warmup": true}'))

        def drive(count: int, rate: float) -> float:
            return loop.run_until_complete(produce(count, rate))

        warm_ups = _wait_first(address, channel, relay, warm_up)
        measured = _measure(address, channel, relay, rate, seconds, drive, warm_ups)
        relay.stop()
        bare = bare_kafka_latency(broker, rate, seconds, loop, producer)
        return {"source": "kafka", **measured, **{f"bare_{k}": v for k, v in bare.items()}}
    finally:
        if producer is not None:
            loop.run_until_complete(producer.stop())
        loop.close()
        relay.stop()


def bare_kafka_latency(broker: Any, rate: float, seconds: float, loop: asyncio.AbstractEventLoop,
                       producer: Any) -> dict[str, float]:
    """The same records at the same rate read by a bare aiokafka consumer in another process:
    produce → consumed, the floor of any Kafka reader on this machine."""
    from tests.harness.kafka import run_sync

    topic = f"latency-bare-{int(rate)}-{time.monotonic_ns()}"
    run_sync(broker.create_topic(topic, 1))
    count = max(1, int(rate * seconds))
    consumer = subprocess.Popen([sys.executable, __file__, "--bare-consumer", broker.bootstrap, topic, str(count)],
                                stdout=subprocess.PIPE, text=True)
    try:
        assert consumer.stdout is not None
        if consumer.stdout.readline().strip() != "ready":
            raise RuntimeError("the bare Kafka consumer did not start")

        async def produce() -> None:
            started = time.monotonic()
            pending = []
            for i in range(count):
                pause = started + i / rate - time.monotonic()
                if pause > 0:
                    await asyncio.sleep(pause)
                pending.append(await producer.send(topic, b'{"t": %.6f, "n": %d}' % (time.monotonic(), i)))
            await asyncio.gather(*pending)

        loop.run_until_complete(produce())
        out, _ = consumer.communicate(timeout=seconds + 90)
    finally:
        if consumer.poll() is None:
            consumer.kill()
            consumer.wait()
    return rig.percentiles(json.loads(out))


def _bare_consumer(bootstrap: str, topic: str, count: int) -> None:
    """Read `count` records of partition 0 from the start; print their latencies (s) as JSON."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    async def consume() -> list[float]:
        consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                                    fetch_max_wait_ms=100, auto_offset_reset="earliest")
        await consumer.start()
        try:
            tp = TopicPartition(topic, 0)
            consumer.assign([tp])
            await consumer.seek_to_beginning(tp)
            await consumer.position(tp)
            print("ready", flush=True)
            latencies: list[float] = []
            while len(latencies) < count:
                for records in (await consumer.getmany(timeout_ms=100)).values():
                    now = time.monotonic()
                    latencies.extend(now - json.loads(r.value)["t"] for r in records)
            return latencies
        finally:
            await consumer.stop()

    print(json.dumps(asyncio.run(consume())), flush=True)


def run(rates: tuple[float, ...] = RATES, seconds: float = 10.0, sources: tuple[str, ...] = SOURCES,
        broker: Any = None) -> dict[str, dict[str, Any]]:
    """Every source at every rate against one `relay serve`; Kafka needs `broker` (or starts one)."""
    results: dict[str, dict[str, Any]] = {}
    own = broker is None and "kafka" in sources
    if own:
        broker = rig.kafka_broker()
    try:
        with rig.ServerProcess(history_size=HISTORY_SIZE) as server:
            for source in sources:
                for rate in rates:
                    with tempfile.TemporaryDirectory(prefix="relay-latency-bench-") as tmp:
                        if source == "file":
                            r = file_latency(server.address, rate, seconds, Path(tmp))
                        else:
                            r = kafka_latency(server.address, broker, rate, seconds, Path(tmp))
                    results[f"{source} {int(rate)}/s"] = r
    finally:
        if own:
            broker.stop()
    return results


def table(results: dict[str, dict[str, Any]]) -> str:
    lines = [f"{'source at rate':<16} {'p50 ms':>7} {'p99 ms':>7} {'p99.9 ms':>9} {'max ms':>7} "
             f"{'≤10ms (histogram)':>18} {'bare aiokafka p99 ms':>21}"]
    for name, r in results.items():
        share = r["histogram_within_10ms"]
        lines.append(f"{name:<16} {r['p50_ms']:>7} {r['p99_ms']:>7} {r['p999_ms']:>9} {r['max_ms']:>7} "
                     f"{'' if share is None else f'{share:.2%}':>18} {r.get('bare_p99_ms', ''):>21}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, action="append", help="messages/s (default 1000 and 10000)")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each run")
    parser.add_argument("--source", choices=SOURCES, action="append", help="default: file and kafka")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument("--bare-consumer", nargs=3, metavar=("BOOTSTRAP", "TOPIC", "COUNT"),
                        help=argparse.SUPPRESS)  # the bare aiokafka consumer's own process
    args = parser.parse_args()
    if args.bare_consumer:
        _bare_consumer(args.bare_consumer[0], args.bare_consumer[1], int(args.bare_consumer[2]))
        return
    results = run(tuple(args.rate or RATES), args.seconds, tuple(args.source or SOURCES))
    print(json.dumps(results, indent=2) if args.json else table(results))


if __name__ == "__main__":
    main()
