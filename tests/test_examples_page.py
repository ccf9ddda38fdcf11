"""The examples/ page, loaded from the embedded server in headless Chromium, shows the ticker's ticks."""

from __future__ import annotations

import asyncio
import re
import subprocess
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.harness.debian import MissingPackage, debian_tool
from tests.harness.ports import free_port
from tests.harness.require import unavailable
from tests.test_websocket_clients import default_config_run


def chromium() -> str:
    """Debian's chromium; installed with apt-get when missing and root, else the test fails saying how."""
    try:
        return debian_tool("chromium", "chromium")
    except MissingPackage as err:
        unavailable(str(err))


async def page_text(debugging_port: int, page: str, expression: str, done: Any, timeout: float = 30.0) -> str:
    """Evaluate `expression` in the page over the DevTools protocol until `done(text)` or the timeout."""
    deadline = time.monotonic() + timeout
    text = ""
    async with aiohttp.ClientSession() as http:
        target = None
        while target is None and time.monotonic() < deadline:
            try:
                async with http.get(f"http://127.0.0.1:{debugging_port}/json/list") as resp:
                    target = next((t for t in await resp.json() if t.get("url", "").startswith(page)), None)
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.2)
        assert target is not None, "chromium never opened the page"
        async with http.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=0) as devtools:
            call = 0
            while time.monotonic() < deadline:
                call += 1
                await devtools.send_json({"id": call, "method": "Runtime.evaluate",
                                          "params": {"expression": expression, "returnByValue": True}})
                while True:
                    reply = await devtools.receive_json(timeout=10)
                    if reply.get("id") == call:
                        break
                text = str(reply.get("result", {}).get("result", {}).get("value", ""))
                if done(text):
                    return text
                await asyncio.sleep(0.3)
    return text


async def test_example_page_shows_ticks_in_headless_chromium(request: pytest.FixtureRequest, tmp_path: Path) -> None:
    browser = chromium()
    _, ws_url = default_config_run("embedded", request, tmp_path)
    page = ws_url.replace("ws://", "http://").replace("/connection/websocket", "/examples/")
    port = free_port()
    proc = subprocess.Popen([browser, "--headless=new", "--no-sandbox", "--disable-gpu",
                             f"--remote-debugging-port={port}", f"--user-data-dir={tmp_path / 'profile'}", page],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        text = await page_text(port, page, "document.body.innerText",
                               lambda t: len(re.findall(r"tick \d+ at ", t)) >= 2)
    finally:
        proc.kill()
        proc.wait(10)
    seqs = [int(s) for s in re.findall(r"tick (\d+) at ", text)]
    assert len(seqs) >= 2, text
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
    assert "connected" in text
