"""The Kafka source against a real broker, driven directly (no pipeline): what it emits, what it
commits, when it pauses, how it hands partitions over. Committed offsets are read back by a separate
client, as an operator would."""

from __future__ import annotations

import asyncio
import base64
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager, suppress
from typing import Any

import pytest
from pydantic import ValidationError

from relay.centrifugo_records import CentrifugoRecord, full_record, parse_publication
from relay.message import Message
from relay.sources import kafka
from relay.sources.engine import SourceEngine
from tests.harness.kafka import KafkaBroker, Record
from tests.harness.ports import free_port
from tests.harness.require import unavailable

pytestmark = pytest.mark.kafka


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def source_for(broker: KafkaBroker, topic: str, group: str, name: str = "events",
               **options: Any) -> SourceEngine:
    table: dict[str, Any] = {"type": "kafka", "brokers": [broker.bootstrap], "topics": [topic],
                             "group_id": group, "commit_interval": "100ms",
                             "session_timeout": "6s", "heartbeat_interval": "300ms"}
    table.update(options)
    if "topics_pattern" in options:
        del table["topics"]
    return engine_for(name, table)


def engine_for(name: str, table: dict[str, Any]) -> SourceEngine:
    """The Kafka reader run by the source engine, as the daemon runs it."""
    return SourceEngine(name, kafka.build(name, kafka.Config.model_validate(table), state_dir=None))  # type: ignore[arg-type]


def reader(source: SourceEngine) -> kafka.KafkaSource:
    assert isinstance(source.reader, kafka.KafkaSource)
    return source.reader


class Collector:
    """The `emit` a source is given: keeps every message, in the order emitted."""

    def __init__(self) -> None:
        self.messages: list[Message] = []
        self._changed = asyncio.Event()

    async def __call__(self, batch: list[Message]) -> None:
        self.messages.extend(batch)
        self._changed.set()

    async def wait_for(self, count: int, timeout: float = 30.0) -> list[Message]:
        deadline = time.monotonic() + timeout
        while len(self.messages) < count:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{len(self.messages)} of {count} messages after {timeout}s")
            self._changed.clear()
            with suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), left)
        return self.messages

    def of(self, stream: str) -> list[Message]:
        return [m for m in self.messages if m.stream == stream]


@asynccontextmanager
async def running(source: SourceEngine, emit: Collector) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(source.run(emit))
    try:
        yield task
    finally:
        await source.stop()
        await asyncio.wait_for(task, 15)
        await source.close()


