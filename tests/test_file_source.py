"""The file tail on the source engine, on real files: a fake pipeline collects and settles what it emits."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import statistics
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from relay.config import ConfigError, parse_config
from relay.message import Message
from relay.sources.engine import EMIT_CHUNK, READ_MAX, READ_MAX_BYTES, ByteBudget, SourceEngine
from relay.sources.file import Config, FileTail
from relay.sources.file.identity import CHUNK

pytestmark = pytest.mark.timeout(60)

FAST = {"glob_interval": "100ms", "poll_interval": "100ms", "rotate_wait": "300ms",
        "checkpoint_interval": "50ms"}


class Collector:
    """A fake pipeline: keeps every emitted message; settles at once unless `hold` says otherwise."""

    def __init__(self, hold: Callable[[Message], bool] | None = None) -> None:
        self.messages: list[Message] = []
        self.held: list[Message] = []
        self.hold = hold
        self.emits = 0

    async def __call__(self, batch: list[Message]) -> None:
        self.emits += 1
        self.messages.extend(batch)
        for msg in batch:
            if self.hold is not None and self.hold(msg):
                self.held.append(msg)
            else:
                msg.settle()

    def release(self, which: Callable[[Message], bool] = lambda m: True) -> None:
        keep = []
        for msg in self.held:
            if which(msg):
                msg.settle()
            else:
                keep.append(msg)
        self.held = keep

    def lines(self) -> list[bytes]:
        return [m.data for m in self.messages]

    async def wait_for(self, count: int, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.messages) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(self.messages)} of {count} messages after {timeout}s")
            await asyncio.sleep(0.005)


def make_config(pattern: str | list[str], **options: Any) -> Config:
    paths = [pattern] if isinstance(pattern, str) else pattern
    return Config.model_validate({"type": "file", "paths": paths, **FAST, **options})


@contextlib.asynccontextmanager
async def tailing(config: Config, state: Path, collector: Collector, name: str = "logs",
                  crash: bool = False) -> AsyncIterator[FileTail]:
    """Runs a FileTail on the engine; on exit stops and closes it, or with `crash` abandons it as kill -9
    would."""
    source = FileTail(name, config, state)
    engine = SourceEngine(name, source)
    task = asyncio.create_task(engine.run(collector))
    await started(source, task)
    try:
        yield source
    finally:
        if crash:
            for t in [task, *source._tasks]:
                t.cancel()
            await asyncio.gather(task, *source._tasks, return_exceptions=True)
            for f in list(source._files.values()):
                if f.fd >= 0:
                    os.close(f.fd)
        else:
            await engine.stop()
            await asyncio.wait_for(task, 10)
            await engine.close()


async def started(source: FileTail, task: asyncio.Task[None]) -> None:
    """Until the source's first scan is done (or its run failed, which is raised)."""
    ready = asyncio.create_task(source.started.wait())
    await asyncio.wait([ready, task], timeout=10, return_when=asyncio.FIRST_COMPLETED)
    ready.cancel()
    if task.done():
        task.result()
    assert source.started.is_set(), "the file tail did not start in 10 s"


def checkpoint(state: Path, name: str = "logs") -> dict[str, Any]:
    entries: dict[str, Any] = json.loads((state / f"file-{name}.json").read_text())["entries"]
    return {k: v for k, v in entries.items() if ":" not in k}  # not retired: or pending: marks


