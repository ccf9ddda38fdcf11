"""The file tail: `relay run` tailing files into `relay serve` in another process.

- Throughput: a 1,000,000-line file (JSON lines of about 90 bytes) read from the beginning. The rate
  is measured on the server, from the first to the last accepted publication (the channel's stream
  top, History with limit 0).
- Beside it, in the same run and against the same server process, the raw Batch ceiling: a bare
  grpc.aio client (bench/server_bench.py) sending Batch of 500 with idempotency keys, with 1 call in
  flight (what one file, one ordered stream, can use) and with 4.
- Latency: lines appended at 1,000/s, each carrying its append time (CLOCK_MONOTONIC, one clock for
  every process on Linux); a poller asks History for what came after the last position every
  millisecond and notes when each line is there. p50/p99 from append to accepted by the server
  (the polling adds up to about a millisecond).

    .venv/bin/python bench/file_bench.py [--lines 1000000] [--rate 1000] [--seconds 10] [--data json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import grpc

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import server_bench  # noqa: E402
from relay.proto.centrifugo import api_pb2, api_pb2_grpc  # noqa: E402

METADATA = [("authorization", f"apikey {server_bench.API_KEY}")]


def _config(workdir: Path, address: str, pattern: str, channel: str, data: str) -> Path:
    config = workdir / "relay.toml"
    config.write_text(f'''
[relay]
state_dir = "{workdir}/state"
metrics_listen = ""
log_level = "warning"
[sink]
address = "{address}"
api_key_env = "{server_bench.KEY_ENV}"
[sources.file]
type = "file"
paths = ["{pattern}"]
read_from = "beginning"
[[routes]]
source = "file"
channel = "{channel}"
data = "{data}"
''')
    return config


def _start_relay(config: Path, workdir: Path) -> subprocess.Popen[bytes]:
    env = dict(os.environ, **{server_bench.KEY_ENV: server_bench.API_KEY})
    return subprocess.Popen([sys.executable, "-m", "relay", "run", "-c", str(config)], cwd=workdir, env=env)


def _stop_relay(relay: subprocess.Popen[bytes]) -> None:
    relay.terminate()
    try:
        relay.wait(30)
    except subprocess.TimeoutExpired:
        relay.kill()
        relay.wait()


def _stream_top(stub: Any, channel: str) -> tuple[int, str]:
    resp = stub.History(api_pb2.HistoryRequest(channel=channel, limit=0), metadata=METADATA, timeout=5)
    return int(resp.result.offset), str(resp.result.epoch)


def write_lines(path: Path, count: int) -> int:
    """A log file of `count` JSON lines; returns its size."""
    text = "some log text of a typical length, with a few fields in it"
    with open(path, "wb") as out:
        step = 100_000
        for start in range(0, count, step):
            out.write(b"".join(b'{"n": %d, "level": "info", "msg": "%s"}\n' % (i, text.encode())
                               for i in range(start, min(count, start + step))))
    return path.stat().st_size


def throughput(address: str, lines: int, workdir: Path, data: str = "json") -> dict[str, Any]:
    """Lines per second from one pre-written file, measured on the server."""
    logs = workdir / "logs"
    logs.mkdir()
    size = write_lines(logs / "big.log", lines)
    channel = "chat:filebench"
    relay = _start_relay(_config(workdir, address, f"{logs}/*.log", channel, data), workdir)
    try:
        with grpc.insecure_channel(address) as chan:
            stub = api_pb2_grpc.CentrifugoApiStub(chan)  # type: ignore[no-untyped-call]
            base = _stream_top(stub, channel)[0]
            first = last = None
            while True:
                top = _stream_top(stub, channel)[0] - base
                now = time.perf_counter()
                if top > 0 and first is None:
                    first = (now, top)
                if top >= lines:
                    last = (now, top)
                    break
                if relay.poll() is not None:
                    raise RuntimeError(f"relay exited with {relay.returncode}")
                time.sleep(0.02)
    finally:
        _stop_relay(relay)
    assert first is not None and last is not None
    seconds = last[0] - first[0]
    return {"lines": lines, "bytes": size, "seconds": round(seconds, 3),
            "lines_per_second": round((last[1] - first[1]) / seconds),
            "mib_per_second": round(size / seconds / 2**20, 1)}


class _Poller(threading.Thread):
    """Reads History after the last seen position every millisecond; notes when each line arrived."""

    def __init__(self, address: str, channel: str) -> None:
        super().__init__(daemon=True)
        self.address, self.channel = address, channel
        self.latencies: list[float] = []
        self.stop = threading.Event()

    def run(self) -> None:
        with grpc.insecure_channel(self.address) as chan:
            stub = api_pb2_grpc.CentrifugoApiStub(chan)  # type: ignore[no-untyped-call]
            offset, epoch = _stream_top(stub, self.channel)
            while not self.stop.is_set():
                since = api_pb2.StreamPosition(offset=offset, epoch=epoch)
                resp = stub.History(api_pb2.HistoryRequest(channel=self.channel, since=since, limit=-1),
                                    metadata=METADATA, timeout=5)
                now = time.monotonic()
                for pub in resp.result.publications:
                    self.latencies.append(now - json.loads(pub.data)["t"])
                    offset = max(offset, int(pub.offset))
                time.sleep(0.001)


def latency(address: str, rate: float, seconds: float, workdir: Path) -> dict[str, Any]:
    """Append to a tailed file at `rate` lines/s; time from append to accepted by the server."""
    logs = workdir / "lat"
    logs.mkdir()
    path = logs / "app.log"
    path.write_bytes(b"")
    channel = "chat:filelatency"
    relay = _start_relay(_config(workdir, address, f"{logs}/*.log", channel, "json"), workdir)
    poller = _Poller(address, channel)
    try:
        with grpc.insecure_channel(address) as chan:
            stub = api_pb2_grpc.CentrifugoApiStub(chan)  # type: ignore[no-untyped-call]
            base = _stream_top(stub, channel)[0]
            with open(path, "ab", buffering=0) as out:
                out.write(b'{"warmup": true}\n')
                deadline = time.monotonic() + 60
                while _stream_top(stub, channel)[0] == base:  # the relay is up and tailing
                    if time.monotonic() > deadline or relay.poll() is not None:
                        raise RuntimeError("the relay did not deliver the warm-up line")
                    time.sleep(0.05)
                poller.start()
                time.sleep(0.2)
                count = int(rate * seconds)
                started = time.monotonic()
                for i in range(count):
                    pause = started + i / rate - time.monotonic()
                    if pause > 0:
                        time.sleep(pause)
                    out.write(b'{"n": %d, "t": %.6f}\n' % (i, time.monotonic()))
            deadline = time.monotonic() + 30
            while len(poller.latencies) < count and time.monotonic() < deadline:
                time.sleep(0.05)
    finally:
        poller.stop.set()
        _stop_relay(relay)
    got = sorted(poller.latencies)
    if len(got) < count:
        raise RuntimeError(f"only {len(got)} of {count} lines arrived")
    return {"lines": count, "rate": rate, "p50_ms": round(statistics.median(got) * 1000, 1),
            "p99_ms": round(got[int(len(got) * 0.99) - 1] * 1000, 1), "max_ms": round(got[-1] * 1000, 1)}


def run(lines: int = 1_000_000, rate: float = 1000, seconds: float = 10, data: str = "json",
        duration: float = 3.0) -> dict[str, dict[str, Any]]:
    server = server_bench.ServerProcess()
    results: dict[str, dict[str, Any]] = {}
    try:
        for scenario in ("batch500+keys/1", "batch500+keys"):
            command = [sys.executable, server_bench.__file__, "--client", server.address, scenario,
                       str(duration)]
            done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=duration + 60)
            if done.returncode != 0:
                raise RuntimeError(done.stderr[-2000:])
            results[f"raw {scenario}"] = json.loads(done.stdout)
        with tempfile.TemporaryDirectory(prefix="relay-file-bench-") as tmp:
            results["relay file→serve"] = throughput(server.address, lines, Path(tmp), data)
        with tempfile.TemporaryDirectory(prefix="relay-file-bench-") as tmp:
            results["latency"] = latency(server.address, rate, seconds, Path(tmp))
    finally:
        server.stop()
    return results


def table(results: dict[str, dict[str, Any]]) -> str:
    file = results["relay file→serve"]
    lines = [f"{'what':<22} {'lines or publications/s':>24} {'file / this':>12}"]
    for name, r in results.items():
        rate = r.get("lines_per_second") or r.get("publications_per_second")
        if rate:
            lines.append(f"{name:<22} {rate:>24,} {file['lines_per_second'] / rate:>12.2f}")
    lat = results["latency"]
    lines.append(f"file: {file['lines']:,} lines ({file['bytes'] / 2**20:.0f} MiB) in {file['seconds']} s, "
                 f"{file['mib_per_second']} MiB/s")
    lines.append(f"latency append → accepted at {lat['rate']:g} lines/s ({lat['lines']:,} lines): "
                 f"p50 {lat['p50_ms']} ms, p99 {lat['p99_ms']} ms, max {lat['max_ms']} ms")
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--client":
        server_bench.main()
        return
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", type=int, default=1_000_000)
    parser.add_argument("--rate", type=float, default=1000, help="lines/s for the latency run")
    parser.add_argument("--seconds", type=float, default=10, help="length of the latency run")
    parser.add_argument("--data", choices=["json", "raw", "wrap"], default="json",
                        help="the route's data mode")
    parser.add_argument("--duration", type=float, default=3.0, help="seconds per raw Batch scenario")
    args = parser.parse_args()
    print(table(run(args.lines, args.rate, args.seconds, args.data, args.duration)))


if __name__ == "__main__":
    main()
