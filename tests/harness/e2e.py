"""What the end-to-end tests of each source share: a `relay run` process publishing to the embedded
server, the [relay] and [sink] tables it needs, and the per-room sequences read back from History.

Messages carry `{"s": N}` to `chat:room-K`; a test counts what arrived per room, never from logs.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Sequence
from pathlib import Path

from tests.harness.centrifugo import RealCentrifugo
from tests.harness.embedded import EmbeddedServerProcess
from tests.harness.history import history
from tests.harness.relay_process import RelayProcess

ROOMS = 50
SERVER_KEY_ENV = "RELAY_TEST_SERVER_API_KEY"
TARGET_KEY_ENV = "RELAY_TEST_TARGET_KEY"


def relay_and_sink_tables(workdir: Path, server: EmbeddedServerProcess) -> list[str]:
    """[relay] and [sink] lines: state and dead letters in `workdir`, quick retries to `server`."""
    return [
        "[relay]", f'state_dir = "{workdir}/state"', 'shutdown_timeout = "5s"',
        "[sink]", f'address = "{server.address}"', f'api_key_env = "{SERVER_KEY_ENV}"',
        f'dead_letter = "{workdir}/dead-letter.jsonl"',
        'retry = { initial_backoff = "20ms", max_backoff = "500ms" }',
    ]


def relay(workdir: Path, config: str, server: EmbeddedServerProcess) -> RelayProcess:
    """A `relay run` process (not started) with the server's API key in its environment."""
    return RelayProcess(workdir, config, env={SERVER_KEY_ENV: server.api_key}, metrics=False)


def sequences(server: EmbeddedServerProcess, rooms: int = ROOMS) -> dict[int, list[int]]:
    """Each room's `s` values in the order its History holds them."""
    return {k: [json.loads(p.data)["s"] for p in history(server.address, f"chat:room-{k}", server.api_key)]
            for k in range(rooms)}


def delivered(server: EmbeddedServerProcess) -> int:
    return sum(len(v) for v in sequences(server).values())


def kill_at_random_moments(proc: RelayProcess, server: EmbeddedServerProcess, rng: random.Random,
                           kills: int) -> list[int]:
    """Start `proc` `kills` times; each run must deliver something, then dies by kill -9 at a random
    moment. Returns how many publications had arrived at each kill (0 first)."""
    delivered_at_kill = [0]
    for _ in range(kills):
        proc.start()
        deadline = time.monotonic() + 30
        while delivered(server) <= delivered_at_kill[-1]:
            assert time.monotonic() < deadline, proc.logs()[-3000:]
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 1.0))
        proc.kill()
        delivered_at_kill.append(delivered(server))
    return delivered_at_kill


def target_tables(workdir: Path, target: RealCentrifugo) -> list[str]:
    """[relay] and [sink] lines for a relay publishing to a real Centrifugo (`relay_to` runs it)."""
    return [
        "[relay]", f'state_dir = "{workdir}/state"',
        "[sink]", f'address = "{target.grpc_address}"', f'api_key_env = "{TARGET_KEY_ENV}"',
        f'dead_letter = "{workdir}/dead-letter.jsonl"',
    ]


def relay_until_done(workdir: Path, config: str, target: RealCentrifugo, servers: Sequence[RealCentrifugo],
                     done: Sequence[str], timeout: float = 60.0) -> None:
    """Run a relay to `target` until every server's History holds each `done` channel, then stop it.

    The comparisons with Centrifugo's own consumers end their input with these marker channels."""
    proc = RelayProcess(workdir, config, env={TARGET_KEY_ENV: target.api_key}, metrics=False)
    proc.start()
    try:
        deadline = time.monotonic() + timeout
        for server in servers:
            for channel in done:
                while not history(server.grpc_address, channel, server.api_key):
                    assert time.monotonic() < deadline, proc.logs()[-2000:] + server.log_tail()
                    time.sleep(0.1)
    finally:
        proc.stop()
