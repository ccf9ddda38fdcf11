"""The routing table: templates, globs, data modes, fan-out, continue, unmatched, rejections."""

from __future__ import annotations

import json

import pytest

from relay.centrifugo_records import CentrifugoRecord, read_publication
from relay.config import parse_config
from relay.message import Message
from relay.routing import Publication, Rejection, RoutingTable

# Routes may use only the fields their source provides: events are Kafka records, logs file lines.
SOURCES = ('[sources.events]\ntype = "kafka"\nbrokers = ["127.0.0.1:9092"]\ntopics = ["chat-events"]\n'
           '[sources.logs]\ntype = "file"\npaths = ["/var/log/app/*.log"]\n[sources.tick]\ntype = "ticker"\n')


def table(routes: str, unmatched: str = "drop") -> RoutingTable:
    config = parse_config(f'[relay]\nunmatched = "{unmatched}"\n' + SOURCES + routes)
    return RoutingTable(config.routes, config.relay.unmatched)


def kafka_msg(data: bytes = b'{"user": {"id": 7}, "text": "hi"}', key: str | None = "room-3",
              **attrs: object) -> Message:
    attributes = {"topic": "chat-events", "partition": 2, "offset": 41, "timestamp": 1700000000000, **attrs}
    return Message(source="events", data=data, stream="chat-events/2", offset=41, key=key,
                   headers={"x-tenant": "acme"}, attributes=attributes)


def one(result: tuple[list[Publication], list[Rejection]]) -> Publication:
    pubs, rejects = result
    assert not rejects, rejects
    assert len(pubs) == 1
    return pubs[0]


def test_every_template_field() -> None:
    routes = table('''
[[routes]]
source = "events"
channel = "chat:{{ key }}"
[routes.tags]
topic = "{{ topic }}"
partition = "{{partition}}"
offset = "{{ offset }}"
ts = "{{ timestamp }}"
tenant = "{{ header.x-tenant }}"
user = "{{ json.user.id }}"
src = "{{ source }}"
''')
    pub = one(routes.route(kafka_msg()))
    assert pub.channels == ["chat:room-3"]
    assert pub.tags == {"topic": "chat-events", "partition": "2", "offset": "41", "ts": "1700000000000",
                        "tenant": "acme", "user": "7", "src": "events"}
    assert pub.idempotency_key == "events/chat-events/2/41#0"


def test_file_and_ticker_fields() -> None:
    routes = table('''
[[routes]]
source = "logs"
channel = "chat:{{ file.name }}"
tags = { path = "{{ file.path }}", line = "{{ file.line }}" }
[[routes]]
source = "tick"
channel = "chat:tick"
tags = { seq = "{{ seq }}", now = "{{ now }}" }
''')
    msg = Message(source="logs", data=b"{}", stream="f1", offset=10,
                  attributes={"file.path": "/var/log/app.log", "file.name": "app.log", "file.line": 3})
    pub = one(routes.route(msg))
    assert pub.channels == ["chat:app.log"]
    assert pub.tags == {"path": "/var/log/app.log", "line": "3"}
    tick = Message(source="tick", data=b"{}", stream="run", offset=9,
                   attributes={"seq": 9, "now": "2026-01-01T00:00:00Z"})
    assert one(routes.route(tick)).tags == {"seq": "9", "now": "2026-01-01T00:00:00Z"}


def test_missing_field_is_a_rejection_with_reason() -> None:
    routes = table('[[routes]]\nsource = "events"\nchannel = "chat:{{ json.room }}"\n')
    pubs, rejects = routes.route(kafka_msg())
    assert pubs == []
    assert len(rejects) == 1
    assert "has no 'json.room'" in rejects[0].reason
    pubs, rejects = routes.route(kafka_msg(key=None, data=b'{"room": "r1"}'))
    assert [p.channels for p in pubs] == [["chat:r1"]]


def test_missing_key_is_a_rejection() -> None:
    routes = table('[[routes]]\nsource = "events"\nchannel = "chat:{{ key }}"\n')
    _, rejects = routes.route(kafka_msg(key=None))
    assert "has no 'key'" in rejects[0].reason


@pytest.mark.parametrize(("key", "problem"), [
    ("a*b", "reserved"), ("a#b", "reserved"), ("a/b", "reserved"), ("x" * 300, "longer than 255"),
    ("a\nb", "control"),
])
def test_invalid_channel_is_a_rejection(key: str, problem: str) -> None:
    routes = table('[[routes]]\nsource = "events"\nchannel = "chat:{{ key }}"\n')
    pubs, rejects = routes.route(kafka_msg(key=key))
    assert pubs == []
    assert problem in rejects[0].reason
    assert rejects[0].channel == f"chat:{key}"


def test_globs_all_must_hold() -> None:
    routes = table('''
[[routes]]
source = "events"
when = { key = "room-*", topic = "chat-*", "header.x-tenant" = "ac?e", "json.user.id" = "[0-9]" }
channel = "chat:matched"
''', unmatched="dead_letter")
    assert one(routes.route(kafka_msg())).channels == ["chat:matched"]
    for msg in (kafka_msg(key="lobby"), kafka_msg(data=b'{"user": {"id": 70}}'),
                kafka_msg(key=None)):
        pubs, rejects = routes.route(msg)
        assert pubs == [] and rejects[0].reason == "no route matched"


