"""The embedded server behaves like Centrifugo where a client can tell, over a real socket.

Tests taking `centrifugo_api` run twice: against `relay serve` and against real Centrifugo v6.9.1
(both with namespace `chat`: history 1000/300s, `nohistory`: history off, key checked), so they
assert only what real Centrifugo does. Tests of the legacy `api.Centrifugo` service and of what is
the embedded server's own (its Info identity, Channels listing, Presence) use the embedded server.
"""

from __future__ import annotations

import base64
import uuid
from typing import Any

import grpc
import pytest

from relay.proto.centrifugo import api_pb2 as pb
from relay.proto.centrifugo_v2 import api_pb2 as pb2
from tests.harness.embedded import ApiTarget, EmbeddedServerFactory, open_stubs
from tests.harness.embedded import EmbeddedServerProcess as Server

pytestmark = pytest.mark.timeout(60)

TRANSPORT = [("x-centrifugo-error-mode", "transport")]


def fresh(namespace: str = "chat") -> str:
    """A channel no other test uses (servers are shared by the session)."""
    prefix = f"{namespace}:" if namespace else ""
    return f"{prefix}conf-{uuid.uuid4().hex[:12]}"


def publish(stubs: Any, channel: str, data: bytes = b'{"n": 1}', **fields: Any) -> pb.PublishResponse:
    resp: pb.PublishResponse = stubs.v6.Publish(pb.PublishRequest(channel=channel, data=data, **fields),
                                                metadata=stubs.metadata, timeout=10)
    return resp


def history(stubs: Any, channel: str, limit: int = -1, **fields: Any) -> pb.HistoryResponse:
    resp: pb.HistoryResponse = stubs.v6.History(pb.HistoryRequest(channel=channel, limit=limit, **fields),
                                                metadata=stubs.metadata, timeout=10)
    return resp


def offsets(resp: pb.HistoryResponse) -> list[int]:
    return [p.offset for p in resp.result.publications]


def publish_many(stubs: Any, channel: str, count: int) -> list[int]:
    cmds = [pb.Command(publish=pb.PublishRequest(channel=channel, data=b'{"i": %d}' % i))
            for i in range(count)]
    resp = stubs.v6.Batch(pb.BatchRequest(commands=cmds), metadata=stubs.metadata, timeout=30)
    assert [r.error.code for r in resp.replies] == [0] * count
    return [r.publish.offset for r in resp.replies]


def parse_status_details(blob: bytes) -> tuple[int, str, list[tuple[str, bytes]]]:
    """google.rpc.Status {code, message, details: [Any]} decoded by hand (no googleapis protos)."""

    def fields(buf: bytes) -> list[tuple[int, int | bytes]]:
        out: list[tuple[int, int | bytes]] = []
        i = 0
        while i < len(buf):
            key, i = varint(buf, i)
            number, wire = key >> 3, key & 7
            if wire == 0:
                value, i = varint(buf, i)
                out.append((number, value))
            elif wire == 2:
                size, i = varint(buf, i)
                out.append((number, buf[i:i + size]))
                i += size
            else:
                raise ValueError(f"wire type {wire}")
        return out

    def varint(buf: bytes, i: int) -> tuple[int, int]:
        shift = value = 0
        while True:
            byte = buf[i]
            i += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                return value, i

    code, message, details = 0, "", []
    for number, value in fields(blob):
        if number == 1 and isinstance(value, int):
            code = value
        elif number == 2 and isinstance(value, bytes):
            message = value.decode()
        elif number == 3 and isinstance(value, bytes):
            parts = dict(fields(value))
            details.append((bytes(parts[1]).decode(), bytes(parts[2])))  # type: ignore[arg-type]
    return code, message, details


def transport_error(err: grpc.RpcError) -> tuple[grpc.StatusCode, str, int]:
    """(status, details, Centrifugo error code from the status details) of a transport-mode error."""
    blob = dict(err.trailing_metadata() or ())["grpc-status-details-bin"]
    _, _, details = parse_status_details(blob)
    (type_url, value), = details
    assert type_url.endswith(".Error")
    error = pb.Error.FromString(value)
    return err.code(), err.details(), error.code


# -- Publish ------------------------------------------------------------------------------------


def test_publish_gives_offsets_one_by_one_in_one_epoch(centrifugo_api: ApiTarget) -> None:
    channel = fresh()
    with centrifugo_api.stubs() as stubs:
        results = [publish(stubs, channel, b'{"n": %d}' % n) for n in range(3)]
        assert [r.error.code for r in results] == [0, 0, 0]
        assert [r.result.offset for r in results] == [1, 2, 3]
        epochs = {r.result.epoch for r in results}
        assert len(epochs) == 1 and "" not in epochs
        hist = history(stubs, channel)
    assert [p.data for p in hist.result.publications] == [b'{"n": 0}', b'{"n": 1}', b'{"n": 2}']
    assert (hist.result.offset, hist.result.epoch) == (3, epochs.pop())


