"""The dead letter file under faults, with a real `relay run` tailing a real file into `relay serve`:

- it cannot be written (a full disk, a parent that is a regular file): the relay says so loudly
  (ERROR naming the file, /readyz 503 naming it, a metric), every good line still arrives, and the
  dead letters are written once the fault is fixed; their positions were not committed meanwhile,
  so a relay stopped during the fault writes them after its restart;
- it is rotated (`mv`) or deleted (`rm`) while the relay runs: the next dead letters go to a new file
  at the path; SIGUSR1 closes the old file at once.

Counts come from the server's History and from the dead letter files themselves.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.harness.configs import sink_table
from tests.harness.embedded import KEY_ENV, EmbeddedServerFactory, EmbeddedServerProcess
from tests.harness.history import history, wait_for_count
from tests.harness.relay_process import RelayProcess
from tests.harness.require import unavailable

pytestmark = pytest.mark.timeout(240)

GOOD = 2000
EVERY = 100  # one line in EVERY is bad, half of them for routing, half for Centrifugo


@dataclass
class Fault:
    """A dead letter path that cannot be written, and how to make it writable again."""

    kind: str
    path: Path
    fix: Callable[[], None]


def wait_until(predicate: Callable[[], Any], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise TimeoutError(f"not within {timeout}s: {what}")


def records(path: Path) -> list[dict[str, Any]]:
    """Every line of a dead letter file (a half-written line would fail json.loads here)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_bytes().decode().split("\n") if line]


@contextlib.contextmanager
def full_tmpfs(tmp_path: Path) -> Iterator[Fault | None]:
    """A 64 KiB tmpfs filled to the last byte (root only; None where mounting is not permitted)."""
    mount = tmp_path / "small-disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        yield None
        return
    try:
        filler = mount / "filler"
        with open(filler, "wb", buffering=0) as f, contextlib.suppress(OSError):
            while f.write(b"x" * 4096):
                pass
        assert os.statvfs(mount).f_bavail == 0
        yield Fault("full tmpfs", mount / "dead-letter.jsonl", filler.unlink)
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.fixture(params=["full disk", "parent is a regular file"])
def fault(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Fault]:
    if request.param == "parent is a regular file":
        blocker = tmp_path / "blocker"
        blocker.write_text("a file where the dead letter directory should be\n")
        yield Fault(request.param, blocker / "dead-letter.jsonl", blocker.unlink)
        return
    with full_tmpfs(tmp_path) as tmpfs:
        if tmpfs is not None:
            yield tmpfs
            return
    # Without permission to mount: /dev/full answers every write with ENOSPC, like a full disk.
    link = tmp_path / "dead-letter.jsonl"
    link.symlink_to("/dev/full")
    yield Fault("/dev/full", link, link.unlink)


@pytest.fixture
def roomy_server(embedded_server_factory: EmbeddedServerFactory) -> EmbeddedServerProcess:
    return embedded_server_factory(namespaces=[{"name": "chat", "history_size": 10_000, "history_ttl": "600s"}])


