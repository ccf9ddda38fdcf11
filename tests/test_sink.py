"""The sink against a server in another process: outages, per-publication errors, auth, error modes.

Counts come from the server's History, never from the relay's own logs.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

from relay.sources.ticker import DEFAULT_DATA
from tests.harness.configs import sink_table, ticker_tables
from tests.harness.history import history, history_json, wait_for_count
from tests.harness.relay_process import RelayProcess


def relay_config(address: str, *, count: int, interval: str = "20ms", routes: str = "", sink: str = "",
                 key_env: str = "SINK_KEY") -> str:
    """Ticks `{"type": "tick", "seq": N}` into chat:index, unless `routes` says otherwise."""
    source = ticker_tables("chat:index", count=count, interval=interval, name="hb", data=DEFAULT_DATA)
    if routes:
        source = source[:source.index("[[routes]]")] + routes
    return sink_table(address, key_env, extra='timeout = "1s"\n' + sink) + source


def seqs(address: str, channel: str, key: str) -> list[int]:
    return [d["seq"] for d in history_json(address, channel, key)]


def dead_letters(relay: RelayProcess) -> list[dict[str, Any]]:
    path = relay.workdir / "state" / "dead-letter.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def settled_history(server: Any, timeout: float = 10.0) -> list[int]:
    """The channel's seqs once the frozen relay's last requests were answered: the same twice in a row."""
    deadline = time.monotonic() + timeout
    last = seqs(server.address, "chat:index", server.api_key)
    while time.monotonic() < deadline:
        time.sleep(0.1)
        now = seqs(server.address, "chat:index", server.api_key)
        if now == last:
            return now
        last = now
    raise TimeoutError("the channel's history kept changing with the relay stopped")


def test_sink_frozen_for_5s_loses_nothing_and_keeps_order(embedded_server: Any, tmp_path: Path) -> None:
    """The server stops answering (SIGSTOP) mid-stream for 5 s: every tick arrives once, in order."""
    n = 400
    relay = RelayProcess(tmp_path, relay_config(embedded_server.address, count=n),
                         env={"SINK_KEY": embedded_server.api_key}).start()
    wait_for_count(embedded_server.address, "chat:index", 50, embedded_server.api_key)
    os.kill(embedded_server.pid, signal.SIGSTOP)
    try:
        time.sleep(5)
    finally:
        os.kill(embedded_server.pid, signal.SIGCONT)
    assert relay.wait(120) == 0, relay.logs()
    assert seqs(embedded_server.address, "chat:index", embedded_server.api_key) == list(range(1, n + 1))
    assert "retrying" in relay.logs()


def test_sink_restarted_mid_stream_loses_nothing(embedded_server: Any, tmp_path: Path) -> None:
    """The server process dies and comes back 5 s later on the same port (its memory is gone).

    What the first life accepted is read just before the kill; the second life must hold the rest,
    in order, without gaps: together they cover every tick.
    """
    n = 300
    relay = RelayProcess(tmp_path, relay_config(embedded_server.address, count=n, interval="25ms"),
                         env={"SINK_KEY": embedded_server.api_key}).start()
    wait_for_count(embedded_server.address, "chat:index", 60, embedded_server.api_key)
    # Freeze the relay so nothing more reaches the server, read what the server holds, kill it.
    assert relay.process is not None
    os.kill(relay.process.pid, signal.SIGSTOP)
    first_life = settled_history(embedded_server)  # requests already on the wire are answered
    embedded_server.kill()
    os.kill(relay.process.pid, signal.SIGCONT)
    time.sleep(5)
    embedded_server.start()
    assert relay.wait(120) == 0, relay.logs()
    second_life = seqs(embedded_server.address, "chat:index", embedded_server.api_key)
    assert second_life == sorted(second_life) and len(set(second_life)) == len(second_life)
    assert second_life[-1] == n
    # No gap between what the first life held and what the second received.
    assert set(range(1, n + 1)) <= set(first_life) | set(second_life)
    assert second_life == list(range(second_life[0], n + 1))


def test_unknown_namespace_goes_to_dead_letters_while_the_rest_flows(embedded_server: Any,
                                                                      tmp_path: Path) -> None:
    routes = '''
[[routes]]
source = "hb"
when = { "json.seq" = "*0" }
channel = "nowhere:{{ seq }}"
[[routes]]
source = "hb"
channel = "chat:index"
'''
    relay = RelayProcess(tmp_path, relay_config(embedded_server.address, count=100, interval="0s",
                                                routes=routes),
                         env={"SINK_KEY": embedded_server.api_key}).start()
    assert relay.wait(60) == 0, relay.logs()
    assert seqs(embedded_server.address, "chat:index", embedded_server.api_key) == [
        s for s in range(1, 101) if s % 10]
    letters = dead_letters(relay)
    # Each went to its own channel: order across channels is not promised, only within one.
    assert sorted(json.loads(d["data"])["seq"] for d in letters) == list(range(10, 101, 10))
    assert {d["error_code"] for d in letters} == {102}
    assert all(d["channel"] == f"nowhere:{json.loads(d['data'])['seq']}" and d["source"] == "hb" for d in letters)
    assert all(d["reason"].startswith("centrifugo error 102") and d["position"].startswith("hb/") for d in letters)


def test_wrong_key_means_not_ready_and_nothing_dropped(embedded_server: Any, tmp_path: Path) -> None:
    """UNAUTHENTICATED: not ready, retried loudly; once the key file is fixed everything arrives."""
    key_file = tmp_path / "key"
    key_file.write_text("wrong-key\n")
    n = 50
    config = relay_config(embedded_server.address, count=n, interval="100ms", key_env="",
                          sink=f'api_key_file = "{key_file}"')
    relay = RelayProcess(tmp_path / "relay", config).start()
    relay.wait_http()
    time.sleep(1.5)
    status, body = relay.get("/readyz")
    assert status == 503 and "authentication failed" in body
    assert history(embedded_server.address, "chat:index", embedded_server.api_key) == []
    key_file.write_text(embedded_server.api_key + "\n")
    assert relay.wait(60) == 0, relay.logs()
    assert seqs(embedded_server.address, "chat:index", embedded_server.api_key) == list(range(1, n + 1))
    logs = relay.logs()
    assert logs.count("refused the API key") == 1, logs
    assert embedded_server.api_key not in logs and "wrong-key" not in logs


def test_transport_error_mode_is_handled_like_body_errors(embedded_server_factory: Any,
                                                          tmp_path: Path) -> None:
    """A server answering in the GRPC status (error_mode transport), legacy API without Batch."""
    server = embedded_server_factory(error_mode="transport")
    routes = '''
[[routes]]
source = "hb"
when = { "json.seq" = "*5" }
channel = "nowhere:x"
[[routes]]
source = "hb"
channel = "chat:index"
'''
    relay = RelayProcess(tmp_path, relay_config(server.address, count=30, interval="0s", routes=routes,
                                                sink='api = "v2"'),
                         env={"SINK_KEY": server.api_key}).start()
    assert relay.wait(60) == 0, relay.logs()
    assert seqs(server.address, "chat:index", server.api_key) == [s for s in range(1, 31) if s % 10 != 5]
    letters = dead_letters(relay)
    assert [(json.loads(d["data"])["seq"], d["error_code"]) for d in letters] == [(5, 102), (15, 102), (25, 102)]


def test_finished_ticker_waits_for_a_late_sink(embedded_server: Any, tmp_path: Path) -> None:
    """Ticks cannot be read again, so a ticker that finished waits for delivery past shutdown_timeout."""
    embedded_server.stop()
    config = relay_config(embedded_server.address, count=100, interval="0s").replace(
        "[sink]", '[relay]\nshutdown_timeout = "1s"\n[sink]')
    relay = RelayProcess(tmp_path, config, env={"SINK_KEY": embedded_server.api_key}).start()
    time.sleep(3)
    assert relay.alive()
    embedded_server.start()
    assert relay.wait(60) == 0, relay.logs()
    assert seqs(embedded_server.address, "chat:index", embedded_server.api_key) == list(range(1, 101))


def test_a_broadcast_over_many_lanes_keeps_every_channel_in_order(embedded_server: Any, tmp_path: Path) -> None:
    """Lanes are per channel: a broadcast to 8 channels is split over the lanes, and every channel
    still gets every tick once, in order."""
    channels = [f"chat:fan-{i}" for i in range(8)]
    routes = '[[routes]]\nsource = "hb"\nchannels = [' + ", ".join(f'"{c}"' for c in channels) + "]\n"
    relay = RelayProcess(tmp_path, relay_config(embedded_server.address, count=3000, interval="0s", routes=routes),
                         env={"SINK_KEY": embedded_server.api_key}).start()
    assert relay.wait(60) == 0, relay.logs()
    for channel in channels:
        pubs = history(embedded_server.address, channel, embedded_server.api_key)
        # History keeps the last 1000; offsets count every publication, so 3000 means none twice.
        assert [json.loads(p.data)["seq"] for p in pubs] == list(range(2001, 3001))
        assert pubs[-1].offset == 3000


def test_a_broadcast_failing_on_every_channel_writes_its_data_once_per_lane(embedded_server: Any,
                                                                             tmp_path: Path) -> None:
    channels = [f"nowhere:{c}" for c in "abcdefghij"]
    routes = '[[routes]]\nsource = "hb"\nchannels = [' + ", ".join(f'"{c}"' for c in channels) + "]\n"
    relay = RelayProcess(tmp_path, relay_config(embedded_server.address, count=3, interval="0s", routes=routes),
                         env={"SINK_KEY": embedded_server.api_key}).start()
    assert relay.wait(60) == 0, relay.logs()
    letters = dead_letters(relay)
    for seq in (1, 2, 3):
        lines = [d for d in letters if json.loads(d["data"])["seq"] == seq]
        assert 1 <= len(lines) <= 4  # at most one line per lane (max_in_flight = 4), not one per channel
        listed = [c for d in lines for c in d.get("channels", [d["channel"]])]
        assert sorted(listed) == channels
        assert {d["error_code"] for d in lines} == {102}
