"""The file tail: `relay run` reading a big file into `relay serve` in another process.

- Throughput: a 1,000,000-line file (JSON lines of about 100 bytes, each naming one of 50 rooms)
  read from the beginning, twice: routed by room (`channel = "chat:filebench-{{ json.room }}"`: 50
  channels, so every one of the sink's `max_in_flight` lanes has batches to send) and routed to one
  channel (one lane: one batch in flight, since order per channel allows no more). The rate is
  measured on the server, from the first to the last accepted publication (the sum of the channels'
  stream tops, History with limit 0, polled every 20 ms); the relay's CPU per line from /proc.
- Memory: the relay's peak resident memory (VmHWM) while it drains that backlog, and its VmRSS at
  every poll (for the plot).
- Beside it, in the same run and against the same server process, the raw Batch ceiling: a bare
  grpc.aio client (bench/server_bench.py) sending Batch of 500 with idempotency keys, with 1 call in
  flight (what the one-channel route can use) and with 4 (what the routed-by-room relay can use; run
  before and after the relay's runs, the mean counts: the machine's load moves meanwhile).

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
# Rooms the lines name: the by-room route spreads them over this many channels. With 50 channels the
# 4 lanes (channels go to lanes by hash) get 12.5 each on average, so no lane holds the others back.
ROOMS = 50
BY_ROOM = "chat:filebench-{{ json.room }}"
ONE = "relay file→serve, 1 channel"
SPREAD = f"relay file→serve, {ROOMS} channels"


def file_source(pattern: str, channel: str, data: str = "json") -> str:
    """The config lines of a file source read from the beginning, routed to `channel` (a template)."""
    return "\n".join([
        "[sources.file]", 'type = "file"', f'paths = ["{pattern}"]', 'read_from = "beginning"',
        "[[routes]]", 'source = "file"', f'channel = "{channel}"', f'data = "{data}"'])


def room_channels(rooms: int = ROOMS) -> list[str]:
    """The channels `BY_ROOM` renders for the lines of `write_lines`."""
    return [f"chat:filebench-r{r}" for r in range(rooms)]


def write_lines(path: Path, count: int, size: int = 0) -> int:
    """A log file of `count` JSON lines (about 100 bytes, line i naming room `r{i % ROOMS}`; or `size`
    bytes each, without a room); returns its size."""
    text = b"some log text of a typical length, with a few fields in it"
    with open(path, "wb") as out:
        step = 50_000
        for start in range(0, count, step):
            if size:
                pad = b"x" * max(0, size - 29)  # 29 = the line without its padding
                out.write(b"".join(b'{"n": %10d, "pad": "%s"}\n' % (i, pad)
                                   for i in range(start, min(count, start + step))))
            else:
                out.write(b"".join(b'{"n": %d, "room": "r%d", "level": "info", "msg": "%s"}\n'
                                   % (i, i % ROOMS, text) for i in range(start, min(count, start + step))))
    return path.stat().st_size


def throughput(address: str, lines: int, workdir: Path, data: str = "json", size: int = 0,
               channel: str = CHANNEL, counted: list[str] | None = None,
               server_pid: int | None = None) -> dict[str, Any]:
    """Lines per second from one pre-written file, measured on the server over `counted` (the
    channels `channel` renders; itself by default); the relay's CPU per line and memory, and with
    `server_pid` the server's CPU per line (from the relay's start to the last line)."""
    logs = workdir / "logs"
    logs.mkdir(parents=True)
    total = write_lines(logs / "big.log", lines, size)
    rss: list[tuple[float, float, int]] = []
    with rig.StreamCounter(address, counted or [channel], batched=True) as counter:
        started = time.perf_counter()
        server_cpu = rig.cpu_seconds(server_pid) if server_pid else 0.0
        relay = rig.start_relay(workdir, address, file_source(f"{logs}/*.log", channel, data), metrics=True)
        pid = relay.process.pid  # type: ignore[union-attr]
        try:
            rate = counter.wait_for(
                lines, alive=relay.alive, cpu_of=pid,
                on_poll=lambda now, done: rss.append((round(now - started, 3), rig.rss_mib(pid), done)))
            peak = rig.peak_rss_mib(pid)
            batch = rig.batch_mean(relay)
            if server_pid:
                server_cpu = rig.cpu_seconds(server_pid) - server_cpu
        except BaseException:
            print(relay.logs()[-2000:], file=sys.stderr)
            raise
        finally:
            relay.stop()
    return {"lines": lines, "channels": len(counted or [channel]), "bytes": total,
            "line_bytes": round(total / lines), **rate.as_dict(),
            "lines_per_second": rate.per_second,
            "mib_per_second": round(total / lines * rate.per_second / 2**20, 1),
            "wall_seconds_with_startup": round(rate.last_at - started, 3),
            "publications_per_batch": batch, "peak_rss_mib": round(peak, 1),
            "rss_samples": rss[::max(1, len(rss) // 200)],
            **({"server_cpu_us_per_record": round(server_cpu / lines * 1e6, 2)} if server_pid else {})}


def run(lines: int = 1_000_000, data: str = "json", duration: float = 3.0) -> dict[str, dict[str, Any]]:
    """Raw Batch ceilings, then the relay draining the file by room and to one channel, all against
    one `relay serve` (the server keeps the same history per channel either way)."""
    results: dict[str, dict[str, Any]] = {}
    with rig.ServerProcess() as server:
        pid = server.process.pid
        results["raw batch500+keys/1"] = rig.raw_batch(server.address, "batch500+keys/1", duration, server_pid=pid)
        results["raw batch500+keys"] = {}  # measured before and after the relay's runs (its place in the table)
        ceiling = rig.raw_batch_around(server.address, "batch500+keys", duration, server_pid=pid)
        with tempfile.TemporaryDirectory(prefix="relay-file-bench-") as tmp:
            results[SPREAD] = throughput(server.address, lines, Path(tmp) / "rooms", data,
                                         channel=BY_ROOM, counted=room_channels(), server_pid=pid)
        with tempfile.TemporaryDirectory(prefix="relay-file-bench-") as tmp:
            results[ONE] = throughput(server.address, lines, Path(tmp), data, server_pid=pid)
        ceiling(results)
    return results


def table(results: dict[str, dict[str, Any]]) -> str:
    lines = [f"{'what':<32} {'lines or publications/s':>24} {'CPU µs/line':>12} "
             f"{'server µs':>10} {'per Batch':>10} {'÷ raw/1':>8} {'÷ raw/4':>8}"]
    one, four = (results[f"raw {s}"]["publications_per_second"] for s in ("batch500+keys/1", "batch500+keys"))
    for name, r in results.items():
        if "runs_publications_per_second" in r:
            name = name + " (mean)"
        rate = r.get("lines_per_second") or r.get("publications_per_second") or 0
        lines.append(f"{name:<32} {rate:>24,} {r.get('cpu_us_per_record', ''):>12} "
                     f"{r.get('server_cpu_us_per_record', ''):>10} "
                     f"{r.get('publications_per_batch', r.get('commands_per_call', '')):>10} "
                     f"{rate / one:>8.2f} {rate / four:>8.2f}")
    for name in (SPREAD, ONE):
        file = results[name]
        lines.append(f"{name}: {file['lines']:,} lines ({file['bytes'] / 2**20:.0f} MiB) in {file['seconds']} s, "
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
