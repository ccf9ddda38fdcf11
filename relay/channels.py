"""Centrifugo's channel-name rules, shared by the routing table and the embedded server."""

from __future__ import annotations

import re

MAX_CHANNEL_BYTES = 255
# Centrifugo reserves these in channel names (`chat:*` is not a wildcard).
RESERVED = frozenset("*$#/&")
# One scan finds both reserved and control characters: this runs for every publication.
_BAD_CHAR = re.compile(r"[*$#/&\x00-\x1f\x7f]")
NAMESPACE_NAME = re.compile(r"^[-a-zA-Z0-9_.]{2,}$")


def channel_problem(channel: str) -> str | None:
    """Why Centrifugo would reject this channel name by its form, or None when it is fine.

    Whether the namespace exists is the server's business (error 102), not checked here.
    """
    if not channel:
        return "channel is empty"
    if len(channel.encode()) > MAX_CHANNEL_BYTES:
        return f"channel is longer than {MAX_CHANNEL_BYTES} bytes"
    if _BAD_CHAR.search(channel) is None:
        return None
    bad = sorted(set(channel) & RESERVED)
    if bad:
        return f"channel {channel!r} contains reserved character(s) {''.join(bad)!r}"
    return f"channel {channel!r} contains control characters"
