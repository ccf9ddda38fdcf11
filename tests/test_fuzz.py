"""Fuzzing with hypothesis: config parsing, template rendering, routing, and message payloads through
the whole pipeline (routing → sink → an embedded server in another process).

Each target runs RELAY_FUZZ_EXAMPLES examples: 200 in `make test`, 10,000 in `make test-fuzz`
(which selects these tests by their `slow` marker). The same tests run in both; nothing is skipped.
A failure prints the `@reproduce_failure` blob to replay it.
"""

from __future__ import annotations

import asyncio
import json
import os
import string
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import grpc
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError

from relay import sources
from relay.centrifugo_records import parse_publication as parse_centrifugo
from relay.channels import channel_problem
from relay.check import describe
from relay.config import MAX_CHANNELS_PER_PUBLICATION, Config, ConfigError, RouteConfig, parse_config
from relay.dead_letter import DeadLetterFile
from relay.message import Message
from relay.pipeline import Pipeline
from relay.proto.centrifugo import api_pb2 as pb
from relay.proto.centrifugo import api_pb2_grpc
from relay.routing import Publication, Rejection, RoutingTable
from relay.sinks.grpc_centrifugo import GrpcCentrifugoSink
from relay.templates import Template, TemplateError
from tests.harness.embedded import EmbeddedServerProcess

pytestmark = pytest.mark.slow

EXAMPLES = int(os.environ.get("RELAY_FUZZ_EXAMPLES", "200"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.filter_too_much])
# Examples run per target, written to the terminal when the module is done.
RUNS: Counter[str] = Counter()


