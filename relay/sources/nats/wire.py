"""The pull connection: a minimal NATS client for just what draining a pull consumer needs.

One TCP (or TLS) connection that subscribes to one inbox, sends pull requests, reads the messages
the server delivers there, and writes acks. nats-py (the control connection: consumer info and
creation) parses every message into a `Msg` and hands it through a queue and a callback, which
cost about as much CPU as the rest of the source; here the buffer the socket gave is cut into
`Delivery` tuples with one `find` and one `split` per message, and headers are only parsed when a
message has them (`headers()`).

The protocol (https://docs.nats.io/reference/reference-protocols/nats-protocol): the server says
`INFO {json}`; the client may upgrade to TLS, then sends `CONNECT {json}` and `PING`, and is in
once `PONG` comes (`-ERR` says why not). Then `SUB inbox 1`; a pull request is `PUB
$JS.API.CONSUMER.MSG.NEXT.<stream>.<durable> <inbox> <n>`; messages come as `MSG subject sid reply
size` or `HMSG subject sid reply header-size total-size`, each followed by its bytes; the server's
`PING` wants a `PONG`. An ack is an empty `PUB` to the message's reply subject.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import re
import ssl
from collections import deque
from pathlib import Path
from typing import NamedTuple
from urllib.parse import urlsplit

from relay.secrets import Secret

log = logging.getLogger("relay.sources.nats")

# A protocol line longer than this (no CRLF yet) means the stream is broken (INFO of a large
# cluster is the longest the server sends).
MAX_CONTROL_LINE = 1024 * 1024
# Marks of the user JWT and seed in a NATS credentials file.
_CREDS_BLOCK = re.compile(rb"-{3,}BEGIN [^\n]*-{3,}\s*\n\s*(\S+)\s*\n\s*-{3,}END")


# One message delivered to the inbox, as it came: (subject, reply, header, data). `reply` is the
# `$JS.ACK...` subject to ack it with (empty for a status message from the server), `header` the raw
# header block or b"". A plain tuple: a NamedTuple costs 0.2 µs more per message.
Delivery = tuple[bytes, bytes, bytes, bytes]


class WireError(Exception):
    """The connection could not be made or was refused; `refused` = our credentials or the
    server's certificate were, which retrying will not change."""

    def __init__(self, text: str, refused: bool = False) -> None:
        super().__init__(text)
        self.refused = refused


def headers(block: bytes) -> dict[str, str]:
    """The `Name: value` lines of a header block (`NATS/1.0[ status]\\r\\n...`); the first value of
    a name repeated wins, as Go's `Header.Get` (Centrifugo's consumer) reads it."""
    out: dict[str, str] = {}
    for line in block.split(b"\r\n")[1:]:
        name, sep, value = line.partition(b":")
        if sep and name and not name.isspace():
            key = name.strip().decode("ascii", "replace")
            if key not in out:
                out[key] = value.strip().decode("utf-8", "replace")
    return out


def status(block: bytes) -> str:
    """The status code of a server status message's header block (`NATS/1.0 408 Request Timeout`)."""
    first = block.split(b"\r\n", 1)[0]
    parts = first.split(b" ", 2)
    return parts[1].decode("ascii", "replace") if len(parts) > 1 else ""


class Auth(NamedTuple):
    """What CONNECT says about who we are (secrets as `Secret`s: their repr hides them)."""

    token: Secret | None = None
    user: str = ""
    password: Secret | None = None
    credentials_file: str = ""


