"""The file tail driven directly, on real files: a fake pipeline collects and settles what it emits."""

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
from relay.sources.file import Config, FileTail

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
    """Runs a FileTail; on exit stops and closes it, or with `crash` abandons it as kill -9 would."""
    source = FileTail(name, config, state)
    task = asyncio.create_task(source.run(collector))
    await asyncio.sleep(0.05)
    try:
        yield source
    finally:
        if crash:
            for t in [task, *source._tasks]:
                t.cancel()
            await asyncio.gather(task, *source._tasks, return_exceptions=True)
            for f in list(source._files.values()):
                os.close(f.fd)
        else:
            await source.stop()
            await asyncio.wait_for(task, 10)
            await source.close()


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
        await asyncio.sleep(0.1)
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
    assert not any("error" in m.attributes for m in collector.messages)


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
        await wait_until(lambda: source._tracker.committable(stream) == log.stat().st_size)
    before, oversized, after, oversized2, last = collector.messages
    assert before.data == b"before" and after.data == b"after" and last.data == b"last"
    assert oversized.attributes["error"].startswith(
        f"line over max_line_bytes ({len(big)} bytes, limit {1024 * 1024})")
    assert "xxxx" in oversized.attributes["error"]
    assert oversized.data == b"x" * 1024  # a short preview, not 5 MB
    assert oversized.offset == 7 + len(big) + 1
    assert oversized.attributes["file.offset"] == 7 and oversized.attributes["file.line"] == 2
    assert after.attributes["file.line"] == 3 and after.attributes["file.offset"] == oversized.offset
    assert oversized2.attributes["error"].startswith("line over max_line_bytes (2000000 bytes")
    assert oversized2.data == b"y" * 1024 and last.attributes["file.line"] == 5
    assert "error" not in after.attributes and "error" not in last.attributes


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
            await asyncio.sleep(0.2)
            append(log, b"tial\nnew\n")
            await collector.wait_for(len(expected))
            await asyncio.sleep(0.1)
        assert collector.lines() == expected
        assert collector.messages[-1].attributes["file.line"] == 4


async def test_file_created_after_start_is_read_from_the_beginning(tmp_path: Path) -> None:
    (tmp_path / "old.log").write_bytes(b"old\n")
    collector = Collector()
    async with tailing(make_config(str(tmp_path / "*.log"), read_from="end"), tmp_path / "state", collector):
        await asyncio.sleep(0.2)
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


async def test_a_blocked_emit_stops_reading(tmp_path: Path) -> None:
    log = tmp_path / "a.log"
    log.write_bytes(numbered(0, 5_000))
    gate = asyncio.Event()
    calls: list[int] = []

    async def slow_emit(batch: list[Message]) -> None:
        calls.append(len(batch))
        await gate.wait()
        for m in batch:
            m.settle()

    source = FileTail("logs", make_config(str(tmp_path / "*.log")), tmp_path / "state")
    task = asyncio.create_task(source.run(slow_emit))
    await asyncio.sleep(0.3)
    assert calls == [500]  # one batch handed over, then nothing more is read
    gate.set()
    await wait_until(lambda: sum(calls) == 5_000)
    await source.stop()
    await task
    await source.close()


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
