"""Centrifugo's server API errors: codes, messages, and how they travel in the GRPC status.

By default an error is a value in the response (`error` field, GRPC status OK). In transport mode
(metadata `x-centrifugo-error-mode: transport`) it becomes the GRPC status, with the `Error`
message attached as a `google.rpc.Status` detail, exactly as Centrifugo does it.
"""

from __future__ import annotations

import grpc

from relay.server.client_encoding import varint

# (code, message) as Centrifugo's apiproto defines them.
INTERNAL = (100, "internal server error")
UNKNOWN_CHANNEL = (102, "unknown channel")
NOT_FOUND = (104, "not found")
BAD_REQUEST = (107, "bad request")
NOT_AVAILABLE = (108, "not available")
UNRECOVERABLE_POSITION = (112, "unrecoverable position")

ERROR_MODE_KEY = "x-centrifugo-error-mode"
STATUS_DETAILS_KEY = "grpc-status-details-bin"

_GRPC_CODES = {
    100: grpc.StatusCode.INTERNAL,
    102: grpc.StatusCode.NOT_FOUND,
    104: grpc.StatusCode.NOT_FOUND,
    107: grpc.StatusCode.INVALID_ARGUMENT,
    108: grpc.StatusCode.INVALID_ARGUMENT,
    112: grpc.StatusCode.OUT_OF_RANGE,
    113: grpc.StatusCode.ALREADY_EXISTS,
}


class ApiError(Exception):
    """An error answered to the client as Centrifugo's `Error{code, message}`."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


def grpc_code(code: int) -> grpc.StatusCode:
    """The GRPC status Centrifugo uses for an API error in transport mode (unmapped → INTERNAL)."""
    return _GRPC_CODES.get(code, grpc.StatusCode.INTERNAL)


def _bytes_field(number: int, payload: bytes) -> bytes:
    return varint(number << 3 | 2) + varint(len(payload)) + payload


def status_details(status: grpc.StatusCode, message: str, error_type: str, error_bytes: bytes) -> bytes:
    """A serialized `google.rpc.Status{code, message, details: [Any(error)]}`.

    Written by hand (three fields) so the server needs no googleapis-common-protos dependency.
    """
    code_value: int = status.value[0]
    any_message = _bytes_field(1, f"type.googleapis.com/{error_type}".encode()) + _bytes_field(2, error_bytes)
    out = b""
    if code_value:
        out += varint(1 << 3) + varint(code_value)
    if message:
        out += _bytes_field(2, message.encode())
    return out + _bytes_field(3, any_message)


def wants_transport_errors(metadata: object) -> bool:
    """Whether the call's metadata asks for transport error mode (first value wins, as in Go)."""
    for key, value in metadata or ():  # type: ignore[attr-defined]
        if key == ERROR_MODE_KEY:
            return bool(value == "transport")
    return False
