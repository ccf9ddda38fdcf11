"""`/connection/websocket`: the WebSocket transport of the client protocol (aiohttp).

Each connection has a `Session` (relay/server/client_protocol.py) and a bounded outgoing queue:
the hub queues pushes without waiting, one writer task sends what is queued as one frame (JSON
lines joined by newlines, as Centrifugo batches them). A client that does not read fast enough,
so that more than `client_queue_max_bytes` wait, is disconnected with 3008 "slow"; nothing else
waits for it. The server pings every 25 s; a client that does not answer is closed with 3012, one
whose token expired and was not refreshed within 25 s with 3005 (checked at each ping).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable

from aiohttp import WSMsgType, web

from relay.server.client_encoding import JSON, PROTOBUF, Encoding
from relay.server.client_protocol import (
    DISCONNECT_EXPIRED,
    PING_INTERVAL,
    PONG_TIMEOUT,
    ClientContext,
    Session,
)

log = logging.getLogger("relay.server")

CONNECT_TIMEOUT = 10.0
PROTOBUF_SUBPROTOCOL = "centrifuge-protobuf"
CLOSE_TIMEOUT = 1.0
DISCONNECT_SLOW = (3008, "slow")
DISCONNECT_NO_PONG = (3012, "no pong")
DISCONNECT_STALE = (3502, "stale")
DISCONNECT_CONNECTION_LIMIT = (3504, "connection limit")
DISCONNECT_SHUTDOWN = (3001, "shutdown")


class WebSocketTransport:
    """The outgoing side of one connection: a byte-bounded queue drained by a writer task."""

    def __init__(self, ws: web.WebSocketResponse, max_queued_bytes: int, encoding: Encoding = JSON,
                 on_drop: Callable[[], None] = lambda: None, abort: Callable[[], None] = lambda: None) -> None:
        self.ws = ws
        self.encoding = encoding
        self.on_drop = on_drop
        self.abort = abort
        self.max_queued_bytes = max_queued_bytes
        self._queue: deque[bytes] = deque()
        self._queued_bytes = 0
        self._wake = asyncio.Event()
        self._close: tuple[int, str] | None = None
        self.writer = asyncio.create_task(self._write_forever(), name="websocket-writer")

    def send(self, frame: bytes) -> None:
        if self._close is not None:
            return
        self._queue.append(frame)
        self._queued_bytes += len(frame)
        if self._queued_bytes > self.max_queued_bytes:
            # Drop what it could not take: the client reconnects and recovers from history. The
            # writer may be stuck on the full socket, so the connection is cut rather than closed.
            self._queue.clear()
            self._queued_bytes = 0
            self._close = DISCONNECT_SLOW
            self.writer.cancel()
            self.on_drop()
            return
        self._wake.set()

    def close(self, code: int, reason: str) -> None:
        if self._close is None:
            self._close = (code, reason)
            self._wake.set()

    async def _write_forever(self) -> None:
        ws = self.ws
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._queue:
                frames = list(self._queue)
                self._queue.clear()
                self._queued_bytes = 0
                try:
                    joined = self.encoding.separator.join(frames)
                    await (ws.send_bytes(joined) if self.encoding.binary else ws.send_str(joined.decode()))
                except (ConnectionError, RuntimeError):
                    return
            if self._close is not None:
                code, reason = self._close
                if not code:
                    self.abort()
                    return
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(ws.close(code=code, message=reason.encode()), CLOSE_TIMEOUT)
                return


class WebSocketEndpoint:
    """The aiohttp handler of /connection/websocket, with the connection limit."""

    def __init__(self, ctx: ClientContext, *, max_connections: int, max_message_bytes: int,
                 max_queued_bytes: int) -> None:
        self.ctx = ctx
        self.max_connections = max_connections
        self.max_message_bytes = max_message_bytes
        self.max_queued_bytes = max_queued_bytes
        self.transports: set[WebSocketTransport] = set()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse(max_msg_size=self.max_message_bytes, autoping=True,
                                   protocols=(PROTOBUF_SUBPROTOCOL,))
        await ws.prepare(request)
        encoding = PROTOBUF if request.query.get("format") == "protobuf" or ws.ws_protocol == PROTOBUF_SUBPROTOCOL \
            else JSON
        if len(self.transports) >= self.max_connections:
            await ws.close(code=DISCONNECT_CONNECTION_LIMIT[0], message=DISCONNECT_CONNECTION_LIMIT[1].encode())
            return ws
        transport = WebSocketTransport(ws, self.max_queued_bytes, encoding, on_drop=lambda: _cut(session, request),
                                       abort=lambda: _abort(request))
        session = Session(self.ctx, transport, encoding)
        self.transports.add(transport)
        watchdog = asyncio.create_task(self._watch(session, transport), name="websocket-pinger")
        try:
            await self._read(ws, session)
        finally:
            session.close()
            watchdog.cancel()
            self.transports.discard(transport)
            # Let the writer send a pending close frame, then make sure it is gone.
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError, Exception):
                await asyncio.wait_for(asyncio.shield(transport.writer), CLOSE_TIMEOUT)
            transport.writer.cancel()
        return ws

    @staticmethod
    async def _read(ws: web.WebSocketResponse, session: Session) -> None:
        async for msg in ws:
            if msg.type in (WSMsgType.TEXT, WSMsgType.BINARY):
                session.handle_frame(msg.data)
            else:
                break
            if session.closed:
                # Keep reading until the writer closed the socket, but act on nothing more.
                await _drain(ws)
                break

    @staticmethod
    async def _watch(session: Session, transport: WebSocketTransport) -> None:
        """Close a client that never connects, and ping a connected one; no pong → 3012."""
        await asyncio.sleep(CONNECT_TIMEOUT)
        if not session.connected:
            session.disconnect(*DISCONNECT_STALE)
            return
        while not session.closed:
            await asyncio.sleep(PING_INTERVAL)
            if session.expired():
                session.disconnect(*DISCONNECT_EXPIRED)
                return
            session.awaiting_pong = True
            session.push(session.encoding.ping)
            await asyncio.sleep(PONG_TIMEOUT)
            if session.awaiting_pong:
                session.disconnect(*DISCONNECT_NO_PONG)
                return

    async def shutdown(self) -> None:
        """Close every connection with 3001 "shutdown" (clients reconnect)."""
        for transport in list(self.transports):
            transport.close(*DISCONNECT_SHUTDOWN)
        writers = [t.writer for t in self.transports]
        if writers:
            await asyncio.wait(writers, timeout=CLOSE_TIMEOUT)


def _abort(request: web.Request) -> None:
    if request.transport is not None:
        request.transport.abort()


def _cut(session: Session, request: web.Request) -> None:
    """A slow client: forget it now, and drop its socket (its read loop then ends)."""
    log.warning("websocket client %s disconnected: slow (its queue passed the limit)", session.client_id)
    session.close()
    _abort(request)


async def _drain(ws: web.WebSocketResponse) -> None:
    with contextlib.suppress(Exception):
        async for _ in ws:
            pass
