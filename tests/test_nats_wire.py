"""The NATS source's pull connection (relay/sources/nats/wire.py): its protocol reader cut at every
byte, its header parsing, and a credentials file whose contents never reach a log."""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

import nkeys
import pytest

from relay.sources.nats import Config
from relay.sources.nats.wire import Delivery, PullWire, headers, status
from tests.harness.nats import NatsServer
from tests.test_nats_source import Reader, engine

HEADER = b"NATS/1.0\r\nroom: 7\r\nroom: 8\r\nx-b:  y \r\n\r\n"
TIMEOUT = b"NATS/1.0 408 Request Timeout\r\nNats-Pending-Messages: 12\r\n\r\n"
STREAM = (
    b"MSG chat.a 1 $JS.ACK.S.d.1.1.1.1700000000000000000.2 5\r\nhello\r\n"
    b"PING\r\n"
    b"HMSG chat.b 1 $JS.ACK.S.d.1.2.2.1700000000000000001.1 %d %d\r\n%sworld\r\n"
    b"+OK\r\n"
    b"MSG chat.c 1 $JS.ACK.S.d.1.3.3.1700000000000000002.0 0\r\n\r\n"
    b"HMSG _INBOX.x 1 %d %d\r\n%s\r\n"
) % (len(HEADER), len(HEADER) + 5, HEADER, len(TIMEOUT), len(TIMEOUT), TIMEOUT)
EXPECTED: list[Delivery] = [
    (b"chat.a", b"$JS.ACK.S.d.1.1.1.1700000000000000000.2", b"", b"hello"),
    (b"chat.b", b"$JS.ACK.S.d.1.2.2.1700000000000000001.1", HEADER, b"world"),
    (b"chat.c", b"$JS.ACK.S.d.1.3.3.1700000000000000002.0", b"", b""),
    (b"_INBOX.x", b"", TIMEOUT, b""),
]


class Transport(asyncio.Transport):
    """Collects what the wire writes (its PONGs)."""

    def __init__(self) -> None:
        super().__init__()
        self.written = b""
        self.closed = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written += bytes(data)

    def close(self) -> None:
        self.closed = True


def fed(*pieces: bytes) -> tuple[PullWire, Transport]:
    wire = PullWire(b"_INBOX.x")
    transport = Transport()
    wire.connection_made(transport)
    wire._handshaking = False
    for piece in pieces:
        wire.data_received(piece)
    return wire, transport


def test_every_split_of_the_byte_stream_gives_the_same_deliveries() -> None:
    for cut in range(1, len(STREAM)):
        wire, transport = fed(STREAM[:cut], STREAM[cut:])
        assert wire.received == EXPECTED, cut
        assert transport.written == b"PONG\r\n", cut
    wire, _ = fed(*(STREAM[i:i + 1] for i in range(len(STREAM))))  # a byte at a time
    assert wire.received == EXPECTED


def test_a_large_message_read_in_many_pieces_arrives_whole() -> None:
    body = bytes(range(256)) * 4096  # 1 MiB, with CRLFs inside
    stream = b"MSG big 1 $JS.ACK.S.d.1.9.9.1.0 %d\r\n%s\r\n" % (len(body), body) + STREAM
    wire, _ = fed(*(stream[i:i + 65536] for i in range(0, len(stream), 65536)))
    assert wire.received == [(b"big", b"$JS.ACK.S.d.1.9.9.1.0", b"", body), *EXPECTED]


def test_headers_keep_the_first_value_as_centrifugo_reads_them_and_status_is_read() -> None:
    assert headers(EXPECTED[1][2]) == {"room": "7", "x-b": "y"}
    assert status(EXPECTED[3][2]) == "408"
    assert headers(EXPECTED[3][2]) == {"Nats-Pending-Messages": "12"}
    assert status(EXPECTED[1][2]) == ""


def test_a_malformed_message_line_closes_the_connection() -> None:
    for line in (b"MSG chat.a 1 many", b"MSG chat.a 1 $JS.ACK.S.d.1.1.1.1.0 five", b"HMSG chat.a 1 r 5"):
        wire, transport = fed(line + b"\r\nhello\r\n")
        assert transport.closed and not wire.connected and wire.received == [], line


def credentials(path: Path) -> tuple[str, str]:
    seed = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER).decode()
    jwt = "eyJ0eXAiOiJKV1QiLCJhbGciOiJlZDI1NTE5LW5rZXkifQ.eyJzdWIiOiJVQUJDIn0.c2lnbmF0dXJlLW5vdC1jaGVja2Vk"
    path.write_text(f"-----BEGIN NATS USER JWT-----\n{jwt}\n------END NATS USER JWT------\n\n"
                    f"************************* IMPORTANT *************************\n\n"
                    f"-----BEGIN USER NKEY SEED-----\n{seed}\n------END USER NKEY SEED------\n")
    return jwt, seed


async def test_a_credentials_files_contents_never_reach_the_log(nats_server: NatsServer, tmp_path: Path,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    # A server without auth takes any CONNECT: both connections sign with the file and read on.
    jwt, seed = credentials(tmp_path / "user.creds")
    stream = "CREDS"
    nats_server.create_stream(stream, ["creds.>"])
    nats_server.publish([("creds.a", b"1", {}), ("creds.b", b"2", {})])
    caplog.set_level(logging.DEBUG)
    src = engine(Config.model_validate({"type": "nats", "url": nats_server.url, "stream": stream,
                                        "durable": "relay", "credentials_file": str(tmp_path / "user.creds")}))
    reader = Reader(src)
    reader.task = asyncio.create_task(src.run(reader.emit))
    try:
        await reader.wait_for(2)
    finally:
        await src.stop()
        await reader.task
        await src.close()
    assert [m.data for m in reader.got] == [b"1", b"2"]
    assert "relay.sources.nats" in caplog.text  # the source did log at debug level
    assert jwt not in caplog.text and seed not in caplog.text
    assert jwt[20:40] not in caplog.text and seed[10:30] not in caplog.text
