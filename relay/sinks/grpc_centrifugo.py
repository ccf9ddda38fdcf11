"""`[sink]`: publishes to Centrifugo's GRPC server API (v3..v6 `CentrifugoApi`, or legacy v2).

A call to `deliver()` returns only when every publication was accepted or failed for a reason
that retrying cannot fix (those become dead letters). Transport failures and Centrifugo's
temporary errors are retried with exponential backoff and full jitter, forever unless
`retry.max_elapsed` says otherwise. Ordering is the caller's business: one `deliver()` at a time
per ordered lane, and inside a batch commands run in order (`parallel = false`).
"""

from __future__ import annotations

import logging
import re
import time
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import grpc
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    RetryError,
    retry_if_exception_type,
    stop_after_delay,
    stop_never,
    wait_random_exponential,
)

from relay import events
from relay.config import SinkSection, SinkTls
from relay.proto.centrifugo import api_pb2 as v6
from relay.proto.centrifugo import api_pb2_grpc as v6_grpc
from relay.proto.centrifugo_v2 import api_pb2 as v2
from relay.proto.centrifugo_v2 import api_pb2_grpc as v2_grpc
from relay.routing import PlainPublication, Publication
from relay.secrets import Secret, SecretError, load_secret
from relay.sinks import Failure, Failures
from relay.tls import channel_credentials, diagnose

log = logging.getLogger("relay.sink")

# Centrifugo's temporary errors: internal, not available, too many requests.
TEMPORARY_CODES = frozenset({100, 108, 111})
AUTH_STATUSES = frozenset({grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED})
# Centrifugo's transport error mode puts API errors into the GRPC status; map them back.
STATUS_TO_CODE = {grpc.StatusCode.NOT_FOUND: 102, grpc.StatusCode.INVALID_ARGUMENT: 107,
                  grpc.StatusCode.OUT_OF_RANGE: 112}
BATCH_METHOD = "/centrifugal.centrifugo.api.CentrifugoApi/Batch"
# grpc-go: "received message larger than max (N vs. LIMIT)"; grpc core: "... larger than max (N vs. LIMIT)".
_TOO_LARGE = re.compile(r"larger than max \(\d+ vs\. (\d+)\)", re.IGNORECASE)
_TLS_WORDS = ("socket closed", "handshake", "ssl", "tsi_", "certificate", "hostname verification",
              "connection reset")
# A TLS problem is looked into again at most this often while it lasts.
TLS_DIAGNOSE_INTERVAL = 5.0


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


def open_channel(address: str, tls: SinkTls | None = None) -> grpc.aio.Channel:
    """An asyncio GRPC channel to `address`, with TLS when `tls.enabled`; raises TlsError when a
    TLS file is missing or wrong."""
    options = channel_options()
    if tls is None or not tls.enabled:
        return grpc.aio.insecure_channel(address, options=options)
    creds = channel_credentials(tls)
    if tls.server_name:
        options.append(("grpc.ssl_target_name_override", tls.server_name))
    return grpc.aio.secure_channel(address, creds, options=options)


def _too_large(err: grpc.aio.AioRpcError) -> int | None:
    """The server's limit when it refused a request for its size (0 if it did not say), else None."""
    if err.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
        return None
    match = _TOO_LARGE.search(err.details() or "")
    if match is None:
        return None
    return int(match.group(1))


def _tls_suspect(err: grpc.aio.AioRpcError) -> bool:
    """A connection failure that a TLS mismatch can cause (a refused port cannot)."""
    details = (err.details() or "").lower()
    return err.code() == grpc.StatusCode.UNAVAILABLE and any(word in details for word in _TLS_WORDS)


def auth_metadata(api_key: Secret | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"apikey {api_key.reveal()}"),) if api_key else ()