@pytest.fixture(scope="module", autouse=True)
def _report_runs(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    request.config.get_terminal_writer().line(
        f"\nfuzz examples run (RELAY_FUZZ_EXAMPLES={EXAMPLES}): "
        + ", ".join(f"{name}={count}" for name, count in sorted(RUNS.items())))


# -- TOML written from random tables ------------------------------------------------------------


def _toml_string(text: str) -> str:
    out = []
    for ch in text:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def to_toml(value: Any) -> str:
    """A TOML value (inline tables and arrays) for what tomllib itself produces."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return "nan" if value != value else ("inf" if value == float("inf") else
                                             "-inf" if value == float("-inf") else repr(value))
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, list):
        return "[" + ", ".join(to_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_toml_string(k)} = {to_toml(v)}" for k, v in value.items()) + "}"
    raise TypeError(type(value))


def _field_names(model: type[BaseModel], seen: set[type[BaseModel]]) -> set[str]:
    if model in seen:
        return set()
    seen.add(model)
    names: set[str] = set()
    for name, info in model.model_fields.items():
        names.add(info.alias or name)
        for arg in (info.annotation, *getattr(info.annotation, "__args__", ())):
            if isinstance(arg, type) and issubclass(arg, BaseModel):
                names |= _field_names(arg, seen)
    return names


VOCABULARY = sorted(_field_names(Config, set()).union(
    *(_field_names(sources.config_model(t), set()) for t in sources.TYPES)) | {"sources", "routes"})
SCALARS = st.one_of(
    st.text(max_size=12),
    st.sampled_from(["ticker", "file", "kafka", "nats", "5s", "0s", "1MiB", "chat:{{ key }}", "{{ json.a }}",
                     "127.0.0.1:9092", "json", "raw", "wrap", "**/*.log", "PLAIN", "SASL_SSL", "*/5 * * * *",
                     "-1ms", "9" * 40 + "d"]),
    st.integers(min_value=-(2**63), max_value=2**63 - 1), st.booleans(),
    st.floats(allow_nan=True, allow_infinity=True), st.datetimes(min_value=datetime(1000, 1, 1)))
KEYS = st.one_of(st.sampled_from(VOCABULARY), st.text(max_size=6))
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(KEYS, inner, max_size=5)), max_leaves=25)
SOURCE_TABLE = st.fixed_dictionaries(
    {"type": st.sampled_from(["ticker", "file", "kafka", "nats"])},
    optional={k: VALUES for k in ("interval", "count", "data", "paths", "brokers", "topics", "cron",
                                  "max_line_bytes", "sasl", "tls", "security_protocol", "read_from",
                                  "format", "stream", "url", "subjects", "durable", "ack_wait")})
ROUTE_TABLE = st.fixed_dictionaries(
    {"source": st.sampled_from(["a", "b", "c"])},
    optional={k: VALUES for k in ("channel", "channels", "data", "tags", "when", "continue", "skip_history")})
DOCUMENT = st.fixed_dictionaries({}, optional={
    "relay": st.dictionaries(KEYS, VALUES, max_size=4), "server": st.dictionaries(KEYS, VALUES, max_size=4),
    "sink": st.dictionaries(KEYS, VALUES, max_size=4),
    "sources": st.dictionaries(st.sampled_from(["a", "b", "c"]), SOURCE_TABLE | VALUES, max_size=3) | VALUES,
    "routes": st.lists(ROUTE_TABLE | VALUES, max_size=3) | VALUES,
    "extra": VALUES})
VALID = (Path(__file__).resolve().parents[1] / "config.toml").read_text()


def check_config(text: str) -> Config | None:
    """parse_config either gives a Config that `relay check` and the routing table take, or a
    ConfigError whose every line reads `FILE: dotted.key: what is wrong`; nothing else."""
    try:
        config = parse_config(text, "fuzz.toml")
    except ConfigError as err:
        assert err.problems, "a ConfigError names at least one problem"
        for line in err.problems:
            assert line.startswith("fuzz.toml: ") and len(line.splitlines()) == 1, line
        return None
    describe(config, "fuzz.toml")
    RoutingTable(config.routes, config.relay.unmatched, max_output_bytes=config.sink.max_message_bytes)
    return config


@FUZZ
@given(st.text())
def test_config_arbitrary_text(text: str) -> None:
    RUNS["config text"] += 1
    check_config(text)


@FUZZ
@given(DOCUMENT)
def test_config_random_tables(document: dict[str, Any]) -> None:
    RUNS["config tables"] += 1
    text = "\n".join(f"{_toml_string(k)} = {to_toml(v)}" for k, v in document.items())
    check_config(text)


@FUZZ
@given(st.lists(st.tuples(st.integers(0, 10_000), st.sampled_from(["drop", "dup", "char"]), st.characters()),
                max_size=6))
def test_config_mutated_default(edits: list[tuple[int, str, str]]) -> None:
    RUNS["config mutations"] += 1
    lines = VALID.splitlines()
    for position, kind, char in edits:
        i = position % len(lines)
        if kind == "drop":
            del lines[i]
        elif kind == "dup":
            lines.insert(i, lines[i])
        elif lines[i]:
            j = position % len(lines[i])
            lines[i] = lines[i][:j] + char + lines[i][j + 1:]
        if not lines:
            lines = [""]
    check_config("\n".join(lines))


# -- templates ----------------------------------------------------------------------------------

FIELDS = ["key", "topic", "partition", "offset", "timestamp", "seq", "now", "source", "line", "file.path",
          "file.name", "file.line", "file.offset", "header.x", "header.run", "json.a", "json.a.b", "json.0",
          "json.a-b_c", "nope", "header.", "json..a", "header.a b"]
LITERAL = st.text(alphabet=st.characters(blacklist_characters="{}"), max_size=8)
PLACEHOLDER = st.builds(lambda name, left, right: "{{" + left + name + right + "}}", st.sampled_from(FIELDS),
                        st.sampled_from(["", " ", "  "]), st.sampled_from(["", " "]))
TEMPLATE_TEXT = st.lists(LITERAL | PLACEHOLDER | st.sampled_from(["{", "}", "{{", "}}", "{{}}", "{{ }}"]),
                         max_size=6).map("".join)


@FUZZ
@given(st.one_of(st.text(), TEMPLATE_TEXT), st.dictionaries(st.sampled_from(FIELDS), st.none() | st.text()),
       st.none() | st.integers(0, 64))
def test_template_compile_and_render(text: str, values: dict[str, str | None], limit: int | None) -> None:
    RUNS["templates"] += 1
    try:
        template = Template.compile(text)
    except TemplateError:
        return
    try:
        rendered = template.render(values.get, limit)
    except TemplateError as err:
        missing = [f for f in template.fields if values.get(f) is None]
        assert missing or (limit is not None and "renders longer than" in str(err)), err
        return
    pairs = zip(template.fields, template.literals[1:], strict=True)
    expected = template.literals[0] + "".join(str(values[name]) + literal for name, literal in pairs)
    assert rendered == expected
    if limit is not None:
        assert len(rendered.encode()) <= limit
    if template.is_constant:
        assert rendered == text


# -- routing ------------------------------------------------------------------------------------

CHANNEL_LITERAL = st.text(alphabet=string.ascii_letters + string.digits + ":-_.*$#/& é\x00", max_size=6)
ROUTE_FIELDS = [f for f in FIELDS if f not in ("nope", "header.", "json..a", "header.a b")]
CHANNEL_TEMPLATE = st.lists(CHANNEL_LITERAL | st.sampled_from(ROUTE_FIELDS).map(lambda f: "{{ " + f + " }}"),
                            min_size=1, max_size=4).map(lambda parts: "chat:" + "".join(parts))
DATA_MODE = st.sampled_from(["json", "wrap", "raw", '{"a": {{ json.a }}}', '"{{ key }}"', "{{ json.a }}"])
WHEN = st.dictionaries(st.sampled_from(["key", "topic", "header.x", "json.a", "partition", "source"]),
                       st.sampled_from(["*", "room-*", "[ab]*", "?", "1", "s"]), max_size=2)
ROUTE = st.fixed_dictionaries(
    {"source": st.just("s"), "data": DATA_MODE},
    optional={"when": WHEN, "continue": st.booleans(), "skip_history": st.booleans(),
              "tags": st.dictionaries(st.sampled_from(["a", "b"]), CHANNEL_TEMPLATE, max_size=2)})
TARGETS = st.one_of(CHANNEL_TEMPLATE.map(lambda c: {"channel": c}),
                    st.lists(CHANNEL_TEMPLATE, min_size=1, max_size=3).map(lambda cs: {"channels": cs}))
JSON_SCALARS = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8)
JSON = st.recursive(JSON_SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
    st.sampled_from(["a", "b", "0"]), inner, max_size=3), max_leaves=10)
PAYLOAD = st.one_of(st.binary(max_size=64), JSON.map(lambda v: json.dumps(v).encode()),
                    st.integers(0, 3000).map(lambda depth: b"[" * depth + b"]" * depth),
                    st.sampled_from([b"", b"null", b"NaN", b'{"a": NaN}', b"\xff\xfe", b'{"a": "\\ud800"}']))
HEADERS = st.dictionaries(st.sampled_from(["x", "run", "centrifugo-channels", "centrifugo-method",
                                           "centrifugo-delta", "centrifugo-version", "centrifugo-tag-t"]),
                          st.text(max_size=12) | st.sampled_from(["chat:a,chat:b", "publish", "true", "7"]),
                          max_size=3)


@st.composite
def messages(draw: st.DrawFn, source: str = "s") -> Message:
    data = draw(PAYLOAD)
    headers = draw(HEADERS)
    attributes: dict[str, Any] = draw(st.fixed_dictionaries({}, optional={
        "topic": st.text(max_size=8), "partition": st.integers(0, 9), "timestamp": st.integers(),
        "file.path": st.text(max_size=8), "file.name": st.text(max_size=8), "file.line": st.integers(0, 10),
        "seq": st.integers(), "now": st.just("2026-01-01T00:00:00Z")}))
    record, error = None, ""
    if draw(st.booleans()):  # a Kafka record in Centrifugo's own format
        try:
            record = parse_centrifugo(data, headers)
        except ValueError as err:
            error = str(err)
    return Message(source=source, data=data, stream=draw(st.sampled_from(["", "t/0", "f"])),
                   offset=draw(st.integers(0, 2**40)), key=draw(st.none() | st.text(max_size=12)),
                   headers=headers, attributes=attributes, record=record, error=error)


@FUZZ
@given(st.lists(st.tuples(ROUTE, TARGETS), min_size=1, max_size=4), st.sampled_from(["drop", "dead_letter"]),
       st.lists(messages(), min_size=1, max_size=4))
def test_routing_random_messages(routes: list[tuple[dict[str, Any], dict[str, Any]]], unmatched: str,
                                 batch: list[Message]) -> None:
    RUNS["routing"] += 1
    try:
        configs = [RouteConfig.model_validate({**route, **targets}) for route, targets in routes]
    except ValidationError:
        assume(False)
        return
    table = RoutingTable(configs, unmatched, max_output_bytes=256)
    for msg in batch:
        pubs, rejects = table.route(msg)
        assert all(isinstance(p, Publication) for p in pubs)
        assert all(isinstance(r, Rejection) for r in rejects)
        for pub in pubs:
            assert 1 <= len(pub.channels) <= MAX_CHANNELS_PER_PUBLICATION
            assert all(channel_problem(c) is None for c in pub.channels), pub.channels
            assert isinstance(pub.data, bytes) and pub.idempotency_key
            assert all(isinstance(k, str) and isinstance(v, str) for k, v in pub.tags.items())
            assert all(len(v.encode()) <= 256 for v in pub.tags.values())
        for rejection in rejects:
            assert rejection.reason and rejection.message is msg


# -- the whole pipeline -------------------------------------------------------------------------

PIPELINE_ROUTES = """
[[routes]]
source = "fuzz"
channel = "chat:{{ header.run }}-k-{{ key }}"
tags = { pos = "{{ offset }}" }
continue = true

[[routes]]
source = "fuzz"
channels = ["chat:{{ header.run }}-raw", "chat:{{ header.run }}-j-{{ json.a }}"]
data = "raw"
tags = { pos = "{{ offset }}" }
continue = true

[[routes]]
source = "fuzz"
channel = "chat:{{ header.run }}-t"
data = '{"k": "{{ key }}", "a": {{ json.a }}}'
tags = { pos = "{{ offset }}" }
continue = true

[[routes]]
source = "fuzz"
when = { "header.x" = "y*" }
channel = "nochat:{{ header.run }}"
tags = { pos = "{{ offset }}" }
"""
# The prefix of a channel names the route that made it (after "chat:RUN" or "nochat:RUN").
ROUTE_OF_PREFIX = (("-k-", 0), ("-raw", 1), ("-j-", 1), ("-t", 2))
CHANNELS_PER_ROUTE = {0: 1, 1: 2, 2: 1, 3: 1}
BIG = st.integers(60_000, 70_000).map(lambda n: json.dumps({"a": "x" * n}).encode())
WITH_A = JSON.map(lambda a: json.dumps({"a": a}).encode())
KEY = st.none() | st.text(max_size=12) | st.text(string.ascii_letters + ":-_.", min_size=1, max_size=8)


@dataclass
class PipelineRig:
    """The relay's pipeline in this process, on its own loop; the server in another process."""

    server: EmbeddedServerProcess
    loop: asyncio.AbstractEventLoop
    pipeline: Pipeline
    dead_letter_path: Path
    stubs: Any
    dead_letter_offset: int = 0
    next_offset: int = 0
    totals: Counter[str] = field(default_factory=Counter)

    def history(self, run: str) -> list[tuple[str, pb.Publication]]:
        metadata = self.server.metadata
        channels = self.stubs.Channels(pb.ChannelsRequest(pattern=f"chat:{run}*"), metadata=metadata,
                                       timeout=10).result.channels
        out: list[tuple[str, pb.Publication]] = []
        for channel in channels:
            resp = self.stubs.History(pb.HistoryRequest(channel=channel, limit=-1), metadata=metadata,
                                      timeout=10)
            assert resp.error.code == 0, (channel, resp.error)
            out.extend((channel, pub) for pub in resp.result.publications)
        return out

    def new_dead_letters(self) -> list[dict[str, Any]]:
        if not self.dead_letter_path.exists():
            return []
        with open(self.dead_letter_path, "rb") as f:
            f.seek(self.dead_letter_offset)
            chunk = f.read()
        self.dead_letter_offset += len(chunk)
        # split on "\n" only: a line may hold U+2028 or U+0085, which splitlines() would cut at
        return [json.loads(line) for line in chunk.decode().split("\n") if line]


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[PipelineRig]:
    workdir = tmp_path_factory.mktemp("fuzz-pipeline")
    server = EmbeddedServerProcess(workdir / "server", namespaces=[{"name": "chat", "history_size": 100,
                                                                    "history_ttl": "600s"}],
                                   max_message_bytes="64KiB").start()
    request.addfinalizer(server.stop)  # runs even when the setup below fails
    os.environ["FUZZ_SINK_KEY"] = server.api_key
    config = parse_config(f"""
[relay]
unmatched = "dead_letter"
[sink]
address = "{server.address}"
api_key_env = "FUZZ_SINK_KEY"
max_message_bytes = "1MiB"
retry = {{ initial_backoff = "1ms", max_backoff = "50ms" }}
[sources.fuzz]
type = "kafka"
brokers = ["127.0.0.1:9092"]
topics = ["fuzz"]
{PIPELINE_ROUTES}""")
    loop = asyncio.new_event_loop()
    sink = GrpcCentrifugoSink(config.sink)
    loop.run_until_complete(sink.start())
    dead_letter_path = workdir / "dead-letter.jsonl"
    pipeline = Pipeline(RoutingTable(config.routes, config.relay.unmatched,
                                     max_output_bytes=config.sink.max_message_bytes),
                        sink, DeadLetterFile(dead_letter_path), lanes=3, batch_max_size=100, batch_linger=0.0)

    async def start() -> None:
        pipeline.start()

    loop.run_until_complete(start())
    chan = grpc.insecure_channel(server.address, options=[("grpc.max_receive_message_length", 64 << 20)])
    rig = PipelineRig(server, loop, pipeline, dead_letter_path,
                      api_pb2_grpc.CentrifugoApiStub(chan))  # type: ignore[no-untyped-call]
    try:
        yield rig
    finally:
        request.config.get_terminal_writer().line(f"\npipeline fuzz: {dict(rig.totals)}")
        os.environ.pop("FUZZ_SINK_KEY", None)
        loop.run_until_complete(pipeline.stop())
        loop.run_until_complete(sink.close())
        loop.close()
        chan.close()


def _route_of(channel: str, run: str) -> int:
    if channel.startswith(f"nochat:{run}"):
        return 3
    rest = channel.removeprefix(f"chat:{run}")
    for prefix, route in ROUTE_OF_PREFIX:
        if rest.startswith(prefix):
            return route
    raise AssertionError(f"channel {channel!r} belongs to no route of run {run}")


@FUZZ
@given(st.lists(st.tuples(PAYLOAD | WITH_A | BIG, KEY,
                          st.dictionaries(st.sampled_from(["x", "y", "centrifugo-channels"]),
                                          st.text(max_size=6) | st.just("yes"), max_size=2)),
                min_size=1, max_size=5))
def test_payloads_through_the_pipeline(rig: PipelineRig,
                                       batch: list[tuple[bytes, str | None, dict[str, str]]]) -> None:
    """Every message ends in History or in the dead letter file, once per route and channel."""
    RUNS["pipeline"] += 1
    run = uuid.uuid4().hex[:12]
    settled: list[Message] = []
    done = asyncio.Event()
    msgs = []
    for i, (data, key, headers) in enumerate(batch):
        rig.next_offset += 1

        def ack(msg: Message) -> None:
            settled.append(msg)
            if len(settled) == len(batch):
                done.set()

        msgs.append(Message(source="fuzz", data=data, stream=f"s{i % 3}", offset=rig.next_offset, key=key,
                            headers={**headers, "run": run}, attributes={"offset": rig.next_offset},
                            on_settled=ack))

    async def deliver() -> None:
        for msg in msgs:  # one message per emit: each stream's lane gets them in order
            await rig.pipeline.emit([msg])
        await asyncio.wait_for(done.wait(), 60)

    rig.loop.run_until_complete(deliver())
    dead = rig.new_dead_letters()
    held = rig.history(run)
    by_offset = {m.offset: m for m in msgs}
    outcomes: dict[tuple[int, int], Counter[str]] = {(m.offset, r): Counter() for m in msgs for r in range(4)}
    for entry in dead:
        offset = int(entry["position"].rsplit("/", 1)[1])
        assert offset in by_offset, entry
        reason: str = entry["reason"]
        if reason.startswith("route "):
            outcomes[(offset, int(reason.split(":")[0].split()[1]))]["routing"] += 1
        else:
            outcomes[(offset, _route_of(entry["channel"], run))][f"sink {entry['channel']}"] += 1
    for channel, pub in held:
        offset = int(pub.tags["pos"])
        route = _route_of(channel, run)
        outcomes[(offset, route)][f"held {channel}"] += 1
        if route in (0, 1):  # data = "json" and "raw" send the message as it is
            assert pub.data == by_offset[offset].data, (channel, pub.data[:80])
        elif route == 2:
            json.loads(pub.data)  # a data template must render to JSON
    for (offset, route), seen in outcomes.items():
        msg = by_offset[offset]
        matched = route != 3 or msg.headers.get("x", "").startswith("y")
        if not matched:
            assert not seen, (route, seen)
            continue
        assert all(n == 1 for n in seen.values()), ("a channel got a message twice", offset, route, seen)
        if seen["routing"]:
            assert len(seen) == 1, ("rejected by routing and also delivered", offset, route, seen)
        else:
            assert len(seen) == CHANNELS_PER_ROUTE[route], ("lost", offset, route, msg, seen)
    rig.totals["messages"] += len(msgs)
    rig.totals["held"] += len(held)
    rig.totals["dead_letters"] += len(dead)
