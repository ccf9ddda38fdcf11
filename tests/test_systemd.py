"""sd_notify and the unit file: a real unix datagram socket as NOTIFY_SOCKET, a real relay process,
real signals, and systemd's own `systemd-analyze verify` on deploy/relay.service."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from relay.systemd import SystemdNotifier
from tests.harness.centrifugo import RealCentrifugo
from tests.harness.configs import sink_table, ticker_tables
from tests.harness.history import wait_for_count
from tests.harness.notify_socket import NotifySocket
from tests.harness.relay_process import RelayProcess
from tests.harness.require import unavailable

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "deploy" / "relay.service"


def ticker_config(server: RealCentrifugo, channel: str, *, interval: str = "50ms", count: int = 0) -> str:
    return sink_table(server.grpc_address) + ticker_tables(channel, count=count, interval=interval)


# -- the notifier itself, in process ---------------------------------------------------------------

def test_without_notify_socket_every_call_is_a_no_op() -> None:
    notifier = SystemdNotifier({})
    assert not notifier.enabled
    assert notifier.ready("x") is False
    assert notifier.watchdog() is False
    assert notifier.watchdog_interval is None


@pytest.mark.parametrize("abstract", [True, False], ids=["abstract", "path"])
def test_messages_reach_the_socket(abstract: bool) -> None:
    with NotifySocket(abstract=abstract) as sock:
        notifier = SystemdNotifier(sock.env)
        assert notifier.ready("running:\n2 sources")
        assert notifier.status("draining")
        assert notifier.reloading()
        assert notifier.stopping()
        sock.wait_for("STOPPING")
        notifier.close()
        assert sock.received("READY") == [{"READY": "1", "STATUS": "running: 2 sources"}]
        assert sock.received("STATUS", "draining") == [{"STATUS": "draining"}]
        reloading = sock.received("RELOADING")
        assert len(reloading) == 1 and int(reloading[0]["MONOTONIC_USEC"]) > 0
        assert sock.keys() == ["READY", "RELOADING", "STOPPING"]


def test_a_vanished_socket_does_not_raise() -> None:
    sock = NotifySocket(abstract=True)
    notifier = SystemdNotifier(sock.env)
    sock.close()
    assert notifier.ready() is False
    assert notifier.ready() is False


def test_watchdog_interval_comes_from_watchdog_usec_for_this_process_only() -> None:
    socket_env = {"NOTIFY_SOCKET": "@x"}
    assert SystemdNotifier({**socket_env, "WATCHDOG_USEC": "30000000"}).watchdog_interval == 30.0
    mine = {**socket_env, "WATCHDOG_USEC": "4000000", "WATCHDOG_PID": str(os.getpid())}
    assert SystemdNotifier(mine).watchdog_interval == 4.0
    other = {**socket_env, "WATCHDOG_USEC": "4000000", "WATCHDOG_PID": str(os.getpid() + 1)}
    assert SystemdNotifier(other).watchdog_interval is None
    assert SystemdNotifier({**socket_env, "WATCHDOG_USEC": "0"}).watchdog_interval is None
    assert SystemdNotifier({**socket_env, "WATCHDOG_USEC": "soon"}).watchdog_interval is None


async def test_watchdog_pings_at_half_the_interval() -> None:
    with NotifySocket() as sock:
        notifier = SystemdNotifier({**sock.env, "WATCHDOG_USEC": "100000"})
        feeder = asyncio.create_task(notifier.keep_watchdog_fed())
        await asyncio.to_thread(sock.wait_for, "WATCHDOG", after=9, timeout=10)  # the tenth ping
        feeder.cancel()
        times = sock.times("WATCHDOG")
    gaps = [b - a for a, b in itertools.pairwise(times[:10])]
    # One at once, then every 50 ms: never as late as the 100 ms systemd waits, never in a burst.
    assert max(gaps) < 0.1 and sum(gaps) / len(gaps) >= 0.04, gaps


# -- a real relay process --------------------------------------------------------------------------

def test_ready_only_after_the_first_sink_round_trip(fresh_centrifugo: RealCentrifugo, tmp_path: Path) -> None:
    server = fresh_centrifugo
    server.stop()
    with NotifySocket() as sock:
        relay = RelayProcess(tmp_path, ticker_config(server, "chat:ready"),
                             env={**sock.env, "CENTRIFUGO_GRPC_API_KEY": server.api_key}).start()
        try:
            relay.wait_http()
            status = sock.wait_for("STATUS", "waiting for Centrifugo at " + server.grpc_address,
                                   timeout=15, prefix=True)
            assert "UNAVAILABLE" in status["STATUS"]
            time.sleep(1.0)  # sources run, messages wait: still not ready
            assert sock.received("READY") == []
            assert relay.get("/readyz")[0] == 503
            server.start()
            ready = sock.wait_for("READY", timeout=15)
            assert ready["STATUS"].startswith("running: 1 source(s), 1 route(s)")
            assert relay.get("/readyz") == (200, "ready\n")
            # What was emitted while the sink was down arrives too, in order.
            seqs = [json.loads(p.data)["seq"] for p in
                    wait_for_count(server.grpc_address, "chat:ready", 20, server.api_key, timeout=15)]
            assert seqs == list(range(1, len(seqs) + 1))
        finally:
            relay.stop()
        assert len(sock.received("READY")) == 1


def test_watchdog_keeps_coming_and_sigterm_says_stopping_then_exits_0(
        real_centrifugo: RealCentrifugo, tmp_path: Path) -> None:
    server = real_centrifugo
    with NotifySocket() as sock:
        relay = RelayProcess(tmp_path, ticker_config(server, "chat:watchdog"),
                             env={**sock.env, "CENTRIFUGO_GRPC_API_KEY": server.api_key,
                                  "WATCHDOG_USEC": "400000"}).start()
        try:
            sock.wait_for("READY", timeout=20)
            first = len(sock.received("WATCHDOG"))
            sock.wait_for("WATCHDOG", after=first + 4, timeout=10)
            during = sock.times("WATCHDOG")[first:]
        finally:
            code = relay.terminate()
        assert code == 0
    assert len(during) >= 4, during  # every 200 ms
    assert max(b - a for a, b in itertools.pairwise(during)) < 0.4  # never late enough for systemd to act
    stopping = sock.received("STOPPING")
    assert len(stopping) == 1 and stopping[0]["STATUS"].startswith("draining in-flight publications")
    keys = [k for k in sock.keys() if k != "WATCHDOG"]  # noqa: SIM118 - a list of notification keys
    assert keys == ["READY", "STOPPING"]
    assert relay.logs().rstrip().endswith("daemon: stopped")


# -- the unit file ---------------------------------------------------------------------------------

def test_the_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        unavailable("systemd-analyze not found (Debian: apt-get install systemd)")
    text = UNIT.read_text()
    # verify insists that ExecStart's binary exists; point it at this checkout's, nothing else changes.
    installed = Path(sys.executable).parent / "relay"
    assert "/usr/local/bin/relay run -c /etc/centrifugo-relay/config.toml" in text
    unit = tmp_path / "relay.service"
    unit.write_text(text.replace("/usr/local/bin/relay", str(installed)))
    out = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert (out.returncode, out.stdout + out.stderr) == (0, "")


def test_the_unit_asks_for_what_the_spec_promises() -> None:
    settings = dict(re.findall(r"^(\w+)=(.*)$", UNIT.read_text(), re.MULTILINE))
    assert settings["Type"] == "notify"
    assert settings["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert settings["DynamicUser"] == "yes" and settings["StateDirectory"] == "relay"
    assert settings["ProtectSystem"] == "strict" and settings["NoNewPrivileges"] == "yes"
    assert settings["Restart"] == "on-failure" and settings["WatchdogSec"] == "30s"
    # The stop timeout must leave room for the default shutdown_timeout (10s) drain.
    assert int(settings["TimeoutStopSec"].removesuffix("s")) > 10
