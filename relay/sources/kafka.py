"""`type = "kafka"`: records of Kafka topics, consumed in a consumer group, committed at least once.

Every record becomes a `Message` with `stream = "<topic>/<partition>"`, `offset` = the record's
offset, `key` (UTF-8, undecodable bytes replaced), `headers` (values as UTF-8 text) and the
attributes `topic`, `partition`, `offset` and `timestamp` (milliseconds since the epoch) for routes.

Delivery: a partition's records are emitted in order. An offset is committed only when it and every
earlier offset of its partition were settled (published or dead-lettered), periodically, on
partition revoke and on close. Partitions this relay no longer owns are never committed, and acks
that arrive for them late are ignored (the new owner reads them again). A partition with
`max_in_flight_per_partition` unsettled records is paused (what its last poll read beyond that, at
most 500 records, waits in memory); it resumes when half of them settled.
The poll loop never waits on the pipeline (emitting runs in its own task), so a long sink outage
does not make the consumer miss its poll deadline and leave the group.

`format = "centrifugo"`: records written for Centrifugo's own Kafka consumer. Either a command,
`{"method": "publish"|"broadcast", "payload": {...}}` (the payload may also be a JSON string, and a
`centrifugo-method` header may name the method, the value then being the payload), or, when the
record has a `centrifugo-channels` header, publication data: the value is the data and the headers
`centrifugo-channels` (comma-separated), `centrifugo-idempotency-key`, `centrifugo-delta`,
`centrifugo-version`, `centrifugo-version-epoch` and `centrifugo-tag-<name>` carry the rest.
The parsed intent is put in `Message.attributes["centrifugo"]`:

    {"method": "publish" | "broadcast", "channels": [str, ...], "data": bytes,
     "idempotency_key": str, "tags": {str: str}, "skip_history": bool, "delta": bool,
     "version": int, "version_epoch": str}

`data` is the payload's `data` as compact JSON text, or its `b64data` decoded. A record that cannot be
understood (bad JSON, a method other than publish or broadcast, a bad header value) gets instead
`Message.attributes["error"]` = the reason, and goes to the dead letter file. `Message.data` is always
the record's value as it was read.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import math
import re
import ssl
import time
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import orjson
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.conn import create_conn
from aiokafka.errors import (
    AuthenticationFailedError,
    IllegalStateError,
    KafkaError,
    SaslAuthenticationFailed,
    UnsupportedSaslMechanismError,
)
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from relay import events
from relay.acks import ContiguousTracker
from relay.addresses import parse_host_port
from relay.message import Message
from relay.secrets import SecretError, load_secret
from relay.sources import Emit
from relay.units import Duration

log = logging.getLogger("relay.sources.kafka")

# Most records handed to the pipeline in one emit call.
EMIT_BATCH = 1000
# How long one poll waits for records; also how soon `stop()` is noticed.
POLL_TIMEOUT_MS = 100
# Most records one poll returns; a paused partition holds at most this many beyond its cap.
POLL_RECORDS = 500
# After stop(), how long an emit under way may take before it is cancelled.
STOP_GRACE = 2.0
HEADER_PREFIX = "centrifugo-"
SUPPORTED_METHODS = ("publish", "broadcast")


class SaslConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = Field(
        "PLAIN", description="SASL mechanism: PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512.")
    username: str = Field("", description="SASL user name.")
    password_env: str = Field("", description="Environment variable holding the SASL password.")
    password_file: str = Field("", description="File holding the SASL password.")


class TlsConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    ca_file: str = Field(default="", description="CA bundle (PEM) that signed the brokers' certificates; "
                                         "empty = the system's trust store.")
    cert_file: str = Field(default="", description="Client certificate (PEM), for brokers that demand one.")
    key_file: str = Field(default="", description="Private key (PEM) of the client certificate.")


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["kafka"]
    brokers: list[str] = Field(min_length=1, description='Bootstrap brokers, "host:port".')
    topics: list[str] = Field(default_factory=list, description="Topics to consume.")
    topics_pattern: str = Field("", description="A regular expression of topics to consume, instead of "
                                                "topics (new matching topics are picked up).")
    group_id: str = Field("centrifugo-relay", min_length=1,
                          description="Consumer group; relays with the same group share the partitions.")
    client_id: str = Field("centrifugo-relay", description="Client id the brokers see (logs, quotas).")
    start_from: Literal["earliest", "latest"] = Field(
        "earliest", description="Where a partition starts when the group has no committed offset.")
    format: Literal["data", "centrifugo"] = Field(
        "data", description="data: the value is the publication data, routes decide the channels; "
                            "centrifugo: Centrifugo's own consumer format (method/payload JSON, or "
                            "centrifugo-* headers).")
    max_in_flight_per_partition: int = Field(
        5000, ge=1, description="Unsettled records per partition before it is paused (resumed at half).")
    commit_interval: Duration = Field(1.0, description="How often settled offsets are committed.")
    session_timeout: Duration = Field(10.0, description="The group drops a relay silent this long.")
    heartbeat_interval: Duration = Field(3.0, description="Heartbeats to the group coordinator.")
    connect_timeout: Duration = Field(30.0, description="How long to keep trying the brokers at start.")
    fetch_max_wait: Duration = Field(
        0.1, description="How long a broker may hold a fetch while it has nothing new. The client sends "
                         "one fetch per broker at a time, so this is also how late a resumed partition "
                         "can be fetched again.")
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        "PLAINTEXT", description="PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL.")
    sasl: SaslConfig | None = Field(None, description="SASL credentials (with SASL_PLAINTEXT or SASL_SSL).")
    tls: TlsConfig = Field(TlsConfig(), description="TLS files (with SSL or SASL_SSL).")

    @field_validator("brokers")
    @classmethod
    def _brokers(cls, value: list[str]) -> list[str]:
        for broker in value:
            parse_host_port(broker)
        return value

    @field_validator("topics_pattern")
    @classmethod
    def _pattern(cls, value: str) -> str:
        if value:
            try:
                re.compile(value)
            except re.error as err:
                raise ValueError(f"topics_pattern is not a regular expression: {err}") from None
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Config:
        if bool(self.topics) == bool(self.topics_pattern):
            raise ValueError("set exactly one of topics or topics_pattern")
        if self.commit_interval <= 0:
            raise ValueError("commit_interval must be more than 0s")
        if not 0 < self.heartbeat_interval < self.session_timeout:
            raise ValueError("heartbeat_interval must be more than 0s and less than session_timeout")
        sasl_protocol = self.security_protocol.startswith("SASL_")
        if sasl_protocol:
            if self.sasl is None or not self.sasl.username:
                raise ValueError(f"security_protocol {self.security_protocol} needs sasl.username")
            if not (self.sasl.password_env or self.sasl.password_file):
                raise ValueError("sasl needs password_env or password_file (never a password in the file)")
        elif self.sasl is not None:
            raise ValueError(f"sasl is set but security_protocol is {self.security_protocol} "
                             "(use SASL_PLAINTEXT or SASL_SSL)")
        if bool(self.tls.cert_file) != bool(self.tls.key_file):
            raise ValueError("tls.cert_file and tls.key_file go together")
        if not self.security_protocol.endswith("SSL") and (self.tls.ca_file or self.tls.cert_file):
            raise ValueError(f"tls files are set but security_protocol is {self.security_protocol} "
                             "(use SSL or SASL_SSL)")
        return self


class KafkaSourceError(RuntimeError):
    """The source cannot run: brokers unreachable, credentials refused, a secret missing."""


# -- Centrifugo's consumer format -----------------------------------------------------------------

_TRUE = {"1", "t", "T", "TRUE", "true", "True"}
_FALSE = {"0", "f", "F", "FALSE", "false", "False"}


def _parse_bool(name: str, value: str) -> bool:
    # Go's strconv.ParseBool, which Centrifugo uses for centrifugo-delta.
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"header {name}: {value!r} is not a boolean")


# orjson reads integers past 64 bits as floats; values with such digit runs go the exact, slow way.
_LONG_NUMBER = re.compile(rb"\d{19}")


def _load_json(value: bytes | str) -> Any:
    """JSON, fast where that is exact: orjson, else the standard library (big integers, 1e400,
    lone surrogate escapes, and the error messages)."""
    raw = value.encode() if isinstance(value, str) else value
    if not _LONG_NUMBER.search(raw):
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError:
            pass
    return json.loads(raw, parse_float=_finite_float, parse_constant=_no_constant)


def _finite_float(text: str) -> float:
    number = float(text)
    if math.isinf(number):
        raise ValueError(f"number {text[:40]} is too large for JSON readers")
    return number


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _compact_json(value: Any) -> bytes:
    try:
        return orjson.dumps(value)
    except TypeError:  # an integer past 64 bits, read exactly by the standard library
        return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()


def _from_headers(value: bytes, headers: dict[str, str]) -> dict[str, Any]:
    channels = [c.strip() for c in headers.get("centrifugo-channels", "").split(",") if c.strip()]
    if not channels:
        raise ValueError("header centrifugo-channels names no channel")
    delta = headers.get("centrifugo-delta", "")
    version = headers.get("centrifugo-version", "")
    if version and not version.isdigit():
        raise ValueError(f"header centrifugo-version: {version!r} is not an unsigned integer")
    tag_prefix = HEADER_PREFIX + "tag-"
    return {
        "method": "publish" if len(channels) == 1 else "broadcast",
        "channels": channels,
        "data": value,
        "idempotency_key": headers.get("centrifugo-idempotency-key", ""),
        "tags": {k[len(tag_prefix):]: v for k, v in headers.items() if k.startswith(tag_prefix)},
        "skip_history": False,
        "delta": _parse_bool("centrifugo-delta", delta) if delta else False,
        "version": int(version) if version else 0,
        "version_epoch": headers.get("centrifugo-version-epoch", ""),
    }


def _from_command(method: str, payload: Any) -> dict[str, Any]:
    if not method:
        raise ValueError("Centrifugo command has no method")
    if method not in SUPPORTED_METHODS:
        raise ValueError(f"Centrifugo method {method!r} is not supported (only publish and broadcast)")
    if isinstance(payload, str):  # Centrifugo also takes the payload as a JSON string (Debezium JSONB).
        try:
            payload = _load_json(payload)
        except ValueError as err:
            raise ValueError(f"{method} payload string is not JSON: {err}") from None
    if not isinstance(payload, dict):
        raise ValueError(f"{method} payload is not a JSON object")
    if method == "publish":
        channel = payload.get("channel")
        if not isinstance(channel, str) or not channel:
            raise ValueError("publish payload has no channel")
        channels = [channel]
    else:
        listed = payload.get("channels")
        if not isinstance(listed, list) or not listed or not all(isinstance(c, str) for c in listed):
            raise ValueError("broadcast payload has no channels list")
        channels = list(listed)
    b64 = payload.get("b64data")
    if b64:
        try:
            data = base64.b64decode(str(b64), validate=True)
        except (binascii.Error, ValueError):
            raise ValueError(f"{method} payload b64data is not base64") from None
    elif "data" in payload:
        data = _compact_json(payload["data"])
    else:
        raise ValueError(f"{method} payload has no data")
    tags = payload.get("tags") or {}
    if not isinstance(tags, dict) or not all(isinstance(v, str) for v in tags.values()):
        raise ValueError(f"{method} payload tags must map names to strings")
    version = payload.get("version") or 0
    if not isinstance(version, int) or isinstance(version, bool) or version < 0:
        raise ValueError(f"{method} payload version must be an unsigned integer")
    return {
        "method": method,
        "channels": channels,
        "data": data,
        "idempotency_key": str(payload.get("idempotency_key") or ""),
        "tags": dict(tags),
        "skip_history": bool(payload.get("skip_history", False)),
        "delta": bool(payload.get("delta", False)),
        "version": version,
        "version_epoch": str(payload.get("version_epoch") or ""),
    }


def parse_centrifugo(value: bytes, headers: dict[str, str]) -> dict[str, Any]:
    """The publication a record in Centrifugo's consumer format asks for; ValueError says why not."""
    try:
        return _parse_centrifugo(value, headers)
    except RecursionError:  # JSON nested deeper than Python's stack: a bad record, not a crash
        raise ValueError("Centrifugo command is nested too deeply") from None


