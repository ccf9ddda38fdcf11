"""SIGTERM under load from Kafka and from files, then a restart: the drain delivers what was in
flight, the sources commit exactly what was delivered, the next run starts there. Counts come from
Centrifugo's History and the broker's committed offsets."""

from __future__ import annotations

import json
import signal
import threading
import time
import uuid
from pathlib import Path

import pytest

from tests.harness.centrifugo import RealCentrifugo
from tests.harness.kafka import KafkaBroker, Record, run_sync
from tests.harness.ports import free_port
from tests.harness.relay_process import RelayProcess
from tests.test_daemon import published, roomy_centrifugo, seqs, wait_until

__all__ = ["roomy_centrifugo"]  # a module-scoped fixture, shared with tests/test_daemon.py

KEYS = 10


def sink(server: RealCentrifugo, workdir: Path) -> str:
    return f"""
[relay]
state_dir = "{workdir}/state"
shutdown_timeout = "10s"

[sink]
address = "{server.grpc_address}"
api_key_env = "CENTRIFUGO_GRPC_API_KEY"
retry = {{ initial_backoff = "20ms", max_backoff = "200ms" }}
"""


def run_until(relay: RelayProcess, at_least: float) -> None:
    """Start, wait until `at_least` publications were accepted, SIGTERM, expect exit status 0."""
    relay.start()
    try:
        relay.wait_http()
        wait_until(lambda: published(relay) >= at_least, timeout=60, what=f"{at_least} publications")
    finally:
        code = relay.terminate(timeout=30)
    assert code == 0


@pytest.mark.kafka

def keyed_backlog(broker: KafkaBroker, topic: str, n: int) -> list[int]:
    """`n` records on a new 3-partition topic: keys k0..k{KEYS-1}, each key's values {"s": 0, 1, ...};
    returns how many records each key got."""
    run_sync(broker.create_topic(topic, 3))
    next_seq = [0] * KEYS
    records = []
    for i in range(n):
        k = i % KEYS
        records.append(Record(json.dumps({"s": next_seq[k]}).encode(), key=f"k{k}"))
        next_seq[k] += 1
    run_sync(broker.produce(topic, records))
    return next_seq

def test_kafka_sigterm_under_load_commits_what_was_delivered_and_restart_goes_on_from_there(
        kafka_broker: KafkaBroker, roomy_centrifugo: RealCentrifugo, tmp_path: Path) -> None:
    server, broker = roomy_centrifugo, kafka_broker
    tag = uuid.uuid4().hex[:8]
    topic, group = f"term-{tag}", f"relay-{tag}"
    n = 20_000
    next_seq = keyed_backlog(broker, topic, n)
    text = sink(server, tmp_path) + f"""
[sources.src]
type = "kafka"
brokers = ["{broker.bootstrap}"]
topics = ["{topic}"]
group_id = "{group}"
commit_interval = "200ms"
session_timeout = "2s"
heartbeat_interval = "300ms"

[[routes]]
source = "src"
channel = "chat:{tag}-{{{{ key }}}}"
"""
    relay = RelayProcess(tmp_path, text, env={"CENTRIFUGO_GRPC_API_KEY": server.api_key})

    def delivered() -> dict[int, list[int]]:
        return {k: seqs(server, f"chat:{tag}-k{k}", key="s") for k in range(KEYS)}

    run_until(relay, 4000)
    first = delivered()
    offsets = run_sync(broker.committed(group, topic, 3))
    total = sum(len(v) for v in first.values())
    # The drain delivered everything read, and exactly that was committed: the next run repeats nothing.
    assert sum(o or 0 for o in offsets.values()) == total
    assert 4000 <= total < n, total  # SIGTERM came mid-stream
    relay.start()
    try:
        relay.wait_http()
        wait_until(lambda: sum(len(v) for v in delivered().values()) >= n, timeout=60, what="every record")
        assert relay.metric("relay_source_messages_total", 'source="src"') == n - total
    finally:
        assert relay.terminate(timeout=30) == 0
    for k, values in delivered().items():
        assert values == list(range(next_seq[k])), f"k{k}"
    assert run_sync(broker.committed(group, topic, 3)) == run_sync(broker.end_offsets(topic, 3))
    assert "not settled" not in relay.logs()


class LogWriter(threading.Thread):
    """Appends JSON lines {"s": n} to a file at a steady rate, as a busy service logs."""

    def __init__(self, path: Path, per_tick: int = 200, tick: float = 0.01) -> None:
        super().__init__(name="log-writer", daemon=True)
        self.path, self.per_tick, self.tick = path, per_tick, tick
        self.written = 0
        self.stopped = threading.Event()

    def run(self) -> None:
        with self.path.open("a") as out:
            while not self.stopped.is_set():
                out.write("".join(json.dumps({"s": i}) + "\n"
                                  for i in range(self.written, self.written + self.per_tick)))
                out.flush()
                self.written += self.per_tick
                time.sleep(self.tick)

    def stop(self) -> int:
        self.stopped.set()
        self.join(5)
        return self.written


