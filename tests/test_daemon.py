"""`relay run` as a daemon: SIGTERM under load then a restart, SIGHUP reloads (good and broken),
a drain bounded by shutdown_timeout, JSON logs. Real processes, real signals, real Centrifugo;
counts come from Centrifugo's History."""

from __future__ import annotations

import json
import math
import re
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from relay.proto.centrifugo import api_pb2, api_pb2_grpc
from relay.sources.engine import EMIT_CHUNK, READ_MAX
from tests.harness.centrifugo import RealCentrifugo
from tests.harness.configs import sink_table, ticker_tables
from tests.harness.notify_socket import NotifySocket
from tests.harness.ports import free_port
from tests.harness.relay_process import RelayProcess

# The ticker reads READ_MAX ticks at a time and the engine emits them in chunks of EMIT_CHUNK (the
# last chunk of a read shorter): whatever is emitted is a multiple of this.
BURST = math.gcd(READ_MAX, EMIT_CHUNK)


@pytest.fixture(scope="module")
def roomy_centrifugo(centrifugo_bin: Path,
                     tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealCentrifugo]:
    """A real Centrifugo whose chat history holds everything a test under full load publishes."""
    namespaces = [{"name": "chat", "history_size": 500_000, "history_ttl": "600s"}]
    server = RealCentrifugo(centrifugo_bin, tmp_path_factory.mktemp("roomy"),
                            config_overrides={"channel": {"namespaces": namespaces}})
    server.start()
    try:
        yield server
    finally:
        server.stop()


def seqs(server: RealCentrifugo, channel: str, key: str = "seq") -> list[int]:
    """The `key` of every publication the channel's history holds, oldest first (any size)."""
    options = [("grpc.max_receive_message_length", 512 * 1024 * 1024)]
    with grpc.insecure_channel(server.grpc_address, options=options) as chan:
        resp = api_pb2_grpc.CentrifugoApiStub(chan).History(
            api_pb2.HistoryRequest(channel=channel, limit=-1), metadata=server.metadata, timeout=30)
    assert not resp.error.code, resp.error
    return [json.loads(p.data)[key] for p in resp.result.publications]


def runs(values: list[int]) -> list[list[int]]:
    """Split a history of ticker seqs into the runs of each process (seq starts at 1 again)."""
    out: list[list[int]] = []
    for value in values:
        if value == 1 or not out:
            out.append([])
        out[-1].append(value)
    return out


def config(server: RealCentrifugo, channel: str, *, interval: str = "0s", relay: str = "") -> str:
    return relay + sink_table(server.grpc_address) + ticker_tables(channel, interval=interval)


def wait_until(predicate: object, timeout: float = 20.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.05)
    raise TimeoutError(f"not within {timeout}s: {what}")


def published(relay: RelayProcess) -> float:
    return relay.metric("relay_publications_total", 'result="ok"')


def test_sigterm_under_load_then_restart_loses_nothing_and_repeats_nothing(
        roomy_centrifugo: RealCentrifugo, tmp_path: Path) -> None:
    server = roomy_centrifugo
    channel = f"chat:term-{uuid.uuid4().hex[:8]}"
    with NotifySocket() as sock:
        relay = RelayProcess(tmp_path, config(server, channel),
                             env={**sock.env, "CENTRIFUGO_GRPC_API_KEY": server.api_key})
        in_flight = []
        for run in (1, 2):
            relay.start()
            try:
                sock.wait_for("READY", after=run - 1, timeout=20)
                wait_until(lambda: published(relay) >= 20_000, what="20000 publications")
                in_flight.append(relay.metric("relay_in_flight", 'source="tick"'))
            finally:
                code = relay.terminate(timeout=30)
            assert code == 0
            assert len(sock.received("STOPPING")) == run
    got = runs(seqs(server, channel))
    assert len(got) == 2
    for values in got:
        # Every burst the ticker emitted before SIGTERM was drained and published, in order, once.
        assert values == list(range(1, len(values) + 1))
        assert len(values) >= 20_000 and len(values) % BURST == 0, len(values)
    assert all(n > 0 for n in in_flight), in_flight  # SIGTERM came with publications in flight
    logs = relay.logs()
    assert logs.count("daemon: stopped\n") == 2 and "not settled" not in logs


