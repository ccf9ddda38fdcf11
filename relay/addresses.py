"""`host:port` addresses, parsed one way for every option and flag that takes one.

Listen addresses (`server.listen`, `relay.metrics_listen`, `relay serve --listen`), Centrifugo's
address (`sink.address`, `--address`) and Kafka brokers all go through `parse_host_port`, so they
accept and refuse the same text: `host:port` or `[IPv6]:port`, the host always written out (there
is no default host: `0.0.0.0` means every interface, `127.0.0.1` this machine), the port a number
in 1..65535, or 0 where a listen address may ask the system for any free port.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

_HOST_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,253}$")
MAX_PORT = 65535


@dataclass(frozen=True, slots=True)
class HostPort:
    """A parsed address; `str()` writes it back as `host:port` or `[IPv6]:port`."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_host_port(text: str, *, any_port: bool = False) -> HostPort:
    """`host:port` or `[IPv6]:port`; ValueError saying what is wrong.

    `any_port` allows port 0, for a listen address that takes whatever port is free."""
    if "://" in text:
        raise ValueError(f"expected host:port without a scheme, got {text!r}")
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        if not sep:
            raise ValueError(f'expected "[IPv6 address]:port", got {text!r}')
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{host!r} in {text!r} is not an IPv6 address") from None
    else:
        host, sep, port = text.rpartition(":")
        if not sep:
            raise ValueError(f"expected host:port, got {text!r}")
        if ":" in host:
            raise ValueError(f'an IPv6 address is written in brackets, like "[::1]:10000"; got {text!r}')
        if not host:
            raise ValueError(f"{text!r} has no host (0.0.0.0 is every interface, 127.0.0.1 this machine)")
        if not _HOST_NAME.match(host):
            raise ValueError(f"{host!r} in {text!r} is not a host name or an IP address")
    if not (port.isascii() and port.isdigit()):
        raise ValueError(f"the port of {text!r} is not a number")
    number = int(port)
    lowest = 0 if any_port else 1
    if not lowest <= number <= MAX_PORT:
        raise ValueError(f"port {number} of {text!r} is outside {lowest}..{MAX_PORT}")
    return HostPort(host, number)