async def wait_until(check: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met")
        await asyncio.sleep(0.01)


def append(path: Path, data: bytes) -> None:
    with open(path, "ab") as out:
        out.write(data)


def numbered(start: int, stop: int, prefix: str = "line") -> bytes:
    return b"".join(b"%s %d\n" % (prefix.encode(), i) for i in range(start, stop))


def assert_once_in_order(collector: Collector, expected: list[bytes]) -> None:
    """Every expected line exactly once, and in order within each file identity."""
    got = collector.lines()
    assert len(got) == len(expected)
    assert sorted(got) == sorted(expected)
    index = {line: i for i, line in enumerate(expected)}
    by_stream: dict[str, list[int]] = {}
    for msg in collector.messages:
        by_stream.setdefault(msg.stream, []).append(index[msg.data])
    for stream, order in by_stream.items():
        assert order == sorted(order), stream
    for stream in by_stream:
        offsets = [m.offset for m in collector.messages if m.stream == stream]
        assert offsets == sorted(set(offsets))


# -- lines ---------------------------------------------------------------------------------------


async def test_lines_offsets_and_attributes(tmp_path: Path) -> None:
    log = tmp_path / "app.log"
    log.write_bytes(b"one\r\ntwo\n\nfour")
    collector = Collector()
    async with tailing(make_config(str(tmp_path / "*.log")), tmp_path / "state", collector):
        await collector.wait_for(3)
        await asyncio.sleep(0.2)
        assert collector.lines() == [b"one", b"two", b""]  # "four" waits for its newline
        append(log, b" and more\n")
        await collector.wait_for(4)
    msgs = collector.messages
    assert [m.offset for m in msgs] == [5, 9, 10, 24]
    assert msgs[3].data == b"four and more"
    assert [m.attributes["file.offset"] for m in msgs] == [0, 5, 9, 10]
    assert [m.attributes["file.line"] for m in msgs] == [1, 2, 3, 4]
    assert {m.attributes["file.path"] for m in msgs} == {str(log)}
    assert {m.attributes["file.name"] for m in msgs} == {"app.log"}
    assert len({m.stream for m in msgs}) == 1 and all(m.source == "logs" for m in msgs)


async def test_append_latency_is_tens_of_milliseconds(tmp_path: Path) -> None:
    log = tmp_path / "app.log"
    log.write_bytes(b"")
    collector = Collector()
    latencies = []
    config = make_config(str(tmp_path / "*.log"), poll_interval="5s")
    async with tailing(config, tmp_path / "state", collector):
        # Once a line appended now arrives well before the 5 s poll, change events are flowing.
        append(log, b"probe\n")
        await collector.wait_for(1, timeout=4)
        collector.messages.clear()
        for i in range(20):
            started = time.monotonic()
            append(log, b"event %d\n" % i)
            await collector.wait_for(i + 1, timeout=5)
            latencies.append(time.monotonic() - started)
            await asyncio.sleep(0.01)
    assert collector.lines() == [b"event %d" % i for i in range(20)]
    # Change events, not the 5 s poll, deliver them: tens of milliseconds.
    assert statistics.median(latencies) < 0.05, latencies
    assert max(latencies) < 0.5, latencies


async def test_invalid_utf8_passes_through_as_bytes(tmp_path: Path) -> None:
    raw = [b"\xff\xfe not utf-8 \xc3(", b"caf\xc3\xa9", b"\x00\x01 nul", b"latin \xe9t\xe9"]
    (tmp_path / "bin.log").write_bytes(b"\n".join(raw) + b"\n")
    collector = Collector()
    async with tailing(make_config(str(tmp_path / "*.log")), tmp_path / "state", collector):
        await collector.wait_for(4)
    assert collector.lines() == raw
    assert not any(m.error for m in collector.messages)


async def test_5mb_line_becomes_one_oversized_message_and_the_next_line_is_fine(tmp_path: Path) -> None:
    log = tmp_path / "big.log"
    big = b"x" * (5 * 1024 * 1024)
    log.write_bytes(b"before\n" + big + b"\nafter\n")
    collector = Collector()
    async with tailing(make_config(str(tmp_path / "*.log")), tmp_path / "state", collector) as source:
        await collector.wait_for(3)
        # The same line written in pieces (skipped as it arrives, never held whole).
        for _ in range(20):
            append(log, b"y" * 100_000)
            await asyncio.sleep(0.01)
        append(log, b"\nlast\n")
        await collector.wait_for(5)
        stream = collector.messages[0].stream
        await wait_until(lambda: source._by_stream[stream].committed == log.stat().st_size)
    before, oversized, after, oversized2, last = collector.messages
    assert before.data == b"before" and after.data == b"after" and last.data == b"last"
    assert oversized.error.startswith(
        f"line over max_line_bytes ({len(big)} bytes, limit {1024 * 1024})")
    assert "xxxx" in oversized.error
    assert oversized.data == b"x" * 1024  # a short preview, not 5 MB
    assert oversized.offset == 7 + len(big) + 1
    assert oversized.attributes["file.offset"] == 7 and oversized.attributes["file.line"] == 2
    assert after.attributes["file.line"] == 3 and after.attributes["file.offset"] == oversized.offset
    assert oversized2.error.startswith("line over max_line_bytes (2000000 bytes")
    assert oversized2.data == b"y" * 1024 and last.attributes["file.line"] == 5
    assert not after.error and not last.error


# -- where reading starts ----------------------------------------------------------------------


async def test_read_from_beginning_and_end(tmp_path: Path) -> None:
    for mode, expected in (("beginning", [b"old 1", b"old 2", b"partial", b"new"]),
                           ("end", [b"partial", b"new"])):
        folder = tmp_path / mode
        folder.mkdir()
        log = folder / "a.log"
        log.write_bytes(b"old 1\nold 2\npar")
        collector = Collector()
        async with tailing(make_config(str(folder / "*.log"), read_from=mode), folder / "state", collector):
            # tailing() returned after the first scan: where "end" is was fixed before this append.
            append(log, b"tial\nnew\n")
            await collector.wait_for(len(expected))
            await asyncio.sleep(0.1)
        assert collector.lines() == expected
        assert collector.messages[-1].attributes["file.line"] == 4


async def test_file_created_after_start_is_read_from_the_beginning(tmp_path: Path) -> None:
    (tmp_path / "old.log").write_bytes(b"old\n")
    collector = Collector()
    async with tailing(make_config(str(tmp_path / "*.log"), read_from="end"), tmp_path / "state", collector):
        (tmp_path / "new.log").write_bytes(b"first\nsecond\n")
        await collector.wait_for(2)
        await asyncio.sleep(0.1)
    assert collector.lines() == [b"first", b"second"]


async def test_double_star_glob_and_exclude(tmp_path: Path) -> None:
    root = tmp_path / "logs"
    for rel in ("a.log", "x/b.log", "x/y/z/c.log", "x/skip.txt", "x/old.log.gz"):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(rel.encode() + b"\n")
    collector = Collector()
    config = make_config(str(root / "**" / "*.log*"), exclude=["*.gz"])
    async with tailing(config, tmp_path / "state", collector):
        await collector.wait_for(3)
        deep = root / "new" / "deep"
        deep.mkdir(parents=True)
        (deep / "e.log").write_bytes(b"new/deep/e.log\n")
        await collector.wait_for(4)
        await asyncio.sleep(0.2)
    assert sorted(collector.lines()) == [b"a.log", b"new/deep/e.log", b"x/b.log", b"x/y/z/c.log"]


# -- identity --------------------------------------------------------------------------------------


async def test_files_shorter_than_the_fingerprint_are_read_and_keep_their_identity(tmp_path: Path) -> None:
    short, empty = tmp_path / "short.log", tmp_path / "empty.log"
    short.write_bytes(b"a\n")
    empty.write_bytes(b"")
    state = tmp_path / "state"
    collector = Collector()
    async with tailing(make_config(str(tmp_path / "*.log"), fingerprint_bytes=256), state, collector):
        await collector.wait_for(1)
        append(empty, b"b\n")
        await collector.wait_for(2)
        append(short, numbered(0, 100))  # grows far past the 256-byte window
        await collector.wait_for(102)
    streams = {m.attributes["file.name"]: m.stream for m in collector.messages}
    assert len({m.stream for m in collector.messages if m.attributes["file.name"] == "short.log"}) == 1
    assert collector.lines()[:2] == [b"a", b"b"]
    # After a restart the grown file is the same file: nothing is read twice.
    append(short, b"after restart\n")
    again = Collector()
    async with tailing(make_config(str(tmp_path / "*.log"), fingerprint_bytes=256), state, again):
        await again.wait_for(1)
        await asyncio.sleep(0.2)
    assert again.lines() == [b"after restart"]
    assert again.messages[0].stream == streams["short.log"]
    assert again.messages[0].attributes["file.line"] == 102


async def test_two_files_with_identical_first_lines_do_not_collide(tmp_path: Path) -> None:
    one, two = tmp_path / "one.log", tmp_path / "two.log"
    header = b"=== service started ===\n"
    one.write_bytes(header + b"one 1\n")
    two.write_bytes(header + b"two 1\n")
    state = tmp_path / "state"
    collector = Collector()
    async with tailing(make_config(str(tmp_path / "*.log")), state, collector):
        await collector.wait_for(4)
        await asyncio.sleep(0.1)
    by_name: dict[str, list[bytes]] = {}
    for m in collector.messages:
        by_name.setdefault(m.attributes["file.name"], []).append(m.data)
    assert by_name == {"one.log": [header.strip(), b"one 1"], "two.log": [header.strip(), b"two 1"]}
    assert len({m.stream for m in collector.messages}) == 2
    assert len(checkpoint(state)) == 2
    append(one, b"one 2\n")
    append(two, b"two 2\n")
    again = Collector()
    async with tailing(make_config(str(tmp_path / "*.log")), state, again):
        await again.wait_for(2)
        await asyncio.sleep(0.1)
    assert sorted(again.lines()) == [b"one 2", b"two 2"]


async def test_a_thousand_files_in_one_glob(tmp_path: Path) -> None:
    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(1000):
        (folder / f"f{i:04d}.log").write_bytes(b"%d a\n%d b\n%d c\n" % (i, i, i))
    state = tmp_path / "state"
    collector = Collector()
    started = time.monotonic()
    async with tailing(make_config(str(folder / "*.log")), state, collector) as source:
        await collector.wait_for(3000, timeout=20)
        elapsed = time.monotonic() - started
        append(folder / "f0500.log", b"500 d\n")
        await collector.wait_for(3001)
        await wait_until(lambda: len(checkpoint(state)) == 1000 and all(
            e["offset"] > 0 for e in checkpoint(state).values()))
        assert len(source._files) == 1000
    assert elapsed < 10
    assert len({m.stream for m in collector.messages}) == 1000
    assert sorted(collector.lines()) == sorted(
        [b"%d %s" % (i, s) for i in range(1000) for s in (b"a", b"b", b"c")] + [b"500 d"])
    assert collector.emits < 100  # lines of many files share batches


# -- rotation ----------------------------------------------------------------------------------


class Writer:
    """Writes numbered lines to a log and rotates it the two ways logrotate does, while the tail runs."""

    def __init__(self, path: Path, total: int, rotate_every: int, mode: str) -> None:
        self.path, self.total, self.rotate_every, self.mode = path, total, rotate_every, mode
        self.expected: list[bytes] = []
        self.rotations = 0

    def run(self, lines_per_second: float = 10_000) -> None:
        # A rotated file must have lived under its globbed name for a moment (here 0.3 s) to be seen.
        out = open(self.path, "ab", buffering=0)  # noqa: SIM115 - held open across rotations
        started = time.monotonic()
        for i in range(self.total):
            line = b"%s %d" % (self.path.name.encode(), i)
            out.write(line + b"\n")
            self.expected.append(line)
            if i % 100 == 99:
                time.sleep(max(0.0, i / lines_per_second - (time.monotonic() - started)))
            if i % self.rotate_every == self.rotate_every - 1 and i < self.total - 1:
                self.rotations += 1
                rotated = self.path.with_name(f"{self.path.name}.{self.rotations}")
                if self.mode == "rename":
                    os.rename(self.path, rotated)
                    open(self.path, "xb").close()  # logrotate's `create`
                    for j in range(3):  # the writer has not reopened yet: late lines go to the old file
                        late = b"%s late %d-%d" % (self.path.name.encode(), self.rotations, j)
                        out.write(late + b"\n")
                        self.expected.append(late)
                    out.close()
                    out = open(self.path, "ab", buffering=0)  # noqa: SIM115
                else:
                    shutil.copyfile(self.path, rotated)  # copytruncate: copy, then truncate in place
                    os.truncate(self.path, 0)
        out.close()


@pytest.mark.parametrize("mode", ["rename", "copytruncate"])
async def test_rotation_while_writing_loses_and_repeats_nothing(tmp_path: Path, mode: str) -> None:
    log = tmp_path / "app.log"
    log.write_bytes(b"")
    writer = Writer(log, total=20_000, rotate_every=3_000, mode=mode)
    collector = Collector()
    state = tmp_path / "state"
    async with tailing(make_config(str(tmp_path / "*.log")), state, collector) as source:
        await asyncio.to_thread(writer.run)
        await collector.wait_for(len(writer.expected), timeout=20)
        await asyncio.sleep(0.5)  # rotated files finish; nothing more may come
        await wait_until(lambda: len(source._files) == 1 and not source._finishing)
    assert writer.rotations == 6
    assert_once_in_order(collector, writer.expected)
    assert len({m.stream for m in collector.messages}) == 7
    assert len(checkpoint(state)) == 1


async def test_file_deleted_while_being_read_is_read_to_its_end_then_forgotten(tmp_path: Path) -> None:
    log = tmp_path / "doomed.log"
    log.write_bytes(numbered(0, 100_000))
    state = tmp_path / "state"
    collector = Collector(hold=lambda m: True)
    async with tailing(make_config(str(tmp_path / "*.log"), max_in_flight=2_000), state, collector) as source:
        await collector.wait_for(2_000)
        log.unlink()
        while len(collector.messages) < 100_000:
            collector.release()
            await asyncio.sleep(0.005)
        collector.release()
        await wait_until(lambda: not source._files and not source._finishing)
        await wait_until(lambda: checkpoint(state) == {})
    assert collector.lines() == numbered(0, 100_000).splitlines()
    entries = json.loads((state / "file-logs.json").read_text())["entries"]
    assert list(entries) == [k for k in entries if k.startswith("retired:")] and len(entries) == 1


# -- checkpoints and restarts ------------------------------------------------------------------


async def test_checkpoint_never_runs_ahead_of_settled_lines(tmp_path: Path) -> None:
    log = tmp_path / "a.log"
    log.write_bytes(numbered(1, 11))
    state = tmp_path / "state"
    collector = Collector(hold=lambda m: True)
    async with tailing(make_config(str(tmp_path / "*.log")), state, collector):
        await collector.wait_for(10)
        await asyncio.sleep(0.2)
        (entry,) = checkpoint(state).values()
        assert entry["offset"] == 0  # identity saved before the lines went out, at the start
        ends = [m.offset for m in collector.messages]
        collector.release(lambda m: m.data != b"line 4")  # 4 is still in flight
        await wait_until(lambda: next(iter(checkpoint(state).values()))["offset"] == ends[2])
        await asyncio.sleep(0.2)
        assert next(iter(checkpoint(state).values()))["offset"] == ends[2]
        collector.release()
        await wait_until(lambda: next(iter(checkpoint(state).values()))["offset"] == ends[9])
    # The file on disk is one whole JSON document (written via a temporary file and a rename).
    assert not [p for p in state.iterdir() if p.name.endswith(".tmp")]


async def test_restart_resumes_at_the_checkpoint_without_loss_or_duplicates(tmp_path: Path) -> None:
    log = tmp_path / "a.log"
    log.write_bytes(numbered(0, 1000))
    state = tmp_path / "state"
    first = Collector()
    async with tailing(make_config(str(tmp_path / "*.log")), state, first):
        await first.wait_for(1000)
    append(log, numbered(1000, 1500))
    second = Collector()
    async with tailing(make_config(str(tmp_path / "*.log"), read_from="end"), state, second):
        await second.wait_for(500)
        await asyncio.sleep(0.2)
    assert first.lines() + second.lines() == numbered(0, 1500).splitlines()
    assert second.messages[0].stream == first.messages[0].stream
    assert second.messages[0].attributes["file.line"] == 1001


async def test_crash_redelivers_only_unsettled_lines_with_the_same_positions(tmp_path: Path) -> None:
    log = tmp_path / "a.log"
    log.write_bytes(numbered(0, 1000))
    state = tmp_path / "state"
    first = Collector(hold=lambda m: int(m.data.split()[1]) >= 300)
    async with tailing(make_config(str(tmp_path / "*.log")), state, first, crash=True):
        await first.wait_for(1000)
        end_300 = first.messages[299].offset
        await wait_until(lambda: next(iter(checkpoint(state).values()))["offset"] == end_300)
        first.release(lambda m: m.data == b"line 500")  # settled out of order: not committable
        await asyncio.sleep(0.2)
    assert next(iter(checkpoint(state).values()))["offset"] == end_300
    second = Collector()
    async with tailing(make_config(str(tmp_path / "*.log")), state, second):
        await second.wait_for(700)
        await asyncio.sleep(0.2)
    assert second.lines() == numbered(300, 1000).splitlines()
    # The same (stream, offset) as before, so the idempotency keys drop them in Centrifugo.
    before = {(m.stream, m.offset, m.data) for m in first.messages[300:]}
    assert {(m.stream, m.offset, m.data) for m in second.messages} == before


async def test_rename_rotation_while_stopped_is_finished_from_the_rotated_file(tmp_path: Path) -> None:
    log = tmp_path / "a.log"
    log.write_bytes(numbered(0, 100))
    state = tmp_path / "state"
    first = Collector()
    async with tailing(make_config(str(tmp_path / "*.log")), state, first):
        await first.wait_for(100)
    append(log, numbered(100, 150))  # written, never read before the rotation
    os.rename(log, tmp_path / "a.log.1")
    log.write_bytes(numbered(150, 200))
    second = Collector()
    async with tailing(make_config(str(tmp_path / "*.log")), state, second):
        await second.wait_for(100)
        await asyncio.sleep(0.5)
    assert sorted(second.lines()) == sorted(numbered(100, 200).splitlines())
    assert [m.data for m in second.messages if m.attributes["file.name"] == "a.log.1"] == \
        numbered(100, 150).splitlines()
    assert second.messages[0].stream == first.messages[0].stream or \
        first.messages[0].stream in {m.stream for m in second.messages}


async def test_empty_file_renamed_away_while_stopped_is_still_read(tmp_path: Path) -> None:
    log = tmp_path / "a.log"
    log.write_bytes(b"")  # found empty: no identity yet, remembered by inode
    state = tmp_path / "state"
    async with tailing(make_config(str(tmp_path / "*.log")), state, Collector()):
        await asyncio.sleep(0.2)
    append(log, numbered(0, 10))
    os.rename(log, tmp_path / "a.log.1")
    collector = Collector()
    async with tailing(make_config(str(tmp_path / "*.log")), state, collector):
        await collector.wait_for(10)
        await asyncio.sleep(0.2)
    assert collector.lines() == numbered(0, 10).splitlines()
    assert {m.attributes["file.name"] for m in collector.messages} == {"a.log.1"}


async def test_copytruncate_while_stopped_is_finished_from_the_copy(tmp_path: Path) -> None:
    log = tmp_path / "a.log"
    log.write_bytes(numbered(0, 100))
    state = tmp_path / "state"
    first = Collector()
    async with tailing(make_config(str(tmp_path / "*.log")), state, first):
        await first.wait_for(100)
    append(log, numbered(100, 150))
    shutil.copyfile(log, tmp_path / "a.log.1")
    os.truncate(log, 0)
    append(log, numbered(150, 400))  # the new content grows past the old offset
    second = Collector()
    async with tailing(make_config(str(tmp_path / "*.log")), state, second):
        await second.wait_for(300)
        await asyncio.sleep(0.5)
    assert sorted(second.lines()) == sorted(numbered(100, 400).splitlines())
    old = [m for m in second.messages if m.attributes["file.name"] == "a.log.1"]
    assert [m.data for m in old] == numbered(100, 150).splitlines()
    assert {m.stream for m in old} == {first.messages[0].stream}
    new_streams = {m.stream for m in second.messages if m.attributes["file.name"] == "a.log"}
    assert len(new_streams) == 1 and first.messages[0].stream not in new_streams


async def test_an_unreadable_checkpoint_file_is_moved_aside_and_files_are_read_again(tmp_path: Path) -> None:
    (tmp_path / "a.log").write_bytes(b"one\ntwo\n")
    state = tmp_path / "state"
    state.mkdir()
    (state / "file-logs.json").write_text('{"entries": {"trunc')
    collector = Collector()
    async with tailing(make_config(str(tmp_path / "*.log"), read_from="end"), state, collector):
        await collector.wait_for(2)  # no loss: with positions unknown, "end" does not apply
    assert collector.lines() == [b"one", b"two"]
    assert [p.name.split(".corrupt-")[0] for p in state.glob("*.corrupt-*")] == ["file-logs.json"]
    assert len(checkpoint(state)) == 1


async def test_a_fresh_state_dir_never_reuses_old_positions(tmp_path: Path) -> None:
    """Lost state plus a new file on the same inode with the same first bytes must not produce the
    idempotency keys of the old file (Centrifugo would drop the new lines as repeats); an
    unreadable checkpoint file, where lines are read again, keeps them (repeats stay invisible)."""
    log = tmp_path / "a.log"
    log.write_bytes(b"same first line\n")
    first, again, fresh = Collector(), Collector(), Collector()
    state = tmp_path / "state"
    async with tailing(make_config(str(log)), state, first):
        await first.wait_for(1)
    (state / "file-logs.json").write_text("not json")
    async with tailing(make_config(str(log)), state, again):
        await again.wait_for(1)
    assert again.messages[0].position == first.messages[0].position
    shutil.rmtree(state)
    async with tailing(make_config(str(log)), state, fresh):
        await fresh.wait_for(1)
    assert fresh.lines() == [b"same first line"]
    assert fresh.messages[0].position != first.messages[0].position


# -- backpressure --------------------------------------------------------------------------------


async def test_in_flight_lines_per_file_are_capped(tmp_path: Path) -> None:
    (tmp_path / "a.log").write_bytes(numbered(0, 20_000))
    collector = Collector(hold=lambda m: True)
    config = make_config(str(tmp_path / "*.log"), max_in_flight=1_000)
    async with tailing(config, tmp_path / "state", collector):
        await collector.wait_for(1_000)
        await asyncio.sleep(0.3)
        assert len(collector.messages) == 1_000
        while len(collector.messages) < 20_000:
            collector.release()
            await asyncio.sleep(0.002)
    assert collector.lines() == numbered(0, 20_000).splitlines()


async def test_a_blocked_emit_stops_reading_at_the_cap(tmp_path: Path) -> None:
    """The pipeline takes nothing: the engine hands over one chunk, and the file is read no further
    than its cap of unsettled lines (plus at most one read); all of it once the pipeline moves."""
    log = tmp_path / "a.log"
    log.write_bytes(numbered(0, 50_000))
    gate = asyncio.Event()
    calls: list[int] = []

    async def slow_emit(batch: list[Message]) -> None:
        calls.append(len(batch))
        await gate.wait()
        for m in batch:
            m.settle()

    source = FileTail("logs", make_config(str(tmp_path / "*.log"), max_in_flight=1_000), tmp_path / "state")
    engine = SourceEngine("logs", source)
    task = asyncio.create_task(engine.run(slow_emit))
    await wait_until(lambda: bool(calls) and bool(source._paused))
    (f,) = source._files.values()
    read_pos = f.read_pos
    for _ in range(200):  # the loop gets every chance to read on; it must not
        await asyncio.sleep(0)
    assert calls == [EMIT_CHUNK]  # one chunk handed over, then nothing more is read
    assert f.read_pos == read_pos
    # The cap, then one read beyond it: READ_MAX lines and the rest of the chunk that crossed it.
    assert f.line_no <= 1_000 + READ_MAX + CHUNK // len(b"line 0\n")
    assert read_pos < log.stat().st_size
    gate.set()
    await wait_until(lambda: sum(calls) == 50_000)
    await engine.stop()
    await task
    await engine.close()


async def test_line_data_counts_in_the_byte_budget(tmp_path: Path) -> None:
    """Three files of 1 KB lines, nothing settles: reading stops once the relay-wide byte budget
    (1 MiB here) is used, whatever each file's cap; the budget holds exactly the unsettled line
    bytes, and is given back as they settle."""
    line = b"x" * 1023 + b"\n"
    for name in ("a", "b", "c"):
        (tmp_path / f"{name}.log").write_bytes(line * 4_000)  # 4 MB each
    collector = Collector(hold=lambda m: True)
    budget = ByteBudget(1024 * 1024)
    source = FileTail("logs", make_config(str(tmp_path / "*.log")), tmp_path / "state")
    engine = SourceEngine("logs", source, budget)
    task = asyncio.create_task(engine.run(collector))
    await started(source, task)
    try:
        await wait_until(lambda: len(source._paused) == 3)
        read = sum(f.read_pos for f in source._files.values())
        for _ in range(200):  # every chance to read on; it must not
            await asyncio.sleep(0)
        assert sum(f.read_pos for f in source._files.values()) == read
        assert budget.used == sum(len(m.data) for m in collector.held)
        assert budget.limit <= budget.used <= budget.limit + READ_MAX_BYTES  # at most one read beyond it
        while len(collector.messages) < 12_000:
            collector.release()
            await asyncio.sleep(0.002)
        collector.release()
        await wait_until(lambda: budget.used == 0)
    finally:
        await engine.stop()
        await asyncio.wait_for(task, 10)
        await engine.close()
    assert sorted(collector.lines()) == [line[:-1]] * 12_000
    assert len({m.position for m in collector.messages}) == 12_000


# -- configuration ------------------------------------------------------------------------------


def test_config_defaults_and_errors() -> None:
    config = parse_config('[sources.applog]\ntype = "file"\npaths = ["var/log/*.log"]\n')
    applog = config.sources["applog"]
    assert isinstance(applog, Config)
    assert (applog.read_from, applog.max_line_bytes, applog.fingerprint_bytes) == ("beginning", 1 << 20, 256)
    assert (applog.glob_interval, applog.checkpoint_interval, applog.rotate_wait) == (1.0, 1.0, 5.0)
    assert all(info.description for name, info in Config.model_fields.items() if name != "type")
    with pytest.raises(ConfigError) as err:
        parse_config('[sources.applog]\ntype = "file"\npaths = []\nread_from = "middle"\n'
                     'max_line_bytes = "1 parsec"\nglob_interval = "0s"\n')
    text = str(err.value)
    for key in ("sources.applog.paths", "sources.applog.read_from", "sources.applog.max_line_bytes",
                "sources.applog.glob_interval"):
        assert f"config.toml: {key}:" in text


# -- faults: bad checkpoints, truncation in place, too few file descriptors ----------------------


# Lines of about 130 bytes: a few of them fill the 256-byte fingerprint window, so a file's identity
# can be worked out again without its checkpoint.
LONG = "a line longer than a third of the 256-byte fingerprint window, " * 2


def _one_entry(state: Path, name: str = "logs") -> tuple[str, dict[str, Any]]:
    document = json.loads((state / f"file-{name}.json").read_text())
    ((key, entry),) = [(k, v) for k, v in document["entries"].items() if ":" not in k]
    return key, entry


WRONG_SHAPES: dict[str, Callable[[str, dict[str, Any]], Any]] = {
    "an entry of the wrong shape": lambda key, entry: {"entries": {"abc": {}}},
    "dev not a number": lambda key, entry: {"entries": {key: {**entry, "dev": "zz"}}},
    "a negative offset": lambda key, entry: {"entries": {key: {**entry, "offset": -5}}},
    "window 0": lambda key, entry: {"entries": {key: {**entry, "window": 0}}},
    "an offset past any file": lambda key, entry: {"entries": {key: {**entry, "offset": 2**70}}},
    "an offset as a string": lambda key, entry: {"entries": {key: {**entry, "offset": "12"}}},
    "entries a list": lambda key, entry: {"entries": [entry]},
    "a document that is a list": lambda key, entry: [key, entry],
    "an unknown field": lambda key, entry: {"entries": {key: {**entry, "extra": 1}}},
    "a digest that is not hex": lambda key, entry: {"entries": {key: {**entry, "digest": "x" * 16}}},
}


@pytest.mark.parametrize("shape", list(WRONG_SHAPES))
async def test_a_checkpoint_of_the_wrong_shape_is_moved_aside_and_keys_are_kept(
        tmp_path: Path, shape: str, caplog: pytest.LogCaptureFixture) -> None:
    """Valid JSON of the wrong shape: one WARNING, the file moved aside, the lines read again under
    the idempotency keys they were delivered with (so Centrifugo drops them), never a crash."""
    log = tmp_path / "a.log"
    log.write_bytes(numbered(0, 3, LONG))  # past the window: its identity does not hang on the checkpoint
    state = tmp_path / "state"
    first = Collector()
    async with tailing(make_config(str(log)), state, first):
        await first.wait_for(3)
    key, entry = _one_entry(state)
    (state / "file-logs.json").write_text(json.dumps(WRONG_SHAPES[shape](key, entry)))
    append(log, numbered(3, 4, LONG))
    again = Collector()
    caplog.clear()
    async with tailing(make_config(str(log)), state, again):
        await again.wait_for(4)
        await wait_until(lambda: len(checkpoint(state)) == 1)
    assert again.lines() == numbered(0, 4, LONG).splitlines()
    assert [m.position for m in again.messages[:3]] == [m.position for m in first.messages]
    warnings = [r for r in caplog.records if r.levelname == "WARNING" and "checkpoint file" in r.message]
    assert len(warnings) == 1, [r.message for r in caplog.records]
    assert [p.name.split(".corrupt-")[0] for p in state.glob("*.corrupt-*")] == ["file-logs.json"]


@pytest.mark.parametrize("how", ["an offset far past the end", "truncate -s while stopped"])
async def test_a_checkpoint_past_the_end_of_its_file_reads_nothing_again(tmp_path: Path, how: str) -> None:
    """The same file (inode, first bytes), shorter than its checkpoint: what it holds was read; new
    lines go on under a new generation, so no key of a delivered line is ever used for another."""
    log = tmp_path / "a.log"
    log.write_bytes(numbered(0, 10, LONG))  # a cut below the fingerprint window is not told from new content
    state = tmp_path / "state"
    first = Collector()
    async with tailing(make_config(str(log)), state, first):
        await first.wait_for(10)
        await wait_until(lambda: _one_entry(state)[1]["offset"] == log.stat().st_size)
    if how == "truncate -s while stopped":
        os.truncate(log, first.messages[4].offset)
    else:
        key, entry = _one_entry(state)
        (state / "file-logs.json").write_text(json.dumps(
            {"version": 1, "entries": {key: {**entry, "offset": 10**12}}}))
    again = Collector()
    async with tailing(make_config(str(log)), state, again):
        append(log, b"new 1\nnew 2\n")
        await again.wait_for(2)
        await wait_until(lambda: _one_entry(state)[1]["offset"] == log.stat().st_size)
    assert again.lines() == [b"new 1", b"new 2"]
    assert not {m.position for m in again.messages} & {m.position for m in first.messages}
    assert not list(state.glob("*.corrupt-*"))


async def test_truncate_to_a_shorter_length_publishes_only_what_comes_after(tmp_path: Path) -> None:
    """`truncate -s N` without rotation: the lines left before N were delivered; only new lines go
    out, under keys no delivered line had."""
    log = tmp_path / "a.log"
    log.write_bytes(numbered(0, 10, LONG))
    state = tmp_path / "state"
    collector = Collector()
    async with tailing(make_config(str(log)), state, collector):
        await collector.wait_for(10)
        key, _ = _one_entry(state)
        os.truncate(log, collector.messages[4].offset)  # keeps lines 0-4, more than the 256-byte window
        # Lines appended before the cut is seen cannot be told from the old ones: wait until it is.
        await wait_until(lambda: _one_entry(state)[0] != key)
        append(log, b"after 1\nafter 2\n")
        await collector.wait_for(12)
        await wait_until(lambda: _one_entry(state)[1]["offset"] == log.stat().st_size)
        append(log, b"after 3\n")
        await collector.wait_for(13)
    assert collector.lines() == [*numbered(0, 10, LONG).splitlines(), b"after 1", b"after 2", b"after 3"]
    positions = [m.position for m in collector.messages]
    assert len(set(positions)) == len(positions)
    assert collector.messages[10].attributes["file.line"] == 6
    # And a restart goes on from there: nothing is read again.
    again = Collector()
    append(log, b"after restart\n")
    async with tailing(make_config(str(log)), state, again):
        await again.wait_for(1)
    assert again.lines() == [b"after restart"]
    assert again.messages[0].stream == collector.messages[-1].stream


async def test_more_files_than_descriptors_are_read_in_turns(tmp_path: Path) -> None:
    """40 files, 8 descriptors: idle files are closed and opened again when they grow; every line once,
    a file renamed away while closed is still finished, nothing read twice."""
    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(40):
        (folder / f"f{i:02d}.log").write_bytes(b"%d a\n%d b\n" % (i, i))
    (folder / "empty.log").write_bytes(b"")
    state = tmp_path / "state"
    collector = Collector()
    source = FileTail("logs", make_config(str(folder / "*.log")), state)
    source._fds.budget = 8
    engine = SourceEngine("logs", source)
    task = asyncio.create_task(engine.run(collector))
    await started(source, task)
    try:
        await collector.wait_for(80)
        assert len([f for f in source._files.values() if f.fd >= 0]) <= 8
        for i in range(0, 40, 3):
            append(folder / f"f{i:02d}.log", b"%d c\n" % i)
        await collector.wait_for(80 + 14)
        os.rename(folder / "f01.log", folder / "f01.log.1")  # closed by now: found again by its inode
        append(folder / "f01.log.1", b"1 late\n")
        append(folder / "empty.log", b"e 1\n")
        await collector.wait_for(80 + 16)
        await wait_until(lambda: all(f.path != str(folder / "f01.log") for f in source._files.values()))
        assert source._fds.held == len([f for f in source._files.values() if f.fd >= 0]) + len(
            [f for f in source._finishing if f.fd >= 0])
    finally:
        await engine.stop()
        await asyncio.wait_for(task, 10)
        await engine.close()
    expected = [b"%d %s" % (i, s) for i in range(40) for s in (b"a", b"b")]
    expected += [b"%d c" % i for i in range(0, 40, 3)] + [b"1 late", b"e 1"]
    assert sorted(collector.lines()) == sorted(expected)
    assert len({m.position for m in collector.messages}) == len(expected)


def test_the_line_splitter_cuts_the_same_lines_whatever_path_a_chunk_takes() -> None:
    """Short lines, a `\r` before the newline, lines at and over the limit: each gets its offset,
    number and data (over the limit: a dead letter); the lines of one chunk share one read time."""
    from relay.sources.file.reader import LineSplitter, TailedFile

    def cut(chunks: list[bytes], limit: int) -> list[Message]:
        f = TailedFile(path="/logs/app.log", fd=-1, dev=1, ino=2, stream="s")
        splitter, out = LineSplitter("logs", limit), []
        for chunk in chunks:
            splitter.split(f, chunk, out)
        return out

    quick = cut([b"ab\ncd\n", b"efg\nh"], 10)  # every line under 10 bytes, no \r
    assert [m.data for m in quick] == [b"ab", b"cd", b"efg"]
    assert [m.offset for m in quick] == [3, 6, 10]
    assert [(m.attributes["file.line"], m.attributes["file.offset"]) for m in quick] == [(1, 0), (2, 3), (3, 6)]
    assert quick[0].read_at == quick[1].read_at and not quick[0].headers
    # The same bytes with a \r and with lines at and over the limit: exactly 10 bytes is a line,
    # 11 is a dead letter; the \r is dropped.
    checked = cut([b"ab\r\ncd\n0123456789\n0123456789a\nok\n"], 10)
    assert [m.data for m in checked] == [b"ab", b"cd", b"0123456789", b"0123456789a", b"ok"]
    assert [bool(m.error) for m in checked] == [False, False, False, True, False]
    assert [m.offset for m in checked] == [4, 7, 18, 30, 33]
    assert [m.attributes["file.line"] for m in checked] == [1, 2, 3, 4, 5]
    # A chunk whose lines together are longer than the limit but each under it: all plain lines.
    assert [m.data for m in cut([b"0123456\n0123456\n0123456\n"], 10)] == [b"0123456"] * 3