def test_publish_without_history_has_offset_zero_and_no_history(centrifugo_api: ApiTarget) -> None:
    with centrifugo_api.stubs() as stubs:
        for channel in (fresh("nohistory"), fresh("")):  # a namespace with history off; top level
            resp = publish(stubs, channel)
            assert resp.HasField("result") and not resp.HasField("error")
            assert (resp.result.offset, resp.result.epoch) == (0, "")
            assert history(stubs, channel).error.code == 108
            assert history(stubs, channel).error.message == "not available"


def test_unknown_namespace_is_102_for_every_channel_method(centrifugo_api: ApiTarget) -> None:
    channel = fresh("nowhere")
    md = centrifugo_api.metadata
    with centrifugo_api.stubs() as stubs:
        codes = [
            publish(stubs, channel).error,
            history(stubs, channel).error,
            stubs.v6.HistoryRemove(pb.HistoryRemoveRequest(channel=channel), metadata=md).error,
            stubs.v6.Presence(pb.PresenceRequest(channel=channel), metadata=md).error,
            stubs.v6.PresenceStats(pb.PresenceStatsRequest(channel=channel), metadata=md).error,
            publish(stubs, "$" + channel).error,  # the private prefix does not hide the namespace
        ]
    assert [(e.code, e.message) for e in codes] == [(102, "unknown channel")] * 6


def test_empty_channel_is_107_for_every_channel_method(centrifugo_api: ApiTarget) -> None:
    md = centrifugo_api.metadata
    with centrifugo_api.stubs() as stubs:
        codes = [
            publish(stubs, "").error,
            history(stubs, "").error,
            stubs.v6.HistoryRemove(pb.HistoryRemoveRequest(channel=""), metadata=md).error,
            stubs.v6.Presence(pb.PresenceRequest(channel=""), metadata=md).error,
            stubs.v6.PresenceStats(pb.PresenceStatsRequest(channel=""), metadata=md).error,
        ]
    assert [(e.code, e.message) for e in codes] == [(107, "bad request")] * 5


def test_empty_data_is_107_but_an_unknown_namespace_is_checked_first(centrifugo_api: ApiTarget) -> None:
    with centrifugo_api.stubs() as stubs:
        assert publish(stubs, fresh(), b"").error.code == 107
        assert publish(stubs, fresh("nohistory"), b"").error.code == 107
        assert publish(stubs, fresh("nowhere"), b"").error.code == 102


def test_b64data_is_decoded_and_wins_over_data(centrifugo_api: ApiTarget) -> None:
    channel = fresh()
    raw = bytes(range(256))  # not UTF-8, not JSON: stored and returned byte for byte
    with centrifugo_api.stubs() as stubs:
        resp = publish(stubs, channel, b"ignored", b64data=base64.b64encode(raw).decode())
        assert (resp.error.code, resp.result.offset) == (0, 1)
        assert [p.data for p in history(stubs, channel).result.publications] == [raw]


def test_bad_b64data_is_107_before_the_namespace_is_looked_at(centrifugo_api: ApiTarget) -> None:
    with centrifugo_api.stubs() as stubs:
        assert publish(stubs, fresh(), b"", b64data="not base64!").error.code == 107
        assert publish(stubs, fresh("nowhere"), b"", b64data="%%%").error.code == 107


def test_tags_come_back_from_history(centrifugo_api: ApiTarget) -> None:
    channel = fresh()
    with centrifugo_api.stubs() as stubs:
        publish(stubs, channel, tags={"host": "a1", "kind": "log"})
        publish(stubs, channel)
        pubs = history(stubs, channel).result.publications
    assert [dict(p.tags) for p in pubs] == [{"host": "a1", "kind": "log"}, {}]


def test_skip_history_publishes_without_an_offset_and_keeps_the_stream(centrifugo_api: ApiTarget) -> None:
    channel = fresh()
    with centrifugo_api.stubs() as stubs:
        assert publish(stubs, channel, b'{"a": 1}').result.offset == 1
        skipped = publish(stubs, channel, b'{"b": 2}', skip_history=True)
        assert (skipped.error.code, skipped.result.offset, skipped.result.epoch) == (0, 0, "")
        assert publish(stubs, channel, b'{"c": 3}').result.offset == 2
        assert [p.data for p in history(stubs, channel).result.publications] == [b'{"a": 1}', b'{"c": 3}']


def test_private_prefix_channel_uses_the_namespace_after_it(centrifugo_api: ApiTarget) -> None:
    channel = "$" + fresh()
    with centrifugo_api.stubs() as stubs:
        assert publish(stubs, channel).result.offset == 1
        assert offsets(history(stubs, channel)) == [1]


