"""`type = "nats"`: a NATS JetStream stream read through a durable pull consumer, acked after delivery.

Every JetStream message becomes a `Message` with `stream` = the JetStream stream name, `offset` = its
stream sequence (so idempotency keys are (source, stream, sequence), the same across restarts and
relays), `headers` (first value of each), and the attributes `subject` and `offset` for routes.

Built on the source engine (relay/sources/engine.py): `NatsReader` connects, reads, and acks on
`commit()`. Delivery: messages are emitted in stream order. A message is acked only once it and
every message emitted before it are settled (published or dead-lettered): the engine's contiguous
commit positions say which; so the durable consumer's ack floor means "delivered up to here".
`max_ack_pending` is the cap on unsettled messages, on the server and in the engine, so memory
stays bounded. Messages that stay in flight longer than
`ack_wait` (a slow or absent sink) are redelivered by the server; a redelivery of a sequence this
relay still holds is dropped (the first delivery's ack settles it: the server takes an ack for a
sequence from any of its deliveries), so a long sink outage neither duplicates nor reorders.

After a crash, the messages the dead relay had in flight come back only once their `ack_wait`
expired, while newer ones are delivered at once. To keep stream order, a relay that finds the
durable with messages pending (`num_ack_pending` > 0) at connect holds everything it reads until
those redeliveries arrived, the ack floor passed them (another relay acked them), or twice
`ack_wait` went by (logged: order may then break); then it emits all of it in stream order.

`format = "centrifugo"`: records written for Centrifugo's own `nats_jetstream` consumer: a command
`{"method": ..., "payload": ...}`, a `centrifugo-method` header naming the method of the bare
payload, or publication data with `centrifugo-channels` and the other `centrifugo-*` headers
(relay/centrifugo_records.py, as for every source). A message that
cannot be understood carries `Message.error` and goes to the dead letter file, then is acked.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import ssl
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, Literal

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from pydantic import BaseModel, ConfigDict, Field, model_validator

from relay import events
from relay.centrifugo_records import parse_publication
from relay.message import Message
from relay.secrets import SecretError, load_secret
from relay.sources.engine import Batch, SourceUnavailable
from relay.units import Duration

log = logging.getLogger("relay.sources.nats")

# Template fields and `when` keys of its messages.
FIELDS = ("subject", "offset", "header.*", "json.*")

# How long one fetch waits for messages; also how soon `stop()` is noticed.
FETCH_WAIT = 0.5
# After a message arrived, how long a read waits for more to fill its batch: bigger emits make
# bigger sink batches (bench/nats_bench.py: about 20k → 27k messages/s into Centrifugo).
LINGER = 0.002
# How long connect() waits for the server before the engine's backoff takes over.
CONNECT_WAIT = 5.0
# How often the engine hands over settled positions, which are acked then (acks are cheap).
COMMIT_INTERVAL = 0.2
# How often consumer info is read (pending metric, the start-up order hold).
INFO_INTERVAL = 1.0


class TlsConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    ca_file: str = Field("", description="CA bundle (PEM) that signed the server's certificate; "
                                         "empty = the system's trust store.")
    cert_file: str = Field("", description="Client certificate (PEM), for servers that verify clients.")
    key_file: str = Field("", description="Private key (PEM) of the client certificate.")


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["nats"]
    url: str = Field("nats://127.0.0.1:4222", description="Server URL(s), comma-separated; tls:// for TLS.")
    token_env: str = Field("", description="Environment variable holding an auth token.")
    username: str = Field("", description="User name (with password_env or password_file).")
    password_env: str = Field("", description="Environment variable holding the password.")
    password_file: str = Field("", description="File holding the password.")
    credentials_file: str = Field("", description="NATS credentials file (JWT and NKey seed).")
    tls: TlsConfig | None = Field(None, description="TLS files; set (even empty) to connect with TLS.")
    stream: str = Field(min_length=1, description="The JetStream stream to read.")
    subjects: list[str] = Field(default_factory=list,
                                description="Subject filters of the consumer; empty = the whole stream.")
    durable: str = Field("centrifugo-relay", min_length=1,
                         description="Durable consumer name; relays with the same durable share its messages.")
    use_existing: bool = Field(False, description="Use the durable as it is and fail if it is missing, "
                                                  "instead of creating it.")
    deliver: Literal["all", "new"] = Field("all", description="Where a newly created durable starts: "
                                                              "all = the whole stream, new = new messages.")
    format: Literal["data", "centrifugo"] = Field(
        "data", description="data: the body is the publication data, routes decide the channels; "
                            "centrifugo: Centrifugo's own consumer format (method/payload JSON, the "
                            "centrifugo-method header, or centrifugo-* headers).")
    max_ack_pending: int = Field(5000, ge=1, description="Unacked messages the server hands this durable "
                                                         "at most (the in-flight cap), when created.")
    ack_wait: Duration = Field(30.0, description="Unacked messages are redelivered after this long, "
                                                 "when created.")
    fetch_batch: int = Field(500, ge=1, le=10_000, description="Messages asked for per pull request.")

    @model_validator(mode="after")
    def _consistent(self) -> Config:
        if not all(u.strip() for u in self.url.split(",")):
            raise ValueError("url has an empty entry")
        ways = [bool(self.token_env), bool(self.username), bool(self.credentials_file)]
        if sum(ways) > 1:
            raise ValueError("set at most one of token_env, username, credentials_file")
        if self.username and not (self.password_env or self.password_file):
            raise ValueError("username needs password_env or password_file (never a password in the file)")
        if (self.password_env or self.password_file) and not self.username:
            raise ValueError("password_env/password_file need username")
        if self.ack_wait <= 0:
            raise ValueError("ack_wait must be more than 0s")
        if self.tls is not None and bool(self.tls.cert_file) != bool(self.tls.key_file):
            raise ValueError("tls.cert_file and tls.key_file go together")
        return self


class NatsSourceError(RuntimeError):
    """The source cannot run: credentials refused, the stream or durable missing, a secret unset."""


def sequence(reply: str) -> int:
    """The stream sequence in a JetStream delivery's reply subject: `$JS.ACK.<stream>.<consumer>.
    <delivered>.<stream seq>.<consumer seq>.<time>.<pending>`, or the longer form with domain and
    account hash first (nats-py's `msg.metadata` parses all of it, three times slower)."""
    tokens = reply.split(".")
    return int(tokens[5] if len(tokens) == 9 else tokens[7])


class _Hold:
    """The start-up order hold: everything read waits, in a buffer, until the `owed` redeliveries
    of a previous reader's in-flight messages (sequences up to `last_delivered`) arrived; then the
    buffer is emitted in stream order. (A dead reader's messages come back in the order their
    ack_wait ran out, which after a hold of its own is not stream order.)"""

    def __init__(self, last_delivered: int, owed: int, ack_wait: float) -> None:
        self.last_delivered = last_delivered
        self.owed = owed
        self.deadline = time.monotonic() + 2 * ack_wait
        self.held: dict[int, Msg] = {}

    @property
    def active(self) -> bool:
        return self.owed > 0

    def add(self, seq: int, msg: Msg) -> None:
        if seq <= self.last_delivered and seq not in self.held:
            self.owed -= 1
        self.held[seq] = msg  # a second redelivery replaces the first: its ack is as good

    def release(self) -> list[tuple[int, Msg]]:
        self.owed = 0
        out = [(seq, self.held[seq]) for seq in sorted(self.held)]
        self.held = {}
        return out


class _Puller:
    """Pull requests kept in flight on one inbox, so the server streams while the relay works.

    nats-py's `fetch()` waits for each batch before asking for the next, which measured about 24k
    messages/s here; two requests in flight on a plain subscription measured about 170k/s. A request
    expires after FETCH_WAIT; the server answers an expired or cut-short one with a status message
    (408, 409) that says how many of its messages will not come."""

    def __init__(self, nc: Client, config: Config) -> None:
        self._nc = nc
        self._subject = f"$JS.API.CONSUMER.MSG.NEXT.{config.stream}.{config.durable}"
        self._batch = config.fetch_batch
        self._request = json.dumps({"batch": self._batch, "expires": int(FETCH_WAIT * 1e9)}).encode()
        self._inbox = nc.new_inbox()
        self._sub: Any = None
        self._received: list[Msg] = []
        self._arrived = asyncio.Event()
        self._owed = 0  # messages asked for and not yet delivered nor cancelled
        self._asked_at = 0.0

    async def start(self) -> None:
        self._sub = await self._nc.subscribe(self._inbox, cb=self._on_message, pending_msgs_limit=-1,
                                             pending_bytes_limit=-1)

    async def _on_message(self, msg: Msg) -> None:
        self._received.append(msg)
        self._arrived.set()

    async def next_batch(self) -> list[Msg]:
        """What arrived since the last call (waiting up to FETCH_WAIT for something), after asking
        for more while fewer than one batch is owed."""
        if time.monotonic() - self._asked_at > 2 * FETCH_WAIT + 1:
            self._owed = 0  # every request expired, even if its status message was lost (reconnect)
        if self._owed <= self._batch and self._nc.is_connected:
            await self._nc.publish(self._subject, self._request, reply=self._inbox)
            self._owed += self._batch
            self._asked_at = time.monotonic()
        wait = FETCH_WAIT
        while len(self._received) < self._batch:
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), wait)
            except TimeoutError:
                break
            wait = LINGER  # something came: gather more while it keeps coming, up to a batch
        self._arrived.clear()
        batch, self._received = self._received, []
        out = []
        for msg in batch:
            headers = msg.headers
            status = headers.get("Status") if headers else None
            if status is None:
                self._owed -= 1
                out.append(msg)
            elif status in ("408", "409"):  # expired or cut short: its remaining messages won't come
                self._owed -= int(headers.get("Nats-Pending-Messages", "0") or 0)  # type: ignore[union-attr]
        self._owed = max(self._owed, 0)
        return out

    def forget_requests(self) -> None:
        """After a reconnect: the server dropped the requests of the old connection."""
        self._owed = 0

    async def close(self) -> None:
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()


class NatsReader:
    """Reads one stream through a durable pull consumer (the engine's Reader; see the module
    docstring for the rules)."""

    def __init__(self, name: str, config: Config) -> None:
        self.name = name
        self.config = config
        # The engine's per-stream cap: the server's own, so neither waits on the other.
        self.max_in_flight = config.max_ack_pending
        self.commit_interval = COMMIT_INTERVAL
        self._nc: Client | None = None
        self._js: JetStreamContext | None = None
        self._puller: _Puller | None = None
        self._watcher: asyncio.Task[None] | None = None
        # Read and not yet acked, in stream order: sequence -> the delivery to ack.
        self._in_flight: OrderedDict[int, Msg] = OrderedDict()
        self._hold = _Hold(0, 0, config.ack_wait)
        self._refused = asyncio.Event()
        self._refusal = ""

    # -- the engine's Reader -----------------------------------------------------------------

    async def connect(self) -> None:
        self._refused.clear()
        try:
            nc, js = await asyncio.wait_for(self._connect(), CONNECT_WAIT)
        except TimeoutError:
            raise SourceUnavailable(f"{self.config.url} does not answer") from None
        self._nc, self._js = nc, js
        self._in_flight.clear()
        try:
            await self._bind(js)
        except (nats.errors.TimeoutError, nats.errors.NoRespondersError,
                nats.js.errors.ServiceUnavailableError) as err:  # JetStream not up yet (a restart)
            await nc.close()
            raise SourceUnavailable(f"JetStream at {self.config.url}: {err}") from None
        self._puller = _Puller(nc, self.config)
        await self._puller.start()
        self._watcher = asyncio.create_task(self._watch(), name=f"nats-{self.name}-info")

    async def read(self) -> list[Batch]:
        assert self._puller is not None
        if self._watcher is not None and self._watcher.done():
            self._watcher.result()  # a failed watcher fails the source
        messages = self._accept(await self._puller.next_batch())
        if not messages:
            return []
        return [Batch(self.config.stream, messages, end=messages[-1].offset + 1)]

    async def commit(self, positions: dict[str, int]) -> None:
        """Ack every message read before the position, in stream order, in one write."""
        position = positions.get(self.config.stream)
        nc = self._nc
        if position is None or nc is None or nc.is_closed:
            return
        acks = []
        while self._in_flight:
            seq = next(iter(self._in_flight))
            if seq >= position:
                break
            acks.append(self._in_flight.pop(seq).reply)
        if acks:
            # An ack is an empty PUB to the delivery's reply subject; nats-py's publish() per message
            # cost as much CPU as reading the message. A lost ack only means a redelivery the keys drop.
            await nc._send_command(b"".join(b"PUB %s 0\r\n\r\n" % reply.encode() for reply in acks))
            if nc._flush_queue is not None and nc._flush_queue.empty():
                await nc._flush_pending()  # as publish() does: wake the flusher unless it is due

    async def close(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            await asyncio.gather(self._watcher, return_exceptions=True)
            self._watcher = None
        if self._puller is not None:
            await self._puller.close()
            self._puller = None
        nc, self._nc = self._nc, None
        if nc is None:
            return
        with contextlib.suppress(Exception):
            await nc.flush(timeout=5)  # the acks already written
        with contextlib.suppress(Exception):
            await nc.close()

    # -- connecting --------------------------------------------------------------------------

    def _options(self) -> dict[str, Any]:
        cfg = self.config
        options: dict[str, Any] = {
            "servers": [u.strip() for u in cfg.url.split(",")], "name": f"centrifugo-relay {self.name}",
            "allow_reconnect": True, "max_reconnect_attempts": -1, "reconnect_time_wait": 0.5,
            "connect_timeout": 5,
        }
        try:
            if cfg.token_env:
                token = load_secret(cfg.token_env)
                if token is None:
                    raise NatsSourceError(f"nats source {self.name!r}: environment variable "
                                          f"{cfg.token_env} is empty or unset")
                options["token"] = token.reveal()
            if cfg.username:
                password = load_secret(cfg.password_env, cfg.password_file)
                if password is None:
                    where = cfg.password_env or cfg.password_file
                    raise NatsSourceError(f"nats source {self.name!r}: password {where} is empty or unset")
                options.update(user=cfg.username, password=password.reveal())
        except SecretError as err:
            raise NatsSourceError(f"nats source {self.name!r}: {err}") from None
        if cfg.credentials_file:
            if not Path(cfg.credentials_file).is_file():
                raise NatsSourceError(f"nats source {self.name!r}: credentials_file "
                                      f"{cfg.credentials_file} does not exist")
            options["user_credentials"] = cfg.credentials_file
        if cfg.tls is not None:
            context = ssl.create_default_context(cafile=cfg.tls.ca_file or None)
            if cfg.tls.cert_file:
                context.load_cert_chain(cfg.tls.cert_file, cfg.tls.key_file)
            options["tls"] = context
        return options

    async def _connect(self) -> tuple[Client, JetStreamContext]:
        """A connection; refused credentials and an untrusted certificate are fatal at once (the
        client would retry them for ever). The caller bounds the wait for an unreachable server."""
        attempt = asyncio.create_task(nats.connect(
            **self._options(), error_cb=self._on_error, disconnected_cb=self._on_disconnect,
            reconnected_cb=self._on_reconnect))
        refused = asyncio.create_task(self._refused.wait())
        try:
            await asyncio.wait({attempt, refused}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (attempt, refused):
                if not task.done():
                    task.cancel()
            with contextlib.suppress(BaseException):
                await refused
        if attempt.cancelled() or not attempt.done():
            with contextlib.suppress(BaseException):
                await attempt
            raise NatsSourceError(f"nats source {self.name!r}: {self._refusal}")
        try:
            nc = attempt.result()
        except ssl.SSLCertVerificationError as err:
            raise NatsSourceError(f"nats source {self.name!r}: the server's certificate is not trusted "
                                  f"({err.verify_message}); check tls.ca_file") from None
        except (nats.errors.Error, OSError, TimeoutError) as err:
            raise SourceUnavailable(f"{self.config.url}: {str(err) or type(err).__name__}") from None
        log.info("nats source %s: connected to %s", self.name, self.config.url)
        return nc, nc.jetstream()

    async def _on_error(self, err: Exception) -> None:
        text = str(err) or type(err).__name__
        if "authorization violation" in text.lower() or "authentication" in text.lower():
            self._refusal = (f"the server refused our credentials ({text.strip()}); check token_env, "
                             "username and password_env/password_file, or credentials_file")
            self._refused.set()
        elif isinstance(err, ssl.SSLCertVerificationError):
            self._refusal = (f"the server's certificate is not trusted ({err.verify_message}); "
                             "check tls.ca_file")
            self._refused.set()
        log.warning("nats source %s: %s", self.name, text)

    async def _on_disconnect(self) -> None:
        log.warning("nats source %s: disconnected; reconnecting", self.name)

    async def _on_reconnect(self) -> None:
        log.info("nats source %s: reconnected", self.name)
        if self._puller is not None:
            self._puller.forget_requests()

    async def _bind(self, js: JetStreamContext) -> None:
        """The durable consumer: created if missing and allowed; its state decides the start-up hold."""
        cfg = self.config
        try:
            info = await js.consumer_info(cfg.stream, cfg.durable)
        except nats.js.errors.NotFoundError as err:
            if cfg.use_existing or "stream" in str(err.description or "").lower():
                what = (f"stream {cfg.stream!r} does not exist" if "stream" in str(err.description or "").lower()
                        else f"durable {cfg.durable!r} does not exist in stream {cfg.stream!r} "
                             "(use_existing = true)")
                raise NatsSourceError(f"nats source {self.name!r}: {what}") from None
            info = await js.add_consumer(cfg.stream, self._consumer_config())
            log.info("nats source %s: created durable %s on stream %s", self.name, cfg.durable, cfg.stream)
        if info.num_ack_pending:
            self._hold = _Hold(info.delivered.stream_seq, info.num_ack_pending, info.config.ack_wait or 30.0)
            log.info("nats source %s: %d message(s) in flight by a previous reader; holding newer ones "
                     "until they are redelivered", self.name, info.num_ack_pending)

    def _consumer_config(self) -> ConsumerConfig:
        cfg = self.config
        subjects = list(cfg.subjects)
        return ConsumerConfig(
            durable_name=cfg.durable, ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL if cfg.deliver == "all" else DeliverPolicy.NEW,
            ack_wait=cfg.ack_wait, max_ack_pending=cfg.max_ack_pending, max_deliver=-1,
            filter_subject=subjects[0] if len(subjects) == 1 else None,
            filter_subjects=subjects if len(subjects) > 1 else None)

    # -- reading -----------------------------------------------------------------------------

    def _accept(self, batch: list[Msg]) -> list[Message]:
        """The messages to emit, in stream order: redeliveries of what is in flight dropped, and
        everything held while a previous reader's in-flight messages are owed."""
        hold = self._hold
        out: list[tuple[int, Msg]] = []
        for msg in batch:
            seq = sequence(msg.reply)
            if seq in self._in_flight:
                continue  # redelivered after ack_wait while still ours: the first delivery settles it
            if hold.active:
                hold.add(seq, msg)
            else:
                out.append((seq, msg))
        if hold.held and (not hold.active or time.monotonic() > hold.deadline):
            log.info("nats source %s: releasing %d held message(s): %s", self.name, len(hold.held),
                     "twice ack_wait passed, order may break" if hold.active else "the owed ones arrived")
            out = hold.release() + out
        elif hold.active and time.monotonic() > hold.deadline:
            hold.release()
        out.sort(key=lambda pair: pair[0])
        return [self._message(seq, msg) for seq, msg in out]

    def _message(self, seq: int, msg: Msg) -> Message:
        headers = dict(msg.headers) if msg.headers else {}
        attributes: dict[str, Any] = {"subject": msg.subject, "offset": seq}
        error, record = "", None
        if self.config.format == "centrifugo":
            try:
                record = parse_publication(msg.data, headers)
            except ValueError as err:
                error = str(err)
        self._in_flight[seq] = msg
        return Message(source=self.name, data=msg.data, stream=self.config.stream, offset=seq,
                       headers=headers, attributes=attributes, record=record, error=error)

    # -- acknowledging -----------------------------------------------------------------------

    async def _watch(self) -> None:
        """Consumer info every second: the pending metric, and the end of a start-up hold."""
        assert self._js is not None
        while True:
            await asyncio.sleep(INFO_INTERVAL)
            try:
                info = await self._js.consumer_info(self.config.stream, self.config.durable)
            except (nats.errors.Error, TimeoutError) as err:
                log.debug("nats source %s: consumer info failed: %s", self.name, err)
                continue
            events.NatsPendingMeasured(self.name, self.config.durable,
                                       info.num_pending or 0, info.num_ack_pending or 0).emit()
            if self._hold.active and info.ack_floor.stream_seq >= self._hold.last_delivered:
                self._hold.owed = 0  # another reader acked them: what is held goes out with the next read



def build(name: str, config: Config, state_dir: Path) -> NatsReader:
    return NatsReader(name, config)
