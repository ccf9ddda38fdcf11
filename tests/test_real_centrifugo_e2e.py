"""End to end against a real Centrifugo v6: ticker, file tail and Kafka → `relay run` → Centrifugo → a
WebSocket subscriber; plus a Centrifugo kill, a wrong API key, TLS with a checked server name and
`relay tail`.

Counts come from Centrifugo itself (History) and from a real subscriber, never from relay logs.

A kill of Centrifugo loses its memory-engine history, and Centrifugo acknowledges a publication
before its subscribers have it, so "nothing lost" needs a quiescent moment to count life one: the
relay is paused (SIGSTOP) while life one's History is read and Centrifugo is killed; the relay then
runs on against the dead server (it must retry), and is paused again while Centrifugo comes back so
that the subscriber is resubscribed before the rest flows. Life one's History plus life two's must
hold every tick in order; the only overlap allowed is a batch whose reply the kill swallowed.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest
import trustme

from relay.proto.centrifugo import api_pb2, api_pb2_grpc
from tests.harness.centrifugo import CentrifugoFactory, GrpcTls, RealCentrifugo
from tests.harness.configs import ticker_tables
from tests.harness.history import history, history_json
from tests.harness.kafka import KafkaBroker, Record, run_sync
from tests.harness.ports import free_port
from tests.harness.subscriber import ChannelSubscriber

pytestmark = pytest.mark.centrifugo

KEY_ENV = "E2E_CENTRIFUGO_GRPC_KEY"


class RelayProcess:
    """`relay run -c cfg.toml` in a subprocess, with its stderr in a log file."""

    def __init__(self, workdir: Path, centrifugo: RealCentrifugo, pipeline: str, api_key: str,
                 sink: str = "") -> None:
        self.workdir = workdir
        self.metrics_port = free_port()
        self.config_path = workdir / "relay.toml"
        self.log_path = workdir / "relay.log"
        self.config_path.write_text(f"""
[relay]
state_dir = "{workdir / 'state'}"
metrics_listen = "127.0.0.1:{self.metrics_port}"
shutdown_timeout = "10s"

