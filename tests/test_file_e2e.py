"""Done-when of the file tail: real files rotated both ways while written, `relay run` killed with
SIGKILL twice, every line counted back from the embedded server's History, exactly once, in order."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from relay.proto.centrifugo import api_pb2
from tests.harness.embedded import KEY_ENV, EmbeddedServerFactory, EmbeddedServerProcess, open_stubs
from tests.harness.history import history, wait_for_count
from tests.harness.require import unavailable

pytestmark = pytest.mark.timeout(180)

LINES_PER_FILE = 12_000
ROTATE_EVERY = 2_000
LINES_PER_SECOND = 1_000  # per file


class RotatingWriter(threading.Thread):
    """Writes JSON lines `{"f", "seg", "i"}` at a steady rate and rotates the file as logrotate does:
    `rename` (rename, create, the writer reopens after a few late lines) or `copytruncate`."""

    def __init__(self, path: Path, mode: str) -> None:
        super().__init__(daemon=True)
        self.path, self.mode = path, mode
        self.written = 0
        self.rotations = 0
        self.error: BaseException | None = None
        # Rotations allowed before the writer waits to rotate (None: any): see `hold`.
        self._limit: int | None = None
        self._gate = threading.Condition()

    def hold(self, rotations: int) -> None:
        """Write on, but do not rotate past `rotations` until `release`."""
        with self._gate:
            self._limit = rotations

    def release(self) -> None:
        with self._gate:
            self._limit = None
            self._gate.notify_all()

    def _line(self) -> bytes:
        line = json.dumps({"f": self.path.stem, "seg": self.rotations, "i": self.written}) + "\n"
        self.written += 1
        return line.encode()

    def run(self) -> None:
        try:
            self._write()
        except BaseException as err:  # surfaced by the test
            self.error = err

    def _write(self) -> None:
        out = open(self.path, "ab", buffering=0)  # noqa: SIM115 - held open across rotations
        started = time.monotonic()
        while self.written < LINES_PER_FILE:
            out.write(self._line())
            if self.written % 20 == 0:
                ahead = self.written / LINES_PER_SECOND - (time.monotonic() - started)
                if ahead > 0:
                    time.sleep(ahead)
            if self.written % ROTATE_EVERY == 0 and self.written < LINES_PER_FILE:
                with self._gate:
                    self._gate.wait_for(lambda: self._limit is None or self.rotations < self._limit, timeout=60)
                rotated = self.path.with_name(f"{self.path.name}.{self.rotations + 1}")
                if self.mode == "rename":
                    os.rename(self.path, rotated)
                    open(self.path, "xb").close()
                    out.write(self._line())  # late: the writer has not reopened yet
                    out.close()
                    out = open(self.path, "ab", buffering=0)  # noqa: SIM115
                else:
                    shutil.copyfile(self.path, rotated)
                    os.truncate(self.path, 0)
                self.rotations += 1
        out.close()


def wait_until(check: Callable[[], bool], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met")
        time.sleep(0.05)


def checkpoint_entries(path: Path) -> dict[str, Any]:
    try:
        entries: dict[str, Any] = json.loads(path.read_text())["entries"]
    except (OSError, ValueError):
        return {}
    return entries


class Relay:
    """`relay run -c FILE` as a subprocess that the test kills with SIGKILL."""

    def __init__(self, workdir: Path, config: str, env: dict[str, str], wrapper: list[str] | None = None) -> None:
        self.workdir = workdir
        self.config_path = workdir / "relay.toml"
        self.config_path.write_text(config)
        self.env = env
        self.wrapper = wrapper or []  # a command the relay runs under: setpriv, prlimit
        self.process: subprocess.Popen[bytes] | None = None
        self.runs = 0

    def start(self) -> None:
        self.runs += 1
        with open(self.workdir / f"relay-{self.runs}.log", "wb") as log:
            command = [*self.wrapper, sys.executable, "-m", "relay", "run", "-c", str(self.config_path)]
            self.process = subprocess.Popen(command, cwd=self.workdir, env=self.env, stdout=log,
                                            stderr=subprocess.STDOUT)

    def kill(self) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> int:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(30)

    def logs(self) -> str:
        return "".join(p.read_text(errors="replace") for p in sorted(self.workdir.glob("relay-*.log")))

    def wait_for_log(self, *needles: str, timeout: float = 30) -> str:
        """Until the log holds one of `needles` (which is returned); fails if the relay exits."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.logs()
            for needle in needles:
                if needle in text:
                    return needle
            assert self.process is not None and self.process.poll() is None, text[-3000:]
            time.sleep(0.05)
        raise TimeoutError(f"none of {needles} in the relay's log after {timeout}s:\n{self.logs()[-3000:]}")


