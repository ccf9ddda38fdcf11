"""Centrifugo's record forms: the publication data is the record's `data` exactly as written, like
Centrifugo's own consumers publish it (measured against v6.9.1: `{"z" :  2 }` stays so)."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from relay.centrifugo_records import full_record, parse_publication, parse_record, plain_publish, plain_record
from relay.channels import channel_problem
from relay.message import Message
from relay.routing import RoutingTable

_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**80), 2**80) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=8)
# How producers write JSON: compact, json.dumps' defaults, indented, with \u escapes or without.
_style = st.sampled_from([
    {"separators": (",", ":")}, {}, {"indent": 2}, {"ensure_ascii": False}, {"separators": (" , ", " :  ")},
])
_channel = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=12)


def _dump(value: Any, style: dict[str, Any]) -> str:
    return json.dumps(value, **style)


@settings(max_examples=400, deadline=None)
@given(_json, _channel, _style, st.booleans(), st.booleans())
def test_the_data_is_published_as_written(data: Any, channel: str, style: dict[str, Any], reorder: bool,
                                          spaced: bool) -> None:
    text = _dump(data, style)
    members = [f'"channel": {json.dumps(channel)}', f'"data": {text}']
    if reorder:
        members.reverse()
    gap = "\n  " if spaced else ""
    payload = "{" + gap + ", ".join(members) + gap + "}"
    command = ['"method": "publish"', f'"payload": {payload}']
    record = ("{" + ",".join(reversed(command) if reorder else command) + "}").encode()
    parsed = parse_publication(record, {})
    assert parsed.channels == (channel,)
    assert parsed.data == text.encode()
    # Payload given as a JSON string (Debezium), and the method in a header: the same data.
    as_string = json.dumps({"method": "publish", "payload": payload}).encode()
    assert parse_publication(as_string, {}).data == text.encode()
    assert parse_publication(payload.encode(), {"centrifugo-method": "publish"}).data == text.encode()


@settings(max_examples=200, deadline=None)
@given(_json, st.lists(_channel, min_size=2, max_size=3), _style)
def test_a_broadcast_with_options_keeps_its_data_as_written(data: Any, channels: list[str],
                                                           style: dict[str, Any]) -> None:
    text = _dump(data, style)
    record = (f'{{"method":"broadcast","payload":{{"tags":{{"t":"1"}},"data": {text} ,'
              f'"channels":{json.dumps(channels)},"idempotency_key":"k"}}}}').encode()
    parsed = parse_record(record, {})
    assert (parsed.channels, parsed.data, parsed.idempotency_key) == (tuple(channels), text.encode(), "k")


def test_the_common_form_takes_the_short_way_and_anything_else_the_full_one() -> None:
    common = b'{"method": "publish", "payload": {"channel": "chat:a", "data": {"n": 1}}}'
    short = plain_publish(common)
    assert short is not None and full_record(short) == parse_record(common, {})
    assert plain_publish(b'{"method":"publish","payload":{"channel":"chat:a","data":{"n":1}},"x":1}') is None
    assert plain_publish(b'{"method":"publish","payload":{"channel":"chat:\\u0061","data":1}}') is None
    assert plain_publish(b'{"method":"publish","payload":{"channel":"chat:a","data":{"n":1}}') is None
    assert plain_publish(b'{"method":"publish","payload":{"channel":"a","data":1},"q":{"channel":"b","data":2}}') \
        is None
    # What the short way refuses, the full way still reads (escapes, extra keys) or refuses.
    assert parse_publication(b'{"method":"publish","payload":{"channel":"chat:\\u0061","data":1}}', {}).channels \
        == ("chat:a",)


@settings(max_examples=400, deadline=None)
@given(_json, _channel, _style, st.booleans())
def test_the_short_way_reads_what_the_full_way_reads_or_leaves_it_to_it(data: Any, channel: str,
                                                                        style: dict[str, Any], ascii_: bool) -> None:
    # Any channel (reserved and control characters too), any spacing: the short way gives the full
    # way's record, marked plain only when routing may take it unchecked, or None.
    record = json.dumps({"method": "publish", "payload": {"channel": channel, "data": data}}, ensure_ascii=ascii_,
                        **{k: v for k, v in style.items() if k != "ensure_ascii"}).encode()
    short = plain_publish(record)
    full = parse_record(record, {})
    if short is not None:
        assert type(short) is tuple  # a PlainRecord: routing takes it as it is
        assert full_record(short) == full
        assert channel_problem(channel) is None
    elif (channel_problem(channel) is None and json.dumps(channel) == f'"{channel}"'
          and style in ({"separators": (",", ":")}, {})):
        raise AssertionError(f"the common form took the full way: {record!r}")


def test_a_plain_publish_to_a_bad_channel_is_routed_to_a_dead_letter() -> None:
    record = b'{"method":"publish","payload":{"channel":"chat:a*b","data":{"n":1}}}'
    assert plain_publish(record) is None
    parsed = parse_publication(record, {})
    pubs, rejects = RoutingTable([]).route(Message("s", record, record=parsed))
    assert pubs == [] and len(rejects) == 1 and "reserved" in rejects[0].reason


def test_a_source_that_found_channel_and_data_itself_gets_the_record_routing_expects() -> None:
    good = plain_record("chat:a", b'{"n":1}')
    assert type(good) is tuple  # a PlainRecord
    assert full_record(good) == parse_record(b'{"method":"publish","payload":{"channel":"chat:a","data":{"n":1}}}', {})
    bad = plain_record("chat:a*b", b"1")
    assert type(bad) is not tuple
    pubs, rejects = RoutingTable([]).route(Message("s", b"1", record=bad))
    assert pubs == [] and "reserved" in rejects[0].reason
