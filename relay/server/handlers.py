"""Binds a servicer's methods to a GRPC server, reading the method list from the proto descriptor.

The generated `add_*_to_server` lets grpc parse requests, and a request that does not parse then
fails with UNKNOWN. Centrifugo (grpc-go) answers INTERNAL "grpc: error unmarshalling request",
so here the handler receives the raw bytes and parses them itself.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from types import ModuleType
from typing import Any

import grpc
from google.protobuf.message import DecodeError

Handler = Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[Any]]


def _parsing(method: Handler, parse: Callable[[bytes], Any], on_call: Callable[[], None]) -> Handler:
    async def handle(raw: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        try:
            request = parse(raw)
        except DecodeError as err:
            await context.abort(grpc.StatusCode.INTERNAL, f"grpc: error unmarshalling request: {err}")
        on_call()
        return await method(request, context)

    return handle


def _nothing() -> None:
    pass


def add_service(server: grpc.aio.Server, module: ModuleType, service_name: str, servicer: object,
                on_call: Callable[[], None] = _nothing) -> None:
    """Serve every method of `service_name` (declared in `module`, a *_pb2) by `servicer`.

    `on_call` runs as each call starts, in the call's own context (ServerState.new_call gives it
    a fresh budget).
    """
    service = module.DESCRIPTOR.services_by_name[service_name]
    handlers = {}
    for method in service.methods:
        request_cls = getattr(module, method.input_type.name)
        response_cls = getattr(module, method.output_type.name)
        handlers[method.name] = grpc.unary_unary_rpc_method_handler(
            _parsing(getattr(servicer, method.name), request_cls.FromString, on_call),
            response_serializer=response_cls.SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
