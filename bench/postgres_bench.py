"""PostgreSQL outbox → real Centrifugo v6: the relay beside Centrifugo's own `postgresql` consumer.

For each partition count P (1 and 3), an outbox table in Centrifugo's layout gets `--count` rows,
`publish` to `chat:cmp-<c>` with data `{"seq": i, "pad": ...}`, for 12 channels: row i goes to channel
c = i % 12, in partition c % P, so each channel's rows are in one partition, in id order. Then each
side drains its own copy of the backlog (a fresh database) into a fresh Centrifugo, with its defaults:

- centrifugo: `consumers: [{type: "postgresql", postgresql: {dsn, outbox_table_name, num_partitions}}]`
  (partition_select_limit 100, poll interval 300ms: one transaction per batch, rows deleted in it);
- relay: `relay run`, postgres source with `format = "centrifugo"` (batch_size 500), publishing to that
  Centrifugo's GRPC API (Batch of up to 500, 4 lanes in flight, an idempotency key on each).

Rates are measured on Centrifugo the same way as bench/centrifugo_bench.py (stream tops of the 12
channels, first publication seen to last), the median of `--repeats` drains per side, taking turns;
after each drain every channel's last publication and the total are checked, and the table must be
empty. PostgreSQL 15 runs from /usr/lib/postgresql/15/bin as in the tests (tests/harness/postgres.py);
what each drain cost it in CPU is counted too (its queries share the machine with both sides).

`--baseline DIR` drains a third copy in each turn with the relay code of DIR (a checkout of another
commit: `git worktree add /tmp/base main`), so a change is measured before and after in one run. Both
relays of a turn get the same PYTHONHASHSEED (random per turn); it matters only to a baseline from
before lanes were picked by CRC-32 (they were picked by Python's string hash, which the seed sets).

    .venv/bin/python bench/postgres_bench.py [--count 100000] [--partitions 1 --partitions 3] [--repeats 3]
        [--baseline DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.centrifugo_bench import CHANNELS, consumer_rate, median_run, ratios, source_rate  # noqa: E402
from tests.harness.postgres import OUTBOX_DDL, PostgresServer  # noqa: E402

PARTITIONS = (1, 3)
DSN_ENV = "RELAY_BENCH_PG_DSN"


def fill(pg: PostgresServer, count: int, partitions: int) -> tuple[str, float]:
    """A fresh database holding the backlog; its name and how long inserting took."""
    db = pg.create_database()
    pg.psql(OUTBOX_DDL.format(table="outbox"), db)
    began = time.perf_counter()
    n = len(CHANNELS)
    pg.psql("INSERT INTO outbox (method, payload, partition) SELECT 'publish', jsonb_build_object("
            f"'channel', 'chat:cmp-' || (g % {n}), 'data', jsonb_build_object('seq', g, 'pad', repeat('x', 40))), "
            f"(g % {n}) % {partitions} FROM generate_series(0, {count - 1}) g ORDER BY g", db)
    pg.psql("VACUUM ANALYZE outbox", db)
    return db, time.perf_counter() - began


def remaining(pg: PostgresServer, db: str) -> int:
    return int(pg.psql("SELECT count(*) FROM outbox", db))


def centrifugo_rate(pg: PostgresServer, db: str, count: int, partitions: int, workdir: Path) -> dict[str, Any]:
    """Centrifugo's own consumer drains the table; counted from its start."""
    consumer = {"name": "bench", "enabled": True, "type": "postgresql",
                "postgresql": {"dsn": pg.dsn(db), "outbox_table_name": "outbox", "num_partitions": partitions}}
    before = pg.cpu_seconds()
    rate = consumer_rate(consumer, count, workdir)
    return {**rate, "cpu_seconds_postgres": round(pg.cpu_seconds() - before, 2), "rows_left": remaining(pg, db)}


