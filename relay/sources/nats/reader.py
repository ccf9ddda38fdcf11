"""The NATS source's reader: a JetStream stream read through a durable pull consumer, acked after delivery.

Every JetStream message becomes a `Message` with `stream` = the JetStream stream name, `offset` = its
stream sequence (so idempotency keys are (source, stream, sequence), the same across restarts and
relays), `headers` (first value of each), and the attributes `subject` and `offset` for routes.

Built on the source engine (relay/sources/engine.py): `NatsReader` connects, reads, and acks on
`commit()`. Delivery: messages are emitted in stream order. A message is acked only once it and
every message emitted before it are settled (published or dead-lettered): the engine's contiguous
commit positions say which; so the durable consumer's ack floor means "delivered up to here".
A durable with ack_policy all (the relay makes its own so) gets one ack per commit, the highest
settled sequence below everything still in flight, and a reader that sees another client take
deliveries of it stops (its acks would settle that client's messages); explicit: one per message.
`max_ack_pending` is the cap on unsettled messages, on the server and (one more, so that it never
pauses reading first) in the engine, so memory stays bounded; a small one is acked more often
(`commit_interval()`). Messages that stay in flight longer than
`ack_wait` (a slow or absent sink) are redelivered by the server; a redelivery of a sequence this
relay still holds is dropped (the first delivery's ack settles it: the server takes an ack for a
sequence from any of its deliveries), so a long sink outage neither duplicates nor reorders.

Deliveries and acks use the pull connection (wire.py); nats-py's connection does the rest. Acks of
one commit go in one write; while the pull connection is down they wait and go after the reconnect.
A delivery of a sequence this reader acked lately (the ack was lost with the connection, or
nats-server died before storing it) is acked again and not emitted: emitted again, it would sit at
a position the engine already committed.

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
import uuid
from bisect import bisect_left
from collections import deque
from itertools import islice
from operator import itemgetter, lt
from pathlib import Path
from typing import Any

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from relay import events
from relay.centrifugo_records import read_publication
from relay.message import NOTHING, Message
from relay.secrets import SecretError, load_secret
from relay.sources.engine import Batch, SourceUnavailable
from relay.sources.nats.config import Config
from relay.sources.nats.wire import Auth, Delivery, PullWire, WireError, headers, status

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
# How often the engine hands over settled positions, which are acked then (acks are cheap). The
# server hands out at most max_ack_pending unacked messages, so this bounds the rate: 5000 per 0.2 s
# was bench/nats_bench.py's ceiling of 25k messages/s.
COMMIT_INTERVAL = 0.05
# A durable with a small max_ack_pending (Centrifugo's own consumer makes them with 100) is acked
# more often, so that its window allows about WINDOW_RATE messages/s, but not more often than this.
MIN_COMMIT_INTERVAL = 0.002
WINDOW_RATE = 100_000
# Pull requests of fetch_batch messages kept in flight.
REQUESTS = 2
# How many acked sequences are remembered, in units of max_ack_pending (the most the server can
# have unacked, so the most lost acks it can send back).
ACKED_MEMORY = 4
# After the pull connection is lost, how long a read waits before connecting again: by then the
# lost connection's pull requests expired, so what the server sent to them is all counted.
RECONNECT_WAIT = FETCH_WAIT + 0.1
# How often consumer info is read (pending metric, the start-up order hold).
INFO_INTERVAL = 1.0


def commit_interval(max_ack_pending: int) -> float:
    """How often settled positions are acked for a durable with this max_ack_pending: the server
    sends no more unacked messages than that, so acking every COMMIT_INTERVAL would cap a window of
    100 at 2,000 messages/s."""
    return min(COMMIT_INTERVAL, max(MIN_COMMIT_INTERVAL, max_ack_pending / WINDOW_RATE))


class NatsSourceError(RuntimeError):
    """The source cannot run: credentials refused, the stream or durable missing, a secret unset."""


def sequence(reply: bytes) -> int:
    """The stream sequence in a JetStream delivery's reply subject: `$JS.ACK.<stream>.<consumer>.
    <delivered>.<stream seq>.<consumer seq>.<time>.<pending>`, or the longer form with domain and
    account hash first (nats-py's `msg.metadata` parses all of it, three times slower)."""
    tokens = reply.split(b".")
    return int(tokens[5] if len(tokens) == 9 else tokens[7])


def consumer_sequence(reply: bytes) -> int:
    """The consumer sequence in a delivery's reply subject (after the stream sequence): the
    durable counts every delivery, to any client, one up."""
    tokens = reply.split(b".")
    return int(tokens[6] if len(tokens) == 9 else tokens[8])


_reply = itemgetter(1)


class _InFlight:
    """Read and not yet acked, in the order emitted: one run per read, of ascending sequences and
    the reply subjects to ack them with. Kept per run, not per message: a read adds one run and a
    commit takes whole runs, so the per-message work is done by list operations in C."""

    def __init__(self) -> None:
        self._runs: deque[tuple[list[int], list[bytes]]] = deque()
        self._count = 0
        # The highest sequence ever emitted (not reset by clear()): a delivery above it is new, so
        # neither in flight nor acked lately, which is what lets a read skip those lookups.
        self.top = 0

    def __len__(self) -> int:
        return self._count

    def clear(self) -> None:
        self._runs.clear()
        self._count = 0

    def add(self, seqs: list[int], replies: list[bytes]) -> None:
        """A run of ascending sequences, emitted after every run added before."""
        self._runs.append((seqs, replies))
        self._count += len(seqs)
        self.top = max(self.top, seqs[-1])

    def seqs(self) -> set[int]:
        return {seq for seqs, _ in self._runs for seq in seqs}

    def lowest(self) -> float:
        """The lowest sequence in flight (each run ascends); infinity when none is."""
        return min((seqs[0] for seqs, _ in self._runs), default=float("inf"))

    def take_below(self, position: int) -> tuple[list[int], list[bytes]]:
        """Remove and return, in the order emitted, what was emitted before the first sequence at or
        past `position` (the engine's contiguous settled prefix)."""
        taken: list[int] = []
        replies: list[bytes] = []
        runs = self._runs
        while runs:
            seqs, run_replies = runs[0]
            below = bisect_left(seqs, position)
            if below == len(seqs):
                runs.popleft()
                taken += seqs
                replies += run_replies
                continue
            if below:
                runs[0] = (seqs[below:], run_replies[below:])
                taken += seqs[:below]
                replies += run_replies[:below]
            break
        self._count -= len(taken)
        return taken, replies


class _Acked:
    """The sequences acked last, at least `limit` of them: a redelivery of one of these is an ack
    that was lost, not a message of another relay on the durable."""

    def __init__(self, limit: int) -> None:
        self._runs: deque[list[int]] = deque()
        self._count = 0
        self._limit = limit

    def add(self, seqs: list[int]) -> None:
        if not seqs:
            return
        self._runs.append(seqs)
        self._count += len(seqs)
        while self._count - len(self._runs[0]) >= self._limit:
            self._count -= len(self._runs.popleft())

    def seqs(self) -> set[int]:
        return {seq for seqs in self._runs for seq in seqs}


class _Hold:
    """The start-up order hold: everything read waits, in a buffer, until the `owed` redeliveries
    of a previous reader's in-flight messages (sequences up to `last_delivered`) arrived; then the
    buffer is emitted in stream order. (A dead reader's messages come back in the order their
    ack_wait ran out, which after a hold of its own is not stream order.)"""

    def __init__(self, last_delivered: int, owed: int, ack_wait: float) -> None:
        self.last_delivered = last_delivered
        self.owed = owed
        self.deadline = time.monotonic() + 2 * ack_wait
        self.held: dict[int, Delivery] = {}

    @property
    def active(self) -> bool:
        return self.owed > 0

    def add(self, seq: int, msg: Delivery) -> None:
        if seq <= self.last_delivered and seq not in self.held:
            self.owed -= 1
        self.held[seq] = msg  # a second redelivery replaces the first: its ack is as good

    def release(self) -> list[tuple[int, Delivery]]:
        self.owed = 0
        out = [(seq, self.held[seq]) for seq in sorted(self.held)]
        self.held = {}
        return out


class _Puller:
    """Pull requests kept in flight on the pull connection, so the server streams while the relay
    works. A request expires after FETCH_WAIT; the server answers an expired or cut-short one with
    a status message (408, 409) that says how many of its messages will not come."""

    def __init__(self, config: Config) -> None:
        self._subject = f"$JS.API.CONSUMER.MSG.NEXT.{config.stream}.{config.durable}".encode()
        self._batch = config.fetch_batch
        self._request = json.dumps({"batch": self._batch, "expires": int(FETCH_WAIT * 1e9)}).encode()
        self._owed = 0  # messages asked for and not yet delivered nor cancelled
        self._asked_at = 0.0

    async def next_batch(self, wire: PullWire) -> list[Delivery]:
        """What arrived since the last call (waiting up to FETCH_WAIT for something), after asking
        for more while fewer than REQUESTS batches are owed."""
        if time.monotonic() - self._asked_at > 2 * FETCH_WAIT + 1:
            self._owed = 0  # every request expired, even if its status message was lost
        if self._owed <= (REQUESTS - 1) * self._batch and wire.connected:
            wire.pull(self._subject, self._request)
            self._owed += self._batch
            self._asked_at = time.monotonic()
        wait = FETCH_WAIT
        arrived = wire.arrived
        while len(wire.received) < self._batch and wire.connected:
            arrived.clear()
            try:
                await asyncio.wait_for(arrived.wait(), wait)
            except TimeoutError:
                break
            wait = LINGER  # something came: gather more while it keeps coming, up to a batch
        arrived.clear()
        batch, wire.received = wire.received, []
        messages = [d for d in batch if d[1]]
        self._owed -= len(messages)
        if len(messages) < len(batch):
            for _, reply, header, _ in batch:
                if not reply and status(header) in ("408", "409"):
                    # expired or cut short: its remaining messages won't come
                    pending = headers(header).get("Nats-Pending-Messages", "0")
                    self._owed -= int(pending) if pending.isdigit() else 0
        self._owed = max(self._owed, 0)
        return messages

    def forget_requests(self) -> None:
        """After a reconnect: the server dropped the requests of the old connection."""
        self._owed = 0


class NatsReader:
    """Reads one stream through a durable pull consumer (the engine's Reader; see the module
    docstring for the rules)."""

    def __init__(self, name: str, config: Config) -> None:
        self.name = name
        self.config = config
        # The engine's per-stream cap: one more than the server's window, which it never reaches.
        # Equal, the engine paused at the window and read again only once half of it settled, while
        # the server sent more as soon as acks came (max_ack_pending 100: 7k → 11k messages/s).
        self.max_in_flight = config.max_ack_pending + 1
        # The durable's own max_ack_pending replaces it once known (one made elsewhere may differ;
        # the engine reads this at its start, so until it reads it again only the config counts).
        self.commit_interval = commit_interval(config.max_ack_pending)
        self._nc: Client | None = None
        self._js: JetStreamContext | None = None
        self._puller = _Puller(config)
        self._wire: PullWire | None = None
        self._lost = False  # the pull connection is down and that was logged
        self._unsent: list[bytes] = []  # acks committed while the pull connection was down
        self._acked = _Acked(ACKED_MEMORY * config.max_ack_pending)
        self._watcher: asyncio.Task[None] | None = None
        self._in_flight = _InFlight()
        # ack_policy all: one ack settles every sequence up to its own (the durable's policy, once bound).
        self._ack_all = config.ack_policy == "all"
        # Settled but not acked yet, as an unsettled message of ours lies below them (ack_policy all).
        self._waiting: list[tuple[int, bytes]] = []
        # The durable's consumer sequence of the last delivery this reader knows of (it counts every
        # delivery, to any client): with ack_policy all, a jump means another client reads it too.
        self._delivered: int | None = None
        self._hold = _Hold(0, 0, config.ack_wait)
        self._refused = asyncio.Event()
        self._refusal = ""
        self._auth = Auth()  # for the pull connection, set by _options()
        self._tls: ssl.SSLContext | None = None

    # -- the engine's Reader -----------------------------------------------------------------

    async def connect(self) -> None:
        self._refused.clear()
        if self._wire is not None:
            self._wire.close()
        try:
            nc, js = await asyncio.wait_for(self._connect(), CONNECT_WAIT)
        except TimeoutError:
            raise SourceUnavailable(f"{self.config.url} does not answer") from None
        self._nc, self._js = nc, js
        self._in_flight.clear()
        self._waiting = []
        self._unsent = []
        try:
            await self._bind(js)
        except (nats.errors.TimeoutError, nats.errors.NoRespondersError,
                nats.js.errors.ServiceUnavailableError) as err:  # JetStream not up yet (a restart)
            await nc.close()
            raise SourceUnavailable(f"JetStream at {self.config.url}: {err}") from None
        try:
            self._wire = await asyncio.wait_for(self._open_wire(), CONNECT_WAIT)
        except BaseException:
            await nc.close()
            raise
        self._watcher = asyncio.create_task(self._watch(), name=f"nats-{self.name}-info")

    async def read(self) -> list[Batch]:
        if self._watcher is not None and self._watcher.done():
            self._watcher.result()  # a failed watcher fails the source
        wire = self._wire
        if wire is None or not wire.connected:
            await self._reconnect()
            return []
        messages = self._accept(await self._puller.next_batch(wire))
        if not messages:
            return []
        return [Batch(self.config.stream, messages, end=messages[-1].offset + 1)]

    async def commit(self, positions: dict[str, int]) -> None:
        """Ack every message read before the position, in stream order, in one write. A lost ack
        only means a redelivery that the idempotency keys drop."""
        position = positions.get(self.config.stream)
        if position is None:
            return
        seqs, replies = self._in_flight.take_below(position)
        self._acked.add(seqs)
        self._ack(self._covering(seqs, replies) if self._ack_all else replies)

    def _covering(self, seqs: list[int], replies: list[bytes]) -> list[bytes]:
        """With ack_policy all, the one ack that settles what a commit took: the reply of the
        highest settled sequence below every message still in flight (a settled one above an
        unsettled message of ours waits: its ack would settle that message too)."""
        lowest = self._in_flight.lowest()
        if not self._waiting and seqs and seqs[-1] < lowest and seqs[-1] == max(seqs):
            return replies[-1:]  # the usual commit: nothing of ours below the last one is unsettled
        pairs = self._waiting + list(zip(seqs, replies, strict=True))
        self._waiting = [pair for pair in pairs if pair[0] > lowest]
        ackable = [pair for pair in pairs if pair[0] < lowest]
        return [max(ackable)[1]] if ackable else []

    def _ack(self, replies: list[bytes]) -> None:
        """Ack these deliveries now, or after the reconnect while the pull connection is down."""
        self._unsent += replies
        if self._unsent and self._wire is not None and self._wire.connected:
            self._wire.ack(self._unsent)
            self._unsent = []

    async def close(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            await asyncio.gather(self._watcher, return_exceptions=True)
            self._watcher = None
        wire, self._wire = self._wire, None
        if wire is not None:
            await wire.drain(timeout=5)  # the acks already written reach the server
            wire.close()
        nc, self._nc = self._nc, None
        if nc is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(nc.close(), CONNECT_WAIT)  # a stop never waits on it for ever

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
                self._auth = Auth(token=token)
            if cfg.username:
                password = load_secret(cfg.password_env, cfg.password_file)
                if password is None:
                    where = cfg.password_env or cfg.password_file
                    raise NatsSourceError(f"nats source {self.name!r}: password {where} is empty or unset")
                options.update(user=cfg.username, password=password.reveal())
                self._auth = Auth(user=cfg.username, password=password)
        except SecretError as err:
            raise NatsSourceError(f"nats source {self.name!r}: {err}") from None
        if cfg.credentials_file:
            if not Path(cfg.credentials_file).is_file():
                raise NatsSourceError(f"nats source {self.name!r}: credentials_file "
                                      f"{cfg.credentials_file} does not exist")
            options["user_credentials"] = cfg.credentials_file
            self._auth = Auth(credentials_file=cfg.credentials_file)
        if cfg.tls is not None:
            context = ssl.create_default_context(cafile=cfg.tls.ca_file or None)
            if cfg.tls.cert_file:
                context.load_cert_chain(cfg.tls.cert_file, cfg.tls.key_file)
            options["tls"] = self._tls = context
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

    async def _open_wire(self) -> PullWire:
        """The pull connection, to the first of the URLs that takes it."""
        inbox = f"_INBOX.{uuid.uuid4().hex}".encode()
        name = f"centrifugo-relay {self.name} pull"
        failures = []
        for url in (u.strip() for u in self.config.url.split(",")):
            try:
                return await PullWire.open(url, inbox, self._auth, self._tls, name)
            except WireError as err:
                if err.refused:
                    raise NatsSourceError(f"nats source {self.name!r}: {err}") from None
                failures.append(f"{url}: {err}")
        raise SourceUnavailable("; ".join(failures))

    async def _reconnect(self) -> None:
        """The pull connection again, after it was lost (what is in flight stays ours: its acks are
        as good on the new connection); on failure the next read tries again."""
        if self._wire is not None and not self._lost:
            log.warning("nats source %s: pull connection lost; reconnecting", self.name)
            self._lost = True
        self._delivered = None  # what went to the lost connection's requests is read anew below
        await asyncio.sleep(RECONNECT_WAIT)
        try:
            self._wire = await asyncio.wait_for(self._open_wire(), CONNECT_WAIT)
        except (SourceUnavailable, TimeoutError) as err:
            log.debug("nats source %s: pull connection: %s", self.name, err)
            return
        self._puller.forget_requests()
        self._ack([])  # what was committed meanwhile
        self._lost = False
        log.info("nats source %s: pull connection reconnected", self.name)
        await self._hold_for_lost_deliveries(self._wire)

    async def _hold_for_lost_deliveries(self, wire: PullWire) -> None:
        """Deliveries on their way when the connection dropped come back only after ack_wait, newer
        ones at once: when the server counts more unacked messages than this reader holds, what
        comes is held until they are back (the start-up hold)."""
        await wire.drain(CONNECT_WAIT)  # the acks just sent are counted first
        try:
            assert self._js is not None
            info = await self._js.consumer_info(self.config.stream, self.config.durable)
        except (nats.errors.Error, TimeoutError) as err:
            log.debug("nats source %s: consumer info failed: %s", self.name, err)
            return
        self._delivered = info.delivered.consumer_seq
        owed = (info.num_ack_pending or 0) - len(self._in_flight) - len(self._waiting)
        if owed > 0 and not self._hold.active:
            self._hold = _Hold(info.delivered.stream_seq, owed, info.config.ack_wait or self.config.ack_wait)
            log.info("nats source %s: %d message(s) were on their way when the connection dropped; holding "
                     "newer ones until they are redelivered", self.name, owed)

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
        self._ack_all = info.config.ack_policy == AckPolicy.ALL
        self._delivered = info.delivered.consumer_seq
        if info.config.max_ack_pending:
            self.commit_interval = commit_interval(info.config.max_ack_pending)
        if info.num_ack_pending:
            self._hold = _Hold(info.delivered.stream_seq, info.num_ack_pending, info.config.ack_wait or 30.0)
            log.info("nats source %s: %d message(s) in flight by a previous reader; holding newer ones "
                     "until they are redelivered", self.name, info.num_ack_pending)

    def _consumer_config(self) -> ConsumerConfig:
        cfg = self.config
        subjects = list(cfg.subjects)
        return ConsumerConfig(
            durable_name=cfg.durable, ack_policy=AckPolicy.ALL if cfg.ack_policy == "all" else AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL if cfg.deliver == "all" else DeliverPolicy.NEW,
            ack_wait=cfg.ack_wait, max_ack_pending=cfg.max_ack_pending, max_deliver=-1,
            filter_subject=subjects[0] if len(subjects) == 1 else None,
            filter_subjects=subjects if len(subjects) > 1 else None)

    # -- reading -----------------------------------------------------------------------------

    def _accept(self, batch: list[Delivery]) -> list[Message]:
        """The messages to emit, in stream order: redeliveries of what is in flight dropped, and
        everything held while a previous reader's in-flight messages are owed."""
        if not batch:
            return []
        if self._ack_all:
            self._check_sole_reader(batch)
        seqs = [sequence(reply) for _, reply, _, _ in batch]
        hold = self._hold
        # The usual read: new sequences only, ascending, nothing held; it needs no lookups.
        if (seqs[0] > self._in_flight.top and not hold.active and not hold.held
                and all(map(lt, seqs, islice(seqs, 1, None)))):
            return self._messages(seqs, batch)
        return self._accept_again(seqs, batch)

    def _check_sole_reader(self, batch: list[Delivery]) -> None:
        """With ack_policy all, stop once another client took deliveries of the durable: an ack of
        ours would settle its messages too, lost if it dies. Checked before anything of this read
        is emitted, so no ack of ours has passed what it took (new messages go out in stream order)."""
        first, last = consumer_sequence(batch[0][1]), consumer_sequence(batch[-1][1])
        known = self._delivered
        if known is not None and first > known + 1:
            went = f"{known + 1} to {first - 1}"
        elif last - first >= len(batch):
            went = f"some of {first} to {last}"
        else:
            self._delivered = last
            return
        raise NatsSourceError(
            f"nats source {self.name!r}: another client reads durable {self.config.durable!r} too (its "
            f"deliveries {went} went there); with ack_policy all an ack settles every message before "
            "it, that client's too: run one relay per durable, or use a durable made with "
            'ack_policy = "explicit"')

    def _accept_again(self, seqs: list[int], batch: list[Delivery]) -> list[Message]:
        """`_accept` of a read with redeliveries, sequences out of order, or the hold on."""
        hold = self._hold
        in_flight, acked = self._in_flight.seqs() | {seq for seq, _ in self._waiting}, self._acked.seqs()
        out: dict[int, Delivery] = {}
        acked_again: list[bytes] = []
        for seq, delivery in zip(seqs, batch, strict=True):
            if seq in in_flight:
                continue  # redelivered after ack_wait while still ours: the first delivery settles it
            if seq in acked:
                # Ours and acked, but the ack was lost (written as the connection died, or nats-server
                # died before it stored it): ack it again. Emitted again, it would sit at a position
                # the engine already committed, so its ack would never come.
                acked_again.append(delivery[1])
                if hold.active and seq <= hold.last_delivered:
                    hold.owed -= 1  # the server counted it as unacked when the hold began
                continue
            if hold.active:
                hold.add(seq, delivery)
            else:
                out[seq] = delivery  # a second delivery in one read replaces the first: its ack is as good
        if hold.held and (not hold.active or time.monotonic() > hold.deadline):
            log.info("nats source %s: releasing %d held message(s): %s", self.name, len(hold.held),
                     "twice ack_wait passed, order may break" if hold.active else "the owed ones arrived")
            out = {**dict(hold.release()), **out}
        elif hold.active and time.monotonic() > hold.deadline:
            hold.release()
        if acked_again:
            self._ack(acked_again)
        if not out:
            return []
        ordered = sorted(out)
        return self._messages(ordered, [out[seq] for seq in ordered])

    def _messages(self, seqs: list[int], deliveries: list[Delivery]) -> list[Message]:
        """The messages of deliveries (`seqs` their sequences, ascending), now in flight. This runs
        for every message: what is the same for all of them is looked up once, and headers are
        parsed only where there are some."""
        self._in_flight.add(seqs, list(map(_reply, deliveries)))
        name, stream = self.name, self.config.stream
        read_at = time.monotonic()
        messages: list[Message] = []
        append = messages.append
        if self.config.format == "data":
            for seq, (subject, _, header, data) in zip(seqs, deliveries, strict=True):
                append(Message(name, data, stream, seq, None, headers(header) if header else NOTHING,
                               {"subject": subject.decode("utf-8", "replace"), "offset": seq}, read_at))
            return messages
        for seq, (_, _, header, data) in zip(seqs, deliveries, strict=True):
            fields = headers(header) if header else NOTHING
            record, error = read_publication(data, fields)
            # The record names its channels: no route reads attributes.
            append(Message(name, data, stream, seq, None, fields, NOTHING, read_at, record, error))
        return messages

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
