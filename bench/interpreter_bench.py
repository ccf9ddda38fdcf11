"""The same relay code on different Python interpreters: relay CPU per Kafka record, side by side.

How CPython was built moves the relay's CPU per record as much as a week of tuning: a shared
libpython without profile-guided optimisation (what pyenv builds by default) runs the same code
slower than a distribution's interpreter (Debian's python3.11: PGO, the executable linked
statically). Each interpreter drains the same backlog (`format = "centrifugo"`, one partition, as
in bench/centrifugo_bench.py) into a real Centrifugo v6.9.1, the interpreters taking turns, each
drain with a consumer group of its own; the medians count.

Each `--python` is the interpreter of a venv with the relay installed, e.g.

    /usr/bin/python3.11 -m venv /tmp/relay-debian && /tmp/relay-debian/bin/pip install -e .
    ~/.pyenv/versions/3.11.7/bin/python -m venv /tmp/relay-pyenv && /tmp/relay-pyenv/bin/pip install -e .
    .venv/bin/python bench/interpreter_bench.py --python /tmp/relay-debian/bin/python \\
        --python /tmp/relay-pyenv/bin/python [--count 200000] [--turns 4]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import centrifugo_bench, rig  # noqa: E402
from tests.harness.kafka import run_sync  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--python", action="append", required=True, help="a venv's interpreter (repeatable)")
    parser.add_argument("--count", type=int, default=200_000)
    parser.add_argument("--turns", type=int, default=4)
    args = parser.parse_args()
    cpu: dict[str, list[float]] = {p: [] for p in args.python}
    rate: dict[str, list[int]] = {p: [] for p in args.python}
    broker = rig.kafka_broker()
    try:
        topic = f"interp-{time.monotonic_ns()}"
        run_sync(broker.create_topic(topic, 1))
        run_sync(broker.produce(topic, centrifugo_bench.records(args.count, 1)))
        drain = 0
        with tempfile.TemporaryDirectory(prefix="relay-interp-bench-") as tmp:
            for turn in range(args.turns):
                for python in args.python if turn % 2 == 0 else args.python[::-1]:
                    drain += 1
                    run = centrifugo_bench.relay_rate(broker, topic, args.count, Path(tmp) / str(drain), drain,
                                                      python=python)
                    cpu[python].append(run["cpu_us_per_record"])
                    rate[python].append(run["per_second"])
    finally:
        broker.stop()
    for python in args.python:
        print(rig.interpreter(python))
        print(f"  relay CPU µs per record: median {statistics.median(cpu[python]):.2f} of "
              + ", ".join(f"{v:.2f}" for v in cpu[python])
              + f"; records/s median {statistics.median(rate[python]):,.0f}")


if __name__ == "__main__":
    main()
