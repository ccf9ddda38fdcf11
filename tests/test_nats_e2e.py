"""NATS JetStream → `relay run` → `relay serve` (or real Centrifugo), end to end, with a real
nats-server, real processes and real SIGKILLs. What arrived is read back from History.

Messages are Centrifugo commands on `chat.room-K` publishing `{"k": K, "s": n}` to `chat:room-K`,
`n` counting up per room, so a channel's History must be exactly `0, 1, 2, ...`.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.harness.e2e import (
    SERVER_KEY_ENV,
    delivered,
    relay,
    relay_and_sink_tables,
    relay_until_done,
    sequences,
    target_tables,
)
from tests.harness.embedded import EmbeddedServerProcess
from tests.harness.history import history
from tests.harness.nats import Item, NatsServer
from tests.harness.relay_process import RelayProcess

ROOMS = 50


def unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:8]}".upper()


def command(method: str, payload: Any) -> bytes:
    return json.dumps({"method": method, "payload": payload}).encode()


class Rooms:
    """Commands for chat:room-0..49 with a per-room sequence number, in publishing order."""

    def __init__(self, rooms: int = ROOMS) -> None:
        self.rooms = rooms
        self.next_seq = [0] * rooms
        self.count = 0

    def items(self, n: int) -> list[Item]:
        out = []
        for _ in range(n):
            k = self.count % self.rooms
            body = command("publish", {"channel": f"chat:room-{k}", "data": {"k": k, "s": self.next_seq[k]}})
            out.append((f"chat.room-{k}", body, {}))
            self.next_seq[k] += 1
            self.count += 1
        return out


def relay_config(workdir: Path, nats: NatsServer, server: EmbeddedServerProcess, stream: str,
                 **options: Any) -> str:
    source = {"type": "nats", "url": nats.url, "stream": stream, "subjects": ["chat.>"],
              "durable": "relay", "format": "centrifugo", "ack_wait": "3s", **options}
    lines = [
        *relay_and_sink_tables(workdir, server),
        "[sources.jet]", *(f"{k} = {json.dumps(v)}" for k, v in source.items()),
    ]
    return "\n".join(lines) + "\n"


def wait_settled(nats: NatsServer, stream: str, rooms: Rooms, server: EmbeddedServerProcess,
                 proc: RelayProcess, timeout: float = 120) -> dict[int, list[int]]:
    """Until every room holds its last number and the durable has nothing pending or unacked."""
    deadline = time.monotonic() + timeout
    seen: dict[int, list[int]] = {}
    while time.monotonic() < deadline:
        seen = sequences(server, rooms.rooms)
        if all(seen[k] and seen[k][-1] >= rooms.next_seq[k] - 1 for k in range(rooms.rooms)):
            info = nats.consumer_info(stream, "relay")
            if info is not None and info.num_pending == 0 and info.num_ack_pending == 0:
                return seen
        time.sleep(0.25)
    raise AssertionError(f"{sum(map(len, seen.values()))} of {rooms.count} delivered; durable: "
                         f"{nats.consumer_info(stream, 'relay')}\n{proc.logs()[-3000:]}")


def assert_exactly_once_in_order(seen: dict[int, list[int]], rooms: Rooms) -> None:
    for k in range(rooms.rooms):
        assert seen[k] == list(range(rooms.next_seq[k])), f"chat:room-{k}: {seen[k]}"


class Publisher(threading.Thread):
    """Publishes in chunks while the test kills relays: the stream is live, not a backlog."""

    def __init__(self, nats: NatsServer, rooms: Rooms, total: int, chunk: int, pause: float) -> None:
        super().__init__(name="publisher", daemon=True)
        self.batches = [rooms.items(min(chunk, total - i)) for i in range(0, total, chunk)]
        self.nats, self.pause = nats, pause
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            for batch in self.batches:
                self.nats.publish(batch)
                time.sleep(self.pause)
        except BaseException as err:
            self.error = err


@pytest.fixture
def own_nats(nats_restartable: NatsServer) -> tuple[NatsServer, str]:
    nats_restartable.create_stream("CHAT", ["chat.>"])
    return nats_restartable, "CHAT"


def test_20000_commands_relay_killed_three_times_each_arrives_once_in_order(
        own_nats: tuple[NatsServer, str], embedded_server: EmbeddedServerProcess, tmp_path: Path) -> None:
    nats, stream = own_nats
    rooms = Rooms()
    publisher = Publisher(nats, rooms, total=20_000, chunk=200, pause=0.1)
    proc = relay(tmp_path, relay_config(tmp_path, nats, embedded_server, stream), embedded_server)
    publisher.start()
    kills = [0]
    try:
        for _ in range(3):
            proc.start()
            deadline = time.monotonic() + 60
            while delivered(embedded_server) < kills[-1] + 1000:  # each run makes progress, then dies
                assert time.monotonic() < deadline, proc.logs()[-3000:]
                time.sleep(0.05)
            proc.kill()
            kills.append(delivered(embedded_server))
        proc.start()
        publisher.join(120)
        assert publisher.error is None, publisher.error
        seen = wait_settled(nats, stream, rooms, embedded_server, proc)
    finally:
        proc.stop()
    assert kills[-1] < rooms.count, f"the last kill came after the end: {kills}"
    assert_exactly_once_in_order(seen, rooms)


def test_two_relays_sharing_an_explicit_durable_one_killed_nothing_lost_nothing_twice(
        own_nats: tuple[NatsServer, str], embedded_server: EmbeddedServerProcess, tmp_path: Path) -> None:
    # ack_policy = "explicit": each relay acks its own messages only, so they may share the durable
    # (order across them is not kept, as with Centrifugo's consumer run several times).
    nats, stream = own_nats
    rooms = Rooms()
    publisher = Publisher(nats, rooms, total=5000, chunk=100, pause=0.05)
    procs = [relay(tmp_path / name, relay_config(tmp_path / name, nats, embedded_server, stream,
                                                 ack_policy="explicit"), embedded_server)
             for name in ("a", "b")]
    publisher.start()
    try:
        for proc in procs:
            proc.start()
        deadline = time.monotonic() + 60
        while delivered(embedded_server) < 1000:
            assert time.monotonic() < deadline, procs[0].logs()[-3000:]
            time.sleep(0.05)
        procs[0].kill()  # its messages in flight come back to the other after ack_wait
        killed_at = delivered(embedded_server)
        publisher.join(120)
        assert publisher.error is None, publisher.error
        deadline = time.monotonic() + 120
        while True:
            info = nats.consumer_info(stream, "relay")
            if (delivered(embedded_server) >= rooms.count and info is not None
                    and info.num_pending == 0 and info.num_ack_pending == 0):
                break
            assert time.monotonic() < deadline, f"{delivered(embedded_server)} of {rooms.count}; {info}"
            time.sleep(0.25)
        seen = sequences(embedded_server, rooms.rooms)
    finally:
        for proc in procs:
            proc.stop()
    assert killed_at < rooms.count
    assert nats.consumer_info(stream, "relay").config.ack_policy == "explicit"  # type: ignore[union-attr]
    for k in range(rooms.rooms):  # each exactly once (idempotency keys), in whichever order
        assert sorted(seen[k]) == list(range(rooms.next_seq[k])), f"chat:room-{k}: {seen[k]}"


def test_nats_server_restarted_mid_stream_nothing_lost(own_nats: tuple[NatsServer, str],
                                                     embedded_server: EmbeddedServerProcess,
                                                     tmp_path: Path) -> None:
    nats, stream = own_nats
    rooms = Rooms()
    nats.publish(rooms.items(30_000))  # enough that the relay is still reading when the restart comes
    proc = relay(tmp_path, relay_config(tmp_path, nats, embedded_server, stream, max_ack_pending=500,
                                        fetch_batch=100), embedded_server).start()
    try:
        deadline = time.monotonic() + 60
        while delivered(embedded_server) < 1000:
            assert time.monotonic() < deadline, proc.logs()[-3000:]
            time.sleep(0.02)
        nats.restart()
        before = delivered(embedded_server)
        assert before < rooms.count, "the restart came after the end"
        nats.publish(rooms.items(2000))
        seen = wait_settled(nats, stream, rooms, embedded_server, proc)
        assert proc.alive()
    finally:
        proc.stop()
    assert_exactly_once_in_order(seen, rooms)
    assert "reconnected" in proc.logs()


def test_poison_messages_go_to_the_dead_letter_file_and_the_rest_flows(
        own_nats: tuple[NatsServer, str], embedded_server: EmbeddedServerProcess, tmp_path: Path) -> None:
    nats_server, chat_stream = own_nats
    rooms = Rooms(3)
    items = rooms.items(300)
    items[50] = ("chat.room-2", b"not json {", {})
    items[100] = ("chat.room-1", command("disconnect", {"user": "42"}), {})
    items[150] = ("chat.room-0", command("publish", {"channel": "ghost:room-0", "data": {}}), {})
    nats_server.publish(items)
    proc = relay(tmp_path, relay_config(tmp_path, nats_server, embedded_server, chat_stream),
                 embedded_server).start()
    try:
        deadline = time.monotonic() + 60
        while True:
            info = nats_server.consumer_info(chat_stream, "relay")
            if info is not None and info.ack_floor.stream_seq == 300 and info.num_ack_pending == 0:
                break
            assert time.monotonic() < deadline, proc.logs()[-3000:]
            time.sleep(0.1)
    finally:
        proc.stop()
    seen = sequences(embedded_server, 3)
    expected = {k: [s for s in range(100)] for k in range(3)}
    expected[2].remove(16)  # item 50 is room 2's 16th
    expected[1].remove(33)  # item 100
    expected[0].remove(50)  # item 150
    assert seen == expected
    letters = {d["position"]: d for d in map(json.loads, (tmp_path / "dead-letter.jsonl").read_text().splitlines())}
    assert set(letters) == {f"jet/{chat_stream}/{seq}" for seq in (51, 101, 151)}
    assert "not JSON" in letters[f"jet/{chat_stream}/51"]["reason"]
    assert "'disconnect' is not supported" in letters[f"jet/{chat_stream}/101"]["reason"]
    assert letters[f"jet/{chat_stream}/151"]["error_code"] == 102


@pytest.mark.centrifugo
def test_centrifugo_format_matches_centrifugos_own_nats_jetstream_consumer(
        nats_server: NatsServer, centrifugo_factory: Any, tmp_path: Path) -> None:
    """The same stream, read by real Centrifugo v6.9.1's `nats_jetstream` consumers and by the relay
    (into a second real Centrifugo): every channel ends up with the same publications, data and tags."""
    stream = unique("CMP")
    nats_server.create_stream(stream, ["cmd.>", "hdr.>"])
    dup = {"centrifugo-idempotency-key": "k"}
    nats_server.publish([(f"cmd.{i}", body, headers) for i, (body, headers) in enumerate([
        (command("publish", {"channel": "chat:cmp", "data": {"n": 1}, "tags": {"t": "1"}}), {}),
        (command("broadcast", {"channels": ["chat:cmp", "chat:cmp2"], "data": {"n": 2}}), {}),
        (command("publish", {"channel": "chat:cmp", "data": {"n": 3}, "idempotency_key": "dup"}), {}),
        (command("publish", {"channel": "chat:cmp", "data": {"n": 3}, "idempotency_key": "dup"}), {}),
        (b'{"channel": "chat:cmp", "data": {"n": 4}}', {"centrifugo-method": "publish"}),
        (command("publish", {"channel": "chat:cmp", "b64data": "eyJuIjogNX0="}), {}),  # {"n": 5}
        (b"not json {", {}),
        (command("disconnect", {"user": "42"}), {}),
        (command("publish", {"channel": "ghost:cmp", "data": {"n": 0}}), {}),  # unknown namespace: 102
        (command("publish", {"channel": "chat:cmp", "data": {"n": 6}}), {}),
        (command("publish", {"channel": "chat:cmp-done", "data": {}}), {}),
    ])] + [(f"hdr.{i}", body, headers) for i, (body, headers) in enumerate([
        (b'{"n": 10}', {"centrifugo-channels": "chat:hdr", "centrifugo-tag-region": "eu",
                        "centrifugo-tag-tier": "gold"}),
        (b'{"n": 11}', {"centrifugo-channels": "chat:hdr,chat:hdr2", **dup}),
        (b'{"n": 11}', {"centrifugo-channels": "chat:hdr,chat:hdr2", **dup}),
        (b'{"n": 12}', {"centrifugo-channels": "chat:hdr", "centrifugo-delta": "false",
                        "centrifugo-version": "3", "centrifugo-version-epoch": "e1"}),
        (b'{"n": 13}', {"centrifugo-channels": "chat:hdr2", "centrifugo-idempotency-key": "other"}),
        (b"{}", {"centrifugo-channels": "chat:hdr-done"}),
    ])])

    def consumer(name: str, subject: str, **options: Any) -> dict[str, Any]:
        return {"name": name, "enabled": True, "type": "nats_jetstream",
                "nats_jetstream": {"url": nats_server.url, "stream_name": stream, "subjects": [subject],
                                   "durable_consumer_name": name, "deliver_policy": "all", **options}}

    native = centrifugo_factory(config_overrides={"consumers": [
        consumer("cf_cmd", "cmd.>"), consumer("cf_hdr", "hdr.>", publication_data_mode={"enabled": True})]})
    target = centrifugo_factory()
    config = "\n".join([
        *target_tables(tmp_path, target),
        "[sources.jet]", 'type = "nats"', 'format = "centrifugo"', f'url = "{nats_server.url}"',
        f'stream = "{stream}"', 'subjects = ["cmd.>", "hdr.>"]', 'durable = "relay"',
    ]) + "\n"
    relay_until_done(tmp_path, config, target, (native, target), ("chat:cmp-done", "chat:hdr-done"))
    for channel in ("chat:cmp", "chat:cmp2", "chat:hdr", "chat:hdr2"):
        theirs = [(p.data, dict(p.tags)) for p in history(native.grpc_address, channel, native.api_key)]
        ours = [(p.data, dict(p.tags)) for p in history(target.grpc_address, channel, target.api_key)]
        assert theirs, channel
        assert ours == theirs, channel
    letters = [json.loads(line) for line in (tmp_path / "dead-letter.jsonl").read_text().splitlines()]
    assert sorted(d["position"] for d in letters) == [f"jet/{stream}/{seq}" for seq in (7, 8, 9)]


def test_format_data_routes_see_subject_offset_headers_and_json(
        own_nats: tuple[NatsServer, str], embedded_server: EmbeddedServerProcess, tmp_path: Path) -> None:
    nats_server, chat_stream = own_nats
    nats_server.publish([(f"chat.room-{i % 2}", json.dumps({"room": f"r{i % 2}", "n": i}).encode(), {"who": f"u{i}"})
                         for i in range(6)])
    config = relay_config(tmp_path, nats_server, embedded_server, chat_stream, format="data") + "\n".join([
        "[[routes]]", 'source = "jet"', 'channel = "chat:{{ json.room }}"', 'when = { subject = "chat.room-*" }',
        'tags = { subject = "{{ subject }}", seq = "{{ offset }}", who = "{{ header.who }}" }']) + "\n"
    proc = RelayProcess(tmp_path, config, env={SERVER_KEY_ENV: embedded_server.api_key}).start()
    try:
        proc.wait_http()
        deadline = time.monotonic() + 60
        labels = 'consumer="relay",source="jet"'

        def drained() -> bool:
            shown = f"relay_nats_pending{{{labels}}}" in proc.get("/metrics")[1]
            return shown and proc.metric("relay_nats_pending", labels) == 0 == proc.metric(
                "relay_nats_ack_pending", labels) and len(history(embedded_server.address, "chat:r1",
                                                                  embedded_server.api_key)) == 3

        while not drained():
            assert time.monotonic() < deadline, proc.logs()[-3000:]
            time.sleep(0.1)
    finally:
        proc.stop()
    got = [(json.loads(p.data)["n"], dict(p.tags)) for p in history(embedded_server.address, "chat:r1",
                                                                     embedded_server.api_key)]
    assert got == [(n, {"subject": "chat.room-1", "seq": str(n + 1), "who": f"u{n}"}) for n in (1, 3, 5)]