[sink]
address = "{centrifugo.grpc_address}"
{"" if "api_key_file" in sink else f'api_key_env = "{KEY_ENV}"'}
batch_max_size = 50
batch_linger = "5ms"
max_in_flight = 1
retry = {{ initial_backoff = "50ms", max_backoff = "500ms" }}
{sink}
{pipeline}""")
        self.env = dict(os.environ, **{KEY_ENV: api_key})
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> RelayProcess:
        with open(self.log_path, "ab") as log:
            command = [sys.executable, "-m", "relay", "run", "-c", str(self.config_path)]
            self.process = subprocess.Popen(command, cwd=self.workdir, env=self.env, stdout=log,
                                            stderr=subprocess.STDOUT)
        return self

    def pause(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def wait(self, timeout: float) -> int:
        assert self.process is not None
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"relay still running after {timeout}s:\n{self.log()}") from None

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM (the relay drains), SIGKILL after `timeout`."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def readyz(self) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/readyz", timeout=2) as resp:
                return resp.status, resp.read().decode()
        except urllib.error.HTTPError as err:
            return err.code, err.read().decode()

    def wait_readyz(self, status: int, contains: str = "", timeout: float = 20.0) -> str:
        deadline = time.monotonic() + timeout
        seen: tuple[int, str] | None = None
        while time.monotonic() < deadline:
            try:
                seen = self.readyz()
                if seen[0] == status and contains in seen[1]:
                    return seen[1]
            except OSError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"/readyz never answered {status} {contains!r} (last {seen}):\n{self.log()}")


def ticker(channel: str, count: int, interval: str = "0s") -> str:
    """Sources and routes of a relay: a ticker of `count` ticks `{"seq": N}` into `channel`."""
    return ticker_tables(channel, count=count, interval=interval)


@pytest.fixture
def relays(tmp_path: Path) -> Any:
    """Factory: `relays(centrifugo, pipeline_toml, api_key=None, sink="more [sink] lines")` → a
    RelayProcess (not started); every relay is stopped after the test."""
    made: list[RelayProcess] = []

    def make(centrifugo: RealCentrifugo, pipeline: str, api_key: str | None = None,
             sink: str = "") -> RelayProcess:
        workdir = tmp_path / f"relay-{len(made)}"
        workdir.mkdir()
        key = centrifugo.api_key if api_key is None else api_key
        relay = RelayProcess(workdir, centrifugo, pipeline, key, sink)
        made.append(relay)
        return relay

    yield make
    for relay in made:
        relay.stop(timeout=3)  # one that cannot drain (a refused key, a wrong name) is not waited for


def _seqs(items: list[Any]) -> list[int]:
    return [item["seq"] for item in items]


def test_ticker_reaches_a_websocket_subscriber_in_order(real_centrifugo: RealCentrifugo, relays: Any) -> None:
    count = 2000
    with ChannelSubscriber(real_centrifugo.ws_url, "chat:e2e-ticker") as sub:
        relay = relays(real_centrifugo, ticker("chat:e2e-ticker", count)).start()
        assert relay.wait(120) == 0, relay.log()
        assert _seqs(sub.wait_for(count, timeout=30)) == list(range(1, count + 1))
        time.sleep(0.2)
        assert len(sub.received) == count  # and not one more
    # The chat namespace keeps the newest 1000: the tail of the stream, numbered without a gap.
    pubs = history(real_centrifugo.grpc_address, "chat:e2e-ticker", real_centrifugo.api_key)
    assert [json.loads(p.data)["seq"] for p in pubs] == list(range(count - 999, count + 1))
    assert [p.offset for p in pubs] == list(range(count - 999, count + 1))


def test_centrifugo_killed_mid_stream_loses_nothing(fresh_centrifugo: RealCentrifugo, relays: Any) -> None:
    server, channel, count = fresh_centrifugo, "chat:e2e-kill", 600
    sub = ChannelSubscriber(server.ws_url, channel).start()
    relay = relays(server, ticker(channel, count, interval="10ms")).start()
    try:
        sub.wait_for(100, timeout=30)
        relay.pause()
        # Life one is quiescent: the subscriber catches up with History, which is then complete.
        life_one = history_json(server.grpc_address, channel, server.api_key)
        assert sub.wait_for(len(life_one), timeout=10) == life_one
        server.kill()
        relay.resume()
        time.sleep(2.0)  # the relay meets a dead Centrifugo and retries
        relay.pause()
        server.start()
        sub.wait_subscribed(2, timeout=15)
        relay.resume()
        assert relay.wait(120) == 0, relay.log()
        life_two = history_json(server.grpc_address, channel, server.api_key)
        seen = sub.wait_for(len(life_one) + len(life_two), timeout=30)
    finally:
        sub.stop()
    one, two = _seqs(life_one), _seqs(life_two)
    assert 100 <= len(one) < count and two
    assert one == list(range(1, len(one) + 1))
    # Life two starts where life one ended, or repeats the one batch in flight at the kill.
    assert one[-1] - 50 < two[0] <= one[-1] + 1
    assert two == list(range(two[0], count + 1))
    assert _seqs(seen) == one + two
    assert "sink: retrying" in relay.log()


def test_wrong_api_key_keeps_everything_until_the_key_is_right(fresh_centrifugo: RealCentrifugo,
                                                               relays: Any) -> None:
    # More ticks than the relay buffers (4 batches of 50): the ticker is held back, not finished.
    server, channel, count = fresh_centrifugo, "chat:e2e-key", 600
    sub = ChannelSubscriber(server.ws_url, channel).start()
    relay = relays(server, ticker(channel, count, interval="5ms"), api_key="the-relays-key").start()
    try:
        relay.wait_readyz(503, contains="authentication failed")
        time.sleep(1.5)  # several retries' worth
        refused = [line for line in relay.log().splitlines() if "refused the API key" in line]
        assert len(refused) == 1, relay.log()
        assert "the-relays-key" not in relay.log()
        assert history_json(server.grpc_address, channel, server.api_key) == []
        assert relay.process is not None and relay.process.poll() is None
        # Make the key right on Centrifugo's side, with the relay paused so the subscriber is back first.
        relay.pause()
        server.stop()
        server.set_api_key("the-relays-key")
        server.start()
        sub.wait_subscribed(2, timeout=15)
        relay.resume()
        relay.wait_readyz(200)  # while the rest of the ticks still flow
        assert _seqs(sub.wait_for(count, timeout=60)) == list(range(1, count + 1))
        assert relay.wait(60) == 0, relay.log()
    finally:
        sub.stop()
    assert _seqs(history_json(server.grpc_address, channel, server.api_key)) == list(range(1, count + 1))
    assert len(sub.received) == count
    dead_letters = relay.workdir / "state" / "dead-letter.jsonl"
    assert not dead_letters.exists() or dead_letters.read_text() == ""


def test_a_key_file_fixed_in_place_lets_everything_through(real_centrifugo: RealCentrifugo, relays: Any,
                                                           tmp_path: Path) -> None:
    channel, count, key_file = "chat:e2e-keyfile", 300, tmp_path / "centrifugo.key"
    key_file.write_text("an-old-key\n")
    lines = [{"line": n} for n in range(1, count + 1)]
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "app.log").write_text("".join(json.dumps(line) + "\n" for line in lines))
    with ChannelSubscriber(real_centrifugo.ws_url, channel) as sub:
        relay = relays(real_centrifugo, f"""