def relay_rate(pg: PostgresServer, db: str, count: int, partitions: int, workdir: Path,
               code: str = "", seed: str = "random") -> dict[str, Any]:
    """The relay drains the table into a Centrifugo with no consumer of its own; it deletes the last
    rows when it stops (its final commit), so the table is checked after that. `code`: a directory
    whose relay package runs instead of this one (--baseline); `seed`, its PYTHONHASHSEED."""
    body = "\n".join(["[sources.outbox]", 'type = "postgres"', f'dsn_env = "{DSN_ENV}"', 'table = "outbox"',
                      'format = "centrifugo"', f"partitions = {partitions}"])
    env = {DSN_ENV: pg.dsn(db), "PYTHONHASHSEED": seed, **({"PYTHONPATH": os.path.abspath(code)} if code else {})}
    before = pg.cpu_seconds()
    rate = source_rate(body, count, workdir, env=env)
    return {**rate, "cpu_seconds_postgres": round(pg.cpu_seconds() - before, 2), "rows_left": remaining(pg, db)}


def run(count: int = 100_000, partitions: tuple[int, ...] = PARTITIONS, repeats: int = 3,
        baseline: str = "") -> dict[str, dict[str, Any]]:
    """For each partition count: drain a fresh copy of the backlog both ways `repeats` times, taking
    turns (and with the relay code of `baseline` too, when given); the median run of each side counts."""
    pg = PostgresServer().start()
    results: dict[str, dict[str, Any]] = {}
    try:
        for parts in partitions:
            natives, relays, baselines = [], [], []
            fill_seconds = 0.0
            with tempfile.TemporaryDirectory(prefix="relay-pg-bench-") as tmp:
                for n in range(repeats):
                    db, took = fill(pg, count, parts)
                    fill_seconds = took
                    natives.append(centrifugo_rate(pg, db, count, parts, Path(tmp) / f"native-{n}"))
                    seed = str(random.randrange(2**32)) if baseline else "random"
                    db, _ = fill(pg, count, parts)
                    relays.append(relay_rate(pg, db, count, parts, Path(tmp) / f"relay-{n}", seed=seed))
                    if baseline:
                        db, _ = fill(pg, count, parts)
                        baselines.append(relay_rate(pg, db, count, parts, Path(tmp) / f"base-{n}", baseline, seed))
            native, relay = median_run(natives), median_run(relays)
            result = {"partitions": parts, "rows": count, "insert_seconds": round(fill_seconds, 2),
                      "repeats": repeats, "centrifugo": native, "relay": relay, **ratios(native, relay)}
            if baseline:
                base = median_run(baselines)
                result["baseline"] = {"code": baseline, "relay": base,
                                      **{f"baseline_{k}": v for k, v in ratios(native, base).items()}}
            results[f"{parts} partition{'s' if parts > 1 else ''}"] = result
    finally:
        pg.close()
    return results


def table(results: dict[str, dict[str, Any]]) -> str:
    lines = [f"{'backlog':<22} {'relay rows/s':>12} {'Centrifugo/s':>13} {'relay / C':>10} {'middle':>7} "
             f"{'relay CPU us/row':>17} {'CPU s relay+C':>14} {'CPU s C':>8} {'PG CPU s relay/C':>17}"]
    for name, r in results.items():
        sides = [(name, r["relay"], r["relay_over_centrifugo"], r["relay_over_centrifugo_middle"])]
        if "baseline" in r:
            b = r["baseline"]
            sides.append((f"{name} (baseline)", b["relay"], b["baseline_relay_over_centrifugo"],
                          b["baseline_relay_over_centrifugo_middle"]))
        for label, relay, ratio, middle in sides:
            lines.append(f"{label:<22} {relay['per_second']:>12,} {r['centrifugo']['per_second']:>13,} "
                         f"{ratio or 0:>10.2f} {middle or 0:>7.2f} {relay['cpu_us_per_record']:>17} "
                         f"{relay['cpu_seconds']:>14} {r['centrifugo']['cpu_seconds']:>8} "
                         f"{relay['cpu_seconds_postgres']:>8}/{r['centrifugo']['cpu_seconds_postgres']}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=100_000)
    parser.add_argument("--partitions", type=int, action="append", help="default: 1 and 3")
    parser.add_argument("--repeats", type=int, default=3, help="drains per side (the median counts)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument("--baseline", default="", metavar="DIR",
                        help="also drain with the relay code in DIR (a checkout of another commit), in turn")
    args = parser.parse_args()
    results = run(args.count, tuple(args.partitions or PARTITIONS), args.repeats, args.baseline)
    print(json.dumps(results, indent=2) if args.json else table(results))


if __name__ == "__main__":
    main()
