"""`[sink]`: publishes to Centrifugo's GRPC server API (v3..v6 `CentrifugoApi`, or legacy v2).

A call to `deliver()` returns only when every publication was accepted or failed for a reason
that retrying cannot fix (those become dead letters). Transport failures and Centrifugo's
temporary errors are retried with exponential backoff and full jitter, forever unless
`retry.max_elapsed` says otherwise. Ordering is the caller's business: one `deliver()` at a time
per ordered lane, and inside a batch commands run in order (`parallel = false`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from tenacity import (AsyncRetrying, RetryCallState, RetryError, retry_if_exception_type, stop_after_delay,
                      stop_never, wait_random_exponential)

from relay import events
from relay.config import SinkSection
from relay.proto.centrifugo import api_pb2 as v6
from relay.proto.centrifugo import api_pb2_grpc as v6_grpc
from relay.proto.centrifugo_v2 import api_pb2 as v2
from relay.proto.centrifugo_v2 import api_pb2_grpc as v2_grpc
from relay.routing import Publication
from relay.secrets import Secret, SecretError, load_secret

log = logging.getLogger("relay.sink")

# Centrifugo's temporary errors: internal, not available, too many requests.
TEMPORARY_CODES = frozenset({100, 108, 111})
AUTH_STATUSES = frozenset({grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED})
# Centrifugo's transport error mode puts API errors into the GRPC status; map them back.
STATUS_TO_CODE = {grpc.StatusCode.NOT_FOUND: 102, grpc.StatusCode.INVALID_ARGUMENT: 107,
                  grpc.StatusCode.OUT_OF_RANGE: 112}
# Per-command overhead on the wire besides data, channels, tags and key (generous).
COMMAND_OVERHEAD = 64


@dataclass(slots=True, frozen=True)
class Failure:
    """A publication (or one channel of a broadcast) that Centrifugo will not take."""

    channel: str
    code: int
    message: str


class _Temporary(Exception):
    """Something worth retrying is still owed; `reason` becomes a metric label."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def channel_options() -> list[tuple[str, Any]]:
    # Reconnect fast after an outage (gRPC's default backoff grows to 2 minutes) and notice a
    # dead peer without waiting for the kernel.
    return [
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.min_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 2000),
        ("grpc.keepalive_time_ms", 20000),
        ("grpc.keepalive_timeout_ms", 10000),
        ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ]


def open_channel(address: str, tls: Any = None) -> grpc.aio.Channel:
    """An asyncio GRPC channel to `address`, with TLS when `tls.enabled` (SinkTls-like object)."""
    options = channel_options()
    if tls is None or not tls.enabled:
        return grpc.aio.insecure_channel(address, options=options)

    def read(path: str) -> bytes | None:
        return Path(path).read_bytes() if path else None

    creds = grpc.ssl_channel_credentials(
        root_certificates=read(tls.ca_file), private_key=read(tls.key_file),
        certificate_chain=read(tls.cert_file))
    if tls.server_name:
        options.append(("grpc.ssl_target_name_override", tls.server_name))
    return grpc.aio.secure_channel(address, creds, options=options)


def auth_metadata(api_key: Secret | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"apikey {api_key.reveal()}"),) if api_key else ()