def test_sigterm_with_the_sink_down_stops_within_shutdown_timeout(
        fresh_centrifugo: RealCentrifugo, tmp_path: Path) -> None:
    server = fresh_centrifugo
    server.stop()
    relay_table = f'[relay]\nstate_dir = "{tmp_path}/state"\nshutdown_timeout = "1s"'
    text = config(server, "chat:down", relay=relay_table)
    relay = RelayProcess(tmp_path, text, env={"CENTRIFUGO_GRPC_API_KEY": server.api_key}).start()
    relay.wait_http()
    wait_until(lambda: relay.metric("relay_in_flight", 'source="tick"') > 0, what="messages in flight")
    started = time.monotonic()
    assert relay.terminate(timeout=15) == 0
    took = time.monotonic() - started
    assert 0.9 < took < 4, took
    assert re.search(r"shutdown: \d+ message\(s\) not settled within 1s", relay.logs())


def test_sighup_with_a_changed_route_moves_the_flow_losing_nothing(
        roomy_centrifugo: RealCentrifugo, tmp_path: Path) -> None:
    server = roomy_centrifugo
    tag = uuid.uuid4().hex[:8]
    before, after, added = f"chat:hup-a-{tag}", f"chat:hup-b-{tag}", f"chat:hup-c-{tag}"
    with NotifySocket() as sock:
        relay = RelayProcess(tmp_path, config(server, before),
                             env={**sock.env, "CENTRIFUGO_GRPC_API_KEY": server.api_key}).start()
        try:
            sock.wait_for("READY", timeout=20)
            wait_until(lambda: published(relay) >= 3000, what="3000 publications before the reload")
            # The same ticker, routed elsewhere; and a new source with its own route.
            relay.config_path.write_text(relay.config_path.read_text().replace(before, after) + f"""
[sources.extra]
type = "ticker"
interval = "0s"
count = 7
data = '{{"seq": {{{{ seq }}}}}}'

[[routes]]
source = "extra"
channel = "{added}"
""")
            relay.process.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
            sock.wait_for("RELOADING", timeout=20)
            sock.wait_for("READY", after=1, timeout=20)
            mark = published(relay)
            wait_until(lambda: published(relay) >= mark + 3000, what="3000 publications after the reload")
            assert relay.get("/readyz") == (200, "ready\n")
        finally:
            code = relay.terminate(timeout=30)
    assert code == 0
    first, second = seqs(server, before), seqs(server, after)
    # The ticker kept running through the reload: its seq goes on from one channel to the other.
    assert first == list(range(1, len(first) + 1)) and len(first) >= 3000
    assert second == list(range(len(first) + 1, len(first) + len(second) + 1)) and len(second) >= 3000
    assert seqs(server, added) == list(range(1, 8))
    assert "reload: applied: 1 source(s) kept running, 1 (re)started, 2 route(s)" in relay.logs()
    assert sock.keys().count("READY") == 2 and sock.keys()[-1] == "STOPPING"


def test_sighup_with_a_broken_config_changes_nothing_and_says_why(
        roomy_centrifugo: RealCentrifugo, tmp_path: Path) -> None:
    server = roomy_centrifugo
    channel = f"chat:broken-{uuid.uuid4().hex[:8]}"
    with NotifySocket() as sock:
        relay = RelayProcess(tmp_path, config(server, channel, interval="2ms"),
                             env={**sock.env, "CENTRIFUGO_GRPC_API_KEY": server.api_key}).start()
        try:
            sock.wait_for("READY", timeout=20)
            good = relay.config_path.read_text()
            relay.config_path.write_text(good.replace("[sink]\n", '[sink]\nadress = "127.0.0.1:1"\n')
                                         .replace('interval = "2ms"', 'interval = "soon"'))
            relay.process.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
            wait_until(lambda: "the running config stays in force" in relay.logs(), what="the rejection")
            mark = published(relay)
            wait_until(lambda: published(relay) >= mark + 50, what="publishing goes on")
            assert relay.get("/readyz") == (200, "ready\n")
            status = sock.wait_for("STATUS", "reload of", prefix=True)
            assert status["STATUS"].endswith("rejected (2 problem(s)); running the previous config")
        finally:
            code = relay.terminate(timeout=30)
    assert code == 0
    logs = relay.logs()
    path = relay.config_path
    assert f"reload rejected: {path}: sources.tick.interval: " in logs
    assert f"reload rejected: {path}: sink.adress: unknown key (did you mean 'address'?)" in logs
    assert "reload rejected: 2 problem(s); the running config stays in force" in logs
    assert "RELOADING" not in sock.keys()  # noqa: SIM118 - a list of notification keys
    values = seqs(server, channel)
    assert values == list(range(1, len(values) + 1))


