"""The HTTP side's settings: `relay serve --http-listen`, the remote-listen rule, hostile input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import aiohttp
import pytest

from relay.config import ServerSection
from relay.server.app import EmbeddedServer, ServerStartError
from tests.harness.ports import free_port

ROOT = Path(__file__).resolve().parent.parent


async def test_a_remote_http_listen_without_a_key_is_refused() -> None:
    server = EmbeddedServer(ServerSection.model_validate(
        {"listen": "127.0.0.1:0", "http_listen": f"0.0.0.0:{free_port()}"}))
    with pytest.raises(ServerStartError, match=r"server.http_listen: .* no API key is set"):
        await server.start()


def test_relay_serve_http_listen_flag_and_its_key(tmp_path: Path) -> None:
    port = free_port()
    env = {**os.environ, "RELAY_HTTP_SIDE_KEY": "k1"}
    proc = subprocess.Popen([sys.executable, "-m", "relay", "serve", "--listen", "127.0.0.1:0", "--http-listen",
                             f"127.0.0.1:{port}", "--api-key-env", "RELAY_HTTP_SIDE_KEY"],
                            cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        assert proc.stderr.readline().strip() == f"http on 127.0.0.1:{port}"
        req = urllib.request.Request(f"http://127.0.0.1:{port}/api/info", data=b"{}", headers={"X-API-Key": "k1"})
        with urllib.request.urlopen(req, timeout=5) as resp:
            assert json.loads(resp.read())["result"]["nodes"][0]["version"].startswith("centrifugo-relay")
        wrong = urllib.request.Request(f"http://127.0.0.1:{port}/api/info", data=b"{}")
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(wrong, timeout=5)
        assert err.value.code == 401
    finally:
        proc.terminate()
        proc.wait(10)


async def test_hostile_input_gets_an_error_and_the_server_goes_on() -> None:
    port = free_port()
    server = EmbeddedServer(ServerSection.model_validate(
        {"listen": "127.0.0.1:0", "http_listen": f"127.0.0.1:{port}", "namespaces": ["chat"]}))
    await server.start()
    base = f"127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as http:
            async with http.post(f"http://{base}/api/publish", data=b"x" * (5 * 1024 * 1024)) as resp:
                assert resp.status == 413
            for frame in ("\x00garbage", "[1, 2]", ""):
                async with http.ws_connect(f"ws://{base}/connection/websocket") as ws:
                    await ws.send_str(frame)
                    msg = await ws.receive(timeout=5)
                    assert (msg.type, msg.data) == (aiohttp.WSMsgType.CLOSE, 3501), frame
            async with http.ws_connect(f"ws://{base}/connection/websocket?format=protobuf") as ws:
                await ws.send_bytes(b"\xff\xff\xff\xff\x0f")  # a length that runs past the frame
                msg = await ws.receive(timeout=5)
                assert (msg.type, msg.data) == (aiohttp.WSMsgType.CLOSE, 3501)
            async with http.post(f"http://{base}/api/info", data=b"{}") as resp:
                assert resp.status == 200
    finally:
        await server.stop(0.5)
