"""The sink writes the common publish commands itself: the bytes must be the ones protobuf writes."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from relay.message import Message
from relay.proto.centrifugo import api_pb2 as v6
from relay.routing import Publication
from relay.sinks.grpc_centrifugo import _command, _Commands, encode_command

_channel = st.text(min_size=1, max_size=300)
_publication = st.builds(
    lambda channels, data, key, tags, skip, delta, version: Publication(
        channels, data, Message("s", b""), key, tags, skip, delta, version, "e" if version else ""),
    st.one_of(st.lists(_channel, min_size=1, max_size=1), st.lists(_channel, min_size=2, max_size=4)),
    st.binary(max_size=20_000),
    st.text(max_size=200),
    # One tag at most: the order of map entries is upb's own, not the same in two serialisations.
    st.one_of(st.just({}), st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=1)),
    st.just(False) | st.booleans(),
    st.just(False) | st.booleans(),
    st.just(0) | st.integers(0, 2**64 - 1),
)


@settings(max_examples=400, deadline=None)
@given(st.lists(_publication, max_size=12), st.booleans())
def test_commands_are_the_bytes_protobuf_writes(pubs: list[Publication], keyed: bool) -> None:
    expected = v6.BatchRequest()
    for pub in pubs:
        expected.commands.append(_command(pub, pub.channels, keyed))
    commands = _Commands(pubs, keyed)
    owed = dict(enumerate(pub.channels for pub in pubs))
    request = commands.request(list(owed), owed)
    assert request == expected.SerializeToString()
    assert v6.BatchRequest.FromString(request) == expected
    assert sum(commands.sizes(owed).values()) == len(request)


def test_a_plain_publish_is_written_without_protobuf_and_reads_back() -> None:
    pub = Publication(["chat:ü"], b'{"n":1}', Message("s", b""), "s/t/0/7#c")
    encoded = encode_command(pub, pub.channels, keyed=True)
    request = v6.BatchRequest.FromString(encoded)
    publish = request.commands[0].publish
    assert (publish.channel, publish.data, publish.idempotency_key) == ("chat:ü", b'{"n":1}', "s/t/0/7#c")
    unkeyed = v6.BatchRequest.FromString(encode_command(pub, pub.channels, keyed=False))
    assert unkeyed.commands[0].publish.idempotency_key == ""


def test_a_partly_accepted_broadcast_is_sent_again_only_to_the_channels_still_owed() -> None:
    pubs = [Publication(["chat:a", "chat:b", "chat:c"], b"1", Message("s", b""), "k")]
    commands = _Commands(pubs, keyed=True)
    first = v6.BatchRequest.FromString(commands.request([0], {0: pubs[0].channels}))
    assert list(first.commands[0].broadcast.channels) == ["chat:a", "chat:b", "chat:c"]
    owed = {0: ["chat:b"]}  # what _settle_reply leaves when chat:a and chat:c were accepted
    again = v6.BatchRequest.FromString(commands.request([0], owed))
    assert again.commands[0].publish.channel == "chat:b"  # one channel left: a publish, as before
    assert commands.sizes(owed) == {0: len(commands.request([0], owed))}
