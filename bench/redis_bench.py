"""Redis Streams → real Centrifugo v6: the relay beside Centrifugo's own `redis_stream` consumer.

One stream gets `--count` entries in the command form Centrifugo's consumer reads, field `payload` =
`{"method": "publish", "payload": {"channel": "chat:cmp-<c>", "data": {"seq": i, "pad": ...}}}`
for 12 channels (the records of bench/centrifugo_bench.py). Then, each with a fresh Centrifugo
(memory engine, namespace `chat` with history) and a consumer group of its own on the same stream:

- centrifugo: Centrifugo started with `consumers: [{type: "redis_stream", redis_stream: {address,
  streams, consumer_group}}]` at its defaults (one worker); its group is created at 0 first
  (Centrifugo would create it at `$` and read nothing of the backlog);
- relay: `relay run`, Redis source with `format = "centrifugo"` (group created at earliest),
  publishing to that Centrifugo's GRPC API with its defaults.

Rates are measured on Centrifugo the same way for both (bench/rig.py StreamCounter: the 12 channels'
stream tops, from the first publication seen to the last); after each drain the last publication
of every channel and the total are checked. `--repeats` drains per side, taking turns; the median counts.

    .venv/bin/python bench/redis_bench.py [--count 100000] [--repeats 3]
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import redis  # noqa: E402

from bench.centrifugo_bench import (  # noqa: E402
    consumer_rate,
    median_run,
    ratios,
    records,
    source_rate,
    stream_main,
)
from tests.harness.redis import RedisServer  # noqa: E402


def fill(server: RedisServer, stream: str, count: int) -> None:
    with redis.Redis(port=server.port) as client:
        pipe = client.pipeline(transaction=False)
        for n, record in enumerate(records(count, 1)):
            pipe.xadd(stream, {"payload": record.value or b""})
            if n % 5000 == 4999:
                pipe.execute()
        pipe.execute()


def centrifugo_rate(server: RedisServer, stream: str, count: int, workdir: Path, turn: int) -> dict[str, Any]:
    group = f"centrifugo_{turn}"
    with redis.Redis(port=server.port) as client:
        client.xgroup_create(stream, group, id="0")
    consumer = {"name": "bench", "enabled": True, "type": "redis_stream",
                "redis_stream": {"address": [f"redis://127.0.0.1:{server.port}"], "streams": [stream],
                                 "consumer_group": group}}
    return consumer_rate(consumer, count, workdir)


def relay_rate(server: RedisServer, stream: str, count: int, workdir: Path, turn: int) -> dict[str, Any]:
    body = "\n".join([
        "[sources.events]", 'type = "redis"', 'format = "centrifugo"', f'address = "{server.url}"',
        f'streams = ["{stream}"]', f'group = "relay-{turn}"'])
    return source_rate(body, count, workdir)


def run(count: int = 100_000, repeats: int = 3) -> dict[str, dict[str, Any]]:
    """Fill one stream, drain it both ways `repeats` times (taking turns); the median run counts."""
    directory = Path(tempfile.mkdtemp(prefix="relay-redis-bench-"))
    server = RedisServer(directory)
    server.start()
    try:
        stream = f"cmp-{time.monotonic_ns()}"
        began = time.perf_counter()
        fill(server, stream, count)
        produced = time.perf_counter() - began
        natives, relays = [], []
        for n in range(repeats):
            natives.append(centrifugo_rate(server, stream, count, directory / f"native-{n}", n))
            relays.append(relay_rate(server, stream, count, directory / f"relay-{n}", n))
        native, relay = median_run(natives), median_run(relays)
        return {"1 stream": {
            "entries": count, "fill_seconds": round(produced, 2), "repeats": repeats,
            "centrifugo": native, "relay": relay, **ratios(native, relay)}}
    finally:
        server.stop()
        shutil.rmtree(directory, ignore_errors=True)


def main() -> None:
    stream_main(__doc__, run)


if __name__ == "__main__":
    main()
