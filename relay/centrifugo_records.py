"""Centrifugo's consumer record forms, read into one typed value for every source.

Centrifugo's own consumers (Kafka, PostgreSQL outbox, Redis Streams, NATS JetStream, ...) accept
three forms (../shared/reference/centrifugo-consumers.md), and so does the relay:

1. a command: the body is `{"method": "publish", "payload": {...}}`, the payload being the server
   API request of that method (it may also be a JSON string: Debezium writes JSONB that way);
2. the method beside the body: a header or field (`centrifugo-method` by default) names it and the
   body is the bare request;
3. publication data: when the record has a `centrifugo-channels` header or field, the body is the
   data and `centrifugo-channels` (comma-separated: one channel is a publish, several a
   broadcast), `centrifugo-idempotency-key`, `centrifugo-delta`, `centrifugo-version`,
   `centrifugo-version-epoch` and `centrifugo-tag-<name>` carry the rest.

`parse_record` returns a `CentrifugoRecord` for every method Centrifugo's consumers accept;
`parse_publication` only for publish and broadcast (what the relay delivers today), with the reason
in a ValueError for anything else, which the source turns into a dead letter. `read_publication`,
what sources call, gives the common record (a publish to one channel, no options) as a PlainRecord.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, NamedTuple

import orjson

from relay.channels import channel_problem

PREFIX = "centrifugo-"
METHOD_FIELD = "centrifugo-method"
CHANNELS_FIELD = "centrifugo-channels"
PUBLICATION_METHODS = ("publish", "broadcast")
# Other server API methods Centrifugo's consumers dispatch (read methods and `batch` they refuse).
OTHER_METHODS = ("subscribe", "unsubscribe", "disconnect", "refresh", "history_remove",
                 "update_user_status", "invalidate_user_tokens", "revoke_token",
                 "send_push_notification", "update_push_status", "cancel_push",
                 "device_register", "device_update", "device_remove", "device_topic_update",
                 "user_topic_update")
METHODS = PUBLICATION_METHODS + OTHER_METHODS
_NOTHING: Mapping[str, Any] = MappingProxyType({})


class CentrifugoRecord(NamedTuple):
    """What one record asks Centrifugo to do.

    For publish and broadcast the publication fields are filled (`data` is the payload's `data`
    as written in the record, byte for byte as Centrifugo publishes it, or its `b64data` decoded);
    for other methods `payload` holds the request. Immutable like a frozen dataclass, and made for
    every record: a tuple is built in a third of the time."""

    method: str
    channels: tuple[str, ...] = ()
    data: bytes = b""
    idempotency_key: str = ""
    tags: Mapping[str, str] = _NOTHING
    skip_history: bool = False
    delta: bool = False
    version: int = 0
    version_epoch: str = ""
    payload: Mapping[str, Any] = _NOTHING

    @property
    def is_publication(self) -> bool:
        return self.method in PUBLICATION_METHODS


def read_publication(value: bytes, fields: Mapping[str, str]) -> tuple[PlainRecord | CentrifugoRecord | None, str]:
    """The publish or broadcast a record asks for, as a source puts it on its Message: (the record,
    a PlainRecord when it is the common one, "") or (None, why it is none)."""
    if not fields or (CHANNELS_FIELD not in fields and METHOD_FIELD not in fields):  # the body says it all
        plain = plain_publish(value)
        if plain is not None:
            return plain, ""
    try:
        return _full_publication(value, fields), ""
    except ValueError as err:
        return None, str(err)


def parse_publication(value: bytes, fields: Mapping[str, str], method_field: str = METHOD_FIELD) -> CentrifugoRecord:
    """The publish or broadcast a record asks for; ValueError says why it is none."""
    if CHANNELS_FIELD not in fields and method_field not in fields:  # the body says it all
        plain = plain_publish(value)
        if plain is not None:
            return full_record(plain)
    return _full_publication(value, fields, method_field)


def _full_publication(value: bytes, fields: Mapping[str, str], method_field: str = METHOD_FIELD) -> CentrifugoRecord:
    """`parse_publication` the full way (the common record's short way refused it, or does not apply)."""
    record = parse_record(value, fields, method_field)
    if not record.is_publication:
        raise ValueError(f"Centrifugo method {record.method!r} is not supported (only publish and broadcast)")
    return record


# The record most producers write: `{"method": "publish", "payload": {"channel": C, "data": D}}`,
# with a channel that needs no escapes; compact (checked first: it is the cheapest), or with the
# spaces json.dumps puts in. One match finds C and D (D is what lies between `"data":` and the
# closing braces; orjson then checks it is one JSON value, else the full way decides).
_WS = rb"[ \t\n\r]*"
_COMPACT_PUBLISH = re.compile(rb'\{"method":"publish","payload":\{"channel":"([^"\\\x00-\x1f]+)","data":'
                              rb"(.+)\}\}" + _WS + rb"\Z", re.S)
_SPACED_PUBLISH = re.compile(_WS + rb"\{" + _WS + rb'"method"' + _WS + b":" + _WS + rb'"publish"' + _WS + b"," + _WS
                             + rb'"payload"' + _WS + b":" + _WS + rb"\{" + _WS + rb'"channel"' + _WS + b":" + _WS
                             + rb'"([^"\\\x00-\x1f]+)"' + _WS + b"," + _WS + rb'"data"' + _WS + b":" + _WS
                             + rb"(.+)\}" + _WS + rb"\}" + _WS + rb"\Z", re.S)
_JSON_SPACE = b" \t\n\r"
_JSON_SPACE_BYTES = frozenset(_JSON_SPACE)


# The record most producers write, a publish of data to one well-formed channel with no options,
# read as the bare pair (channels, data): made for every such record, a pair costs a fifth of a
# CentrifugoRecord (a NamedTuple subclass: its __new__ copies). Routing tells it by its type, exactly
# `tuple`, and takes it as it is (its channel was checked when first seen); `full_record` gives the
# CentrifugoRecord it stands for.
PlainRecord = tuple[tuple[str], bytes]


def full_record(record: PlainRecord | CentrifugoRecord) -> CentrifugoRecord:
    """The CentrifugoRecord a record stands for (a PlainRecord's, or the record itself)."""
    if isinstance(record, CentrifugoRecord):
        return record
    channels, data = record
    return CentrifugoRecord("publish", channels, data)


# Channels of plain publishes as written → the checked channel tuple every record to it shares
# (bounded: a few thousand channels at most are kept); and by name, for `plain_record`.
_PLAIN_CHANNELS: dict[bytes, tuple[str]] = {}
_PLAIN_CHANNEL_NAMES: dict[str, tuple[str]] = {}
PLAIN_CHANNELS_MAX = 4096


def _checked_channels(channel: str) -> tuple[str] | None:
    """The shared channel tuple of a well-formed channel name; None when it is not (routing then
    says why)."""
    channels = _PLAIN_CHANNEL_NAMES.get(channel)
    if channels is None and channel_problem(channel) is None:
        if len(_PLAIN_CHANNEL_NAMES) >= PLAIN_CHANNELS_MAX:
            _PLAIN_CHANNEL_NAMES.clear()
        channels = _PLAIN_CHANNEL_NAMES[channel] = (channel,)
    return channels


def _plain_channels(raw: bytes) -> tuple[str] | None:
    """`_checked_channels` of a channel name as written, remembered by its bytes."""
    try:
        channels = _checked_channels(raw.decode())
    except UnicodeDecodeError:
        return None
    if channels is not None:
        if len(_PLAIN_CHANNELS) >= PLAIN_CHANNELS_MAX:
            _PLAIN_CHANNELS.clear()
        _PLAIN_CHANNELS[raw] = channels
    return channels


def plain_record(channel: str, data: bytes) -> PlainRecord | CentrifugoRecord:
    """A publish of `data` (known to be one JSON value) to `channel` with no options, for a source
    that found them itself (an outbox row's columns): a PlainRecord when the channel is well-formed,
    else a record routing checks, and dead-letters saying why."""
    channels = _checked_channels(channel)
    if channels is None:
        return CentrifugoRecord("publish", (channel,), data)
    return channels, data


def plain_publish(value: bytes) -> PlainRecord | None:
    """The common record read without building it; None for anything else, which takes the full
    way. This runs for every record."""
    match = _COMPACT_PUBLISH.match(value) or _SPACED_PUBLISH.match(value)
    if match is None:
        return None
    raw_channel, data = match.group(1, 2)
    if data[-1] in _JSON_SPACE_BYTES:
        data = data.rstrip(_JSON_SPACE)
    channels = _PLAIN_CHANNELS.get(raw_channel) or _plain_channels(raw_channel)
    if channels is None:
        return None
    try:
        orjson.loads(data)  # one JSON value, so the whole record is the common form
    except orjson.JSONDecodeError:
        return None  # or something orjson refuses and JSON allows: the full way decides
    return channels, data


def parse_record(value: bytes, fields: Mapping[str, str], method_field: str = METHOD_FIELD) -> CentrifugoRecord:
    """The command a record in any of Centrifugo's forms carries; ValueError says why it is not one.

    `fields` are the record's headers (Kafka, NATS) or fields (Redis; columns of an outbox row)."""
    try:
        return _parse(value, fields, method_field)
    except RecursionError:  # JSON nested deeper than Python's stack: a bad record, not a crash
        raise ValueError("Centrifugo command is nested too deeply") from None


def _parse(value: bytes, fields: Mapping[str, str], method_field: str) -> CentrifugoRecord:
    if CHANNELS_FIELD in fields:
        return _from_fields(value, fields)
    method = fields.get(method_field, "")
    try:
        doc = load_json(value)
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"Centrifugo command is not JSON: {err}") from None
    if method:
        return from_command(method, doc, value)
    if not isinstance(doc, dict):
        raise ValueError('Centrifugo command is not a {"method": ..., "payload": ...} object')
    payload = doc.get("payload")
    return from_command(str(doc.get("method") or ""), payload,
                        None if isinstance(payload, str) else raw_member(value, "payload"))