def test_an_idempotency_key_publishes_once_per_channel_and_returns_the_first_result(
        centrifugo_api: ApiTarget) -> None:
    channel, other = fresh(), fresh()
    with centrifugo_api.stubs() as stubs:
        first = publish(stubs, channel, b'{"v": 1}', idempotency_key="k1")
        again = publish(stubs, channel, b'{"v": 2}', idempotency_key="k1")
        assert (again.result.offset, again.result.epoch) == (first.result.offset, first.result.epoch) == (
            1, first.result.epoch)
        assert publish(stubs, channel, b'{"v": 3}', idempotency_key="k2").result.offset == 2
        assert publish(stubs, other, b'{"v": 4}', idempotency_key="k1").result.offset == 1
        assert [p.data for p in history(stubs, channel).result.publications] == [b'{"v": 1}', b'{"v": 3}']
        assert offsets(history(stubs, other)) == [1]


def test_a_lower_version_is_not_published_again(centrifugo_api: ApiTarget) -> None:
    channel = fresh()
    with centrifugo_api.stubs() as stubs:
        assert publish(stubs, channel, b'{"v": 2}', version=2, version_epoch="e").result.offset == 1
        stale = publish(stubs, channel, b'{"v": 1}', version=1, version_epoch="e")
        assert (stale.error.code, stale.result.offset) == (0, 1)
        assert publish(stubs, channel, b'{"v": 3}', version=3, version_epoch="e").result.offset == 2
        assert publish(stubs, channel, b'{"v": 1}', version=1, version_epoch="other").result.offset == 3
        assert [p.data for p in history(stubs, channel).result.publications] == [
            b'{"v": 2}', b'{"v": 3}', b'{"v": 1}']


def test_a_message_over_4mb_is_resource_exhausted(centrifugo_api: ApiTarget) -> None:
    with centrifugo_api.stubs() as stubs:
        with pytest.raises(grpc.RpcError) as caught:
            publish(stubs, fresh(), b"x" * (5 * 1024 * 1024))
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert publish(stubs, fresh(), b"x" * (3 * 1024 * 1024)).result.offset == 1


# -- Broadcast ----------------------------------------------------------------------------------


def test_broadcast_answers_per_channel_and_can_partly_fail(centrifugo_api: ApiTarget) -> None:
    a, b = fresh(), fresh()
    with centrifugo_api.stubs() as stubs:
        publish(stubs, b)
        targets = [a, b, fresh("nowhere"), "", fresh("nohistory")]
        req = pb.BroadcastRequest(channels=targets, data=b'{"all": 1}')
        resp = stubs.v6.Broadcast(req, metadata=stubs.metadata)
        assert not resp.HasField("error")
        assert [(r.error.code, r.result.offset) for r in resp.result.responses] == [
            (0, 1), (0, 2), (102, 0), (107, 0), (0, 0)]
        assert [p.data for p in history(stubs, a).result.publications] == [b'{"all": 1}']
        assert offsets(history(stubs, b)) == [1, 2]


def test_broadcast_request_errors_are_top_level(centrifugo_api: ApiTarget) -> None:
    with centrifugo_api.stubs() as stubs:
        none = stubs.v6.Broadcast(pb.BroadcastRequest(channels=[], data=b"{}"), metadata=stubs.metadata)
        bad = stubs.v6.Broadcast(pb.BroadcastRequest(channels=[fresh()], b64data="@@"),
                                 metadata=stubs.metadata)
        empty = stubs.v6.Broadcast(pb.BroadcastRequest(channels=[fresh(), fresh("nowhere")], data=b""),
                                   metadata=stubs.metadata)
    assert (none.error.code, bad.error.code) == (107, 107)
    # Empty data is judged per channel, after the namespace.
    assert [r.error.code for r in empty.result.responses] == [107, 102]


def test_broadcast_idempotency_key_holds_per_channel(centrifugo_api: ApiTarget) -> None:
    channels = [fresh(), fresh()]
    req = pb.BroadcastRequest(channels=channels, data=b'{"x": 1}', idempotency_key="bk")
    with centrifugo_api.stubs() as stubs:
        first = stubs.v6.Broadcast(req, metadata=stubs.metadata)
        again = stubs.v6.Broadcast(req, metadata=stubs.metadata)
        assert [r.result.offset for r in first.result.responses] == [1, 1]
        assert [r.result.offset for r in again.result.responses] == [1, 1]
        assert [offsets(history(stubs, ch)) for ch in channels] == [[1], [1]]


# -- Batch --------------------------------------------------------------------------------------


