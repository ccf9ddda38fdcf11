"""Kafka → real Centrifugo v6: the relay beside Centrifugo's own Kafka consumer, on the same backlog.

For each partition count P (1 and 6), a topic gets `--count` records in the command form Centrifugo's
consumer reads, `{"method": "publish", "payload": {"channel": "chat:cmp-<c>", "data": {"seq": i,
"pad": ...}}}` (about 110 bytes), for 12 channels: record i goes to channel c = i % 12, in partition
c % P, so each channel's records are in one partition, in order. Then, each with a fresh Centrifugo
(memory engine; namespace `chat` with history) and a consumer group of its own:

- centrifugo: Centrifugo started with `consumers: [{name, enabled: true, type: "kafka", kafka:
  {brokers, topics, consumer_group}}]`, everything else at its defaults (max_poll_records 100,
  partition_queue_max_size 1000; it reads a new group from the earliest offset);
- relay: `relay run`, Kafka source with `format = "centrifugo"`, publishing to that Centrifugo's
  GRPC API with its defaults (Batch of up to 500, 4 lanes in flight, an idempotency key on each).

Both rates are measured the same way, on Centrifugo: the sum of the 12 channels' stream tops (History
with limit 0), polled every 20 ms, from the first poll that sees a publication to the poll that sees
all of them; beside it the "middle" rate, from 10% to 90% of the backlog, without start and tail.
Each side drains the backlog `--repeats` times (3), taking turns, each time with a consumer group of
its own; the median run counts. After each drain the last publication of every channel is checked
against the last record sent to it, and the total against the backlog (nothing lost, nothing twice).
CPU seconds are what each process used during the drain (from /proc): the relay side is the relay
plus Centrifugo.

    .venv/bin/python bench/centrifugo_bench.py [--count 200000] [--partitions 1 --partitions 6]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402

from bench import rig  # noqa: E402
from relay.proto.centrifugo import api_pb2, api_pb2_grpc  # noqa: E402
from tests.harness.kafka import KafkaBroker, Record, run_sync  # noqa: E402

CHANNELS = [f"chat:cmp-{c}" for c in range(12)]
PARTITIONS = (1, 6)


def records(count: int, partitions: int) -> list[Record]:
    pad = "x" * 40
    out = []
    for i in range(count):
        c = i % len(CHANNELS)
        value = {"method": "publish", "payload": {"channel": CHANNELS[c], "data": {"seq": i, "pad": pad}}}
        out.append(Record(json.dumps(value, separators=(",", ":")).encode(), partition=c % partitions))
    return out


def last_seqs(count: int) -> dict[str, int]:
    """The seq of the last record each channel gets."""
    n = len(CHANNELS)
    return {CHANNELS[c]: count - 1 - (count - 1 - c) % n for c in range(min(count, n))}


def check_delivery(server: Any, count: int, counter: rig.StreamCounter) -> dict[str, Any]:
    """Nothing lost, nothing twice: the total after a short settle, and each channel's last data."""
    time.sleep(0.5)
    total = counter.count()
    wrong = []
    with grpc.insecure_channel(server.grpc_address) as chan:
        stub = api_pb2_grpc.CentrifugoApiStub(chan)  # type: ignore[no-untyped-call]
        for channel, seq in last_seqs(count).items():
            resp = stub.History(api_pb2.HistoryRequest(channel=channel, limit=1, reverse=True),
                                metadata=server.metadata, timeout=5)
            got = [json.loads(p.data)["seq"] for p in resp.result.publications]
            if got != [seq]:
                wrong.append(f"{channel}: last {got}, want [{seq}]")
    if total != count or wrong:
        raise RuntimeError(f"delivered {total} of {count}; " + "; ".join(wrong))
    return {"delivered": total, "checked_channels": len(last_seqs(count))}


def centrifugo_rate(broker: KafkaBroker, topic: str, count: int, workdir: Path, turn: int = 0) -> dict[str, Any]:
    """Centrifugo's own consumer drains the topic; counted from its start. A Centrifugo that found
    its port taken is tried again with other ports and a new consumer group."""
    for attempt in range(rig.PORT_ATTEMPTS):
        try:
            return _centrifugo_rate(broker, topic, f"centrifugo-{topic}-{turn}-{attempt}", count,
                                    workdir / f"try-{attempt}")
        except RuntimeError as err:
            if not rig.port_taken(err) or attempt == rig.PORT_ATTEMPTS - 1:
                raise
    raise AssertionError("unreachable")


