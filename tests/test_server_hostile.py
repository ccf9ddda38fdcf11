"""Hostile input does not hurt the embedded server: it answers what it must and keeps serving,
and its memory stays bounded (history TTL and size enforced, idle channels dropped).

Where real Centrifugo's answer is the contract (odd channel names, invalid UTF-8), the test runs
against both servers through `centrifugo_api`.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import grpc
import pytest

from relay.proto.centrifugo import api_pb2 as pb
from relay.proto.centrifugo import api_pb2_grpc
from tests.harness.embedded import ROOT, ApiTarget, EmbeddedServerFactory, EmbeddedServerProcess, Stubs

pytestmark = pytest.mark.timeout(120)


def assert_serving(stubs: Stubs, channel: str | None = None) -> None:
    """Info answers and a publication lands in history with the next offset."""
    channel = channel or f"chat:alive-{uuid.uuid4().hex[:8]}"
    info = stubs.v6.Info(pb.InfoRequest(), metadata=stubs.metadata, timeout=10)
    assert len(info.result.nodes) == 1
    md = stubs.metadata
    before = stubs.v6.History(pb.HistoryRequest(channel=channel, limit=0), metadata=md, timeout=10)
    resp = stubs.v6.Publish(pb.PublishRequest(channel=channel, data=b'{"ok": true}'), metadata=md, timeout=10)
    assert (resp.error.code, resp.result.offset) == (0, before.result.offset + 1)


def info_channels(stubs: Stubs) -> int:
    info = stubs.v6.Info(pb.InfoRequest(), metadata=stubs.metadata, timeout=10)
    return int(info.result.nodes[0].num_channels)


def publish_batch(stubs: Stubs, channels: list[str], data: bytes) -> list[tuple[int, int]]:
    cmds = [pb.Command(publish=pb.PublishRequest(channel=ch, data=data)) for ch in channels]
    resp = stubs.v6.Batch(pb.BatchRequest(commands=cmds), metadata=stubs.metadata, timeout=60)
    return [(r.error.code, r.publish.offset) for r in resp.replies]


def test_random_bytes_on_the_port(embedded_server: EmbeddedServerProcess) -> None:
    host, port = embedded_server.address.rsplit(":", 1)
    idle = [socket.create_connection((host, int(port)), timeout=5) for _ in range(20)]  # held open, silent
    payloads = [os.urandom(65536), b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"\x00" * 4096,
                b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + os.urandom(8192),  # the HTTP/2 preface, then garbage
                b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + os.urandom(500)]  # a TLS hello
    try:
        for payload in payloads * 3:
            with socket.create_connection((host, int(port)), timeout=5) as sock:
                try:
                    sock.sendall(payload)
                    sock.shutdown(socket.SHUT_WR)
                    sock.recv(65536)
                except OSError:
                    pass  # the server may hang up mid-way: that is its right
        with embedded_server.stubs() as stubs:
            assert_serving(stubs)
    finally:
        for sock in idle:
            sock.close()
    assert embedded_server.running()


def test_a_10mb_publish_is_resource_exhausted_and_the_server_goes_on(
        embedded_server: EmbeddedServerProcess) -> None:
    channel = "chat:big"
    with embedded_server.stubs() as stubs:
        huge = pb.PublishRequest(channel=channel, data=b"x" * (10 * 1024 * 1024))
        many = pb.BatchRequest(commands=[pb.Command(publish=pb.PublishRequest(
            channel=channel, data=b"y" * (1024 * 1024)))] * 10)
        for request, call in ((huge, stubs.v6.Publish), (many, stubs.v6.Batch)):
            with pytest.raises(grpc.RpcError) as caught:
                call(request, metadata=stubs.metadata, timeout=30)
            assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert_serving(stubs, channel)
        kept = stubs.v6.History(pb.HistoryRequest(channel=channel, limit=-1), metadata=stubs.metadata)
    assert [p.offset for p in kept.result.publications] == [1]


def test_10000_channels(embedded_server: EmbeddedServerProcess) -> None:
    names = [f"chat:many-{n}" for n in range(10_000)]
    with embedded_server.stubs() as stubs:
        before = info_channels(stubs)
        results = []
        for start in range(0, len(names), 1000):
            results += publish_batch(stubs, names[start:start + 1000], b'{"n": 1}')
        assert results == [(0, 1)] * 10_000
        assert info_channels(stubs) == before + 10_000
        listed = stubs.v6.Channels(pb.ChannelsRequest(pattern="chat:many-*"), metadata=stubs.metadata)
        assert len(listed.result.channels) == 10_000
        sample = stubs.v6.History(pb.HistoryRequest(channel=names[9_999], limit=-1), metadata=stubs.metadata)
        assert [p.data for p in sample.result.publications] == [b'{"n": 1}']
        assert_serving(stubs)


ODD_CHANNELS = ["a*b", "$x", "#user", "a/b", "a&b", "", ":x", "é漢字🙂", "x" * 300, " spaced ", "tab\tin",
                "a:b:c"]


def test_reserved_characters_in_channels_are_the_server_apis_business(centrifugo_api: ApiTarget) -> None:
    """Centrifugo checks channel names on subscribe, not in the server API: these all publish."""
    tag = uuid.uuid4().hex[:6]
    channels = [f"chat:{tag}{odd}" for odd in ODD_CHANNELS]
    with centrifugo_api.stubs() as stubs:
        assert publish_batch(stubs, channels, b'{"odd": true}') == [(0, 1)] * len(channels)
        for channel in channels:
            hist = stubs.v6.History(pb.HistoryRequest(channel=channel, limit=-1), metadata=stubs.metadata)
            assert [p.offset for p in hist.result.publications] == [1], channel
        assert_serving(stubs)


def _raw_publish(channel: bytes, data: bytes) -> bytes:
    """A PublishRequest encoded by hand, so the channel can hold bytes that are not UTF-8."""
    return b"\x0a" + bytes([len(channel)]) + channel + b"\x12" + bytes([len(data)]) + data


def test_a_channel_that_is_not_utf8_is_refused_and_the_server_goes_on(centrifugo_api: ApiTarget) -> None:
    with grpc.insecure_channel(centrifugo_api.address) as chan:
        call = chan.unary_unary("/centrifugal.centrifugo.api.CentrifugoApi/Publish")
        with pytest.raises(grpc.RpcError) as caught:
            call(_raw_publish(b"chat:\xff\xfe", b"{}"), metadata=centrifugo_api.metadata, timeout=10)
        assert caught.value.code() == grpc.StatusCode.INTERNAL
        good = pb.PublishResponse.FromString(call(_raw_publish(b"chat:utf8-ok", b"{}"),
                                                  metadata=centrifugo_api.metadata, timeout=10))
        assert good.error.code == 0
    with centrifugo_api.stubs() as stubs:
        assert_serving(stubs)


def test_data_that_is_not_utf8_comes_back_byte_for_byte(embedded_server: EmbeddedServerProcess) -> None:
    blobs = [bytes(range(256)), b"\xff" * 1000, b"\x00", os.urandom(4096)]
    with embedded_server.stubs() as stubs:
        for blob in blobs:
            resp = stubs.v6.Publish(pb.PublishRequest(channel="chat:binary", data=blob),
                                    metadata=stubs.metadata)
            assert resp.error.code == 0
        request = pb.HistoryRequest(channel="chat:binary", limit=-1)
        hist = stubs.v6.History(request, metadata=stubs.metadata)
    assert [p.data for p in hist.result.publications] == blobs


def test_memory_stays_bounded_when_history_expires(embedded_server_factory: EmbeddedServerFactory) -> None:
    """Waves of 100,000 publications over 10,000 new channels each: the TTL (1s) empties the server
    between waves, so resident memory after each wave stays near the first wave's."""
    server = embedded_server_factory(namespaces=[{"name": "chat", "history_size": 10, "history_ttl": "1s"}])
    data = b"z" * 200
    rss = [server.rss_bytes()]
    with server.stubs() as stubs:
        for wave in range(3):
            names = [f"chat:wave{wave}-{n}" for n in range(10_000)]
            for _ in range(10):
                for start in range(0, len(names), 2000):
                    assert {code for code, _ in publish_batch(stubs, names[start:start + 2000], data)} == {0}
            assert info_channels(stubs) == 10_000
            rss.append(server.rss_bytes())
            deadline = time.monotonic() + 10
            while info_channels(stubs) and time.monotonic() < deadline:
                time.sleep(0.2)
            assert info_channels(stubs) == 0
    baseline, first, *later = rss
    assert first - baseline > 20 * 1024 * 1024, rss  # a wave is big enough to notice
    assert max(later) < baseline + 1.3 * (first - baseline), rss