class GrpcCentrifugoSink:
    def __init__(self, config: SinkSection) -> None:
        """Raises SecretError (TlsError included) when the key or a TLS file cannot be used."""
        self.config = config
        if config.tls.enabled:
            channel_credentials(config.tls)  # a missing or wrong file fails now, not at the first call
        self._api_key = load_secret(config.api_key_env, config.api_key_file)
        # What the server accepts, once it refused a request for its size.
        self._limit = config.max_message_bytes
        self._tls_problem = ""
        self._tls_checked_at = -TLS_DIAGNOSE_INTERVAL
        self._metadata = auth_metadata(self._api_key)
        self._channel: grpc.aio.Channel | None = None
        self._v6: v6_grpc.CentrifugoApiStub | None = None
        self._v2: v2_grpc.CentrifugoStub | None = None
        self._batch_call: Any = None
        self.healthy = False
        self.last_error = ""
        self._auth_failing = False

    async def start(self) -> None:
        self._channel = open_channel(self.config.address, self.config.tls)
        self._v6 = v6_grpc.CentrifugoApiStub(self._channel)  # type: ignore[no-untyped-call]
        self._v2 = v2_grpc.CentrifugoStub(self._channel)  # type: ignore[no-untyped-call]
        # Batch sent as the bytes _Commands joined, and the reply left as bytes: accepted replies are
        # recognised without decoding.
        self._batch_call = self._channel.unary_unary(
            BATCH_METHOD, request_serializer=None, response_deserializer=None)

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close(grace=None)
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
            await self._failed(err)
            return False
        self._succeeded()
        return True

    # -- delivery ---------------------------------------------------------------------------

    async def deliver(self, pubs: list[Publication]) -> Failures:
        """Publish in order; returns the channels that failed for good, by publication index
        (an empty mapping when everything was accepted)."""
        failures: Failures = defaultdict(list)
        # Each publication as a command on the wire, encoded once; the sizes are exact.
        commands = _Commands(pubs, self.config.idempotency)
        # What is still owed: publication index → channels not yet accepted; made only once a batch
        # did not go through whole. The lists are never changed in place (a partly accepted
        # broadcast gets a new one).
        owed: dict[int, Sequence[str]] | None = None
        try:
            if self.config.api == "v6" and commands.total <= self._limit:
                # The usual batch: one request, every reply a plain publish result.
                raw = await self._call(commands.whole(), len(pubs))
                if _accepted_replies(raw) == len(pubs):
                    return failures
                owed = commands.all_owed()
                self._settle_replies(list(owed), raw, owed, failures)
                if owed:
                    raise _Temporary("temporary_error")
            else:
                owed = commands.all_owed()
                await self._attempt(commands, owed, failures)
        except _Temporary as first:
            # Retrying machinery costs about as much as the call itself, so only a batch that
            # failed once pays for it.
            await self._retry(commands, commands.all_owed() if owed is None else owed, failures, first)
        return failures

    async def _retry(self, commands: _Commands, owed: dict[int, Sequence[str]], failures: Failures,
                     first: _Temporary) -> None:
        """Retry what is owed after `first` failed the first attempt, until it is settled or
        `retry.max_elapsed` runs out (then it is failed for good)."""
        retry = self.config.retry
        retried: set[int] = set()  # publications already counted as retried
        known: list[_Temporary] = [first]

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
                    if known:  # the attempt already made: tenacity counts it as attempt 1
                        raise known.pop()
                    await self._attempt(commands, owed, failures)
        except RetryError as err:
            last = err.last_attempt.exception()
            for i, channels in owed.items():
                failures[i].extend(Failure(c, 0, f"retries exhausted after {retry.max_elapsed:g}s: {last}")
                                   for c in channels)

    async def _attempt(self, commands: _Commands, owed: dict[int, Sequence[str]], failures: Failures) -> None:
        """One pass over what is owed; raises _Temporary if anything is left to retry."""
        sizes = self._drop_oversized(commands.sizes(owed), owed, failures)
        if self.config.api == "v6":
            await self._attempt_v6(commands, sizes, owed, failures)
        else:
            await self._attempt_v2(commands.pubs, sizes, owed, failures)
        if owed:
            raise _Temporary("temporary_error")

    def _drop_oversized(self, sizes: dict[int, int], owed: dict[int, Sequence[str]],
                        failures: Failures) -> dict[int, int]:
        """What can never fit in a request goes to the dead letter file instead of blocking its lane;
        returns the sizes of the rest."""
        limit = self._limit
        if commands_total(sizes) <= limit:
            return sizes
        for i in [i for i in owed if sizes[i] > limit]:
            if limit < self.config.max_message_bytes:
                why = f"publication is larger than the {limit} bytes Centrifugo accepts"
            else:
                why = f"publication is larger than sink.max_message_bytes ({limit})"
            failures[i].extend(Failure(c, 0, why) for c in owed.pop(i))
        return {i: sizes[i] for i in owed}

    def _learn_limit(self, err: grpc.aio.AioRpcError, sent: int) -> _Temporary | None:
        """A request refused for its size: lower the limit below it (to what the server says, if
        it says) so the retry splits the batch, and a publication that cannot fit is dead-lettered."""
        server_max = _too_large(err)
        if server_max is None:
            return None
        limit = min(server_max or sent, sent) - 1
        if limit < self._limit:
            log.warning("sink: Centrifugo at %s refused a %d-byte request (its limit: %s); requests are "
                        "now kept under %d bytes (sink.max_message_bytes is %d)", self.config.address, sent,
                        server_max or "not given", limit, self.config.max_message_bytes)
            self._limit = limit
        return _Temporary("message_too_large")

    async def _failed(self, err: grpc.aio.AioRpcError) -> _Temporary:
        """A call failed in transport: note why, and if TLS may be the cause, find out in words."""
        temporary = self._transport_failed(err)
        if not _tls_suspect(err):
            return temporary
        now = time.monotonic()
        if now - self._tls_checked_at >= TLS_DIAGNOSE_INTERVAL:
            self._tls_checked_at = now
            problem = await diagnose(self.config.address, self.config.tls) or ""
            if problem and problem != self._tls_problem:
                log.error("sink: TLS with Centrifugo at %s fails: %s; not ready, retrying",
                          self.config.address, problem)
            self._tls_problem = problem
        if self._tls_problem:
            self.last_error = f"TLS: {self._tls_problem} ({err.code().name})"
        return temporary

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
        if self._tls_problem:
            log.info("sink: TLS with Centrifugo at %s works now", self.config.address)
            self._tls_problem = ""
            self._tls_checked_at = -TLS_DIAGNOSE_INTERVAL
        self._auth_failing = False
        self.healthy = True
        self.last_error = ""

    async def _attempt_v6(self, commands: _Commands, sizes: dict[int, int], owed: dict[int, Sequence[str]],
                          failures: Failures) -> None:
        for chunk in self._chunks(sizes, owed):
            raw = await self._call(commands.request(chunk, owed), len(chunk))
            if _accepted_replies(raw) == len(chunk):
                if len(chunk) == len(owed):
                    owed.clear()
                else:
                    for i in chunk:
                        del owed[i]
                continue
            self._settle_replies(chunk, raw, owed, failures)

    async def _call(self, request: bytes, size: int) -> bytes:
        """One Batch call of `size` commands; its reply as bytes, or _Temporary."""
        try:
            raw: bytes = await self._batch_call(request, metadata=self._metadata, timeout=self.config.timeout)
        except grpc.aio.AioRpcError as err:
            too_large = self._learn_limit(err, len(request))
            raise too_large or await self._failed(err) from None
        events.BatchSent(size).emit()
        self._succeeded()
        return raw

    def _settle_replies(self, chunk: list[int], raw: bytes, owed: dict[int, Sequence[str]],
                        failures: Failures) -> None:
        """Take what the replies to the commands `chunk` say off `owed` (decoded: not all plain)."""
        response = v6.BatchResponse.FromString(raw)
        if len(response.replies) != len(chunk):
            raise _Temporary("short_batch_reply")
        for i, reply in zip(chunk, response.replies, strict=True):
            if reply.HasField("error") or reply.HasField("broadcast"):
                self._settle_reply(i, reply, owed, failures)
            else:
                del owed[i]  # the common case, accepted: kept inline, it runs per publication

    @staticmethod
    def _settle_reply(i: int, reply: Any, owed: dict[int, Sequence[str]], failures: Failures) -> None:
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

    def _chunks(self, sizes: dict[int, int], owed: dict[int, Sequence[str]]) -> list[list[int]]:
        """Split what is owed into Batch requests that fit max_message_bytes, keeping order."""
        limit = self._limit
        # `owed` keeps its keys in order: they were added in order and are only ever removed.
        if commands_total(sizes) <= limit:
            return [list(owed)]
        chunks: list[list[int]] = [[]]
        size = 0
        for i in owed:
            item = sizes[i]
            if chunks[-1] and size + item > limit:
                chunks.append([])
                size = 0
            chunks[-1].append(i)
            size += item
        return [c for c in chunks if c]

    async def _attempt_v2(self, pubs: list[Publication], sizes: dict[int, int], owed: dict[int, Sequence[str]],
                          failures: Failures) -> None:
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
                too_large = self._learn_limit(err, sizes[i])
                if too_large is not None:
                    raise too_large from None
                api_code = STATUS_TO_CODE.get(err.code())
                if api_code is None:
                    raise await self._failed(err) from None
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