def test_batch_replies_one_per_command_in_order(centrifugo_api: ApiTarget) -> None:
    channel = fresh()
    cmds = [
        pb.Command(publish=pb.PublishRequest(channel=channel, data=b'{"a": 1}')),
        pb.Command(history=pb.HistoryRequest(channel=channel, limit=-1)),
        pb.Command(),  # nothing set: 104
        pb.Command(publish=pb.PublishRequest(channel=fresh("nowhere"), data=b"{}")),
        pb.Command(broadcast=pb.BroadcastRequest(channels=[channel, fresh()], data=b'{"b": 2}')),
        pb.Command(info=pb.InfoRequest()),
        pb.Command(history_remove=pb.HistoryRemoveRequest(channel=channel)),
        pb.Command(history=pb.HistoryRequest(channel=channel, limit=0)),
        pb.Command(channels=pb.ChannelsRequest()),
        pb.Command(history=pb.HistoryRequest(channel=fresh("nohistory"))),
    ]
    with centrifugo_api.stubs() as stubs:
        resp = stubs.v6.Batch(pb.BatchRequest(commands=cmds), metadata=stubs.metadata)
    r = resp.replies
    assert len(r) == len(cmds)
    assert [x.error.code for x in r] == [0, 0, 104, 102, 0, 0, 0, 0, 0, 108]
    assert r[2].error.message == "not found"
    assert r[0].publish.offset == 1
    assert [p.data for p in r[1].history.publications] == [b'{"a": 1}']
    assert [x.result.offset for x in r[4].broadcast.responses] == [2, 1]
    assert len(r[5].info.nodes) == 1
    assert r[6].HasField("history_remove")
    assert (list(r[7].history.publications), r[7].history.offset) == ([], 2)
    assert r[8].HasField("channels")


def test_batch_of_500_publishes_in_order(centrifugo_api: ApiTarget) -> None:
    channel = fresh()
    with centrifugo_api.stubs() as stubs:
        assert publish_many(stubs, channel, 500) == list(range(1, 501))
        assert [p.data for p in history(stubs, channel).result.publications] == [
            b'{"i": %d}' % i for i in range(500)]


def test_parallel_batch_answers_every_command_in_place(centrifugo_api: ApiTarget) -> None:
    channels = [fresh() for _ in range(20)]
    cmds = []
    for i in range(200):
        target = fresh("nowhere") if i % 50 == 7 else channels[i % 20]
        cmds.append(pb.Command(publish=pb.PublishRequest(channel=target, data=b'{"i": %d}' % i)))
    with centrifugo_api.stubs() as stubs:
        resp = stubs.v6.Batch(pb.BatchRequest(commands=cmds, parallel=True), metadata=stubs.metadata)
        assert [x.error.code for x in resp.replies] == [102 if i % 50 == 7 else 0 for i in range(200)]
        per_channel: dict[str, list[int]] = {}
        for cmd, reply in zip(cmds, resp.replies, strict=True):
            if not reply.error.code:
                per_channel.setdefault(cmd.publish.channel, []).append(reply.publish.offset)
        # Concurrent commands on one channel may run in any order; each still gets its own offset.
        assert {ch: sorted(o) for ch, o in per_channel.items()} == {
            ch: list(range(1, len(o) + 1)) for ch, o in per_channel.items()}
        assert sum(len(offsets(history(stubs, ch))) for ch in channels) == 196


def test_batch_ignores_transport_error_mode(centrifugo_api: ApiTarget) -> None:
    cmds = [pb.Command(publish=pb.PublishRequest(channel=fresh("nowhere"), data=b"{}")), pb.Command()]
    with centrifugo_api.stubs() as stubs:
        resp = stubs.v6.Batch(pb.BatchRequest(commands=cmds), metadata=stubs.metadata + TRANSPORT)
    assert [x.error.code for x in resp.replies] == [102, 104]


# -- History ------------------------------------------------------------------------------------


def test_history_limit_and_reverse(centrifugo_api: ApiTarget) -> None:
    channel = fresh()
    with centrifugo_api.stubs() as stubs:
        publish_many(stubs, channel, 5)
        top = history(stubs, channel, 0)
        assert (list(top.result.publications), top.result.offset) == ([], 5)
        assert top.result.epoch
        assert offsets(history(stubs, channel, -1)) == [1, 2, 3, 4, 5]
        assert offsets(history(stubs, channel, 2)) == [1, 2]
        assert offsets(history(stubs, channel, 2, reverse=True)) == [5, 4]
        assert offsets(history(stubs, channel, -1, reverse=True)) == [5, 4, 3, 2, 1]
        assert offsets(history(stubs, channel, 100)) == [1, 2, 3, 4, 5]