async def until(predicate: Callable[[], bool], timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not reached after {timeout}s")
        await asyncio.sleep(0.05)


async def committed_becomes(broker: KafkaBroker, group: str, topic: str, expected: Mapping[int, int | None],
                            partitions: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    seen: dict[int, int | None] = {}
    while time.monotonic() < deadline:
        seen = await broker.committed(group, topic, partitions)
        if seen == expected:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"committed offsets {seen}, expected {expected}")


async def test_records_become_messages_with_key_headers_and_attributes(kafka_broker: KafkaBroker) -> None:
    topic, group = unique("fields"), unique("g")
    await kafka_broker.create_topic(topic, 1)
    before = int(time.time() * 1000)
    await kafka_broker.produce(topic, [
        Record(b'{"n": 1}', key="room-1", headers=[("trace", b"abc"), ("bin", b"\xff")]),
        Record(b'{"n": 2}', key=b"\xfe\x01"),
        Record(None, key="gone"),
    ])
    emit = Collector()
    async with running(source_for(kafka_broker, topic, group), emit):
        first, second, third = await emit.wait_for(3)
    assert (first.source, first.stream, first.offset) == ("events", f"{topic}/0", 0)
    assert first.data == b'{"n": 1}'
    assert first.key == "room-1"
    assert first.headers == {"trace": "abc", "bin": "\ufffd"}
    assert first.attributes["topic"] == topic
    assert first.attributes["partition"] == 0
    assert first.attributes["offset"] == 0
    assert before - 60_000 <= first.attributes["timestamp"] <= int(time.time() * 1000)
    assert first.position == f"events/{topic}/0/0"
    assert second.key == "\ufffd\x01"
    assert (third.offset, third.data, third.key) == (2, b"", "gone")


async def test_each_partition_is_emitted_in_order(kafka_broker: KafkaBroker) -> None:
    topic, group = unique("order"), unique("g")
    await kafka_broker.create_topic(topic, 3)
    keys = [f"room-{i % 50}" for i in range(3000)]
    await kafka_broker.produce(topic, [Record(json.dumps({"i": i}).encode(), key=k)
                                       for i, k in enumerate(keys)])
    emit = Collector()
    source = source_for(kafka_broker, topic, group)
    async with running(source, emit):
        settled = 0
        while settled < 3000:  # a partition holds over 1000 (the cap): settle as they come
            await emit.wait_for(settled + 1)
            for message in emit.messages[settled:]:
                message.settle()
            settled = len(emit.messages)
        messages = emit.messages
        await committed_becomes(kafka_broker, group, topic,
                                await kafka_broker.end_offsets(topic, 3), partitions=3)
    assert len(messages) == 3000
    streams = {m.stream for m in messages}
    assert streams == {f"{topic}/{p}" for p in range(3)}
    for stream in streams:
        offsets = [m.offset for m in emit.of(stream)]
        assert offsets == list(range(len(offsets)))
    by_key: dict[str, list[int]] = {}
    for message in messages:
        assert message.key is not None
        by_key.setdefault(message.key, []).append(json.loads(message.data)["i"])
    assert len(by_key) == 50
    for key, values in by_key.items():
        assert values == [i for i, k in enumerate(keys) if k == key]


async def test_commits_only_the_contiguous_settled_offset(kafka_broker: KafkaBroker) -> None:
    topic, group = unique("contig"), unique("g")
    await kafka_broker.create_topic(topic, 1)
    await kafka_broker.produce(topic, [b"%d" % i for i in range(10)])
    emit = Collector()
    async with running(source_for(kafka_broker, topic, group), emit):
        messages = await emit.wait_for(10)
        for i in (0, 1, 2, 5, 6, 7, 9):
            messages[i].settle()
        await committed_becomes(kafka_broker, group, topic, {0: 3}, partitions=1)
        await asyncio.sleep(0.5)  # several commit intervals: 5..7 and 9 must not leak past the gap
        assert await kafka_broker.committed(group, topic, 1) == {0: 3}
        messages[3].settle()
        await committed_becomes(kafka_broker, group, topic, {0: 4}, partitions=1)
        messages[4].settle()
        await committed_becomes(kafka_broker, group, topic, {0: 8}, partitions=1)
        messages[8].settle()
        await committed_becomes(kafka_broker, group, topic, {0: 10}, partitions=1)


async def test_close_commits_what_settled_and_a_restart_resumes_there(kafka_broker: KafkaBroker) -> None:
    topic, group = unique("close"), unique("g")
    await kafka_broker.create_topic(topic, 1)
    await kafka_broker.produce(topic, [b"%d" % i for i in range(20)])
    emit = Collector()
    source = source_for(kafka_broker, topic, group, commit_interval="1h")
    async with running(source, emit):
        messages = await emit.wait_for(20)
        for message in messages[:12]:
            message.settle()
        messages[15].settle()
    assert await kafka_broker.committed(group, topic, 1) == {0: 12}
    again = Collector()
    async with running(source_for(kafka_broker, topic, group), again):
        resumed = await again.wait_for(8)
        assert [m.offset for m in resumed] == list(range(12, 20))


async def test_partition_pauses_at_the_cap_and_resumes_as_acks_return(kafka_broker: KafkaBroker) -> None:
    topic, group = unique("cap"), unique("g")
    await kafka_broker.create_topic(topic, 1)
    await kafka_broker.produce(topic, [b"%d" % i for i in range(200)])
    emit = Collector()
    source = source_for(kafka_broker, topic, group, max_in_flight_per_partition=50)
    async with running(source, emit):
        await emit.wait_for(50)
        await asyncio.sleep(1.0)
        assert len(emit.messages) == 50, "the cap is exact: nothing read past it"
        assert source.in_flight() == {f"{topic}/0": 50}
        for message in emit.messages[:24]:
            message.settle()
        await asyncio.sleep(0.5)
        assert len(emit.messages) == 50, "26 in flight is above the resume mark (25)"
        emit.messages[24].settle()
        await emit.wait_for(75)
        await asyncio.sleep(0.5)
        assert len(emit.messages) == 75, "resumed, then paused again at the cap"
        assert [m.offset for m in emit.messages] == list(range(75))
        settled = 25
        while settled < 200:
            await emit.wait_for(min(200, settled + 1))
            for message in emit.messages[settled:]:
                message.settle()
            settled = len(emit.messages)
        assert [m.offset for m in emit.messages] == list(range(200))
        await committed_becomes(kafka_broker, group, topic, {0: 200}, partitions=1)


async def test_rebalance_commits_revoked_partitions_and_ignores_late_acks(kafka_broker: KafkaBroker) -> None:
    topic, group = unique("rebalance"), unique("g")
    await kafka_broker.create_topic(topic, 3)
    await kafka_broker.produce(topic, [Record(b"%d" % i, partition=i % 3) for i in range(300)])
    first_emit, second_emit = Collector(), Collector()
    # The first relay never commits on its own timer: only the revoke (and close) may commit.
    first = source_for(kafka_broker, topic, group, name="a", commit_interval="1h")
    second = source_for(kafka_broker, topic, group, name="b")
    first_run = running(first, first_emit)
    await first_run.__aenter__()
    try:
        await first_emit.wait_for(300)
        assert reader(first).assigned() == [f"{topic}/{p}" for p in range(3)]
        old = list(first_emit.messages)
        for p in range(3):
            for message in first_emit.of(f"{topic}/{p}")[:10]:
                message.settle()
        await asyncio.sleep(0.3)
        assert await kafka_broker.committed(group, topic, 3) == {0: None, 1: None, 2: None}
        async with running(second, second_emit):
            await until(lambda: bool(reader(second).assigned())
                        and len(reader(first).assigned() + reader(second).assigned()) == 3,
                        what="partitions shared by both relays")
            taken = sorted(int(s.rsplit("/", 1)[1]) for s in reader(second).assigned())
            kept = sorted(int(s.rsplit("/", 1)[1]) for s in reader(first).assigned())
            assert sorted(taken + kept) == [0, 1, 2]
            # The revoke committed what the first relay had settled, so the second starts there.
            assert await kafka_broker.committed(group, topic, 3) == {0: 10, 1: 10, 2: 10}
            await second_emit.wait_for(90 * len(taken))
            assert sorted(m.offset for m in second_emit.messages) == sorted(list(range(10, 100)) * len(taken))
            # The first relay reads its kept partitions again, from 10, as a new ownership.
            await first_emit.wait_for(300 + 90 * len(kept))
            # Its old messages settle late: they must move no commit, neither of the partitions
            # handed over nor of the ones it kept (their old ownership ended at the revoke).
            for message in old[10:]:
                message.settle()
            for message in second_emit.messages:
                message.settle()
            expected: dict[int, int | None] = {p: 100 if p in taken else 10 for p in range(3)}
            await committed_becomes(kafka_broker, group, topic, expected, partitions=3)
            # Closing commits only what the current ownership settled: nothing for the kept ones.
            await first_run.__aexit__(None, None, None)
            assert await kafka_broker.committed(group, topic, 3) == expected
    finally:
        await first.stop()
        await first.close()


async def test_start_from_latest_skips_the_backlog_and_earliest_reads_it(kafka_broker: KafkaBroker) -> None:
    topic = unique("start")
    await kafka_broker.create_topic(topic, 1)
    await kafka_broker.produce(topic, [b"old-%d" % i for i in range(5)])
    latest = Collector()
    source = source_for(kafka_broker, topic, unique("g"), start_from="latest")
    async with running(source, latest):
        await until(lambda: bool(reader(source).assigned()), what="assignment")
        assert await reader(source).position(f"{topic}/0") == 5  # resolved to the end, after assignment
        await kafka_broker.produce(topic, [b"new-%d" % i for i in range(3)])
        await latest.wait_for(3)
        await asyncio.sleep(0.3)
    assert [m.data for m in latest.messages] == [b"new-0", b"new-1", b"new-2"]
    earliest = Collector()
    async with running(source_for(kafka_broker, topic, unique("g"), start_from="earliest"), earliest):
        await earliest.wait_for(8)
    assert [m.data for m in earliest.messages][:5] == [b"old-%d" % i for i in range(5)]


async def test_topics_pattern_consumes_every_matching_topic(kafka_broker: KafkaBroker) -> None:
    stem = unique("pat")
    for name in (f"{stem}-a", f"{stem}-b", f"other-{stem}"):
        await kafka_broker.create_topic(name, 1)
        await kafka_broker.produce(name, [name.encode()])
    emit = Collector()
    source = source_for(kafka_broker, "", unique("g"), topics_pattern=f"^{stem}-.*")
    async with running(source, emit):
        await emit.wait_for(2)
        await asyncio.sleep(0.5)
    assert sorted(m.data for m in emit.messages) == [f"{stem}-a".encode(), f"{stem}-b".encode()]


def command(method: str, payload: Any) -> bytes:
    return json.dumps({"method": method, "payload": payload}).encode()


async def test_centrifugo_format_both_forms(kafka_broker: KafkaBroker) -> None:
    topic = unique("native")
    await kafka_broker.create_topic(topic, 1)
    records = [
        Record(command("publish", {"channel": "chat:a", "data": {"text": "hi"}, "idempotency_key": "k1",
                                   "tags": {"t": "v"}, "skip_history": True})),
        Record(command("broadcast", json.dumps({"channels": ["chat:a", "chat:b"], "data": [1, 2]}))),
        Record(command("publish", {"channel": "chat:bin", "b64data": base64.b64encode(b"\0\1").decode()})),
        Record(b'{"channel": "chat:m", "data": {"via": "header"}}',
               headers=[("centrifugo-method", b"publish")]),
        Record(b'{"x": 1}', headers=[("centrifugo-channels", b"chat:one")]),
        Record(b'{"x": 2}', headers=[("centrifugo-channels", b"chat:a,chat:b"),
                                     ("centrifugo-idempotency-key", b"ik"), ("centrifugo-delta", b"true"),
                                     ("centrifugo-version", b"7"), ("centrifugo-version-epoch", b"ep"),
                                     ("centrifugo-tag-region", b"eu")]),
        Record(command("subscribe", {"channel": "chat:a", "user": "42"})),
        Record(b"not json"),
        Record(b'{"x": 3}', headers=[("centrifugo-channels", b"chat:a"), ("centrifugo-delta", b"maybe")]),
        Record(command("publish", {"channel": "chat:a"})),
    ]
    await kafka_broker.produce(topic, records)
    emit = Collector()
    async with running(source_for(kafka_broker, topic, unique("g"), format="centrifugo"), emit):
        got = await emit.wait_for(len(records))
    intents = [full_record(m.record) if m.record is not None else None for m in got]
    errors = [(m.error or None) for m in got]
    # The data as the producer wrote it (json.dumps' spaces kept), as Centrifugo publishes it.
    assert intents[0] == CentrifugoRecord("publish", ("chat:a",), b'{"text": "hi"}', idempotency_key="k1",
                                          tags={"t": "v"}, skip_history=True)
    assert intents[1] is not None
    assert (intents[1].method, intents[1].channels, intents[1].data) == (
        "broadcast", ("chat:a", "chat:b"), b"[1, 2]")
    assert intents[2] is not None and intents[2].data == b"\x00\x01"
    assert intents[3] is not None
    assert (intents[3].channels, intents[3].data) == (("chat:m",), b'{"via": "header"}')
    assert intents[4] == CentrifugoRecord("publish", ("chat:one",), b'{"x": 1}')
    assert intents[5] == CentrifugoRecord("broadcast", ("chat:a", "chat:b"), b'{"x": 2}', idempotency_key="ik",
                                          tags={"region": "eu"}, delta=True, version=7, version_epoch="ep")
    assert errors[:6] == [None] * 6
    assert intents[6:] == [None] * 4
    assert errors[6] is not None and "'subscribe' is not supported" in errors[6]
    assert errors[7] is not None and "not JSON" in errors[7]
    assert errors[8] is not None and "centrifugo-delta" in errors[8]
    assert errors[9] is not None and "no data" in errors[9]
    assert got[7].data == b"not json", "the record's value is kept for the dead letter"


async def test_wrong_brokers_fail_with_a_clear_error(kafka_broker: KafkaBroker) -> None:
    port = free_port()
    table = {"type": "kafka", "brokers": [f"127.0.0.1:{port}"], "topics": ["t"], "connect_timeout": "1s"}
    source = engine_for("events", table)
    began = time.monotonic()
    with pytest.raises(kafka.KafkaSourceError) as caught:
        await source.run(Collector())
    assert time.monotonic() - began < 10
    text = str(caught.value)
    assert f"kafka source 'events': cannot connect to brokers 127.0.0.1:{port} (PLAINTEXT) within 1s" in text
    await source.close()


@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"])
async def test_sasl_mechanisms(kafka_broker: KafkaBroker, mechanism: str,
                               monkeypatch: pytest.MonkeyPatch) -> None:
    topic = unique("sasl")
    await kafka_broker.create_topic(topic, 1)
    await kafka_broker.produce(topic, [b"secret-data"])
    monkeypatch.setenv("TEST_KAFKA_PASSWORD", kafka_broker.sasl_password)
    sasl = {"mechanism": mechanism, "username": kafka_broker.sasl_username,
            "password_env": "TEST_KAFKA_PASSWORD"}
    emit = Collector()
    source = source_for(kafka_broker, topic, unique("g"), brokers=[kafka_broker.sasl_bootstrap],
                        security_protocol="SASL_PLAINTEXT", sasl=sasl)
    async with running(source, emit):
        got = await emit.wait_for(1)
    assert got[0].data == b"secret-data"


async def test_sasl_wrong_password_is_a_clear_error(kafka_broker: KafkaBroker, tmp_path: Any) -> None:
    secret = tmp_path / "password"
    secret.write_text("hunter2\n")
    sasl = {"mechanism": "SCRAM-SHA-256", "username": kafka_broker.sasl_username,
            "password_file": str(secret)}
    source = source_for(kafka_broker, "t", unique("g"), brokers=[kafka_broker.sasl_bootstrap],
                        security_protocol="SASL_PLAINTEXT", sasl=sasl, connect_timeout="1s")
    with pytest.raises(kafka.KafkaSourceError) as caught:
        await source.run(Collector())
    assert "cannot connect to brokers" in str(caught.value)
    assert "hunter2" not in str(caught.value)
    await source.close()


async def test_tls_with_a_private_ca(kafka_broker: KafkaBroker) -> None:
    if not kafka_broker.ssl_bootstrap:
        unavailable("trustme is not installed, so the broker has no TLS listener")
    topic = unique("tls")
    await kafka_broker.create_topic(topic, 1)
    await kafka_broker.produce(topic, [b"over-tls"])
    emit = Collector()
    source = source_for(kafka_broker, topic, unique("g"), brokers=[kafka_broker.ssl_bootstrap],
                        security_protocol="SSL", tls={"ca_file": kafka_broker.ca_file})
    async with running(source, emit):
        got = await emit.wait_for(1)
    assert got[0].data == b"over-tls"


@pytest.mark.parametrize(("table", "problem"), [
    ({"topics": ["a"], "topics_pattern": "a.*"}, "exactly one of topics or topics_pattern"),
    ({"topics": []}, "exactly one of topics or topics_pattern"),
    ({"topics": ["a"], "brokers": ["nohost"]}, "expected host:port"),
    ({"topics_pattern": "(unclosed"}, "not a regular expression"),
    ({"topics": ["a"], "sasl": {"username": "u", "password_env": "P"}}, "security_protocol is PLAINTEXT"),
    ({"topics": ["a"], "security_protocol": "SASL_SSL", "sasl": {"username": "u"}}, "password_env or"),
    ({"topics": ["a"], "security_protocol": "SASL_SSL", "sasl": {"username": "u", "password": "x"}},
     "Extra inputs are not permitted"),
    ({"topics": ["a"], "tls": {"ca_file": "ca.pem"}}, "use SSL or SASL_SSL"),
    ({"topics": ["a"], "commit_interval": "0s"}, "commit_interval"),
])
def test_config_problems_are_named(table: dict[str, Any], problem: str) -> None:
    with pytest.raises(ValidationError) as caught:
        kafka.Config.model_validate({"type": "kafka", "brokers": ["127.0.0.1:9092"], **table})
    assert problem in str(caught.value)


async def test_lag_metric_follows_what_is_committed(kafka_broker: KafkaBroker) -> None:
    """relay_kafka_lag{topic,partition} = high watermark - committed offset, per owned partition."""
    from relay import metrics

    topic, group = unique("lag"), unique("g")
    await kafka_broker.create_topic(topic, 1)
    await kafka_broker.produce(topic, [b"%d" % i for i in range(10)])

    def lag() -> float:
        return metrics.KAFKA_LAG.labels(topic=topic, partition="0")._value.get()

    emit = Collector()
    async with running(source_for(kafka_broker, topic, group), emit):
        messages = await emit.wait_for(10)
        await until(lambda: lag() == 10, what="lag 10 with nothing settled")
        for message in messages[:4]:
            message.settle()
        await until(lambda: lag() == 6, what="lag 6 after 4 settled")


@pytest.mark.parametrize(("record", "data"), [
    (b'{"method":"publish","payload":{"channel":"chat:a","data":{"n":123456789012345678901234567890}}}',
     b'{"n":123456789012345678901234567890}'),  # past 64 bits: kept exactly
    (b'{"method":"publish","payload":{"channel":"chat:a","data":{"t":"\xc3\xa9","f":2.5,"i":-7}}}',
     '{"t":"é","f":2.5,"i":-7}'.encode()),
])
def test_centrifugo_command_data_is_kept_exactly(record: bytes, data: bytes) -> None:
    assert parse_publication(record, {}).data == data


@pytest.mark.parametrize("record", [
    b'{"method":"publish","payload":{"channel":"chat:a","data":{"n":1e400}}}',
    b'{"method":"publish","payload":{"channel":"chat:a","data":{"n":NaN}}}',
])
def test_centrifugo_command_data_that_is_not_json_is_refused(record: bytes) -> None:
    with pytest.raises(ValueError):
        parse_publication(record, {})
