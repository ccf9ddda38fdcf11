"""The routing table: each message becomes zero or more publications, or a dead letter.

Routes are tried in order; the first that matches takes the message unless it says
`continue = true`. Nothing here knows where messages come from or how they are sent.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from fnmatch import translate
from types import MappingProxyType
from typing import Any

import orjson

from relay.centrifugo_records import CentrifugoRecord
from relay.channels import channel_problem
from relay.config import MAX_CHANNELS_PER_PUBLICATION, RouteConfig
from relay.message import Message
from relay.templates import Template, TemplateError

_MISSING = object()
# Channel names already found well-formed (a few thousand at most are kept): most messages go to
# channels seen before, and a set lookup costs a tenth of the check.
_GOOD_CHANNELS: set[str] = set()
GOOD_CHANNELS_MAX = 4096


def _channel_problem(channel: str) -> str | None:
    if channel in _GOOD_CHANNELS:
        return None
    problem = channel_problem(channel)
    if problem is None:
        if len(_GOOD_CHANNELS) >= GOOD_CHANNELS_MAX:
            _GOOD_CHANNELS.clear()
        _GOOD_CHANNELS.add(channel)
    return problem
# Tags of a native record's publication that has none: one shared, immutable mapping, not a dict each.
NO_TAGS: Mapping[str, str] = MappingProxyType({})
# The sink's default sink.max_message_bytes; the daemon passes the configured one.
DEFAULT_MAX_OUTPUT_BYTES = 4 * 1024 * 1024


@dataclass(slots=True, eq=False)
class Publication:
    """What the sink sends: one channel → Publish, several → one Broadcast."""

    channels: Sequence[str]
    data: bytes
    message: Message
    idempotency_key: str = ""
    tags: Mapping[str, str] = field(default_factory=dict)
    skip_history: bool = False
    delta: bool = False
    version: int = 0
    version_epoch: str = ""

    def to_channels(self, channels: Sequence[str]) -> Publication:
        """This publication to other channels (a part of a broadcast the lanes split)."""
        return Publication(channels, self.data, self.message, self.idempotency_key, self.tags, self.skip_history,
                           self.delta, self.version, self.version_epoch)


class PlainPublication(Publication):
    """A publication with no options (no tags, history kept, no delta or version): what most
    messages become. Made for every such message, it sets only its four fields (a third of the
    time of Publication's nine); the rest read as the defaults below, and the sink writes one to a
    single channel without looking at them."""

    __slots__ = ()
    tags = NO_TAGS
    skip_history = False
    delta = False
    version = 0
    version_epoch = ""

    def __init__(self, channels: Sequence[str], data: bytes, message: Message, idempotency_key: str) -> None:
        self.channels = channels
        self.data = data
        self.message = message
        self.idempotency_key = idempotency_key


@dataclass(slots=True, frozen=True)
class Rejection:
    """A message (or one of its publications) that goes to the dead letter file, and why."""

    message: Message
    reason: str
    channel: str = ""
    code: int = 0
    data: bytes | None = None
    # Every channel the line stands for, when it is more than `channel` alone.
    channels: tuple[str, ...] = ()


# `json.a.b` field names → their path, split once (the names are those of the config: few).
_JSON_PATHS: dict[str, list[str]] = {}


class _Fields:
    """Template values of one message; JSON is parsed at most once, and only if asked for."""

    __slots__ = ("_json", "message")

    def __init__(self, message: Message, parsed: Any = _MISSING) -> None:
        self.message = message
        self._json: Any = parsed  # the data's JSON when the caller parsed it already

    def json(self) -> Any:
        if self._json is _MISSING:
            try:
                self._json = orjson.loads(self.message.data)
            except (ValueError, RecursionError):
                self._json = None
        return self._json

    def get(self, name: str) -> str | None:
        path = _JSON_PATHS.get(name)
        if path is not None:  # {{ json.room }}: the path split once, a string found in one lookup
            doc = self.json()
            if len(path) == 1 and type(doc) is dict:
                value = doc.get(path[0])
                if type(value) is str:
                    return value
            return _json_path(doc, path)
        msg = self.message
        if name == "key":
            return msg.key
        if name == "source":
            return msg.source
        if name.startswith("header."):
            return msg.headers.get(name[7:])
        if name.startswith("json."):
            path = _JSON_PATHS[name] = name[5:].split(".")
            return _json_path(self.json(), path)
        value = msg.attributes.get(name)
        return None if value is None else str(value)


def _json_path(doc: Any, path: list[str]) -> str | None:
    for part in path:
        if isinstance(doc, dict) and part in doc:
            doc = doc[part]
        elif isinstance(doc, list) and part.isdigit() and int(part) < len(doc):
            doc = doc[int(part)]
        else:
            return None
    if doc is None or isinstance(doc, (dict, list)):
        try:
            return None if doc is None else orjson.dumps(doc).decode()
        except (TypeError, RecursionError):
            return None  # nested too deeply to write out: as good as missing
    if isinstance(doc, bool):
        return "true" if doc else "false"
    return str(doc)


class Route:
    """One compiled `[[routes]]` entry."""

    def __init__(self, index: int, config: RouteConfig,
                 max_output_bytes: int = DEFAULT_MAX_OUTPUT_BYTES) -> None:
        self.index = index
        self.max_output_bytes = max_output_bytes
        self.config = config
        self.source = config.source
        self.when = [(name, re.compile(translate(glob))) for name, glob in config.when.items()]
        targets = config.channels or [config.channel]
        self.channels = [Template.compile(t) for t in targets]
        self.data_mode = config.data if config.data in ("json", "wrap", "raw") else "template"
        self.data_template = Template.compile(config.data) if self.data_mode == "template" else None
        self.tags = {k: Template.compile(v) for k, v in config.tags.items()}
        self.continue_ = config.continue_
        # Constant channels were checked when the config was read, and need no rendering.
        self._check_channels = not all(t.is_constant for t in self.channels)
        self._constant_channels = None if self._check_channels else [t.source for t in self.channels]
        self._single = self.channels[0] if len(self.channels) == 1 else None
        # A channel template of one field, the key or a top-level JSON member: (before, member or
        # None for the key, after), filled in `quick` without a lookup.
        self._one_field: tuple[str, str | None, str] | None = None
        if self._single is not None and len(self._single.fields) == 1:
            name = self._single.fields[0]
            member = name[5:] if name.startswith("json.") and "." not in name[5:] else None
            if name == "key" or member is not None:
                self._one_field = (self._single.literals[0], member, self._single.literals[1])
        # The one field's values seen → their well-formed channel, as the one list every publication
        # to it shares (bounded like _GOOD_CHANNELS): no string, list or check made per message.
        self._channels_of: dict[str, list[str]] = {}
        self._key_suffix = f"#{index}"  # one message may feed several routes: one key each
        self._skip_history = config.skip_history

    def matches(self, fields: _Fields) -> bool:
        for name, pattern in self.when:
            value = fields.get(name)
            if value is None or not pattern.match(value):
                return False
        return True

    def build(self, fields: _Fields) -> Publication | Rejection:
        msg = fields.message
        try:
            lookup = fields.get
            constant = self._constant_channels
            if constant is not None:
                channels = list(constant)
            elif self._single is not None:  # the usual one template: no comprehension (a call each)
                channels = [self._single.render(lookup)]
            else:
                channels = [t.render(lookup) for t in self.channels]
            limit = self.max_output_bytes
            tags = {k: t.render(lookup, limit) for k, t in self.tags.items()} if self.tags else NO_TAGS
            data = self._data(fields)
        except TemplateError as err:
            return Rejection(msg, f"route {self.index}: {err}")
        except _BadData as err:
            return Rejection(msg, f"route {self.index}: {err}")
        if self._check_channels:
            for channel in channels:
                problem = _channel_problem(channel)
                if problem:
                    return Rejection(msg, f"route {self.index}: {problem}", channel=channel)
        return Publication(channels, data, msg, msg.position_key(self._key_suffix), tags, self._skip_history)

    def quick(self, msg: Message) -> Publication | None:
        """`build` in the usual case, for a route that is its source's only one, with no `when` and
        no tags (so it takes every message); None when anything is unusual, and `build` decides
        and words why. This runs for every message of such a source."""
        data = msg.data
        parsed: Any = _MISSING
        if self.data_mode == "json":
            try:
                parsed = orjson.loads(data)  # one parse: the data check and json.* fields
            except (ValueError, RecursionError):
                return None
        elif not data:  # raw: empty data is a dead letter
            return None
        # A constant route's list is shared by its publications: nothing changes channels in place.
        channels = self._constant_channels
        if channels is None:
            one = self._one_field
            if one is not None:
                before, member, after = one
                value = msg.key if member is None else parsed.get(member) if type(parsed) is dict else None
                if type(value) is not str:  # missing, or a JSON value written out: `build` decides
                    return None
                channels = self._channels_of.get(value) or self._good_channels(value, before + value + after)
                if channels is None:
                    return None
            else:
                try:
                    channel = self._single.render(_Fields(msg, parsed).get) if self._single is not None else None
                except TemplateError:
                    return None
                if channel is None or channel not in _GOOD_CHANNELS:  # checked (and remembered) by `build`
                    return None
                channels = [channel]
        if self._skip_history:
            return Publication(channels, data, msg, msg.position_key(self._key_suffix), NO_TAGS, True)
        return PlainPublication(channels, data, msg, msg.position_key(self._key_suffix))

    def _good_channels(self, value: str, channel: str) -> list[str] | None:
        """`[channel]`, remembered for the field's `value`, once `build` found the channel well-formed;
        None before (`build` checks it and says why when it is not)."""
        if channel not in _GOOD_CHANNELS:
            return None
        if len(self._channels_of) >= GOOD_CHANNELS_MAX:
            self._channels_of.clear()
        channels = self._channels_of[value] = [channel]
        return channels

    def _data(self, fields: _Fields) -> bytes:
        msg = fields.message
        if self.data_mode == "raw":
            if not msg.data:
                raise _BadData("data is empty")
            return msg.data
        if self.data_mode == "wrap":
            wrapped: dict[str, Any] = {"line": msg.data.decode("utf-8", "replace")}
            path = msg.attributes.get("file.path")
            if path is not None:
                wrapped["file"] = path
            return orjson.dumps(wrapped)
        if self.data_mode == "template":
            assert self.data_template is not None
            text = self.data_template.render(fields.get, self.max_output_bytes).encode()
            _require_json(text, "rendered data")
            return text
        if fields.json() is None and not _is_json_null(msg.data):
            _require_json(msg.data, "data")
        return msg.data


class _BadData(ValueError):
    pass


def _is_json_null(data: bytes) -> bool:
    return data.strip() == b"null"


def _require_json(data: bytes, what: str) -> None:
    """Valid JSON or _BadData. orjson is the fast check; the standard library has the last word on
    what orjson refuses but JSON allows (1e400, lone surrogate escapes) and words the error."""
    try:
        orjson.loads(data)
        return
    except ValueError:
        pass
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        raise _BadData(f"{what} is not UTF-8, so not JSON (use data = \"raw\" or \"wrap\")") from None
    try:
        json.loads(data, parse_constant=_no_constants)
    except RecursionError:
        raise _BadData(f"{what} is nested too deeply to be read as JSON") from None
    except ValueError as err:
        raise _BadData(f"{what} is not JSON ({err}); use data = \"raw\" or \"wrap\"") from None


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


class RoutingTable:
    """Ordered routes; `unmatched` says what happens to a message no route takes.

    A rendered data or tag template longer than `max_output_bytes` (the sink's largest request)
    is a dead letter; so is a rendered channel longer than Centrifugo's 255 bytes.
    """

    def __init__(self, routes: list[RouteConfig], unmatched: str = "drop",
                 max_output_bytes: int = DEFAULT_MAX_OUTPUT_BYTES) -> None:
        self.routes = [Route(i, r, max_output_bytes) for i, r in enumerate(routes)]
        self.unmatched = unmatched
        self._by_source: dict[str, list[Route]] = {}
        for route in self.routes:
            self._by_source.setdefault(route.source, []).append(route)
        # Sources with one route that takes every message as it is (Route.quick).
        self._quick = {source: routes[0] for source, routes in self._by_source.items()
                       if len(routes) == 1 and not routes[0].when and not routes[0].tags
                       and routes[0].data_mode in ("json", "raw")}

    def route(self, message: Message) -> tuple[list[Publication], list[Rejection]]:
        """The publications made from a message and the rejections (dead letters) it caused."""
        pubs: list[Publication] = []
        rejects: list[Rejection] = []
        self.route_into(message, pubs, rejects)
        return pubs, rejects

    def route_chunk(self, messages: list[Message], pubs: list[Publication], rejects: list[Rejection]) -> None:
        """`route_into` for each of a source's chunk of messages, the common Centrifugo record
        inline: this runs for every message, and a call each costs as much as the routing."""
        route_into = self.route_into
        append = pubs.append
        quick_routes = self._quick
        for message in messages:
            record = message.record
            if message.error:
                route_into(message, pubs, rejects)
            elif type(record) is tuple:  # a PlainRecord (route_into's first case, inline)
                channels, data = record  # type: ignore[misc]  # mypy does not narrow by `type() is`
                append(PlainPublication(channels, data, message, message.position_key("#c")))
            elif record is None and (quick := quick_routes.get(message.source)) is not None \
                    and (pub := quick.quick(message)) is not None:
                append(pub)
            else:
                route_into(message, pubs, rejects)

    def route_into(self, message: Message, pubs: list[Publication], rejects: list[Rejection]) -> None:
        """`route`, appending to the caller's lists: the pipeline routes a whole chunk into one pair."""
        if message.error:
            rejects.append(Rejection(message, message.error))
            return
        record = message.record
        if record is not None:
            if type(record) is tuple:  # a PlainRecord, the common one: nothing to check, no options
                channels, data = record  # type: ignore[misc]  # mypy does not narrow by `type() is`
                pubs.append(PlainPublication(channels, data, message, message.position_key("#c")))
            else:
                self._native(message, record, pubs, rejects)  # type: ignore[arg-type]
            return
        fields = _Fields(message)
        before = len(pubs), len(rejects)
        for route in self._by_source.get(message.source, ()):
            if route.when and not route.matches(fields):
                continue
            result = route.build(fields)
            (pubs if isinstance(result, Publication) else rejects).append(result)  # type: ignore[arg-type]
            if not route.continue_:
                break
        if before == (len(pubs), len(rejects)) and self.unmatched == "dead_letter":
            rejects.append(Rejection(message, "no route matched"))

    @staticmethod
    def _native(message: Message, record: CentrifugoRecord, pubs: list[Publication],
                rejects: list[Rejection]) -> None:
        """A record in Centrifugo's own consumer format names its own channels and options.

        This runs for every record of such a source: the common case (known channels, no options)
        costs a few lookups and one Publication."""
        if not record.is_publication:
            rejects.append(Rejection(message, f"Centrifugo method {record.method!r} is not supported "
                                              "(only publish and broadcast)"))
            return
        channels = record.channels
        if len(channels) > MAX_CHANNELS_PER_PUBLICATION:
            rejects.append(Rejection(message, f"record names {len(channels)} channels, more than the "
                                              f"{MAX_CHANNELS_PER_PUBLICATION} one publication may have"))
            return
        if not channels:
            rejects.append(Rejection(message, "record names no channel"))
            return
        for channel in channels:
            if channel not in _GOOD_CHANNELS:
                problem = _channel_problem(channel)
                if problem:
                    rejects.append(Rejection(message, problem, channel=channel))
                    return
        key = record.idempotency_key or message.position_key("#c")
        if record.tags or record.skip_history or record.delta or record.version:
            pubs.append(Publication(channels, record.data, message, key, record.tags, record.skip_history,
                                    record.delta, record.version, record.version_epoch))
        else:  # no options: the defaults, not ten fields copied
            pubs.append(PlainPublication(channels, record.data, message, key))