def test_file_sigterm_under_load_checkpoints_what_was_delivered_and_restart_goes_on_from_there(
        roomy_centrifugo: RealCentrifugo, tmp_path: Path) -> None:
    server = roomy_centrifugo
    tag = uuid.uuid4().hex[:8]
    logs = tmp_path / "logs"
    logs.mkdir()
    channel = f"chat:{tag}-file"
    text = sink(server, tmp_path) + f"""
[sources.src]
type = "file"
paths = ["{logs}/*.log"]
read_from = "beginning"
poll_interval = "50ms"

[[routes]]
source = "src"
channel = "{channel}"
"""
    relay = RelayProcess(tmp_path, text, env={"CENTRIFUGO_GRPC_API_KEY": server.api_key})
    writer = LogWriter(logs / "app.log")
    writer.start()
    try:
        run_until(relay, 5000)
        first = seqs(server, channel, key="s")
        # Written while the relay is down, too.
        wait_until(lambda: writer.written >= len(first) + 2000, what="lines written while the relay is down")
        relay.start()
        relay.wait_http()
        wait_until(lambda: published(relay) >= 5000, what="5000 more publications")
    finally:
        total = writer.stop()
    try:
        wait_until(lambda: len(seqs(server, channel, key="s")) >= total, timeout=60, what="every line")
        # The checkpoint held exactly what was delivered: the second run read no line twice.
        assert relay.metric("relay_source_messages_total", 'source="src"') == total - len(first)
        assert relay.metric("relay_files_watched") == 1
        wait_until(lambda: relay.metric("relay_file_checkpoints_total") >= 1, what="a checkpoint written")
    finally:
        assert relay.terminate(timeout=30) == 0
    assert first == list(range(len(first))) and len(first) >= 5000
    assert seqs(server, channel, key="s") == list(range(total))
    assert "not settled" not in relay.logs()


def test_sighup_fixing_a_dead_sink_address_rereads_what_never_settled(
        roomy_centrifugo: RealCentrifugo, tmp_path: Path) -> None:
    """The drain of a reload cannot finish while the sink is down: every source restarts from its
    checkpoint instead, so the lines stuck in the old pipeline are read again and delivered."""
    server = roomy_centrifugo
    logs = tmp_path / "logs"
    logs.mkdir()
    n = 1000
    (logs / "app.log").write_text("".join(json.dumps({"s": i}) + "\n" for i in range(n)))
    channel = f"chat:{uuid.uuid4().hex[:8]}-fixed"
    dead = f"127.0.0.1:{free_port()}"
    text = sink(server, tmp_path).replace(server.grpc_address, dead).replace('"10s"', '"1s"') + f"""
[sources.src]
type = "file"
paths = ["{logs}/*.log"]

[[routes]]
source = "src"
channel = "{channel}"
"""
    relay = RelayProcess(tmp_path, text, env={"CENTRIFUGO_GRPC_API_KEY": server.api_key}).start()
    try:
        relay.wait_http()
        wait_until(lambda: relay.metric("relay_in_flight", 'source="src"') == n, what="every line in flight")
        assert relay.get("/readyz")[0] == 503
        relay.config_path.write_text(relay.config_path.read_text().replace(dead, server.grpc_address))
        relay.process.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
        wait_until(lambda: len(seqs(server, channel, key="s")) >= n, what="every line after the reload")
        wait_until(lambda: relay.get("/readyz")[0] == 200, what="ready")
        assert relay.metric("relay_in_flight", 'source="src"') == 0
        assert relay.metric("relay_source_messages_total", 'source="src"') == 2 * n  # read twice ...
    finally:
        assert relay.terminate(timeout=30) == 0
    assert seqs(server, channel, key="s") == list(range(n))  # ... delivered once
    logs_text = relay.logs()
    assert f"reload: {n} message(s) not settled within 1s" in logs_text
    assert "reload: applied: 0 source(s) kept running, 1 (re)started" in logs_text


@pytest.mark.kafka
def test_kafka_sighup_with_a_changed_route_keeps_the_consumer_and_splits_the_stream_exactly(
        kafka_broker: KafkaBroker, roomy_centrifugo: RealCentrifugo, tmp_path: Path) -> None:
    server, broker = roomy_centrifugo, kafka_broker
    tag = uuid.uuid4().hex[:8]
    topic = f"hup-{tag}"
    n = 20_000
    next_seq = keyed_backlog(broker, topic, n)
    text = sink(server, tmp_path) + f"""
[sources.src]
type = "kafka"
brokers = ["{broker.bootstrap}"]
topics = ["{topic}"]
group_id = "relay-{tag}"
commit_interval = "200ms"
session_timeout = "2s"
heartbeat_interval = "300ms"

[[routes]]
source = "src"
channel = "chat:{tag}-a-{{{{ key }}}}"
"""
    relay = RelayProcess(tmp_path, text, env={"CENTRIFUGO_GRPC_API_KEY": server.api_key}).start()
    try:
        relay.wait_http()
        wait_until(lambda: published(relay) >= 3000, timeout=60, what="3000 publications before the reload")
        relay.config_path.write_text(relay.config_path.read_text().replace(f"{tag}-a-", f"{tag}-b-"))
        relay.process.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
        wait_until(lambda: "reload: applied" in relay.logs(), what="the reload")
        wait_until(lambda: published(relay) >= n, timeout=60, what="every record")
        assert relay.metric("relay_source_messages_total", 'source="src"') == n  # nothing read twice
    finally:
        assert relay.terminate(timeout=30) == 0
    moved = 0
    for k in range(KEYS):
        before = seqs(server, f"chat:{tag}-a-k{k}", key="s")
        after = seqs(server, f"chat:{tag}-b-k{k}", key="s")
        assert before + after == list(range(next_seq[k])), f"k{k}"
        moved += len(after)
    assert 0 < moved < n
    logs = relay.logs()
    assert "reload: applied: 1 source(s) kept running, 0 (re)started" in logs
    assert logs.count("partitions assigned") == 1  # the consumer stayed in its group: no rebalance
