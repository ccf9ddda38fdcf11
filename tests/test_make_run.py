"""A new user's first minute: `make run` on a fresh copy, then README's first steps as written:
`relay tail chat:index` shows ticks, a line appended to var/log/app.log reaches chat:logs."""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _fresh_copy(dest: Path) -> None:
    """The files a clone would have: what git tracks or would track (as they are in the work tree)."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           capture_output=True, check=True).stdout
    for name in filter(None, files.decode().split("\0")):
        src = REPO / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            (dest / name).write_bytes(src.read_bytes())


def _first_steps() -> list[str]:
    """The commands of README's first "second terminal" block, as a user would type them."""
    lines = (REPO / "README.md").read_text().split("watch the ticker arrive", 1)[1].splitlines()
    block = [line.strip() for line in lines[1:12] if line.startswith("    ")]
    return [line.split("   #")[0].strip() for line in block]


def _as_run_here(command: str) -> list[str]:
    """A README command for this test: `.venv/bin/relay` is the relay of the venv the suite runs in."""
    words = shlex.split(command)
    return [sys.executable, "-m", "relay", *words[1:]] if words[0] == ".venv/bin/relay" else words


def test_make_run_then_relay_tail_shows_ticks(tmp_path: Path) -> None:
    for port in (10000, 9108, 8000):
        if not _port_free(port):
            pytest.fail(f"port {port} (config.toml's default) is taken on this machine", pytrace=False)
    clone = tmp_path / "clone"
    _fresh_copy(clone)
    # Reuse the installed venv (a fresh one takes minutes); `-o` keeps make from reinstalling the
    # package into it from the copy, which would repoint the editable install at a temp dir.
    venv = Path(sys.executable).parent.parent
    run = subprocess.Popen(["make", "run", f"VENV={venv}", "-o", f"{venv}/.installed"], cwd=clone,
                           stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, start_new_session=True)
    tail = None
    try:
        deadline = time.monotonic() + 60
        while _port_free(10000):
            assert run.poll() is None, run.stdout.read().decode() if run.stdout else ""
            assert time.monotonic() < deadline, "make run did not start the embedded server"
            time.sleep(0.1)
        steps = _first_steps()
        assert steps[0].startswith(".venv/bin/relay tail chat:index") and steps[1].startswith("echo "), steps
        assert steps[2].startswith(".venv/bin/relay tail chat:logs"), steps
        tail = subprocess.Popen([*_as_run_here(steps[0]), "--poll", "100ms"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ}, text=True)
        assert tail.stdout is not None
        ticks = [json.loads(tail.stdout.readline()) for _ in range(2)]
        seqs = [t["data"]["seq"] for t in ticks]
        assert all(t["channel"] == "chat:index" and t["data"]["type"] == "tick" for t in ticks)
        assert seqs[1] == seqs[0] + 1
        assert ticks[1]["offset"] == ticks[0]["offset"] + 1
        tail.kill()
        # The second step exactly as README writes it, in the fresh copy: var/log must be there.
        echo = subprocess.run(["sh", "-c", steps[1]], cwd=clone, capture_output=True, text=True)
        assert echo.returncode == 0, echo.stderr
        tail = subprocess.Popen([*_as_run_here(steps[2]), "--poll", "100ms"], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env={**os.environ}, text=True)
        assert tail.stdout is not None
        line = json.loads(tail.stdout.readline())
        assert line["channel"] == "chat:logs" and line["data"] == {"line": '{"msg": "hello"}',
                                                                   "file": str(clone / "var/log/app.log")}, line
    finally:
        if tail is not None:
            tail.kill()
        # SIGTERM to the relay itself (make's child), as systemd or Ctrl-C would deliver it.
        children = subprocess.run(["pgrep", "-P", str(run.pid)], capture_output=True, text=True).stdout.split()
        for pid in children or [str(run.pid)]:
            os.kill(int(pid), signal.SIGTERM)
        out = run.communicate(timeout=30)[0].decode()
    assert run.returncode == 0, out
    assert "stopped" in out


def _venv_command(*make_args: str) -> str:
    """The command `make` would make a new venv with (dry run, into a venv path that does not exist)."""
    out = subprocess.run(["make", "-n", "-s", "VENV=/nonexistent/venv", "/nonexistent/venv/.installed", *make_args],
                         cwd=REPO, capture_output=True, text=True, check=True,
                         env={k: v for k, v in os.environ.items() if k != "PYTHON"}).stdout
    return out.splitlines()[0]


def test_make_builds_the_venv_from_the_distributions_python_when_it_is_new_enough() -> None:
    # README.md, "Which Python": the relay spends about a tenth less CPU per record on Debian's
    # statically linked python3.11 than on pyenv's default build, which `python3` on PATH may be.
    distro = subprocess.run(["/usr/bin/python3", "-c", "import sys; print(sys.version_info >= (3, 11))"],
                            capture_output=True, text=True).stdout.strip() if Path("/usr/bin/python3").exists() else ""
    expected = "/usr/bin/python3" if distro == "True" else "python3"
    assert _venv_command() == f"{expected} -m venv /nonexistent/venv"
    assert _venv_command("PYTHON=/opt/other/python3") == "/opt/other/python3 -m venv /nonexistent/venv"