def test_history_since_a_position(centrifugo_api: ApiTarget) -> None:
    channel = fresh()
    with centrifugo_api.stubs() as stubs:
        publish_many(stubs, channel, 5)
        epoch = history(stubs, channel, 0).result.epoch

        def since(offset: int, limit: int = -1, reverse: bool = False, ep: str = epoch) -> list[int]:
            return offsets(history(stubs, channel, limit, since=pb.StreamPosition(offset=offset, epoch=ep),
                                   reverse=reverse))

        assert since(2) == [3, 4, 5]
        assert since(2, limit=1) == [3]
        assert since(5) == []
        assert since(2, ep="") == [3, 4, 5]  # no epoch given: not checked
        assert since(4, reverse=True) == [3, 2, 1]
        assert since(3, limit=1, reverse=True) == [2]
        assert since(9) == []


def test_history_since_another_epoch_is_112(centrifugo_api: ApiTarget) -> None:
    channel = fresh()
    with centrifugo_api.stubs() as stubs:
        publish(stubs, channel)
        resp = history(stubs, channel, since=pb.StreamPosition(offset=1, epoch="not-this-epoch"))
    assert (resp.error.code, resp.error.message) == (112, "unrecoverable position")


def test_history_reverse_since_offset_zero_is_an_internal_error(centrifugo_api: ApiTarget) -> None:
    """Centrifugo's engine rejects it as a bad request; its API reports that as 100."""
    channel = fresh()
    with centrifugo_api.stubs() as stubs:
        publish(stubs, channel)
        epoch = history(stubs, channel, 0).result.epoch
        resp = history(stubs, channel, since=pb.StreamPosition(offset=0, epoch=epoch), reverse=True)
    assert resp.error.code == 100


def test_history_of_a_new_channel_starts_the_stream_its_first_publication_joins(
        centrifugo_api: ApiTarget) -> None:
    channel = fresh()
    with centrifugo_api.stubs() as stubs:
        empty = history(stubs, channel)
        assert (empty.error.code, list(empty.result.publications), empty.result.offset) == (0, [], 0)
        assert empty.result.epoch
        first = publish(stubs, channel)
    assert (first.result.offset, first.result.epoch) == (1, empty.result.epoch)


def test_history_keeps_the_newest_1000_and_an_old_position_gets_the_rest(centrifugo_api: ApiTarget) -> None:
    channel = fresh()
    with centrifugo_api.stubs() as stubs:
        publish_many(stubs, channel, 500)
        publish_many(stubs, channel, 503)
        kept = history(stubs, channel)
        assert offsets(kept) == list(range(4, 1004))
        stale = history(stubs, channel, 3, since=pb.StreamPosition(offset=1, epoch=kept.result.epoch))
    # Centrifugo answers an offset older than the window with the oldest retained: the gap shows.
    assert (stale.error.code, offsets(stale)) == (0, [4, 5, 6])


def test_history_remove_clears_publications_but_keeps_the_stream_position(centrifugo_api: ApiTarget) -> None:
    channel = fresh()
    with centrifugo_api.stubs() as stubs:
        publish_many(stubs, channel, 3)
        epoch = history(stubs, channel, 0).result.epoch
        removed = stubs.v6.HistoryRemove(pb.HistoryRemoveRequest(channel=channel), metadata=stubs.metadata)
        assert removed.HasField("result") and not removed.HasField("error")
        after = history(stubs, channel)
        assert (list(after.result.publications), after.result.offset, after.result.epoch) == ([], 3, epoch)
        assert publish(stubs, channel).result.offset == 4
        nohistory = stubs.v6.HistoryRemove(pb.HistoryRemoveRequest(channel=fresh("nohistory")),
                                           metadata=stubs.metadata)
        assert nohistory.error.code == 108


# -- Info, Channels -----------------------------------------------------------------------------


def test_info_describes_one_node(centrifugo_api: ApiTarget) -> None:
    with centrifugo_api.stubs() as stubs:
        resp = stubs.v6.Info(pb.InfoRequest(), metadata=stubs.metadata)
    assert not resp.HasField("error")
    (node,) = resp.result.nodes
    assert node.uid and node.name and node.version


def test_channels_answers_a_map(centrifugo_api: ApiTarget) -> None:
    with centrifugo_api.stubs() as stubs:
        publish(stubs, fresh())
        resp = stubs.v6.Channels(pb.ChannelsRequest(pattern="chat:*"), metadata=stubs.metadata)
    assert not resp.HasField("error") and resp.HasField("result")
    channels = resp.result.channels
    assert all(name.startswith("chat:") for name in channels)
    if centrifugo_api.kind == "embedded":  # real Centrifugo may have subscribers from other tests
        assert all(info.num_clients == 0 for info in channels.values())


