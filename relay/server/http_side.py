"""The embedded server's HTTP port (aiohttp): WebSocket clients, the HTTP API, the examples page.

    /connection/websocket   Centrifugo's client protocol (relay/server/websocket.py)
    /api, /api/<method>     Centrifugo's HTTP server API (relay/server/http_api.py)
    /examples/              the static pages of examples/, with centrifuge-js when it is installed
"""

from __future__ import annotations

import ssl
from pathlib import Path

from aiohttp import web

from relay.config import ServerSection
from relay.http_requests_log import http_server_logger
from relay.server.client_protocol import ClientContext
from relay.server.http_api import HttpApi
from relay.server.websocket import WebSocketEndpoint

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
# The API's largest body; Centrifugo's http_api has no smaller limit than its GRPC side.
MAX_API_BODY = 4 * 1024 * 1024


class HttpSide:
    """One aiohttp site serving the client protocol and the HTTP API over the embedded server's state."""

    def __init__(self, config: ServerSection, clients: ClientContext, api: HttpApi) -> None:
        self.websocket = WebSocketEndpoint(
            clients, max_connections=config.max_connections, max_message_bytes=config.max_client_message_bytes,
            max_queued_bytes=config.client_queue_max_bytes)
        self.app = web.Application(client_max_size=max(MAX_API_BODY, config.max_message_bytes))
        self.app.router.add_get("/connection/websocket", self.websocket.handle)
        api.add_routes(self.app)
        if EXAMPLES.is_dir():
            self.app.router.add_get("/examples", _to_examples)
            self.app.router.add_get("/examples/", _examples_index)
            self.app.router.add_static("/examples/", EXAMPLES)
        self._runner: web.AppRunner | None = None
        self.address = ""

    async def start(self, host: str, port: int, ssl_context: ssl.SSLContext | None = None) -> None:
        """Listen on host:port (0 = any free port), with TLS when given; OSError when it cannot."""
        runner = web.AppRunner(self.app, access_log=None, handle_signals=False, logger=http_server_logger())
        await runner.setup()
        site = web.TCPSite(runner, host, port, reuse_address=True, ssl_context=ssl_context)
        try:
            await site.start()
        except OSError:
            await runner.cleanup()
            raise
        self._runner = runner
        sockets = getattr(site._server, "sockets", None) or []
        bound = sockets[0].getsockname()[1] if sockets else port
        self.address = f"[{host}]:{bound}" if ":" in host else f"{host}:{bound}"

    async def stop(self) -> None:
        """Close every client connection (3001 shutdown), then the port."""
        await self.websocket.shutdown()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


async def _to_examples(request: web.Request) -> web.StreamResponse:
    raise web.HTTPFound("/examples/")


async def _examples_index(request: web.Request) -> web.StreamResponse:
    return web.FileResponse(EXAMPLES / "index.html")
