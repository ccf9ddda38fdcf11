"""Read what a server holds: counts in tests come from the server's History, never from logs."""

from __future__ import annotations

import json
import time
from typing import Any

import grpc

from relay.proto.centrifugo import api_pb2, api_pb2_grpc


def _metadata(api_key: str | None) -> list[tuple[str, str]]:
    return [("authorization", f"apikey {api_key}")] if api_key else []


def history(address: str, channel: str, api_key: str | None = None, limit: int = -1) -> list[api_pb2.Publication]:
    """Every retained publication of a channel, oldest first (raises on an error reply)."""
    with grpc.insecure_channel(address) as chan:
        stub = api_pb2_grpc.CentrifugoApiStub(chan)
        resp = stub.History(api_pb2.HistoryRequest(channel=channel, limit=limit),
                            metadata=_metadata(api_key), timeout=10)
    if resp.HasField("error") and resp.error.code:
        raise RuntimeError(f"History {channel}: {resp.error.code} {resp.error.message}")
    return list(resp.result.publications)


def history_json(address: str, channel: str, api_key: str | None = None) -> list[Any]:
    return [json.loads(p.data) for p in history(address, channel, api_key)]


def wait_for_count(address: str, channel: str, count: int, api_key: str | None = None,
                   timeout: float = 60.0) -> list[api_pb2.Publication]:
    """Poll History until it holds at least `count` publications; returns them (may be more)."""
    deadline = time.monotonic() + timeout
    pubs: list[api_pb2.Publication] = []
    while time.monotonic() < deadline:
        try:
            pubs = history(address, channel, api_key)
        except grpc.RpcError:
            pubs = []
        if len(pubs) >= count:
            return pubs
        time.sleep(0.1)
    raise TimeoutError(f"{channel}: {len(pubs)} of {count} publications after {timeout}s")