# A client in a process of its own: `info` calls Info until the stop file appears, `channels PATTERN`
# calls Channels for at least 2 s; one JSON line per call: [started, seconds, error code or status, n].
CALLER = r"""
import json, os, sys, time
import grpc
from relay.proto.centrifugo import api_pb2 as pb, api_pb2_grpc
address, key, out, what, *rest = sys.argv[1:]
md = [("authorization", "apikey " + key)]
with grpc.insecure_channel(address) as chan, open(out, "w", buffering=1) as log:
    stub = api_pb2_grpc.CentrifugoApiStub(chan)
    first = time.monotonic()
    while True:
        started = time.monotonic()
        try:
            if what == "info":
                stub.Info(pb.InfoRequest(), metadata=md, timeout=5)
                status, count = "ok", 1
            else:
                resp = stub.Channels(pb.ChannelsRequest(pattern=rest[0]), metadata=md, timeout=20)
                status, count = resp.error.code or "ok", len(resp.result.channels)
        except grpc.RpcError as err:
            status, count = str(err.code()), 0
        log.write(json.dumps([started, time.monotonic() - started, status, count]) + "\n")
        if what == "info" and os.path.exists(rest[0]) or what != "info" and (
                status != "ok" or time.monotonic() - first > 2):
            break
"""


def run_caller(server: EmbeddedServerProcess, out: Path, *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", CALLER, server.address, server.api_key, str(out), *args],
                            cwd=ROOT)