def test_first_match_wins_unless_continue() -> None:
    routes = table('''
[[routes]]
source = "events"
channel = "chat:first"
continue = true
[[routes]]
source = "events"
channel = "chat:second"
[[routes]]
source = "events"
channel = "chat:never"
''')
    pubs, _ = routes.route(kafka_msg())
    assert [p.channels for p in pubs] == [["chat:first"], ["chat:second"]]
    # Two publications from one message need two idempotency keys.
    assert pubs[0].idempotency_key != pubs[1].idempotency_key


def test_several_channels_make_one_broadcast() -> None:
    routes = table('[[routes]]\nsource = "events"\nchannels = ["chat:a", "chat:{{ key }}"]\n')
    pub = one(routes.route(kafka_msg()))
    assert pub.channels == ["chat:a", "chat:room-3"]


def test_unmatched_drop_and_dead_letter() -> None:
    only_logs = '[[routes]]\nsource = "logs"\nchannel = "chat:x"\n'
    assert table(only_logs).route(kafka_msg()) == ([], [])
    pubs, rejects = table(only_logs, "dead_letter").route(kafka_msg())
    assert pubs == [] and rejects[0].reason == "no route matched"


def test_data_modes() -> None:
    base = '[[routes]]\nsource = "logs"\nchannel = "chat:x"\n'
    msg = Message(source="logs", data=b"plain \xff line", attributes={"file.path": "/v/a.log"})
    _, rejects = table(base).route(msg)
    assert "not UTF-8" in rejects[0].reason
    _, rejects = table(base).route(Message(source="logs", data=b"{not json"))
    assert "not JSON" in rejects[0].reason
    wrapped = one(table(base + 'data = "wrap"\n').route(msg))
    assert json.loads(wrapped.data) == {"line": "plain \ufffd line", "file": "/v/a.log"}
    raw = one(table(base + 'data = "raw"\n').route(msg))
    assert raw.data == b"plain \xff line"
    _, rejects = table(base + 'data = "raw"\n').route(Message(source="logs", data=b""))
    assert "empty" in rejects[0].reason
    ticks = '[[routes]]\nsource = "tick"\nchannel = "chat:x"\n'
    templated = one(table(ticks + 'data = \'{"seq": {{ seq }}, "src": "{{ source }}"}\'\n').route(
        Message(source="tick", data=b"", attributes={"seq": 5})))
    assert json.loads(templated.data) == {"seq": 5, "src": "tick"}
    _, rejects = table(ticks + "data = '{\"k\": {{ seq }}'\n").route(Message(source="tick", data=b"",
                                                                            attributes={"seq": 5}))
    assert "rendered data is not JSON" in rejects[0].reason


def test_source_error_attribute_is_a_rejection() -> None:
    routes = table('[[routes]]\nsource = "logs"\nchannel = "chat:x"\n')
    _, rejects = routes.route(Message(source="logs", data=b"x" * 10, error="line too long"))
    assert rejects[0].reason == "line too long"


def test_centrifugo_native_record_names_its_channels() -> None:
    routes = table("")
    spec = CentrifugoRecord("broadcast", ("chat:a", "chat:b"), b'{"x":1}', idempotency_key="k1",
                            tags={"t": "v"}, delta=True, version=3, version_epoch="e")
    pub = one(routes.route(Message(source="events", data=b"", record=spec)))
    assert (list(pub.channels), pub.data, pub.idempotency_key, pub.tags, pub.delta, pub.version, pub.version_epoch) == (
        ["chat:a", "chat:b"], b'{"x":1}', "k1", {"t": "v"}, True, 3, "e")
    no_channel = CentrifugoRecord("publish")
    _, rejects = routes.route(Message(source="events", data=b"", record=no_channel))
    assert "no channel" in rejects[0].reason


def test_a_centrifugo_command_other_than_publish_is_a_dead_letter_naming_the_method() -> None:
    routes = table("")
    record = CentrifugoRecord("unsubscribe", payload={"channel": "chat:a", "user": "42"})
    pubs, rejects = routes.route(Message(source="events", data=b"", record=record))
    assert pubs == [] and "'unsubscribe' is not supported" in rejects[0].reason


def test_a_chunk_of_plain_records_gets_the_keys_each_message_would_get_alone() -> None:
    # route_chunk writes the common record's way inline: its key must be the one route_into gives
    # (position + "#c"), with a stream and without, and across streams.
    value = b'{"method":"publish","payload":{"channel":"chat:a","data":{"n":1}}}'
    record, _ = read_publication(value, {})
    messages = [Message("kafka", value, stream, offset, record=record)
                for stream, offset in [("t/0", 7), ("t/0", 8), ("", 9), ("t/1", 10), ("t/0", 100)]]
    pubs: list[Publication] = []
    RoutingTable([]).route_chunk(messages, pubs, [])
    alone = [RoutingTable([]).route(m)[0][0].idempotency_key for m in messages]
    assert [p.idempotency_key for p in pubs] == alone == [
        "kafka/t/0/7#c", "kafka/t/0/8#c", "kafka/9#c", "kafka/t/1/10#c", "kafka/t/0/100#c"]


