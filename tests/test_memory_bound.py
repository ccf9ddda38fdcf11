"""Memory is bounded in bytes (`[relay] max_buffer_bytes`): a real `relay run` reading 1 MB messages
while Centrifugo is down holds about the budget, not a message count's worth of them."""

from __future__ import annotations

import time
from pathlib import Path

from tests.harness.configs import sink_table, ticker_tables
from tests.harness.ports import free_port
from tests.harness.relay_process import RelayProcess

MIB = 1024 * 1024


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_rss_stays_flat_with_1mb_messages_while_the_sink_is_down(tmp_path: Path) -> None:
    budget_mib = 32
    data = '{"seq": {{ seq }}, "pad": "' + "x" * MIB + '"}'
    config = (f'[relay]\nstate_dir = "{tmp_path}/state"\nmax_buffer_bytes = "{budget_mib}MiB"\n'
              + sink_table(f"127.0.0.1:{free_port()}")  # nothing listens: the sink is down
              + ticker_tables("chat:big", data=data))
    relay = RelayProcess(tmp_path, config, env={"CENTRIFUGO_GRPC_API_KEY": "k"}).start()
    try:
        relay.wait_http()
        assert relay.process is not None
        deadline = time.monotonic() + 60
        while relay.metric("relay_in_flight", 'source="tick"') < budget_mib:
            assert time.monotonic() < deadline, relay.logs()[-2000:]
            assert rss_mib(relay.process.pid) < 400, "RSS grew before the budget was reached"
            time.sleep(0.05)
        # The budget is full. Ticks could be made at memory speed; they must not be.
        samples = []
        in_flight = []
        for _ in range(40):
            samples.append(rss_mib(relay.process.pid))
            in_flight.append(relay.metric("relay_in_flight", 'source="tick"'))
            time.sleep(0.1)
    finally:
        relay.stop()
    # The budget, plus at most one read (1 MiB or one message) past it.
    assert max(in_flight) <= budget_mib + 2, in_flight
    # Each held message costs its data and the routed copy: the budget twice, plus the interpreter.
    assert max(samples) < 120 + 2 * budget_mib + 40, samples
    assert max(samples) - samples[0] < 24, f"RSS still growing: {samples}"
