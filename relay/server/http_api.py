"""Centrifugo's HTTP server API: `POST /api/<method>` and the legacy `POST /api` (aiohttp).

The methods are the GRPC service's own operations (relay/server/service_v6.py) over the same
state: a JSON request is read into the protobuf request, the result written back as JSON, so both
APIs validate alike and answer the same codes. `bytes` fields (`data`, `info`...) are raw JSON
on this side, as in Centrifugo. Subscribe, Unsubscribe and Disconnect (the service's too) act on WebSocket clients.

Auth as Centrifugo's: `X-API-Key: KEY`, else `Authorization: apikey KEY`, else `?api_key=KEY`;
a missing or wrong key is 401 with an empty body. Errors are `{"error": {code, message}}` with
HTTP 200, or an HTTP status with `X-Centrifugo-Error-Mode: transport`.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from typing import Any

import orjson
from aiohttp import web
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from relay.server.client_protocol import ClientContext
from relay.server.errors import NOT_FOUND, ApiError
from relay.server.service_v6 import CentrifugoApiService

TRANSPORT_STATUS = {100: 500, 102: 404, 104: 404, 107: 400, 108: 400, 112: 416}
Operation = Callable[[dict[str, Any]], dict[str, Any]]


def raw_json(data: bytes | None) -> Any:
    """Bytes that are JSON, embedded as they are; other bytes as a JSON string (never a broken answer)."""
    if not data:
        return None
    try:
        orjson.loads(data)
    except orjson.JSONDecodeError:
        return data.decode("utf-8", "replace")
    return orjson.Fragment(data)


class BadJson(Exception):
    """The request body is not what the method takes: HTTP 400."""


def fill(message: Message, params: dict[str, Any]) -> Message:
    """Set a protobuf message's fields from a JSON object (unknown keys ignored, as Go's decoder does)."""
    if not isinstance(params, dict):
        raise BadJson("expected an object")
    fields = message.DESCRIPTOR.fields_by_name
    for name, value in params.items():
        fd = fields.get(name)
        if fd is None or value is None:
            continue
        try:
            _set(message, fd, value)
        except (TypeError, ValueError, AttributeError) as err:
            raise BadJson(f"{name}: {err}") from None
    return message


def _set(message: Message, fd: Any, value: Any) -> None:
    target = getattr(message, fd.name)
    if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
        target.update({str(k): str(v) for k, v in value.items()})
    elif fd.type == FieldDescriptor.TYPE_MESSAGE:
        if fd.is_repeated:
            for item in value:
                fill(target.add(), item)
        else:
            fill(target, value)
            target.SetInParent()
    elif fd.type == FieldDescriptor.TYPE_BYTES:
        setattr(message, fd.name, orjson.dumps(value))
    elif fd.is_repeated:
        target.extend(value)
    elif isinstance(value, bool) != (fd.type == FieldDescriptor.TYPE_BOOL):
        raise TypeError("wrong type")
    else:
        setattr(message, fd.name, value)


def to_json(message: Message) -> dict[str, Any]:
    """A protobuf message as Centrifugo's JSON (zero values left out, bytes as raw JSON)."""
    out: dict[str, Any] = {}
    for fd, value in message.ListFields():
        out[fd.name] = _value(fd, value)
    return out


def _value(fd: Any, value: Any) -> Any:
    if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
        inner = fd.message_type.fields_by_name["value"]
        return {k: _value(inner, v) for k, v in value.items()}
    if fd.is_repeated and not isinstance(value, Message):
        if fd.type == FieldDescriptor.TYPE_MESSAGE:
            return [to_json(v) for v in value]
        return list(value)
    if fd.type == FieldDescriptor.TYPE_MESSAGE:
        return to_json(value)
    if fd.type == FieldDescriptor.TYPE_BYTES:
        return raw_json(value)
    return value


class HttpApi:
    """The HTTP server API over the GRPC service's operations and the WebSocket clients."""

    def __init__(self, service: CentrifugoApiService, clients: ClientContext, api_key: str) -> None:
        self.clients = clients
        self._key = api_key.encode()
        self.methods: dict[str, Operation] = {}
        for name, (request_type, operation) in service.operations().items():
            self.methods[name] = self._protobuf_method(request_type, operation)
        self.methods["batch"] = self._batch

    @staticmethod
    def _protobuf_method(request_type: type[Message], operation: Callable[[Any], Message]) -> Operation:
        def run(params: dict[str, Any]) -> dict[str, Any]:
            return to_json(operation(fill(request_type(), params)))
        return run

    def add_routes(self, app: web.Application) -> None:
        app.router.add_post("/api", self.legacy)
        app.router.add_post("/api/{method}", self.method)

    def _authorized(self, request: web.Request) -> bool:
        if not self._key:
            return True
        given = request.headers.get("X-API-Key")
        if given is None:
            auth = request.headers.get("Authorization", "")
            given = auth[len("apikey "):] if auth.lower().startswith("apikey ") else None
        if given is None:
            given = request.query.get("api_key", "")
        return hmac.compare_digest(given.encode(), self._key)

    def call(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        """`{"result": ...}` or `{"error": ...}` for one method call; BadJson for a bad body."""
        operation = self.methods.get(method)
        if operation is None:
            return {"error": {"code": NOT_FOUND[0], "message": NOT_FOUND[1]}}
        try:
            return {"result": operation(params)}
        except ApiError as err:
            return {"error": {"code": err.code, "message": err.message}}

    async def method(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return web.Response(status=401)
        name = request.match_info["method"]
        if name not in self.methods:
            return web.Response(status=404, text="404 page not found\n")
        try:
            params = orjson.loads(await request.read() or b"{}")
            reply = self.call(name, params)
        except (orjson.JSONDecodeError, BadJson):
            return web.Response(status=400, text="Bad Request\n")
        if name == "batch" and "result" in reply:  # Centrifugo answers a batch unwrapped: {"replies": [...]}
            reply = reply["result"]
        error = reply.get("error")
        if error and request.headers.get("X-Centrifugo-Error-Mode", "") == "transport":
            return web.Response(status=TRANSPORT_STATUS.get(error["code"], 500), body=orjson.dumps(error),
                                content_type="application/json")
        return web.Response(body=orjson.dumps(reply), content_type="application/json")

    async def legacy(self, request: web.Request) -> web.Response:
        """`{"method": "publish", "params": {...}}` lines in, one reply line each out."""
        if not self._authorized(request):
            return web.Response(status=401)
        replies = []
        try:
            for line in (await request.read()).split(b"\n"):
                if not line.strip():
                    continue
                command = orjson.loads(line)
                if not isinstance(command, dict):
                    raise BadJson("expected an object")
                replies.append(orjson.dumps(self.call(str(command.get("method", "")), command.get("params") or {})))
        except (orjson.JSONDecodeError, BadJson):
            return web.Response(status=400, text="Bad Request\n")
        return web.Response(body=b"\n".join(replies), content_type="application/json")

    def _batch(self, params: dict[str, Any]) -> dict[str, Any]:
        replies = []
        for command in params.get("commands") or []:
            method = next((k for k, v in command.items() if v is not None), "") if isinstance(command, dict) else ""
            reply = self.call(method, command[method]) if method else {"error": {"code": 104, "message": "not found"}}
            replies.append({method: reply["result"]} if "result" in reply else reply)
        return {"replies": replies}
