"""Connection and subscription JWTs, checked as Centrifugo checks them (HMAC secret, PyJWT).

A token that does not verify (bad signature, not a JWT, no secret configured) is `InvalidToken`:
the client is disconnected with 3500. An `exp` or `nbf` that fails is `TokenExpired`: error 109,
after which an SDK asks its application for a fresh token.
"""

from __future__ import annotations

import base64
import binascii
import time
from dataclasses import dataclass
from typing import Any

import jwt
import orjson

ALGORITHMS = ["HS256", "HS384", "HS512"]


class InvalidToken(Exception):
    """The token does not verify: disconnect 3500 "invalid token"."""


class TokenExpired(Exception):
    """`exp` passed or `nbf` not reached: error 109 "token expired"."""


@dataclass(frozen=True)
class Claims:
    """What the server uses of a token."""

    user: str
    expire_at: int  # unix seconds; 0 = never
    info: bytes | None
    channels: list[str]
    channel: str  # subscription tokens only


def _info(payload: dict[str, Any]) -> bytes | None:
    if payload.get("b64info"):
        try:
            return base64.b64decode(str(payload["b64info"]), validate=True)
        except (binascii.Error, ValueError):
            raise InvalidToken("b64info is not base64") from None
    if "info" in payload and payload["info"] is not None:
        return orjson.dumps(payload["info"])
    return None


class TokenVerifier:
    """Verifies HS256/384/512 tokens with one secret ("" = every token is invalid)."""

    def __init__(self, secret: str) -> None:
        self._secret = secret

    def verify(self, token: str) -> Claims:
        """The claims of a valid token; InvalidToken or TokenExpired otherwise."""
        if not self._secret:
            raise InvalidToken("no client token secret configured")
        try:
            payload = jwt.decode(token, self._secret, algorithms=ALGORITHMS,
                                 options={"verify_aud": False, "verify_iat": False, "verify_iss": False,
                                          "verify_sub": False})
        except (jwt.ExpiredSignatureError, jwt.ImmatureSignatureError):
            raise TokenExpired() from None
        except jwt.PyJWTError as err:
            raise InvalidToken(str(err)) from None
        if not isinstance(payload, dict):
            raise InvalidToken("claims are not an object")
        sub, channel = payload.get("sub", ""), payload.get("channel", "")
        channels = payload.get("channels") or []
        if not isinstance(sub, str) or not isinstance(channel, str) or not isinstance(channels, list) \
                or not all(isinstance(c, str) for c in channels):
            raise InvalidToken("malformed claims")
        expire_at = payload.get("expire_at", payload.get("exp", 0)) or 0
        if not isinstance(expire_at, int | float):
            raise InvalidToken("malformed expiry")
        return Claims(user=sub, expire_at=int(expire_at), info=_info(payload), channels=channels, channel=channel)


def ttl(expire_at: int) -> int:
    """Seconds until `expire_at` (at least 1), for a connect or subscribe result."""
    return max(1, expire_at - int(time.time()))
