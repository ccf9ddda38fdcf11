"""Limits on hostile input: message size on both GRPC ends, line size, template output, channels per
publication, JSON nested deeper than Python's stack. Each one ends in a dead letter with the reason
(or a config error), never in a crash, a hang or unbounded memory."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from relay.centrifugo_records import CentrifugoRecord
from relay.centrifugo_records import parse_publication as parse_centrifugo
from relay.client_commands import _line
from relay.config import MAX_CHANNELS_PER_PUBLICATION, ConfigError, parse_config
from relay.message import Message
from relay.proto.centrifugo import api_pb2 as pb
from relay.routing import Publication, Rejection, RoutingTable
from relay.templates import Template, TemplateError
from tests.harness.embedded import EmbeddedServerFactory
from tests.harness.history import history
from tests.harness.relay_process import RelayProcess

SOURCES = '[sources.events]\ntype = "ticker"\n'
DEEP = b"[" * 100_000 + b"]" * 100_000


def table(routes: str, max_output_bytes: int = 4 * 1024 * 1024) -> RoutingTable:
    config = parse_config(SOURCES + routes)
    return RoutingTable(config.routes, config.relay.unmatched, max_output_bytes=max_output_bytes)


def message(data: bytes, key: str | None = "k", **attributes: Any) -> Message:
    return Message(source="events", data=data, stream="t/0", offset=7, key=key, attributes=attributes)


def message_with(data: bytes, record: CentrifugoRecord) -> Message:
    """A message whose source read it as a record in Centrifugo's own format."""
    return Message(source="events", data=data, stream="t/0", offset=7, key="k", record=record)


def rejected(result: tuple[list[Publication], list[Rejection]]) -> str:
    pubs, rejects = result
    assert pubs == [] and len(rejects) == 1, result
    return rejects[0].reason


def test_json_nested_deeper_than_the_stack_is_a_dead_letter_not_a_crash() -> None:
    assert "nested too deeply" in rejected(table('[[routes]]\nsource = "events"\nchannel = "chat:x"\n')
                                           .route(message(DEEP)))
    templated = table('[[routes]]\nsource = "events"\nchannel = "chat:{{ json.a }}"\n')
    assert "message has no 'json.a'" in rejected(templated.route(message(DEEP)))
    deep_field = b'{"a": ' + b"[" * 990 + b"]" * 990 + b"}"  # parses, but cannot be written out again
    assert rejected(templated.route(message(deep_field)))
    with pytest.raises(ValueError, match="nested too deeply"):
        parse_centrifugo(DEEP, {})
    with pytest.raises(ValueError, match="nested too deeply"):
        parse_centrifugo(b'{"method": "publish", "payload": {"channel": "c", "data": ' + DEEP + b"}}", {})
    line = json.loads(_line(pb.Publication(data=DEEP, offset=3), "chat:x"))  # `relay tail` prints it
    assert line["offset"] == 3 and len(line["data_base64"]) > 200_000


def test_template_output_over_the_limit_is_a_dead_letter() -> None:
    routes = table('[[routes]]\nsource = "events"\nchannel = "chat:x"\n'
                   'data = \'{"a": "{{ json.a }}", "b": "{{ json.a }}", "c": "{{ json.a }}"}\'\n'
                   'tags = { t = "{{ json.a }}{{ json.a }}" }\n', max_output_bytes=1000)
    fits = json.dumps({"a": "x" * 300}).encode()
    assert routes.route(message(fits))[0][0].data.count(b"x") == 900
    reason = rejected(routes.route(message(json.dumps({"a": "x" * 400}).encode())))
    assert "renders longer than 1000 bytes" in reason
    only_tag = table('[[routes]]\nsource = "events"\nchannel = "chat:x"\ntags = { t = "{{ json.a }}" }\n',
                     max_output_bytes=1000)
    assert "renders longer than 1000 bytes" in rejected(only_tag.route(message(json.dumps({"a": "é" * 600})
                                                                               .encode())))
    # Rendering stops as soon as the limit is passed, whatever the template repeats.
    template = Template.compile("{{ key }}" * 50)
    calls: list[str] = []

    def lookup(name: str) -> str:
        calls.append(name)
        return "y" * 100

    with pytest.raises(TemplateError, match="renders longer than 1000 bytes"):
        template.render(lookup, 1000)
    assert len(calls) == 11