[sources.applog]
type = "file"
paths = ["{tmp_path}/logs/*.log"]
read_from = "beginning"

[[routes]]
source = "applog"
channel = "{channel}"
""", sink=f'api_key_file = "{key_file}"').start()
        relay.wait_readyz(503, contains="authentication failed")
        time.sleep(1.0)
        assert history_json(real_centrifugo.grpc_address, channel, real_centrifugo.api_key) == []
        assert sub.received == []
        key_file.write_text(real_centrifugo.api_key + "\n")  # no restart, no signal: the sink rereads it
        assert sub.wait_for(count, timeout=30) == lines
        relay.wait_readyz(200)
        refused = [line for line in relay.log().splitlines() if "refused the API key" in line]
        assert len(refused) == 1 and "an-old-key" not in relay.log()
    assert history_json(real_centrifugo.grpc_address, channel, real_centrifugo.api_key) == lines


def test_file_tail_reaches_a_websocket_subscriber_in_order(real_centrifugo: RealCentrifugo, relays: Any,
                                                           tmp_path: Path) -> None:
    channel, log_file = "chat:e2e-file", tmp_path / "app.log"
    log_file.write_text("".join(json.dumps({"line": n}) + "\n" for n in range(1, 501)))
    with ChannelSubscriber(real_centrifugo.ws_url, channel) as sub:
        relay = relays(real_centrifugo, f"""
[sources.applog]
type = "file"
paths = ["{tmp_path}/*.log"]
read_from = "beginning"
poll_interval = "50ms"

[[routes]]
source = "applog"
channel = "{channel}"
""").start()
        sub.wait_for(500, timeout=60)
        with open(log_file, "a") as out:
            for n in range(501, 1001):
                out.write(json.dumps({"line": n}) + "\n")
                if n % 100 == 0:
                    out.flush()
        assert sub.wait_for(1000, timeout=60) == [{"line": n} for n in range(1, 1001)]
        relay.stop()
        assert relay.process is not None and relay.process.returncode == 0, relay.log()
        assert len(sub.received) == 1000
    pubs = history(real_centrifugo.grpc_address, channel, real_centrifugo.api_key)
    assert [json.loads(p.data)["line"] for p in pubs] == list(range(1, 1001))


@pytest.mark.kafka
def test_kafka_reaches_websocket_subscribers_in_partition_order(real_centrifugo: RealCentrifugo, relays: Any,
                                                                kafka_broker: KafkaBroker) -> None:
    topic, partitions, per_partition = f"e2e-{uuid.uuid4().hex[:8]}", 3, 400
    run_sync(kafka_broker.create_topic(topic, partitions))
    channels = [f"chat:e2e-kafka-{topic}-{p}" for p in range(partitions)]
    subs = [ChannelSubscriber(real_centrifugo.ws_url, c).start() for c in channels]
    try:
        relay = relays(real_centrifugo, f"""
[sources.events]
type = "kafka"
brokers = ["{kafka_broker.bootstrap}"]
topics = ["{topic}"]
group_id = "e2e-{topic}"

