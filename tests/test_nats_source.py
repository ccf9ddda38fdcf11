"""The NATS JetStream reader against a real nats-server: stream order, acks only of the settled
prefix, redeliveries dropped, a dead reader's in-flight messages delivered before newer ones."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import nats
import pytest
import trustme
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from relay import sources
from relay.message import Message
from relay.sources.engine import SourceEngine
from relay.sources.nats import Config, NatsReader, NatsSourceError
from tests.harness.nats import NatsServer


def unique(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:8]}".upper()


def engine(config: Config) -> SourceEngine:
    built = sources.build("jet", config, Path("."))
    assert isinstance(built, SourceEngine) and isinstance(built.reader, NatsReader)
    return built


def source(server: NatsServer, stream: str, **options: object) -> SourceEngine:
    fields = {"type": "nats", "url": server.url, "stream": stream, "durable": "relay", **options}
    return engine(Config.model_validate(fields))


class Reader:
    """A source running in the background; `got` is everything it emitted, in order."""

    def __init__(self, src: SourceEngine | None) -> None:
        self.src = src
        self.got: list[Message] = []
        self.task: asyncio.Task[None] | None = None

    async def emit(self, batch: list[Message]) -> None:
        self.got.extend(batch)

    async def wait_for(self, count: int, timeout: float = 20) -> None:
        async with asyncio.timeout(timeout):
            while len(self.got) < count:
                assert self.task is not None and not self.task.done(), self.task and self.task.result()
                await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def running(src: SourceEngine) -> AsyncIterator[Reader]:
    reader = Reader(src)
    reader.task = asyncio.create_task(src.run(reader.emit))
    try:
        yield reader
    finally:
        await src.stop()
        await reader.task
        await src.close()


@pytest.fixture
def stream(nats_server: NatsServer) -> str:
    name = unique("S")
    nats_server.create_stream(name, [f"{name.lower()}.>"])
    return name


def publish(server: NatsServer, stream: str, n: int, start: int = 0) -> None:
    server.publish([(f"{stream.lower()}.room-{i % 3}", b'{"i": %d}' % i, {}) for i in range(start, start + n)])


async def wait_info(server: NatsServer, stream: str, check: object, timeout: float = 15) -> None:
    async with asyncio.timeout(timeout):
        while True:
            info = await asyncio.to_thread(server.consumer_info, stream, "relay")
            if info is not None and check(info):  # type: ignore[operator]
                return
            await asyncio.sleep(0.05)


async def test_reads_in_stream_order_and_acks_only_the_settled_prefix(nats_server: NatsServer, stream: str) -> None:
    publish(nats_server, stream, 10)
    async with running(source(nats_server, stream)) as reader:
        await reader.wait_for(10)
        got = reader.got
        assert [m.offset for m in got] == list(range(1, 11))
        assert [m.attributes["subject"] for m in got[:3]] == [f"{stream.lower()}.room-{i}" for i in range(3)]
        assert got[4].position == f"jet/{stream}/5"
        for m in got[:2] + got[3:]:
            m.settle()  # all but the third
        await asyncio.sleep(1.0)  # five commit intervals: nothing from the third on may be acked
        info = await asyncio.to_thread(nats_server.consumer_info, stream, "relay")
        assert info is not None
        assert info.ack_floor.stream_seq <= 2 and info.num_ack_pending >= 8, info
        got[2].settle()
        await wait_info(nats_server, stream, lambda i: i.ack_floor.stream_seq == 10 and i.num_ack_pending == 0)


async def test_a_redelivery_after_ack_wait_is_not_emitted_again(nats_server: NatsServer, stream: str) -> None:
    publish(nats_server, stream, 20)
    async with running(source(nats_server, stream, ack_wait="500ms")) as reader:
        await reader.wait_for(20)
        await wait_info(nats_server, stream, lambda i: i.num_redelivered >= 20)  # the server sent them again
        await asyncio.sleep(0.5)
        assert [m.offset for m in reader.got] == list(range(1, 21))
        for m in reader.got:
            m.settle()
        await wait_info(nats_server, stream, lambda i: i.ack_floor.stream_seq == 20 and i.num_ack_pending == 0)


async def test_an_ack_lost_on_the_way_is_sent_again_and_its_message_not_emitted_twice(
        nats_server: NatsServer, stream: str) -> None:
    publish(nats_server, stream, 10)
    src = source(nats_server, stream, ack_wait="500ms")
    async with running(src) as reader:
        await reader.wait_for(10)
        wire = src.reader._wire  # type: ignore[attr-defined]
        sent = wire.ack
        wire.ack = lambda replies: None  # written as the connection died: the server never read them
        for m in reader.got[:5]:
            m.settle()
        async with asyncio.timeout(10):
            while len(src.reader._in_flight) > 5:  # type: ignore[attr-defined]  # committed
                await asyncio.sleep(0.02)
        wire.ack = sent
        await wait_info(nats_server, stream, lambda i: i.num_redelivered >= 5)  # they came back
        for m in reader.got[5:]:
            m.settle()
        await wait_info(nats_server, stream, lambda i: i.ack_floor.stream_seq == 10 and i.num_ack_pending == 0)
        assert [m.offset for m in reader.got] == list(range(1, 11))


async def test_deliveries_lost_with_the_pull_connection_come_before_newer_ones(
        nats_server: NatsServer, stream: str) -> None:
    publish(nats_server, stream, 5)
    src = source(nats_server, stream, ack_wait="3s")  # well beyond the reconnect
    async with running(src) as reader:
        await reader.wait_for(5)
        wire = src.reader._wire  # type: ignore[attr-defined]
        wire._transport.pause_reading()  # what the server sends now stays in the socket...
        publish(nats_server, stream, 5, start=5)
        await wait_info(nats_server, stream, lambda i: i.delivered.stream_seq == 10)
        wire._transport.abort()  # ...and is lost with it: the server sends it again after ack_wait
        async with asyncio.timeout(10):
            while src.reader._wire is wire or not src.reader._wire.connected:  # type: ignore[attr-defined]
                await asyncio.sleep(0.02)
        publish(nats_server, stream, 5, start=10)  # delivered at once on the new connection
        await in_order_then_acked(nats_server, stream, reader, 15)


async def in_order_then_acked(nats_server: NatsServer, stream: str, reader: Reader, n: int) -> None:
    """Messages 1..n arrive in stream order and nothing after them for a moment (no message twice);
    once settled, the durable's ack floor is n with nothing pending."""
    await reader.wait_for(n)
    await asyncio.sleep(0.3)  # the window in which a duplicate or a late one would show
    assert [m.offset for m in reader.got] == list(range(1, n + 1))
    for m in reader.got:
        m.settle()
    await wait_info(nats_server, stream, lambda i: i.ack_floor.stream_seq == n and i.num_ack_pending == 0)


