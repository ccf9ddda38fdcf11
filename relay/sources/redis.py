"""`type = "redis"`: entries of Redis Streams, read in a consumer group, XACKed once settled.

Every entry becomes a `Message` with `stream` = the stream's key and `offset` = its entry id
"MS-SEQ" as the integer MS * 10**20 + SEQ (ordered like the ids, stable across relays and restarts,
so idempotency keys from (stream, entry id) match whoever reads the entry again). Attributes for
routes: `stream`, `offset` (the entry id as Redis prints it), `field.NAME` for every field, and
`json.PATH` on the data.

Delivery: XREADGROUP reads each stream in id order. An entry is XACKed only when it and every entry
this relay read before it from that stream were settled (published or dead-lettered). After every
(re)connect the relay first reads its own pending entries again (id `0`: what it read before a crash
or a lost reply), then new ones (`>`). Entries that another consumer of the group left pending for
`visibility_timeout` are claimed with XAUTOCLAIM and delivered; the relay refreshes the idle time of
entries it still holds so that nobody claims those. A stream with `max_in_flight_per_stream`
unsettled entries is not read until half of them settled.

`exclusive = true`: a relay reads a stream only while it holds the key `<stream>:relay-owner:<group>`
(SET NX with a TTL of `visibility_timeout`, renewed every third of it, deleted at close). A relay
that takes over a stream first claims every entry still pending in the group (the last owner's) and
reads them in id order, then new ones: strict order per stream even with several relays.

`format = "centrifugo"` reads what Centrifugo's `redis_stream` consumer reads: field `payload`
holding `{"method": ..., "payload": {...}}`; or field `method` beside a bare request in `payload`;
or publication data mode: `payload` is the data and the fields `centrifugo-channels`, ... carry the
rest (see relay/sources/kafka.py `parse_centrifugo`). `format = "data"`: field `payload` is the data.
An entry without the field, or one Centrifugo could not take, goes to the dead letter file (and is
XACKed).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections import OrderedDict
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
from relay.message import Message
from relay.secrets import SecretError, load_secret
from relay.sources import Emit
from relay.sources.kafka import parse_centrifugo
from relay.units import Duration

log = logging.getLogger("relay.sources.redis")

FIELDS = ("stream", "offset", "field.*", "json.*")

# Entry id "MS-SEQ" → MS * ID_BASE + SEQ: SEQ is a 64-bit counter, under 10**20.
ID_BASE = 10**20
FIELD_PREFIX = "centrifugo-"
# Errors after which the connection is made again (with backoff); the entries keep their places.
UNAVAILABLE = (ConnectionError, TimeoutError, OSError)
FATAL = (AuthenticationError, AuthorizationError, NoPermissionError)
MAX_BACKOFF = 2.0
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


class GroupGone(RuntimeError):
    """The stream or its group was deleted while the relay read it; reconnecting creates them again."""


def entry_offset(entry_id: str) -> int:
    """The integer offset of an entry id "MS-SEQ" (ordered like the ids)."""
    ms, _, seq = entry_id.partition("-")
    return int(ms) * ID_BASE + int(seq or 0)


class _Stream:
    """One stream: entries read and not yet XACKed, in read order, each marked once settled."""

    __slots__ = ("held", "name", "next_id", "owned", "settled")

    def __init__(self, name: str, owned: bool) -> None:
        self.name = name
        self.owned = owned  # always True unless `exclusive`: then while this relay holds the lock
        self.held: OrderedDict[str, bool] = OrderedDict()  # entry id -> settled
        self.settled = 0
        self.next_id = "0"  # "0..." while re-reading our own pending entries, then ">"

    def ackable(self) -> list[str]:
        """Pop the settled prefix: the ids that may be XACKed now."""
        out: list[str] = []
        while self.held:
            entry_id, done = next(iter(self.held.items()))
            if not done:
                break
            self.held.popitem(last=False)
            out.append(entry_id)
        self.settled -= len(out)
        return out


class RedisSource:
    """Reads streams in a consumer group; see the module docstring for the delivery rules."""

    def __init__(self, name: str, config: Config) -> None:
        self.name = name
        self.config = config
        self.consumer = config.consumer or socket.gethostname()
        self._streams = {s: _Stream(s, not config.exclusive) for s in config.streams}
        self._client: aioredis.Redis | None = None
        self._stopping = asyncio.Event()
        self._room = asyncio.Event()  # set when a stream went below its resume mark
        self._unacked: dict[str, list[str]] = {}  # settled and popped, XACK not yet confirmed
        self._commit_lock = asyncio.Lock()
        self._cap = config.max_in_flight_per_stream
        self._resume_low = max(1, self._cap // 2)

    # -- public ------------------------------------------------------------------------------

    async def run(self, emit: Emit) -> None:
        helpers = [asyncio.create_task(self._commit_loop(), name=f"redis-{self.name}-commit"),
                   asyncio.create_task(self._claim_loop(emit), name=f"redis-{self.name}-claim")]
        delay = 0.1
        try:
            while not self._stopping.is_set():
                try:
                    await self._connect()
                    delay = 0.1
                    await self._read_loop(emit)
                except (*UNAVAILABLE, GroupGone) as err:
                    if self._stopping.is_set():
                        break
                    log.warning("redis source %s: %s unreachable (%s); reconnecting in %.1fs", self.name,
                                self._where(), _describe(err), delay)
                    await self._drop_client()
                    with contextlib.suppress(TimeoutError, asyncio.TimeoutError):
                        await asyncio.wait_for(self._stopping.wait(), delay)
                    delay = min(delay * 2, MAX_BACKOFF)
                for task in helpers:
                    if task.done():
                        task.result()
        finally:
            for task in helpers:
                task.cancel()
            await asyncio.gather(*helpers, return_exceptions=True)

    async def stop(self) -> None:
        self._stopping.set()
        self._room.set()

    async def close(self) -> None:
        try:
            await self._commit()
        except UNAVAILABLE as err:
            log.warning("redis source %s: final XACK failed (%s); those entries are read again",
                        self.name, _describe(err))
        finally:
            await self._release_streams()
            await self._drop_client()

    def in_flight(self) -> dict[str, int]:
        """Entries read and not yet XACKed, per stream."""
        return {name: len(s.held) for name, s in self._streams.items()}

    # -- connecting --------------------------------------------------------------------------

    def _where(self) -> str:
        parts = urlsplit(self.config.address)
        return f"{parts.scheme}://{parts.hostname}:{parts.port or 6379}"

    def _new_client(self) -> aioredis.Redis:
        cfg = self.config
        options: dict[str, Any] = {"decode_responses": False, "socket_connect_timeout": 5,
                                   "socket_keepalive": True, "health_check_interval": 0}
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

    async def _connect(self) -> None:
        """A client that answered, with the group on every stream; our pending entries are read first."""
        await self._drop_client()
        client = self._new_client()
        self._client = client
        try:
            await client.execute_command("PING")  # type: ignore[no-untyped-call]
            for stream in self._streams.values():
                await self._ensure_group(client, stream.name)
                stream.next_id = "0"
            if self.config.exclusive:
                await self._own_streams(client)
        except FATAL as err:
            raise RedisSourceError(f"redis source {self.name!r}: {self._where()} refused us "
                                   f"({_describe(err)}); check username and the password") from None
        except ResponseError as err:
            raise RedisSourceError(f"redis source {self.name!r}: {_describe(err)}") from None
        log.info("redis source %s: connected to %s, group %s, consumer %s", self.name, self._where(),
                 self.config.group, self.consumer)

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

    async def _read_loop(self, emit: Emit) -> None:
        client = self._client
        assert client is not None
        while not self._stopping.is_set():
            ids = {s.name: s.next_id for s in self._streams.values()
                   if s.owned and len(s.held) < self._cap}
            if not ids:
                self._room.clear()
                with contextlib.suppress(TimeoutError, asyncio.TimeoutError):
                    await asyncio.wait_for(self._room.wait(), self.config.block)
                continue
            # Re-reading pending entries answers at once; only new reads block.
            block = None if all(i == ">" for i in ids.values()) else 0
            try:
                reply = await client.xreadgroup(
                    self.config.group, self.consumer, ids,  # type: ignore[arg-type]
                    count=self.config.read_count,
                    block=int(self.config.block * 1000) if block is None else None)
            except ResponseError as err:
                if "NOGROUP" in str(err):  # stream or group deleted under us: create them again
                    raise GroupGone(str(err)) from None
                raise RedisSourceError(f"redis source {self.name!r}: {_describe(err)}") from None
            batch = self._accept(reply or [], ids)
            if batch:
                await emit(batch)

    def _accept(self, reply: Any, asked: dict[str, str]) -> list[Message]:
        batch: list[Message] = []
        answered: set[str] = set()
        for raw_name, entries in reply:
            stream = self._streams[_text(raw_name)]
            answered.add(stream.name)
            rereading = stream.next_id != ">"
            for raw_id, fields in entries:
                entry_id = _text(raw_id)
                if rereading:
                    stream.next_id = entry_id
                batch.extend(self._take(stream, entry_id, fields))
            if rereading and not entries:
                stream.next_id = ">"  # our pending entries are all read: new ones now
        for name, next_id in asked.items():
            if next_id != ">" and name not in answered:
                self._streams[name].next_id = ">"
        return batch

    def _take(self, stream: _Stream, entry_id: str, fields: Any) -> list[Message]:
        """The message of an entry not held yet (a deleted entry is settled at once)."""
        if entry_id in stream.held:
            return []  # already in flight here (read again after a reconnect, or claimed back)
        stream.held[entry_id] = False
        if not fields:  # deleted (XDEL/XTRIM) while pending: nothing to deliver
            stream.held[entry_id] = True
            stream.settled += 1
            return []
        return [self._message(stream, entry_id, fields)]

    def _message(self, stream: _Stream, entry_id: str, raw: dict[bytes, bytes]) -> Message:
        fields = {_text(k): v for k, v in raw.items()}
        attributes: dict[str, Any] = {"stream": stream.name, "offset": entry_id}
        for key, text in fields.items():
            attributes[f"field.{key}"] = text.decode("utf-8", "replace")
        value = fields.get(self.config.payload_field)
        data = value if value is not None else b""
        if value is None:
            attributes["error"] = f"entry has no field {self.config.payload_field!r}"
        elif self.config.format == "centrifugo":
            try:
                attributes["centrifugo"] = parse_centrifugo(data, self._headers(fields))
            except ValueError as err:
                attributes["error"] = str(err)
        return Message(source=self.name, data=data, stream=stream.name, offset=entry_offset(entry_id),
                       attributes=attributes, on_settled=self._on_settled(stream, entry_id))

    def _headers(self, fields: dict[str, bytes]) -> dict[str, str]:
        """The entry's fields in the shape parse_centrifugo reads (centrifugo-* and the method)."""
        headers = {k: v.decode("utf-8", "replace") for k, v in fields.items() if k.startswith(FIELD_PREFIX)}
        method = fields.get(self.config.method_field)
        if method is not None and "centrifugo-channels" not in headers:
            headers["centrifugo-method"] = method.decode("utf-8", "replace")
        return headers

    def _on_settled(self, stream: _Stream, entry_id: str) -> Any:
        def settle(_: Message) -> None:
            if stream.held.get(entry_id) is False:
                stream.held[entry_id] = True
                stream.settled += 1
        return settle

    # -- acknowledging -------------------------------------------------------------------------

    async def _commit_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.commit_interval)
            with contextlib.suppress(*UNAVAILABLE):  # the read loop reconnects; ids wait in _unacked
                await self._commit()

    async def _commit(self) -> None:
        """XACK the settled prefix of every stream (and what an earlier XACK failed to send)."""
        async with self._commit_lock:
            for stream in self._streams.values():
                ids = stream.ackable()
                if ids:
                    self._unacked.setdefault(stream.name, []).extend(ids)
                if len(stream.held) <= self._resume_low:
                    self._room.set()
            client = self._client
            if client is None:
                return
            for name in list(self._unacked):
                ids = self._unacked[name]
                await client.xack(name, self.config.group, *ids)
                del self._unacked[name]

    # -- claiming what dead consumers left -------------------------------------------------------

    async def _claim_loop(self, emit: Emit) -> None:
        interval = max(0.1, min(self.config.visibility_timeout / 3, 5.0))
        while True:
            await asyncio.sleep(interval)
            client = self._client
            if client is None or self._stopping.is_set():
                continue
            try:
                await self._refresh_held(client)
                if self.config.exclusive:
                    await self._own_streams(client)
                for stream in self._streams.values():
                    if not self.config.exclusive and len(stream.held) < self._cap:
                        batch = await self._claim(client, stream)
                        if batch:
                            await emit(batch)
                await self._measure(client)
            except UNAVAILABLE:
                continue  # the read loop reconnects
            except ResponseError as err:
                log.warning("redis source %s: claiming failed: %s", self.name, _describe(err))

    async def _claim(self, client: aioredis.Redis, stream: _Stream) -> list[Message]:
        idle_ms = int(self.config.visibility_timeout * 1000)
        batch: list[Message] = []
        start = "0-0"
        while True:
            reply = await client.xautoclaim(stream.name, self.config.group, self.consumer, idle_ms,
                                            start_id=start, count=self.config.read_count)
            start, entries = _text(reply[0]), reply[1]
            for raw_id, fields in entries:
                batch.extend(self._take(stream, _text(raw_id), fields))
            if start == "0-0" or len(stream.held) >= self._cap:
                break
        if batch:
            log.info("redis source %s: claimed %d entries of %s left pending by another consumer",
                     self.name, len(batch), stream.name)
        return batch

    async def _refresh_held(self, client: aioredis.Redis) -> None:
        """Reset the idle time of entries still in flight here, so no other relay claims them."""
        for stream in self._streams.values():
            ids: list[Any] = [i for i, done in stream.held.items() if not done]
            for at in range(0, len(ids), 1000):
                await client.xclaim(stream.name, self.config.group, self.consumer, 0, ids[at:at + 1000],
                                    justid=True)

    # -- one owner per stream (exclusive) ---------------------------------------------------------

    def _lock_key(self, stream: str) -> str:
        return f"{stream}:relay-owner:{self.config.group}"

    async def _own_streams(self, client: aioredis.Redis) -> None:
        """Renew the locks held; take the free ones, claiming what the last owner left pending."""
        ttl = int(self.config.visibility_timeout * 1000)
        for stream in self._streams.values():
            key = self._lock_key(stream.name)
            if stream.owned:
                if await client.eval(RENEW, 1, key, self.consumer, ttl):  # type: ignore[misc]
                    continue
                stream.owned = False
                log.warning("redis source %s: lost stream %s to another relay (lock expired)", self.name,
                            stream.name)
            # Ours from before a restart (same consumer name), or free.
            mine = await client.eval(RENEW, 1, key, self.consumer, ttl)  # type: ignore[misc]
            if mine or await client.set(key, self.consumer, nx=True, px=ttl):
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
        stream.owned, stream.next_id = True, "0"  # read our pending entries, now in id order, first
        self._room.set()
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


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _describe(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def build(name: str, config: Config, state_dir: Path) -> RedisSource:
    return RedisSource(name, config)
