"""centrifuge-js (npm `centrifuge`) under Node 20, installed into the cache, never the work tree.

`js_subscriber(ws_url, channel, encoding="json"|"protobuf", delta=""|"fossil")` runs a small script
that subscribes and prints one JSON line per event (`{"subscribed": {...}}`, `{"pub": data,
"offset": n}`; protobuf data as `{"bytes": text}`); the test reads them in order.
Node 20 has no global WebSocket, so the `ws` package is passed as the `websocket` option.
"""

from __future__ import annotations

import json
import queue
import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness.require import CACHE, unavailable

NPM_DIR = CACHE / "npm"
PACKAGES = ["centrifuge@5", "ws@8"]

SCRIPT = """
const [url, channel, encoding, delta] = process.argv.slice(2);
const { Centrifuge } = require(encoding === 'protobuf' ? 'centrifuge/build/protobuf' : 'centrifuge');
const WebSocket = require('ws');
const out = (obj) => process.stdout.write(JSON.stringify(obj) + '\\n');
const client = new Centrifuge(url, { websocket: WebSocket, minReconnectDelay: 50, maxReconnectDelay: 500 });
const sub = client.newSubscription(channel, delta ? { delta } : {});
sub.on('subscribed', (ctx) => out({ subscribed: { recovered: ctx.recovered, wasRecovering: ctx.wasRecovering,
                                                  recoverable: ctx.recoverable, position: ctx.streamPosition } }));
sub.on('publication', (ctx) => out({
  pub: ctx.data instanceof Uint8Array ? { bytes: Buffer.from(ctx.data).toString('utf8') } : ctx.data,
  offset: ctx.offset }));
sub.on('error', (ctx) => out({ error: ctx.error }));
client.on('disconnected', (ctx) => out({ disconnected: ctx }));
sub.subscribe();
client.connect();
"""


def node_modules() -> Path:
    """The cache's node_modules with centrifuge-js and ws (npm install on first use)."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        unavailable("node and npm are needed for centrifuge-js (apt-get install nodejs npm)")
    modules = NPM_DIR / "node_modules"
    if not (modules / "centrifuge" / "package.json").exists() or not (modules / "ws" / "package.json").exists():
        NPM_DIR.mkdir(parents=True, exist_ok=True)
        if not (NPM_DIR / "package.json").exists():
            (NPM_DIR / "package.json").write_text('{"name": "relay-test-clients", "private": true}\n')
        done = subprocess.run(["npm", "install", "--no-audit", "--no-fund", *PACKAGES], cwd=NPM_DIR,
                              capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            unavailable(f"npm install {' '.join(PACKAGES)} failed: {done.stderr[-1000:]}")
    return modules


class JsSubscriber:
    """A running centrifuge-js subscriber; `next_event()` returns its printed events in order."""

    def __init__(self, script: Path, ws_url: str, channel: str, encoding: str = "json", delta: str = "") -> None:
        env = {"NODE_PATH": str(node_modules()), "PATH": "/usr/bin:/bin"}
        self.process = subprocess.Popen(["node", str(script), ws_url, channel, encoding, delta],
                                        stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True, env=env)
        self._events: queue.Queue[dict[str, Any]] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            try:
                self._events.put(json.loads(line))
            except json.JSONDecodeError:
                self._events.put({"output": line.rstrip()})

    def next_event(self, timeout: float = 30.0) -> dict[str, Any]:
        try:
            return self._events.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"centrifuge-js printed nothing for {timeout}s") from None

    def publications(self, count: int, timeout: float = 30.0) -> list[tuple[Any, int]]:
        """The next `count` publications as (data, offset), skipping other events."""
        pubs: list[tuple[Any, int]] = []
        while len(pubs) < count:
            event = self.next_event(timeout)
            if "pub" in event:
                pubs.append((event["pub"], event["offset"]))
        return pubs

    def stop(self) -> None:
        self.process.kill()
        self.process.wait(10)


@pytest.fixture
def js_subscriber(tmp_path: Path) -> Iterator[Any]:
    """Factory: `js_subscriber(ws_url, channel)` → a JsSubscriber, killed after the test."""
    script = tmp_path / "subscribe.js"
    script.write_text(SCRIPT)
    started: list[JsSubscriber] = []

    def make(ws_url: str, channel: str, encoding: str = "json", delta: str = "") -> JsSubscriber:
        sub = JsSubscriber(script, ws_url, channel, encoding, delta)
        started.append(sub)
        return sub

    yield make
    for sub in started:
        sub.stop()