def _centrifugo_rate(broker: KafkaBroker, topic: str, group: str, count: int, workdir: Path) -> dict[str, Any]:
    consumer = {"name": "bench", "enabled": True, "type": "kafka",
                "kafka": {"brokers": [broker.bootstrap], "topics": [topic], "consumer_group": group}}
    return consumer_rate(consumer, count, workdir, timeline=True)


def relay_rate(broker: KafkaBroker, topic: str, count: int, workdir: Path, turn: int = 0,
               python: str = sys.executable) -> dict[str, Any]:
    """The relay (run by `python`) drains the topic into a Centrifugo with no consumer of its own."""
    body = "\n".join([
        "[sources.events]", 'type = "kafka"', 'format = "centrifugo"', f'brokers = ["{broker.bootstrap}"]',
        f'topics = ["{topic}"]', f'group_id = "relay-{topic}-{turn}"'])
    return source_rate(body, count, workdir, timeline=True, python=python)


def consumer_rate(consumer: dict[str, Any], count: int, workdir: Path, *, timeline: bool = False) -> dict[str, Any]:
    """Centrifugo's own `consumer` drains its input into CHANNELS; counted from before Centrifugo starts."""
    server = rig.centrifugo(workdir, {"consumers": [consumer], "log": {"level": "warn"}}, start=False)
    try:
        # Centrifugo consumes as soon as it is up: count from before it starts (nothing there yet).
        with rig.StreamCounter(server.grpc_address, CHANNELS, api_key=server.api_key, base=0) as counter:
            started = time.perf_counter()
            rate = rig.in_thread(lambda: counter.wait_for(
                count, alive=lambda: server.process is None or server.running(), timeout=900))
            server.start()
            cpu_before = rig.cpu_seconds(server.process.pid)
            result: rig.Rate = rate()
            cpu = rig.cpu_seconds(server.process.pid) - cpu_before
            checked = check_delivery(server, count, counter)
            timelines = {"timeline": counter.timeline(started)} if timeline else {}
    except BaseException:
        print(server.log_tail(), file=sys.stderr)
        raise
    finally:
        server.stop()
    return {**result.as_dict(), "wall_seconds_with_startup": round(result.last_at - started, 3),
            "cpu_seconds": round(cpu, 2), **checked, **timelines}