def _parse_centrifugo(value: bytes, headers: dict[str, str]) -> dict[str, Any]:
    if "centrifugo-channels" in headers:
        return _from_headers(value, headers)
    method = headers.get("centrifugo-method", "")
    try:
        doc = _load_json(value)
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"Centrifugo command is not JSON: {err}") from None
    if method:
        return _from_command(method, doc)
    if not isinstance(doc, dict):
        raise ValueError('Centrifugo command is not a {"method": ..., "payload": ...} object')
    return _from_command(str(doc.get("method") or ""), doc.get("payload"))


# -- the source ----------------------------------------------------------------------------------


class _Partition:
    """One partition while this relay owns it; acks for an older ownership are ignored."""

    __slots__ = ("committed", "first_offset", "held", "owner", "paused", "revoked", "stream", "tp")

    def __init__(self, owner: KafkaSource, tp: TopicPartition) -> None:
        self.owner = owner
        self.tp = tp
        self.stream = f"{tp.topic}/{tp.partition}"
        self.paused = False
        self.revoked = False
        self.committed: int | None = None
        self.first_offset: int | None = None
        self.held: list[Any] = []  # read, not yet emitted: over the cap (at most one poll's worth)

    def ack(self, message: Message) -> None:
        if not self.revoked:
            self.owner._settled(self, message.offset + 1)