class PullWire(asyncio.Protocol):
    """One connection to one server; `received` fills as deliveries arrive and `arrived` is set."""

    def __init__(self, inbox: bytes) -> None:
        self.inbox = inbox
        self.received: list[Delivery] = []
        self.arrived = asyncio.Event()
        self.closed = asyncio.Event()
        self._transport: asyncio.Transport | None = None
        self._buf = b""  # the start of a message or line that is not complete yet
        self._parts: list[bytes] = []  # reads of a large message gathered until it is complete
        self._gathered = 0
        self._needed = 0  # bytes in _buf and _parts before parsing is worth trying again
        self._handshaking = True  # control lines go to `_lines` for open() to read
        self._lines: list[bytes] = []
        self._line_came = asyncio.Event()
        self._pongs: deque[asyncio.Future[None]] = deque()  # drain()s waiting, in the order of their PINGs

    # -- connecting --------------------------------------------------------------------------

    @classmethod
    async def open(cls, url: str, inbox: bytes, auth: Auth, tls: ssl.SSLContext | None, name: str) -> PullWire:
        """Connect to `url` and subscribe to `inbox`; WireError if not possible."""
        parts = urlsplit(url if "://" in url else f"nats://{url}")
        host, port = parts.hostname or "127.0.0.1", parts.port or 4222
        if parts.scheme == "tls" and tls is None:
            tls = ssl.create_default_context()
        loop = asyncio.get_running_loop()
        wire = cls(inbox)
        try:
            transport, _ = await loop.create_connection(lambda: wire, host, port)
        except OSError as err:
            raise WireError(f"{host}:{port}: {err.strerror or err}") from None
        try:
            info = json.loads((await wire._line()).removeprefix(b"INFO "))
            if tls is not None or info.get("tls_required"):
                context = tls or ssl.create_default_context()
                try:
                    upgraded = await loop.start_tls(transport, wire, context, server_hostname=host)
                except ssl.SSLCertVerificationError as err:
                    raise WireError(f"the server's certificate is not trusted ({err.verify_message}); "
                                    "check tls.ca_file", refused=True) from None
                assert upgraded is not None
                wire._transport = upgraded
            wire._write(b"CONNECT %s\r\nPING\r\n" % json.dumps(
                wire._connect_options(info, auth, parts, name, tls is not None)).encode())
            answer = await wire._line()
            if answer.startswith(b"-ERR"):
                text = answer[4:].strip().strip(b"'").decode("utf-8", "replace")
                refused = "authori" in text.lower() or "authentication" in text.lower()
                raise WireError(text, refused=refused)
            wire._write(b"SUB %s 1\r\n" % inbox)
        except BaseException:
            wire.close()
            raise
        wire._handshaking = False
        return wire

    @staticmethod
    def _connect_options(info: dict[str, object], auth: Auth, url: object, name: str,
                         tls: bool) -> dict[str, object]:
        options: dict[str, object] = {"verbose": False, "pedantic": False, "tls_required": tls, "name": name,
                                      "lang": "python3", "version": "centrifugo-relay", "protocol": 1,
                                      "headers": True, "no_responders": True}
        user, password = getattr(url, "username", None), getattr(url, "password", None)
        if auth.token:
            options["auth_token"] = auth.token.reveal()
        elif auth.user:
            options.update(user=auth.user, **{"pass": auth.password.reveal() if auth.password else ""})
        elif auth.credentials_file:
            options.update(_signed(auth.credentials_file, str(info.get("nonce", ""))))
        elif user and password:
            options.update(user=user, **{"pass": password})
        elif user:
            options["auth_token"] = user
        return options

    async def _line(self) -> bytes:
        """The next control line while connecting."""
        while not self._lines:
            if self.closed.is_set():
                raise WireError("the server closed the connection")
            self._line_came.clear()
            await self._line_came.wait()
        return self._lines.pop(0)

    # -- asyncio.Protocol --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        self.closed.set()
        self.arrived.set()  # a reader waiting for messages learns of it at once
        self._line_came.set()
        for pong in self._pongs:
            if not pong.done():
                pong.set_result(None)
        self._pongs.clear()

    def data_received(self, data: bytes) -> None:
        if self._needed:  # the rest of a large message: joined once, not once per read
            self._parts.append(data)
            self._gathered += len(data)
            if self._gathered < self._needed:
                return
            data, self._parts, self._gathered, self._needed = b"".join(self._parts), [], 0, 0
        buf = self._buf + data if self._buf else data
        pos, size = 0, len(buf)
        received = self.received
        count = len(received)
        find, append = buf.find, received.append
        while pos < size:
            eol = find(b"\r\n", pos)
            if eol < 0:
                if size - pos > MAX_CONTROL_LINE:
                    return self._fail("a protocol line too long")
                break
            op = buf[pos:pos + 4]
            if op == b"MSG ":
                args = buf[pos + 4:eol].split()
                if len(args) == 4 and args[3].isdigit():  # subject sid reply size: a JetStream delivery
                    subject, _, reply, total_field = args
                    end = eol + 2 + int(total_field)
                    if end + 2 > size:  # the rest of its bytes comes with the next reads
                        self._needed = end + 2 - pos
                        break
                    append((subject, reply, b"", buf[eol + 2:end]))
                    pos = end + 2
                    continue
            if op == b"MSG " or op == b"HMSG":  # the other forms: no reply, or headers
                args = buf[pos + 4:eol].split()  # subject sid [reply] [header size] size
                try:
                    total = int(args[-1])
                    header = int(args[-2]) if op == b"HMSG" else 0
                except (ValueError, IndexError):
                    return self._fail(f"a malformed {op.decode().strip()} line")
                start = eol + 2
                end = start + total
                if end + 2 > size:  # the rest of its bytes comes with the next reads
                    self._needed = end + 2 - pos
                    break
                with_reply = len(args) == (5 if op == b"HMSG" else 4)
                append((args[0], args[2] if with_reply else b"", buf[start:start + header], buf[start + header:end]))
                pos = end + 2
                continue
            line = buf[pos:eol]
            pos = eol + 2
            if line == b"PING":
                self._write(b"PONG\r\n")
            elif self._handshaking:
                self._lines.append(line)
                self._line_came.set()
            elif line == b"PONG" and self._pongs:
                pong = self._pongs.popleft()
                if not pong.done():
                    pong.set_result(None)
            elif line.startswith(b"-ERR"):
                log.warning("nats source: the server says %s", line[4:].strip().decode("utf-8", "replace"))
            # +OK and later INFOs (cluster changes) need nothing here
        self._buf = buf[pos:]
        if self._needed:
            self._parts, self._gathered = [self._buf], len(self._buf)
            self._buf = b""
        if len(received) > count:
            self.arrived.set()

    def _fail(self, what: str) -> None:
        log.warning("nats source: %s from the server; reconnecting", what)
        self.close()

    # -- writing -----------------------------------------------------------------------------

    def _write(self, data: bytes) -> None:
        if self._transport is not None:
            self._transport.write(data)

    @property
    def connected(self) -> bool:
        return self._transport is not None and not self.closed.is_set()

    def pull(self, subject: bytes, request: bytes) -> None:
        """Ask the consumer for messages; they come to the inbox."""
        self._write(b"PUB %s %s %d\r\n%s\r\n" % (subject, self.inbox, len(request), request))

    def ack(self, replies: list[bytes]) -> None:
        """Ack deliveries by their reply subjects, in one write."""
        if not self.connected:
            raise ConnectionError("the pull connection is down")
        if replies:  # one join, not a line built per ack
            self._write(b"PUB " + b" 0\r\n\r\nPUB ".join(replies) + b" 0\r\n\r\n")

    async def drain(self, timeout: float) -> None:
        """Wait until the server read everything written so far (its PONG to our PING), at most
        `timeout` seconds."""
        if not self.connected:
            return
        pong = asyncio.get_running_loop().create_future()
        self._pongs.append(pong)
        self._write(b"PING\r\n")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(pong, timeout)

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
        self.connection_lost(None)


def _signed(credentials_file: str, nonce: str) -> dict[str, str]:
    """CONNECT's `jwt` and `sig` from a credentials file: the user JWT and the nonce signed with the
    user's NKey seed. Both are made `Secret`s, so the log formatter blanks them out wherever they appear."""
    import nkeys  # only credentials_file users need it

    blocks = _CREDS_BLOCK.findall(Path(credentials_file).read_bytes())
    if len(blocks) < 2:
        raise WireError(f"credentials_file {credentials_file} has no user JWT and seed", refused=True)
    jwt, seed = Secret(blocks[0].decode("ascii", "replace")), Secret(blocks[1].decode("ascii", "replace"))
    pair = nkeys.from_seed(bytearray(seed.reveal().encode()))
    try:
        signature = pair.sign(nonce.encode())
    finally:
        pair.wipe()
    return {"jwt": jwt.reveal(), "sig": base64.b64encode(signature).decode("ascii")}
