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
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import server_bench  # noqa: E402
from relay.proto.centrifugo import api_pb2, api_pb2_grpc  # noqa: E402


def _stream_top(stub: Any, channel: str) -> int:
    resp = stub.History(api_pb2.HistoryRequest(channel=channel, limit=0),
                        metadata=[("authorization", f"apikey {server_bench.API_KEY}")], timeout=5)
    return int(resp.result.offset)


def relay_rate(address: str, count: int, workdir: Path) -> dict[str, Any]:
    """Run the relay until its ticker finished; rate from the server's first to last offset."""
    config = workdir / "relay.toml"
    config.write_text(f'''
[relay]
state_dir = "{workdir}/state"
metrics_listen = ""
log_level = "warning"
[sink]
address = "{address}"
api_key_env = "{server_bench.KEY_ENV}"
[sources.tick]
type = "ticker"
interval = "0s"
count = {count}
[[routes]]
source = "tick"
channel = "chat:pipeline"
''')
    env = dict(os.environ, **{server_bench.KEY_ENV: server_bench.API_KEY})
    with grpc.insecure_channel(address) as chan:
        stub = api_pb2_grpc.CentrifugoApiStub(chan)  # type: ignore[no-untyped-call]
        base = _stream_top(stub, "chat:pipeline")
        started = time.perf_counter()
        relay = subprocess.Popen([sys.executable, "-m", "relay", "run", "-c", str(config)], cwd=workdir, env=env)
        first = last = None
        while True:
            top = _stream_top(stub, "chat:pipeline") - base
            now = time.perf_counter()
            if top > 0 and first is None:
                first = (now, top)
            if top >= count:
                last = (now, top)
                break
            if relay.poll() is not None and relay.returncode != 0:
                raise RuntimeError(f"relay exited with {relay.returncode}")
            time.sleep(0.02)
        relay.wait(60)
    assert first is not None and last is not None
    seconds = last[0] - first[0]
    return {"publications": count, "seconds": round(seconds, 3),
            "publications_per_second": round((last[1] - first[1]) / seconds),
            "wall_seconds_with_startup": round(last[0] - started, 3)}


def run(count: int = 200_000, duration: float = 3.0) -> dict[str, dict[str, Any]]:
    server = server_bench.ServerProcess()
    results: dict[str, dict[str, Any]] = {}
    try:
        for scenario in ("batch500+keys/1", "batch500+keys"):
            command = [sys.executable, server_bench.__file__, "--client", server.address, scenario, str(duration)]
            done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=duration + 60)
            if done.returncode != 0:
                raise RuntimeError(done.stderr[-2000:])
            results[f"raw {scenario}"] = json.loads(done.stdout)
        with tempfile.TemporaryDirectory(prefix="relay-bench-") as tmp:
            results["relay ticker→serve"] = relay_rate(server.address, count, Path(tmp))
    finally:
        server.stop()
    return results


def table(results: dict[str, dict[str, Any]]) -> str:
    relay = results["relay ticker→serve"]["publications_per_second"]
    lines = [f"{'what':<22} {'publications/s':>15} {'relay / this':>13}"]
    for name, r in results.items():
        rate = r["publications_per_second"]
        lines.append(f"{name:<22} {rate:>15,} {relay / rate:>13.2f}")
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--client":
        server_bench.main()
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=200_000)
    parser.add_argument("--duration", type=float, default=3.0)
    args = parser.parse_args()
    print(table(run(args.count, args.duration)))


if __name__ == "__main__":
    main()