class KafkaSource:
    """Consumes topics in a consumer group; see the module docstring for the delivery rules."""

    def __init__(self, name: str, config: Config) -> None:
        self.name = name
        self.config = config
        self._tracker = ContiguousTracker()
        self._partitions: dict[TopicPartition, _Partition] = {}
        self._queue: deque[tuple[_Partition, list[Message]]] = deque()
        self._queued = asyncio.Event()
        self._stopping = asyncio.Event()
        self._commit_lock = asyncio.Lock()
        self._consumer: AIOKafkaConsumer | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._cap = config.max_in_flight_per_partition
        self._resume_low = max(1, self._cap // 2)

    # -- public ------------------------------------------------------------------------------

    async def run(self, emit: Emit) -> None:
        self._consumer = await self._connect()
        self._tasks = [asyncio.create_task(self._emit_loop(emit), name=f"kafka-{self.name}-emit"),
                       asyncio.create_task(self._commit_loop(), name=f"kafka-{self.name}-commit")]
        try:
            while not self._stopping.is_set():
                try:
                    batches = await self._consumer.getmany(timeout_ms=POLL_TIMEOUT_MS,
                                                           max_records=POLL_RECORDS)
                except KafkaError as err:  # fatal for the client: authorization, a fenced member ...
                    raise KafkaSourceError(f"kafka source {self.name!r}: {_describe(err)}") from err
                for tp, records in batches.items():
                    self._accept(tp, records)
                for task in self._tasks:
                    if task.done():
                        task.result()  # a failed helper task fails the source
        finally:
            # An emit under way may finish (a batch cut in half would leave the pipeline waiting
            # for messages it never got); one that the sink blocks is cancelled after the grace.
            self._queued.set()
            await asyncio.wait(self._tasks[:1], timeout=STOP_GRACE)
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            self._tasks = []

    async def stop(self) -> None:
        self._stopping.set()

    async def close(self) -> None:
        consumer = self._consumer
        if consumer is None:
            return
        try:
            await self._commit(list(self._partitions.values()))
        finally:
            self._consumer = None
            await consumer.stop()

    def lag(self) -> dict[tuple[str, int], int]:
        """Per owned partition: high watermark minus the committed (or first read) offset."""
        out: dict[tuple[str, int], int] = {}
        if self._consumer is None:
            return out
        for tp, part in self._partitions.items():
            high = self._consumer.highwater(tp)
            base = part.committed if part.committed is not None else part.first_offset
            if high is not None and base is not None:
                out[(tp.topic, tp.partition)] = max(0, high - base)
        return out

    def assigned(self) -> list[str]:
        """The partition streams ("topic/partition") this relay owns now."""
        return sorted(p.stream for p in self._partitions.values())

    def in_flight(self) -> dict[str, int]:
        """Unsettled (or not yet committable) records per owned partition stream."""
        return {p.stream: self._tracker.in_flight(p.stream) for p in self._partitions.values()}

    # -- connecting --------------------------------------------------------------------------

    def _client_options(self) -> dict[str, Any]:
        cfg = self.config
        options: dict[str, Any] = {"bootstrap_servers": cfg.brokers, "client_id": cfg.client_id,
                                   "security_protocol": cfg.security_protocol}
        if cfg.security_protocol.endswith("SSL"):
            context = ssl.create_default_context(cafile=cfg.tls.ca_file or None)
            if cfg.tls.cert_file:
                context.load_cert_chain(cfg.tls.cert_file, cfg.tls.key_file)
            options["ssl_context"] = context
        if cfg.sasl is not None:
            try:
                password = load_secret(cfg.sasl.password_env, cfg.sasl.password_file)
            except SecretError as err:
                raise KafkaSourceError(f"kafka source {self.name!r}: sasl: {err}") from None
            if password is None:
                where = (f"environment variable {cfg.sasl.password_env}" if cfg.sasl.password_env
                         else f"file {cfg.sasl.password_file}")
                raise KafkaSourceError(f"kafka source {self.name!r}: sasl: {where} is empty or unset")
            options.update(sasl_mechanism=cfg.sasl.mechanism, sasl_plain_username=cfg.sasl.username,
                           sasl_plain_password=password.reveal())
        return options

    def _new_consumer(self) -> AIOKafkaConsumer:
        cfg = self.config
        consumer = AIOKafkaConsumer(
            group_id=cfg.group_id, enable_auto_commit=False, auto_offset_reset=cfg.start_from,
            session_timeout_ms=int(cfg.session_timeout * 1000),
            heartbeat_interval_ms=int(cfg.heartbeat_interval * 1000),
            fetch_max_wait_ms=int(cfg.fetch_max_wait * 1000),
            **self._client_options())
        listener = _Rebalance(self)
        if cfg.topics_pattern:
            consumer.subscribe(pattern=cfg.topics_pattern, listener=listener)
        else:
            consumer.subscribe(topics=list(cfg.topics), listener=listener)
        return consumer

    async def _connect(self) -> AIOKafkaConsumer:
        """A started consumer; retries until `connect_timeout`, then a clear KafkaSourceError."""
        deadline = time.monotonic() + self.config.connect_timeout
        delay = 0.1
        while True:
            consumer = self._new_consumer()
            try:
                await consumer.start()
                log.info("kafka source %s: connected to %s, group %s", self.name,
                         ",".join(self.config.brokers), self.config.group_id)
                return consumer
            except (KafkaError, OSError) as err:
                await consumer.stop()
                why = _describe(err)
                refused = await self._refused()
                if refused:
                    brokers = ", ".join(self.config.brokers)
                    raise KafkaSourceError(f"kafka source {self.name!r}: cannot connect to brokers {brokers} "
                                           f"({self.config.security_protocol}): {refused}") from None
                if time.monotonic() + delay > deadline or self._stopping.is_set():
                    raise KafkaSourceError(
                        f"kafka source {self.name!r}: cannot connect to brokers "
                        f"{', '.join(self.config.brokers)} ({self.config.security_protocol}) within "
                        f"{self.config.connect_timeout:g}s: {why}") from None
                log.warning("kafka source %s: brokers not reachable yet (%s); retrying", self.name, why)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    async def _refused(self) -> str | None:
        """Why the first broker refuses this client for good (credentials, TLS trust), or None.

        aiokafka only logs such a reason and raises "Unable to bootstrap"; one direct connection
        hears it. Waiting does not fix a wrong password, so the source fails at once, naming the
        mechanism and the user (never the password)."""
        cfg = self.config
        first = parse_host_port(cfg.brokers[0])
        options = self._client_options()
        try:
            conn = await asyncio.wait_for(create_conn(
                first.host, first.port, client_id=cfg.client_id, request_timeout_ms=10_000,
                ssl_context=options.get("ssl_context"), security_protocol=cfg.security_protocol,
                sasl_mechanism=options.get("sasl_mechanism"),
                sasl_plain_username=options.get("sasl_plain_username"),
                sasl_plain_password=options.get("sasl_plain_password")), timeout=15)
        except (SaslAuthenticationFailed, AuthenticationFailedError) as err:
            assert cfg.sasl is not None
            said = getattr(err, "args", ()) and str(err.args[0])
            where = (f"${cfg.sasl.password_env}" if cfg.sasl.password_env else cfg.sasl.password_file)
            return (f"SASL {cfg.sasl.mechanism} authentication as user {cfg.sasl.username!r} failed"
                    f"{f' ({said})' if said else ''}; check sasl.username and the password in {where}")
        except UnsupportedSaslMechanismError:
            assert cfg.sasl is not None
            return f"the broker does not offer SASL mechanism {cfg.sasl.mechanism}"
        except ssl.SSLCertVerificationError as err:
            return f"the broker's certificate is not trusted ({err.verify_message}); check tls.ca_file"
        except ssl.SSLError as err:
            return f"TLS handshake failed ({err.reason or err}); check tls.cert_file and tls.key_file"
        except (KafkaError, OSError, TimeoutError):
            return None  # not reachable, or not for good: the caller retries
        conn.close()
        return None

    # -- reading -----------------------------------------------------------------------------

    def _accept(self, tp: TopicPartition, records: Sequence[Any]) -> None:
        part = self._partitions.get(tp)
        if part is None or not records or self._consumer is None:
            return  # not ours (any more): the owner reads them
        if part.first_offset is None:
            part.first_offset = records[0].offset
        part.held.extend(records)
        self._release(part)
        if (part.held or self._tracker.in_flight(part.stream) >= self._cap) and not part.paused:
            self._consumer.pause(tp)
            part.paused = True

    def _release(self, part: _Partition) -> None:
        """Emit held records up to the cap. What is over it waits, already read, for acks: seeking
        back instead would make the client fetch and decode it again."""
        room = self._cap - self._tracker.in_flight(part.stream)
        if room <= 0 or not part.held:
            return
        take, part.held = part.held[:room], part.held[room:]
        messages = [self._message(part, record) for record in take]
        for record in take:
            self._tracker.emitted(part.stream, record.offset + 1)
        self._queue.append((part, messages))
        self._queued.set()

    def _message(self, part: _Partition, record: Any) -> Message:
        headers = {k: (v or b"").decode("utf-8", "replace") for k, v in (record.headers or ())}
        value: bytes = record.value or b""
        attributes: dict[str, Any] = {"topic": record.topic, "partition": record.partition,
                                      "offset": record.offset, "timestamp": record.timestamp}
        if self.config.format == "centrifugo":
            try:
                attributes["centrifugo"] = parse_centrifugo(value, headers)
            except ValueError as err:
                attributes["error"] = str(err)
        key = record.key.decode("utf-8", "replace") if record.key is not None else None
        return Message(source=self.name, data=value, stream=part.stream, offset=record.offset, key=key,
                       headers=headers, attributes=attributes, on_settled=part.ack)

    async def _emit_loop(self, emit: Emit) -> None:
        while True:
            await self._queued.wait()
            if self._stopping.is_set():
                return  # what is still queued was never emitted: it is read again after a restart
            batch: list[Message] = []
            while self._queue and len(batch) < EMIT_BATCH:
                part, messages = self._queue.popleft()
                if not part.revoked:
                    batch.extend(messages)
            if not self._queue:
                self._queued.clear()
            if batch:
                await emit(batch)

    # -- acknowledging and committing ----------------------------------------------------------

    def _settled(self, part: _Partition, next_offset: int) -> None:
        self._tracker.settled(part.stream, next_offset)
        if part.paused and self._tracker.in_flight(part.stream) <= self._resume_low:
            self._release(part)
            if not part.held and self._consumer is not None:
                part.paused = False
                self._consumer.resume(part.tp)

    async def _commit_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.commit_interval)
            await self._commit(list(self._partitions.values()))
            events.KafkaLagMeasured(self.lag()).emit()

    async def _commit(self, parts: list[_Partition]) -> None:
        """Commit the contiguous settled offset of each (still owned) partition that moved."""
        async with self._commit_lock:
            offsets: dict[TopicPartition, int] = {}
            for part in parts:
                position = self._tracker.committable(part.stream)
                if not part.revoked and position is not None and position != part.committed:
                    offsets[part.tp] = position
            if not offsets or self._consumer is None:
                return
            try:
                await self._consumer.commit(offsets)
            except (KafkaError, IllegalStateError) as err:
                log.warning("kafka source %s: commit failed (%s); the records will be read again "
                            "unless a later commit succeeds", self.name, _describe(err))
                return
            for part in parts:
                if part.tp in offsets:
                    part.committed = offsets[part.tp]

    # -- rebalancing -------------------------------------------------------------------------

    async def _revoked(self, revoked: set[TopicPartition]) -> None:
        parts = [self._partitions[tp] for tp in revoked if tp in self._partitions]
        await self._commit(parts)
        for part in parts:
            part.revoked = True
            self._tracker.forget(part.stream)
            del self._partitions[part.tp]
        events.KafkaLagMeasured({}, gone=[(p.tp.topic, p.tp.partition) for p in parts]).emit()
        if parts:
            self._queue = deque(item for item in self._queue if not item[0].revoked)
            log.info("kafka source %s: partitions revoked: %s", self.name,
                     ", ".join(sorted(p.stream for p in parts)))

    def _assigned(self, assigned: set[TopicPartition]) -> None:
        fresh = [tp for tp in assigned if tp not in self._partitions]
        for tp in fresh:
            part = _Partition(self, tp)
            self._tracker.forget(part.stream)
            self._partitions[tp] = part
        if fresh:
            log.info("kafka source %s: partitions assigned: %s", self.name,
                     ", ".join(sorted(f"{tp.topic}/{tp.partition}" for tp in fresh)))


def _describe(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    """Commits what was settled for revoked partitions, then forgets them."""

    def __init__(self, source: KafkaSource) -> None:
        self._source = source

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self._source._revoked(revoked)

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        self._source._assigned(assigned)


def build(name: str, config: Config, state_dir: Path) -> KafkaSource:
    return KafkaSource(name, config)
