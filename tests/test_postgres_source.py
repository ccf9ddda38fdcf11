"""PostgreSQL outbox → `relay run` → `relay serve`, with a real PostgreSQL 15, real processes and real
SIGKILLs. What arrived is read back from the server's History; what is left is read from the table.

Rows are in Centrifugo's outbox layout: `publish` to `chat:room-K` with data `{"k": K, "s": n}`, n
counting up per room, and partition K % 3, so a channel's History must be exactly 0, 1, 2, ...
"""

from __future__ import annotations

import asyncio
import json
import random
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from relay.centrifugo_records import full_record
from relay.message import Message
from relay.sources.postgres import PUBLISH_OPTIONS, RUN_MIN, Config, PostgresReader, _record, _runs
from tests.harness.e2e import ROOMS, SERVER_KEY_ENV, delivered, kill_at_random_moments, sequences
from tests.harness.embedded import EmbeddedServerProcess
from tests.harness.history import history
from tests.harness.postgres import OUTBOX_DDL, PostgresServer
from tests.harness.relay_process import RelayProcess

PARTITIONS = 3
DSN_ENV = "RELAY_TEST_PG_DSN"


# -- rows ------------------------------------------------------------------------------------------

def create_outbox(pg: PostgresServer, db: str, table: str = "outbox") -> None:
    pg.psql(OUTBOX_DDL.format(table=table), db)


def insert_rows(pg: PostgresServer, db: str, first: int, last: int, table: str = "outbox") -> None:
    """Rows first..last-1 of the keyed stream: row g is room g % 50, sequence g // 50."""
    pg.psql(f"INSERT INTO {table} (method, payload, partition) SELECT 'publish', "
            f"jsonb_build_object('channel', 'chat:room-' || (g % {ROOMS}), "
            f"'data', jsonb_build_object('k', g % {ROOMS}, 's', g / {ROOMS})), (g % {ROOMS}) % {PARTITIONS} "
            f"FROM generate_series({first}, {last - 1}) g ORDER BY g", db)


def remaining(pg: PostgresServer, db: str, table: str = "outbox") -> int:
    return int(pg.psql(f"SELECT count(*) FROM {table}", db))


class Inserter(threading.Thread):
    """Inserts the stream in chunks while the test kills relays: a live outbox, not a backlog."""

    def __init__(self, pg: PostgresServer, db: str, total: int, chunk: int, pause: float) -> None:
        super().__init__(name="inserter", daemon=True)
        self.pg, self.db, self.total, self.chunk, self.pause = pg, db, total, chunk, pause
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            for first in range(0, self.total, self.chunk):
                insert_rows(self.pg, self.db, first, min(first + self.chunk, self.total))
                time.sleep(self.pause)
        except BaseException as err:
            self.error = err


# -- relays and what arrived -----------------------------------------------------------------------

def relay_config(workdir: Path, server: EmbeddedServerProcess, *, source: dict[str, Any] | None = None,
                 routes: str = "") -> str:
    options = {"table": "outbox", "partitions": PARTITIONS, "poll_interval": "100ms", **(source or {})}
    lines = [
        "[relay]", f'state_dir = "{workdir}/state"', 'shutdown_timeout = "5s"',
        "[sink]", f'address = "{server.address}"', f'api_key_env = "{SERVER_KEY_ENV}"',
        f'dead_letter = "{workdir}/dead-letter.jsonl"',
        'retry = { initial_backoff = "20ms", max_backoff = "500ms" }',
        "[sources.outbox]", 'type = "postgres"', f'dsn_env = "{DSN_ENV}"',
        *(f"{k} = {json.dumps(v)}" for k, v in options.items()),
    ]
    return "\n".join(lines) + "\n" + routes


def relay(workdir: Path, config: str, server: EmbeddedServerProcess, dsn: str) -> RelayProcess:
    return RelayProcess(workdir, config, env={SERVER_KEY_ENV: server.api_key, DSN_ENV: dsn}, metrics=False)


