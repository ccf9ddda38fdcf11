"""`type = "kafka"`: records of Kafka topics, consumed in a consumer group, committed at least once.

Every record becomes a `Message` with `stream = "<topic>/<partition>"`, `offset` = the record's
offset, `key` (UTF-8, undecodable bytes replaced), `headers` (values as UTF-8 text) and, with
`format = "data"`, the attributes `topic`, `partition`, `offset` and `timestamp` (milliseconds
since the epoch) for routes.

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
The parsed record (relay/centrifugo_records.py, `CentrifugoRecord`) is put in
`Message.record`. A record that cannot be understood (bad JSON, a method other than publish or
broadcast, a bad header value) gets instead `Message.error` = the reason, and goes to the dead
letter file. `Message.data` is always the record's value as read.

Caps, pausing, emission, commits and connect retries are the source engine's
(relay/sources/engine.py); this module says how to reach Kafka and what a record becomes. Records
are taken straight from the batches aiokafka fetched (fetched.py), not through `getmany()`.
"""

from __future__ import annotations

import asyncio
import logging
import re
import ssl
import time
from pathlib import Path
from typing import Any, Literal

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
from relay.addresses import parse_host_port
from relay.centrifugo_records import read_publication
from relay.message import NOTHING, Message
from relay.secrets import SecretError, load_secret
from relay.sources.engine import READ_MAX, Batch, Revoke, SourceFatal, SourceUnavailable
from relay.sources.kafka.fetched import FetchedRecords
from relay.units import Duration

log = logging.getLogger("relay.sources.kafka")

# The template fields and `when` keys of its messages.
FIELDS = ("key", "topic", "partition", "offset", "timestamp", "header.*", "json.*")
# How long one poll waits for records.
POLL_TIMEOUT_MS = 100


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
    # 10,000, not 5,000: a record is unsettled from its read until Centrifugo accepted its batch, and
    # at 140k records/s that is more than 5,000 of them, so one partition kept pausing
    # (ab of 5 turns, 200k records into Centrifugo: 107k → 120k records/s; 20,000: 119k).
    max_in_flight_per_partition: int = Field(
        10_000, ge=1, description="Unsettled records per partition before it is paused (resumed at half).")
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


class KafkaSourceError(SourceFatal):
    """The source cannot run: brokers unreachable, credentials refused, a secret missing."""


class BrokersUnreachable(SourceUnavailable):
    """No broker answered yet; after `connect_timeout` the engine gives up with `fatal()`."""

    def fatal(self, seconds: float) -> Exception:
        return KafkaSourceError(f"{self.args[0]} within {seconds:g}s: {self.args[1]}")

    def __str__(self) -> str:
        return str(self.args[1])


# -- the source ----------------------------------------------------------------------------------


class _Partition:
    """One partition while this relay owns it."""

    __slots__ = ("committed", "first_offset", "stream", "tp")

    def __init__(self, tp: TopicPartition) -> None:
        self.tp = tp
        self.stream = f"{tp.topic}/{tp.partition}"
        self.committed: int | None = None
        self.first_offset: int | None = None


