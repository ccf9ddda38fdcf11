"""Fan-out benchmark: N WebSocket subscribers on one channel, publications at a fixed rate.

The embedded server (`relay serve` with its HTTP side) and real Centrifugo v6 get the same load:
subscribers connect with the client protocol (raw JSON frames, aiohttp) spread over a few client
processes; one publisher sends `/api/batch` calls of 10 publications every 10 ms through the HTTP
API, each publication stamped with the time it was sent. Reported: deliveries per second (every
publication every subscriber received, over the publishing time plus the drain) and the p50/p99
delivery latency (receive time minus send time, same clock).

    .venv/bin/python bench/fanout_bench.py [--subscribers 1000] [--rate 1000] [--duration 5]

`fan_out()` is also what tests/test_fanout.py uses (with `check_order`) to prove every subscriber
got every publication in order.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CHANNEL = "chat:fanout"
BATCH = 10
TICK = 0.01
API_KEY = "bench-key"


async def _subscriber(session: aiohttp.ClientSession, ws_url: str, expect: int, check_order: bool,
                      ready: asyncio.Event, counter: list[int], out: dict[str, Any]) -> None:
    latencies: list[float] = out["latencies"]
    got = 0
    last_offset = 0
    async with session.ws_connect(ws_url, max_msg_size=0) as ws:
        subscribe = orjson.dumps({"id": 2, "subscribe": {"channel": CHANNEL}}).decode()
        await ws.send_str('{"id":1,"connect":{}}\n' + subscribe)
        subscribed = False
        while got < expect:
            msg = await ws.receive()
            if msg.type != aiohttp.WSMsgType.TEXT:
                out["errors"].append(f"closed {ws.close_code}")
                return
            now = time.time()
            for line in msg.data.split("\n"):
                if line == "{}":
                    await ws.send_str("{}")
                    continue
                if '"push"' not in line:
                    if '"id":2' in line and not subscribed:
                        subscribed = True
                        counter[0] += 1
                        if counter[0] == out["subscribers"]:
                            ready.set()
                    continue
                got += 1
                at = line.find('"t":')
                latencies.append(now - float(line[at + 4:line.find(",", at)]))
                if check_order:
                    offset = orjson.loads(line)["push"]["pub"]["offset"]
                    if offset != last_offset + 1:
                        out["errors"].append(f"offset {offset} after {last_offset}")
                    last_offset = offset
    out["received"] += got


async def _subscribers(ws_url: str, count: int, expect: int, check_order: bool, timeout: float,
                       ready_flag: Any = None) -> dict[str, Any]:
    out: dict[str, Any] = {"latencies": [], "errors": [], "received": 0, "subscribers": count}
    ready = asyncio.Event()
    counter = [0]
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        tasks = [asyncio.create_task(_subscriber(session, ws_url, expect, check_order, ready, counter, out))
                 for _ in range(count)]
        await asyncio.wait_for(ready.wait(), timeout)
        if ready_flag is not None:
            ready_flag.set()
        done, pending = await asyncio.wait(tasks, timeout=timeout)
        for task in pending:
            task.cancel()
        for task in done:
            if task.exception() is not None:
                out["errors"].append(repr(task.exception()))
        out["finished_at"] = time.time()
        if pending:
            out["errors"].append(f"{len(pending)} subscribers timed out")
    return out


def _subscriber_process(ws_url: str, count: int, expect: int, timeout: float, ready: Any, queue: Any) -> None:
    out = asyncio.run(_subscribers(ws_url, count, expect, False, timeout, ready))
    queue.put(out)


async def publish(api_url: str, api_key: str, publications: int, rate: float) -> float:
    """Send `publications` at `rate` per second in batches of 10; returns when the first was sent."""
    headers = {"X-API-Key": api_key}
    started = time.time()
    async with aiohttp.ClientSession() as http:
        sent = 0
        while sent < publications:
            n = min(BATCH, publications - sent)
            now = time.time()
            commands = [{"publish": {"channel": CHANNEL, "data": {"t": now, "n": sent + i}}} for i in range(n)]
            async with http.post(f"{api_url}/batch", data=orjson.dumps({"commands": commands}),
                                 headers=headers) as resp:
                body = await resp.json(content_type=None)
            assert all("error" not in r for r in body["replies"]), body
            sent += n
            delay = started + sent / rate - time.time()
            if delay > 0:
                await asyncio.sleep(delay)
    return started


async def fan_out(ws_url: str, api_url: str, api_key: str, subscribers: int, publications: int,
                  rate: float, check_order: bool = False, timeout: float = 120.0) -> dict[str, Any]:
    """Subscribers in this process; every one must get every publication (in order if asked)."""
    ready = asyncio.Event()
    sub_task = asyncio.create_task(_subscribers(ws_url, subscribers, publications, check_order, timeout, ready))
    await asyncio.wait([sub_task, asyncio.create_task(ready.wait())], return_when=asyncio.FIRST_COMPLETED)
    if sub_task.done():
        sub_task.result()
    started = await publish(api_url, api_key, publications, rate)
    out = await sub_task
    return _figures(out, subscribers, publications, started)


def _figures(out: dict[str, Any], subscribers: int, publications: int, started: float) -> dict[str, Any]:
    lat = sorted(out["latencies"])
    elapsed = max(1e-9, out.get("finished_at", time.time()) - started)
    return {
        "subscribers": subscribers, "publications": publications, "deliveries": out["received"],
        "expected_deliveries": subscribers * publications,
        "deliveries_per_second": round(out["received"] / elapsed),
        "p50_ms": round(statistics.median(lat) * 1000, 1) if lat else None,
        "p99_ms": round(lat[int(len(lat) * 0.99) - 1] * 1000, 1) if lat else None,
        "errors": out["errors"][:5],
    }


def run_load(ws_url: str, api_url: str, api_key: str, subscribers: int, rate: float, duration: float,
             processes: int = 2) -> dict[str, Any]:
    """The bench load: subscribers spread over `processes` client processes."""
    publications = int(rate * duration)
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    flags = []
    procs = []
    share = [subscribers // processes + (1 if i < subscribers % processes else 0) for i in range(processes)]
    for count in share:
        flag = ctx.Event()
        proc = ctx.Process(target=_subscriber_process, args=(ws_url, count, publications, 60 + duration * 4,
                                                             flag, queue))
        proc.start()
        procs.append(proc)
        flags.append(flag)
    for flag in flags:
        if not flag.wait(120):
            raise RuntimeError("subscribers did not all subscribe")
    started = asyncio.run(publish(api_url, api_key, publications, rate))
    outs = [queue.get(timeout=300) for _ in procs]
    for proc in procs:
        proc.join(30)
    merged: dict[str, Any] = {"latencies": [], "errors": [], "received": 0,
                              "finished_at": max(o["finished_at"] for o in outs)}
    for o in outs:
        merged["latencies"] += o["latencies"]
        merged["errors"] += o["errors"]
        merged["received"] += o["received"]
    return _figures(merged, subscribers, publications, started)


def embedded_server(workdir: Path) -> Any:
    from tests.harness.embedded import EmbeddedServerProcess
    from tests.harness.ports import free_port
    server = EmbeddedServerProcess(workdir, api_key=API_KEY, http_listen=f"127.0.0.1:{free_port()}",
                                   namespaces=[{"name": "chat", "history_size": 1000, "history_ttl": "300s"}],
                                   max_connections=100_000)
    return server.start()


def run(subscribers: int = 1000, rate: float = 1000, duration: float = 5.0,
        targets: tuple[str, ...] = ("embedded", "centrifugo")) -> dict[str, Any]:
    """Both servers under the same load; figures by server."""
    results: dict[str, Any] = {"load": {"subscribers": subscribers, "rate": rate, "duration": duration}}
    with tempfile.TemporaryDirectory(prefix="relay-fanout-") as tmp:
        if "embedded" in targets:
            server = embedded_server(Path(tmp) / "embedded")
            try:
                http = server.config_path.read_text().split("http_listen = ")[1].split("\n")[0].strip('"')
                results["embedded"] = run_load(f"ws://{http}/connection/websocket", f"http://{http}/api",
                                               API_KEY, subscribers, rate, duration)
            finally:
                server.stop()
        if "centrifugo" in targets:
            from bench import rig
            real = rig.centrifugo(Path(tmp) / "centrifugo", {"log": {"level": "warn"},
                                                             "client": {"channel_limit": 1000}})
            try:
                results["centrifugo"] = run_load(real.ws_url, f"http://{real.http_address}/api", "http-key",
                                                 subscribers, rate, duration)
            finally:
                real.stop()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--subscribers", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=1000)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--only", choices=["embedded", "centrifugo"], default=None)
    args = parser.parse_args()
    targets = (args.only,) if args.only else ("embedded", "centrifugo")
    print(json.dumps(run(args.subscribers, args.rate, args.duration, targets), indent=2))


if __name__ == "__main__":
    main()