def _accepted_replies(raw: bytes) -> int:
    """How many replies a BatchResponse holds when every one of them is a plain publish result
    (the common case), read from the bytes; -1 as soon as one is anything else (an error, a
    broadcast result, a long reply) and protobuf must decode them.

    Each reply is then `0a LEN 22 LEN-2 <PublishResult>` (BatchResponse.replies = 1, Reply.publish
    = 4) with one-byte lengths; checking those bytes costs half of decoding and HasField."""
    if len(raw) > 3 and 2 <= raw[1] < 0x80:
        # Replies of one size (usual: offsets of the same varint length, epochs of one length) are
        # checked in C, every fourth byte of each kind by one extended slice, not one at a time.
        size = raw[1] + 2
        count, rest = divmod(len(raw), size)
        if not rest and raw[0::size].count(0x0A) == count and raw[1::size].count(size - 2) == count \
                and raw[2::size].count(0x22) == count and raw[3::size].count(size - 4) == count:
            return count
    return _walk_replies(raw)


def _walk_replies(raw: bytes) -> int:
    """`_accepted_replies` reply by reply, whatever their sizes."""
    pos, end, count = 0, len(raw), 0
    while pos < end:
        length = raw[pos + 1] if pos + 1 < end else 128
        if raw[pos] != 0x0A or length >= 128 or pos + 3 >= end or raw[pos + 2] != 0x22 or raw[pos + 3] != length - 2:
            return -1
        pos += 2 + length
        count += 1
    return count if pos == end else -1