def lines(start: int, stop: int) -> tuple[str, int, int]:
    """Log lines numbered start..stop-1: good JSON, and every EVERY-th a bad one (not JSON, or for a
    namespace Centrifugo does not know). Returns the text and how many good and bad lines it has."""
    out, good, bad = [], 0, 0
    for n in range(start, stop):
        if n % EVERY == EVERY - 1:
            out.append(f"not json {n}" if (n // EVERY) % 2 else json.dumps({"n": n, "ns": "missing"}))
            bad += 1
        else:
            out.append(json.dumps({"n": n}))
            good += 1
    return "".join(line + "\n" for line in out), good, bad


def relay_config(tmp_path: Path, server: EmbeddedServerProcess, dead_letter: Path) -> str:
    return f'''
[relay]
state_dir = "{tmp_path}/state"
shutdown_timeout = "1s"
{sink_table(server.address, KEY_ENV, extra=f'max_in_flight = 1{chr(10)}dead_letter = "{dead_letter}"')}
[sources.app]
type = "file"
paths = ["{tmp_path}/app.log"]

[[routes]]
source = "app"
when = {{ "json.ns" = "missing" }}
channel = "missing:{{{{ json.n }}}}"

[[routes]]
source = "app"
channel = "chat:dl"
'''


def good_ns(server: EmbeddedServerProcess) -> list[int]:
    return sorted(json.loads(p.data)["n"] for p in history(server.address, "chat:dl", server.api_key))


def test_a_dead_letter_file_that_cannot_be_written_is_loud_and_stops_nothing(
        fault: Fault, roomy_server: EmbeddedServerProcess, tmp_path: Path) -> None:
    text, good, bad = lines(0, GOOD + GOOD // (EVERY - 1) + 1)
    assert good >= GOOD
    (tmp_path / "app.log").write_text(text)
    relay = RelayProcess(tmp_path / "relay", relay_config(tmp_path, roomy_server, fault.path),
                         env={KEY_ENV: roomy_server.api_key}).start()
    try:
        relay.wait_http()
        # Every good line arrives, though the lane (max_in_flight = 1) also carries the failing ones.
        wait_for_count(roomy_server.address, "chat:dl", good, roomy_server.api_key, timeout=90)
        wait_until(lambda: relay.metric("relay_dead_letter_write_errors_total") >= 2, "retried write errors")
        status, body = relay.get("/readyz")
        assert status == 503 and str(fault.path) in body, (status, body)
        errors = [line for line in relay.logs().splitlines() if " ERROR " in line]
        assert any(f"cannot write dead letters to {fault.path}" in line for line in errors), relay.logs()[-3000:]
        assert "Traceback" not in relay.logs()
        wait_until(lambda: relay.metric("relay_in_flight", 'source="app"') == bad, "only the bad lines unsettled")

        fault.fix()
        wait_until(lambda: len(records(fault.path)) >= bad, "the dead letters, once the path is writable")
        wait_until(lambda: relay.get("/readyz")[0] == 200, "ready again")
        wait_until(lambda: relay.metric("relay_in_flight", 'source="app"') == 0, "everything settled")
        assert "written again" in relay.logs()
    finally:
        relay.stop()
    written = records(fault.path)
    assert sorted(r["position"] for r in written) == sorted({r["position"] for r in written})
    assert len(written) == bad
    assert good_ns(roomy_server) == [n for n in range(len(text.splitlines())) if n % EVERY != EVERY - 1]


def test_dead_letters_not_written_before_a_stop_are_written_after_the_restart(
        roomy_server: EmbeddedServerProcess, tmp_path: Path) -> None:
    """While the file cannot be written, the bad lines' positions are not committed: a relay stopped
    then (SIGTERM, the drain runs out) reads them again after its restart and writes them then."""
    link = tmp_path / "dead-letter.jsonl"
    link.symlink_to("/dev/full")
    text, good, bad = lines(0, 1000)
    (tmp_path / "app.log").write_text(text)
    relay = RelayProcess(tmp_path / "relay", relay_config(tmp_path, roomy_server, link),
                         env={KEY_ENV: roomy_server.api_key}).start()
    try:
        relay.wait_http()
        wait_for_count(roomy_server.address, "chat:dl", good, roomy_server.api_key, timeout=90)
        wait_until(lambda: relay.metric("relay_dead_letter_write_errors_total") >= 1, "a write error")
        assert relay.terminate(30) == 0
        link.unlink()
        relay.start()
        wait_until(lambda: len(records(link)) >= bad, "the dead letters, after the restart")
        wait_until(lambda: relay.get("/readyz")[0] == 200, "ready")
    finally:
        relay.stop()
    written = records(link)
    assert len(written) == bad and len({r["position"] for r in written}) == bad
    assert good_ns(roomy_server) == [n for n in range(1000) if n % EVERY != EVERY - 1]  # none twice


# -- rotation -------------------------------------------------------------------------------------

def held_files(relay: RelayProcess, name: str) -> list[str]:
    """What the relay process holds open whose path mentions `name` ("(deleted)" when unlinked)."""
    assert relay.process is not None
    fds = Path(f"/proc/{relay.process.pid}/fd")
    out = []
    for fd in fds.iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if name in target:
                out.append(target)
    return out


def bad_lines(start: int, count: int) -> str:
    return "".join(f"bad line {n}\n" for n in range(start, start + count))


def test_a_rotated_or_deleted_dead_letter_file_is_opened_again(roomy_server: EmbeddedServerProcess,
                                                               tmp_path: Path) -> None:
    """mv and rm, each noticed by the relay itself (the path names another file, or none) and each
    announced with SIGUSR1; every phase's dead letters land in the file the path names then."""
    dead = tmp_path / "dl" / "dead-letter.jsonl"
    log = tmp_path / "app.log"
    log.write_text("")
    relay = RelayProcess(tmp_path / "relay", relay_config(tmp_path, roomy_server, dead),
                         env={KEY_ENV: roomy_server.api_key}).start()
    n, per_phase = 0, 10
    kept: dict[str, list[dict[str, Any]]] = {}

    def phase(name: str) -> None:
        nonlocal n
        with open(log, "a") as f:
            f.write(bad_lines(n, per_phase))
        n += per_phase
        wait_until(lambda: len(records(dead)) >= per_phase, f"{name}: dead letters in the file at the path")
        kept[name] = records(dead)

    try:
        relay.wait_http()
        phase("first")
        subprocess.run(["mv", str(dead), str(dead) + ".1"], check=True)
        phase("after mv")
        subprocess.run(["rm", str(dead)], check=True)
        phase("after rm")

        subprocess.run(["mv", str(dead), str(dead) + ".2"], check=True)
        assert relay.process is not None
        relay.process.send_signal(signal.SIGUSR1)
        wait_until(lambda: held_files(relay, "dead-letter.jsonl") == [], "the moved file closed on SIGUSR1")
        phase("after mv and SIGUSR1")
        subprocess.run(["rm", str(dead)], check=True)
        assert any("(deleted)" in held for held in held_files(relay, "dead-letter.jsonl"))
        relay.process.send_signal(signal.SIGUSR1)
        wait_until(lambda: held_files(relay, "dead-letter.jsonl") == [], "the deleted file's space freed")
        phase("after rm and SIGUSR1")
        assert relay.alive()
    finally:
        relay.stop()
    assert "SIGUSR1: reopening the dead letter file" in relay.logs()
    rotated = {".1": records(Path(str(dead) + ".1")), ".2": records(Path(str(dead) + ".2"))}
    assert [len(v) for v in kept.values()] == [per_phase] * 5
    assert kept["first"] == rotated[".1"] and kept["after rm"] == rotated[".2"]
    every = [r["data"] for phase_records in kept.values() for r in phase_records]
    assert every == [f"bad line {i}" for i in range(n)]  # each once, in order, none lost


def test_a_relay_writing_dead_letters_never_holds_half_a_line(tmp_path: Path) -> None:
    """The all-or-nothing rule, on a real small disk: what an attempt wrote before ENOSPC is cut off."""
    from relay.dead_letter import DeadLetterFile
    from relay.message import Message

    with full_tmpfs(tmp_path) as tmpfs:
        if tmpfs is None:
            unavailable("mounting a tmpfs (needs root or CAP_SYS_ADMIN)")
        tmpfs.fix()  # empty again: 64 KiB to fill
        written: list[int] = []

        async def scenario() -> None:
            dead = DeadLetterFile(tmpfs.path)
            for i in range(200):  # about 600 bytes a line: more than 64 KiB in all
                dead.write(Message("s", b"x" * 500, offset=i), "reason")
                dead.commit(lambda i=i: written.append(i))  # type: ignore[misc]
            assert dead.problem == f"cannot write dead letters to {tmpfs.path}: {os.strerror(errno.ENOSPC)}"
            dead.close()

        asyncio.run(scenario())
        on_disk = records(tmpfs.path)
        assert 0 < len(on_disk) == len(written) < 200
        assert [r["position"] for r in on_disk] == [f"s/{i}" for i in written]
