"""The two encodings of the client protocol: JSON lines and varint-delimited protobuf.

A session works with plain dicts shaped like the protocol's messages (`{"id": 1, "subscribe":
{...}}`), whose `bytes` fields (`data`, `info`, `conn_info`, `chan_info`) hold raw bytes. An
encoding turns a frame from the client into such dicts and such dicts into the bytes of one
message; a transport joins messages into a frame (`JSON.join`).

- JSON: one compact object per line; `bytes` fields are embedded as the JSON they hold (data that
  is not JSON goes out as a string, so a frame never breaks). Text WebSocket frames.
- Protobuf (`?format=protobuf`): each message is a `Command` / `Reply` (protos/centrifuge_client/
  client.proto) prefixed with its length as a varint. Binary WebSocket frames.
"""

from __future__ import annotations

from typing import Any

import orjson
from google.protobuf.message import DecodeError, Message

from relay.proto.centrifuge_client import client_pb2


class BadFrame(Exception):
    """A frame that does not decode: the connection is closed with 3501."""


def _json_default(value: Any) -> Any:
    if isinstance(value, bytes | bytearray | memoryview):
        raw = bytes(value)
        try:
            orjson.loads(raw)
        except orjson.JSONDecodeError:
            return raw.decode("utf-8", "replace")
        return orjson.Fragment(raw)
    raise TypeError(f"cannot encode {type(value).__name__}")


class JsonEncoding:
    """Newline-separated JSON objects in text frames."""

    name = "json"
    binary = False
    separator = b"\n"
    ping = b"{}"

    def decode(self, frame: bytes | str) -> list[dict[str, Any]]:
        raw = frame.encode() if isinstance(frame, str) else frame
        if not raw.strip():
            raise BadFrame("empty frame")
        commands = []
        for line in raw.split(b"\n"):
            if not line.strip():
                continue
            try:
                command = orjson.loads(line)
            except orjson.JSONDecodeError:
                raise BadFrame("not JSON") from None
            if not isinstance(command, dict):
                raise BadFrame("not an object")
            commands.append(command)
        return commands

    def encode(self, message: dict[str, Any]) -> bytes:
        return orjson.dumps(message, default=_json_default)


def varint(value: int) -> bytes:
    """`value` as a protobuf base-128 varint (the length prefix of a frame, a field's tag)."""
    out = bytearray()
    while True:
        low = value & 0x7F
        value >>= 7
        if value:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise BadFrame("truncated length")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def fill(message: Message, values: dict[str, Any]) -> Message:
    """Set a protobuf message from a dict of the same shape (bytes fields take bytes)."""
    fields = message.DESCRIPTOR.fields_by_name
    for name, value in values.items():
        fd: Any = fields.get(name)
        if fd is None or value is None:
            continue
        target = getattr(message, name)
        if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
            inner = fd.message_type.fields_by_name["value"]
            for key, item in value.items():
                if inner.message_type is not None:
                    fill(target[key], item)
                else:
                    target[key] = item
        elif fd.message_type is not None:
            if fd.is_repeated:
                for item in value:
                    fill(target.add(), item)
            else:
                fill(target, value)
                target.SetInParent()
        elif fd.is_repeated:
            target.extend(value)
        else:
            setattr(message, name, value)
    return message


def to_dict(message: Message) -> dict[str, Any]:
    """The set fields of a protobuf message as a dict (bytes stay bytes)."""
    out: dict[str, Any] = {}
    for fd, value in message.ListFields():
        field: Any = fd
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            is_msg = field.message_type.fields_by_name["value"].message_type is not None
            out[field.name] = {k: to_dict(v) if is_msg else v for k, v in value.items()}
        elif field.message_type is not None:
            out[field.name] = [to_dict(v) for v in value] if field.is_repeated else to_dict(value)
        else:
            out[field.name] = list(value) if field.is_repeated else value
    return out


class ProtobufEncoding:
    """Varint-length-prefixed Command / Reply messages in binary frames."""

    name = "protobuf"
    binary = True
    separator = b""
    ping = b"\x00"  # an empty Reply

    def decode(self, frame: bytes | str) -> list[dict[str, Any]]:
        raw = frame.encode() if isinstance(frame, str) else frame
        if not raw:
            raise BadFrame("empty frame")
        commands = []
        pos = 0
        while pos < len(raw):
            size, pos = _read_varint(raw, pos)
            if pos + size > len(raw):
                raise BadFrame("truncated message")
            command = client_pb2.Command()
            try:
                command.ParseFromString(raw[pos:pos + size])
            except DecodeError:
                raise BadFrame("not a Command") from None
            pos += size
            commands.append(to_dict(command))
        return commands

    def encode(self, message: dict[str, Any]) -> bytes:
        body = fill(client_pb2.Reply(), message).SerializeToString()
        return varint(len(body)) + body


JSON = JsonEncoding()
PROTOBUF = ProtobufEncoding()
Encoding = JsonEncoding | ProtobufEncoding