def test_rotated_files_and_two_sigkills_deliver_every_line_exactly_once_in_order(
        tmp_path: Path, embedded_server_factory: EmbeddedServerFactory) -> None:
    server = embedded_server_factory(
        namespaces=[{"name": "logs", "history_size": 50_000, "history_ttl": "600s"}])
    logs = tmp_path / "logs"
    logs.mkdir()
    work = tmp_path / "relay"
    work.mkdir()
    config = f"""
[relay]
state_dir = "{work / 'state'}"
metrics_listen = ""
shutdown_timeout = "10s"

[sink]
address = "{server.address}"
api_key_env = "{KEY_ENV}"
retry = {{ initial_backoff = "20ms", max_backoff = "500ms" }}

[sources.applog]
type = "file"
paths = ["{logs}/*.log"]
glob_interval = "200ms"
rotate_wait = "1s"
checkpoint_interval = "100ms"

[[routes]]
source = "applog"
channel = "logs:{{{{ json.f }}}}"
"""
    relay = Relay(work, config, {**os.environ, KEY_ENV: server.api_key})
    modes = {"a": "rename", "b": "rename", "c": "copytruncate", "d": "copytruncate"}
    writers = [RotatingWriter(logs / f"{name}.log", mode) for name, mode in modes.items()]
    for writer in writers:
        writer.path.write_bytes(b"")
    relay.start()
    # The first start: files exist (empty), read from the beginning once the relay has seen them.
    wait_until(lambda: len(checkpoint_entries(work / "state" / "file-applog.json")) == len(writers))
    for writer in writers:
        writer.start()
    duration = LINES_PER_FILE / LINES_PER_SECOND
    # Killed just after a rotation; the restart spans one rotation at most, however long it takes
    # on a loaded machine (the writers wait to rotate again until the relay is back): a file
    # created and rotated away entirely while the relay is down is not in the glob, as with any tailer.
    for kill_at in (2 * ROTATE_EVERY + 200, 4 * ROTATE_EVERY + 200):
        while writers[0].written < kill_at:
            time.sleep(0.01)
        relay.kill()
        for writer in writers:
            writer.hold(writer.rotations + 1)
        relay.start()
        wait_until(lambda: relay.logs().count("daemon: ready") >= relay.runs, timeout=60)
        for writer in writers:
            writer.release()
    for writer in writers:
        writer.join(duration * 3)
        assert writer.error is None, writer.error
        assert writer.rotations >= 5 and writer.written >= LINES_PER_FILE

    deadline = time.monotonic() + 60
    counts: dict[str, int] = {}
    while time.monotonic() < deadline:
        counts = {w.path.stem: len(history(server.address, f"logs:{w.path.stem}", server.api_key))
                  for w in writers}
        if all(counts[w.path.stem] >= w.written for w in writers):
            break
        time.sleep(0.5)
    assert relay.stop() == 0  # drained and gone: nothing late (a duplicate) can come after this
    try:
        for writer in writers:
            pubs = history(server.address, f"logs:{writer.path.stem}", server.api_key)
            lines = [json.loads(p.data) for p in pubs]
            numbers = [line["i"] for line in lines]
            missing = sorted(set(range(writer.written)) - set(numbers))
            assert not missing, f"{writer.path.name}: {len(missing)} lines missing, first {missing[:10]}"
            extra = len(numbers) - writer.written
            assert extra == 0, f"{writer.path.name}: {extra} duplicates"
            segments: dict[int, list[int]] = {}
            for line in lines:
                segments.setdefault(line["seg"], []).append(line["i"])
            assert len(segments) == writer.rotations + 1
            for seg, order in segments.items():
                assert order == sorted(order), f"{writer.path.name} segment {seg} out of order"
    except AssertionError:
        print(relay.logs()[-5000:])
        raise
    finally:
        relay.stop()
    assert relay.runs == 3