def from_command(method: str, payload: Any, raw: bytes | str | None = None) -> CentrifugoRecord:
    """A command given as its method and its payload (a JSON object, or JSON text of one); `raw`,
    the payload's JSON text when known, gives the data as written (else it is written compactly)."""
    if not method:
        raise ValueError("Centrifugo command has no method")
    if method not in METHODS:
        raise ValueError(f"Centrifugo method {method!r} is not supported (a consumer accepts "
                         f"{', '.join(METHODS)})")
    if isinstance(payload, (str, bytes)):
        raw = payload
        try:
            payload = load_json(payload)
        except (ValueError, UnicodeDecodeError) as err:
            raise ValueError(f"{method} payload string is not JSON: {err}") from None
    if not isinstance(payload, dict):
        raise ValueError(f"{method} payload is not a JSON object")
    if method not in PUBLICATION_METHODS:
        return CentrifugoRecord(method, payload=payload)
    return _publication(method, payload, raw)


def _publication(method: str, payload: dict[str, Any], raw: bytes | str | None) -> CentrifugoRecord:
    if len(payload) == 2 and method == "publish":  # the common {"channel", "data"}: nothing optional
        channel = payload.get("channel")
        if isinstance(channel, str) and channel and "data" in payload:
            return CentrifugoRecord(method, (channel,), _data(payload, raw))
    if method == "publish":
        channel = payload.get("channel")
        if not isinstance(channel, str) or not channel:
            raise ValueError("publish payload has no channel")
        channels: tuple[str, ...] = (channel,)
    else:
        listed = payload.get("channels")
        if not isinstance(listed, list) or not listed or not all(isinstance(c, str) for c in listed):
            raise ValueError("broadcast payload has no channels list")
        channels = tuple(listed)
    b64 = payload.get("b64data")
    if b64:
        try:
            data = base64.b64decode(str(b64), validate=True)
        except (binascii.Error, ValueError):
            raise ValueError(f"{method} payload b64data is not base64") from None
    elif "data" in payload:
        data = _data(payload, raw)
    else:
        raise ValueError(f"{method} payload has no data")
    tags = payload.get("tags")
    if tags and (not isinstance(tags, dict) or not all(isinstance(v, str) for v in tags.values())):
        raise ValueError(f"{method} payload tags must map names to strings")
    version = payload.get("version") or 0
    if not isinstance(version, int) or isinstance(version, bool) or version < 0:
        raise ValueError(f"{method} payload version must be an unsigned integer")
    return CentrifugoRecord(
        method, channels, data, idempotency_key=str(payload.get("idempotency_key") or ""),
        tags=dict(tags) if tags else _NOTHING,
        skip_history=bool(payload.get("skip_history", False)), delta=bool(payload.get("delta", False)),
        version=version, version_epoch=str(payload.get("version_epoch") or ""))


