"""The status endpoints on aiohttp: the three routes, and hostile requests answered with an HTTP error."""

from __future__ import annotations

import asyncio
import logging

import aiohttp
import pytest

from relay.status_server import StatusServer


async def raw_request(port: int, data: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(4096), 10)
    writer.close()
    return answer


async def test_routes_and_an_oversized_request_line(caplog: pytest.LogCaptureFixture) -> None:
    ready = [False, "starting"]
    server = StatusServer("127.0.0.1:0", lambda: (bool(ready[0]), str(ready[1])))
    await server.start()
    try:
        async with aiohttp.ClientSession() as http:
            base = f"http://127.0.0.1:{server.port}"
            async with http.get(base + "/metrics") as resp:
                assert resp.status == 200 and "text/plain" in resp.headers["Content-Type"]
                assert "relay_ready" in await resp.text()
            async with http.get(base + "/healthz") as resp:
                assert (resp.status, await resp.text()) == (200, "ok\n")
            async with http.get(base + "/readyz") as resp:
                assert (resp.status, await resp.text()) == (503, "not ready: starting\n")
            ready[0] = True
            async with http.get(base + "/readyz") as resp:
                assert resp.status == 200
            async with http.get(base + "/nothing") as resp:
                assert resp.status == 404
        with caplog.at_level(logging.DEBUG):
            answer = await raw_request(server.port, b"GET /metrics?" + b"a" * 200_000 + b" HTTP/1.1\r\n\r\n")
        assert answer.split(b" ")[1] in (b"400", b"414", b"431"), answer[:200]
        assert "Traceback" not in caplog.text
        async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{server.port}/healthz") as resp:
            assert resp.status == 200  # still serving
    finally:
        await server.stop()