class GrpcCentrifugoSink:
    def __init__(self, config: SinkSection) -> None:
        self.config = config
        self._api_key = load_secret(config.api_key_env, config.api_key_file)
        self._metadata = auth_metadata(self._api_key)
        self._channel: grpc.aio.Channel | None = None
        self._v6: v6_grpc.CentrifugoApiStub | None = None
        self._v2: v2_grpc.CentrifugoStub | None = None
        self.healthy = False
        self.last_error = ""
        self._auth_failing = False

    async def start(self) -> None:
        self._channel = open_channel(self.config.address, self.config.tls)
        self._v6 = v6_grpc.CentrifugoApiStub(self._channel)
        self._v2 = v2_grpc.CentrifugoStub(self._channel)

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None

    async def ping(self) -> bool:
        """One Info round trip; updates `healthy`."""
        assert self._v6 is not None and self._v2 is not None
        try:
            if self.config.api == "v6":
                await self._v6.Info(v6.InfoRequest(), metadata=self._metadata, timeout=self.config.timeout)
            else:
                await self._v2.Info(v2.InfoRequest(), metadata=self._metadata, timeout=self.config.timeout)
        except grpc.aio.AioRpcError as err:
            self._transport_failed(err)
            return False
        self._succeeded()
        return True

    # -- delivery ---------------------------------------------------------------------------

    async def deliver(self, pubs: list[Publication]) -> list[list[Failure]]:
        """Publish in order; returns, per publication, the channels that failed for good."""
        failures: list[list[Failure]] = [[] for _ in pubs]
        # What is still owed: publication index → channels not yet accepted.
        owed: dict[int, list[str]] = {}
        limit = self.config.max_message_bytes
        for i, pub in enumerate(pubs):
            if _size(pub, pub.channels) > limit:
                failures[i] = [Failure(c, 0, f"publication is larger than sink.max_message_bytes ({limit})")
                               for c in pub.channels]
            else:
                owed[i] = list(pub.channels)
        retry = self.config.retry
        retried: set[int] = set()  # publications already counted as retried

        def before_sleep(state: RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            first_time = owed.keys() - retried
            retried.update(first_time)
            events.SinkRetrying(exc.reason if isinstance(exc, _Temporary) else "unknown",
                                state.attempt_number, publications=len(first_time)).emit()

        retrying = AsyncRetrying(
            wait=wait_random_exponential(multiplier=retry.initial_backoff, max=retry.max_backoff),
            stop=stop_after_delay(retry.max_elapsed) if retry.max_elapsed > 0 else stop_never,
            retry=retry_if_exception_type(_Temporary),
            before_sleep=before_sleep,
            reraise=False,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    await self._attempt(pubs, owed, failures)
        except RetryError as err:
            last = err.last_attempt.exception()
            for i, channels in owed.items():
                failures[i].extend(Failure(c, 0, f"retries exhausted after {retry.max_elapsed:g}s: {last}")
                                   for c in channels)
        return failures

    async def _attempt(self, pubs: list[Publication], owed: dict[int, list[str]],
                       failures: list[list[Failure]]) -> None:
        """One pass over what is owed; raises _Temporary if anything is left to retry."""
        if self.config.api == "v6":
            await self._attempt_v6(pubs, owed, failures)
        else:
            await self._attempt_v2(pubs, owed, failures)
        if owed:
            raise _Temporary("temporary_error")

    def _transport_failed(self, err: grpc.aio.AioRpcError) -> _Temporary:
        code = err.code()
        self.healthy = False
        if code in AUTH_STATUSES:
            if not self._auth_failing:
                log.error("sink: Centrifugo at %s refused the API key (%s): not ready; messages are kept "
                          "and retried until the key is right", self.config.address, code.name)
            self._auth_failing = True
            self.last_error = f"authentication failed ({code.name})"
            self._reload_key()
            return _Temporary("unauthenticated")
        self.last_error = f"{code.name}: {err.details()}"
        return _Temporary(code.name.lower())

    def _reload_key(self) -> None:
        """A key file may have been rotated: read it again, so a fixed key needs no restart."""
        if not self.config.api_key_file:
            return
        try:
            key = load_secret(file=self.config.api_key_file)
        except SecretError as err:
            log.error("sink: %s", err)
            return
        if key != self._api_key:
            log.info("sink: API key file %s changed; using the new key", self.config.api_key_file)
            self._api_key = key
            self._metadata = auth_metadata(key)

    def _succeeded(self) -> None:
        if self._auth_failing:
            log.info("sink: Centrifugo accepts the API key again")
        self._auth_failing = False
        self.healthy = True
        self.last_error = ""

    async def _attempt_v6(self, pubs: list[Publication], owed: dict[int, list[str]],
                          failures: list[list[Failure]]) -> None:
        assert self._v6 is not None
        for chunk in self._chunks(pubs, owed):
            keyed = self.config.idempotency
            request = v6.BatchRequest(commands=[_command(pubs[i], owed[i], keyed) for i in chunk])
            try:
                response = await self._v6.Batch(request, metadata=self._metadata, timeout=self.config.timeout)
            except grpc.aio.AioRpcError as err:
                raise self._transport_failed(err) from None
            events.BatchSent().emit()
            self._succeeded()
            if len(response.replies) != len(chunk):
                raise _Temporary("short_batch_reply")
            for i, reply in zip(chunk, response.replies, strict=True):
                self._settle_reply(i, reply, owed, failures)

    @staticmethod
    def _settle_reply(i: int, reply: Any, owed: dict[int, list[str]], failures: list[list[Failure]]) -> None:
        channels = owed[i]
        if reply.HasField("error") and reply.error.code:
            if reply.error.code not in TEMPORARY_CODES:
                failures[i].extend(Failure(c, reply.error.code, reply.error.message) for c in channels)
                del owed[i]
            return
        if reply.HasField("broadcast"):
            still: list[str] = []
            for channel, resp in zip(channels, reply.broadcast.responses, strict=False):
                if resp.HasField("error") and resp.error.code:
                    if resp.error.code in TEMPORARY_CODES:
                        still.append(channel)
                    else:
                        failures[i].append(Failure(channel, resp.error.code, resp.error.message))
            if still:
                owed[i] = still
                return
        del owed[i]

    def _chunks(self, pubs: list[Publication], owed: dict[int, list[str]]) -> list[list[int]]:
        """Split what is owed into Batch requests that fit max_message_bytes, keeping order."""
        limit = self.config.max_message_bytes
        chunks: list[list[int]] = [[]]
        size = 0
        for i in sorted(owed):
            item = _size(pubs[i], owed[i])
            if chunks[-1] and size + item > limit:
                chunks.append([])
                size = 0
            chunks[-1].append(i)
            size += item
        return [c for c in chunks if c]

    async def _attempt_v2(self, pubs: list[Publication], owed: dict[int, list[str]],
                          failures: list[list[Failure]]) -> None:
        """Legacy API: no Batch, so one call per publication, in order."""
        assert self._v2 is not None
        for i in sorted(owed):
            pub, channels = pubs[i], owed[i]
            try:
                if len(channels) == 1:
                    resp: Any = await self._v2.Publish(v2.PublishRequest(channel=channels[0], data=pub.data),
                                                       metadata=self._metadata, timeout=self.config.timeout)
                else:
                    resp = await self._v2.Broadcast(v2.BroadcastRequest(channels=channels, data=pub.data),
                                                    metadata=self._metadata, timeout=self.config.timeout)
            except grpc.aio.AioRpcError as err:
                api_code = STATUS_TO_CODE.get(err.code())
                if api_code is None:
                    raise self._transport_failed(err) from None
                self._succeeded()  # transport error mode: an API answer, not a broken connection
                failures[i].extend(Failure(c, api_code, err.details() or "") for c in channels)
                del owed[i]
                continue
            self._succeeded()
            if resp.HasField("error") and resp.error.code:
                if resp.error.code in TEMPORARY_CODES:
                    continue
                failures[i].extend(Failure(c, resp.error.code, resp.error.message) for c in channels)
            del owed[i]


def _size(pub: Publication, channels: list[str]) -> int:
    tags = sum(len(k) + len(v) for k, v in pub.tags.items())
    return len(pub.data) + sum(len(c) for c in channels) + len(pub.idempotency_key) + tags + COMMAND_OVERHEAD


def _command(pub: Publication, channels: list[str], keyed: bool) -> v6.Command:
    fields: dict[str, Any] = {"data": pub.data}
    if keyed and pub.idempotency_key:
        fields["idempotency_key"] = pub.idempotency_key
    if pub.tags:
        fields["tags"] = pub.tags
    if pub.skip_history:
        fields["skip_history"] = True
    if pub.delta:
        fields["delta"] = True
    if pub.version:
        fields["version"] = pub.version
        fields["version_epoch"] = pub.version_epoch
    if len(channels) == 1:
        return v6.Command(publish=v6.PublishRequest(channel=channels[0], **fields))
    return v6.Command(broadcast=v6.BroadcastRequest(channels=channels, **fields))
