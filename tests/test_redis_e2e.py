"""Redis Streams → `relay run` → `relay serve`, end to end, with a real redis-server, real processes and
real SIGKILLs. What arrived is read back from the server's History, never from logs.

Entries are Centrifugo commands `{"method": "publish", "payload": {"channel": "chat:room-K",
"data": {"k": K, "s": n}}}` where `n` counts up per channel, so a channel's History must be exactly
`0, 1, 2, ...`: nothing lost, nothing twice, in order.
"""

from __future__ import annotations

import json
import os
import random
import signal
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.harness.e2e import (
    delivered,
    kill_at_random_moments,
    relay,
    relay_and_sink_tables,
    relay_until_done,
    sequences,
    target_tables,
)
from tests.harness.embedded import EmbeddedServerProcess
from tests.harness.history import history
from tests.harness.redis import RedisServer
from tests.harness.relay_process import RelayProcess

KEYS = 50


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


class Commands:
    """Centrifugo publish commands for chat:room-0..49, each channel with its own sequence."""

    def __init__(self, keys: int = KEYS) -> None:
        self.keys = keys
        self.next_seq = [0] * keys
        self.count = 0

    def entries(self, n: int) -> list[dict[str, str]]:
        out = []
        for _ in range(n):
            k = self.count % self.keys
            payload = {"channel": f"chat:room-{k}", "data": {"k": k, "s": self.next_seq[k]}}
            out.append({"payload": json.dumps({"method": "publish", "payload": payload})})
            self.next_seq[k] += 1
            self.count += 1
        return out


def add(server: RedisServer, stream: str, entries: list[dict[str, str]], ids: list[str] | None = None) -> None:
    """XADD the entries, with ids given (an entry already added under its id is left as it is) or not."""
    with redis.Redis(port=server.port) as client:
        pipe = client.pipeline(transaction=False)
        for i, fields in enumerate(entries):
            pipe.xadd(stream, fields, id=ids[i] if ids else "*")  # type: ignore[arg-type]
        for result in pipe.execute(raise_on_error=False):
            if isinstance(result, Exception) and "equal or smaller" not in str(result):
                raise result


class Producer(threading.Thread):
    """Adds entries in chunks while the test kills things: the stream is live, not a backlog."""

    def __init__(self, server: RedisServer, stream: str, commands: Commands, total: int, chunk: int,
                 pause: float) -> None:
        super().__init__(name="producer", daemon=True)
        self.batches = [commands.entries(min(chunk, total - i)) for i in range(0, total, chunk)]
        self.server, self.stream, self.pause = server, stream, pause
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            last_ms = 0
            for batch in self.batches:
                # Ids fixed before the first try: when Redis is killed after adding a batch but before
                # answering, trying again must not add the batch twice (the relay would rightly
                # deliver both copies). Later than anything added before the producer started.
                last_ms = max(int(time.time() * 1000) + 1, last_ms + 1)
                ids = [f"{last_ms}-{i + 1}" for i in range(len(batch))]
                while True:
                    try:
                        add(self.server, self.stream, batch, ids)
                        break
                    except redis.ConnectionError:  # the test restarts Redis: try again
                        time.sleep(0.1)
                time.sleep(self.pause)
        except BaseException as err:
            self.error = err


def relay_config(workdir: Path, server: RedisServer, sink: EmbeddedServerProcess, stream: str, group: str,
                 **source: Any) -> str:
    options = {"format": "centrifugo", "visibility_timeout": "3s", "commit_interval": "100ms",
               "block": "200ms", **source}
    lines = [
        *relay_and_sink_tables(workdir, sink),
        "[sources.events]", 'type = "redis"', f'address = "{server.url}"', f'streams = ["{stream}"]',
        f'group = "{group}"',
        *(f"{k} = {json.dumps(v)}" for k, v in options.items()),
    ]
    return "\n".join(lines) + "\n"








