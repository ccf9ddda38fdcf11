"""The whole pipeline at full speed: a ticker with `interval = "0s"` → relay → `relay serve`.

Beside it, in the same run and against the same server process, the raw Batch ceiling: a bare
grpc.aio client sending Batch of 500 publications with idempotency keys (what the relay sends),
once with 1 call in flight (what one ordered stream can use) and once with 4 (`max_in_flight`).
The relay's rate is measured on the server: the time between its first and its last accepted
publication, read from the channel's stream top (History with limit 0).

    .venv/bin/python bench/pipeline_bench.py [--count 200000]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import rig  # noqa: E402

CHANNEL = "chat:pipeline"


def relay_rate(address: str, count: int, workdir: Path) -> dict[str, Any]:
    """Run the relay until its ticker finished; rate from the server's first to last offset."""
    body = "\n".join(["[sources.tick]", 'type = "ticker"', 'interval = "0s"', f"count = {count}",
                      "[[routes]]", 'source = "tick"', f'channel = "{CHANNEL}"'])
    with rig.StreamCounter(address, [CHANNEL]) as counter:
        started = time.perf_counter()
        relay = rig.start_relay(workdir, address, body)
        try:
            rate = counter.wait_for(count, alive=lambda: relay.alive() or relay.wait() == 0,
                                    cpu_of=relay.process.pid)  # type: ignore[union-attr]
            relay.wait(60)
        finally:
            relay.stop()
    return {"publications": count, **rate.as_dict(), "publications_per_second": rate.per_second,
            "wall_seconds_with_startup": round(rate.last_at - started, 3)}


def run(count: int = 200_000, duration: float = 3.0) -> dict[str, dict[str, Any]]:
    results: dict[str, dict[str, Any]] = {}
    with rig.ServerProcess() as server:
        for scenario in ("batch500+keys/1", "batch500+keys"):
            results[f"raw {scenario}"] = rig.raw_batch(server.address, scenario, duration)
        with tempfile.TemporaryDirectory(prefix="relay-bench-") as tmp:
            results["relay ticker→serve"] = relay_rate(server.address, count, Path(tmp))
    return results


def table(results: dict[str, dict[str, Any]]) -> str:
    relay = results["relay ticker→serve"]["publications_per_second"]
    lines = [f"{'what':<22} {'publications/s':>15} {'relay / this':>13}"]
    for name, r in results.items():
        rate = r["publications_per_second"]
        lines.append(f"{name:<22} {rate:>15,} {relay / rate:>13.2f}")
    cpu = results["relay ticker→serve"].get("cpu_us_per_record", 0)
    lines.append(f"relay CPU per publication (start-up excluded): {cpu} µs")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=200_000)
    parser.add_argument("--duration", type=float, default=3.0)
    args = parser.parse_args()
    print(table(run(args.count, args.duration)))


if __name__ == "__main__":
    main()
