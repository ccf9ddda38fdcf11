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

from bench import rig  # noqa: E402
from bench.centrifugo_bench import CHANNELS, check_delivery, cpu_seconds, median_run  # noqa: E402
from tests.harness.postgres import OUTBOX_DDL, PostgresServer  # noqa: E402
from tests.harness.relay_process import RelayProcess  # noqa: E402

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
    server = rig.centrifugo(workdir, {"consumers": [consumer], "log": {"level": "warn"}}, start=False)
    try:
        with rig.StreamCounter(server.grpc_address, CHANNELS, api_key=server.api_key, base=0) as counter:
            started = time.perf_counter()
            rate = rig.in_thread(lambda: counter.wait_for(
                count, alive=lambda: server.process is None or server.running(), timeout=900))
            server.start()
            cpu_before = cpu_seconds(server.process.pid)
            result: rig.Rate = rate()
            cpu = cpu_seconds(server.process.pid) - cpu_before
            checked = check_delivery(server, count, counter)
    except BaseException:
        print(server.log_tail(), file=sys.stderr)
        raise
    finally:
        server.stop()
    return {**result.as_dict(), "wall_seconds_with_startup": round(result.last_at - started, 3),
            "cpu_seconds": round(cpu, 2), **checked, "rows_left": remaining(pg, db)}


def start_relay(workdir: Path, address: str, body: str, api_key: str, dsn: str) -> RelayProcess:
    """`relay run` as rig.start_relay starts it, with the DSN in its environment."""
    config = "\n".join(["[relay]", f'state_dir = "{workdir}/state"', 'log_level = "warning"',
                        "[sink]", f'address = "{address}"', f'api_key_env = "{rig.KEY_ENV}"', body])
    return RelayProcess(workdir, config, env={rig.KEY_ENV: api_key, DSN_ENV: dsn}, metrics=False).start()


def relay_rate(pg: PostgresServer, db: str, count: int, partitions: int, workdir: Path) -> dict[str, Any]:
    """The relay drains the table into a Centrifugo with no consumer of its own."""
    server = rig.centrifugo(workdir / "centrifugo", {"log": {"level": "warn"}})
    body = "\n".join(["[sources.outbox]", 'type = "postgres"', f'dsn_env = "{DSN_ENV}"', 'table = "outbox"',
                      'format = "centrifugo"', f"partitions = {partitions}"])
    try:
        with rig.StreamCounter(server.grpc_address, CHANNELS, api_key=server.api_key) as counter:
            started = time.perf_counter()
            cpu_server = cpu_seconds(server.process.pid)
            relay = start_relay(workdir / "relay", server.grpc_address, body, server.api_key, pg.dsn(db))
            try:
                result = counter.wait_for(count, alive=relay.alive, timeout=900)
                cpu_relay = cpu_seconds(relay.process.pid)  # type: ignore[union-attr]
                peak = rig.peak_rss_mib(relay.process.pid)  # type: ignore[union-attr]
                deadline = time.monotonic() + 30
                while remaining(pg, db) and time.monotonic() < deadline:
                    time.sleep(0.1)  # the last deletes follow the last acks
            except BaseException:
                print(relay.logs()[-3000:], file=sys.stderr)
                raise
            finally:
                relay.stop()
            cpu_server = cpu_seconds(server.process.pid) - cpu_server
            checked = check_delivery(server, count, counter)
    finally:
        server.stop()
    return {**result.as_dict(), "wall_seconds_with_startup": round(result.last_at - started, 3),
            "cpu_seconds": round(cpu_relay + cpu_server, 2), "cpu_seconds_relay": round(cpu_relay, 2),
            "cpu_seconds_centrifugo": round(cpu_server, 2), "relay_peak_rss_mib": round(peak, 1), **checked,
            "rows_left": remaining(pg, db)}


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
                "repeats": repeats, "centrifugo": native, "relay": relay,
                "relay_over_centrifugo": round(relay["per_second"] / native["per_second"], 3)
                if native["per_second"] else None}
    finally:
        pg.close()
    return results


def table(results: dict[str, dict[str, Any]]) -> str:
    lines = [f"{'backlog':<14} {'relay rows/s':>12} {'Centrifugo/s':>13} {'relay / Centrifugo':>19} "
             f"{'CPU s relay+C':>14} {'CPU s C':>8}"]
    for name, r in results.items():
        lines.append(f"{name:<14} {r['relay']['per_second']:>12,} {r['centrifugo']['per_second']:>13,} "
                     f"{r['relay_over_centrifugo'] or 0:>19.2f} {r['relay']['cpu_seconds']:>14} "
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