async def test_a_dead_readers_in_flight_messages_come_before_newer_ones(nats_server: NatsServer, stream: str) -> None:
    publish(nats_server, stream, 10)
    first = source(nats_server, stream, ack_wait="1s")
    async with running(first) as reader:
        await reader.wait_for(10)
        first.reader._in_flight.clear()  # type: ignore[attr-defined]  # dies: none of them acked
    publish(nats_server, stream, 10, start=10)
    async with running(source(nats_server, stream)) as reader:
        await in_order_then_acked(nats_server, stream, reader, 20)


async def test_use_existing_refuses_a_missing_durable_and_a_missing_stream(nats_server: NatsServer,
                                                                          stream: str) -> None:
    with pytest.raises(NatsSourceError, match="durable 'relay' does not exist"):
        await source(nats_server, stream, use_existing=True).run(Reader(None).emit)  # type: ignore[arg-type]
    with pytest.raises(NatsSourceError, match="stream 'NOPE' does not exist"):
        await source(nats_server, "NOPE").run(Reader(None).emit)  # type: ignore[arg-type]


async def test_an_existing_durable_with_a_smaller_max_ack_pending_than_fetch_batch_is_read(
        nats_server: NatsServer, stream: str) -> None:
    # The durable Centrifugo's own consumer makes (max_ack_pending 100), taken over with use_existing:
    # the server refuses a pull request for more than that (409 Exceeded MaxAckPending).
    nc = await nats.connect(nats_server.url)
    try:
        await nc.jetstream().add_consumer(stream, ConsumerConfig(
            durable_name="relay", ack_policy=AckPolicy.EXPLICIT, deliver_policy=DeliverPolicy.ALL,
            max_ack_pending=100))
    finally:
        await nc.close()
    publish(nats_server, stream, 1000)
    src = source(nats_server, stream, use_existing=True, fetch_batch=500)
    async with running(src) as reader:
        async with asyncio.timeout(30):
            while len(reader.got) < 1000:
                for m in reader.got:
                    m.settle()
                await asyncio.sleep(0.02)
        assert [m.offset for m in reader.got] == list(range(1, 1001))
        for m in reader.got:
            m.settle()
        await wait_info(nats_server, stream, lambda i: i.ack_floor.stream_seq == 1000 and i.num_ack_pending == 0)
    # Acked as often as the durable's own window needs (the config's max_ack_pending is 20,000).
    assert src.reader.commit_interval == 0.002  # type: ignore[attr-defined]