# Channels whose pattern gobwas/glob (Centrifugo's glob library) cannot compile answer 100.
BAD_PATTERNS = ["[", "[]", "[!]", "[a-zA-Z]", "[a-]", "[z-a]", "[a-", "chat:[ab"]
GOOD_PATTERNS = ["{a", "a}", "\\", "{a,b}}", "{,a}", "{}", "[!a-z]x", "[ab-]", "**", "a,b", "]"]


def test_a_channels_pattern_centrifugo_cannot_compile_is_an_internal_error(centrifugo_api: ApiTarget) -> None:
    with centrifugo_api.stubs() as stubs:
        def code(pattern: str) -> int:
            resp = stubs.v6.Channels(pb.ChannelsRequest(pattern=pattern), metadata=stubs.metadata, timeout=10)
            return int(resp.error.code)

        assert [code(p) for p in BAD_PATTERNS] == [100] * len(BAD_PATTERNS)
        assert [code(p) for p in GOOD_PATTERNS] == [0] * len(GOOD_PATTERNS)
        batch = stubs.v6.Batch(pb.BatchRequest(commands=[pb.Command(channels=pb.ChannelsRequest(pattern="["))]),
                               metadata=stubs.metadata, timeout=10)
        assert (batch.replies[0].error.code, batch.replies[0].error.message) == (100, "internal server error")


def test_names_centrifugo_refuses_to_subscribers_are_the_server_apis_to_take(centrifugo_api: ApiTarget) -> None:
    """Centrifugo checks channel names when a client subscribes (length, reserved characters,
    namespace regex), never in the server API: control characters, reserved characters anywhere
    and a 1 MB name all publish and read back; a reserved character before the `:` is just part of
    an unknown namespace (102)."""
    tag = uuid.uuid4().hex[:8]
    taken = [f"chat:{tag}\x00nul", f"chat:{tag}\nline", f"chat:{tag}\x7f", f"chat:{tag}\x1b[31m",
             f"chat:*{tag}", f"chat:{tag}#", f"chat:{tag}&", f"chat:/{tag}", f"chat:{tag}$",
             f"$chat:{tag}\x01", f"chat:{tag}" + "m" * (1024 * 1024)]
    unknown = [f"*chat:{tag}", f"#chat:{tag}", f"/chat:{tag}", f"&chat:{tag}", f"$$chat:{tag}", f"\x00chat:{tag}"]
    with centrifugo_api.stubs() as stubs:
        md = stubs.metadata
        for channel in taken:
            assert (publish(stubs, channel).error.code, offsets(history(stubs, channel))) == (0, [1]), channel[:40]
            broadcast = stubs.v6.Broadcast(pb.BroadcastRequest(channels=[channel], data=b"{}"), metadata=md)
            assert broadcast.result.responses[0].result.offset == 2
        for channel in unknown:
            assert (publish(stubs, channel).error.code, history(stubs, channel).error.code) == (102, 102), channel


# -- the API key and unknown methods ------------------------------------------------------------


@pytest.mark.parametrize("metadata", [[], [("authorization", "apikey wrong")],
                                      [("authorization", "Bearer test")], [("authorization", "wrong")]])
def test_calls_without_the_right_key_are_unauthenticated(centrifugo_api: ApiTarget,
                                                         metadata: list[tuple[str, str]]) -> None:
    channel = fresh()
    with open_stubs(centrifugo_api.address, None) as stubs:
        for call, req in ((stubs.v6.Publish, pb.PublishRequest(channel=channel, data=b"{}")),
                          (stubs.v6.Info, pb.InfoRequest()),
                          (stubs.v6.Batch, pb.BatchRequest(commands=[pb.Command(info=pb.InfoRequest())]))):
            with pytest.raises(grpc.RpcError) as caught:
                call(req, metadata=metadata, timeout=10)
            assert (caught.value.code(), caught.value.details()) == (
                grpc.StatusCode.UNAUTHENTICATED, "unauthenticated")
    with centrifugo_api.stubs() as stubs:
        assert history(stubs, channel).result.publications == []


def test_an_unknown_method_is_unimplemented_with_or_without_the_key(centrifugo_api: ApiTarget) -> None:
    with grpc.insecure_channel(centrifugo_api.address) as chan:
        call = chan.unary_unary("/centrifugal.centrifugo.api.CentrifugoApi/NoSuchMethod")
        for metadata in (centrifugo_api.metadata, []):
            with pytest.raises(grpc.RpcError) as caught:
                call(b"", metadata=metadata, timeout=10)
            assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED


# -- transport error mode -----------------------------------------------------------------------


