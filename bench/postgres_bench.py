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
empty. PostgreSQL 15 runs from /usr/lib/postgresql/15/bin as in the tests (tests/harness/postgres.py).

    .venv/bin/python bench/postgres_bench.py [--count 100000] [--partitions 1 --partitions 3] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
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
    return {**consumer_rate(consumer, count, workdir), "rows_left": remaining(pg, db)}


def relay_rate(pg: PostgresServer, db: str, count: int, partitions: int, workdir: Path) -> dict[str, Any]:
    """The relay drains the table into a Centrifugo with no consumer of its own; it deletes the last
    rows when it stops (its final commit), so the table is checked after that."""
    body = "\n".join(["[sources.outbox]", 'type = "postgres"', f'dsn_env = "{DSN_ENV}"', 'table = "outbox"',
                      'format = "centrifugo"', f"partitions = {partitions}"])
    return {**source_rate(body, count, workdir, env={DSN_ENV: pg.dsn(db)}), "rows_left": remaining(pg, db)}


def run(count: int = 100_000, partitions: tuple[int, ...] = PARTITIONS, repeats: int = 3) -> dict[str, dict[str, Any]]:
    """For each partition count: drain a fresh copy of the backlog both ways `repeats` times, taking
    turns; the median run of each side counts."""
    pg = PostgresServer().start()
    results: dict[str, dict[str, Any]] = {}
    try:
        for parts in partitions:
            natives, relays = [], []
            fill_seconds = 0.0
            with tempfile.TemporaryDirectory(prefix="relay-pg-bench-") as tmp:
                for n in range(repeats):
                    db, took = fill(pg, count, parts)
                    fill_seconds = took
                    natives.append(centrifugo_rate(pg, db, count, parts, Path(tmp) / f"native-{n}"))
                    db, _ = fill(pg, count, parts)
                    relays.append(relay_rate(pg, db, count, parts, Path(tmp) / f"relay-{n}"))
            native, relay = median_run(natives), median_run(relays)
            results[f"{parts} partition{'s' if parts > 1 else ''}"] = {
                "partitions": parts, "rows": count, "insert_seconds": round(fill_seconds, 2),
                "repeats": repeats, "centrifugo": native, "relay": relay, **ratios(native, relay)}
    finally:
        pg.close()
    return results


def table(results: dict[str, dict[str, Any]]) -> str:
    lines = [f"{'backlog':<14} {'relay rows/s':>12} {'Centrifugo/s':>13} {'relay / C':>10} {'middle':>7} "
             f"{'relay CPU us/row':>17} {'CPU s relay+C':>14} {'CPU s C':>8}"]
    for name, r in results.items():
        middle = r["relay_over_centrifugo_middle"]
        lines.append(f"{name:<14} {r['relay']['per_second']:>12,} {r['centrifugo']['per_second']:>13,} "
                     f"{r['relay_over_centrifugo'] or 0:>10.2f} {middle or 0:>7.2f} "
                     f"{r['relay']['cpu_us_per_record']:>17} {r['relay']['cpu_seconds']:>14} "
                     f"{r['centrifugo']['cpu_seconds']:>8}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=100_000)
    parser.add_argument("--partitions", type=int, action="append", help="default: 1 and 3")
    parser.add_argument("--repeats", type=int, default=3, help="drains per side (the median counts)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args()
    results = run(args.count, tuple(args.partitions or PARTITIONS), args.repeats)
    print(json.dumps(results, indent=2) if args.json else table(results))


if __name__ == "__main__":
    main()