QUICK_ROUTES = [  # each its source's only route, without `when` or tags: route_chunk's quick way
    '[[routes]]\nsource = "events"\nchannel = "chat:{{ key }}"\n',
    '[[routes]]\nsource = "events"\nchannel = "chat:{{ json.room }}"\nskip_history = true\n',
    '[[routes]]\nsource = "events"\nchannel = "chat:{{ header.x-room }}"\ndata = "raw"\n',
    '[[routes]]\nsource = "events"\nchannel = "chat:fixed"\ncontinue = true\n',
    '[[routes]]\nsource = "events"\nchannels = ["chat:a", "chat:b"]\n',
    '[[routes]]\nsource = "events"\nchannel = "chat:{{ json.user.id }}"\n',
    '[[routes]]\nsource = "events"\nchannel = "{{ key }}"\ndata = "raw"\n',
    '[[routes]]\nsource = "events"\nchannel = "chat:{{ json.room }}:{{ key }}"\n',
]
QUICK_MESSAGES = [
    # Keys and rooms cross (r1/r2): a channel made of the wrong field is still a known, good one.
    (b'{"room": "r1", "user": {"id": 7}}', "r2", {"x-room": "h1"}),
    (b'{"room": "r1"}', None, {}),  # no key: a template error
    (b"not json", "k1", {"x-room": "h1"}),
    (b"", "k1", {"x-room": "h1"}),  # empty: not JSON, and raw refuses it
    (b"null", "k1", {"x-room": "h1"}),  # JSON null: valid data, but no json.* field
    (b'{"room": 1e400, "user": {"id": 1e400}}', "k1", {}),  # JSON orjson refuses
    (b'{"room": "bad channel\\u0000"}', "bad key\x00", {"x-room": "bad\x00"}),  # channels refused
    (b'{"room": "' + b"r" * 300 + b'"}', "k" * 300, {"x-room": "h" * 300}),  # channels too long
    (b'{"room": "r2", "user": {"id": "u2"}}', "r1", {"x-room": "h2"}),
    (b'{"room": 5, "user": {"id": true}}', "", {"x-room": ""}),  # JSON values written out; empty values
    (b'["room"]', "k3", {}),  # JSON, not an object
    (b"[" * 2000 + b"]" * 2000, "k1", {}),  # nested too deeply
]


@pytest.mark.parametrize("route", QUICK_ROUTES)
@pytest.mark.parametrize("unmatched", ["drop", "dead_letter"])
def test_a_chunk_routes_as_each_message_alone(route: str, unmatched: str) -> None:
    # route_chunk takes a quick way for a source's only route; what it makes must be what route()
    # makes of each message alone, in order: publications, keys, options, dead letters and reasons.
    routes = table(route, unmatched)
    messages = [Message(source="events", data=data, stream="chat-events/0", offset=i, key=key, headers=headers)
                for i, (data, key, headers) in enumerate(QUICK_MESSAGES * 2)]  # twice: channels now known
    messages.append(Message(source="events", data=b"{}", offset=99, error="unreadable"))
    pubs: list[Publication] = []
    rejects: list[Rejection] = []
    routes.route_chunk(messages, pubs, rejects)
    alone = [routes.route(m) for m in messages]

    def seen(pub: Publication) -> tuple[object, ...]:
        return (tuple(pub.channels), pub.data, pub.message, pub.idempotency_key, dict(pub.tags), pub.skip_history,
                pub.delta, pub.version, pub.version_epoch)

    assert [seen(p) for p in pubs] == [seen(p) for result in alone for p in result[0]]
    assert rejects == [r for result in alone for r in result[1]]
    assert pubs and rejects


def test_channels_remembered_by_key_stay_bounded_and_right() -> None:
    # The quick way remembers each key's checked channel: keys come from producers, so what it keeps
    # must stay bounded, and every publication must still get its own key's channel.
    from relay.routing import _GOOD_CHANNELS, GOOD_CHANNELS_MAX
    _GOOD_CHANNELS.clear()  # a cache shared with every test before: start with room in it
    routes = table('[[routes]]\nsource = "events"\nchannel = "chat:{{ key }}"\n')
    quick = routes._quick["events"]

    def route_twice(keys: list[str]) -> None:  # the second time each channel is known: the quick way
        for _ in range(2):
            pubs: list[Publication] = []
            rejects: list[Rejection] = []
            routes.route_chunk([Message("events", b"{}", "s/0", i, key=k) for i, k in enumerate(keys)], pubs,
                               rejects)
            assert rejects == []
            assert [p.channels for p in pubs] == [[f"chat:{k}"] for k in keys]

    route_twice([f"a{i}" for i in range(3000)])
    assert len(quick._channels_of) == 3000
    route_twice([f"b{i}" for i in range(GOOD_CHANNELS_MAX)])
    assert len(quick._channels_of) <= GOOD_CHANNELS_MAX