def _from_fields(value: bytes, fields: Mapping[str, str]) -> CentrifugoRecord:
    channels = tuple(c.strip() for c in fields.get(CHANNELS_FIELD, "").split(",") if c.strip())
    if not channels:
        raise ValueError(f"header {CHANNELS_FIELD} names no channel")
    delta = fields.get("centrifugo-delta", "")
    version = fields.get("centrifugo-version", "")
    if version and not version.isdigit():
        raise ValueError(f"header centrifugo-version: {version!r} is not an unsigned integer")
    tag_prefix = PREFIX + "tag-"
    return CentrifugoRecord(
        "publish" if len(channels) == 1 else "broadcast", channels, value,
        idempotency_key=fields.get("centrifugo-idempotency-key", ""),
        tags={k[len(tag_prefix):]: v for k, v in fields.items() if k.startswith(tag_prefix)},
        delta=_parse_bool("centrifugo-delta", delta) if delta else False,
        version=int(version) if version else 0, version_epoch=fields.get("centrifugo-version-epoch", ""))


_TRUE = {"1", "t", "T", "TRUE", "true", "True"}
_FALSE = {"0", "f", "F", "FALSE", "false", "False"}


def _parse_bool(name: str, value: str) -> bool:
    # Go's strconv.ParseBool, which Centrifugo uses for centrifugo-delta.
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"header {name}: {value!r} is not a boolean")


