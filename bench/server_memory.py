"""Memory of the embedded server per channel held: what README's `max_channels` figure rests on.

`relay serve` runs in its own process; this one publishes one ~100-byte publication to each of N new
channels (`chat:key-N`, Batches of 500) and reads the server's resident memory (VmRSS) before and
after. Two scenarios: with an idempotency key on each publication, as the relay sends them, and
without. Each runs in a fresh server.

    .venv/bin/python bench/server_memory.py [--channels 200000]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import grpc

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.rig import ServerProcess, metadata  # noqa: E402
from relay.proto.centrifugo import api_pb2, api_pb2_grpc  # noqa: E402

BATCH = 500
DATA = json.dumps({"text": "x" * 80, "n": 1}).encode()


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def measure(channels: int, keys: bool, history_size: int) -> dict[str, float]:
    """Bytes of RSS per channel after publishing once to `channels` new channels."""
    with ServerProcess(history_size=history_size, extra=f"max_channels = {channels * 2}") as server:
        md = metadata(server.api_key)
        with grpc.insecure_channel(server.address) as chan:
            stub = api_pb2_grpc.CentrifugoApiStub(chan)  # type: ignore[no-untyped-call]
            stub.Info(api_pb2.InfoRequest(), metadata=md, timeout=10)
            before = rss(server.process.pid)
            for start in range(0, channels, BATCH):
                cmds = [api_pb2.Command(publish=api_pb2.PublishRequest(
                    channel=f"chat:key-{n}", data=DATA, idempotency_key=f"src/stream/{n}#0" if keys else ""))
                    for n in range(start, min(start + BATCH, channels))]
                replies = stub.Batch(api_pb2.BatchRequest(commands=cmds), metadata=md, timeout=60).replies
                assert all(not r.HasField("error") for r in replies)
            info = stub.Info(api_pb2.InfoRequest(), metadata=md, timeout=10)
            assert info.result.nodes[0].num_channels == channels
            after = rss(server.process.pid)
    return {"channels": channels, "rss_before_mb": round(before / 2**20, 1),
            "rss_after_mb": round(after / 2**20, 1), "bytes_per_channel": round((after - before) / channels)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--channels", type=int, default=200_000)
    args = parser.parse_args()
    results = {
        "history, idempotency key": measure(args.channels, keys=True, history_size=1000),
        "history, no key": measure(args.channels, keys=False, history_size=1000),
    }
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