async def test_a_second_client_on_an_ack_all_durable_stops_the_relay_before_its_acks_cover_that_clients(
        nats_server: NatsServer, stream: str) -> None:
    # The relay makes its durable with ack_policy all: one ack settles everything before it. Another
    # client pulling from it too would lose what it holds when it dies, as the relay's acks pass it.
    publish(nats_server, stream, 200)
    src = source(nats_server, stream, fetch_batch=20)
    reader = Reader(src)

    async def emit(batch: list[Message]) -> None:
        reader.got.extend(batch)
        for m in batch:
            m.settle()

    reader.task = asyncio.create_task(src.run(emit))
    await reader.wait_for(200)
    info = await asyncio.to_thread(nats_server.consumer_info, stream, "relay")
    assert info is not None and info.config.ack_policy == AckPolicy.ALL
    nc = await nats.connect(nats_server.url)
    taken: list[int] = []
    published = 200
    try:
        rogue = await nc.jetstream().pull_subscribe_bind("relay", stream)
        async with asyncio.timeout(30):
            while not reader.task.done():
                # More than the relay's two pull requests take, so the other client's gets some.
                await asyncio.to_thread(publish, nats_server, stream, 60, published)
                published += 60
                with contextlib.suppress(nats.errors.TimeoutError):
                    taken += [m.metadata.sequence.stream for m in await rogue.fetch(1, timeout=0.2)]
        with pytest.raises(NatsSourceError, match="another client reads durable 'relay' too"):
            await reader.task
        await src.close()  # commits what settled
        assert taken, "the other client got nothing: the test proves nothing"
        info = await asyncio.to_thread(nats_server.consumer_info, stream, "relay")
        assert info is not None and info.ack_floor.stream_seq < min(taken), (info.ack_floor, taken)
        assert info.num_ack_pending >= len(taken)  # still the other client's, none acked by the relay
        assert [m.offset for m in reader.got] == sorted({m.offset for m in reader.got})
        assert not set(taken) & {m.offset for m in reader.got}
    finally:
        await nc.close()


async def reads_one_message(server: NatsServer, options: dict[str, object]) -> None:
    """A message published to a new stream of `server` reaches a source with `options`."""
    name = unique("A")
    await asyncio.to_thread(server.create_stream, name, [f"{name.lower()}.>"])
    await asyncio.to_thread(server.publish, [(f"{name.lower()}.x", b"over the pull connection", {})])
    async with running(source(server, name, **options)) as reader:
        await reader.wait_for(1)
        assert [m.data for m in reader.got] == [b"over the pull connection"]


