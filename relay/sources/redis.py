"""`type = "redis"`: entries of Redis Streams, read in a consumer group, XACKed once settled.

Every entry becomes a `Message` with `stream` = the stream's key and `offset` = its entry id
"MS-SEQ" as the integer MS * 10**20 + SEQ (ordered like the ids, stable across relays and restarts,
so idempotency keys from (stream, entry id) match whoever reads the entry again). Attributes for
routes: `stream`, `offset` (the entry id as Redis prints it), `field.NAME` for every field, and
`json.PATH` on the data.

Delivery (the source engine, relay/sources/engine.py, runs this reader: caps, commits, reconnects):
XREADGROUP reads each stream in id order. The engine commits a position when every message read
before it was settled (published or dead-lettered); the reader then XACKs the entries it read
before that position, in the order it read them (entry ids alone cannot say it: claimed entries are
older than what was read before them). After every (re)connect the reader first reads its own
pending entries again (id `0`: what it read before a crash or a lost reply), then new ones (`>`).
Entries that another consumer of the group left pending for `visibility_timeout` are claimed with
XAUTOCLAIM and delivered; the reader refreshes the idle time of entries it still holds so that
nobody claims those.

`exclusive = true`: a relay reads a stream only while it holds the key `<stream>:relay-owner:<group>`
(SET NX with a TTL of `visibility_timeout`, renewed every third of it, deleted at close). A relay
that takes over a stream first claims every entry still pending in the group (the last owner's) and
reads them in id order, then new ones: strict order per stream even with several relays.

`format = "centrifugo"` reads what Centrifugo's `redis_stream` consumer reads: field `payload`
holding `{"method": ..., "payload": {...}}`; or field `method` beside a bare request in `payload`;
or publication data mode: `payload` is the data and the fields `centrifugo-channels`, ... carry the
rest (relay/centrifugo_records.py). `format = "data"`: field `payload` is the data.
An entry without the field, or one Centrifugo could not take, goes to the dead letter file (and is
XACKed).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections import deque
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import redis.asyncio as aioredis
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from redis.exceptions import (
    AuthenticationError,
    AuthorizationError,
    ConnectionError,
    NoPermissionError,
    ResponseError,
    TimeoutError,
)

from relay import events
from relay.centrifugo_records import read_publication
from relay.message import Message
from relay.secrets import SecretError, load_secret
from relay.sources.engine import READ_MAX, Batch, SourceUnavailable
from relay.units import Duration

log = logging.getLogger("relay.sources.redis")

FIELDS = ("stream", "offset", "field.*", "json.*")

# Entry id "MS-SEQ" → MS * ID_BASE + SEQ: SEQ is a 64-bit counter, under 10**20.
ID_BASE = 10**20
FIELD_PREFIX = "centrifugo-"
# Errors after which the connection is made again (with backoff); the entries keep their places.
UNAVAILABLE = (ConnectionError, TimeoutError, OSError)
FATAL = (AuthenticationError, AuthorizationError, NoPermissionError)
# Compare-and-renew and compare-and-delete of a stream's owner key (exclusive = true).
RENEW = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) end return 0"
RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["redis"]
    address: str = Field("redis://127.0.0.1:6379/0",
                         description="redis://[user@]host:port/db, or rediss:// for TLS. No password "
                                     "here: use password_env or password_file.")
    username: str = Field("", description="ACL user name (or put it in address).")
    password_env: str = Field("", description="Environment variable holding the password.")
    password_file: str = Field("", description="File holding the password.")
    ca_file: str = Field("", description="CA bundle (PEM) for rediss://; empty = the system's trust store.")
    streams: list[str] = Field(min_length=1, description="Stream keys to read.")
    group: str = Field("centrifugo-relay", min_length=1,
                       description="Consumer group; relays in one group share the entries.")
    consumer: str = Field("", description="This relay's consumer name in the group; keep it stable across "
                                          "restarts (empty = the host name).")
    start_from: Literal["earliest", "latest"] = Field(
        "earliest", description="Where a group created by the relay starts: earliest (id 0) or latest ($).")
    format: Literal["data", "centrifugo"] = Field(
        "data", description="data: field payload is the data, routes decide the channels; centrifugo: "
                            "Centrifugo's redis_stream consumer format.")
    payload_field: str = Field("payload", min_length=1, description="Field holding the data or command.")
    method_field: str = Field("method", min_length=1,
                              description="Field naming the method when payload is a bare request (centrifugo).")
    visibility_timeout: Duration = Field(
        30.0, description="Entries another consumer left pending this long are claimed (XAUTOCLAIM).")
    read_count: int = Field(500, ge=1, description="Entries read per stream per XREADGROUP.")
    block: Duration = Field(1.0, description="How long one XREADGROUP waits for new entries.")
    max_in_flight_per_stream: int = Field(
        5000, ge=1, description="Unsettled entries per stream before it is not read (resumed at half).")
    commit_interval: Duration = Field(0.2, description="How often settled entries are XACKed.")
    exclusive: bool = Field(
        False, description="One relay of the group at a time reads each stream (a lock key with a TTL of "
                            "visibility_timeout): strict order per stream with several relays.")

    @field_validator("address")
    @classmethod
    def _address(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("redis", "rediss") or not parts.hostname:
            raise ValueError(f"address {value!r} is not redis://host:port[/db] or rediss://...")
        if parts.password:
            raise ValueError("address holds a password: use password_env or password_file")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Config:
        if self.password_env and self.password_file:
            raise ValueError("set at most one of password_env and password_file")
        if self.visibility_timeout <= 0 or self.commit_interval <= 0 or self.block <= 0:
            raise ValueError("visibility_timeout, commit_interval and block must be more than 0s")
        if len(set(self.streams)) != len(self.streams):
            raise ValueError("streams lists a stream twice")
        return self


class RedisSourceError(RuntimeError):
    """The source cannot run: credentials refused, a secret missing, a key that is not a stream."""


def entry_offset(entry_id: str) -> int:
    """The integer offset of an entry id "MS-SEQ" (ordered like the ids)."""
    ms, _, seq = entry_id.partition("-")
    return int(ms) * ID_BASE + int(seq or 0)


class _Stream:
    """One stream: entries handed to the engine and not yet XACKed, in the order they were read."""

    __slots__ = ("name", "next_id", "owned", "paused", "read", "seen")

    def __init__(self, name: str, owned: bool) -> None:
        self.name = name
        self.owned = owned  # always True unless `exclusive`: then while this relay holds the lock
        self.paused = False  # by the engine: at its cap
        self.next_id = "0"  # "0..." while re-reading our own pending entries, then ">"
        self.read: deque[tuple[str, int]] = deque()  # (entry id, offset), read order
        self.seen: set[str] = set()

    def reset(self) -> None:
        """After a (re)connect everything not XACKed is read again, in id order."""
        self.read.clear()
        self.seen.clear()
        self.next_id = "0"

    def ackable(self, position: int) -> list[str]:
        """The ids read before `position` (a message's offset, or one past the last one's)."""
        for index, (_, offset) in enumerate(self.read):
            if offset == position or offset + 1 == position:
                count = index + (offset + 1 == position)
                ids = [self.read.popleft()[0] for _ in range(count)]
                self.seen.difference_update(ids)
                return ids
        return []  # a position from before a reconnect: the re-read copies are XACKed later


class RedisReader:
    """Reads streams in a consumer group for the source engine; see the module docstring."""

    def __init__(self, name: str, config: Config) -> None:
        self.name = name
        self.config = config
        self.consumer = config.consumer or socket.gethostname()
        self.max_in_flight = config.max_in_flight_per_stream
        self.commit_interval = config.commit_interval
        self._streams = {s: _Stream(s, not config.exclusive) for s in config.streams}
        self._client: aioredis.Redis | None = None
        self._unacked: dict[str, list[str]] = {}  # XACKs that failed: sent again at the next commit
        self._chores_every = max(0.1, min(config.visibility_timeout / 3, 5.0))
        self._chores_at = 0.0

    # -- the reader contract -------------------------------------------------------------------

    async def connect(self) -> None:
        """A client that answered, with the group on every stream; our pending entries are read first."""
        await self._drop_client()
        client = self._new_client()
        self._client = client
        try:
            await client.execute_command("PING")  # type: ignore[no-untyped-call]
            for stream in self._streams.values():
                await self._ensure_group(client, stream.name)
                stream.reset()
            if self.config.exclusive:
                await self._own_streams(client)
        except FATAL as err:  # (subclasses of ConnectionError: caught first)
            raise RedisSourceError(f"redis source {self.name!r}: {self._where()} refused us "
                                   f"({_describe(err)}); check username and the password") from None
        except UNAVAILABLE as err:
            await self._drop_client()
            raise SourceUnavailable(f"{self._where()}: {_describe(err)}") from None
        except ResponseError as err:
            raise RedisSourceError(f"redis source {self.name!r}: {_describe(err)}") from None
        self._chores_at = 0.0
        log.info("redis source %s: connected to %s, group %s, consumer %s", self.name, self._where(),
                 self.config.group, self.consumer)

    async def read(self) -> list[Batch]:
        client = self._client
        if client is None:
            raise SourceUnavailable("not connected")
        try:
            batches: list[Batch] = []
            if time.monotonic() >= self._chores_at:
                self._chores_at = time.monotonic() + self._chores_every
                batches += await self._chores(client)
            ids = {s.name: s.next_id for s in self._streams.values() if s.owned and not s.paused}
            if not ids:
                await asyncio.sleep(min(self.config.block, self._chores_every))
                return batches
            # Re-reading pending entries answers at once; only new reads block.
            blocking = all(i == ">" for i in ids.values())
            reply = await client.xreadgroup(
                self.config.group, self.consumer, ids,  # type: ignore[arg-type]
                count=min(self.config.read_count, READ_MAX),
                block=int(self.config.block * 1000) if blocking else None)
            return batches + await self._accept(client, reply or [], ids)
        except FATAL as err:
            raise RedisSourceError(f"redis source {self.name!r}: {_describe(err)}") from None
        except UNAVAILABLE as err:
            raise SourceUnavailable(f"{self._where()}: {_describe(err)}") from None
        except ResponseError as err:
            if "NOGROUP" in str(err):  # stream or group deleted under us: connect() creates them again
                raise SourceUnavailable(_describe(err)) from None
            raise RedisSourceError(f"redis source {self.name!r}: {_describe(err)}") from None

    def pause(self, stream: str) -> None:
        if stream in self._streams:
            self._streams[stream].paused = True

    def resume(self, stream: str) -> None:
        if stream in self._streams:
            self._streams[stream].paused = False

    async def commit(self, positions: dict[str, int]) -> None:
        """XACK every entry read before each position (and what an earlier XACK failed to send)."""
        for name, position in positions.items():
            stream = self._streams.get(name)
            ids = stream.ackable(position) if stream is not None else []
            if ids:
                self._unacked.setdefault(name, []).extend(ids)
        client = self._client
        if client is None:
            return
        try:
            for name in list(self._unacked):
                await client.xack(name, self.config.group, *self._unacked[name])
                del self._unacked[name]
        except UNAVAILABLE as err:
            log.warning("redis source %s: XACK failed (%s); sent again after reconnecting", self.name,
                        _describe(err))

    async def close(self) -> None:
        await self._release_streams()
        await self._drop_client()

    # -- connecting --------------------------------------------------------------------------

    def _where(self) -> str:
        parts = urlsplit(self.config.address)
        return f"{parts.scheme}://{parts.hostname}:{parts.port or 6379}"

    def _new_client(self) -> aioredis.Redis:
        cfg = self.config
        options: dict[str, Any] = {"decode_responses": False, "socket_connect_timeout": 5,
                                   "socket_keepalive": True}
        if cfg.username:
            options["username"] = cfg.username
        if cfg.password_env or cfg.password_file:
            try:
                secret = load_secret(cfg.password_env, cfg.password_file)
            except SecretError as err:
                raise RedisSourceError(f"redis source {self.name!r}: {err}") from None
            if secret is None:
                where = (f"environment variable {cfg.password_env}" if cfg.password_env
                         else f"file {cfg.password_file}")
                raise RedisSourceError(f"redis source {self.name!r}: {where} is empty or unset")
            options["password"] = secret.reveal()
        if cfg.ca_file:
            options["ssl_ca_certs"] = cfg.ca_file
        client: aioredis.Redis = aioredis.Redis.from_url(cfg.address, **options)
        return client

    async def _ensure_group(self, client: aioredis.Redis, stream: str) -> None:
        start = "0" if self.config.start_from == "earliest" else "$"
        try:
            await client.xgroup_create(stream, self.config.group, id=start, mkstream=True)
            log.info("redis source %s: created group %s on %s at %s", self.name, self.config.group,
                     stream, start)
        except ResponseError as err:
            if "BUSYGROUP" not in str(err):
                raise

    async def _drop_client(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(Exception):
                await client.aclose()

    # -- reading -----------------------------------------------------------------------------

    async def _accept(self, client: aioredis.Redis, reply: Any, asked: dict[str, str]) -> list[Batch]:
        batches: list[Batch] = []
        answered: set[str] = set()
        for raw_name, entries in reply:
            stream = self._streams[_text(raw_name)]
            answered.add(stream.name)
            rereading = stream.next_id != ">"
            if rereading and entries:
                stream.next_id = _text(entries[-1][0])
            elif rereading:
                stream.next_id = ">"  # our pending entries are all read: new ones now
            batches += await self._batch(client, stream, entries)
        for name, next_id in asked.items():
            if next_id != ">" and name not in answered:
                self._streams[name].next_id = ">"
        return batches

    async def _batch(self, client: aioredis.Redis, stream: _Stream, entries: Any) -> list[Batch]:
        """A batch of the entries not read yet; deleted ones (XDEL/XTRIM while pending) are XACKed."""
        messages: list[Message] = []
        deleted: list[str] = []
        for raw_id, fields in entries:
            entry_id = _text(raw_id)
            if entry_id in stream.seen:
                continue  # claimed back or read again in this connection
            if not fields:
                deleted.append(entry_id)
                continue
            message = self._message(stream, entry_id, fields)
            stream.seen.add(entry_id)
            stream.read.append((entry_id, message.offset))
            messages.append(message)
        if deleted:
            await client.xack(stream.name, self.config.group, *deleted)
        if not messages:
            return []
        return [Batch(stream.name, messages, messages[-1].offset + 1)]

    def _message(self, stream: _Stream, entry_id: str, raw: dict[bytes, bytes]) -> Message:
        fields = {_text(k): v for k, v in raw.items()}
        attributes: dict[str, Any] = {"stream": stream.name, "offset": entry_id}
        for key, text in fields.items():
            attributes[f"field.{key}"] = text.decode("utf-8", "replace")
        value = fields.get(self.config.payload_field)
        data = value if value is not None else b""
        error, record = "", None
        if value is None:
            error = f"entry has no field {self.config.payload_field!r}"
        elif self.config.format == "centrifugo":
            record, error = read_publication(data, self._headers(fields))
        return Message(source=self.name, data=data, stream=stream.name, offset=entry_offset(entry_id),
                       attributes=attributes, record=record, error=error)

    def _headers(self, fields: dict[str, bytes]) -> dict[str, str]:
        """The entry's fields in the shape parse_publication reads (centrifugo-* and the method)."""
        headers = {k: v.decode("utf-8", "replace") for k, v in fields.items() if k.startswith(FIELD_PREFIX)}
        method = fields.get(self.config.method_field)
        if method is not None and "centrifugo-channels" not in headers:
            headers["centrifugo-method"] = method.decode("utf-8", "replace")
        return headers

    # -- chores: every third of visibility_timeout ----------------------------------------------

    async def _chores(self, client: aioredis.Redis) -> list[Batch]:
        """Keep our entries from being claimed, hold the stream locks, claim what dead consumers
        left, measure the group."""
        await self._refresh_held(client)
        if self.config.exclusive:
            await self._own_streams(client)
        batches: list[Batch] = []
        for stream in self._streams.values():
            if not self.config.exclusive and not stream.paused:
                batches += await self._claim(client, stream)
        await self._measure(client)
        return batches

    async def _claim(self, client: aioredis.Redis, stream: _Stream) -> list[Batch]:
        idle_ms = int(self.config.visibility_timeout * 1000)
        reply = await client.xautoclaim(stream.name, self.config.group, self.consumer, idle_ms,
                                        start_id="0-0", count=min(self.config.read_count, READ_MAX))
        batches = await self._batch(client, stream, reply[1])
        if batches:
            log.info("redis source %s: claimed %d entries of %s pending longer than visibility_timeout",
                     self.name, len(batches[0].messages), stream.name)
        return batches

    async def _refresh_held(self, client: aioredis.Redis) -> None:
        """Reset the idle time of entries still in flight here, so no other relay claims them."""
        for stream in self._streams.values():
            ids: list[Any] = [entry_id for entry_id, _ in stream.read]
            for at in range(0, len(ids), 1000):
                await client.xclaim(stream.name, self.config.group, self.consumer, 0, ids[at:at + 1000],
                                    justid=True)

    async def _measure(self, client: aioredis.Redis) -> None:
        pending: dict[str, int] = {}
        lag: dict[str, int] = {}
        for name in self._streams:
            for group in await client.xinfo_groups(name):
                if _text(group.get("name", b"")) == self.config.group:
                    pending[name] = int(group.get("pending") or 0)
                    if group.get("lag") is not None:
                        lag[name] = int(group["lag"])
        events.RedisGroupMeasured(pending, lag).emit()

    # -- one owner per stream (exclusive) ---------------------------------------------------------

    def _lock_key(self, stream: str) -> str:
        return f"{stream}:relay-owner:{self.config.group}"

    async def _own_streams(self, client: aioredis.Redis) -> None:
        """Renew the locks held; take the free ones, claiming what the last owner left pending."""
        ttl = int(self.config.visibility_timeout * 1000)
        for stream in self._streams.values():
            key = self._lock_key(stream.name)
            renewed = await client.eval(RENEW, 1, key, self.consumer, ttl)  # type: ignore[misc]
            if stream.owned and renewed:
                continue
            if stream.owned:
                stream.owned = False
                log.warning("redis source %s: lost stream %s to another relay (lock expired)", self.name,
                            stream.name)
            # Ours from before a restart (same consumer name), or free.
            if renewed or await client.set(key, self.consumer, nx=True, px=ttl):
                await self._take_over(client, stream)

    async def _take_over(self, client: aioredis.Redis, stream: _Stream) -> None:
        start, claimed = "0-0", 0
        while True:
            # (redis-py drops the cursor from a JUSTID reply, so the entries come along.)
            reply = await client.xautoclaim(stream.name, self.config.group, self.consumer, 0, start_id=start,
                                            count=1000)
            start = _text(reply[0])
            claimed += len(reply[1])
            if start == "0-0":
                break
        stream.owned = True
        stream.reset()  # read our pending entries, now in id order, first
        log.info("redis source %s: now the only reader of %s (claimed %d pending entries)", self.name,
                 stream.name, claimed)

    async def _release_streams(self) -> None:
        client = self._client
        if client is None or not self.config.exclusive:
            return
        for stream in self._streams.values():
            if stream.owned:
                with contextlib.suppress(*UNAVAILABLE):
                    await client.eval(RELEASE, 1, self._lock_key(stream.name), self.consumer)  # type: ignore[misc]
                stream.owned = False


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _describe(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def build(name: str, config: Config, state_dir: Path) -> RedisReader:
    return RedisReader(name, config)
