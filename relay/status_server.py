"""The HTTP endpoints at `relay.metrics_listen`: /metrics, /healthz, /readyz.

A few lines of asyncio instead of a web framework: three GET routes, no request bodies. A request
that is too long or too slow gets an HTTP error and the connection is closed; it never reaches the
log as an exception.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from relay.addresses import parse_host_port
from relay.metrics import REGISTRY

# A request line or header line longer than this is refused (414 / 431), as web servers do.
MAX_LINE_BYTES = 8192
MAX_HEADER_LINES = 100
# The whole request must arrive within this; a slow client cannot hold a connection open.
READ_TIMEOUT = 5.0
# What is read and thrown away after an error reply, so closing does not reset the connection
# before the client read the reply.
DISCARD_BYTES = 1024 * 1024
DISCARD_TIMEOUT = 1.0

Response = tuple[str, str, bytes]


class StatusServer:
    def __init__(self, listen: str, is_ready: Callable[[], tuple[bool, str]]) -> None:
        address = parse_host_port(listen, any_port=True)
        self._host, self._port = address.host, address.port
        self._is_ready = is_ready
        self._server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        assert self._server is not None
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, self._host, self._port, limit=MAX_LINE_BYTES)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                response, complete = await asyncio.wait_for(self._read(reader), READ_TIMEOUT)
            except TimeoutError:
                response, complete = _error("408 Request Timeout", "request not received in time"), False
            status, ctype, body = response
            head = (f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                    "Connection: close\r\n\r\n")
            writer.write(head.encode() + body)
            await writer.drain()
            if not complete:
                await _discard_input(reader, writer)
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def _read(self, reader: asyncio.StreamReader) -> tuple[Response, bool]:
        """The response to the request on `reader`, and whether the request was read whole."""
        try:
            request = await reader.readline()
        except ValueError:  # longer than MAX_LINE_BYTES
            return _error("414 URI Too Long", "request line too long"), False
        for _ in range(MAX_HEADER_LINES):
            try:
                line = await reader.readline()
            except ValueError:
                return _error("431 Request Header Fields Too Large", "header line too long"), False
            if line in (b"\r\n", b"\n", b""):
                break  # headers are not needed
        else:
            return _error("431 Request Header Fields Too Large", "too many header lines"), False
        parts = request.decode("latin-1").split()
        if len(parts) < 2:
            return _error("400 Bad Request", "not an HTTP request"), False
        return self._route(parts[1].split("?")[0]), True

    def _route(self, path: str) -> Response:
        if path == "/metrics":
            return "200 OK", CONTENT_TYPE_LATEST, generate_latest(REGISTRY)
        if path == "/healthz":
            return "200 OK", "text/plain", b"ok\n"
        if path == "/readyz":
            ready, why = self._is_ready()
            if ready:
                return "200 OK", "text/plain", b"ready\n"
            return "503 Service Unavailable", "text/plain", f"not ready: {why}\n".encode()
        return _error("404 Not Found", "not found")


def _error(status: str, text: str) -> Response:
    return status, "text/plain", f"{text}\n".encode()


async def _discard_input(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Half-close, then read what the client is still sending (bounded in bytes and time)."""
    with contextlib.suppress(OSError, TimeoutError):
        if writer.can_write_eof():
            writer.write_eof()
        async with asyncio.timeout(DISCARD_TIMEOUT):
            left = DISCARD_BYTES
            while left > 0 and (chunk := await reader.read(min(left, 65536))):
                left -= len(chunk)