def test_json_logs_are_one_object_per_line(real_centrifugo: RealCentrifugo, tmp_path: Path) -> None:
    server = real_centrifugo
    text = config(server, "nowhere:json", interval="100ms",
                  relay=f'[relay]\nstate_dir = "{tmp_path}/state"\nlog_format = "json"')
    relay = RelayProcess(tmp_path, text, env={"CENTRIFUGO_GRPC_API_KEY": server.api_key}).start()
    relay.wait_http()
    wait_until(lambda: relay.metric("relay_dead_letters_total", 'reason="code_102"') >= 1,
               what="a dead letter")
    assert relay.terminate() == 0
    lines = relay.logs().splitlines()
    entries = [json.loads(line) for line in lines]  # every line parses
    assert len(entries) >= 4
    for entry in entries:
        assert list(entry) == ["time", "level", "component", "message", "fields"]
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", entry["time"])
        assert entry["level"] in ("debug", "info", "warning", "error")
    dead = next(e for e in entries if e["message"].startswith("dead letter:"))
    assert dead["component"] == "pipeline" and dead["level"] == "warning"
    assert dead["fields"]["source"] == "tick" and dead["fields"]["error_code"] == 102
    assert dead["fields"]["reason"] == "code_102" and dead["fields"]["channel"] == "nowhere:json"
    assert re.fullmatch(r"tick/[0-9a-f]{12}/1", dead["fields"]["position"])
    assert entries[-1] == {**entries[-1], "component": "daemon", "message": "stopped", "fields": {}}


def test_sighup_keeps_the_embedded_server_up_when_its_table_did_not_change(tmp_path: Path) -> None:
    port = free_port()
    before, after = "chat:embedded-a", "chat:embedded-b"
    text = f"""
[server]
enabled = true
listen = "127.0.0.1:{port}"
namespaces = [{{ name = "chat", history_size = 500000, history_ttl = "10m" }}]

[sink]
address = "127.0.0.1:{port}"

[sources.tick]
type = "ticker"
interval = "0s"
data = '{{"seq": {{{{ seq }}}}}}'

[[routes]]
source = "tick"
channel = "{before}"
"""
    with NotifySocket() as sock:
        relay = RelayProcess(tmp_path, text, env=sock.env).start()
        try:
            sock.wait_for("READY", timeout=20)
            wait_until(lambda: published(relay) >= 3000, what="3000 publications before the reload")
            relay.config_path.write_text(relay.config_path.read_text().replace(before, after))
            relay.process.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
            sock.wait_for("READY", after=1, timeout=20)
            mark = published(relay)
            wait_until(lambda: published(relay) >= mark + 3000, what="3000 publications after the reload")
            server = EmbeddedHistory(f"127.0.0.1:{port}")
            first, second = seqs(server, before), seqs(server, after)  # type: ignore[arg-type]
        finally:
            code = relay.terminate(timeout=30)
    assert code == 0
    # The server's memory survived the reload: the first channel's history is all there.
    assert first == list(range(1, len(first) + 1)) and len(first) >= 3000
    assert second == list(range(len(first) + 1, len(first) + len(second) + 1)) and len(second) >= 3000


class EmbeddedHistory:
    """What `seqs` needs of a server: the embedded one has no API key here."""

    def __init__(self, address: str) -> None:
        self.grpc_address = address
        self.metadata: list[tuple[str, str]] = []
