"""The status endpoints (/metrics, /healthz, /readyz) of a real `relay run`, sent hostile requests over
a real socket: each gets an HTTP error (or an answer), the relay logs nothing alarming and goes on
serving. Black-box on purpose: it holds whatever serves the endpoints."""

from __future__ import annotations

import re
import socket
import time
from pathlib import Path

import pytest

from tests.harness.configs import sink_table, ticker_tables
from tests.harness.embedded import KEY_ENV, EmbeddedServerProcess
from tests.harness.relay_process import RelayProcess

pytestmark = pytest.mark.timeout(120)

HUGE = 200 * 1024
# (what is sent, HTTP statuses that are a right answer to it)
HOSTILE = {
    "200 KB request line to /metrics": (b"GET /metrics?" + b"a" * HUGE + b" HTTP/1.1\r\nHost: x\r\n\r\n",
                                        {400, 414}),
    "200 KB path": (b"GET /" + b"m" * HUGE + b" HTTP/1.1\r\nHost: x\r\n\r\n", {400, 404, 414}),
    "200 KB header line": (b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * HUGE + b"\r\n\r\n",
                           {400, 431}),
    # Refusing so many header lines is right, answering them is not wrong: no hang, no traceback.
    "200 KB of header lines": (b"GET /metrics HTTP/1.1\r\n" + b"X-A: b\r\n" * (HUGE // 8) + b"\r\n",
                               {200, 400, 431}),
    "binary garbage": (bytes(range(256)) * 64 + b"\r\n\r\n", {400}),
}


def exchange(port: int, request: bytes, timeout: float = 15.0) -> bytes:
    """Send `request`, then read until the server closes; what it answered."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(request)
        chunks = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    return b"".join(chunks)


def test_hostile_requests_get_an_http_error_and_log_nothing_alarming(
        embedded_server: EmbeddedServerProcess, tmp_path: Path) -> None:
    relay = RelayProcess(tmp_path / "relay",
                         sink_table(embedded_server.address, KEY_ENV) + ticker_tables("chat:status", interval="1s"),
                         env={KEY_ENV: embedded_server.api_key})
    relay.start()
    try:
        relay.wait_http()
        deadline = time.monotonic() + 30
        while relay.get("/readyz")[0] != 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        before = len(relay.logs())
        answers = {}
        for name, (request, _) in HOSTILE.items():
            reply = exchange(relay.metrics_port, request)
            match = re.match(rb"HTTP/1\.[01] (\d{3}) ", reply)
            answers[name] = int(match.group(1)) if match else reply[:80]
            status, body = relay.get("/metrics")  # still serving, after each one
            assert status == 200 and "relay_publications_total" in body, name
        assert relay.get("/healthz")[0] == 200
        assert relay.alive()
    finally:
        relay.stop()
    assert {name: answers[name] in ok for name, (_, ok) in HOSTILE.items()} == dict.fromkeys(HOSTILE, True), answers
    after = relay.logs()[before:]
    alarming = [line for line in after.splitlines()
                if re.search(r"traceback|exception|error handling|request", line, re.IGNORECASE)]
    assert alarming == [], after[-3000:]