def test_transport_error_mode_moves_errors_into_the_grpc_status(centrifugo_api: ApiTarget) -> None:
    channel = fresh()
    with centrifugo_api.stubs() as stubs:
        md = stubs.metadata + TRANSPORT
        publish(stubs, channel)
        epoch = history(stubs, channel, 0).result.epoch
        calls = [
            lambda: stubs.v6.Publish(pb.PublishRequest(channel=fresh("nowhere"), data=b"{}"), metadata=md),
            lambda: stubs.v6.Publish(pb.PublishRequest(channel=channel, data=b""), metadata=md),
            lambda: stubs.v6.History(pb.HistoryRequest(channel=fresh("nohistory")), metadata=md),
            lambda: stubs.v6.History(pb.HistoryRequest(channel=channel, since=pb.StreamPosition(
                offset=1, epoch=epoch + "x")), metadata=md),
            lambda: stubs.v6.Broadcast(pb.BroadcastRequest(channels=[], data=b"{}"), metadata=md),
        ]
        got = []
        for call in calls:
            with pytest.raises(grpc.RpcError) as caught:
                call()
            got.append(transport_error(caught.value))
        ok = stubs.v6.Publish(pb.PublishRequest(channel=channel, data=b"{}"), metadata=md)
    assert got == [
        (grpc.StatusCode.NOT_FOUND, "unknown channel", 102),
        (grpc.StatusCode.INVALID_ARGUMENT, "bad request", 107),
        (grpc.StatusCode.INVALID_ARGUMENT, "not available", 108),
        (grpc.StatusCode.OUT_OF_RANGE, "unrecoverable position", 112),
        (grpc.StatusCode.INVALID_ARGUMENT, "bad request", 107),
    ]
    assert (ok.error.code, ok.result.offset) == (0, 2)


# -- the embedded server's own ------------------------------------------------------------------


def test_embedded_info_names_the_node_and_counts_channels(shared_embedded_server: Server) -> None:
    with shared_embedded_server.stubs() as stubs:
        before = stubs.v6.Info(pb.InfoRequest(), metadata=stubs.metadata).result.nodes[0]
        publish(stubs, fresh())
        publish(stubs, fresh("nohistory"))  # keeps nothing, so it is not a channel held
        after = stubs.v6.Info(pb.InfoRequest(), metadata=stubs.metadata).result.nodes[0]
        legacy = stubs.v2.Info(pb2.InfoRequest(), metadata=stubs.metadata).result.nodes[0]
    assert after.name.endswith(f"_{shared_embedded_server.port}")
    assert after.version.startswith("centrifugo-relay ")
    assert after.num_channels == before.num_channels + 1
    assert (legacy.uid, legacy.name, legacy.version) == (after.uid, after.name, after.version)
    assert after.uptime >= before.uptime >= 0


def test_embedded_channels_lists_what_it_holds_by_pattern(shared_embedded_server: Server) -> None:
    tag = uuid.uuid4().hex[:8]
    names = [f"chat:{tag}-a1", f"chat:{tag}-a2", f"chat:{tag}-b1", f"$chat:{tag}-c1"]
    with shared_embedded_server.stubs() as stubs:
        for name in names:
            publish(stubs, name)

        def listed(pattern: str) -> list[str]:
            resp = stubs.v6.Channels(pb.ChannelsRequest(pattern=pattern), metadata=stubs.metadata)
            return sorted(resp.result.channels)

        assert listed(f"chat:{tag}-*") == sorted(names[:3])
        assert listed(f"chat:{tag}-a?") == names[:2]
        assert listed(f"chat:{tag}-{{a1,b1}}") == [names[0], names[2]]
        assert listed(f"*{tag}-c*") == [names[3]]
        legacy = stubs.v2.Channels(pb2.ChannelsRequest(), metadata=stubs.metadata).result.channels
        assert set(names) <= set(legacy)


def test_embedded_presence_is_empty(shared_embedded_server: Server) -> None:
    channel = fresh()
    with shared_embedded_server.stubs() as stubs:
        presence = stubs.v6.Presence(pb.PresenceRequest(channel=channel), metadata=stubs.metadata)
        stats = stubs.v6.PresenceStats(pb.PresenceStatsRequest(channel=channel), metadata=stubs.metadata)
    assert presence.HasField("result") and dict(presence.result.presence) == {}
    assert (stats.error.code, stats.result.num_clients, stats.result.num_users) == (0, 0, 0)