# orjson reads integers past 64 bits as floats; values with such digit runs go the exact, slow way.
_LONG_NUMBER = re.compile(rb"\d{19}")
_DIGITS = b"0123456789"


def load_json(value: bytes | str) -> Any:
    """JSON, fast where that is exact: orjson, else the standard library (big integers, 1e400,
    lone surrogate escapes, and the error messages)."""
    raw = value.encode() if isinstance(value, str) else value
    # Counting digits (one C pass, 0.2 µs) spares most records the regex (1.1 µs): no run of 19
    # digits without 19 digits.
    if len(raw) - len(raw.translate(None, _DIGITS)) < 19 or not _LONG_NUMBER.search(raw):
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError:
            pass
    return json.loads(raw, parse_float=_finite_float, parse_constant=_no_constant)


def _finite_float(text: str) -> float:
    number = float(text)
    if math.isinf(number):
        raise ValueError(f"number {text[:40]} is too large for JSON readers")
    return number


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _data(payload: dict[str, Any], raw: bytes | str | None) -> bytes:
    """The payload's data as written in `raw` (the payload's text), as Centrifugo publishes it;
    written compactly when the text is not known."""
    if raw is not None:
        written = raw_member(raw, "data")
        if written is not None:
            return written
    return _compact_json(payload["data"])


_SPACE = re.compile(r"[ \t\n\r]*")
_DECODER = json.JSONDecoder()


def raw_member(text: bytes | str, name: str) -> bytes | None:
    """The JSON text of member `name` of the object `text` (valid JSON), exactly as written; the
    last one if the name repeats (as decoders keep), None if it is not there. The standard library's
    scanner finds where each value ends (in C)."""
    if isinstance(text, bytes):
        try:
            text = text.decode()
        except UnicodeDecodeError:
            return None
    pos = _skip_space(text, 0)
    if text[pos:pos + 1] != "{":
        return None
    found: tuple[int, int] | None = None
    pos = _skip_space(text, pos + 1)
    try:
        while text[pos:pos + 1] == '"':
            key, pos = _DECODER.raw_decode(text, pos)
            pos = _skip_space(text, _skip_space(text, pos) + 1)  # past the colon
            _, end = _DECODER.raw_decode(text, pos)
            if key == name:
                found = (pos, end)
            pos = _skip_space(text, _skip_space(text, end) + 1)  # past the comma (or the brace)
    except (ValueError, RecursionError):
        return None
    return None if found is None else text[found[0]:found[1]].encode()


def _skip_space(text: str, pos: int) -> int:
    match = _SPACE.match(text, pos)
    assert match is not None  # it matches the empty string
    return match.end()


def _compact_json(value: Any) -> bytes:
    try:
        return orjson.dumps(value)
    except TypeError:  # an integer past 64 bits, read exactly by the standard library
        return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()