def commands_total(sizes: dict[int, int]) -> int:
    """The size of a Batch request holding these commands."""
    return sum(sizes.values())


class _Commands:
    """The publications of one deliver() as Batch commands on the wire, each encoded once.

    A request is its commands' bytes joined (BatchRequest.commands is field 1, and `parallel` is
    left false), so sizes are exact and splitting a batch costs no re-encoding. A broadcast that
    was partly accepted is encoded again for the channels still owed."""

    __slots__ = ("_again", "_broadcasts", "_first", "keyed", "pubs", "total")

    def __init__(self, pubs: list[Publication], keyed: bool) -> None:
        self.pubs = pubs
        self.keyed = keyed
        self._first, self._broadcasts = _encode_all(pubs, keyed)
        self.total = sum(map(len, self._first))  # the size of the request of them all
        self._again: dict[int, tuple[Sequence[str], bytes]] = {}  # for the channels of a partial broadcast

    def all_owed(self) -> dict[int, Sequence[str]]:
        """Every publication with all its channels: what is owed before the first call."""
        return dict(enumerate(pub.channels for pub in self.pubs))

    def whole(self) -> bytes:
        """The request of every command, as first encoded."""
        return b"".join(self._first)

    def encoded(self, i: int, channels: Sequence[str]) -> bytes:
        if channels is self.pubs[i].channels:
            return self._first[i]
        again = self._again.get(i)
        if again is None or again[0] is not channels:
            again = self._again[i] = (channels, encode_command(self.pubs[i], channels, self.keyed))
        return again[1]

    def _all_as_first(self, owed: dict[int, Sequence[str]]) -> bool:
        """Whether `owed` is every publication with all its channels (the first attempt). Only a
        partly accepted broadcast gets other channels: without broadcasts the count tells."""
        pubs = self.pubs
        if len(owed) != len(pubs):
            return False
        return not self._broadcasts or all(channels is pubs[i].channels for i, channels in owed.items())

    def sizes(self, owed: dict[int, Sequence[str]]) -> dict[int, int]:
        if self._all_as_first(owed):
            return dict(enumerate(map(len, self._first)))
        return {i: len(self.encoded(i, channels)) for i, channels in owed.items()}

    def request(self, chunk: list[int], owed: dict[int, Sequence[str]]) -> bytes:
        if len(chunk) == len(self._first) and self._all_as_first(owed):
            return b"".join(self._first)
        return b"".join([self.encoded(i, owed[i]) for i in chunk])