@pytest.mark.parametrize("flags, good, bad", [
    (("--auth", "s3cret-token"), {"token_env": "RELAY_TEST_NATS_SECRET"}, "s3cret-token"),
    (("--user", "relay", "--pass", "s3cret-pass"), {"username": "relay", "password_env": "RELAY_TEST_NATS_SECRET"},
     "s3cret-pass"),
])
async def test_credentials_work_and_a_wrong_secret_is_a_clear_fatal_error(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, flags: tuple[str, ...], good: dict[str, str],
        bad: str, caplog: pytest.LogCaptureFixture) -> None:
    server = NatsServer.start(tmp_path / "auth", options=flags)
    server.client = {"token": bad} if "token_env" in good else {"user": "relay", "password": bad}
    try:
        monkeypatch.setenv("RELAY_TEST_NATS_SECRET", bad)
        src = engine(Config.model_validate({"type": "nats", "url": server.url, "stream": "NOPE", **good}))
        with pytest.raises(NatsSourceError, match="stream 'NOPE' does not exist"):  # in, so the secret worked
            await src.run(Reader(None).emit)  # type: ignore[arg-type]
        await src.close()
        await reads_one_message(server, good)  # both connections, the pull one too
        monkeypatch.setenv("RELAY_TEST_NATS_SECRET", "wrong")
        src = engine(Config.model_validate({"type": "nats", "url": server.url, "stream": "S", **good}))
        with pytest.raises(NatsSourceError, match="refused our credentials") as refused:
            await asyncio.wait_for(src.run(Reader(None).emit), 20)  # type: ignore[arg-type]
        assert "wrong" not in str(refused.value) and "wrong" not in caplog.text
    finally:
        server.close()


async def test_a_server_that_is_not_up_yet_is_waited_for(tmp_path: Path) -> None:
    server = NatsServer.start(tmp_path / "late")
    server.create_stream("LATE", ["late.>"])
    server.publish([("late.1", b"hello", {})])
    server.kill()  # down when the relay starts; its store keeps the stream
    src = engine(Config.model_validate({"type": "nats", "url": server.url, "stream": "LATE"}))
    try:
        async with running(src) as reader:
            await asyncio.sleep(1.5)
            assert reader.task is not None and not reader.task.done()
            await asyncio.to_thread(server.launch)
            await reader.wait_for(1)
            assert [m.data for m in reader.got] == [b"hello"]
            reader.got[0].settle()
    finally:
        server.close()


async def test_tls_with_the_servers_ca_works_and_an_untrusted_certificate_is_fatal(tmp_path: Path) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    server = NatsServer.start(tmp_path / "tls", options=(
        "--tls", "--tlscert", str(tmp_path / "cert.pem"), "--tlskey", str(tmp_path / "key.pem")))
    try:
        server_url = f"tls://127.0.0.1:{server.port}"
        trusted = engine(Config.model_validate({"type": "nats", "url": server_url, "stream": "NOPE",
                                                          "tls": {"ca_file": str(tmp_path / "ca.pem")}}))
        with pytest.raises(NatsSourceError, match="stream 'NOPE' does not exist"):  # connected over TLS
            await trusted.run(Reader(None).emit)  # type: ignore[arg-type]
        await trusted.close()
        server.client = {"tls": ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))}
        await reads_one_message(server, {"url": server_url, "tls": {"ca_file": str(tmp_path / "ca.pem")}})
        untrusted = engine(Config.model_validate({"type": "nats", "url": server_url, "stream": "S",
                                                            "tls": {}}))
        with pytest.raises(NatsSourceError, match="certificate is not trusted"):
            await asyncio.wait_for(untrusted.run(Reader(None).emit), 20)  # type: ignore[arg-type]
    finally:
        server.close()


def test_relay_check_takes_the_nats_fields_and_refuses_others(tmp_path: Path) -> None:
    def check(channel: str) -> subprocess.CompletedProcess[str]:
        path = tmp_path / "relay.toml"
        path.write_text('[sink]\naddress = "127.0.0.1:1"\n[sources.j]\ntype = "nats"\nstream = "S"\n'
                        f'[[routes]]\nsource = "j"\nchannel = "{channel}"\n')
        return subprocess.run([sys.executable, "-m", "relay", "check", "-c", str(path)], capture_output=True,
                              text=True, timeout=60)
    assert check("chat:{{ subject }}-{{ offset }}-{{ header.room }}-{{ json.a.b }}").returncode == 0
    refused = check("chat:{{ topic }}")
    assert refused.returncode == 2
    assert "never provides {{ topic }}" in refused.stderr + refused.stdout
