"""The Redis Streams reader against a real redis-server: what it reads, in which order, what it XACKs,
what a restart with the same consumer name reads first, and what it refuses. The end-to-end
guarantees through `relay run` are in tests/test_redis_e2e.py."""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis
from pydantic import ValidationError

from relay import metrics
from relay.centrifugo_records import full_record
from relay.config import ConfigError, parse_config
from relay.message import Message
from relay.routing import RoutingTable
from relay.sources.engine import SourceEngine
from relay.sources.redis import Config, RedisReader, RedisSourceError, entry_offset
from tests.harness.redis import RedisServer


def RedisSource(name: str, cfg: Config) -> SourceEngine:
    return SourceEngine(name, RedisReader(name, cfg))


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def config(server: RedisServer, streams: list[str], **options: Any) -> Config:
    return Config.model_validate({"type": "redis", "address": server.url, "streams": streams,
                                  "group": options.pop("group", "g"), "commit_interval": "50ms",
                                  "block": "100ms", **options})


class Collector:
    """An emit that keeps what it got; settles only when told."""

    def __init__(self) -> None:
        self.messages: list[Message] = []
        self.arrived = asyncio.Event()

    async def __call__(self, batch: list[Message]) -> None:
        self.messages.extend(batch)
        self.arrived.set()

    async def wait_for(self, count: int, timeout: float = 10.0) -> list[Message]:
        async with asyncio.timeout(timeout):
            while len(self.messages) < count:
                self.arrived.clear()
                await self.arrived.wait()
        return self.messages


@contextlib.asynccontextmanager
async def running(source: SourceEngine) -> AsyncIterator[Collector]:
    collect = Collector()
    task = asyncio.create_task(source.run(collect))
    try:
        yield collect
    finally:
        await source.stop()
        await asyncio.wait_for(task, 10)
        await source.close()


def xadd(server: RedisServer, stream: str, entries: list[dict[str, str]]) -> list[str]:
    with redis.Redis(port=server.port) as client:
        return [client.xadd(stream, fields).decode() for fields in entries]  # type: ignore[arg-type]


def pending_ids(server: RedisServer, stream: str, group: str = "g") -> list[str]:
    with redis.Redis(port=server.port) as client:
        return [p["message_id"].decode() for p in client.xpending_range(stream, group, "-", "+", 10_000)]