# Protobuf varints of the lengths below 16384 (one or two bytes), looked up rather than computed.
_VARINTS = [bytes([n]) if n < 0x80 else bytes([n & 0x7F | 0x80, n >> 7]) for n in range(1 << 14)]
# PublishRequest.channel (field 1) encoded, for the channels seen most (bounded like routing's).
_CHANNEL_FIELDS: dict[str, bytes] = {}
CHANNEL_FIELDS_MAX = 4096


def _varint(n: int) -> bytes:
    if n < 1 << 14:
        return _VARINTS[n]
    out = bytearray()
    while n >= 0x80:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _channel_field(channel: str) -> bytes:
    field = _CHANNEL_FIELDS.get(channel)
    if field is None:
        raw = channel.encode()
        field = b"\n" + _varint(len(raw)) + raw
        if len(_CHANNEL_FIELDS) >= CHANNEL_FIELDS_MAX:
            _CHANNEL_FIELDS.clear()
        _CHANNEL_FIELDS[channel] = field
    return field


def _encode_all(pubs: list[Publication], keyed: bool) -> tuple[list[bytes], bool]:
    """Every publication as a command (`encode_command`), and whether any is a broadcast.

    The usual publication (one channel, data and a key, nothing else) is written here, in one loop:
    this runs for every publication, and a call per publication costs as much as the writing."""
    encoded: list[bytes] = []
    append = encoded.append
    join = b"".join  # a tenth cheaper than bytes % (...) for these eleven pieces
    varints, channel_fields = _VARINTS, _CHANNEL_FIELDS
    broadcasts = False
    for pub in pubs:
        channels = pub.channels
        if type(pub) is PlainPublication and keyed and len(channels) == 1:
            data = pub.data
            key = pub.idempotency_key.encode()
            channel = channel_fields.get(channels[0]) or _channel_field(channels[0])
            size = len(channel) + len(data) + len(key) + 4 + (len(data) >= 0x80)
            if data and key and size < (1 << 14) - 4 and len(key) < 0x80:  # then every length is in the table
                length = varints[size]
                append(join((b"\n", varints[1 + len(length) + size], b'"', length, channel,
                             b"\x12", varints[len(data)], data, b"2", varints[len(key)], key)))
                continue
        broadcasts = broadcasts or len(channels) > 1
        append(encode_command(pub, channels, keyed))
    return encoded, broadcasts


def encode_command(pub: Publication, channels: Sequence[str], keyed: bool) -> bytes:
    """One entry of BatchRequest.commands (tag, length, Command) publishing `pub` to `channels`.

    A publish with a channel, data and maybe an idempotency key (nothing else) is written directly:
    the bytes upb writes (tests/test_sink_encoding.py checks it) at half its cost. The usual one of
    those is written by `_encode_all` in its loop; anything else is built by upb."""
    if len(channels) == 1 and not (pub.tags or pub.skip_history or pub.delta or pub.version):
        # PublishRequest: channel (1), data (2, tag 0x12), idempotency_key (6, tag 0x32), inside
        # Command.publish = 4 (tag 0x22) inside BatchRequest.commands = 1 (tag 0x0a).
        channel = _CHANNEL_FIELDS.get(channels[0]) or _channel_field(channels[0])
        data = pub.data
        key = pub.idempotency_key.encode() if keyed else b""
        parts = [channel]
        if data:
            parts += (b"\x12", _varint(len(data)), data)
        if key:
            parts += (b"2", _varint(len(key)), key)
        publish = b"".join(parts)
        length = _varint(len(publish))
        return b"".join((b"\n", _varint(1 + len(length) + len(publish)), b'"', length, publish))
    command = _command(pub, channels, keyed).SerializeToString()
    return b"\n" + _varint(len(command)) + command


def _command(pub: Publication, channels: Sequence[str], keyed: bool) -> v6.Command:
    """A Command built by protobuf: fields set in place (constructor arguments would copy)."""
    command = v6.Command()
    if len(channels) == 1:
        target: Any = command.publish
        target.channel = channels[0]
    else:
        target = command.broadcast
        target.channels.extend(channels)
    target.data = pub.data
    if keyed and pub.idempotency_key:
        target.idempotency_key = pub.idempotency_key
    if pub.tags:
        target.tags.update(pub.tags)
    if pub.skip_history:
        target.skip_history = True
    if pub.delta:
        target.delta = True
    if pub.version:
        target.version = pub.version
        target.version_epoch = pub.version_epoch
    return command