@pytest.mark.parametrize("method", ["RPC", "Refresh"])
def test_embedded_methods_it_does_not_serve_are_unimplemented(shared_embedded_server: Server,
                                                              method: str) -> None:
    with grpc.insecure_channel(shared_embedded_server.address) as chan:
        call = chan.unary_unary(f"/centrifugal.centrifugo.api.CentrifugoApi/{method}")
        with pytest.raises(grpc.RpcError) as caught:
            call(b"", metadata=shared_embedded_server.metadata, timeout=10)
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_embedded_server_wide_transport_error_mode(embedded_server_factory: EmbeddedServerFactory) -> None:
    server = embedded_server_factory(error_mode="transport")
    with server.stubs() as stubs:
        with pytest.raises(grpc.RpcError) as caught:
            publish(stubs, fresh("nowhere"))
        with pytest.raises(grpc.RpcError) as legacy:
            stubs.v2.Publish(pb2.PublishRequest(channel=fresh("nowhere"), data=b"{}"),
                             metadata=stubs.metadata)
        batch = stubs.v6.Batch(pb.BatchRequest(commands=[pb.Command()]), metadata=stubs.metadata)
    assert transport_error(caught.value)[::2] == (grpc.StatusCode.NOT_FOUND, 102)
    assert legacy.value.code() == grpc.StatusCode.NOT_FOUND
    assert [r.error.code for r in batch.replies] == [104]


# -- the legacy api.Centrifugo service ----------------------------------------------------------


def test_legacy_publish_and_history_share_the_store(shared_embedded_server: Server) -> None:
    channel = fresh()
    with shared_embedded_server.stubs() as stubs:
        md = stubs.metadata
        first = stubs.v2.Publish(pb2.PublishRequest(channel=channel, data=b'{"v": 2}'), metadata=md)
        assert first.HasField("result") and not first.HasField("error")
        assert publish(stubs, channel, b'{"v": 6}').result.offset == 2
        legacy = stubs.v2.History(pb2.HistoryRequest(channel=channel), metadata=md)
        assert [p.data for p in legacy.result.publications] == [b'{"v": 2}', b'{"v": 6}']
        assert offsets(history(stubs, channel)) == [1, 2]
        removed = stubs.v2.HistoryRemove(pb2.HistoryRemoveRequest(channel=channel), metadata=md)
        assert removed.HasField("result")
        left = stubs.v2.History(pb2.HistoryRequest(channel=channel), metadata=md).result.publications
        assert list(left) == []


def test_legacy_errors(shared_embedded_server: Server) -> None:
    with shared_embedded_server.stubs() as stubs:
        md = stubs.metadata

        def code(call: Any, req: Any) -> int:
            return int(call(req, metadata=md).error.code)

        assert code(stubs.v2.Publish, pb2.PublishRequest(channel="", data=b"{}")) == 107
        assert code(stubs.v2.Publish, pb2.PublishRequest(channel=fresh(), data=b"")) == 107
        # v2 looked at the data before the namespace.
        assert code(stubs.v2.Publish, pb2.PublishRequest(channel=fresh("nowhere"), data=b"")) == 107
        assert code(stubs.v2.Publish, pb2.PublishRequest(channel=fresh("nowhere"), data=b"{}")) == 102
        assert code(stubs.v2.History, pb2.HistoryRequest(channel=fresh("nohistory"))) == 108
        assert code(stubs.v2.HistoryRemove, pb2.HistoryRemoveRequest(channel=fresh("nowhere"))) == 102
        assert code(stubs.v2.Presence, pb2.PresenceRequest(channel="")) == 107
        assert code(stubs.v2.PresenceStats, pb2.PresenceStatsRequest(channel=fresh("nowhere"))) == 102
        with pytest.raises(grpc.RpcError) as caught:
            stubs.v2.Info(pb2.InfoRequest())
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_legacy_broadcast_is_all_or_nothing(shared_embedded_server: Server) -> None:
    a, b = fresh(), fresh()
    with shared_embedded_server.stubs() as stubs:
        md = stubs.metadata
        bad = stubs.v2.Broadcast(pb2.BroadcastRequest(channels=[a, fresh("nowhere")], data=b"{}"),
                                 metadata=md)
        assert bad.error.code == 102
        assert offsets(history(stubs, a)) == []
        for req in (pb2.BroadcastRequest(channels=[], data=b"{}"),
                    pb2.BroadcastRequest(channels=[a], data=b"")):
            assert stubs.v2.Broadcast(req, metadata=md).error.code == 107
        ok = stubs.v2.Broadcast(pb2.BroadcastRequest(channels=[a, b], data=b'{"x": 1}'), metadata=md)
        assert ok.HasField("result") and not ok.HasField("error")
        assert [offsets(history(stubs, ch)) for ch in (a, b)] == [[1], [1]]


def test_legacy_transport_error_mode(shared_embedded_server: Server) -> None:
    with shared_embedded_server.stubs() as stubs, pytest.raises(grpc.RpcError) as caught:
        stubs.v2.History(pb2.HistoryRequest(channel=fresh("nohistory")),
                         metadata=stubs.metadata + TRANSPORT)
    status, message, code = transport_error(caught.value)
    assert (status, message, code) == (grpc.StatusCode.INVALID_ARGUMENT, "not available", 108)
