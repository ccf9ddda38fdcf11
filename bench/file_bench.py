"""The file tail: `relay run` reading a big file into `relay serve` in another process.

- Throughput: a 1,000,000-line file (JSON lines of about 100 bytes) read from the beginning. The rate
  is measured on the server, from the first to the last accepted publication (the channel's stream
  top, History with limit 0, polled every 20 ms).
- Memory: the relay's peak resident memory (VmHWM) while it drains that backlog, and its VmRSS at
  every poll (for the plot).
- Beside it, in the same run and against the same server process, the raw Batch ceiling: a bare
  grpc.aio client (bench/server_bench.py) sending Batch of 500 with idempotency keys, with 1 call in
  flight (what one file, one ordered stream, can use) and with 4.

Latency (append → accepted) is in bench/latency_bench.py.

    .venv/bin/python bench/file_bench.py [--lines 1000000] [--data json]

`run()` returns the figures as a dict (bench/run.py calls it).
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

CHANNEL = "chat:filebench"


def file_source(pattern: str, channel: str, data: str = "json") -> str:
    """The config lines of a file source read from the beginning, routed to one channel."""
    return "\n".join([
        "[sources.file]", 'type = "file"', f'paths = ["{pattern}"]', 'read_from = "beginning"',
        "[[routes]]", 'source = "file"', f'channel = "{channel}"', f'data = "{data}"'])


def write_lines(path: Path, count: int, size: int = 0) -> int:
    """A log file of `count` JSON lines (about 100 bytes, or `size` bytes each); returns its size."""
    text = b"some log text of a typical length, with a few fields in it"
    with open(path, "wb") as out:
        step = 50_000
        for start in range(0, count, step):
            if size:
                pad = b"x" * max(0, size - 29)  # 29 = the line without its padding
                out.write(b"".join(b'{"n": %10d, "pad": "%s"}\n' % (i, pad)
                                   for i in range(start, min(count, start + step))))
            else:
                out.write(b"".join(b'{"n": %d, "level": "info", "msg": "%s"}\n' % (i, text)
                                   for i in range(start, min(count, start + step))))
    return path.stat().st_size


def throughput(address: str, lines: int, workdir: Path, data: str = "json", size: int = 0,
               channel: str = CHANNEL) -> dict[str, Any]:
    """Lines per second from one pre-written file, measured on the server; the relay's memory."""
    logs = workdir / "logs"
    logs.mkdir()
    total = write_lines(logs / "big.log", lines, size)
    rss: list[tuple[float, float, int]] = []
    with rig.StreamCounter(address, [channel]) as counter:
        started = time.perf_counter()
        relay = rig.start_relay(workdir, address, file_source(f"{logs}/*.log", channel, data))
        pid = relay.process.pid  # type: ignore[union-attr]
        try:
            rate = counter.wait_for(
                lines, alive=relay.alive, cpu_of=pid,
                on_poll=lambda now, done: rss.append((round(now - started, 3), rig.rss_mib(pid), done)))
            peak = rig.peak_rss_mib(pid)
        except BaseException:
            print(relay.logs()[-2000:], file=sys.stderr)
            raise
        finally:
            relay.stop()
    return {"lines": lines, "bytes": total, "line_bytes": round(total / lines), **rate.as_dict(),
            "lines_per_second": rate.per_second,
            "mib_per_second": round(total / lines * rate.per_second / 2**20, 1),
            "wall_seconds_with_startup": round(rate.last_at - started, 3),
            "peak_rss_mib": round(peak, 1), "rss_samples": rss[::max(1, len(rss) // 200)]}


def run(lines: int = 1_000_000, data: str = "json", duration: float = 3.0) -> dict[str, dict[str, Any]]:
    """Raw Batch ceilings, then the relay draining the file, all against one `relay serve`."""
    results: dict[str, dict[str, Any]] = {}
    with rig.ServerProcess() as server:
        for scenario in ("batch500+keys/1", "batch500+keys"):
            results[f"raw {scenario}"] = rig.raw_batch(server.address, scenario, duration)
        with tempfile.TemporaryDirectory(prefix="relay-file-bench-") as tmp:
            results["relay file→serve"] = throughput(server.address, lines, Path(tmp), data)
    return results


def table(results: dict[str, dict[str, Any]]) -> str:
    file = results["relay file→serve"]
    lines = [f"{'what':<22} {'lines or publications/s':>24} {'file / this':>12}"]
    for name, r in results.items():
        rate = r.get("lines_per_second") or r.get("publications_per_second")
        if rate:
            lines.append(f"{name:<22} {rate:>24,} {file['lines_per_second'] / rate:>12.2f}")
    lines.append(f"file: {file['lines']:,} lines ({file['bytes'] / 2**20:.0f} MiB) in {file['seconds']} s, "
                 f"{file['mib_per_second']} MiB/s; relay peak RSS {file['peak_rss_mib']} MiB")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", type=int, default=1_000_000)
    parser.add_argument("--data", choices=["json", "raw", "wrap"], default="json",
                        help="the route's data mode")
    parser.add_argument("--duration", type=float, default=3.0, help="seconds per raw Batch scenario")
    args = parser.parse_args()
    print(table(run(args.lines, args.data, args.duration)))


if __name__ == "__main__":
    main()
