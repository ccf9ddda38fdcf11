"""sd_notify: telling systemd (`Type=notify`) that the relay is ready, reloading, alive or stopping.

The protocol is one unix datagram of `KEY=value` lines to the socket named by `NOTIFY_SOCKET` (a
path, or `@name` for the abstract namespace). Without that variable every call is a no-op, so the
relay behaves the same in a terminal, in a container and under systemd. Hand-written because it is
twenty lines; the PyPI packages for it are unmaintained.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Mapping

log = logging.getLogger("relay.systemd")


class SystemdNotifier:
    """Sends sd_notify messages; every method is safe to call when systemd is not there."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self.address = _socket_address(env.get("NOTIFY_SOCKET", ""))
        self.watchdog_interval = _watchdog_interval(env)
        self._socket: socket.socket | None = None
        self._failed = False
        self.ready_sent = False

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, *lines: str) -> bool:
        """Send one datagram of `KEY=value` lines; False when there is no socket or sending failed."""
        if self.address is None:
            return False
        try:
            if self._socket is None:
                self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._socket.sendto("\n".join(lines).encode(), self.address)
        except OSError as err:
            # systemd gone (or a wrong NOTIFY_SOCKET) must never stop the relay; say so once.
            if not self._failed:
                log.warning("sd_notify to %s failed: %s", os.fsdecode(self.address), err)
            self._failed = True
            return False
        self._failed = False
        return True

    def ready(self, status: str = "") -> bool:
        self.ready_sent = True
        return self.notify("READY=1", *_status(status))

    def reloading(self, status: str = "") -> bool:
        # MONOTONIC_USEC lets systemd (253+) match this reload to the `systemctl reload` that asked for it.
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.notify("RELOADING=1", f"MONOTONIC_USEC={usec}", *_status(status))

    def stopping(self, status: str = "") -> bool:
        return self.notify("STOPPING=1", *_status(status))

    def status(self, text: str) -> bool:
        return self.notify(*_status(text))

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    async def keep_watchdog_fed(self) -> None:
        """Send WATCHDOG=1 every half watchdog interval until cancelled; returns at once if not asked.

        It runs on the event loop, so a loop that hangs stops the pings and systemd restarts the relay.
        """
        if self.watchdog_interval is None or not self.enabled:
            return
        while True:
            self.watchdog()
            await asyncio.sleep(self.watchdog_interval / 2)

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None


def _status(text: str) -> list[str]:
    # One line per message: a newline inside STATUS= would start a new KEY=value.
    return [f"STATUS={' '.join(text.split())}"] if text else []


def _socket_address(value: str) -> str | bytes | None:
    if not value:
        return None
    if value.startswith("@"):
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    log.warning("ignoring NOTIFY_SOCKET=%r: neither an absolute path nor @abstract", value)
    return None


def _watchdog_interval(env: Mapping[str, str]) -> float | None:
    """Seconds between required pings, when systemd watches this very process."""
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    pid = env.get("WATCHDOG_PID", "")
    if pid and pid != str(os.getpid()):
        return None  # the watchdog is meant for another process (a parent that exec'd us, say)
    return usec / 1_000_000