[[routes]]
source = "events"
channel = "chat:e2e-kafka-{{{{ topic }}}}-{{{{ partition }}}}"
""").start()
        records = [Record(json.dumps({"p": p, "n": n}).encode(), partition=p)
                   for n in range(1, per_partition + 1) for p in range(partitions)]
        assert run_sync(kafka_broker.produce(topic, records)) == partitions * per_partition
        for p, sub in enumerate(subs):
            assert sub.wait_for(per_partition, timeout=90) == [{"p": p, "n": n}
                                                               for n in range(1, per_partition + 1)]
        relay.stop()
        assert relay.process is not None and relay.process.returncode == 0, relay.log()
    finally:
        for sub in subs:
            sub.stop()
    assert [len(sub.received) for sub in subs] == [per_partition] * partitions
    for p, channel in enumerate(channels):
        held = history_json(real_centrifugo.grpc_address, channel, real_centrifugo.api_key)
        assert held == [{"p": p, "n": n} for n in range(1, per_partition + 1)]


def test_relay_over_tls_checks_the_server_name(centrifugo_factory: CentrifugoFactory, relays: Any,
                                               tmp_path: Path) -> None:
    ca = trustme.CA()
    ca.cert_pem.write_to_path(tmp_path / "ca.pem")
    issued = ca.issue_cert("centrifugo.test")
    issued.cert_chain_pems[0].write_to_path(tmp_path / "cert.pem")
    issued.private_key_pem.write_to_path(tmp_path / "key.pem")
    server = centrifugo_factory(tls=GrpcTls(tmp_path / "cert.pem", tmp_path / "key.pem", tmp_path / "ca.pem",
                                            server_name="centrifugo.test"))
    count = 300

    def tls(name: str) -> str:
        return f'tls = {{ enabled = true, ca_file = "{tmp_path / "ca.pem"}", server_name = "{name}" }}'

    # Ticks outnumber what the relay buffers, so this ticker is held back rather than finished.
    held_back = ticker("chat:e2e-tls-wrong", 600, interval="5ms")
    impostor = relays(server, held_back, sink=tls("other.test")).start()
    impostor.wait_readyz(503, contains="UNAVAILABLE")
    with ChannelSubscriber(server.ws_url, "chat:e2e-tls") as sub:
        relay = relays(server, ticker("chat:e2e-tls", count), sink=tls("centrifugo.test")).start()
        assert relay.wait(60) == 0, relay.log()
        assert _seqs(sub.wait_for(count, timeout=30)) == list(range(1, count + 1))
    with server.channel() as chan:
        stub = api_pb2_grpc.CentrifugoApiStub(chan)
        wrong = stub.History(api_pb2.HistoryRequest(channel="chat:e2e-tls-wrong", limit=-1),
                             metadata=server.metadata, timeout=5)
    assert (wrong.error.code, len(wrong.result.publications)) == (0, 0)
    assert impostor.process is not None and impostor.process.poll() is None


def _publish(server: RealCentrifugo, channel: str, data: object) -> None:
    done = subprocess.run([sys.executable, "-m", "relay", "publish", channel, json.dumps(data),
                           "--address", server.grpc_address, "--api-key-env", KEY_ENV],
                          env=dict(os.environ, **{KEY_ENV: server.api_key}), capture_output=True, text=True,
                          timeout=30)
    assert done.returncode == 0, done.stderr


def test_relay_tail_follows_a_channel(real_centrifugo: RealCentrifugo) -> None:
    server, channel = real_centrifugo, "chat:e2e-tail"
    for n in (1, 2, 3):
        _publish(server, channel, {"n": n})
    tail = subprocess.Popen([sys.executable, "-m", "relay", "tail", channel, "--from-start", "--poll", "50ms",
                             "--address", server.grpc_address, "--api-key-env", KEY_ENV],
                            env=dict(os.environ, **{KEY_ENV: server.api_key}), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    lines: queue.Queue[str] = queue.Queue()
    assert tail.stdout is not None
    reader = threading.Thread(target=lambda: [lines.put(line) for line in tail.stdout or []], daemon=True)
    reader.start()

    def next_lines(n: int) -> list[dict[str, Any]]:
        return [json.loads(lines.get(timeout=20)) for _ in range(n)]

    try:
        first = next_lines(3)
        for n in (4, 5, 6):
            _publish(server, channel, {"n": n})
        later = next_lines(3)
    finally:
        tail.terminate()
        tail.wait(10)
    got = first + later
    assert [line["data"] for line in got] == [{"n": n} for n in range(1, 7)]
    assert all(line["channel"] == channel for line in got)
    assert [line["offset"] for line in got] == list(range(got[0]["offset"], got[0]["offset"] + 6))
    assert lines.empty()