def source_rate(body: str, count: int, workdir: Path, *, timeline: bool = False,
                env: dict[str, str] | None = None, python: str = sys.executable) -> dict[str, Any]:
    """The relay (run by `python`) with the source table `body` (and `env`, its secrets) drains it
    into a Centrifugo with no consumer of its own."""
    server = rig.centrifugo(workdir / "centrifugo", {"log": {"level": "warn"}})
    try:
        with rig.StreamCounter(server.grpc_address, CHANNELS, api_key=server.api_key) as counter:
            started = time.perf_counter()
            cpu_server = rig.cpu_seconds(server.process.pid)
            relay = rig.start_relay(workdir / "relay", server.grpc_address, body, api_key=server.api_key, env=env,
                                    metrics=True, python=python)
            try:
                result = counter.wait_for(count, alive=relay.alive, timeout=900,
                                          cpu_of=relay.process.pid)  # type: ignore[union-attr]
                cpu_relay = rig.cpu_seconds(relay.process.pid)  # type: ignore[union-attr]
                peak = rig.peak_rss_mib(relay.process.pid)  # type: ignore[union-attr]
                batch = rig.batch_mean(relay)
            except BaseException:
                print(relay.logs()[-3000:], file=sys.stderr)
                raise
            finally:
                relay.stop()
            cpu_server = rig.cpu_seconds(server.process.pid) - cpu_server
            checked = check_delivery(server, count, counter)
            timelines = {"timeline": counter.timeline(started)} if timeline else {}
    finally:
        server.stop()
    return {**result.as_dict(), "wall_seconds_with_startup": round(result.last_at - started, 3),
            "cpu_seconds": round(cpu_relay + cpu_server, 2), "cpu_seconds_relay": round(cpu_relay, 2),
            "cpu_seconds_centrifugo": round(cpu_server, 2), "relay_peak_rss_mib": round(peak, 1),
            "publications_per_batch": batch, **checked,
            **timelines}


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median rate, with every run's rates beside it, and the median of the runs'
    CPU per record (the run of the median rate need not be the run of the median CPU)."""
    middle = dict(sorted(runs, key=lambda r: r["per_second"])[len(runs) // 2])
    middle["runs_per_second"] = [r["per_second"] for r in runs]
    middle["runs_middle_per_second"] = [r["middle_per_second"] for r in runs]
    cpu = [r["cpu_us_per_record"] for r in runs if r.get("cpu_us_per_record")]
    if cpu:
        middle["runs_cpu_us_per_record"] = cpu
        middle["median_cpu_us_per_record"] = sorted(cpu)[len(cpu) // 2]
    return middle


def run(count: int = 200_000, partitions: tuple[int, ...] = PARTITIONS, broker: KafkaBroker | None = None,
        repeats: int = 3) -> dict[str, dict[str, Any]]:
    """For each partition count: produce the backlog, drain it both ways `repeats` times, taking turns
    (each drain with a consumer group of its own); the median run of each side counts."""
    own = broker is None
    broker = broker or rig.kafka_broker()
    results: dict[str, dict[str, Any]] = {}
    try:
        for parts in partitions:
            topic = f"cmp-{parts}p-{time.monotonic_ns()}"
            run_sync(broker.create_topic(topic, parts))
            began = time.perf_counter()
            run_sync(broker.produce(topic, records(count, parts)))
            produced = time.perf_counter() - began
            natives, relays = [], []
            with tempfile.TemporaryDirectory(prefix="relay-cmp-bench-") as tmp:
                for n in range(repeats):
                    natives.append(centrifugo_rate(broker, topic, count, Path(tmp) / f"native-{n}", n))
                    relays.append(relay_rate(broker, topic, count, Path(tmp) / f"relay-{n}", n))
            native, relay = median_run(natives), median_run(relays)
            results[f"{parts} partition{'s' if parts > 1 else ''}"] = {
                "partitions": parts, "records": count, "produce_seconds": round(produced, 2),
                "repeats": repeats, "centrifugo": native, "relay": relay, **ratios(native, relay)}
    finally:
        if own:
            broker.stop()
    return results


def ratios(native: dict[str, Any], relay: dict[str, Any]) -> dict[str, float | None]:
    """relay ÷ Centrifugo over the whole drain and over its middle (10% to 90% delivered)."""
    return {"relay_over_centrifugo": round(relay["per_second"] / native["per_second"], 3)
            if native["per_second"] else None,
            "relay_over_centrifugo_middle": round(relay["middle_per_second"] / native["middle_per_second"], 3)
            if native["middle_per_second"] else None}


def table(results: dict[str, dict[str, Any]], label: str = "backlog") -> str:
    """One line per backlog (or stream): rates, their ratio and CPU seconds of both sides."""
    lines = [f"{label:<14} {'relay/s':>9} {'Centrifugo/s':>13} {'relay / Centrifugo':>19} "
             f"{'CPU s relay+C':>14} {'CPU s C':>8}"]
    for name, r in results.items():
        lines.append(f"{name:<14} {r['relay']['per_second']:>9,} {r['centrifugo']['per_second']:>13,} "
                     f"{r['relay_over_centrifugo'] or 0:>19.2f} {r['relay']['cpu_seconds']:>14} "
                     f"{r['centrifugo']['cpu_seconds']:>8}")
    return "\n".join(lines)


def stream_main(doc: str | None, run: Callable[[int, int], dict[str, dict[str, Any]]]) -> None:
    """The command line of a one-stream comparison (Redis, NATS): --count, --repeats, --json."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=3, help="drains per side (the median counts)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args()
    results = run(args.count, args.repeats)
    print(json.dumps(results, indent=2) if args.json else table(results, "stream"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=200_000)
    parser.add_argument("--partitions", type=int, action="append", help="default: 1 and 6")
    parser.add_argument("--repeats", type=int, default=3, help="drains per side (the median counts)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args()
    results = run(args.count, tuple(args.partitions or PARTITIONS), repeats=args.repeats)
    print(json.dumps(results, indent=2) if args.json else table(results))


if __name__ == "__main__":
    main()
