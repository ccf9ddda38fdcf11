"""A real WebSocket subscriber (PyPI centrifuge-python) that records a channel's publications in order.

It runs its own asyncio loop in a background thread, so sync and async tests use it alike:

    with ChannelSubscriber(centrifugo.ws_url, "chat:x") as sub:
        ...publish...
        assert sub.wait_for(3) == [{"n": 1}, {"n": 2}, {"n": 3}]

When the server goes away the client reconnects and resubscribes by itself (quickly: the reconnect
delay is capped at `max_reconnect_delay`); `subscribed` records each (re)subscription, so a test can
wait for the subscriber to be back before it goes on.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from centrifuge import (
    Client,
    DeltaType,
    PublicationContext,
    SubscribedContext,
    SubscriptionEventHandler,
    UnsubscribedContext,
)


@dataclass(frozen=True)
class Received:
    """One publication as the subscriber saw it."""

    data: Any
    offset: int
    tags: dict[str, str]


@dataclass(frozen=True)
class Subscribed:
    """One successful (re)subscription and what the server said about recovery."""

    recoverable: bool
    was_recovering: bool
    recovered: bool
    offset: int | None
    epoch: str | None


class _Events(SubscriptionEventHandler):
    def __init__(self, owner: ChannelSubscriber) -> None:
        self._owner = owner

    async def on_publication(self, ctx: PublicationContext) -> None:
        pub = ctx.pub
        self._owner._record(Received(data=pub.data, offset=pub.offset, tags=pub.tags))

    async def on_subscribed(self, ctx: SubscribedContext) -> None:
        pos = ctx.stream_position
        self._owner._subscribed(Subscribed(
            recoverable=ctx.recoverable, was_recovering=ctx.was_recovering, recovered=ctx.recovered,
            offset=pos.offset if pos else None, epoch=pos.epoch if pos else None))

    async def on_unsubscribed(self, ctx: UnsubscribedContext) -> None:
        self._owner.unsubscribed.append((ctx.code, ctx.reason))


class ChannelSubscriber:
    """Subscribes to one channel over WebSocket and keeps every publication, in arrival order."""

    def __init__(self, ws_url: str, channel: str, recoverable: bool = False,
                 max_reconnect_delay: float = 0.5, use_protobuf: bool = False, delta: str = "") -> None:
        self.ws_url = ws_url
        self.delta = delta
        self.use_protobuf = use_protobuf
        self.channel = channel
        self.recoverable = recoverable
        self.max_reconnect_delay = max_reconnect_delay
        self.received: list[Received] = []
        self.subscriptions: list[Subscribed] = []
        self.unsubscribed: list[tuple[int, str]] = []
        self._cond = threading.Condition()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._client: Client | None = None

    # Called on the subscriber's loop thread.
    def _record(self, item: Received) -> None:
        with self._cond:
            self.received.append(item)
            self._cond.notify_all()

    def _subscribed(self, item: Subscribed) -> None:
        with self._cond:
            self.subscriptions.append(item)
            self._cond.notify_all()

    async def _open(self) -> None:
        # proxy=None: never route a loopback test connection through an environment proxy.
        self._client = Client(self.ws_url, proxy=None, min_reconnect_delay=0.05, use_protobuf=self.use_protobuf,
                              max_reconnect_delay=self.max_reconnect_delay)
        sub = self._client.new_subscription(self.channel, events=_Events(self),
                                            recoverable=self.recoverable, positioned=self.recoverable,
                                            delta=DeltaType(self.delta) if self.delta else None)
        await self._client.connect()
        await sub.subscribe()

    async def _close(self) -> None:
        if self._client is not None:
            await self._client.disconnect()
        # The client leaves background tasks (reconnects, keepalives); end them before the loop.
        others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in others:
            task.cancel()
        await asyncio.gather(*others, return_exceptions=True)

    def start(self, timeout: float = 10.0) -> ChannelSubscriber:
        """Connect and subscribe; returns once the server confirmed the subscription."""
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"subscriber {self.channel}",
                                        daemon=True)
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._open(), self._loop).result(timeout)
        self.wait_subscribed(1, timeout)
        return self

    def stop(self) -> None:
        if self._loop is None or self._thread is None:
            return
        try:
            asyncio.run_coroutine_threadsafe(self._close(), self._loop).result(10)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._loop.close()
            self._loop = None
            self._thread = None

    def __enter__(self) -> ChannelSubscriber:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _wait(self, ready: Any, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not ready():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{self.channel}: {what} after {timeout}s ({len(self.received)} "
                                       f"received, {len(self.subscriptions)} subscribed)")
                self._cond.wait(left)

    def wait_for(self, count: int, timeout: float = 30.0) -> list[Any]:
        """Wait until at least `count` publications arrived; returns the data of all received so far."""
        self._wait(lambda: len(self.received) >= count, timeout, f"fewer than {count} publications")
        return self.data()

    def wait_subscribed(self, count: int, timeout: float = 30.0) -> Subscribed:
        """Wait for the `count`-th successful subscription (1 = the first; 2 = after one resubscribe)."""
        self._wait(lambda: len(self.subscriptions) >= count, timeout, f"not subscribed {count} time(s)")
        return self.subscriptions[count - 1]

    def data(self) -> list[Any]:
        with self._cond:
            return [item.data for item in self.received]


@pytest.fixture
def ws_subscriber() -> Iterator[Any]:
    """Factory: `ws_subscriber(ws_url, channel, **options)` → a started ChannelSubscriber, stopped
    after the test."""
    started: list[ChannelSubscriber] = []

    def make(ws_url: str, channel: str, **options: Any) -> ChannelSubscriber:
        sub = ChannelSubscriber(ws_url, channel, **options).start()
        started.append(sub)
        return sub

    yield make
    for sub in started:
        sub.stop()