def calls(out: Path) -> list[list[Any]]:
    return [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []


def test_a_backtracking_channels_pattern_does_not_stop_other_callers(
        embedded_server: EmbeddedServerProcess, tmp_path: Path) -> None:
    """`*a*a*a*a*a*a*b` against 200-character channels kept the old matcher on the event loop for
    minutes. Another process calls Info all along: it must be answered promptly, every time."""
    longs = [f"chat:{n:03d}" + "a" * 192 for n in range(500)]
    with embedded_server.stubs() as stubs:
        for start in range(0, len(longs), 250):
            assert {code for code, _ in publish_batch(stubs, longs[start:start + 250], b"{}")} == {0}
        assert publish_batch(stubs, ["chat:" + "a" * 194 + "b"], b"{}") == [(0, 1)]
    info_out, channels_out, stop = tmp_path / "info.jsonl", tmp_path / "channels.jsonl", tmp_path / "stop"
    info = run_caller(embedded_server, info_out, "info", str(stop))
    try:
        deadline = time.monotonic() + 30
        while not calls(info_out) and time.monotonic() < deadline:  # the Info caller is under way
            time.sleep(0.05)
        channels = run_caller(embedded_server, channels_out, "channels", "*a*a*a*a*a*a*b")
        channels.wait(timeout=90)
    finally:
        stop.touch()
        info.wait(timeout=30)
    listed = calls(channels_out)
    assert listed and all(status == "ok" and count == 1 for _, _, status, count in listed), listed[:3]
    window = (listed[0][0], listed[-1][0] + listed[-1][1])
    during = [call for call in calls(info_out) if window[0] <= call[0] <= window[1]]
    assert len(during) >= 5, (len(listed), during)
    assert all(status == "ok" and seconds < 1.0 for _, seconds, status, _ in during), during
    assert embedded_server.stop() == 0  # SIGTERM is heard too


def test_a_batch_of_history_calls_builds_no_more_than_the_reply_budget(
        embedded_server: EmbeddedServerProcess) -> None:
    """1,600 History(limit=-1) of 1,000 publications of 1 KB in one Batch: a 40 KB request that once
    made a 1.65 GB reply (5 GB RSS). Now the commands past `max_reply_bytes` (16 MiB) get 107 and
    the server's peak memory stays within a few times the budget."""
    channel = "chat:amplified"
    with embedded_server.stubs() as stubs:
        for _ in range(4):
            assert {code for code, _ in publish_batch(stubs, [channel] * 250, b"x" * 1024)} == {0}
    baseline = embedded_server.rss_bytes()
    history = pb.Command(history=pb.HistoryRequest(channel=channel, limit=-1))
    options = [("grpc.max_receive_message_length", 64 * 1024 * 1024)]
    with grpc.insecure_channel(embedded_server.address, options=options) as chan:
        stub = api_pb2_grpc.CentrifugoApiStub(chan)  # type: ignore[no-untyped-call]
        resp = stub.Batch(pb.BatchRequest(commands=[history] * 1600), metadata=embedded_server.metadata,
                          timeout=60)
    answered = [len(r.history.publications) for r in resp.replies if not r.HasField("error")]
    refused = [r.error.code for r in resp.replies if r.HasField("error")]
    assert answered == [1000] * 16  # 16 MiB over 1,000 publications of 1 KiB and framing
    assert refused == [107] * (1600 - 16)
    peak = embedded_server.rss_bytes("VmHWM")
    assert peak - baseline < 200 * 1024 * 1024, (baseline, peak)
    with embedded_server.stubs() as stubs:  # the next call has a budget of its own
        again = stubs.v6.History(pb.HistoryRequest(channel=channel, limit=-1), metadata=stubs.metadata)
        assert len(again.result.publications) == 1000
        assert_serving(stubs)


def test_max_channels_caps_the_channels_held_and_frees_room_as_they_expire(
        embedded_server_factory: EmbeddedServerFactory) -> None:
    server = embedded_server_factory(namespaces=[{"name": "chat", "history_size": 10, "history_ttl": "1s"}],
                                     max_channels=1000)
    held = [f"chat:held-{n}" for n in range(1000)]
    more = [f"chat:more-{n}" for n in range(20_000)]
    with server.stubs() as stubs:
        assert publish_batch(stubs, held, b"{}") == [(0, 1)] * 1000
        refused = []
        for start in range(0, len(more), 2000):
            refused += publish_batch(stubs, more[start:start + 2000], b"{}")
        assert refused == [(100, 0)] * len(more)
        read = stubs.v6.History(pb.HistoryRequest(channel=more[0]), metadata=stubs.metadata)
        assert read.error.code == 100 and "max_channels" in read.error.message
        assert info_channels(stubs) == 1000
        assert publish_batch(stubs, held[:10], b"{}") == [(0, 2)] * 10  # the channels held go on
        deadline = time.monotonic() + 15
        while info_channels(stubs) and time.monotonic() < deadline:  # history_ttl 1s: they expire
            time.sleep(0.2)
        assert publish_batch(stubs, more[:1000], b"{}") == [(0, 1)] * 1000
        assert info_channels(stubs) == 1000
