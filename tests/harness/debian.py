"""Debian packages the suite needs (redis-server, chromium, PostgreSQL 15), installed when missing.

`debian_tool(path_or_name, package)` returns the tool's path; when it is missing and we run as root
it runs `apt-get update` (once per process) and `apt-get install -y PACKAGE`, quietly. Otherwise it
raises MissingPackage naming the command to run, which the caller turns into `unavailable(...)`
(a failure in CI) or, in tests/harness/prepare.py, into a NOT READY line.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

INSTALL_TIMEOUT = 900.0
_updated = False


class MissingPackage(RuntimeError):
    """A Debian package is not installed and could not be; the text names the command."""


def _find(tool: str) -> str | None:
    if os.sep in tool:
        return tool if Path(tool).exists() else None
    return shutil.which(tool)


def _apt(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["apt-get", "-q", *args], capture_output=True, text=True, timeout=INSTALL_TIMEOUT,
                          env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"}, check=False)


def debian_tool(tool: str, package: str) -> str:
    """Path of `tool` (a name on PATH or an absolute path), installing Debian's `package` if root."""
    global _updated
    found = _find(tool)
    if found:
        return found
    command = f"apt-get install -y {package}"
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise MissingPackage(f"{tool} is not installed; run `{command}` (as root)")
    if not _updated:  # a fresh machine's package lists are empty or stale
        _apt("update")
        _updated = True
    done = _apt("install", "-y", package)
    found = _find(tool)
    if found:
        return found
    raise MissingPackage(f"`{command}` did not provide {tool} (status {done.returncode}): "
                         f"{(done.stdout + done.stderr)[-1000:]}")
