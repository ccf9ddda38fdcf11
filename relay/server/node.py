"""What Info says about the embedded server: one node, its name, version, uptime and channels."""

from __future__ import annotations

import socket
import time
import uuid
from typing import Any

from relay import __version__


class NodeInfo:
    """Identity of this server process, reported by Info (both APIs)."""

    def __init__(self, port: int = 0) -> None:
        self.uid = str(uuid.uuid4())
        # Centrifugo names a node hostname_port by default; the same form here.
        self.name = f"{socket.gethostname()}_{port}" if port else socket.gethostname()
        # Not a Centrifugo version number, so nothing mistakes the relay for one.
        self.version = f"centrifugo-relay {__version__}"
        self.started = time.monotonic()

    @property
    def uptime(self) -> int:
        return int(time.monotonic() - self.started)

    def fill(self, node: Any, num_channels: int) -> None:
        """Fill a NodeResult message (v6 or legacy, same field names)."""
        node.uid = self.uid
        node.name = self.name
        node.version = self.version
        node.num_channels = num_channels
        node.uptime = self.uptime
