"""Kafka → `relay run` → `relay serve`, end to end, with real processes, a real broker and real
SIGKILLs. What arrived is read back from the server's History, never from logs.

Records are JSON `{"k": key, "s": n}` where `n` counts up per key, so a channel's History must be
exactly `0, 1, 2, ...`: nothing lost, nothing twice, in order.
"""

from __future__ import annotations

import json
import random
import threading
import time
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest

from tests.harness.e2e import (
    kill_at_random_moments,
    relay,
    relay_and_sink_tables,
    relay_until_done,
    sequences,
    target_tables,
)
from tests.harness.embedded import EmbeddedServerProcess
from tests.harness.history import history
from tests.harness.kafka import KafkaBroker, Record, run_sync
from tests.harness.relay_process import RelayProcess

Server = EmbeddedServerProcess

pytestmark = pytest.mark.kafka

KEYS = 50


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


class KeyedStream:
    """Records for keys room-0..room-49 with a per-key sequence number, produced in order."""

    def __init__(self, keys: int = KEYS, pad: int = 0) -> None:
        self.keys = keys
        self.pad = "x" * pad
        self.next_seq = [0] * keys
        self.count = 0

    def records(self, n: int) -> list[Record]:
        out = []
        for _ in range(n):
            k = self.count % self.keys
            body: dict[str, Any] = {"k": f"room-{k}", "s": self.next_seq[k]}
            if self.pad:
                body["pad"] = self.pad
            out.append(Record(json.dumps(body).encode(), key=f"room-{k}"))
            self.next_seq[k] += 1
            self.count += 1
        return out


def relay_config(workdir: Path, broker: KafkaBroker, server: EmbeddedServerProcess, topic: str, group: str,
                 *, channel: str = "chat:{{ key }}", source: dict[str, Any] | None = None,
                 routes: bool = True) -> str:
    options = {"commit_interval": "200ms", "session_timeout": "2s", "heartbeat_interval": "300ms",
               **(source or {})}
    lines = [
        *relay_and_sink_tables(workdir, server),
        "[sources.events]", 'type = "kafka"', f'brokers = ["{broker.bootstrap}"]', f'topics = ["{topic}"]',
        f'group_id = "{group}"',
        *(f"{k} = {json.dumps(v)}" for k, v in options.items()),
    ]
    if routes:
        lines += ["[[routes]]", 'source = "events"', f"channel = {json.dumps(channel)}"]
    return "\n".join(lines) + "\n"








def wait_delivered(server: EmbeddedServerProcess, stream: KeyedStream, timeout: float = 60.0,
                   relays: Iterable[RelayProcess] = ()) -> dict[int, list[int]]:
    """Poll History until every channel holds its last sequence number."""
    deadline = time.monotonic() + timeout
    seen: dict[int, list[int]] = {}
    while time.monotonic() < deadline:
        seen = sequences(server, stream.keys)
        if all(seen[k] and seen[k][-1] >= stream.next_seq[k] - 1 for k in range(stream.keys)):
            return seen
        time.sleep(0.25)
    have = sum(len(v) for v in seen.values())
    logs = "".join(r.logs()[-2000:] for r in relays)
    raise AssertionError(f"{have} of {stream.count} publications after {timeout}s\n{logs}")


def assert_exactly_once_in_order(seen: dict[int, list[int]], stream: KeyedStream, first: int = 0) -> None:
    for k in range(stream.keys):
        assert seen[k] == list(range(first, stream.next_seq[k])), f"chat:room-{k}"


def produce(broker: KafkaBroker, topic: str, records: list[Record]) -> None:
    run_sync(broker.produce(topic, records))


