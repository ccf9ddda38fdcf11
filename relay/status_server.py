"""The HTTP endpoints at `relay.metrics_listen`: /metrics, /healthz, /readyz (aiohttp).

The same HTTP library as the embedded server's WebSocket side: requests are parsed by aiohttp,
so a malformed or oversized request gets an HTTP error, never a traceback.
"""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from relay.addresses import parse_host_port
from relay.http_requests_log import http_server_logger
from relay.metrics import REGISTRY


class StatusServer:
    def __init__(self, listen: str, is_ready: Callable[[], tuple[bool, str]]) -> None:
        address = parse_host_port(listen, any_port=True)
        self._host, self._port = address.host, address.port
        self._is_ready = is_ready
        self._runner: web.AppRunner | None = None
        self._bound = 0

    @property
    def port(self) -> int:
        assert self._runner is not None
        return self._bound

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        runner = web.AppRunner(app, access_log=None, handle_signals=False, logger=http_server_logger())
        await runner.setup()
        site = web.TCPSite(runner, self._host, self._port, reuse_address=True)
        try:
            await site.start()
        except OSError:
            await runner.cleanup()
            raise
        sockets = getattr(site._server, "sockets", None) or []
        self._bound = sockets[0].getsockname()[1] if sockets else self._port
        self._runner = runner

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _metrics(self, request: web.Request) -> web.Response:
        # prometheus_client's content type carries parameters aiohttp's content_type= refuses.
        return web.Response(body=generate_latest(REGISTRY), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def _readyz(self, request: web.Request) -> web.Response:
        ready, why = self._is_ready()
        if ready:
            return web.Response(text="ready\n")
        return web.Response(status=503, text=f"not ready: {why}\n")