def test_short_oversized_and_invalid_utf8_lines_do_what_the_readme_says(
        tmp_path: Path, embedded_server_factory: EmbeddedServerFactory) -> None:
    server = embedded_server_factory()
    logs = tmp_path / "logs"
    logs.mkdir()
    work = tmp_path / "relay"
    work.mkdir()
    (logs / "short.log").write_bytes(b'{"n": 1}\n')  # 9 bytes, far below the 256-byte window
    big = b"x" * (5 << 20)
    (logs / "mixed.log").write_bytes(b'{"n": 2}\n' + b"caf\xe9 \xff not utf-8\n" + big + b'\n{"n": 3}\n')
    config = f"""
[relay]
state_dir = "{work / 'state'}"
metrics_listen = ""
[sink]
address = "{server.address}"
api_key_env = "{KEY_ENV}"
[sources.applog]
type = "file"
paths = ["{logs}/*.log"]
[[routes]]
source = "applog"
channel = "chat:json"
continue = true
[[routes]]
source = "applog"
channel = "chat:wrap"
data = "wrap"
"""
    relay = Relay(work, config, {**os.environ, KEY_ENV: server.api_key})
    relay.start()
    try:
        deadline = time.monotonic() + 60
        dead_letters = work / "state" / "dead-letter.jsonl"
        while time.monotonic() < deadline:
            wrapped = history(server.address, "chat:wrap", server.api_key)
            if len(wrapped) >= 4 and dead_letters.exists() and dead_letters.read_text().count("\n") >= 2:
                break
            time.sleep(0.2)
        as_json = sorted(json.loads(p.data)["n"]
                         for p in history(server.address, "chat:json", server.api_key))
        wrapped_lines = sorted(json.loads(p.data)["line"]
                               for p in history(server.address, "chat:wrap", server.api_key))
        records = [json.loads(line) for line in dead_letters.read_text().splitlines()]
    finally:
        assert relay.stop() == 0
    assert as_json == [1, 2, 3]
    # wrap takes the invalid line, with U+FFFD for the bad bytes; the oversized line goes nowhere.
    assert wrapped_lines == sorted(['{"n": 1}', '{"n": 2}', '{"n": 3}', "caf\ufffd \ufffd not utf-8"])
    reasons = sorted(r["reason"] for r in records)
    assert len(records) == 2, reasons
    assert reasons[0].startswith("line over max_line_bytes (5242880 bytes, limit 1048576)")
    assert "not UTF-8" in reasons[1], reasons  # the json route's; the wrap route took the line
    oversized = next(r for r in records if r["reason"].startswith("line over"))
    assert oversized["data"] == "x" * 1024
    assert "mixed.log:3" in oversized["reason"]


# -- faults: a directory that cannot be listed, too few file descriptors, a bad checkpoint --------


def file_config(work: Path, server: Any, logs: Path, channel: str, **options: str) -> str:
    extra = "".join(f'{k} = "{v}"\n' for k, v in options.items())
    return f"""
[relay]
state_dir = "{work / 'state'}"
metrics_listen = ""
[sink]
address = "{server.address}"
api_key_env = "{KEY_ENV}"
retry = {{ initial_backoff = "20ms", max_backoff = "500ms" }}
[sources.applog]
type = "file"
paths = ["{logs}/*.log"]
{extra}
[[routes]]
source = "applog"
channel = "{channel}"
"""


def json_lines(start: int, stop: int, **fields: Any) -> bytes:
    pad = "x" * 100  # a few lines fill the fingerprint window: the identity needs no checkpoint to recur
    return b"".join(json.dumps({**fields, "n": n, "pad": pad}).encode() + b"\n" for n in range(start, stop))


def delivered(server: Any, channel: str) -> list[tuple[Any, ...]]:
    return [tuple(v for k, v in sorted(json.loads(p.data).items()) if k != "pad")
            for p in history(server.address, channel, server.api_key)]


FAST = {"glob_interval": "100ms", "poll_interval": "100ms", "rotate_wait": "300ms",
        "checkpoint_interval": "100ms"}
NO_DAC = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--"]


def _tail_without_dac_override(tmp_path: Path, embedded_server_factory: EmbeddedServerFactory
                               ) -> tuple[EmbeddedServerProcess, Path, Path, Relay]:
    """A relay (not started) tailing logs/app.log, which holds lines 0-2, as root without the
    capabilities that let root ignore file modes, so that a chmod 000 stops it."""
    if shutil.which("setpriv") is None:
        unavailable("setpriv (util-linux) is not installed")
    server = embedded_server_factory(namespaces=[{"name": "logs", "history_size": 1000, "history_ttl": "600s"}])
    logs, work = tmp_path / "logs", tmp_path / "relay"
    logs.mkdir()
    work.mkdir()
    app = logs / "app.log"
    app.write_bytes(json_lines(0, 3))
    relay = Relay(work, file_config(work, server, logs, "logs:app", **FAST),
                  {**os.environ, KEY_ENV: server.api_key}, wrapper=NO_DAC)
    return server, logs, app, relay