async def wait_until(check: Any, timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not check():
            await asyncio.sleep(0.02)


async def test_entries_arrive_in_id_order_with_their_fields(redis_server: RedisServer) -> None:
    stream = unique("s")
    ids = xadd(redis_server, stream, [{"payload": json.dumps({"n": i}), "kind": f"k{i}"} for i in range(1200)])
    async with running(RedisSource("events", config(redis_server, [stream], read_count=100))) as got:
        messages = await got.wait_for(1200)
    assert [m.attributes["offset"] for m in messages] == ids
    assert [m.offset for m in messages] == sorted(entry_offset(i) for i in ids)
    first = messages[0]
    assert (first.stream, first.data, first.attributes["field.kind"]) == (stream, b'{"n": 0}', "k0")
    assert first.position == f"events/{stream}/{entry_offset(ids[0])}"


async def test_only_the_settled_prefix_is_xacked(redis_server: RedisServer) -> None:
    """Through the engine: nothing is XACKed while an earlier entry of the stream is unsettled."""
    stream = unique("s")
    ids = xadd(redis_server, stream, [{"payload": "{}"} for _ in range(5)])
    async with running(RedisSource("events", config(redis_server, [stream]))) as got:
        messages = await got.wait_for(5)
        for i in (1, 3, 4):
            messages[i].settle()
        await asyncio.sleep(0.3)  # several commit rounds
        assert pending_ids(redis_server, stream) == ids
        messages[0].settle()
        messages[2].settle()
        await wait_until(lambda: pending_ids(redis_server, stream) == [])


async def test_a_commit_xacks_what_was_read_before_its_position_in_read_order(
        redis_server: RedisServer) -> None:
    """Claimed entries are older than what was read before them: positions follow the read order."""
    stream = unique("s")
    ids = xadd(redis_server, stream, [{"payload": "{}"} for _ in range(6)])
    with redis.Redis(port=redis_server.port) as client:
        client.xgroup_create(stream, "g", id="0")
        client.xreadgroup("g", "dead", {stream: ">"}, count=2)  # ids 0, 1: left by a dead consumer
    reader = RedisReader("events", config(redis_server, [stream], consumer="alive", visibility_timeout="200ms"))
    await reader.connect()
    try:
        read: list[Message] = []
        async with asyncio.timeout(10):
            while len(read) < 6:
                for batch in await reader.read():
                    read += batch.messages
        order = [m.attributes["offset"] for m in read]
        assert order == ids[2:] + ids[:2]  # the new ones, then the claimed ones
        await reader.commit({stream: read[4].offset})  # everything before the first claimed entry
        assert pending_ids(redis_server, stream) == ids[:2]
        await reader.commit({stream: read[5].offset + 1})
        assert pending_ids(redis_server, stream) == []
    finally:
        await reader.close()


async def test_a_restart_with_the_same_consumer_reads_its_own_pending_entries_first(
        redis_server: RedisServer) -> None:
    stream = unique("s")
    old = xadd(redis_server, stream, [{"payload": json.dumps({"n": i})} for i in range(10)])
    async with running(RedisSource("events", config(redis_server, [stream], consumer="one"))) as got:
        await got.wait_for(10)  # read, never settled: the "crash" leaves them pending
    new = xadd(redis_server, stream, [{"payload": json.dumps({"n": i})} for i in range(10, 15)])
    other = RedisSource("events", config(redis_server, [stream], consumer="two"))
    async with running(other) as got_other:
        await got_other.wait_for(5)
        await asyncio.sleep(0.3)
        # Another consumer gets only the new entries: the pending ones are "one"'s (until claimed).
        assert [m.attributes["offset"] for m in got_other.messages] == new
    async with running(RedisSource("events", config(redis_server, [stream], consumer="one"))) as got:
        messages = await got.wait_for(10)
        await asyncio.sleep(0.3)
    assert [m.attributes["offset"] for m in messages] == old


async def test_entries_a_dead_consumer_left_are_claimed_after_the_visibility_timeout(
        redis_server: RedisServer) -> None:
    stream = unique("s")
    ids = xadd(redis_server, stream, [{"payload": "{}"} for _ in range(20)])
    with redis.Redis(port=redis_server.port) as client:
        client.xgroup_create(stream, "g", id="0")
        client.xreadgroup("g", "dead", {stream: ">"}, count=20)  # read and never acknowledged
    source = RedisSource("events", config(redis_server, [stream], consumer="alive", visibility_timeout="500ms"))
    async with running(source) as got:
        messages = await got.wait_for(20)
        assert [m.attributes["offset"] for m in messages] == ids
        for message in messages:
            message.settle()
        await wait_until(lambda: pending_ids(redis_server, stream) == [])


async def test_entries_held_in_flight_are_not_claimed_by_another_relay(redis_server: RedisServer) -> None:
    stream = unique("s")
    xadd(redis_server, stream, [{"payload": "{}"} for _ in range(5)])
    slow = RedisSource("events", config(redis_server, [stream], consumer="slow", visibility_timeout="600ms"))
    async with running(slow) as got_slow:
        await got_slow.wait_for(5)  # held unsettled for longer than the visibility timeout
        other = RedisSource("events", config(redis_server, [stream], consumer="other", visibility_timeout="600ms"))
        async with running(other) as got_other:
            await asyncio.sleep(2.0)
            assert got_other.messages == []


async def test_centrifugo_forms_and_poison_entries(redis_server: RedisServer) -> None:
    stream = unique("s")
    command = {"method": "publish", "payload": {"channel": "chat:a", "data": {"n": 1}}}
    xadd(redis_server, stream, [
        {"payload": json.dumps(command)},
        {"method": "broadcast", "payload": json.dumps({"channels": ["chat:a", "chat:b"], "data": {"n": 2}})},
        {"payload": '{"n": 3}', "centrifugo-channels": "chat:c", "centrifugo-tag-region": "eu"},
        {"payload": "not json"},
        {"other": "x"},
    ])
    async with running(RedisSource("events", config(redis_server, [stream], format="centrifugo"))) as got:
        messages = await got.wait_for(5)
    intents = [full_record(m.record) if m.record is not None else None for m in messages]
    assert intents[0] is not None and (intents[0].channels, intents[0].data) == (("chat:a",), b'{"n": 1}')  # as written
    assert intents[1] is not None and (intents[1].method, intents[1].channels) == (
        "broadcast", ("chat:a", "chat:b"))
    assert intents[2] is not None and (intents[2].channels, dict(intents[2].tags)) == (("chat:c",), {"region": "eu"})
    assert "not JSON" in messages[3].error
    assert messages[4].error == "entry has no field 'payload'"


async def test_template_fields_stream_offset_field_and_json(redis_server: RedisServer) -> None:
    stream = unique("s")
    [entry_id] = xadd(redis_server, stream, [{"payload": '{"room": "r1"}', "user": "u7"}])
    cfg = parse_config(f'''
[sources.events]
type = "redis"
address = "{redis_server.url}"
streams = ["{stream}"]
[[routes]]
source = "events"
channel = "chat:{{{{ json.room }}}}:{{{{ field.user }}}}"
data = '{{"s": "{{{{ stream }}}}", "id": "{{{{ offset }}}}"}}'
''')
    async with running(RedisSource("events", config(redis_server, [stream]))) as got:
        [message] = await got.wait_for(1)
    [publication], rejected = RoutingTable(cfg.routes, cfg.relay.unmatched).route(message)
    assert not rejected
    assert publication.channels == ["chat:r1:u7"]
    assert json.loads(publication.data) == {"s": stream, "id": entry_id}


async def test_group_pending_and_lag_are_measured(redis_server: RedisServer) -> None:
    stream = unique("s")
    xadd(redis_server, stream, [{"payload": "{}"} for _ in range(30)])
    source = RedisSource("events", config(redis_server, [stream], read_count=10,
                                          max_in_flight_per_stream=10, visibility_timeout="300ms"))
    async with running(source) as got:
        await got.wait_for(10)
        await wait_until(lambda: metrics.REDIS_PENDING.labels(stream=stream)._value.get() == 10)
        await wait_until(lambda: metrics.REDIS_LAG.labels(stream=stream)._value.get() == 20)


async def test_a_wrong_password_fails_at_once_naming_the_user(redis_server: RedisServer,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    user = unique("relay")
    with redis.Redis(port=redis_server.port) as client:
        client.acl_setuser(user, enabled=True, passwords=["+right"], keys=["*"], commands=["+@all"],
                           channels=["*"])
    stream = unique("s")
    xadd(redis_server, stream, [{"payload": "{}"}])
    monkeypatch.setenv("RELAY_TEST_REDIS_PASSWORD", "wrong")
    source = RedisSource("events", config(redis_server, [stream], username=user,
                                          password_env="RELAY_TEST_REDIS_PASSWORD"))
    with pytest.raises(RedisSourceError, match=r"refused us.*check username and the password") as err:
        await asyncio.wait_for(source.run(Collector()), 10)
    assert "wrong" not in str(err.value)
    monkeypatch.setenv("RELAY_TEST_REDIS_PASSWORD", "right")
    source = RedisSource("events", config(redis_server, [stream], username=user,
                                          password_env="RELAY_TEST_REDIS_PASSWORD"))
    async with running(source) as got:
        await got.wait_for(1)


@pytest.mark.parametrize(("options", "word"), [
    ({"address": "http://127.0.0.1:6379"}, "redis://"),
    ({"address": "redis://:secret@127.0.0.1:6379"}, "password_env"),
    ({"streams": []}, "at least 1"),
    ({"streams": ["a", "a"]}, "twice"),
    ({"visibility_timeout": "0s"}, "more than 0s"),
    ({"start_from": "newest"}, "earliest"),
])
def test_bad_config_is_refused(options: dict[str, Any], word: str) -> None:
    with pytest.raises(ValidationError, match=word):
        Config.model_validate({"type": "redis", "streams": ["s"], **options})


def test_relay_check_names_the_key(tmp_path: Any) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config('[sources.q]\ntype = "redis"\nstreams = ["s"]\naddress = "redis://:pw@h:1"\n')
    assert "sources.q.address" in str(err.value)
    assert "pw" not in str(err.value).replace("password", "")
