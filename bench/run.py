"""`make bench`: every benchmark in one run; writes BENCHMARKS.md, bench/results.json, bench/plots/*.png.

    .venv/bin/python bench/run.py                   # the full run (about 10 minutes on 2 cores)
    .venv/bin/python bench/run.py --quick           # small counts, short runs: a smoke run
    .venv/bin/python bench/run.py --only file,sizes --out /tmp/bench/BENCHMARKS.md

Each figure stands beside its best alternative, measured in the same run on the same machine
(the raw Batch ceiling of the same server, a bare aiokafka consumer on the same backlog, Centrifugo's
own Kafka consumer on the same backlog), so the ratios are what to read: the machine is shared.
A section that fails is reported as failed in BENCHMARKS.md and makes the exit status 1.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import (  # noqa: E402
    centrifugo_bench,
    fanout_bench,
    file_bench,
    kafka_bench,
    kafka_memory_bench,
    latency_bench,
    nats_bench,
    pipeline_bench,
    postgres_bench,
    redis_bench,
    report,
    rig,
    server_bench,
    size_bench,
)

PY = ".venv/bin/python"


@dataclass(frozen=True)
class Params:
    """How much each benchmark does: the full run, or the quick smoke run."""

    duration: float = 3.0  # seconds per raw Batch client run
    pipeline_count: int = 200_000
    file_lines: int = 1_000_000
    kafka_count: int = 200_000
    compare_count: int = 200_000
    compare_repeats: int = 3
    nats_count: int = 100_000
    postgres_rows: int = 100_000
    partitions: tuple[int, ...] = (1, 6)
    latency_rates: tuple[float, ...] = (1000, 10000)
    latency_seconds: float = 10.0
    sizes: tuple[int, ...] = size_bench.SIZES
    size_budget: int = size_bench.BUDGET
    size_min_lines: int = 2000
    fanout_subscribers: int = 1000
    fanout_rate: float = 1000
    fanout_seconds: float = 5.0
    redis_count: int = 100_000
    memory_count: int = 1_000_000


FULL = Params()
QUICK = Params(duration=0.5, pipeline_count=20_000, file_lines=50_000, kafka_count=20_000,
               compare_count=20_000, compare_repeats=1, latency_seconds=1.0, sizes=(100, 65536), size_budget=4 * 2**20,
               size_min_lines=200, fanout_subscribers=100, fanout_rate=200, fanout_seconds=1.0,
               redis_count=10_000, nats_count=20_000, postgres_rows=20_000, memory_count=50_000)


@dataclass(frozen=True)
class Section:
    title: str
    needs_kafka: bool
    run: Callable[[Params, Any], dict[str, Any]]
    command: Callable[[Params], str]


def _rates(p: Params) -> str:
    return " ".join(f"--rate {r:g}" for r in p.latency_rates)


SECTIONS: dict[str, Section] = {
    "server": Section(
        "The embedded server alone", False,
        lambda p, _: server_bench.run(p.duration),
        lambda p: f"{PY} bench/server_bench.py --duration {p.duration:g}"),
    "fanout": Section(
        "WebSocket fan-out: the embedded server beside real Centrifugo", False,
        lambda p, _: fanout_bench.run(p.fanout_subscribers, p.fanout_rate, p.fanout_seconds),
        lambda p: f"{PY} bench/fanout_bench.py --subscribers {p.fanout_subscribers} --rate {p.fanout_rate:g} "
        f"--duration {p.fanout_seconds:g}"),
    "pipeline": Section(
        "Ticker at full speed → relay serve", False,
        lambda p, _: pipeline_bench.run(p.pipeline_count, p.duration),
        lambda p: f"{PY} bench/pipeline_bench.py --count {p.pipeline_count} --duration {p.duration:g}"),
    "file": Section(
        "File → relay serve", False,
        lambda p, _: file_bench.run(p.file_lines, "json", p.duration),
        lambda p: f"{PY} bench/file_bench.py --lines {p.file_lines} --duration {p.duration:g}"),
    "sizes": Section(
        "Throughput against message size", False,
        lambda p, _: size_bench.run(p.sizes, p.size_budget, p.duration, p.size_min_lines),
        lambda p: f"{PY} bench/size_bench.py " + " ".join(f"--size {s}" for s in p.sizes)
        + f" --duration {p.duration:g}"),
    "latency-file": Section(
        "Latency, file source", False,
        lambda p, _: latency_bench.run(p.latency_rates, p.latency_seconds, ("file",)),
        lambda p: f"{PY} bench/latency_bench.py --source file {_rates(p)} --seconds {p.latency_seconds:g}"),
    "kafka": Section(
        "Kafka → relay serve", True,
        lambda p, broker: kafka_bench.run(p.kafka_count, broker),
        lambda p: f"{PY} bench/kafka_bench.py --count {p.kafka_count}"),
    "latency-kafka": Section(
        "Latency, Kafka source", True,
        lambda p, broker: latency_bench.run(p.latency_rates, p.latency_seconds, ("kafka",), broker),
        lambda p: f"{PY} bench/latency_bench.py --source kafka {_rates(p)} --seconds {p.latency_seconds:g}"),
    "centrifugo": Section(
        "Kafka → real Centrifugo: relay vs Centrifugo's own consumer", True,
        lambda p, broker: centrifugo_bench.run(p.compare_count, p.partitions, broker, p.compare_repeats),
        lambda p: f"{PY} bench/centrifugo_bench.py --count {p.compare_count} --repeats {p.compare_repeats} "
        + " ".join(f"--partitions {n}" for n in p.partitions)),
    "kafka-memory": Section(
        "Kafka → real Centrifugo, a large backlog: the relay's peak RSS", True,
        lambda p, _: kafka_memory_bench.run(p.memory_count),
        lambda p: f"{PY} bench/kafka_memory_bench.py --count {p.memory_count}"),
    "redis": Section(
        "Redis Streams → real Centrifugo: relay vs Centrifugo's own redis_stream consumer", False,
        lambda p, _: redis_bench.run(p.redis_count, p.compare_repeats),
        lambda p: f"{PY} bench/redis_bench.py --count {p.redis_count} --repeats {p.compare_repeats}"),
    "nats": Section(
        "NATS JetStream → real Centrifugo: relay vs Centrifugo's own consumer", False,
        lambda p, _: nats_bench.run(p.nats_count, p.compare_repeats),
        lambda p: f"{PY} bench/nats_bench.py --count {p.nats_count} --repeats {p.compare_repeats}"),
    "postgres": Section(
        "PostgreSQL outbox → real Centrifugo: relay vs Centrifugo's own postgresql consumer", False,
        lambda p, _: postgres_bench.run(p.postgres_rows, postgres_bench.PARTITIONS, p.compare_repeats),
        lambda p: f"{PY} bench/postgres_bench.py --count {p.postgres_rows} --repeats {p.compare_repeats}"),
}


# -- the machine --------------------------------------------------------------------------------


def _first_line(command: list[str]) -> str:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=30, cwd=ROOT)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    return ((done.stdout or done.stderr).strip().splitlines() or ["?"])[0]


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def load_average() -> str:
    with open("/proc/loadavg") as load:
        return " ".join(load.read().split()[:3])


def machine() -> dict[str, Any]:
    cpu = platform.processor() or "?"
    with open("/proc/cpuinfo") as info:
        for line in info:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as info:
        ram_kib = int(info.readline().split()[1])
    changed = _first_line(["sh", "-c", "git status --porcelain -- relay | wc -l"])
    return {
        "cpu": cpu, "cores": os.cpu_count(), "ram_gib": round(ram_kib / 2**20, 1),
        "kernel": platform.release(), "python": rig.interpreter(),
        "packages": {name: _version(name) for name in
                     ("grpcio", "protobuf", "aiokafka", "uvloop", "pydantic", "matplotlib")},
        "kafka": f"Apache Kafka {rig.kafka_version()} (one KRaft node)",
        "java": _first_line(["java", "-version"]),
        "commit": _first_line(["git", "rev-parse", "--short", "HEAD"]),
        "relay_files_changed": int(changed) if changed.isdigit() else changed,
        "load_average_start": load_average(),
    }


# -- the run ------------------------------------------------------------------------------------


def run_sections(names: list[str], params: Params) -> dict[str, Any]:
    """Run each section in turn (one Kafka broker for those that need it); failures are recorded."""
    results: dict[str, Any] = {}
    broker = None
    try:
        for name in names:
            section = SECTIONS[name]
            print(f"== {name}: {section.title}", file=sys.stderr, flush=True)
            began = time.perf_counter()
            try:
                if section.needs_kafka and broker is None:
                    broker = rig.kafka_broker()
                figures = section.run(params, broker)
                results[name] = {"figures": figures}
            except Exception as err:
                traceback.print_exc()
                results[name] = {"error": f"{type(err).__name__}: {err}"[-3000:]}
            results[name]["seconds"] = round(time.perf_counter() - began, 1)
            results[name]["command"] = section.command(params)
            print(f"   {results[name]['seconds']} s", file=sys.stderr, flush=True)
    finally:
        if broker is not None:
            broker.stop()
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small counts, short runs (a smoke run)")
    parser.add_argument("--only", default="", help=f"comma-separated sections of: {', '.join(SECTIONS)}")
    parser.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md",
                        help="the report; results.json and plots/ go beside it, or in bench/ for the default")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()] or list(SECTIONS)
    unknown = [n for n in names if n not in SECTIONS]
    if unknown:
        parser.error(f"unknown section(s): {', '.join(unknown)}; known: {', '.join(SECTIONS)}")
    params = QUICK if args.quick else FULL
    out = args.out.resolve()
    data_dir = ROOT / "bench" if out == (ROOT / "BENCHMARKS.md").resolve() else out.parent

    started = time.time()
    info = machine()
    info["command"] = f"{PY} bench/run.py" + (" --quick" if args.quick else "") + (
        f" --only {','.join(names)}" if args.only else "")
    results = run_sections(names, params)
    info["load_average_end"] = load_average()
    info["centrifugo"] = rig.centrifugo_version()  # after the run: a section may have built it
    info["minutes"] = round((time.time() - started) / 60, 1)
    info["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(started))
    info["quick"] = args.quick

    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / "results.json").write_text(json.dumps({"machine": info, "results": results}, indent=1) + "\n")
    plots = report.plots(results, data_dir / "plots")
    out.parent.mkdir(parents=True, exist_ok=True)
    links = {name: os.path.relpath(path, out.parent) for name, path in plots.items()}
    out.write_text(report.markdown(info, results, links))
    print(f"wrote {out} ({info['minutes']} min)", file=sys.stderr)
    return 1 if any("error" in r for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
