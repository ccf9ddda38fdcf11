"""The source engine with an in-memory reader and an in-memory emit: caps, bytes, commits, connect
retries, revoke, end of input. Real sources on the engine are tested by their own tests."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from pathlib import Path

import pytest

from relay.message import Message
from relay.sources.engine import EMIT_CHUNK, Batch, ByteBudget, SourceEngine, SourceUnavailable
from tests.harness.configs import sink_table
from tests.harness.ports import free_port
from tests.harness.relay_process import RelayProcess


class ListReader:
    """Reads `total` messages per stream in batches of `size`; records what the engine did."""

    def __init__(self, streams: Iterable[str] = ("s",), total: int = 100, size: int = 10,
                 data: bytes = b"x", pausable: bool = True, fail_connects: int = 0) -> None:
        self.name = "mem"
        self.next = {s: 0 for s in streams}
        self.total, self.size, self.data = total, size, data
        self.commits: list[dict[str, int]] = []
        self.paused: set[str] = set()
        self.pause_calls = 0
        self.fail_connects = fail_connects
        self.connects = 0
        self.closed = 0
        self.commit_interval = 0.01
        self.revoke: Callable[[Iterable[str]], Awaitable[None]] | None = None
        if pausable:
            self.pause = self._pause
            self.resume = self._resume

    def _pause(self, stream: str) -> None:
        self.paused.add(stream)
        self.pause_calls += 1

    def _resume(self, stream: str) -> None:
        self.paused.discard(stream)

    def bind(self, revoke: Callable[[Iterable[str]], Awaitable[None]]) -> None:
        self.revoke = revoke

    async def connect(self) -> None:
        self.connects += 1
        if self.connects <= self.fail_connects:
            raise SourceUnavailable(f"attempt {self.connects} refused")

    async def read(self) -> Sequence[Batch] | None:
        await asyncio.sleep(0)
        out = []
        for stream, start in self.next.items():
            if stream in self.paused or start >= self.total:
                continue
            end = min(self.total, start + self.size)
            out.append(Batch(stream, [Message("mem", self.data, stream, offset=i) for i in range(start, end)], end))
            self.next[stream] = end
        if not out and all(n >= self.total for n in self.next.values()):
            return None
        return out

    async def commit(self, positions: dict[str, int]) -> None:
        self.commits.append(dict(positions))

    async def close(self) -> None:
        self.closed += 1


class Collect:
    """An emit that keeps what it got; settling is up to the test."""

    def __init__(self) -> None:
        self.got: list[Message] = []
        self.calls: list[int] = []

    async def __call__(self, batch: list[Message]) -> None:
        self.calls.append(len(batch))
        self.got.extend(batch)


async def until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.001)


def last_commit(reader: ListReader, stream: str) -> int | None:
    for commit in reversed(reader.commits):
        if stream in commit:
            return commit[stream]
    return None


async def test_everything_is_emitted_in_chunks_and_committed_contiguously_at_close() -> None:
    reader = ListReader(total=1000, size=300)
    engine = SourceEngine("mem", reader, max_in_flight=10_000)
    emit = Collect()
    await engine.run(emit)
    assert [m.offset for m in emit.got] == list(range(1000))
    assert max(emit.calls) <= EMIT_CHUNK
    # Settle out of order, leaving a hole at 500: nothing past it may be committed.
    for msg in reversed(emit.got):
        if msg.offset != 500:
            msg.settle()
    await engine.close()
    assert last_commit(reader, "s") == 500
    assert reader.closed == 1


async def test_a_commit_interval_the_reader_learns_on_connecting_is_the_one_used() -> None:
    # A NATS durable made elsewhere tells its window only once connected; the engine must then
    # commit at the reader's new pace, not the one it read when it was built.
    reader = ListReader(total=1000, size=10)  # more than it may read: the input does not end
    reader.commit_interval = 3600.0
    learn = reader.connect

    async def connect() -> None:
        await learn()
        reader.commit_interval = 0.01

    reader.connect = connect  # type: ignore[method-assign]
    engine = SourceEngine("mem", reader, max_in_flight=10)
    emit = Collect()
    task = asyncio.create_task(engine.run(emit))
    await until(lambda: len(emit.got) == 10)
    for msg in emit.got[:10]:
        msg.settle()
    await until(lambda: (last_commit(reader, "s") or 0) >= 10)  # within seconds, not an hour
    await engine.stop()
    await task


async def test_a_stream_pauses_at_the_cap_exactly_and_resumes_at_half() -> None:
    reader = ListReader(streams=("a", "b"), total=10_000, size=7)
    engine = SourceEngine("mem", reader, max_in_flight=50)
    emit = Collect()
    task = asyncio.create_task(engine.run(emit))
    await until(lambda: engine.in_flight() == {"a": 50, "b": 50} and len(emit.got) == 100)
    assert reader.paused == {"a", "b"}
    await asyncio.sleep(0.05)  # nothing more is emitted while paused
    assert len(emit.got) == 100
    a = [m for m in emit.got if m.stream == "a"]
    for msg in a[:24]:
        msg.settle()
    assert "a" in reader.paused and engine.in_flight()["a"] == 26
    a[24].settle()
    assert "a" not in reader.paused and "b" in reader.paused
    await until(lambda: engine.in_flight()["a"] == 50)
    offsets = [m.offset for m in emit.got if m.stream == "a"]
    assert offsets == list(range(len(offsets)))  # the batch split at the cap lost nothing
    await engine.stop()
    await task
    await engine.close()
    assert last_commit(reader, "a") == 25


async def test_a_reader_without_pause_is_not_read_while_a_stream_is_at_the_cap() -> None:
    reader = ListReader(total=10_000, size=10, pausable=False)
    engine = SourceEngine("mem", reader, max_in_flight=30)
    emit = Collect()
    task = asyncio.create_task(engine.run(emit))
    await until(lambda: len(emit.got) == 30)
    read_so_far = reader.next["s"]
    await asyncio.sleep(0.05)
    assert reader.next["s"] == read_so_far == 30
    for msg in emit.got[:14]:
        msg.settle()
    await asyncio.sleep(0.05)
    assert len(emit.got) == 30  # 16 unsettled: above half the cap
    emit.got[14].settle()
    await until(lambda: len(emit.got) == 45)
    await engine.stop()
    await task


async def test_the_byte_budget_pauses_every_source_and_resumes_at_half() -> None:
    budget = ByteBudget(limit=10 * 1024)
    one = ListReader(total=1000, size=1, data=b"x" * 1024)
    two = ListReader(total=1000, size=1, data=b"y" * 1024)
    engines = [SourceEngine(f"e{i}", r, budget, max_in_flight=1000) for i, r in enumerate((one, two))]
    emits = [Collect(), Collect()]
    tasks = [asyncio.create_task(e.run(c)) for e, c in zip(engines, emits, strict=True)]
    await until(lambda: budget.over and one.paused and two.paused)
    held = len(emits[0].got) + len(emits[1].got)
    assert budget.used == held * 1024 <= budget.limit + 2 * 1024
    await asyncio.sleep(0.05)
    assert len(emits[0].got) + len(emits[1].got) == held
    for msg in emits[0].got + emits[1].got:
        if budget.used <= budget.limit // 2:
            break
        msg.settle()
    await until(lambda: len(emits[0].got) + len(emits[1].got) > held)
    for engine in engines:
        await engine.stop()
    await asyncio.gather(*tasks)


async def test_connect_is_retried_with_backoff_and_readiness_says_so() -> None:
    reader = ListReader(total=10, fail_connects=3)
    engine = SourceEngine("mem", reader)
    assert engine.readiness() == (False, "connecting to source mem")
    emit = Collect()
    task = asyncio.create_task(engine.run(emit))
    await until(lambda: reader.connects >= 2)
    up, why = engine.readiness()
    assert not up and why.startswith("connecting to source mem: attempt")
    await task
    assert reader.connects == 4 and len(emit.got) == 10 and engine.readiness() == (True, "")


async def test_a_fatal_connect_error_fails_the_source() -> None:
    class Refused(ListReader):
        async def connect(self) -> None:
            raise PermissionError("wrong password")

    with pytest.raises(PermissionError):
        await SourceEngine("mem", Refused()).run(Collect())


async def test_a_lost_connection_reconnects_and_reads_from_the_committed_position() -> None:
    class Flaky(ListReader):
        lost = False

        async def read(self) -> Sequence[Batch] | None:
            if self.next["s"] == 20 and not self.lost:
                self.lost = True
                raise SourceUnavailable("connection reset")
            return await super().read()

        async def connect(self) -> None:
            await super().connect()
            committed = last_commit(self, "s")
            self.next["s"] = committed or 0

    reader = Flaky(total=40, size=10)
    engine = SourceEngine("mem", reader)
    emit = Collect()

    async def settle_all() -> None:
        while True:
            for msg in emit.got:
                msg.settle()
            await asyncio.sleep(0.001)

    settler = asyncio.create_task(settle_all())
    await engine.run(emit)
    settler.cancel()
    assert reader.connects == 2
    offsets = [m.offset for m in emit.got]
    assert sorted(set(offsets)) == list(range(40))


async def test_revoke_commits_settled_positions_and_ignores_late_acks() -> None:
    reader = ListReader(streams=("a", "b"), total=10_000, size=10)
    engine = SourceEngine("mem", reader, max_in_flight=20)
    emit = Collect()
    task = asyncio.create_task(engine.run(emit))
    await until(lambda: engine.in_flight() == {"a": 20, "b": 20})
    a = [m for m in emit.got if m.stream == "a"]
    for msg in a[:10]:
        msg.settle()
    assert reader.revoke is not None
    await reader.revoke(["a"])
    assert reader.commits[-1] == {"a": 10}
    assert "a" not in engine.in_flight()
    for msg in a[10:]:
        msg.settle()  # late: ignored
    await engine.stop()
    await task
    await engine.close()
    assert all("a" not in c for c in reader.commits[-1:]) or reader.commits[-1] == {"a": 10}


def test_readyz_says_connecting_to_the_source_until_its_brokers_answer(tmp_path: Path) -> None:
    """A real `relay run` whose Kafka brokers do not answer: not ready, and /readyz says why."""
    config = (sink_table(f"127.0.0.1:{free_port()}")
              + f'[sources.events]\ntype = "kafka"\nbrokers = ["127.0.0.1:{free_port()}"]\ntopics = ["t"]\n'
              + 'connect_timeout = "60s"\n[[routes]]\nsource = "events"\nchannel = "chat:{{ key }}"\n')
    relay = RelayProcess(tmp_path, config, env={"CENTRIFUGO_GRPC_API_KEY": "k"}).start()
    try:
        relay.wait_http()
        deadline = time.monotonic() + 30
        while True:
            status, body = relay.get("/readyz")
            if "bootstrap" in body or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert status == 503
        assert body.startswith("not ready: connecting to source events: KafkaConnectionError"), body
        assert "Unable to bootstrap" in body
        assert relay.metric("relay_ready") == 0
    finally:
        relay.stop()


async def test_a_readers_pending_counts_become_the_source_lag_metric() -> None:
    from relay import metrics

    class Pending(ListReader):
        async def pending(self) -> dict[str, int]:
            return {s: self.total - n for s, n in self.next.items()}

    reader = Pending(streams=("p0", "p1"), total=100, size=10)
    engine = SourceEngine("lagged", reader, max_in_flight=30)
    task = asyncio.create_task(engine.run(Collect()))

    def lag(stream: str) -> float | None:
        return metrics.REGISTRY.get_sample_value("relay_source_lag", {"source": "lagged", "stream": stream})

    await until(lambda: lag("p0") == 70 and lag("p1") == 70)  # 30 read (the cap), 70 to go
    assert reader.revoke is not None
    await reader.revoke(["p1"])
    assert lag("p1") is None
    await engine.stop()
    await task