class KafkaSource:
    """Reads topics in a consumer group (a reader for relay/sources/engine.py); see the module
    docstring for the delivery rules."""

    def __init__(self, name: str, config: Config) -> None:
        self.name = name
        self.config = config
        self.max_in_flight = config.max_in_flight_per_partition
        self.commit_interval = config.commit_interval
        self.connect_timeout = config.connect_timeout
        self._partitions: dict[TopicPartition, _Partition] = {}
        self._by_stream: dict[str, _Partition] = {}
        self._consumer: AIOKafkaConsumer | None = None
        self._fetched: FetchedRecords | None = None  # None: getmany() (an aiokafka this does not know)
        self._revoke: Revoke | None = None
        self._lag_at = 0.0

    # -- the reader contract -----------------------------------------------------------------

    def bind(self, revoke: Revoke) -> None:
        self._revoke = revoke

    async def connect(self) -> None:
        consumer = self._new_consumer()
        try:
            await consumer.start()
        except (KafkaError, OSError) as err:
            await consumer.stop()
            brokers = f"kafka source {self.name!r}: cannot connect to brokers {', '.join(self.config.brokers)} " \
                      f"({self.config.security_protocol})"
            refused = await self._refused()
            if refused:
                raise KafkaSourceError(f"{brokers}: {refused}") from None
            raise BrokersUnreachable(brokers, _describe(err)) from None
        self._consumer = consumer
        self._fetched = FetchedRecords(consumer) if FetchedRecords.usable(consumer) else None
        if self._fetched is None:
            log.warning("kafka source %s: this aiokafka's fetcher is not the one the relay reads "
                        "directly; reading through getmany() (slower)", self.name)
        log.info("kafka source %s: connected to %s, group %s", self.name, ",".join(self.config.brokers),
                 self.config.group_id)

    async def read(self) -> list[Batch]:
        assert self._consumer is not None
        try:
            if self._fetched is not None:
                polled = await self._fetched.take(POLL_TIMEOUT_MS / 1000, READ_MAX)
            else:
                polled = await self._consumer.getmany(timeout_ms=POLL_TIMEOUT_MS, max_records=READ_MAX)
        except KafkaError as err:  # fatal for the client: authorization, a fenced member ...
            raise KafkaSourceError(f"kafka source {self.name!r}: {_describe(err)}") from err
        batches = []
        for tp, records in polled.items():
            part = self._partitions.get(tp)
            if part is None or not records:
                continue  # not ours (any more): the owner reads them
            if part.first_offset is None:
                part.first_offset = records[0].offset
            batches.append(Batch(part.stream, self._messages(part, records), records[-1].offset + 1))
        now = time.monotonic()
        if now - self._lag_at >= self.commit_interval:
            self._lag_at = now
            events.KafkaLagMeasured(self.lag()).emit()
        return batches

    async def commit(self, positions: dict[str, int]) -> None:
        """Commit offsets of partitions still owned; raises when the group refused them."""
        if self._consumer is None:
            return
        parts = [self._by_stream[s] for s in positions if s in self._by_stream]
        offsets = {p.tp: positions[p.stream] for p in parts}
        if not offsets:
            return
        try:
            await self._consumer.commit(offsets)
        except (KafkaError, IllegalStateError) as err:
            raise KafkaSourceError(f"kafka source {self.name!r}: commit failed ({_describe(err)}); the "
                                   "records will be read again unless a later commit succeeds") from None
        for part in parts:
            part.committed = offsets[part.tp]

    def pause(self, stream: str) -> None:
        part = self._by_stream.get(stream)
        if part is not None and self._consumer is not None:
            self._consumer.pause(part.tp)

    def resume(self, stream: str) -> None:
        part = self._by_stream.get(stream)
        if part is not None and self._consumer is not None:
            self._consumer.resume(part.tp)

    async def close(self) -> None:
        consumer, self._consumer = self._consumer, None
        self._fetched = None
        self._partitions.clear()
        self._by_stream.clear()
        if consumer is not None:
            await consumer.stop()

    # -- what operators and tests see -----------------------------------------------------------

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

    async def position(self, stream: str) -> int:
        """The offset this relay reads next in an owned partition (waits until it is resolved)."""
        part = self._by_stream[stream]
        assert self._consumer is not None
        offset: int = await self._consumer.position(part.tp)
        return offset

    def assigned(self) -> list[str]:
        """The partition streams ("topic/partition") this relay owns now."""
        return sorted(p.stream for p in self._partitions.values())

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

    # -- records -----------------------------------------------------------------------------

    def _messages(self, part: _Partition, records: list[Any]) -> list[Message]:
        """The messages of one partition's records. This runs for every record: what is the same
        for all of them is looked up once, and nothing is built that no route can read."""
        name, stream, topic, partition = self.name, part.stream, part.tp.topic, part.tp.partition
        centrifugo = self.config.format == "centrifugo"
        read_at = time.monotonic()
        messages: list[Message] = []
        append = messages.append
        for record in records:
            raw_headers = record.headers
            headers = {k: (v or b"").decode("utf-8", "replace") for k, v in raw_headers} if raw_headers else NOTHING
            value: bytes = record.value or b""
            offset = record.offset
            key = record.key
            if centrifugo:  # the record names its channels: no route reads attributes
                parsed, error = read_publication(value, headers)
                append(Message(name, value, stream, offset, None if key is None else key.decode("utf-8", "replace"),
                               headers, NOTHING, read_at, parsed, error))
                continue
            attributes = {"topic": topic, "partition": partition, "offset": offset, "timestamp": record.timestamp}
            append(Message(name, value, stream, offset, None if key is None else key.decode("utf-8", "replace"),
                           headers, attributes, read_at))
        return messages

    # -- rebalancing -------------------------------------------------------------------------

    async def _revoked(self, revoked: set[TopicPartition]) -> None:
        parts = [self._partitions[tp] for tp in revoked if tp in self._partitions]
        if self._revoke is not None and parts:
            await self._revoke([p.stream for p in parts])  # commits what settled, forgets the rest
        for part in parts:
            del self._partitions[part.tp], self._by_stream[part.stream]
        events.KafkaLagMeasured({}, gone=[(p.tp.topic, p.tp.partition) for p in parts]).emit()
        if parts:
            log.info("kafka source %s: partitions revoked: %s", self.name,
                     ", ".join(sorted(p.stream for p in parts)))

    def _assigned(self, assigned: set[TopicPartition]) -> None:
        fresh = [tp for tp in assigned if tp not in self._partitions]
        for tp in fresh:
            part = self._partitions[tp] = _Partition(tp)
            self._by_stream[part.stream] = part
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
