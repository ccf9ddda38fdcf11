"""The sink reads accepted Batch replies from their bytes; anything else must go to protobuf."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from relay.proto.centrifugo import api_pb2 as v6
from relay.sinks.grpc_centrifugo import _accepted_replies

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
