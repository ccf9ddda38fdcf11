"""`[server] tls` covers the HTTP side too: wss:// and https:// with the same certificate and client CA."""

from __future__ import annotations

import ssl

import aiohttp

from relay.config import ServerSection
from relay.server.app import EmbeddedServer
from tests.harness.ports import free_port
from tests.test_tls import SERVER_NAME, Pki, pki, server_tls

__all__ = ["pki"]


def client_context(pki: Pki, with_cert: bool) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki.ca))
    if with_cert:
        context.load_cert_chain(str(pki.client_cert), str(pki.client_key))
    return context


async def test_websocket_over_mtls(pki: Pki) -> None:
    port = free_port()
    server = EmbeddedServer(ServerSection.model_validate(
        {"listen": "127.0.0.1:0", "http_listen": f"127.0.0.1:{port}", "namespaces": ["chat"],
         "tls": server_tls(pki)}))
    await server.start()
    url = f"wss://127.0.0.1:{port}/connection/websocket"
    try:
        outcomes = {}
        for name, with_cert in (("good", True), ("no cert", False)):
            connector = aiohttp.TCPConnector(ssl=client_context(pki, with_cert))
            async with aiohttp.ClientSession(connector=connector) as session:
                try:
                    async with session.ws_connect(url, server_hostname=SERVER_NAME) as ws:
                        await ws.send_str('{"id":1,"connect":{}}')
                        reply = await ws.receive_json(timeout=5)
                        outcomes[name] = "client" in reply["connect"]
                except (aiohttp.ClientError, ssl.SSLError, ConnectionError) as err:
                    outcomes[name] = type(err).__name__
        assert outcomes["good"] is True
        assert outcomes["no cert"] is not True
    finally:
        await server.stop(0.5)
