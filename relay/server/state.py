"""What the embedded server holds: channels, their streams (epoch, offsets, history) and the
idempotency window, with the semantics of Centrifugo's memory engine.

- A channel's namespace is the part before the first `:` (after one leading `$`, Centrifugo's
  private prefix). An unknown namespace is error 102; a channel without `:` belongs to the
  top-level namespace, which has history off (Centrifugo's default).
- History is on when history_size > 0 and history_ttl > 0. Each publication gets the next offset
  of the channel's stream; the stream keeps at most history_size publications and is cleared when
  history_ttl passes without a publication (Centrifugo's memory and Redis engines expire the whole
  stream, not single publications). Clearing keeps epoch and top offset.
- What one API call may make the server build is bounded too (CallBudget): the bytes of the
  History publications and Channels names it answers with, and the work of matching a pattern.
- A publish with an idempotency key already seen on that channel within the window (5 minutes)
  is not published again; the first result is returned. At most MAX_IDEMPOTENCY_KEYS are kept
  (oldest forgotten first): redeliveries that matter are recent ones.
- Memory is bounded: a channel is dropped once it retains no publication, no idempotency key, and
  nobody published or read it for history_ttl. Centrifugo keeps stream meta for 30 days
  (history_meta_ttl); the embedded server forgets sooner, so a stream that comes back after a long
  idle time has a new epoch, which clients read as "stream lost", correctly. At most max_channels
  are held: past that a new channel is error 100, which clients retry while old channels expire.

Everything runs on one event loop thread: no locks. Time comes from an injectable clock.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import random
import string
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from typing import NamedTuple

from relay.server.errors import (
    BAD_REQUEST,
    INTERNAL,
    NOT_AVAILABLE,
    UNKNOWN_CHANNEL,
    UNRECOVERABLE_POSITION,
    ApiError,
)
from relay.server.pattern import PatternError, PatternTooCostly, channel_matcher

IDEMPOTENCY_WINDOW = 300.0
# Keys remembered at most (about 300 bytes each): past this, the oldest are forgotten first, so a
# relay publishing faster than 3,300/s for 5 minutes cannot grow the server without bound.
MAX_IDEMPOTENCY_KEYS = 1_000_000
PRIVATE_PREFIX = "$"
NAMESPACE_BOUNDARY = ":"
_EPOCH_ALPHABET = string.ascii_letters
# Channels held at most by default: about 1.7 KB of memory each (bench/server_memory.py).
MAX_CHANNELS = 100_000
# Bytes of publications and channel names one call may make the server answer with by default.
MAX_REPLY_BYTES = 16 * 1024 * 1024
# Matching work (channel characters looked at, automaton states built) one call may spend:
# well over one Channels call on MAX_CHANNELS channels, about a second of the event loop.
MAX_CALL_WORK = 20_000_000
# What a reply spends on each publication or channel name besides its bytes (protobuf framing).
_ITEM_OVERHEAD = 16


@dataclass(frozen=True, slots=True)
class NamespacePolicy:
    """History settings of one namespace ("" is the top-level namespace)."""

    name: str
    history_size: int = 0
    history_ttl: float = 0.0

    @property
    def history(self) -> bool:
        return self.history_size > 0 and self.history_ttl > 0


TOP_LEVEL = NamespacePolicy("")


class StoredPublication(NamedTuple):
    offset: int
    data: bytes
    tags: Mapping[str, str] | None


class HistoryPage(NamedTuple):
    """Publications picked by a History call and the stream top (offset, epoch)."""

    publications: list[StoredPublication]
    offset: int
    epoch: str


class CallBudget:
    """What one API call (a Batch with all its commands counts as one) may still make the server do."""

    __slots__ = ("reply_bytes", "work")

    def __init__(self, reply_bytes: int = MAX_REPLY_BYTES, work: int = MAX_CALL_WORK) -> None:
        self.reply_bytes = reply_bytes
        self.work = work

    def charge_reply(self, nbytes: int) -> None:
        """Take `nbytes` of reply, or raise 107 leaving the budget as it was."""
        if nbytes > self.reply_bytes:
            raise ApiError(BAD_REQUEST[0], "bad request: the reply would exceed server.max_reply_bytes "
                                           "for one call; ask for less (History limit, fewer commands)")
        self.reply_bytes -= nbytes


_CALL_BUDGET: ContextVar[CallBudget | None] = ContextVar("call_budget", default=None)


# (offset, epoch) of a publish result.
Position = tuple[int, str]
NO_POSITION: Position = (0, "")


class Channel:
    """One channel's stream and idempotency results."""

    __slots__ = ("epoch", "history_expires_at", "keep_until", "name", "policy", "publications",
                 "results", "scheduled", "top", "version", "version_epoch")

    def __init__(self, name: str, policy: NamespacePolicy) -> None:
        self.name = name
        self.policy = policy
        self.epoch = ""  # "" until the stream exists (history on and published or read).
        self.top = 0
        self.publications: deque[StoredPublication] = deque(maxlen=max(policy.history_size, 1))
        self.history_expires_at = 0.0
        self.keep_until = 0.0
        # idempotency key -> (expires at, offset, epoch): flat, so the GC soon stops tracking it.
        self.results: dict[str, tuple[float, int, str]] | None = None
        self.scheduled: float | None = None
        self.version = 0
        self.version_epoch = ""

    def retains_something(self) -> bool:
        return bool(self.publications or self.results)