def test_a_directory_that_cannot_be_listed_is_not_an_empty_one(
        tmp_path: Path, embedded_server_factory: EmbeddedServerFactory) -> None:
    """The tailed directory chmod 000 for far longer than rotate_wait, then readable again: its file
    is kept (not forgotten and re-read under new keys), and each line arrives once.

    Tests run as root, whom chmod does not stop; the relay runs as root without CAP_DAC_OVERRIDE and
    CAP_DAC_READ_SEARCH (setpriv drops them from its bounding set), so the mode bits hold for it."""
    server, logs, app, relay = _tail_without_dac_override(tmp_path, embedded_server_factory)
    relay.start()
    try:
        wait_for_count(server.address, "logs:app", 3, server.api_key)
        logs.chmod(0)
        try:
            relay.wait_for_log("cannot list", "left the glob")
            with open(app, "ab") as out:  # still read through the handle the relay holds
                out.write(json_lines(3, 4))
            wait_for_count(server.address, "logs:app", 4, server.api_key)
            # The fault itself lasts 2 s, well past rotate_wait (0.3 s) and many glob scans: this is
            # the time in which a file that left the glob is forgotten. Not a synchronisation.
            time.sleep(2.0)
        finally:
            logs.chmod(0o755)
        with open(app, "ab") as out:
            out.write(json_lines(4, 5))
        # Order per channel: had the file been read again, its old lines would come before this one.
        wait_for_count(server.address, "logs:app", 5, server.api_key)
        assert relay.stop() == 0
        assert delivered(server, "logs:app") == [(n,) for n in range(5)], relay.logs()[-3000:]
    finally:
        relay.stop()


def test_a_restart_while_the_directory_cannot_be_listed_keeps_the_checkpoint(
        tmp_path: Path, embedded_server_factory: EmbeddedServerFactory) -> None:
    """The relay restarts while the tailed directory is chmod 000: the checkpoint is kept (not taken
    for a file that is gone), and once the directory can be read the file goes on where it was."""
    server, logs, app, relay = _tail_without_dac_override(tmp_path, embedded_server_factory)
    relay.start()
    try:
        wait_for_count(server.address, "logs:app", 3, server.api_key)
        assert relay.stop() == 0
        logs.chmod(0)
        try:
            relay.start()
            relay.wait_for_log("cannot list", "gone or changed")
            # Several scans with the directory unreadable (the fault's duration, not a synchronisation).
            time.sleep(1.0)
        finally:
            logs.chmod(0o755)
        with open(app, "ab") as out:
            out.write(json_lines(3, 4))
        wait_for_count(server.address, "logs:app", 4, server.api_key)
        assert relay.stop() == 0
        assert delivered(server, "logs:app") == [(n,) for n in range(4)], relay.logs()[-3000:]
        assert relay.logs().count("keeping its checkpoint") == 1
    finally:
        relay.stop()