def wait_delivered(sink: EmbeddedServerProcess, commands: Commands, relays: list[RelayProcess],
                   timeout: float = 90.0) -> dict[int, list[int]]:
    """Poll History until every channel holds each of its sequence numbers."""
    deadline = time.monotonic() + timeout
    seen: dict[int, list[int]] = {}
    while time.monotonic() < deadline:
        seen = sequences(sink, commands.keys)
        if all(len(set(seen[k])) >= commands.next_seq[k] for k in range(commands.keys)):
            return seen
        time.sleep(0.25)
    have = sum(len(v) for v in seen.values())
    logs = "".join(r.logs()[-2000:] for r in relays)
    raise AssertionError(f"{have} of {commands.count} publications after {timeout}s\n{logs}")


def assert_exactly_once_in_order(seen: dict[int, list[int]], commands: Commands) -> None:
    for k in range(commands.keys):
        assert seen[k] == list(range(commands.next_seq[k])), f"chat:room-{k}"


def pending(server: RedisServer, stream: str, group: str) -> int:
    with redis.Redis(port=server.port) as client:
        try:
            return int(client.xpending(stream, group)["pending"])
        except redis.ResponseError:  # NOGROUP: the relay has not created it yet
            return 0


def wait_pending_empty(server: RedisServer, stream: str, group: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while (left := pending(server, stream, group)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert left == 0, f"{left} entries still pending in group {group}"


def test_20000_entries_with_three_kill9s_arrive_once_in_order_and_pending_ends_empty(
        redis_server: RedisServer, embedded_server: EmbeddedServerProcess, tmp_path: Path) -> None:
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    stream, group = unique("s"), unique("g")
    commands = Commands()
    producer = Producer(redis_server, stream, commands, total=20_000, chunk=500, pause=0.25)
    # A long visibility_timeout: only re-reading its own pending entries (id 0) after each restart
    # can bring back what the killed relay had read, not claiming idle entries.
    proc = relay(tmp_path, relay_config(tmp_path, redis_server, embedded_server, stream, group,
                                        consumer="relay-1", visibility_timeout="10m"), embedded_server)
    producer.start()
    delivered_at_kill = kill_at_random_moments(proc, embedded_server, rng, kills=3)
    producer.join(120)
    assert producer.error is None
    proc.start()
    try:
        seen = wait_delivered(embedded_server, commands, [proc])
        wait_pending_empty(redis_server, stream, group)
    finally:
        proc.stop()
    assert_exactly_once_in_order(seen, commands)
    assert delivered_at_kill[-1] < commands.count, f"the last kill came after the end: {delivered_at_kill} " \
                                                   f"(seed {seed})"


@pytest.mark.parametrize("exclusive", [False, True], ids=["shared", "exclusive"])
def test_two_relays_in_one_group_one_killed_its_pending_entries_are_claimed(
        redis_server: RedisServer, embedded_server: EmbeddedServerProcess, tmp_path: Path, exclusive: bool) -> None:
    """Shared: both relays read the stream; each entry once. Exclusive: one owner at a time; each
    entry once and in order per channel across the takeover."""
    stream, group = unique("s"), unique("g")
    commands = Commands()
    producer = Producer(redis_server, stream, commands, total=10_000, chunk=500, pause=0.1)
    first = relay(tmp_path / "a", relay_config(tmp_path / "a", redis_server, embedded_server, stream, group,
                                               consumer="a", exclusive=exclusive), embedded_server).start()
    if exclusive:  # the first relay owns the stream before the second one starts
        deadline = time.monotonic() + 30
        while "now the only reader" not in first.logs():
            assert time.monotonic() < deadline, first.logs()[-2000:]
            time.sleep(0.05)
    second = relay(tmp_path / "b", relay_config(tmp_path / "b", redis_server, embedded_server, stream, group,
                                                consumer="b", exclusive=exclusive), embedded_server).start()
    try:
        producer.start()
        deadline = time.monotonic() + 30
        with redis.Redis(port=redis_server.port) as client:
            # Kill the first relay while it holds entries it read and did not XACK: freeze it
            # (SIGSTOP) when it holds some, so that it cannot XACK them before the kill -9.
            assert first.process is not None
            while True:
                assert time.monotonic() < deadline, first.logs()[-2000:]
                time.sleep(0.02)
                if not pending(redis_server, stream, group) or not delivered(embedded_server):
                    continue
                os.kill(first.process.pid, signal.SIGSTOP)
                left_by_a = client.xpending_range(stream, group, "-", "+", 100_000, consumername="a")
                if left_by_a:
                    break
                os.kill(first.process.pid, signal.SIGCONT)
            first.kill()
        assert left_by_a, "the killed relay held nothing: the test proves nothing"
        producer.join(120)
        assert producer.error is None
        seen = wait_delivered(embedded_server, commands, [second])
        wait_pending_empty(redis_server, stream, group)
        assert "claimed" in second.logs()
    finally:
        for proc in (first, second):
            if proc.alive():
                proc.stop()
    # The embedded server drops a repeated idempotency key (stream + entry id) as Centrifugo does.
    if exclusive:
        assert_exactly_once_in_order(seen, commands)
    else:  # two readers of one stream: each channel gets every entry once, not necessarily in order
        for k in range(commands.keys):
            assert sorted(seen[k]) == list(range(commands.next_seq[k])), f"chat:room-{k}"


def test_redis_restarted_mid_stream_and_poison_entries_to_dead_letters(
        own_redis_server: RedisServer, embedded_server: EmbeddedServerProcess, tmp_path: Path) -> None:
    server = own_redis_server
    stream, group = unique("s"), unique("g")
    commands = Commands()
    poison = [{"payload": "not json"}, {"other": "no payload field"},
              {"payload": json.dumps({"method": "publish", "payload": {"data": {}}})},  # no channel
              {"payload": json.dumps({"method": "publish", "payload": {"channel": "ghost:x", "data": {}}})}]
    add(server, stream, commands.entries(2000))
    with redis.Redis(port=server.port) as client:
        poison_ids = [client.xadd(stream, fields).decode() for fields in poison]  # type: ignore[arg-type]
    producer = Producer(server, stream, commands, total=8000, chunk=400, pause=0.1)
    proc = relay(tmp_path, relay_config(tmp_path, server, embedded_server, stream, group), embedded_server)
    proc.start()
    try:
        producer.start()
        deadline = time.monotonic() + 30
        while delivered(embedded_server) < 3000:
            assert time.monotonic() < deadline, proc.logs()[-3000:]
            time.sleep(0.05)
        server.restart(down_for=1.5)
        producer.join(120)
        assert producer.error is None
        seen = wait_delivered(embedded_server, commands, [proc])
        wait_pending_empty(server, stream, group)
        assert proc.alive(), proc.logs()[-3000:]
        assert "connection lost" in proc.logs()
    finally:
        proc.stop()
    assert_exactly_once_in_order(seen, commands)
    letters = [json.loads(line) for line in (tmp_path / "dead-letter.jsonl").read_text().splitlines()]
    positions = sorted({d["position"] for d in letters})
    from relay.sources.redis import entry_offset
    assert positions == sorted(f"events/{stream}/{entry_offset(i)}" for i in poison_ids)


@pytest.fixture
def centrifugo_stream(redis_server: RedisServer) -> str:
    return unique("cf")


def test_identical_histories_with_centrifugos_own_redis_stream_consumer(
        redis_server: RedisServer, centrifugo_factory: Any, tmp_path: Path) -> None:
    """The same entries, read by real Centrifugo's redis_stream consumer and by the relay (into a
    second real Centrifugo): every channel ends up with the same publications, data and tags."""
    def command(method: str, payload: Any) -> str:
        return json.dumps({"method": method, "payload": payload})

    stream = unique("cf")
    entries: list[dict[str, str]] = [
        {"payload": command("publish", {"channel": "chat:cmp", "data": {"n": 1}, "tags": {"t": "1"}})},
        {"payload": command("broadcast", {"channels": ["chat:cmp", "chat:cmp2"], "data": {"n": 2}})},
        {"payload": command("publish", {"channel": "chat:cmp", "data": {"n": 3}, "idempotency_key": "dup"})},
        {"payload": command("publish", {"channel": "chat:cmp", "data": {"n": 3}, "idempotency_key": "dup"})},
        {"method": "publish", "payload": json.dumps({"channel": "chat:cmp", "data": {"n": 4}})},
        {"payload": command("publish", {"channel": "chat:cmp", "b64data": "eyJuIjogNn0="})},  # {"n": 6}
        {"payload": command("publish", {"channel": "ghost:cmp", "data": {"n": 0}})},  # unknown namespace
        *({"payload": command("publish", {"channel": f"chat:many{i % 5}", "data": {"i": i}})}
          for i in range(500)),
        {"payload": command("publish", {"channel": "chat:cmp", "data": {"n": 7}})},
        {"payload": command("publish", {"channel": "chat:cmp-done", "data": {}})},
    ]
    pubdata = unique("pd")
    dup = {"centrifugo-idempotency-key": "k"}
    pubdata_entries: list[dict[str, str]] = [
        {"payload": '{"n": 10}', "centrifugo-channels": "chat:hdr", "centrifugo-tag-region": "eu"},
        {"payload": '{"n": 11}', "centrifugo-channels": "chat:hdr,chat:hdr2", **dup},
        {"payload": '{"n": 11}', "centrifugo-channels": "chat:hdr,chat:hdr2", **dup},
        {"payload": '{"n": 12}', "centrifugo-channels": "chat:hdr", "centrifugo-delta": "false"},
        {"payload": "{}", "centrifugo-channels": "chat:hdr-done"},
    ]
    add(redis_server, stream, entries)
    add(redis_server, pubdata, pubdata_entries)
    with redis.Redis(port=redis_server.port) as client:
        for name in (stream, pubdata):
            client.xgroup_create(name, "centrifugo", id="0")  # Centrifugo would start at $

    def consumer(name: str, streams: list[str], **options: Any) -> dict[str, Any]:
        return {"name": name, "enabled": True, "type": "redis_stream",
                "redis_stream": {"address": [redis_server.url.rsplit("/", 1)[0]], "streams": streams,
                                 "consumer_group": "centrifugo", **options}}

    native = centrifugo_factory(config_overrides={"consumers": [
        consumer("redis_commands", [stream]),
        consumer("redis_pubdata", [pubdata], publication_data_mode={"enabled": True})]})
    target = centrifugo_factory()
    config = "\n".join([
        *target_tables(tmp_path, target),
        "[sources.events]", 'type = "redis"', 'format = "centrifugo"', f'address = "{redis_server.url}"',
        f'streams = ["{stream}", "{pubdata}"]', 'group = "relay"',
    ]) + "\n"
    relay_until_done(tmp_path, config, target, (native, target), ("chat:cmp-done", "chat:hdr-done"))
    channels = ["chat:cmp", "chat:cmp2", "chat:hdr", "chat:hdr2", *(f"chat:many{i}" for i in range(5))]
    for channel in channels:
        theirs = [(p.data, dict(p.tags))  # the bytes: data as written
                  for p in history(native.grpc_address, channel, native.api_key)]
        ours = [(p.data, dict(p.tags))  # the bytes: data as written
                for p in history(target.grpc_address, channel, target.api_key)]
        assert ours == theirs, channel
        assert theirs, channel
    letters = [json.loads(line) for line in (tmp_path / "dead-letter.jsonl").read_text().splitlines()]
    assert [d["channels"] if "channels" in d else d.get("channel") for d in letters] in (
        [["ghost:cmp"]], ["ghost:cmp"])
