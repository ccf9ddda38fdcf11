"""Throughput against message size: the file source → relay → `relay serve`, 100 B to 64 KiB.

For each size, a file of JSON lines of exactly that many bytes (newline included) is drained by the
relay (route `data = "json"`, so every line is checked as JSON, as a user would run it), and its rate
is measured on the server from the first to the last accepted publication. Beside each, against the
same server process, the raw ceiling: the bench/server_bench.py client sending Batch with idempotency
keys and data of the same size, one call in flight (what one ordered stream can use), at most 500
commands and 3 MiB per call.

The line count per size is what fits a byte budget (96 MiB), between 2,000 and 200,000 lines. The
server keeps 16 publications of history per channel here, so 64 KiB messages do not fill its memory.

    .venv/bin/python bench/size_bench.py [--size 100 --size 65536]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import rig  # noqa: E402
from bench.file_bench import throughput  # noqa: E402

SIZES = (100, 1024, 4096, 16384, 65536)
BUDGET = 96 * 2**20


def lines_for(size: int, budget: int = BUDGET, low: int = 2000, high: int = 200_000) -> int:
    return max(low, min(high, budget // size))


def run(sizes: tuple[int, ...] = SIZES, budget: int = BUDGET, duration: float = 2.0,
        low: int = 2000) -> dict[str, dict[str, Any]]:
    results: dict[str, dict[str, Any]] = {}
    with rig.ServerProcess(history_size=16) as server:
        for size in sizes:
            # The data of a line is the line less its newline.
            raw = rig.raw_batch(server.address, "batch500+keys/1", duration, size - 1)
            count = lines_for(size, budget, low)
            with tempfile.TemporaryDirectory(prefix="relay-size-bench-") as tmp:
                relay = throughput(server.address, count, Path(tmp), size=size, channel=f"chat:size-{size}")
            results[str(size)] = {
                "size": size, "lines": count,
                "relay_per_second": relay["lines_per_second"],
                "relay_mib_per_second": round(relay["lines_per_second"] * size / 2**20, 1),
                "relay_seconds": relay["seconds"], "relay_peak_rss_mib": relay["peak_rss_mib"],
                "raw_per_second": raw["publications_per_second"],
                "raw_mib_per_second": round(raw["publications_per_second"] * raw["data_bytes"] / 2**20, 1),
                "raw_commands_per_call": raw["commands_per_call"],
                "relay_over_raw": round(relay["lines_per_second"] / raw["publications_per_second"], 3)}
    return results


def table(results: dict[str, dict[str, Any]]) -> str:
    lines = [f"{'size B':>7} {'lines':>8} {'relay msg/s':>12} {'relay MiB/s':>12} {'raw msg/s':>10} "
             f"{'raw MiB/s':>10} {'relay / raw':>12} {'peak RSS MiB':>13}"]
    for r in results.values():
        lines.append(f"{r['size']:>7} {r['lines']:>8,} {r['relay_per_second']:>12,} "
                     f"{r['relay_mib_per_second']:>12} {r['raw_per_second']:>10,} "
                     f"{r['raw_mib_per_second']:>10} {r['relay_over_raw']:>12.2f} "
                     f"{r['relay_peak_rss_mib']:>13}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, action="append", help="bytes per message (default 100..65536)")
    parser.add_argument("--duration", type=float, default=2.0, help="seconds per raw Batch run")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args()
    results = run(tuple(args.size or SIZES), duration=args.duration)
    print(json.dumps(results, indent=2) if args.json else table(results))


if __name__ == "__main__":
    main()