def test_channels_per_publication_are_bounded() -> None:
    many = ", ".join(f'"chat:{n}"' for n in range(MAX_CHANNELS_PER_PUBLICATION + 1))
    with pytest.raises(ConfigError) as caught:
        parse_config(SOURCES + f'[[routes]]\nsource = "events"\nchannels = [{many}]\n')
    assert caught.value.problems == [
        f"config.toml: routes[0].channels: a route has at most {MAX_CHANNELS_PER_PUBLICATION} channels, "
        f"got {MAX_CHANNELS_PER_PUBLICATION + 1}"]
    routes = table('[[routes]]\nsource = "events"\nchannel = "chat:x"\n')
    spec = parse_centrifugo(b"{}", {"centrifugo-channels": ",".join(f"chat:{n}" for n in range(1001))})
    reason = rejected(routes.route(message_with(b"{}", spec)))
    assert "names 1001 channels, more than the 1000" in reason
    spec = parse_centrifugo(b"{}", {"centrifugo-channels": ",".join(f"chat:{n}" for n in range(1000))})
    pubs, rejects = routes.route(message_with(b"{}", spec))
    assert (len(pubs), len(pubs[0].channels), rejects) == (1, 1000, [])


def test_size_limits_on_both_ends(embedded_server_factory: EmbeddedServerFactory, tmp_path: Path) -> None:
    """The server takes 256 KiB, the sink is set to 8 MiB: the first Batch is refused for its size,
    the sink keeps later requests under the server's limit, and only what can never fit (one line of
    400 KB) is a dead letter; a line over max_line_bytes is one too. Nothing waits forever."""
    server = embedded_server_factory(max_message_bytes="256KiB")
    lines = [json.dumps({"n": n, "pad": "p" * 60_000}) for n in range(1, 41)]
    lines[14] = json.dumps({"n": 15, "pad": "q" * 400_000})  # fits the sink, never the server
    lines.append("z" * 1_500_000)  # over max_line_bytes
    lines.append(json.dumps({"n": 42}))
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "app.log").write_text("".join(line + "\n" for line in lines))
    relay = RelayProcess(tmp_path / "relay", f"""
[sink]
address = "{server.address}"
api_key_env = "SINK_KEY"
max_message_bytes = "8MiB"
batch_linger = "100ms"
retry = {{ initial_backoff = "20ms", max_backoff = "200ms" }}

[sources.applog]
type = "file"
paths = ["{logs}/*.log"]
read_from = "beginning"
max_line_bytes = "1MiB"

[[routes]]
source = "applog"
channel = "chat:sizes"
""", env={"SINK_KEY": server.api_key}).start()
    dead_file = relay.workdir / "state" / "dead-letter.jsonl"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if dead_file.exists() and len(dead_file.read_text().splitlines()) >= 2:
                pubs = history(server.address, "chat:sizes", server.api_key)
                if len(pubs) >= 40:
                    break
            time.sleep(0.2)
        assert relay.terminate(30) == 0
    finally:
        relay.stop()
    got = [json.loads(p.data)["n"] for p in history(server.address, "chat:sizes", server.api_key)]
    assert got == [n for n in range(1, 43) if n not in (15, 41)]
    dead = [json.loads(line) for line in dead_file.read_text().splitlines()]
    # A position is the byte offset where the line ends; the over-long line is rejected when read.
    assert sorted((int(d["position"].rsplit("/", 1)[1]), d["reason"].split(" (")[0]) for d in dead) == [
        (sum(len(line) + 1 for line in lines[:15]),
         "publication is larger than the 262143 bytes Centrifugo accepts"),
        (sum(len(line) + 1 for line in lines[:41]), "line over max_line_bytes"),
    ]
    warnings = [line for line in relay.logs().splitlines() if "refused a" in line]
    assert len(warnings) == 1 and "its limit: 262144" in warnings[0], warnings
