"""Benchmark of the embedded server alone: publications per second through its GRPC API.

`relay serve` runs in one process; a grpc.aio client runs in another (this file with --client),
one scenario at a time, for a few seconds each:

- publish:        unary Publish calls, 64 in flight;
- batch100/500:   Batch of 100 / 500 publish commands, 4 in flight (the sink's max_in_flight);
- batch500+keys:  the same with an idempotency key on every publication, as the relay sends them.

Data is a ~100-byte JSON object, spread over 16 channels of namespace `chat` (history on).

    .venv/bin/python bench/server_bench.py [--duration 3]

`run()` returns the figures as a dict (bench/run.py calls it).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.rig import API_KEY, ServerProcess, raw_batch  # noqa: E402

CHANNELS = 16
# name: (commands per call, calls in flight, idempotency keys)
SCENARIOS: dict[str, tuple[int, int, bool]] = {
    "publish": (1, 64, False),
    "batch100": (100, 4, False),
    "batch500": (500, 4, False),
    "batch500+keys": (500, 4, True),
    # One call in flight: the most one ordered stream (a partition, a file, a ticker) can use.
    "batch500+keys/1": (500, 1, True),
}

# One call stays well under GRPC's default 4 MiB message limit.
MAX_CALL_BYTES = 3 * 1024 * 1024


def bench_data(size: int) -> bytes:
    """A JSON object of `size` bytes (at least ~60), or of ~100 bytes when size is 0."""
    if not size:
        return json.dumps({"type": "bench", "seq": 0, "at": "2026-01-01T00:00:00Z", "pad": "x" * 40}).encode()
    head = b'{"type": "bench", "pad": "'
    return head + b"x" * max(0, size - len(head) - 2) + b'"}'


async def _client(address: str, scenario: str, duration: float, size: int = 0) -> dict[str, Any]:
    """Drive one scenario for `duration` seconds; counts come from the replies."""
    import grpc

    from relay.proto.centrifugo import api_pb2 as pb
    from relay.proto.centrifugo import api_pb2_grpc

    per_call, in_flight, keys = SCENARIOS[scenario]
    metadata = [("authorization", f"apikey {API_KEY}")]
    data = bench_data(size)
    if per_call > 1:
        per_call = max(1, min(per_call, MAX_CALL_BYTES // len(data)))
    published = errors = 0
    latencies: list[float] = []
    serial = 0

    def commands(worker: int) -> Any:
        nonlocal serial
        reqs = []
        for i in range(per_call):
            serial += 1
            reqs.append(pb.PublishRequest(channel=f"chat:bench-{(worker + i) % CHANNELS}", data=data,
                                          idempotency_key=f"bench:{worker}:{serial}" if keys else ""))
        return reqs

    async with grpc.aio.insecure_channel(address) as chan:
        stub = api_pb2_grpc.CentrifugoApiStub(chan)  # type: ignore[no-untyped-call]
        deadline = time.perf_counter() + duration

        async def worker(n: int) -> None:
            nonlocal published, errors
            while time.perf_counter() < deadline:
                reqs = commands(n)
                started = time.perf_counter()
                if per_call == 1:
                    resp = await stub.Publish(reqs[0], metadata=metadata)
                    codes = [resp.error.code]
                else:
                    batch = pb.BatchRequest(commands=[pb.Command(publish=r) for r in reqs])
                    reply = await stub.Batch(batch, metadata=metadata)
                    codes = [r.error.code for r in reply.replies]
                latencies.append(time.perf_counter() - started)
                ok = codes.count(0)
                published += ok
                errors += len(codes) - ok

        began = time.perf_counter()
        await asyncio.gather(*(worker(n) for n in range(in_flight)))
        elapsed = time.perf_counter() - began
    latencies.sort()
    return {
        "data_bytes": len(data),
        "commands_per_call": per_call,
        "publications": published,
        "errors": errors,
        "seconds": round(elapsed, 3),
        "publications_per_second": round(published / elapsed),
        "calls_per_second": round(len(latencies) / elapsed),
        "p50_ms": round(statistics.median(latencies) * 1000, 2) if latencies else 0.0,
        "p99_ms": round(latencies[int(len(latencies) * 0.99)] * 1000, 2) if latencies else 0.0,
    }


def _client_main(address: str, scenario: str, duration: float, size: int) -> None:
    try:
        import uvloop
        uvloop.run(_print_client(address, scenario, duration, size))
    except ImportError:
        asyncio.run(_print_client(address, scenario, duration, size))


async def _print_client(address: str, scenario: str, duration: float, size: int) -> None:
    print(json.dumps(await _client(address, scenario, duration, size)))


def run(duration: float = 3.0, scenarios: list[str] | None = None) -> dict[str, dict[str, Any]]:
    """Start `relay serve`, run each scenario from a client process, return the figures by scenario."""
    with ServerProcess() as server:
        return {scenario: raw_batch(server.address, scenario, duration)
                for scenario in scenarios or list(SCENARIOS)}


def table(results: dict[str, dict[str, Any]]) -> str:
    header = ("scenario", "publications/s", "calls/s", "p50 ms", "p99 ms", "errors")
    lines = ["{:<15} {:>15} {:>9} {:>8} {:>8} {:>7}".format(*header)]
    for name, r in results.items():
        lines.append(f"{name:<15} {r['publications_per_second']:>15,} {r['calls_per_second']:>9,} "
                     f"{r['p50_ms']:>8} {r['p99_ms']:>8} {r['errors']:>7}")
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--client":  # ADDRESS SCENARIO DURATION [SIZE]
        size = int(sys.argv[5]) if len(sys.argv) > 5 else 0
        _client_main(sys.argv[2], sys.argv[3], float(sys.argv[4]), size)
        return
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=3.0, help="seconds per scenario (default 3)")
    parser.add_argument("--scenario", action="append", choices=list(SCENARIOS), help="run only these")
    args = parser.parse_args()
    results = run(args.duration, args.scenario)
    print(f"embedded server, {args.duration:g}s per scenario, client in another process")
    print(table(results))


if __name__ == "__main__":
    main()