def test_two_thousand_files_under_ulimit_n_1024_each_line_arrives_once(
        tmp_path: Path, embedded_server_factory: EmbeddedServerFactory) -> None:
    """2,000 files, 1,024 file descriptors (prlimit on the relay process, soft and hard): idle files
    are closed and opened again when they grow; the glob never runs out of descriptors; every line
    arrives once, and lines appended later to files that were closed arrive too."""
    if shutil.which("prlimit") is None:
        unavailable("prlimit (util-linux) is not installed")
    server = embedded_server_factory(namespaces=[{"name": "logs", "history_size": 20_000, "history_ttl": "600s"}])
    logs, work = tmp_path / "logs", tmp_path / "relay"
    logs.mkdir()
    work.mkdir()
    files = 2_000
    for f in range(files):
        (logs / f"f{f:04d}.log").write_bytes(json_lines(0, 4, f=f))
    relay = Relay(work, file_config(work, server, logs, "logs:all", **FAST),
                  {**os.environ, KEY_ENV: server.api_key}, wrapper=["prlimit", "--nofile=1024:1024", "--"])
    relay.start()
    try:
        wait_for_count(server.address, "logs:all", files * 4, server.api_key, timeout=120)
        for f in range(0, files, 10):
            with open(logs / f"f{f:04d}.log", "ab") as out:
                out.write(json_lines(4, 5, f=f))
        wait_for_count(server.address, "logs:all", files * 4 + files // 10, server.api_key, timeout=120)
        assert relay.stop() == 0
        got = delivered(server, "logs:all")
        expected = {(f, n) for f in range(files) for n in range(4)} | {(f, 4) for f in range(0, files, 10)}
        assert len(got) == len(expected) and set(got) == expected, relay.logs()[-3000:]
    finally:
        relay.stop()


def test_a_checkpoint_of_the_wrong_shape_does_not_stop_relay_run(
        tmp_path: Path, embedded_server_factory: EmbeddedServerFactory) -> None:
    """`{"entries": {"abc": {}}}` in place of the checkpoint: one WARNING, the file moved aside, the
    relay runs (no exit 1 on every start), and the lines read again carry the keys they were
    delivered with, so the server holds each once."""
    server = embedded_server_factory(namespaces=[{"name": "logs", "history_size": 1000, "history_ttl": "600s"}])
    logs, work = tmp_path / "logs", tmp_path / "relay"
    logs.mkdir()
    work.mkdir()
    (logs / "app.log").write_bytes(json_lines(0, 3))
    relay = Relay(work, file_config(work, server, logs, "logs:app", **FAST), {**os.environ, KEY_ENV: server.api_key})
    relay.start()
    wait_for_count(server.address, "logs:app", 3, server.api_key)
    assert relay.stop() == 0
    state = work / "state" / "file-applog.json"
    state.write_text(json.dumps({"entries": {"abc": {}}}))
    with open(logs / "app.log", "ab") as out:
        out.write(json_lines(3, 4))
    relay.start()
    try:
        wait_for_count(server.address, "logs:app", 4, server.api_key)
        assert relay.stop() == 0
        assert delivered(server, "logs:app") == [(n,) for n in range(4)]
        assert relay.logs().count("checkpoint file") == 1
        assert [p.name.split(".corrupt-")[0] for p in state.parent.glob("*.corrupt-*")] == ["file-applog.json"]
    finally:
        relay.stop()


def test_a_checkpoint_written_before_the_source_engine_resumes_under_the_same_keys(
        tmp_path: Path, embedded_server_factory: EmbeddedServerFactory) -> None:
    """An upgrade: the state directory as the file tail wrote it before it ran on the source engine
    (main 4598186: instance file, checkpoint at the byte past line 2) after a kill -9 that came once
    lines 0-5 were published under that tail's keys (`applog/<stream>/<byte past the line>#0`). The
    new relay reads lines 3-5 again under the same keys (the server drops them), then line 6: History
    holds every line once, and the checkpoint keeps its stream and its meaning (the byte past a line)."""
    server = embedded_server_factory(namespaces=[{"name": "logs", "history_size": 1000, "history_ttl": "600s"}])
    logs, work, state = tmp_path / "logs", tmp_path / "relay", tmp_path / "relay" / "state"
    logs.mkdir()
    state.mkdir(parents=True)
    app = logs / "app.log"
    content = json_lines(0, 6)
    app.write_bytes(content)
    ends = [i + 1 for i, byte in enumerate(content) if byte == ord("\n")]  # the byte past each line
    st = app.stat()
    blake = lambda data: hashlib.blake2b(data, digest_size=8).hexdigest()  # noqa: E731
    window = min(256, len(content))
    instance = "c0ffee01"
    stream = f"{instance}.{st.st_dev:x}.{st.st_ino:x}.{blake(content[:window])[:12]}"
    # The old format, written out literally (not with the current code's models).
    (state / "file-applog.instance").write_text(instance + "\n")
    (state / "file-applog.json").write_text(json.dumps({"version": 1, "written_at": time.time(), "entries": {
        stream: {"dev": st.st_dev, "ino": st.st_ino, "path": str(app), "window": window,
                 "digest": blake(content[:window]), "gen": 0, "offset": ends[2],
                 "tail": blake(content[ends[2] - 32:ends[2]])}}}))
    with open_stubs(server.address, server.api_key) as stubs:
        for n, line in enumerate(content.splitlines()):
            reply = stubs.v6.Publish(api_pb2.PublishRequest(
                channel="logs:app", data=line, idempotency_key=f"applog/{stream}/{ends[n]}#0"),
                metadata=stubs.metadata, timeout=10)
            assert not reply.HasField("error"), reply
    relay = Relay(work, file_config(work, server, logs, "logs:app", **FAST), {**os.environ, KEY_ENV: server.api_key})
    relay.start()
    try:
        wait_until(lambda: checkpoint_entries(state / "file-applog.json").get(stream, {}).get("offset") == ends[5])
        with open(app, "ab") as out:
            out.write(json_lines(6, 7))
        wait_for_count(server.address, "logs:app", 7, server.api_key)
        assert relay.stop() == 0
        assert delivered(server, "logs:app") == [(n,) for n in range(7)], relay.logs()[-3000:]
        entries = checkpoint_entries(state / "file-applog.json")
        assert list(entries) == [stream] and entries[stream]["offset"] == app.stat().st_size
    finally:
        relay.stop()