class Producer(threading.Thread):
    """Produces a stream in chunks while the test kills relays: the stream is live, not a backlog."""

    def __init__(self, broker: KafkaBroker, topic: str, stream: KeyedStream, total: int, chunk: int,
                 pause: float) -> None:
        super().__init__(name="producer", daemon=True)
        self.batches = [stream.records(min(chunk, total - i)) for i in range(0, total, chunk)]
        self.broker, self.topic, self.pause = broker, topic, pause
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            for batch in self.batches:
                produce(self.broker, self.topic, batch)
                time.sleep(self.pause)
        except BaseException as err:
            self.error = err


def committed(broker: KafkaBroker, group: str, topic: str) -> dict[int, int | None]:
    return run_sync(broker.committed(group, topic, 3))


def rss(process: RelayProcess) -> int:
    assert process.process is not None
    for line in Path(f"/proc/{process.process.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


@pytest.fixture
def topic(kafka_broker: KafkaBroker) -> str:
    name = unique("chat-events")
    run_sync(kafka_broker.create_topic(name, 3))
    return name


def test_20000_keyed_messages_arrive_once_in_key_order(kafka_broker: KafkaBroker, topic: str,
                                                       embedded_server: EmbeddedServerProcess,
                                                       tmp_path: Path) -> None:
    stream = KeyedStream()
    produce(kafka_broker, topic, stream.records(20_000))
    group = unique("g")
    proc = relay(tmp_path, relay_config(tmp_path, kafka_broker, embedded_server, topic, group),
                 embedded_server).start()
    try:
        seen = wait_delivered(embedded_server, stream, relays=[proc])
    finally:
        proc.stop()
    assert sum(len(v) for v in seen.values()) == 20_000
    assert_exactly_once_in_order(seen, stream)
    assert committed(kafka_broker, group, topic) == run_sync(kafka_broker.end_offsets(topic, 3))


def test_sigkill_at_random_moments_loses_nothing_and_shows_nothing_twice(
        kafka_broker: KafkaBroker, topic: str, embedded_server: Server, tmp_path: Path) -> None:
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    stream = KeyedStream()
    producer = Producer(kafka_broker, topic, stream, total=20_000, chunk=400, pause=0.4)
    proc = relay(tmp_path, relay_config(tmp_path, kafka_broker, embedded_server, topic, unique("g")),
                 embedded_server)
    producer.start()
    # Each run must make progress (a restart first waits up to session_timeout for the killed
    # member to expire), then dies at a random moment of its stream.
    delivered_at_kill = kill_at_random_moments(proc, embedded_server, rng, kills=5)
    producer.join(120)
    assert producer.error is None
    proc.start()
    try:
        seen = wait_delivered(embedded_server, stream, relays=[proc])
    finally:
        proc.stop()
    assert_exactly_once_in_order(seen, stream)
    assert delivered_at_kill[-1] < stream.count, f"the last kill came after the end: {delivered_at_kill} " \
                                                 f"(seed {seed})"


def test_two_relays_in_one_group_one_killed_mid_stream(kafka_broker: KafkaBroker, topic: str,
                                                        embedded_server: EmbeddedServerProcess,
                                                        tmp_path: Path) -> None:
    stream = KeyedStream()
    group = unique("g")
    producer = Producer(kafka_broker, topic, stream, total=20_000, chunk=1000, pause=0.2)
    first = relay(tmp_path / "a", relay_config(tmp_path / "a", kafka_broker, embedded_server, topic, group),
                  embedded_server).start()
    second = relay(tmp_path / "b", relay_config(tmp_path / "b", kafka_broker, embedded_server, topic, group),
                   embedded_server).start()
    try:
        deadline = time.monotonic() + 30
        while "partitions assigned" not in first.logs() or "partitions assigned" not in second.logs():
            assert time.monotonic() < deadline, first.logs() + second.logs()
            time.sleep(0.1)
        producer.start()
        time.sleep(1.5)
        first.kill()
        producer.join(120)
        assert producer.error is None
        seen = wait_delivered(embedded_server, stream, relays=[second])
    finally:
        for proc in (first, second):
            if proc.alive():
                proc.stop()
    assert_exactly_once_in_order(seen, stream)
    assert committed(kafka_broker, group, topic) == run_sync(kafka_broker.end_offsets(topic, 3))


def test_sink_down_for_10s_pauses_partitions_keeps_memory_flat_then_delivers(
        kafka_broker: KafkaBroker, topic: str, embedded_server: Server, tmp_path: Path) -> None:
    stream = KeyedStream(pad=1024)
    group = unique("g")
    config = relay_config(tmp_path, kafka_broker, embedded_server, topic, group,
                          source={"max_in_flight_per_partition": 500})
    proc = relay(tmp_path, config, embedded_server).start()
    try:
        produce(kafka_broker, topic, stream.records(1500))
        wait_delivered(embedded_server, stream, relays=[proc])
        ends = run_sync(kafka_broker.end_offsets(topic, 3))
        deadline = time.monotonic() + 10
        while committed(kafka_broker, group, topic) != ends:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        baseline = rss(proc)
        embedded_server.kill()
        produce(kafka_broker, topic, stream.records(30_000))  # about 32 MiB waiting in Kafka
        samples = []
        outage_end = time.monotonic() + 10
        while time.monotonic() < outage_end:
            samples.append(rss(proc))
            time.sleep(0.5)
        assert committed(kafka_broker, group, topic) == ends, "nothing is committed while the sink is down"
        embedded_server.start()
        seen = wait_delivered(embedded_server, stream, relays=[proc])
    finally:
        proc.stop()
    mib = [round(x / 2**20, 1) for x in [baseline, *samples]]
    # Reading the whole backlog would add about 50 MiB; the caps (3 x 500 records) allow a few.
    assert max(samples) - baseline < 16 * 2**20, f"RSS (MiB) before and during the outage: {mib}"
    settled = samples[4:]  # after the first 2 s the partitions sit at their cap
    assert max(settled) - min(settled) < 8 * 2**20, f"RSS (MiB) grew while the sink was down: {mib}"
    # The restarted server kept nothing from before the outage: each channel holds a contiguous
    # tail that covers every record produced during the outage, once and in order.
    for k in range(KEYS):
        values = seen[k]
        assert values == list(range(values[0], stream.next_seq[k])), f"chat:room-{k}"
        assert values[0] <= 30, f"chat:room-{k} lost records of the outage"
    assert committed(kafka_broker, group, topic) == run_sync(kafka_broker.end_offsets(topic, 3))


def test_bad_records_go_to_the_dead_letter_file_and_their_partitions_keep_flowing(
        kafka_broker: KafkaBroker, topic: str, embedded_server: Server, tmp_path: Path) -> None:
    group = unique("g")
    records = []
    expected: dict[int, list[int]] = {p: [] for p in range(3)}
    for p in range(3):
        for i in range(300):
            if (p, i) == (0, 100):
                records.append(Record(b"not json {", key="chat:room-0", partition=0))
            elif (p, i) == (1, 150):
                records.append(Record(b'{"s": -1}', key="ghost:room-1", partition=1))  # no such namespace
            else:
                records.append(Record(json.dumps({"s": i}).encode(), key=f"chat:room-{p}", partition=p))
                expected[p].append(i)
    produce(kafka_broker, topic, records)
    proc = relay(tmp_path, relay_config(tmp_path, kafka_broker, embedded_server, topic, group,
                                        channel="{{ key }}"), embedded_server).start()
    try:
        deadline = time.monotonic() + 60
        ends = run_sync(kafka_broker.end_offsets(topic, 3))
        while committed(kafka_broker, group, topic) != ends:
            assert time.monotonic() < deadline, proc.logs()[-3000:]
            time.sleep(0.2)
    finally:
        proc.stop()
    for p in range(3):
        got = [json.loads(pub.data)["s"] for pub in history(embedded_server.address, f"chat:room-{p}",
                                                              embedded_server.api_key)]
        assert got == expected[p]
    letters = [json.loads(line) for line in (tmp_path / "dead-letter.jsonl").read_text().splitlines()]
    by_position = {d["position"]: d for d in letters}
    assert len(letters) == 2, letters
    bad_json = by_position[f"events/{topic}/0/100"]
    assert "not JSON" in bad_json["reason"]
    assert bad_json["data"] == "not json {"
    unknown = by_position[f"events/{topic}/1/150"]
    assert unknown["error_code"] == 102
    assert unknown["channel"] == "ghost:room-1"


def test_centrifugo_format_records_are_published_as_centrifugo_would(
        kafka_broker: KafkaBroker, topic: str, embedded_server: Server, tmp_path: Path) -> None:
    def command(method: str, payload: Any) -> bytes:
        return json.dumps({"method": method, "payload": payload}).encode()

    values: list[tuple[bytes, list[tuple[str, bytes]]]] = [
        (command("publish", {"channel": "chat:native", "data": {"n": 1}, "tags": {"t": "1"}}), []),
        (command("broadcast", {"channels": ["chat:native", "chat:other"], "data": {"n": 2}}), []),
        (command("publish", {"channel": "chat:native", "data": {"n": 3}, "idempotency_key": "same"}), []),
        (command("publish", {"channel": "chat:native", "data": {"n": 3}, "idempotency_key": "same"}), []),
        (command("publish", json.dumps({"channel": "chat:native", "data": {"n": 4}})), []),
        (b'{"n": 5}', [("centrifugo-channels", b"chat:native"), ("centrifugo-tag-region", b"eu")]),
        (b'{"n": 6}', [("centrifugo-channels", b"chat:native,chat:other")]),
        (command("disconnect", {"user": "42"}), []),
        (command("publish", {"channel": "chat:native", "data": {"n": 7}}), []),
    ]
    records = [Record(value, headers=headers, partition=0) for value, headers in values]
    produce(kafka_broker, topic, records)
    group = unique("g")
    config = relay_config(tmp_path, kafka_broker, embedded_server, topic, group,
                          source={"format": "centrifugo"}, routes=False)
    proc = relay(tmp_path, config, embedded_server).start()
    try:
        deadline = time.monotonic() + 60
        while committed(kafka_broker, group, topic).get(0) != len(records):
            assert time.monotonic() < deadline, proc.logs()[-3000:]
            time.sleep(0.2)
    finally:
        proc.stop()
    native = history(embedded_server.address, "chat:native", embedded_server.api_key)
    other = history(embedded_server.address, "chat:other", embedded_server.api_key)
    assert [json.loads(p.data)["n"] for p in native] == [1, 2, 3, 4, 5, 6, 7]
    assert [json.loads(p.data)["n"] for p in other] == [2, 6]
    assert dict(native[0].tags) == {"t": "1"}
    assert dict(native[4].tags) == {"region": "eu"}
    letters = [json.loads(line) for line in (tmp_path / "dead-letter.jsonl").read_text().splitlines()]
    assert [(d["position"], "'disconnect' is not supported" in d["reason"]) for d in letters] == [
        (f"events/{topic}/0/7", True)]


@pytest.mark.centrifugo
def test_centrifugo_format_matches_centrifugos_own_kafka_consumer(kafka_broker: KafkaBroker,
                                                                  centrifugo_factory: Any,
                                                                  tmp_path: Path) -> None:
    """The same records, read by real Centrifugo's consumer and by the relay (into a second real
    Centrifugo): every channel ends up with the same publications, data and tags."""
    def command(method: str, payload: Any) -> bytes:
        return json.dumps({"method": method, "payload": payload}).encode()

    commands, pubdata = unique("cmd"), unique("pubdata")
    for name in (commands, pubdata):
        run_sync(kafka_broker.create_topic(name, 1))
    produce(kafka_broker, commands, [Record(value, headers=headers) for value, headers in [
        (command("publish", {"channel": "chat:cmp", "data": {"n": 1}, "tags": {"t": "1"}}), []),
        (command("broadcast", {"channels": ["chat:cmp", "chat:cmp2"], "data": {"n": 2}}), []),
        (command("publish", {"channel": "chat:cmp", "data": {"n": 3}, "idempotency_key": "dup"}), []),
        (command("publish", {"channel": "chat:cmp", "data": {"n": 3}, "idempotency_key": "dup"}), []),
        (command("publish", json.dumps({"channel": "chat:cmp", "data": {"n": 4}})), []),
        (b'{"channel": "chat:cmp", "data": {"n": 5}}', [("centrifugo-method", b"publish")]),
        (command("publish", {"channel": "chat:cmp", "b64data": "eyJuIjogNn0="}), []),  # {"n": 6}
        (command("disconnect", {"user": "42"}), []),
        (command("publish", {"channel": "ghost:cmp", "data": {"n": 0}}), []),  # unknown namespace: 102
        (command("publish", {"channel": "chat:cmp", "data": {"n": 7}}), []),
        # Data as the producer wrote it: spaces, escapes, 1.50, an integer past 64 bits.
        (b'{"method":"publish","payload":{"channel":"chat:cmp","data":{"n" : 8, "t": "\\u00e9", "f": 1.50, '
         b'"big": 123456789012345678901234}}}', []),
        (b'{"payload": {"data": [9,  9], "channel": "chat:cmp"}, "method": "publish"}', []),
        (command("publish", {"channel": "chat:cmp-done", "data": {}}), []),
    ]])
    dup_key = ("centrifugo-idempotency-key", b"k")
    produce(kafka_broker, pubdata, [Record(value, headers=headers) for value, headers in [
        (b'{"n": 10}', [("centrifugo-channels", b"chat:hdr"), ("centrifugo-tag-region", b"eu")]),
        (b'{"n": 11}', [("centrifugo-channels", b"chat:hdr,chat:hdr2"), dup_key]),
        (b'{"n": 11}', [("centrifugo-channels", b"chat:hdr,chat:hdr2"), dup_key]),
        (b'{"n": 12}', [("centrifugo-channels", b"chat:hdr"), ("centrifugo-delta", b"false"),
                        ("centrifugo-version", b"3"), ("centrifugo-version-epoch", b"e1")]),
        (b'{}', [("centrifugo-channels", b"chat:hdr-done")]),
    ]])

    def consumer(name: str, topic: str, **kafka_options: Any) -> dict[str, Any]:
        return {"name": name, "enabled": True, "type": "kafka",
                "kafka": {"brokers": [kafka_broker.bootstrap], "topics": [topic],
                          "consumer_group": unique("centrifugo"), **kafka_options}}

    native = centrifugo_factory(config_overrides={"consumers": [
        consumer("commands", commands),
        consumer("pubdata", pubdata, publication_data_mode={"enabled": True})]})
    target = centrifugo_factory()
    config = "\n".join([
        *target_tables(tmp_path, target),
        "[sources.events]", 'type = "kafka"', 'format = "centrifugo"',
        f'brokers = ["{kafka_broker.bootstrap}"]',
        f'topics = ["{commands}", "{pubdata}"]', f'group_id = "{unique("g")}"',
    ]) + "\n"
    relay_until_done(tmp_path, config, target, (native, target), ("chat:cmp-done", "chat:hdr-done"))
    for channel in ("chat:cmp", "chat:cmp2", "chat:hdr", "chat:hdr2"):
        theirs = [(p.data, dict(p.tags))  # the bytes: data as written
                  for p in history(native.grpc_address, channel, native.api_key)]
        ours = [(p.data, dict(p.tags))  # the bytes: data as written
                for p in history(target.grpc_address, channel, target.api_key)]
        assert ours == theirs, channel
        assert theirs, channel
    letters = [json.loads(line) for line in (tmp_path / "dead-letter.jsonl").read_text().splitlines()]
    assert sorted(d["position"] for d in letters) == [f"events/{commands}/0/7", f"events/{commands}/0/8"]
