"""`type = "postgres"`: an outbox table drained in `id` order per partition, rows deleted once settled.

The table is Centrifugo's outbox layout (`id BIGSERIAL`, `method TEXT`, `payload JSONB`,
`partition BIGINT`, `created_at TIMESTAMPTZ`; extra columns are allowed), so producers written for
Centrifugo's own `postgresql` consumer keep working as they are.

Every row becomes a `Message` with `stream = "<table>/<partition>"` and `offset` = the row's id, so
idempotency keys come from (source, table, id) and stay the same across restarts and relays. Routes
(`format = "data"`) see `{{ partition }}`, `{{ offset }}` (the id), `{{ column.NAME }}` and
`{{ json.PATH }}` (on the payload). `format = "centrifugo"` reads `method` + `payload` the way
Centrifugo's consumer does (publish and broadcast; any other method goes to the dead letter file with
the reason); `format = "data"` makes the payload the publication data and routes name the channels.

Ownership: a relay owns a partition while it holds a session-level advisory lock on it
(`pg_try_advisory_lock(hashtext('centrifugo-relay:<table>:<partition>'))`) on its connection. Several
relays on one table therefore never deliver one partition at once; a relay that dies (even kill -9)
loses its connection, PostgreSQL releases its locks, and another relay takes the partition within
one `poll_interval`, re-reading the rows that were not deleted (their idempotency keys drop the
ones already published). Relays share the partitions: each holds one more lock while connected
(`(hashtext('centrifugo-relay:<table>:relays'), its backend pid)`), counts those in `pg_locks`
every `poll_interval`, and owns at most ceil(partitions / relays). One owning more stops reading
the partitions beyond its share and unlocks each once everything it read of it is settled, so the
next owner starts after it and the order per partition holds.

Delivery: rows of a partition are emitted in id order. Rows up to id n of partition p are deleted
only once row n and every earlier row of p were settled (published or dead-lettered); with
`delete = false` the settled id is kept per partition in the state dir instead. Deletes name the ids,
so a row whose transaction committed late (an id below rows already delivered) is never deleted
unread: a partition with nothing in flight is read from its start again.

Round trips: one SELECT reads every partition that is due (up to `batch_size` rows of each, after its
own last id), and one DELETE removes what settled in all of them (runs of consecutive ids as ranges,
the rest by id), on a second connection so that reads never wait for it. Under a backlog the next
SELECT is sent as soon as rows arrive, before they are built and handed over, so PostgreSQL reads the
next rows while the relay delivers these. The `data` arrives as the bytes PostgreSQL prints (bytea),
never decoded to text and back. A plain publish (channel and data, none of PUBLISH_OPTIONS) is taken
apart by the SELECT: only its channel and data are fetched, its data is also the message's (what a
dead letter of it holds), and no JSON is parsed in the relay; any other row brings its whole payload,
read as Centrifugo's consumer does.

The source engine (relay/sources/engine.py) owns the rest: caps, commits, reconnecting with backoff
after a lost connection or a restarted server (what was not deleted is read again).
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import json
import logging
import operator
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import asyncpg
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from relay.centrifugo_records import CentrifugoRecord, from_command, load_json, plain_record
from relay.message import NOTHING, Message
from relay.secrets import SecretError, load_secret
from relay.sources.engine import READ_MAX, Batch, Revoke, SourceFatal, SourceUnavailable
from relay.units import Duration

log = logging.getLogger("relay.sources.postgres")

FIELDS = ("partition", "offset", "column.*", "json.*")
# How often settled rows are deleted (the engine calls commit()).
COMMIT_INTERVAL = 0.2
# Longest read() waits for rows or a NOTIFY before it returns "nothing now".
READ_WAIT = 0.5
# How often the rows pending per partition are counted (relay_source_lag).
LAG_INTERVAL = 5.0
LOCK_PREFIX = "centrifugo-relay"
# Keys of a publish payload that change the publication (besides channel and data); a payload with
# none of them is a plain publish, which PostgreSQL takes apart (keys Centrifugo does not know it ignores).
PUBLISH_OPTIONS = ("b64data", "idempotency_key", "tags", "skip_history", "delta", "version", "version_epoch")
# A plain publish row, tested in SQL: its payload is not fetched, only its channel and data.
_PLAIN_PUBLISH = ("method = 'publish' AND jsonb_typeof(payload->'channel') = 'string' "
                  "AND payload->>'channel' <> '' AND payload ? 'data' "
                  f"AND NOT payload ?| array[{', '.join(repr(k) for k in PUBLISH_OPTIONS)}]")
# Settled ids are deleted as runs of consecutive ids where they make runs this long, the others one by one.
RUN_MIN = 16

# Errors that mean "the server went away": reconnect. Anything else from the server is fatal.
# (InternalClientError: asyncpg's protocol state after a server shut down under a query.)
_LOST = (OSError, ConnectionError, TimeoutError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError,
         asyncpg.exceptions.InternalClientError, asyncpg.exceptions.OperatorInterventionError,
         asyncpg.exceptions.ConnectionFailureError)
_FATAL = (asyncpg.exceptions.InvalidAuthorizationSpecificationError, asyncpg.exceptions.InvalidPasswordError,
          asyncpg.exceptions.InvalidCatalogNameError, asyncpg.exceptions.UndefinedTableError,
          asyncpg.exceptions.UndefinedColumnError, asyncpg.exceptions.InsufficientPrivilegeError)


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["postgres"]
    dsn_env: str = Field("", description="Environment variable holding the DSN "
                                         "(postgresql://user:password@host:5432/db?sslmode=verify-full).")
    dsn_file: str = Field("", description="File holding the DSN, instead of dsn_env (the DSN carries the password).")
    table: str = Field("centrifugo_outbox", description="Outbox table: id, method, payload JSONB, partition, "
                                                        "created_at (Centrifugo's layout); may be schema.table.")
    format: Literal["centrifugo", "data"] = Field(
        "centrifugo", description="centrifugo: method + payload columns as Centrifugo's consumer reads them; "
                                  "data: payload is the publication data, routes decide the channels.")
    partitions: int = Field(1, ge=1, le=4096, description="Rows carry partition 0..N-1; each is read in id order.")
    poll_interval: Duration = Field(0.3, description="How often an idle partition is queried again.")
    notify_channel: str = Field("", description="LISTEN channel; a NOTIFY whose payload is a partition number "
                                                "wakes that partition at once. Needs a direct (not PgBouncer "
                                                "transaction mode) connection.")
    batch_size: int = Field(500, ge=1, description="Rows read per partition per query (at most 500).")
    delete: bool = Field(True, description="Delete delivered rows (as Centrifugo does); false = keep them and "
                                           "remember the position per partition in the state dir.")
    max_in_flight_per_partition: int = Field(
        5000, ge=1, description="Unsettled rows per partition before it is paused (resumed at half).")
    connect_timeout: Duration = Field(10.0, description="Timeout of one connection attempt.")

    @field_validator("table")
    @classmethod
    def _table(cls, value: str) -> str:
        parts = value.split(".")
        if len(parts) > 2 or not all(p and (p[0].isalpha() or p[0] == "_") and
                                     all(c.isalnum() or c == "_" for c in p) for p in parts):
            raise ValueError(f"table {value!r} must be NAME or SCHEMA.NAME (letters, digits, _)")
        return value

    @field_validator("notify_channel")
    @classmethod
    def _channel(cls, value: str) -> str:
        if value and not all(c.isalnum() or c == "_" for c in value):
            raise ValueError(f"notify_channel {value!r} must be letters, digits and _")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Config:
        if self.batch_size > READ_MAX:
            raise ValueError(f"batch_size must be at most {READ_MAX}")
        if bool(self.dsn_env) == bool(self.dsn_file):
            raise ValueError("set exactly one of dsn_env or dsn_file (the DSN is a secret)")
        if self.poll_interval <= 0:
            raise ValueError("poll_interval must be more than 0s")
        if self.connect_timeout <= 0:
            raise ValueError("connect_timeout must be more than 0s")
        return self


class _Partition:
    """One partition while this relay holds its lock (one connection's worth)."""

    __slots__ = ("after", "due", "ids", "leaving", "more", "number", "paused", "stream")

    def __init__(self, table: str, number: int, after: int) -> None:
        self.number = number
        self.stream = f"{table}/{number}"
        self.after = after              # the last id read
        self.ids: list[int] = []        # ids read and not yet deleted, in order
        self.due = 0.0                  # when the partition is queried next (monotonic)
        self.more = True                # the last query filled its batch: more rows wait
        self.paused = False             # the engine's cap: not read until resumed
        self.leaving = False            # beyond this relay's share: not read, handed over once settled


class PostgresReader:
    """Reads owned partitions in id order; deletes (or remembers) what the engine says is settled."""

    commit_interval = COMMIT_INTERVAL
    connect_timeout = 0.0  # a database being restarted comes back: keep trying

    def __init__(self, name: str, config: Config, state_dir: Path) -> None:
        self.name = name
        self.config = config
        self.max_in_flight = config.max_in_flight_per_partition
        self._partitions: dict[int, _Partition] = {}
        self._by_stream: dict[str, _Partition] = {}
        self._wake = asyncio.Event()
        self._conn: Any = None      # holds the partition locks and reads
        self._deleter: Any = None   # deletes what settled, beside the reads (the engine commits in a task of its own)
        self._listener: Any = None  # LISTEN notify_channel
        # The query sent ahead (the partitions it reads, its rows), while the rows before it are built
        # and delivered; the next read() takes it.
        self._ahead: tuple[list[_Partition], asyncio.Task[list[Any]]] | None = None
        self._build = self._centrifugo_messages if config.format == "centrifugo" else self._data_messages
        # A row's id: its second column in Centrifugo's format, by name among the table's own columns in data's.
        self._row_id = _ID if config.format == "centrifugo" else operator.itemgetter("id")
        self._lock_due = 0.0
        self._lag_due = 0.0
        self._revoke: Revoke | None = None
        self._pending: dict[str, int] = {}
        self._state_path = state_dir / f"postgres-{name}.json"
        self._positions: dict[int, int] = self._load_positions() if not config.delete else {}
        table = config.table
        # Centrifugo's format names its own channels (routes do not apply): only what it reads is fetched,
        # the data as the bytes PostgreSQL prints (bytea: decoded by asyncpg in C, never to str and back).
        # A plain publish comes as its channel and data; the whole payload only for any other row.
        columns = ("id, method, payload->>'channel' AS relay_channel, "
                   "convert_to((payload->'data')::text, 'UTF8') AS relay_data, "
                   f"CASE WHEN {_PLAIN_PUBLISH} THEN NULL ELSE convert_to(payload::text, 'UTF8') END AS payload"
                   if config.format == "centrifugo" else "*, payload::text AS relay_payload_text")
        # Every partition due is read in one round trip: up to $3 rows of each, after its own last id.
        self._select = (f"SELECT p.number AS relay_partition, o.* "
                        f"FROM unnest($1::bigint[], $2::bigint[]) AS p(number, after) CROSS JOIN LATERAL "
                        f"(SELECT {columns} FROM {table} WHERE partition = p.number AND id > p.after "
                        f"ORDER BY id LIMIT $3) AS o ORDER BY p.number, o.id")
        # By id, not `id <= n`: a row whose transaction committed late, with an id below n, is not deleted
        # unread (and the primary key finds each row without walking the dead index entries of earlier deletes).
        # Ids read are mostly consecutive: runs of them are sent as (first, last), every id of which was read;
        # the ids in no long run (partitions settled to different points, other relays' rows between) one by
        # one, in the same statement.
        self._delete = (f"WITH runs AS (DELETE FROM {table} USING unnest($1::bigint[], $2::bigint[]) "
                        f"AS run(first, last) WHERE {table}.id BETWEEN run.first AND run.last) "
                        f"DELETE FROM {table} WHERE id = ANY($3::bigint[])")
        # Live relays of this table: each holds an advisory lock (key, its backend pid) while connected.
        self._relays_key = f"{LOCK_PREFIX}:{table}:relays"
        self._count_relays = ("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objsubid = 2 AND granted "
                              "AND classid = (hashtext($1)::bigint & 4294967295)::oid "
                              "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())")

    # -- the engine's Reader -----------------------------------------------------------------------

    async def connect(self) -> None:
        dsn = self._dsn()
        await self.close()  # what a failed attempt may have left open (its locks go with it)
        self._partitions.clear()
        self._by_stream.clear()
        self._lock_due = 0.0
        async with self._errors():
            self._conn = await asyncpg.connect(dsn, timeout=self.config.connect_timeout)
            await self._conn.fetchval("SELECT pg_try_advisory_lock(hashtext($1), pg_backend_pid())", self._relays_key)
            if self.config.delete:
                self._deleter = await asyncpg.connect(dsn, timeout=self.config.connect_timeout)
            if self.config.notify_channel:
                self._listener = await asyncpg.connect(dsn, timeout=self.config.connect_timeout)
                await self._listener.add_listener(self.config.notify_channel, self._notified)
        log.info("postgres source %s: connected; table %s, %d partition(s)",
                 self.name, self.config.table, self.config.partitions)

    async def read(self) -> Sequence[Batch] | None:
        async with self._errors():
            self._check_connections()
            got = await self._take_ahead()
            now = time.monotonic()
            if now >= self._lock_due:
                await self._balance()
                self._lock_due = now + self.config.poll_interval
            await self._measure_lag(now)
            if not got:
                due = self._due(now)
                got = self._take_rows(due, await self._fetch(due)) if due else []
            if got:
                self._read_ahead()
            batches = [Batch(part.stream, self._build(part, rows), end=self._row_id(rows[-1])) for part, rows in got]
        if not batches:
            await self._sleep()
        return batches

    def bind(self, revoke: Revoke) -> None:
        """The engine's revoke: a partition handed over is forgotten there too."""
        self._revoke = revoke

    def position_after(self, message: Message) -> int:
        return message.offset  # the last settled id: rows up to it (that this relay read) go

    async def commit(self, positions: dict[str, int]) -> None:
        settled: list[tuple[_Partition, int]] = []  # (partition, how many of its ids are done)
        for stream, last in positions.items():
            part = self._by_stream.get(stream)
            if part is not None:
                count = bisect.bisect_right(part.ids, last)
                if count:
                    settled.append((part, count))
        if not settled:
            return
        if self.config.delete:
            if self._deleter is None:
                raise ConnectionError("not connected")
            done: list[int] = []
            for part, count in settled:
                done += part.ids[:count]
            done.sort()  # each partition's ids are sorted: a merge
            await self._deleter.execute(self._delete, *_runs(done))  # one statement for every partition
        changed = False
        for part, count in settled:
            last_id = part.ids[count - 1]
            del part.ids[:count]  # only once deleted: a failed delete is tried again at the next commit
            if not self.config.delete and last_id > self._positions.get(part.number, 0):
                self._positions[part.number] = last_id
                changed = True
        if changed:
            self._save_positions()

    def pause(self, stream: str) -> None:
        part = self._by_stream.get(stream)
        if part is not None:
            part.paused = True

    def resume(self, stream: str) -> None:
        part = self._by_stream.get(stream)
        if part is not None:
            part.paused = False
            self._wake.set()

    async def close(self) -> None:
        ahead, self._ahead = self._ahead, None
        if ahead is not None:
            ahead[1].cancel()
            with contextlib.suppress(BaseException):
                await ahead[1]
        conns = (self._conn, self._deleter, self._listener)
        self._conn = self._deleter = self._listener = None
        for conn in conns:
            if conn is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(conn.close(), 2.0)
                if not conn.is_closed():
                    conn.terminate()

    # -- connecting ------------------------------------------------------------------------------

    def _dsn(self) -> str:
        try:
            secret = load_secret(self.config.dsn_env, self.config.dsn_file)
        except SecretError as err:
            raise SourceFatal(f"postgres source {self.name!r}: dsn: {err}") from None
        dsn = secret.reveal() if secret is not None else ""
        if not dsn:
            raise SourceFatal(f"postgres source {self.name!r}: the DSN secret is empty")
        return dsn

    @contextlib.asynccontextmanager
    async def _errors(self) -> Any:
        """The server's errors as the engine's: gone = SourceUnavailable, refused for good = SourceFatal."""
        try:
            yield
        except _FATAL as err:
            raise SourceFatal(f"postgres source {self.name!r}: {type(err).__name__}: {err}") from None
        except _LOST as err:
            raise SourceUnavailable(f"{type(err).__name__}: {err}") from None

    def _check_connections(self) -> None:
        """A closed connection means the server went away: the engine reconnects."""
        if self._conn is None or self._conn.is_closed():
            raise ConnectionError("the connection closed")
        for conn, what in ((self._deleter, "delete"), (self._listener, "LISTEN")):
            if conn is not None and conn.is_closed():
                raise ConnectionError(f"the {what} connection closed")

    def _notified(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        with contextlib.suppress(ValueError):
            part = self._partitions.get(int(payload.strip()))
            if part is not None:
                part.due = 0.0
                self._wake.set()

    # -- reading ---------------------------------------------------------------------------------

    async def _sleep(self) -> None:
        now = time.monotonic()
        wake_at = min(now + READ_WAIT, self._lock_due)
        for part in self._partitions.values():
            if not part.paused and not part.leaving:
                wake_at = min(wake_at, now if part.more else part.due)
        self._wake.clear()
        if wake_at > now:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), wake_at - now)

    # -- sharing the partitions ----------------------------------------------------------------

    async def _balance(self) -> None:
        """Own a fair share of the partitions, ceil(partitions / live relays): take free ones up to
        it; mark what is beyond it as leaving, and hand a leaving partition over once everything read
        of it is settled (so the next owner starts after it, and the order per partition holds)."""
        relays = await self._conn.fetchval(self._count_relays, self._relays_key)
        share = -(-self.config.partitions // max(1, relays))
        keep = sorted(self._partitions)[:share]
        for number, part in list(self._partitions.items()):
            part.leaving = number not in keep
            if part.leaving and not part.ids:
                await self._hand_over(part, relays)
        if len(self._partitions) < share:
            await self._take_partitions(share)

    async def _take_partitions(self, share: int) -> None:
        for number in range(self.config.partitions):
            if len(self._partitions) >= share:
                return
            if number in self._partitions:
                continue
            if await self._conn.fetchval("SELECT pg_try_advisory_lock(hashtext($1))", self._lock_key(number)):
                part = _Partition(self.config.table, number, self._positions.get(number, 0))
                self._partitions[number] = part
                self._by_stream[part.stream] = part
                log.info("postgres source %s: owns partition %d", self.name, number)

    async def _hand_over(self, part: _Partition, relays: int) -> None:
        del self._partitions[part.number], self._by_stream[part.stream]
        if self._revoke is not None:
            await self._revoke([part.stream])  # nothing of it is in flight: the engine forgets it
        await self._conn.fetchval("SELECT pg_advisory_unlock(hashtext($1))", self._lock_key(part.number))
        log.info("postgres source %s: hands partition %d over (%d relays share %d partitions)",
                 self.name, part.number, relays, self.config.partitions)

    def _lock_key(self, number: int) -> str:
        return f"{LOCK_PREFIX}:{self.config.table}:{number}"

    def _due(self, now: float) -> list[_Partition]:
        """Partitions to read now: a full batch last time (more wait), or their poll is due."""
        return [part for part in self._partitions.values()
                if not part.paused and not part.leaving and (part.more or now >= part.due)]

    async def _fetch(self, due: list[_Partition]) -> list[Any]:
        """The next rows of every partition in `due`, in one query, ordered by partition and id."""
        if self.config.delete:
            for part in due:
                if not part.ids:
                    part.after = 0  # nothing of ours is left in the table: pick up rows that committed late
        return list(await self._conn.fetch(self._select, [p.number for p in due], [p.after for p in due],
                                           self.config.batch_size))

    def _read_ahead(self) -> None:
        """Send the next query now, for the partitions that filled their batch (and any other that is
        due): PostgreSQL reads the next rows while the relay builds and delivers these (a backlog is
        read without waiting for either). At most one batch per partition goes past the engine's cap
        this way."""
        due = self._due(time.monotonic())
        if due:
            self._ahead = (due, asyncio.ensure_future(self._fetch(due)))

    async def _take_ahead(self) -> list[tuple[_Partition, list[Any]]]:
        """The rows of the query sent ahead by the last read (none if there is none)."""
        if self._ahead is None:
            return []
        due, task = self._ahead
        try:
            rows = await task
        finally:
            self._ahead = None
        return self._take_rows([part for part in due if self._partitions.get(part.number) is part], rows)

    def _take_rows(self, due: list[_Partition], rows: list[Any]) -> list[tuple[_Partition, list[Any]]]:
        """Rows of one query (ordered by partition and id) per partition that had some; each partition's
        position moves past them and its next query is scheduled. Messages are built later, after the
        next query was sent."""
        due_at = time.monotonic() + self.config.poll_interval
        got = []
        end = 0
        for part in sorted(due, key=_NUMBER):
            start = bisect.bisect_left(rows, part.number, lo=end, key=_PARTITION)
            end = bisect.bisect_right(rows, part.number, lo=start, key=_PARTITION)
            part_rows = rows[start:end]
            part.more = len(part_rows) == self.config.batch_size
            part.due = due_at
            if part_rows:
                part.ids += map(self._row_id, part_rows)
                part.after = part.ids[-1]
                got.append((part, part_rows))
        return got

    def _centrifugo_messages(self, part: _Partition, rows: Sequence[Any]) -> list[Message]:
        """Rows in Centrifugo's layout as messages. This runs for every row: what is the same for all
        of them is looked up once. Such a record names its own channels and no route reads its
        template fields, so the messages carry none."""
        name, stream = self.name, part.stream
        read_at = time.monotonic()
        messages: list[Message] = []
        append = messages.append
        for _, row_id, method, channel, data, payload in rows:
            if payload is None:  # a plain publish, taken apart by PostgreSQL: its data is the message's
                append(Message(name, data, stream, row_id, None, NOTHING, NOTHING, read_at,
                               plain_record(channel, data)))
                continue
            error, record = "", None
            try:
                record = _record(method or "", payload, data)
            except ValueError as err:
                error = f"row id {row_id}: {err}"
            append(Message(name, payload, stream, row_id, None, NOTHING, NOTHING, read_at, record, error))
        return messages

    def _data_messages(self, part: _Partition, rows: Sequence[Any]) -> list[Message]:
        """Rows whose payload is the publication data; routes see their columns."""
        name, stream, number = self.name, part.stream, part.number
        read_at = time.monotonic()
        messages: list[Message] = []
        for row in rows:
            attributes: dict[str, Any] = {"partition": number, "offset": row["id"]}
            for column, value in row.items():
                if not column.startswith("relay_"):
                    attributes[f"column.{column}"] = value
            messages.append(Message(source=name, data=row["relay_payload_text"].encode(), stream=stream,
                                    offset=row["id"], attributes=attributes, read_at=read_at))
        return messages

    # -- state -----------------------------------------------------------------------------------

    async def _measure_lag(self, now: float) -> None:
        if now < self._lag_due or not self._partitions:
            return
        self._lag_due = now + LAG_INTERVAL
        numbers = list(self._partitions)
        rows = await self._conn.fetch(
            f"SELECT partition, count(*) AS n FROM {self.config.table} WHERE partition = ANY($1::bigint[]) "
            "AND id > coalesce(($2::jsonb ->> partition::text)::bigint, 0) GROUP BY partition",
            numbers, json.dumps({str(k): v for k, v in self._positions.items()}))
        counts = {row["partition"]: row["n"] for row in rows}
        self._pending = {self._partitions[n].stream: counts.get(n, 0) for n in numbers}

    async def pending(self) -> dict[str, int]:
        """Rows left per owned partition (`relay_source_lag`), as last counted (every LAG_INTERVAL)."""
        return {stream: n for stream, n in self._pending.items() if stream in self._by_stream}

    def _load_positions(self) -> dict[int, int]:
        try:
            raw = json.loads(self._state_path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as err:
            raise SourceFatal(f"postgres source {self.name!r}: cannot read {self._state_path}: {err}") from None
        return {int(k): int(v) for k, v in raw.items()}

    def _save_positions(self) -> None:
        tmp = self._state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps({str(k): v for k, v in sorted(self._positions.items())}))
        os.replace(tmp, self._state_path)

    def owned(self) -> list[int]:
        """Partitions this relay holds the lock of (tests, status)."""
        return sorted(self._partitions)


def build(name: str, config: Config, state_dir: Path) -> PostgresReader:
    return PostgresReader(name, config, state_dir)


def _record(method: str, payload: bytes, data: bytes | None) -> CentrifugoRecord:
    """What a row that is not a plain publish asks Centrifugo to do, with the publication data as
    PostgreSQL prints it (`data`, null when the payload has none): byte for byte what Centrifugo's own
    consumer publishes. ValueError says why the row is none."""
    try:
        doc: Any = load_json(payload)
    except (ValueError, UnicodeDecodeError):
        doc = payload  # from_command says why
    record = from_command(method, doc)
    if data is not None and record.is_publication and not (isinstance(doc, dict) and doc.get("b64data")):
        record = record._replace(data=data)  # b64data, when there is one, is what gets published
    return record


def _runs(ids: list[int]) -> tuple[list[int], list[int], list[int]]:
    """Sorted distinct ids as runs of consecutive numbers, (firsts, lasts), and the ids in no run of
    RUN_MIN or more (`singles`). Halving finds a run of any length in a few steps, and stops at
    pieces too short to hold one."""
    firsts: list[int] = []
    lasts: list[int] = []
    singles: list[int] = []
    todo = [(0, len(ids) - 1)] if ids else []
    while todo:
        i, j = todo.pop()
        if ids[j] - ids[i] == j - i:  # distinct and sorted: ids[i..j] are consecutive
            if lasts and lasts[-1] + 1 == ids[i]:
                lasts[-1] = ids[j]
            elif j - i + 1 >= RUN_MIN:
                firsts.append(ids[i])
                lasts.append(ids[j])
            else:
                singles += ids[i:j + 1]
        elif j - i < RUN_MIN:  # too short to hold a run of its own: what continues the last run joins it
            while lasts and i <= j and lasts[-1] + 1 == ids[i]:
                lasts[-1] = ids[i]
                i += 1
            singles += ids[i:j + 1]
        else:
            middle = (i + j) // 2
            todo += ((middle + 1, j), (i, middle))  # the left half is taken first: runs come in order
    return firsts, lasts, singles


_PARTITION = operator.itemgetter(0)
_NUMBER = operator.attrgetter("number")
_ID = operator.itemgetter(1)