def expected(total: int) -> dict[int, list[int]]:
    return {k: [g // ROOMS for g in range(k, total, ROOMS)] for k in range(ROOMS)}


def wait_delivered(server: EmbeddedServerProcess, total: int, relays: list[RelayProcess],
                   timeout: float = 90.0) -> dict[int, list[int]]:
    """Poll History until every room holds its last sequence number."""
    want = expected(total)
    deadline = time.monotonic() + timeout
    seen: dict[int, list[int]] = {}
    while time.monotonic() < deadline:
        seen = sequences(server)
        if all(seen[k] and seen[k][-1] >= want[k][-1] for k in range(ROOMS)):
            return seen
        time.sleep(0.25)
    logs = "".join(r.logs()[-2000:] for r in relays)
    raise AssertionError(f"{sum(len(v) for v in seen.values())} of {total} publications after {timeout}s\n{logs}")


def wait_until(condition: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def dead_letters(workdir: Path) -> list[dict[str, Any]]:
    path = workdir / "dead-letter.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


# -- the reader against the real server ---------------------------------------------------------------

def test_reader_deletes_only_what_the_engine_says_is_settled(postgres_server: PostgresServer, postgres_db: str,
                                                             tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ids with gaps: the reader reads each partition in id order, and a commit up to id n deletes
    exactly the rows it read up to n, nothing after."""
    pg, db = postgres_server, postgres_db
    create_outbox(pg, db)
    insert_rows(pg, db, 0, 30)
    pg.psql("DELETE FROM outbox WHERE id % 4 = 0", db)  # gaps in the ids, as rolled-back inserts leave
    monkeypatch.setenv(DSN_ENV, pg.dsn(db))
    config = Config(type="postgres", dsn_env=DSN_ENV, table="outbox", partitions=PARTITIONS,
                    poll_interval="50ms")
    reader = PostgresReader("outbox", config, tmp_path)

    async def scenario() -> dict[str, list[Message]]:
        await reader.connect()
        got: dict[str, list[Message]] = {}
        for _ in range(3):
            for batch in await reader.read() or []:
                got.setdefault(batch.stream, []).extend(batch.messages)
                assert batch.end == batch.messages[-1].offset
        part0 = got["outbox/0"]
        await reader.commit({"outbox/0": reader.position_after(part0[2])})
        left = [int(x) for x in pg.psql("SELECT id FROM outbox WHERE partition = 0 ORDER BY id", db).split()]
        assert left == [m.offset for m in part0[3:]]
        assert await reader.read() == []  # nothing new; nothing read twice while rows are in flight
        await reader.commit({"outbox/0": part0[-1].offset})
        await reader.close()
        return got

    got = asyncio.run(scenario())
    assert sorted(got) == ["outbox/0", "outbox/1", "outbox/2"]
    for stream, messages in got.items():
        assert [m.offset for m in messages] == sorted(m.offset for m in messages), stream
    assert sum(len(v) for v in got.values()) == 23  # 30 rows less the 7 with id % 4 == 0, each read once
    assert pg.psql("SELECT count(*) FROM outbox WHERE partition = 0", db) == "0"
    assert remaining(pg, db) == 23 - 7  # partitions 1 and 2 untouched
    record = got["outbox/0"][0].record
    assert record is not None and full_record(record).channels == ("chat:room-0",)


# Rows in every shape a producer may write: (method, payload JSON text, a plain publish).
ROW_FORMS = [
    ("publish", '{"channel": "chat:a", "data": {"x": 1, "s": "\u00fcn \\"q\\""}}', True),
    ("publish", '{"channel": "chat:a", "data": null}', True),  # null data is data
    ("publish", '{"channel": "chat:a", "data": [1, 2], "note": "ignored"}', True),  # a key Centrifugo ignores
    *[("publish", f'{{"channel": "chat:a", "data": {{"n": 1}}, "{key}": {value}}}', False)
      for key, value in [("b64data", '"eyJuIjogNX0="'), ("idempotency_key", '"k1"'), ("tags", '{"t": "1"}'),
                         ("skip_history", "true"), ("delta", "true"), ("version", "3"),
                         ("version_epoch", '"e"')]],
    ("publish", '{"channel": 5, "data": 1}', False),  # a channel that is not a string
    ("publish", '{"channel": "", "data": 1}', False),
    ("publish", '{"channel": "chat:a"}', False),  # no data
    ("publish", '"{\\"channel\\": \\"chat:a\\", \\"data\\": 1}"', False),  # a JSON string (Debezium)
    ("publish", '["channel", "data"]', False),
    ("broadcast", '{"channels": ["chat:a", "chat:b"], "data": {"n": 2}}', False),
    ("subscribe", '{"user": "u", "channel": "chat:a"}', False),
    ("Publish", '{"channel": "chat:a", "data": 1}', False),
]


def test_rows_read_as_from_the_whole_payload_and_a_plain_publish_carries_its_data(
        postgres_server: PostgresServer, postgres_db: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """PostgreSQL takes a plain publish apart (channel and data; its payload is not fetched): every row
    shape gives the record, or the reason it is none, that reading its whole payload gives; a plain
    publish's message data is its publication data, any other row's is its payload."""
    import asyncpg
    pg, db = postgres_server, postgres_db
    create_outbox(pg, db)
    for method, payload, _ in ROW_FORMS:
        pg.psql(f"INSERT INTO outbox (method, payload) VALUES ('{method}', '{payload}')", db)
    assert {key for _, payload, _ in ROW_FORMS for key in PUBLISH_OPTIONS if f'"{key}"' in payload} == \
        set(PUBLISH_OPTIONS)
    monkeypatch.setenv(DSN_ENV, pg.dsn(db))
    reader = PostgresReader("outbox", Config(type="postgres", dsn_env=DSN_ENV, table="outbox"), tmp_path)

    async def scenario() -> tuple[list[Message], list[Any]]:
        conn = await asyncpg.connect(pg.dsn(db))
        whole = await conn.fetch("SELECT id, method, convert_to(payload::text, 'UTF8') AS payload, "
                                 "convert_to((payload->'data')::text, 'UTF8') AS data FROM outbox ORDER BY id")
        await conn.close()
        await reader.connect()
        messages = [m for batch in await reader.read() or [] for m in batch.messages]
        await reader.close()
        return messages, list(whole)

    messages, whole = asyncio.run(scenario())
    assert [m.offset for m in messages] == [row["id"] for row in whole]
    for message, row, (_, _, plain) in zip(messages, whole, ROW_FORMS, strict=True):
        try:
            want, why = _record(row["method"], row["payload"], row["data"]), ""
        except ValueError as err:
            want, why = None, f"row id {row['id']}: {err}"
        record = full_record(message.record) if message.record is not None else None
        assert (record, message.error) == (want, why), row["payload"]
        assert message.data == (row["data"] if plain else row["payload"]), row["payload"]
        assert message.attributes == {}  # the record names its channels: no route reads template fields
    assert sum(m.data != row["payload"] for m, row in zip(messages, whole, strict=True)) == 3


def test_the_next_query_is_sent_before_the_rows_read_are_handed_over(
        postgres_server: PostgresServer, postgres_db: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A partition that filled its batch is queried again before read() returns its rows, so
    PostgreSQL reads on while they are built and delivered; the next read() takes those rows (no
    query of its own first). A paused partition, or one that came back short, is not read ahead."""
    import asyncpg
    pg, db = postgres_server, postgres_db
    create_outbox(pg, db)
    pg.psql("INSERT INTO outbox (method, payload) SELECT 'publish', jsonb_build_object('channel', 'chat:a', "
            "'data', jsonb_build_object('s', g)) FROM generate_series(1, 1700) g", db)
    monkeypatch.setenv(DSN_ENV, pg.dsn(db))
    reader = PostgresReader("outbox", Config(type="postgres", dsn_env=DSN_ENV, table="outbox",
                                             poll_interval="30s"), tmp_path)
    log: list[str] = []
    fetch = asyncpg.connection.Connection.fetch

    async def logged_fetch(conn: Any, query: str, *args: Any, **kwargs: Any) -> Any:
        if "relay_partition" not in query:
            return await fetch(conn, query, *args, **kwargs)
        log.append("sent")
        rows = await fetch(conn, query, *args, **kwargs)
        log.append(f"{len(rows)} rows")
        return rows

    monkeypatch.setattr(asyncpg.connection.Connection, "fetch", logged_fetch)

    async def read() -> tuple[list[int], list[str]]:
        ids = [m.offset for batch in await reader.read() or [] for m in batch.messages]
        ahead = reader._ahead
        if ahead is not None:
            await asyncio.wait([ahead[1]])  # what was sent ahead has arrived
        return ids, list(log)

    async def scenario() -> list[tuple[list[int], list[str]]]:
        await reader.connect()
        steps = [await read(), await read()]
        reader.pause("outbox/0")
        steps.append(await read())  # rows read ahead still come; nothing more is asked for
        reader.resume("outbox/0")
        steps += [await read(), await read()]
        await reader.close()
        return steps

    steps = asyncio.run(scenario())
    assert [ids for ids, _ in steps] == [list(range(1, 501)), list(range(501, 1001)), list(range(1001, 1501)),
                                         list(range(1501, 1701)), []]
    assert [calls for _, calls in steps] == [
        ["sent", "500 rows", "sent", "500 rows"],  # the second batch asked for before the first was handed over
        ["sent", "500 rows", "sent", "500 rows", "sent", "500 rows"],
        ["sent", "500 rows", "sent", "500 rows", "sent", "500 rows"],  # paused: not read ahead
        ["sent", "500 rows", "sent", "500 rows", "sent", "500 rows", "sent", "200 rows"],  # resumed: read now
        ["sent", "500 rows", "sent", "500 rows", "sent", "500 rows", "sent", "200 rows"],  # short: not read ahead
    ]


def test_a_partition_that_becomes_due_is_read_while_another_drains_a_backlog(
        postgres_server: PostgresServer, postgres_db: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Queries sent ahead for a partition with a backlog also read the other partitions once they
    are due (poll_interval): a new row of an idle partition does not wait for the backlog to end."""
    pg, db = postgres_server, postgres_db
    create_outbox(pg, db)
    row = ("INSERT INTO outbox (method, payload, partition) SELECT 'publish', jsonb_build_object('channel', "
           "'chat:a', 'data', jsonb_build_object('s', g)), {p} FROM generate_series(1, {n}) g")
    pg.psql(row.format(p=0, n=5000), db)
    monkeypatch.setenv(DSN_ENV, pg.dsn(db))
    reader = PostgresReader("outbox", Config(type="postgres", dsn_env=DSN_ENV, table="outbox", partitions=2,
                                             poll_interval="50ms"), tmp_path)

    async def scenario() -> list[dict[str, int]]:
        await reader.connect()
        reads = []
        for n in range(8):  # the backlog of partition 0 takes 10 reads
            if n == 1:
                pg.psql(row.format(p=1, n=1), db)
                while time.monotonic() < reader._partitions[1].due:  # partition 1 is due again
                    await asyncio.sleep(0.01)
            reads.append({b.stream: len(b.messages) for b in await reader.read() or []})
        await reader.close()
        return reads

    reads = asyncio.run(scenario())
    assert all(r.get("outbox/0") == 500 for r in reads), reads  # the backlog is read on all along
    assert sum(r.get("outbox/1", 0) for r in reads[1:4]) == 1, reads  # and the new row comes with it


def test_runs_of_consecutive_ids_cover_exactly_the_ids_read() -> None:
    """Settled ids are deleted as (first, last) runs and single ids: every id of a run was read, no
    other id is in one, whatever the gaps; runs are maximal and long; every id read is deleted once."""
    rng = random.Random(16)
    for _ in range(2000):
        n = rng.randint(1, 400)
        ids = sorted(rng.sample(range(1, n * rng.choice([1, 1, 2, 50]) + 2), n))
        firsts, lasts, singles = _runs(ids)
        covered = [i for first, last in zip(firsts, lasts, strict=True) for i in range(first, last + 1)]
        assert sorted(covered + singles) == ids
        assert all(last - first + 1 >= RUN_MIN for first, last in zip(firsts, lasts, strict=True))
        assert all(nxt > last + 1 for last, nxt in zip(lasts, firsts[1:], strict=False))  # runs are maximal
    assert _runs(list(range(1, 5001))) == ([1], [5000], [])
    assert _runs(list(range(1, 5001, 2))) == ([], [], list(range(1, 5001, 2)))
    assert _runs([]) == ([], [], [])


def test_partitions_settled_to_different_points_are_deleted_mostly_as_runs() -> None:
    """Three partitions' ids interleave (id % 3) and settled to different points: the ids up to the
    lowest point are one run, only those past it (with another partition's every third id missing)
    go one by one."""
    settled = {0: 9000, 1: 10_000, 2: 11_000}
    ids = [i for i in range(1, 12_001) if i <= settled[i % 3]]
    firsts, lasts, singles = _runs(ids)
    assert (firsts, lasts) == ([1], [9002])  # 9001 and 9002 are partitions 1 and 2; 9003 is 0's, unsettled
    assert singles == ids[9002:]


def test_a_late_row_inside_runs_of_deleted_ids_is_read_not_deleted(
        postgres_server: PostgresServer, postgres_db: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Hundreds of consecutive ids are deleted as runs; a row whose id lies between two runs, whose
    transaction commits after they were read and before they are deleted, survives and is read next."""
    import asyncpg
    pg, db = postgres_server, postgres_db
    create_outbox(pg, db)
    monkeypatch.setenv(DSN_ENV, pg.dsn(db))
    config = Config(type="postgres", dsn_env=DSN_ENV, table="outbox", partitions=1, poll_interval="50ms")
    reader = PostgresReader("outbox", config, tmp_path)
    row = ("INSERT INTO outbox (method, payload) SELECT 'publish', jsonb_build_object('channel', 'chat:late', "
           "'data', jsonb_build_object('s', g)) FROM generate_series(1, $1) g")

    async def scenario() -> tuple[list[int], int, list[int]]:
        conn = await asyncpg.connect(pg.dsn(db))
        await conn.execute(row, 300)  # ids 1..300
        late = await asyncpg.connect(pg.dsn(db))
        tx = late.transaction()
        await tx.start()
        late_id = await late.fetchval(row.replace("generate_series(1, $1) g", "generate_series(1, 1) g")
                                      + " RETURNING id")
        await conn.execute(row, 300)  # ids 302..601, visible before the late one
        await reader.connect()
        first: list[int] = []
        while len(first) < 600:
            for batch in await reader.read() or []:
                first.extend(m.offset for m in batch.messages)
        await tx.commit()  # after the rows around it were read, before they are deleted
        await reader.commit({"outbox/0": first[-1]})
        left = [r["id"] for r in await conn.fetch("SELECT id FROM outbox")]  # what was read is gone ...
        again: list[int] = []
        deadline = time.monotonic() + 10
        while not again and time.monotonic() < deadline:  # the partition is due again within poll_interval
            again = [m.offset for batch in await reader.read() or [] for m in batch.messages]
        await reader.close()
        await late.close()
        await conn.close()
        return first, late_id, left + again

    first, late_id, after = asyncio.run(scenario())
    assert late_id not in first and min(first) < late_id < max(first)
    assert after == [late_id, late_id]  # ... the late row is still there, and read next


def test_a_row_whose_transaction_commits_late_is_delivered_not_deleted_unread(
        postgres_server: PostgresServer, postgres_db: str, embedded_server: EmbeddedServerProcess,
        tmp_path: Path) -> None:
    """Ids are taken at insert and become visible at commit: a lower id can appear after higher ones
    were delivered and deleted. It must still be published (Centrifugo's consumer does), not lost."""
    import asyncpg
    pg, db = postgres_server, postgres_db
    create_outbox(pg, db)
    insert_rows(pg, db, 0, 3)  # rooms 0, 1, 2: s = 0

    async def open_late_row() -> Any:
        conn = await asyncpg.connect(pg.dsn(db))
        tx = conn.transaction()
        await tx.start()
        await conn.execute("INSERT INTO outbox (method, payload, partition) VALUES ('publish', "
                           "'{\"channel\": \"chat:room-0\", \"data\": {\"k\": 0, \"s\": 1}}', 0)")
        return conn, tx

    loop = asyncio.new_event_loop()
    try:
        conn, tx = loop.run_until_complete(open_late_row())
        pg.psql("INSERT INTO outbox (method, payload, partition) VALUES ('publish', "
                "'{\"channel\": \"chat:room-3\", \"data\": {\"k\": 3, \"s\": 0}}', 0)", db)
        proc = relay(tmp_path, relay_config(tmp_path, embedded_server), embedded_server, pg.dsn(db)).start()
        try:
            wait_until(lambda: len(sequences(embedded_server)[3]) == 1 and remaining(pg, db) == 0, 30,
                       proc.logs()[-2000:])
            loop.run_until_complete(tx.commit())
            wait_until(lambda: sequences(embedded_server)[0] == [0, 1], 10, "the late row never arrived")
            wait_until(lambda: remaining(pg, db) == 0, 10, "the late row was not deleted")
        finally:
            proc.stop()
        loop.run_until_complete(conn.close())
    finally:
        loop.close()


# -- end to end ------------------------------------------------------------------------------------

def test_20000_rows_with_three_sigkills_arrive_once_in_order_and_the_table_ends_empty(
        postgres_server: PostgresServer, postgres_db: str, embedded_server: EmbeddedServerProcess,
        tmp_path: Path) -> None:
    pg, db = postgres_server, postgres_db
    create_outbox(pg, db)
    total = 20_000
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    inserter = Inserter(pg, db, total, chunk=500, pause=0.2)
    proc = relay(tmp_path, relay_config(tmp_path, embedded_server), embedded_server, pg.dsn(db))
    inserter.start()
    at_kill = kill_at_random_moments(proc, embedded_server, rng, kills=3)
    inserter.join(120)
    assert inserter.error is None
    proc.start()
    try:
        seen = wait_delivered(embedded_server, total, [proc])
        wait_until(lambda: remaining(pg, db) == 0, 30, "rows left in the outbox")
    finally:
        proc.stop()
    assert seen == expected(total), f"seed {seed}"
    assert at_kill[-1] < total, f"the last kill came after the end: {at_kill}"
    # The database never went away: reads and the engine's deletes share the connection without clashing.
    assert "connection lost" not in proc.logs() and "commit failed" not in proc.logs(), proc.logs()[-2000:]


def test_two_relays_share_the_partitions_and_one_killed_hands_over(
        postgres_server: PostgresServer, postgres_db: str, embedded_server: EmbeddedServerProcess,
        tmp_path: Path) -> None:
    """The first relay takes every partition; a second one joining mid-stream gets its share (one of
    three, handed over by the first once what it read of it settled) and both deliver; kill -9 of the
    first hands the rest over. Nothing lost, nothing twice, every room in order."""
    pg, db = postgres_server, postgres_db
    create_outbox(pg, db)
    total = 30_000
    slow = {"batch_size": 50, "max_in_flight_per_partition": 100}
    first = relay(tmp_path / "a", relay_config(tmp_path / "a", embedded_server, source=slow),
                  embedded_server, pg.dsn(db)).start()
    second = relay(tmp_path / "b", relay_config(tmp_path / "b", embedded_server, source=slow),
                   embedded_server, pg.dsn(db))
    inserter = Inserter(pg, db, 27_000, chunk=1000, pause=0.1)
    try:
        wait_until(lambda: first.logs().count("owns partition") == PARTITIONS, 30, first.logs()[-2000:])
        inserter.start()
        wait_until(lambda: delivered(embedded_server) > 300, 30, first.logs()[-2000:])
        second.start()
        wait_until(lambda: "hands partition 2 over" in first.logs() and "owns partition 2" in second.logs(), 30,
                   first.logs()[-2000:] + second.logs()[-2000:])
        assert second.logs().count("owns partition") == 1  # its share: ceil(3 / 2) = 2, and 0, 1 are held
        shared_at = delivered(embedded_server)
        wait_until(lambda: delivered(embedded_server) > shared_at + 1000, 30, second.logs()[-2000:])
        first.kill()
        assert remaining(pg, db) > 0, "the first relay finished before it was killed"
        inserter.join()
        assert inserter.error is None, inserter.error
        insert_rows(pg, db, 27_000, total)
        wait_until(lambda: second.logs().count("owns partition") == PARTITIONS, 30, second.logs()[-2000:])
        seen = wait_delivered(embedded_server, total, [first, second])
        wait_until(lambda: remaining(pg, db) == 0, 30, "rows left in the outbox")
    finally:
        first.stop()
        second.stop()
    assert seen == expected(total)


def test_database_restart_mid_stream_loses_nothing_and_shows_nothing_twice(
        postgres_server: PostgresServer, postgres_db: str, embedded_server: EmbeddedServerProcess,
        tmp_path: Path) -> None:
    pg, db = postgres_server, postgres_db
    create_outbox(pg, db)
    total = 12_000
    insert_rows(pg, db, 0, 9_000)
    proc = relay(tmp_path, relay_config(tmp_path, embedded_server, source={
        "batch_size": 50, "max_in_flight_per_partition": 100}), embedded_server, pg.dsn(db)).start()
    try:
        wait_until(lambda: delivered(embedded_server) > 1_000, 30, proc.logs()[-2000:])
        pg.restart()
        assert remaining(pg, db) > 0, "the relay finished before the restart"
        insert_rows(pg, db, 9_000, total)
        seen = wait_delivered(embedded_server, total, [proc])
        wait_until(lambda: remaining(pg, db) == 0, 30, "rows left in the outbox")
        assert proc.alive()
    finally:
        proc.stop()
    assert seen == expected(total)
    assert "connection lost" in proc.logs()


def test_malformed_and_unknown_namespace_rows_go_to_dead_letters_and_the_partition_goes_on(
        postgres_server: PostgresServer, postgres_db: str, embedded_server: EmbeddedServerProcess,
        tmp_path: Path) -> None:
    pg, db = postgres_server, postgres_db
    create_outbox(pg, db)
    insert_rows(pg, db, 0, 100)
    bad = pg.psql("INSERT INTO outbox (method, payload, partition) VALUES "
                  "('publish', '{\"no_channel\": 1}', 0), "
                  "('publish', '{\"channel\": \"nosuch:x\", \"data\": {\"a\": 1}}', 0), "
                  "('subscribe', '{\"user\": \"u\", \"channel\": \"chat:x\"}', 0) RETURNING id", db)
    bad_ids = [int(x) for x in bad.split()]
    insert_rows(pg, db, 100, 400)
    proc = relay(tmp_path, relay_config(tmp_path, embedded_server), embedded_server, pg.dsn(db)).start()
    try:
        seen = wait_delivered(embedded_server, 400, [proc])
        wait_until(lambda: remaining(pg, db) == 0, 30, "rows left in the outbox")
        wait_until(lambda: len(dead_letters(tmp_path)) == 3, 10, "dead letters")
    finally:
        proc.stop()
    assert seen == expected(400)
    letters = {int(d["position"].rsplit("/", 1)[1]): d for d in dead_letters(tmp_path)}
    assert sorted(letters) == bad_ids
    text = {i: json.dumps(d) for i, d in letters.items()}
    assert "no channel" in text[bad_ids[0]]
    assert "nosuch" in text[bad_ids[1]]
    assert "subscribe" in text[bad_ids[2]] and "not supported" in text[bad_ids[2]]


def test_notify_wakes_a_partition_long_before_poll_interval(
        postgres_server: PostgresServer, postgres_db: str, embedded_server: EmbeddedServerProcess,
        tmp_path: Path) -> None:
    pg, db = postgres_server, postgres_db
    create_outbox(pg, db)
    insert_rows(pg, db, 0, 50)
    proc = relay(tmp_path, relay_config(tmp_path, embedded_server, source={
        "poll_interval": "30s", "notify_channel": "outbox_wake"}), embedded_server, pg.dsn(db)).start()
    try:
        wait_delivered(embedded_server, 50, [proc], timeout=30)
        wait_until(lambda: remaining(pg, db) == 0, 10, "rows left in the outbox")
        # Rows 50..52 are rooms 0, 1, 2: partitions 0, 1, 2. Wake each, one at a time.
        for g in (50, 51, 52):
            started = time.monotonic()
            pg.psql(f"BEGIN; INSERT INTO outbox (method, payload, partition) VALUES ('publish', "
                    f"'{{\"channel\": \"chat:room-{g % ROOMS}\", \"data\": {{\"k\": {g % ROOMS}, \"s\": 1}}}}', "
                    f"{g % ROOMS % PARTITIONS}); NOTIFY outbox_wake, '{g % ROOMS % PARTITIONS}'; COMMIT", db)
            wait_until(lambda g=g: len(sequences(embedded_server)[g % ROOMS]) == 2, 5,  # type: ignore[misc]
                       f"row {g} not published within 5s of its NOTIFY (poll_interval is 30s)")
            assert time.monotonic() - started < 5
    finally:
        proc.stop()


def test_data_format_routes_decide_channels_with_column_and_partition_fields(
        postgres_server: PostgresServer, postgres_db: str, embedded_server: EmbeddedServerProcess,
        tmp_path: Path) -> None:
    pg, db = postgres_server, postgres_db
    pg.psql("CREATE TABLE events (id BIGSERIAL PRIMARY KEY, method TEXT NOT NULL DEFAULT '', payload JSONB NOT NULL, "
            "partition BIGINT NOT NULL DEFAULT 0, room TEXT NOT NULL)", db)
    pg.psql("INSERT INTO events (payload, room, partition) SELECT jsonb_build_object('s', g), 'r' || (g % 2), 0 "
            "FROM generate_series(0, 19) g ORDER BY g", db)
    routes = ('[[routes]]\nsource = "outbox"\nchannel = "chat:{{ column.room }}-{{ partition }}"\n'
              'data = \'{"s": {{ json.s }}, "id": {{ offset }}}\'\n')
    proc = relay(tmp_path, relay_config(tmp_path, embedded_server, source={
        "table": "events", "format": "data", "partitions": 1, "delete": False}, routes=routes),
        embedded_server, pg.dsn(db)).start()
    try:
        def arrived() -> list[Any]:
            return [json.loads(p.data) for ch in ("chat:r0-0", "chat:r1-0")
                    for p in history(embedded_server.address, ch, embedded_server.api_key)]
        wait_until(lambda: len(arrived()) == 20, 30, proc.logs()[-2000:])
        state = tmp_path / "state" / "postgres-outbox.json"
        wait_until(lambda: state.exists() and json.loads(state.read_text()) == {"0": 20}, 10, "position kept")
    finally:
        proc.stop()
    assert sorted(d["s"] for d in arrived()) == list(range(20))
    assert all(d["id"] == d["s"] + 1 for d in arrived())
    assert remaining(pg, db, "events") == 20  # delete = false keeps the rows


# -- side by side with Centrifugo's own consumer -----------------------------------------------------

# (method, payload, partition): what producers written for Centrifugo's consumer insert. A channel's
# rows come from one partition: order across partitions is not defined, by either consumer.
SAME_ROWS = [
    ("publish", {"channel": "chat:cmp", "data": {"n": 1, "nested": {"a": [1, 2.5, "x"]}}}, 0),
    ("publish", {"channel": "chat:cmp", "data": {"n": 2}, "tags": {"region": "eu"}}, 0),
    ("broadcast", {"channels": ["chat:cmp3", "chat:cmp4"], "data": {"n": 3}}, 2),
    ("publish", {"channel": "chat:cmp", "data": {"n": 4}, "idempotency_key": "dup"}, 0),
    ("publish", {"channel": "chat:cmp", "data": {"n": 4}, "idempotency_key": "dup"}, 0),
    ("publish", {"channel": "chat:cmp2", "b64data": "eyJuIjogNX0="}, 1),  # {"n": 5}
    ("publish", {"channel": "ghost:cmp", "data": {"n": 0}}, 2),  # unknown namespace
    ("disconnect", {"user": "42"}, 2),
    ("publish", {"channel": "chat:cmp2", "data": {"n": 6, "s": "ünïcode \"q\""}}, 1),
    ("publish", {"channel": "chat:cmp", "data": [1, {"b": None}]}, 0),
    ("publish", {"channel": "chat:cmp", "data": {"note": "b64data", "n": 7}}, 0),  # the word, not the key
    ("publish", {"channel": "chat:cmp", "data": {"note": "b64data", "n": 8}, "tags": {"t": "1"}}, 0),
]


def test_same_channel_histories_as_centrifugos_own_postgresql_consumer(
        postgres_server: PostgresServer, centrifugo_factory: Any, tmp_path: Path) -> None:
    pg = postgres_server
    theirs_db, ours_db = pg.create_database(), pg.create_database()
    for db in (theirs_db, ours_db):
        create_outbox(pg, db)
        for method, payload, partition in SAME_ROWS:
            literal = json.dumps(payload).replace("'", "''")
            pg.psql("INSERT INTO outbox (method, payload, partition) "
                    f"VALUES ('{method}', '{literal}', {partition})", db)
        for partition in range(PARTITIONS):
            pg.psql("INSERT INTO outbox (method, payload, partition) VALUES "
                    f"('publish', '{{\"channel\": \"chat:done-{partition}\", \"data\": {{}}}}', {partition})", db)
    native = centrifugo_factory(config_overrides={"consumers": [
        {"name": "pg_native", "enabled": True, "type": "postgresql",
         "postgresql": {"dsn": pg.dsn(theirs_db), "outbox_table_name": "outbox", "num_partitions": PARTITIONS}}]})
    target = centrifugo_factory()
    config = "\n".join([
        "[relay]", f'state_dir = "{tmp_path}/state"',
        "[sink]", f'address = "{target.grpc_address}"', 'api_key_env = "RELAY_TEST_TARGET_KEY"',
        f'dead_letter = "{tmp_path}/dead-letter.jsonl"',
        "[sources.outbox]", 'type = "postgres"', f'dsn_env = "{DSN_ENV}"', 'table = "outbox"',
        f"partitions = {PARTITIONS}", 'poll_interval = "100ms"',
    ]) + "\n"
    proc = RelayProcess(tmp_path, config, env={"RELAY_TEST_TARGET_KEY": target.api_key, DSN_ENV: pg.dsn(ours_db)},
                        metrics=False).start()
    try:
        for server in (native, target):
            wait_until(lambda s=server: all(history(s.grpc_address, f"chat:done-{p}", s.api_key)  # type: ignore[misc]
                                            for p in range(PARTITIONS)), 60, proc.logs()[-2000:] + server.log_tail())
        wait_until(lambda: remaining(pg, theirs_db) == 0 and remaining(pg, ours_db) == 0, 30, "rows left")
    finally:
        proc.stop()
    for channel in ("chat:cmp", "chat:cmp2", "chat:cmp3", "chat:cmp4"):
        theirs = [(p.data, dict(p.tags)) for p in history(native.grpc_address, channel, native.api_key)]
        ours = [(p.data, dict(p.tags)) for p in history(target.grpc_address, channel, target.api_key)]
        assert theirs, channel
        assert ours == theirs, channel
    reasons = sorted(d["error"]["message"] if isinstance(d.get("error"), dict) else str(d)
                     for d in dead_letters(tmp_path))
    assert len(reasons) == 2, reasons  # the unknown namespace and the disconnect (not a publication)


# -- what a user gets wrong ------------------------------------------------------------------------

def test_a_missing_database_stops_the_relay_with_one_line_naming_the_source(
        postgres_server: PostgresServer, embedded_server: EmbeddedServerProcess, tmp_path: Path) -> None:
    proc = relay(tmp_path, relay_config(tmp_path, embedded_server), embedded_server,
                 postgres_server.dsn("no_such_database"))
    proc.start()
    assert proc.wait(30) == 1
    failed = [line for line in proc.logs().splitlines() if "source failed" in line]
    assert len(failed) == 1
    assert "postgres source 'outbox'" in failed[0] and "no_such_database" in failed[0]


@pytest.mark.parametrize(("options", "problem"), [
    ({"dsn_file": "/x"}, "set exactly one of dsn_env or dsn_file"),
    ({"table": "outbox; DROP TABLE x"}, "must be NAME or SCHEMA.NAME"),
    ({"notify_channel": "wake-up"}, "notify_channel"),
    ({"partitions": 0}, "partitions"),
])
def test_bad_source_options_are_refused_by_relay_check_with_one_line(
        tmp_path: Path, options: dict[str, Any], problem: str) -> None:
    import subprocess
    import sys
    config = tmp_path / "relay.toml"
    config.write_text("\n".join([
        "[sink]", 'address = "127.0.0.1:10000"', 'api_key_env = "K"',
        "[sources.outbox]", 'type = "postgres"', 'dsn_env = "D"',
        *(f"{k} = {json.dumps(v)}" for k, v in options.items())]) + "\n")
    done = subprocess.run([sys.executable, "-m", "relay", "check", "-c", str(config)], capture_output=True,
                          text=True, env={"K": "k", "D": "postgresql://x@127.0.0.1/x", "PATH": "/usr/bin"})
    assert done.returncode == 2, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "sources.outbox" in lines[0] and problem in lines[0], lines


def test_rows_pending_per_partition_are_a_metric(postgres_server: PostgresServer, postgres_db: str,
                                                 tmp_path: Path) -> None:
    """With Centrifugo down nothing settles: every row stays pending, and /metrics says how many."""
    from tests.harness.ports import free_port
    pg, db = postgres_server, postgres_db
    create_outbox(pg, db)
    insert_rows(pg, db, 0, 150)  # rooms 0..49 → 17, 17, 16 rooms per partition, 3 rows each
    dead = EmbeddedServerProcess(tmp_path / "never-started", port=free_port())
    proc = RelayProcess(tmp_path, relay_config(tmp_path, dead),
                        env={SERVER_KEY_ENV: dead.api_key, DSN_ENV: pg.dsn(db)}).start()
    try:
        proc.wait_http()
        want = {0: 51, 1: 51, 2: 48}
        for partition, rows in want.items():
            wait_until(lambda p=partition, r=rows: proc.metric(  # type: ignore[misc]
                "relay_source_lag", f'source="outbox",stream="outbox/{p}"') == r, 20, proc.logs()[-2000:])
    finally:
        proc.stop()
    assert remaining(pg, db) == 150
