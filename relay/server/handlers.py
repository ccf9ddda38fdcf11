"""Binds a servicer's methods to a GRPC server, reading the method list from the proto descriptor.

The generated `add_*_to_server` lets grpc parse requests, and a request that does not parse then
fails with UNKNOWN. Centrifugo (grpc-go) answers INTERNAL "grpc: error unmarshalling request",
so here the handler receives the raw bytes and parses them itself.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable
from contextlib import AbstractContextManager
from types import ModuleType
from typing import Any

import grpc
from google.protobuf.message import DecodeError

Handler = Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[Any]]


CallScope = Callable[[], AbstractContextManager[object]]


def _parsing(method: Handler, parse: Callable[[bytes], Any], scope: CallScope) -> Handler:
    async def handle(raw: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        try:
            request = parse(raw)
        except DecodeError as err:
            await context.abort(grpc.StatusCode.INTERNAL, f"grpc: error unmarshalling request: {err}")
        with scope():
            return await method(request, context)

    return handle


def add_service(server: grpc.aio.Server, module: ModuleType, service_name: str, servicer: object,
                scope: CallScope = contextlib.nullcontext) -> None:
    """Serve every method of `service_name` (declared in `module`, a *_pb2) by `servicer`.

    Each call runs inside `scope()` (ServerState.call: one budget for all the call does).
    """
    service = module.DESCRIPTOR.services_by_name[service_name]
    handlers = {}
    for method in service.methods:
        request_cls = getattr(module, method.input_type.name)
        response_cls = getattr(module, method.output_type.name)
        handlers[method.name] = grpc.unary_unary_rpc_method_handler(
            _parsing(getattr(servicer, method.name), request_cls.FromString, scope),
            response_serializer=response_cls.SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
