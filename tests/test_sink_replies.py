"""The sink reads accepted Batch replies from their bytes; anything else must go to protobuf."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from relay.proto.centrifugo import api_pb2 as v6
from relay.sinks.grpc_centrifugo import _accepted_replies, _walk_replies

_reply = st.one_of(
    st.tuples(st.just("publish"), st.integers(0, 2**64 - 1), st.text(max_size=140)),
    st.tuples(st.just("error"), st.integers(0, 2**32 - 1), st.text(max_size=20)),
    st.tuples(st.just("broadcast"), st.integers(0, 3), st.text(max_size=5)),
    st.tuples(st.just("empty"), st.just(0), st.just("")),
)


def _response(replies: list[tuple[str, int, str]]) -> bytes:
    response = v6.BatchResponse()
    for kind, number, text in replies:
        reply = response.replies.add()
        if kind == "publish":
            reply.publish.offset = number
            reply.publish.epoch = text
        elif kind == "error":
            reply.error.code = number
            reply.error.message = text
        elif kind == "broadcast":
            for _ in range(number):
                reply.broadcast.responses.add().result.offset = 1
            reply.broadcast.SetInParent()
    return response.SerializeToString()


@settings(max_examples=300)
@given(st.lists(_reply, max_size=20))
def test_accepted_replies_agrees_with_protobuf(replies: list[tuple[str, int, str]]) -> None:
    raw = _response(replies)
    decoded = v6.BatchResponse.FromString(raw).replies
    plain = all(r.HasField("publish") and not r.HasField("error") and not r.HasField("broadcast")
                for r in decoded)
    count = _accepted_replies(raw)
    if count >= 0:
        # The fast answer may only ever say "all accepted", and only when that is true.
        assert plain and count == len(decoded)
    else:
        assert not plain or any(len(r.SerializeToString()) >= 126 for r in decoded)


def test_common_replies_take_the_fast_path() -> None:
    raw = _response([("publish", 10**9 + i, "Hbc3") for i in range(500)] + [("publish", 0, "")])
    assert _accepted_replies(raw) == 501


def test_an_error_among_accepted_replies_is_seen() -> None:
    raw = _response([("publish", 1, "e")] * 3 + [("error", 102, "unknown channel")] + [("publish", 2, "e")])
    assert _accepted_replies(raw) == -1


def test_truncated_bytes_are_not_accepted() -> None:
    raw = _response([("publish", 5, "epoch")] * 2)
    assert _accepted_replies(raw[:-1]) == -1
    assert _accepted_replies(raw + b"\x0a") == -1


@settings(max_examples=500)
@given(st.lists(st.sampled_from([0x0A, 0x22, 0x08, 0x12, 0x00, 0x01, 0x02, 0x7F, 0x80]), min_size=1, max_size=12),
       st.integers(1, 40), st.data())
def test_replies_of_one_size_are_read_as_one_at_a_time(shape: list[int], count: int, data: st.DataObject) -> None:
    # Replies of one size are checked a column at a time; the answer must be the walk's, reply by
    # reply, for any bytes cut in equal parts (mostly valid headers, some bytes changed).
    size = len(shape) + 3
    reply = bytes([0x0A, size - 2, 0x22, size - 4, *shape[:size - 4]])
    raw = bytearray(reply * count)
    for _ in range(data.draw(st.integers(0, 2))):
        raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.sampled_from([0x0A, 0x22, 0x2A, size - 2, 0x80, 0]))
    assert _accepted_replies(bytes(raw)) == _walk_replies(bytes(raw))
    assert _accepted_replies(bytes(raw[:-1])) == _walk_replies(bytes(raw[:-1]))


def test_replies_of_one_size_with_an_error_among_them_are_not_accepted() -> None:
    publish = _response([("publish", 1, "abcdefg")])
    error = _response([("error", 102, "unknown")])
    assert len(publish) == len(error)
    assert _accepted_replies(publish * 5) == 5
    assert _accepted_replies(publish * 2 + error + publish * 2) == -1
