"""The API key check: every call must carry metadata `authorization: apikey <KEY>`.

As in Centrifugo, a call without it fails with GRPC status UNAUTHENTICATED "unauthenticated", and
methods the server does not have answer UNIMPLEMENTED whatever the key (the check guards handlers).
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import grpc


async def _deny(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, "unauthenticated")


if TYPE_CHECKING:
    _Interceptor = grpc.aio.ServerInterceptor[Any, Any]
else:  # generic only in the type stubs
    _Interceptor = grpc.aio.ServerInterceptor

# Takes the raw request bytes: a refused call is never parsed.
_DENY_HANDLER = grpc.unary_unary_rpc_method_handler(_deny)


class ApiKeyInterceptor(_Interceptor):
    """Refuses calls whose first `authorization` value is not exactly `apikey <KEY>`."""

    def __init__(self, key: str) -> None:
        self._expected = f"apikey {key}".encode()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        for key, value in handler_call_details.invocation_metadata or ():
            if key == "authorization":
                given = value.encode() if isinstance(value, str) else bytes(value)
                if hmac.compare_digest(given, self._expected):
                    return handler
                break
        return _DENY_HANDLER
