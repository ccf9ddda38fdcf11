"""The whole pipeline at full speed: tickers with `interval = "0s"` → relay → `relay serve`.

Two relays in turn: 16 tickers, each routed to a channel of its own (16 channels, so every one of
the sink's `max_in_flight` lanes has batches to send), and one ticker on one channel (one lane: one
batch in flight, as order per channel allows). Beside them, in the same run and against the same
server process, the raw Batch ceiling: a bare grpc.aio client sending Batch of 500 publications with
idempotency keys (what the relay sends), once with 1 call in flight (what one channel can use) and
once with 4 (`max_in_flight`; before and after the relay's runs, the mean counts).
The relay's rate is measured on the server: the time between its first and its last accepted
publication, read from the channels' stream tops (History with limit 0); its CPU per publication
from /proc.

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
# Tickers of the spread run; with 16 channels on 4 lanes (by hash) every lane has work.
TICKERS = 16
ONE = "relay ticker→serve, 1 channel"
SPREAD = f"relay ticker→serve, {TICKERS} channels"


def tickers(count: int, n: int) -> tuple[str, list[str]]:
    """Config lines of `n` fast tickers emitting `count` together, each routed to its own channel;
    and those channels."""
    lines: list[str] = []
    channels = [CHANNEL] if n == 1 else [f"{CHANNEL}-{i}" for i in range(n)]
    for i, channel in enumerate(channels):
        lines += [f"[sources.tick{i}]", 'type = "ticker"', 'interval = "0s"',
                  f"count = {count // n + (i < count % n)}",
                  "[[routes]]", f'source = "tick{i}"', f'channel = "{channel}"']
    return "\n".join(lines), channels


def relay_rate(address: str, count: int, workdir: Path, n: int = 1) -> dict[str, Any]:
    """Run the relay until its `n` tickers finished; rate from the server's first to last offset."""
    body, channels = tickers(count, n)
    with rig.StreamCounter(address, channels, batched=True) as counter:
        started = time.perf_counter()
        relay = rig.start_relay(workdir, address, body)
        try:
            rate = counter.wait_for(count, alive=lambda: relay.alive() or relay.wait() == 0,
                                    cpu_of=relay.process.pid)  # type: ignore[union-attr]
            relay.wait(60)
        finally:
            relay.stop()
    return {"publications": count, "channels": n, **rate.as_dict(), "publications_per_second": rate.per_second,
            "wall_seconds_with_startup": round(rate.last_at - started, 3)}


def run(count: int = 200_000, duration: float = 3.0) -> dict[str, dict[str, Any]]:
    results: dict[str, dict[str, Any]] = {}
    with rig.ServerProcess() as server:
        pid = server.process.pid
        results["raw batch500+keys/1"] = rig.raw_batch(server.address, "batch500+keys/1", duration, server_pid=pid)
        results["raw batch500+keys"] = {}  # measured before and after the relay's runs (its place in the table)
        ceiling = rig.raw_batch_around(server.address, "batch500+keys", duration, server_pid=pid)
        for name, n in ((SPREAD, TICKERS), (ONE, 1)):
            with tempfile.TemporaryDirectory(prefix="relay-bench-") as tmp:
                results[name] = relay_rate(server.address, count, Path(tmp), n)
        ceiling(results)
    return results


def table(results: dict[str, dict[str, Any]]) -> str:
    lines = [f"{'what':<32} {'publications/s':>15} {'CPU µs each':>12} {'÷ raw/1':>8} {'÷ raw/4':>8}"]
    one, four = (results[f"raw {s}"]["publications_per_second"] for s in ("batch500+keys/1", "batch500+keys"))
    for name, r in results.items():
        if "runs_publications_per_second" in r:
            name = name + " (mean)"
        rate = r["publications_per_second"]
        lines.append(f"{name:<32} {rate:>15,} {r.get('cpu_us_per_record', ''):>12} "
                     f"{rate / one:>8.2f} {rate / four:>8.2f}")
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