def new_epoch() -> str:
    """A random epoch, like Centrifugo's memory engine makes (letters, a little longer)."""
    return "".join(random.choices(_EPOCH_ALPHABET, k=8))


class ServerState:
    """All channels of the embedded server; the GRPC services call into this."""

    def __init__(self, namespaces: Iterable[NamespacePolicy], *, top_level: NamespacePolicy = TOP_LEVEL,
                 clock: Callable[[], float] = time.monotonic,
                 idempotency_window: float = IDEMPOTENCY_WINDOW,
                 max_idempotency_keys: int = MAX_IDEMPOTENCY_KEYS,
                 max_channels: int = MAX_CHANNELS, max_reply_bytes: int = MAX_REPLY_BYTES) -> None:
        self.max_channels = max_channels
        self.max_reply_bytes = max_reply_bytes
        self.namespaces = {ns.name: ns for ns in namespaces}
        self.top_level = top_level
        self.clock = clock
        self.idempotency_window = idempotency_window
        self.max_idempotency_keys = max_idempotency_keys
        self.channels: dict[str, Channel] = {}
        # (when, tie, channel name): when a channel's history may expire or the channel may go.
        self._deadlines: list[tuple[float, int, str]] = []
        self._tie = itertools.count()
        # Idempotency keys in the order they expire (the window is the same for all).
        self._results_fifo: deque[tuple[float, str, str]] = deque()
        # Called with (channel, data, tags, position) for every new publication (not for repeats):
        # how WebSocket subscribers hear of them (relay/server/hub.py).
        self.on_publication: Callable[[str, bytes, Mapping[str, str] | None, Position], None] | None = None

    # -- per call ------------------------------------------------------------------------------

    @contextlib.contextmanager
    def call(self) -> Iterator[CallBudget]:
        """Run one API call: what it does inside shares one fresh CallBudget."""
        budget = CallBudget(self.max_reply_bytes)
        token = _CALL_BUDGET.set(budget)
        try:
            yield budget
        finally:
            _CALL_BUDGET.reset(token)

    def _budget(self) -> CallBudget:
        """The running call's budget; outside a call (a direct use), a fresh one per operation."""
        budget = _CALL_BUDGET.get()
        return budget if budget is not None else CallBudget(self.max_reply_bytes)

    # -- namespaces ----------------------------------------------------------------------------

    def policy_for(self, channel: str) -> NamespacePolicy:
        """The namespace policy of a channel; ApiError 102 when its namespace is not configured."""
        existing = self.channels.get(channel)
        if existing is not None:
            return existing.policy
        name = channel[1:] if channel.startswith(PRIVATE_PREFIX) else channel
        cut = name.find(NAMESPACE_BOUNDARY)
        if cut < 0:
            return self.top_level
        policy = self.namespaces.get(name[:cut])
        if policy is None:
            raise ApiError(*UNKNOWN_CHANNEL)
        return policy

    def _history_policy(self, channel: str) -> NamespacePolicy:
        if not channel:
            raise ApiError(*BAD_REQUEST)
        policy = self.policy_for(channel)
        if not policy.history:
            raise ApiError(*NOT_AVAILABLE)
        return policy

    def check_channel(self, channel: str) -> None:
        """Validate a channel for methods with nothing to store (Presence): 107, 102."""
        if not channel:
            raise ApiError(*BAD_REQUEST)
        self.policy_for(channel)

    # -- publish -------------------------------------------------------------------------------

    def publish(self, channel: str, data: bytes, tags: Mapping[str, str] | None = None,
                idempotency_key: str = "", skip_history: bool = False,
                version: int = 0, version_epoch: str = "") -> Position:
        """Publish one message; returns (offset, epoch), (0, "") when history is off.

        Raises ApiError 107 (empty channel or data), 102 (unknown namespace).
        """
        if not channel:
            raise ApiError(*BAD_REQUEST)
        ch = self.channels.get(channel)
        policy = ch.policy if ch is not None else self.policy_for(channel)
        if not data:
            raise ApiError(*BAD_REQUEST)
        now = self.clock()
        if idempotency_key and ch is not None and ch.results:
            seen = ch.results.get(idempotency_key)
            if seen is not None and seen[0] > now:
                return seen[1], seen[2]
        position = NO_POSITION
        if policy.history and not skip_history:
            if ch is None:
                ch = self._add_channel(channel, policy)
            position_or_none = self._append(ch, data, tags or None, version, version_epoch, now)
            if position_or_none is None:
                # An out-of-order version: skipped, answered with the current top.
                return ch.top, ch.epoch
            position = position_or_none
        if self.on_publication is not None:
            self.on_publication(channel, data, tags or None, position)
        if idempotency_key:
            if ch is None:
                ch = self._add_channel(channel, policy)
            self._remember(ch, idempotency_key, position, now)
        return position

    def _append(self, ch: Channel, data: bytes, tags: Mapping[str, str] | None, version: int,
                version_epoch: str, now: float) -> Position | None:
        if ch.publications and ch.history_expires_at <= now:
            ch.publications.clear()
        if not ch.epoch:
            ch.epoch = new_epoch()
        if version > 0:
            if (not version_epoch or version_epoch == ch.version_epoch) and version <= ch.version:
                return None
            ch.version, ch.version_epoch = version, version_epoch
        ch.top += 1
        # tuple.__new__ skips NamedTuple's Python-level constructor: this is the hot path.
        ch.publications.append(tuple.__new__(StoredPublication, (ch.top, data, tags)))
        expires = now + ch.policy.history_ttl
        ch.history_expires_at = expires
        if expires > ch.keep_until:
            ch.keep_until = expires
        if ch.scheduled is None:
            self._schedule(ch, expires)
        return ch.top, ch.epoch

    def _remember(self, ch: Channel, key: str, position: Position, now: float) -> None:
        expires = now + self.idempotency_window
        if ch.results is None:
            ch.results = {}
        ch.results[key] = (expires, position[0], position[1])
        self._results_fifo.append((expires, ch.name, key))
        if len(self._results_fifo) > self.max_idempotency_keys:
            self._forget_results(float("inf"), limit=len(self._results_fifo) - self.max_idempotency_keys)

    # -- history -------------------------------------------------------------------------------

    def history(self, channel: str, limit: int = -1, since: Position | None = None,
                reverse: bool = False) -> HistoryPage:
        """Publications of a channel with Centrifugo's filter semantics.

        limit < 0: all retained, 0: none (only the stream top), N: at most N. Without `since`
        they come from the oldest (or, reversed, the newest). With `since` (offset, epoch):
        those after that offset (reversed: before it, newest first); an epoch that is not the
        stream's is 112. A position older than what is retained gives what is retained, as in
        Centrifugo: the client sees the gap in the offsets.
        Raises 107 (empty channel), 102, 108 (history off), 100 (reverse since offset 0).
        """
        policy = self._history_policy(channel)
        if reverse and since is not None and since[0] == 0:
            # Centrifugo's engine calls this a bad request, but its API answers any engine error
            # other than 112 with 100; a client can tell, so the same here.
            raise ApiError(*INTERNAL)
        now = self.clock()
        ch = self._touch_stream(channel, policy, now)
        top, epoch = ch.top, ch.epoch
        if since is None:
            picked = self._from_edge(ch.publications, limit, reverse)
        else:
            since_offset, since_epoch = since
            if not reverse and since_offset == top and since_epoch == epoch:
                picked = []
            else:
                start = since_offset - 1 if reverse else since_offset + 1
                picked = self._from_offset(ch.publications, start, top, limit, reverse)
            if since_epoch and since_epoch != epoch:
                raise ApiError(*UNRECOVERABLE_POSITION)
        if picked:
            self._budget().charge_reply(sum(map(_reply_size, picked)))
        return HistoryPage(picked, top, epoch)

    def _touch_stream(self, channel: str, policy: NamespacePolicy, now: float) -> Channel:
        """The channel's stream, created (new epoch, offset 0) if missing, as Centrifugo does."""
        ch = self.channels.get(channel)
        if ch is None:
            ch = self._add_channel(channel, policy)
        if not ch.epoch:
            ch.epoch = new_epoch()
        if ch.publications and ch.history_expires_at <= now:
            ch.publications.clear()
        keep = now + policy.history_ttl
        if keep > ch.keep_until:
            ch.keep_until = keep
        if ch.scheduled is None:
            self._schedule(ch, keep)
        return ch

    @staticmethod
    def _from_edge(pubs: deque[StoredPublication], limit: int, reverse: bool) -> list[StoredPublication]:
        if limit == 0 or not pubs:
            return []
        source = reversed(pubs) if reverse else iter(pubs)
        return list(source) if limit < 0 else list(itertools.islice(source, limit))

    @staticmethod
    def _from_offset(pubs: deque[StoredPublication], start: int, top: int, limit: int,
                     reverse: bool) -> list[StoredPublication]:
        if start >= top + 1 or limit == 0 or not pubs:
            return []
        index = start - pubs[0].offset  # offsets in the deque are consecutive
        if not 0 <= index < len(pubs):
            if reverse:
                return []
            index = 0
        if reverse:
            backwards = itertools.islice(reversed(pubs), len(pubs) - 1 - index, None)
            return list(backwards) if limit < 0 else list(itertools.islice(backwards, limit))
        stop = None if limit < 0 else index + limit
        return list(itertools.islice(pubs, index, stop))

    def publication_data(self, channel: str, offset: int) -> bytes | None:
        """The data of a retained publication of a channel, None when it is not retained."""
        ch = self.channels.get(channel)
        if ch is None or not ch.publications:
            return None
        index = offset - ch.publications[0].offset  # offsets in the deque are consecutive
        return ch.publications[index].data if 0 <= index < len(ch.publications) else None

    def remove_history(self, channel: str) -> None:
        """Forget a channel's publications; its epoch and top offset stay (Centrifugo's Clear)."""
        self._history_policy(channel)
        ch = self.channels.get(channel)
        if ch is not None:
            ch.publications.clear()

    # -- listing -------------------------------------------------------------------------------

    def channel_names(self, pattern: str = "") -> list[str]:
        """Names of the channels held, matching a glob pattern.

        Raises 100 for a pattern Centrifugo cannot compile (as it does), 107 when the listing
        would exceed the call's budget (matching work or reply bytes).
        """
        self.sweep()
        budget = self._budget()
        try:
            matcher = channel_matcher(pattern, budget.work)
            names = [name for name in self.channels if matcher(name)]
        except PatternError:
            raise ApiError(*INTERNAL) from None
        except PatternTooCostly:
            raise ApiError(BAD_REQUEST[0], "bad request: matching this pattern would take more work than one "
                                           "call may; use a more specific pattern") from None
        budget.work = matcher.budget
        budget.charge_reply(sum(len(name) + _ITEM_OVERHEAD for name in names))
        return names

    @property
    def num_channels(self) -> int:
        return len(self.channels)

    # -- expiry --------------------------------------------------------------------------------

    def _add_channel(self, name: str, policy: NamespacePolicy) -> Channel:
        if len(self.channels) >= self.max_channels:
            self.sweep()  # channels due to go make room first
            if len(self.channels) >= self.max_channels:
                raise ApiError(INTERNAL[0], f"internal server error: the server holds server.max_channels "
                                            f"({self.max_channels}) channels; retry once some expire")
        ch = Channel(name, policy)
        self.channels[name] = ch
        return ch

    def _schedule(self, ch: Channel, when: float) -> None:
        ch.scheduled = when
        heapq.heappush(self._deadlines, (when, next(self._tie), ch.name))

    def _settle(self, ch: Channel, now: float) -> None:
        """Expire what is due in a channel; drop it when nothing is left, else re-arm its deadline."""
        if ch.publications and ch.history_expires_at <= now:
            ch.publications.clear()
        if not ch.retains_something() and ch.keep_until <= now:
            if self.channels.get(ch.name) is ch:
                del self.channels[ch.name]
            return
        pending = [t for t in (ch.history_expires_at if ch.publications else 0.0, ch.keep_until) if t > now]
        if pending and ch.scheduled is None:
            self._schedule(ch, min(pending))
        # With only idempotency keys left, their expiry (in sweep) settles the channel again.

    def sweep(self) -> None:
        """Expire history, idempotency keys and idle channels that are due. Cheap when none are."""
        now = self.clock()
        deadlines = self._deadlines
        while deadlines and deadlines[0][0] <= now:
            when, _, name = heapq.heappop(deadlines)
            ch = self.channels.get(name)
            if ch is None or ch.scheduled != when:
                continue
            ch.scheduled = None
            self._settle(ch, now)
        self._forget_results(now)

    def _forget_results(self, until: float, limit: int | None = None) -> None:
        """Forget idempotency keys that expire by `until` (at most `limit` of them), oldest first."""
        now = self.clock()
        fifo = self._results_fifo
        while fifo and fifo[0][0] <= until and (limit is None or limit > 0):
            expires, name, key = fifo.popleft()
            if limit is not None:
                limit -= 1
            ch = self.channels.get(name)
            if ch is None or not ch.results:
                continue
            seen = ch.results.get(key)
            if seen is not None and seen[0] <= expires:
                del ch.results[key]
            if not ch.results:
                ch.results = None
                self._settle(ch, now)


def _reply_size(pub: StoredPublication) -> int:
    """About the bytes a publication takes in a History reply."""
    size = len(pub.data) + _ITEM_OVERHEAD
    if pub.tags:
        size += sum(len(k) + len(v) + 4 for k, v in pub.tags.items())
    return size
