"""A real unix datagram socket standing in for systemd's NOTIFY_SOCKET: give `.env` to the relay,
then read what it told "systemd" (READY=1, STATUS=..., WATCHDOG=1, RELOADING=1, STOPPING=1)."""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from pathlib import Path


class NotifySocket:
    """Collects every datagram sent to it, in order, each parsed into {KEY: value}.

    `abstract=True` binds in Linux's abstract namespace (NOTIFY_SOCKET=@name), as systemd may;
    otherwise a socket file in `directory` (kept short: sun_path holds 107 bytes)."""

    def __init__(self, directory: Path | None = None, abstract: bool = True) -> None:
        name = f"relay-test-{uuid.uuid4().hex[:12]}"
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if abstract:
            self._sock.bind(b"\0" + name.encode())
            self.address = "@" + name
        else:
            path = (directory or Path("/tmp")) / f"{name}.sock"
            self._sock.bind(str(path))
            self.address = str(path)
        self._sock.settimeout(0.1)
        self.messages: list[tuple[float, dict[str, str]]] = []
        self._lock = threading.Lock()
        self._closed = False
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    @property
    def env(self) -> dict[str, str]:
        return {"NOTIFY_SOCKET": self.address}

    def _read(self) -> None:
        while not self._closed:
            try:
                data = self._sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            with self._lock:
                self.messages.append((time.monotonic(), fields))

    def received(self, key: str, value: str | None = None, prefix: bool = False) -> list[dict[str, str]]:
        """Every message that carried `key` (with `value`, or starting with it if `prefix`), oldest first."""
        with self._lock:
            return [m for _, m in self.messages if key in m and (
                value is None or m[key] == value or (prefix and m[key].startswith(value)))]

    def times(self, key: str) -> list[float]:
        with self._lock:
            return [t for t, m in self.messages if key in m]

    def keys(self) -> list[str]:
        """The notification keys in arrival order (STATUS left out), e.g. ["READY", "STOPPING"]."""
        with self._lock:
            return [k for _, m in self.messages for k in m if k not in ("STATUS", "MONOTONIC_USEC")]

    def wait_for(self, key: str, value: str = "1", timeout: float = 15.0, after: int = 0,
                 prefix: bool = False) -> dict[str, str]:
        """The first message with key=value beyond the first `after` such messages; TimeoutError if none."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.received(key, value, prefix)
            if len(found) > after:
                return found[after]
            time.sleep(0.02)
        raise TimeoutError(f"no {key}={value} within {timeout}s; got {self.messages}")

    def close(self) -> None:
        self._closed = True
        self._reader.join(2)
        self._sock.close()
        if not self.address.startswith("@"):
            os.unlink(self.address)

    def __enter__(self) -> NotifySocket:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()
