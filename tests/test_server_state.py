"""ServerState on its own, with a clock the test moves: offsets and epochs, history size and TTL,
the idempotency window, and that everything it holds goes away when it should (bounded memory)."""

from __future__ import annotations

import pytest

from relay.server.errors import ApiError
from relay.server.state import NO_POSITION, NamespacePolicy, ServerState


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def state(clock: Clock) -> ServerState:
    return ServerState([NamespacePolicy("chat", history_size=3, history_ttl=10.0),
                        NamespacePolicy("nohistory")], clock=clock, idempotency_window=300.0)


def code_of(call: object, *args: object, **kwargs: object) -> int:
    with pytest.raises(ApiError) as caught:
        call(*args, **kwargs)  # type: ignore[operator]
    return caught.value.code


def offsets(state: ServerState, channel: str, **kwargs: object) -> list[int]:
    return [p.offset for p in state.history(channel, **kwargs).publications]  # type: ignore[arg-type]


def test_offsets_grow_by_one_in_one_epoch(state: ServerState) -> None:
    positions = [state.publish("chat:a", b"x") for _ in range(3)]
    assert [p[0] for p in positions] == [1, 2, 3]
    assert len({p[1] for p in positions}) == 1
    assert state.publish("chat:b", b"x")[1] != positions[0][1]  # each stream has its own epoch


def test_namespaces(state: ServerState) -> None:
    assert state.publish("nohistory:a", b"x") == NO_POSITION
    assert state.publish("top-level", b"x") == NO_POSITION
    assert state.publish("$chat:private", b"x")[0] == 1
    assert code_of(state.publish, "nowhere:a", b"x") == 102
    assert code_of(state.publish, "$nowhere:a", b"x") == 102
    assert code_of(state.publish, "", b"x") == 107
    assert code_of(state.publish, "chat:a", b"") == 107
    assert code_of(state.history, "nohistory:a") == 108
    assert code_of(state.history, "top-level") == 108
    assert code_of(state.remove_history, "nowhere:a") == 102
    assert state.num_channels == 1  # a publish without history or key holds nothing


def test_history_keeps_the_newest_history_size(state: ServerState) -> None:
    for _ in range(5):
        state.publish("chat:a", b"x")
    page = state.history("chat:a")
    assert ([p.offset for p in page.publications], page.offset) == ([3, 4, 5], 5)


def test_the_stream_is_cleared_a_ttl_after_its_last_publication(state: ServerState, clock: Clock) -> None:
    epoch = state.publish("chat:a", b"1")[1]
    clock.advance(5)
    state.publish("chat:a", b"2")
    clock.advance(9.9)
    assert offsets(state, "chat:a") == [1, 2]  # 14.9s after the first: the stream lives on
    clock.advance(0.1)
    page = state.history("chat:a")
    assert (page.publications, page.offset, page.epoch) == ([], 2, epoch)  # cleared, position kept
    assert state.publish("chat:a", b"3") == (3, epoch)


def test_a_channel_is_dropped_once_it_retains_nothing(state: ServerState, clock: Clock) -> None:
    epoch = state.publish("chat:a", b"1")[1]
    clock.advance(9)
    state.sweep()
    assert state.num_channels == 1
    clock.advance(1)
    state.sweep()
    assert (state.num_channels, state.channel_names()) == (0, [])
    # The stream is gone: it comes back with a new epoch, which a recovering client sees as 112.
    page = state.history("chat:a")
    assert (page.offset, page.epoch != epoch) == (0, True)
    assert code_of(state.history, "chat:a", since=(1, epoch)) == 112


def test_reading_history_keeps_a_stream_for_a_ttl(state: ServerState, clock: Clock) -> None:
    epoch = state.history("chat:a", limit=0).epoch
    clock.advance(8)
    assert state.history("chat:a", limit=0).epoch == epoch
    clock.advance(8)
    state.sweep()
    assert state.num_channels == 1  # read 8s ago
    clock.advance(2)
    state.sweep()
    assert state.num_channels == 0


def test_the_idempotency_window(state: ServerState, clock: Clock) -> None:
    first = state.publish("chat:a", b"1", idempotency_key="k")
    clock.advance(299)
    assert state.publish("chat:a", b"2", idempotency_key="k") == first
    assert state.publish("chat:b", b"3", idempotency_key="k") != first  # keys are per channel
    clock.advance(1)
    assert state.publish("chat:a", b"4", idempotency_key="k")[0] == 2  # the window has passed
    assert state.publish("nohistory:a", b"5", idempotency_key="k") == NO_POSITION
    assert state.publish("nohistory:a", b"6", idempotency_key="k") == NO_POSITION
    assert state.publish("chat:a", b"7", idempotency_key="s", skip_history=True) == NO_POSITION
    assert state.publish("chat:a", b"8", idempotency_key="s") == NO_POSITION


def test_idempotency_keys_expire_and_take_their_channels_with_them(state: ServerState, clock: Clock) -> None:
    for n in range(10_000):
        state.publish(f"nohistory:{n % 100}", b"x", idempotency_key=f"key-{n}")
    assert state.num_channels == 100
    assert sum(len(ch.results or ()) for ch in state.channels.values()) == 10_000
    clock.advance(299)
    state.sweep()
    assert state.num_channels == 100
    clock.advance(1)
    state.sweep()
    assert state.num_channels == 0
    assert (len(state._results_fifo), len(state._deadlines)) == (0, 0)


def test_many_channels_with_history_are_all_dropped_after_the_ttl(state: ServerState, clock: Clock) -> None:
    for n in range(10_000):
        state.publish(f"chat:{n}", b"x" * 100)
        state.publish(f"chat:{n}", b"y" * 100)
    assert state.num_channels == 10_000
    assert len(state._deadlines) == 10_000  # one deadline per channel, not per publication
    clock.advance(10)
    state.sweep()
    assert (state.num_channels, len(state._deadlines)) == (0, 0)


def test_a_busy_channel_keeps_one_deadline(state: ServerState, clock: Clock) -> None:
    for _ in range(1000):
        state.publish("chat:busy", b"x")
        clock.advance(0.05)
        state.sweep()
    assert len(state._deadlines) <= 1
    assert offsets(state, "chat:busy") == [998, 999, 1000]


def test_history_filters(state: ServerState) -> None:
    big = ServerState([NamespacePolicy("chat", history_size=5, history_ttl=60.0)], clock=state.clock)
    for _ in range(7):
        big.publish("chat:a", b"x")
    epoch = big.history("chat:a", limit=0).epoch

    def pick(limit: int = -1, since: tuple[int, str] | None = None, reverse: bool = False) -> list[int]:
        return [p.offset for p in big.history("chat:a", limit, since, reverse).publications]

    assert pick() == [3, 4, 5, 6, 7]
    assert pick(0) == []
    assert pick(2) == [3, 4]
    assert pick(2, reverse=True) == [7, 6]
    assert pick(since=(4, epoch)) == [5, 6, 7]
    assert pick(since=(7, epoch)) == []
    assert pick(since=(1, epoch)) == [3, 4, 5, 6, 7]  # older than retained: what is left
    assert pick(since=(50, epoch)) == []
    assert pick(since=(5, epoch), reverse=True) == [4, 3]
    assert pick(1, since=(5, epoch), reverse=True) == [4]
    assert pick(since=(2, epoch), reverse=True) == []  # offset 1 is no longer retained
    assert pick(since=(4, "")) == [5, 6, 7]
    assert code_of(big.history, "chat:a", since=(4, "other")) == 112
    assert code_of(big.history, "chat:a", since=(0, epoch), reverse=True) == 100


def test_remove_history_keeps_epoch_and_offset(state: ServerState) -> None:
    epoch = state.publish("chat:a", b"1")[1]
    state.publish("chat:a", b"2")
    state.remove_history("chat:a")
    page = state.history("chat:a")
    assert (page.publications, page.offset, page.epoch) == ([], 2, epoch)
    state.remove_history("chat:never")
    assert "chat:never" not in state.channels


def test_versions_skip_stale_publications(state: ServerState) -> None:
    assert state.publish("chat:v", b"a", version=5, version_epoch="e")[0] == 1
    assert state.publish("chat:v", b"b", version=5, version_epoch="e")[0] == 1
    assert state.publish("chat:v", b"c", version=4)[0] == 1  # no epoch given: compared anyway
    assert state.publish("chat:v", b"d", version=6, version_epoch="e")[0] == 2
    assert state.publish("chat:v", b"e", version=1, version_epoch="f")[0] == 3
    assert [p.data for p in state.history("chat:v").publications] == [b"a", b"d", b"e"]


def test_channel_names_by_pattern(state: ServerState) -> None:
    for name in ("chat:a1", "chat:a2", "chat:b1", "chat:x*y"):
        state.publish(name, b"x")
    assert sorted(state.channel_names("chat:a*")) == ["chat:a1", "chat:a2"]
    assert state.channel_names("chat:?1") == ["chat:a1", "chat:b1"]
    assert state.channel_names("chat:{b1,a2}") == ["chat:a2", "chat:b1"]
    assert state.channel_names("chat:[ab]1") == ["chat:a1", "chat:b1"]
    assert state.channel_names("chat:x\\*y") == ["chat:x*y"]
    assert len(state.channel_names("")) == 4


def test_at_most_max_idempotency_keys_are_kept_oldest_forgotten_first(clock: Clock) -> None:
    state = ServerState([NamespacePolicy("chat", 10, 60.0)], clock=clock, max_idempotency_keys=100)
    first = {n: state.publish(f"chat:{n % 7}", b"x", idempotency_key=f"k{n}") for n in range(250)}
    assert sum(len(ch.results or ()) for ch in state.channels.values()) == 100
    assert len(state._results_fifo) == 100
    # The newest 100 still deduplicate; an evicted one publishes again.
    assert state.publish("chat:4", b"x", idempotency_key="k249") == first[249]
    top = state.history("chat:0", limit=0).offset
    assert state.publish("chat:0", b"x", idempotency_key="k0")[0] == top + 1


def test_one_call_shares_one_reply_budget_and_the_next_call_gets_a_new_one(clock: Clock) -> None:
    state = ServerState([NamespacePolicy("chat", 100, 60.0)], clock=clock, max_reply_bytes=10_000)
    for _ in range(4):
        state.publish("chat:a", b"x" * 1000)
    with state.call():
        assert len(state.history("chat:a").publications) == 4  # about 4 KB of 10
        assert len(state.history("chat:a").publications) == 4
        assert code_of(state.history, "chat:a") == 107  # the third would pass 10 KB
        assert len(state.history("chat:a", limit=1).publications) == 1  # a smaller one still fits
    with state.call():
        assert len(state.history("chat:a").publications) == 4


def test_a_listing_of_long_names_is_held_to_the_reply_budget(clock: Clock) -> None:
    state = ServerState([NamespacePolicy("chat", 10, 60.0)], clock=clock, max_reply_bytes=4 * 1024 * 1024)
    for n in range(5):
        state.publish(f"chat:{n}" + "m" * 1024 * 1024, b"x")
    assert code_of(state.channel_names, "chat:*") == 107
    assert len(state.channel_names("chat:[01]*")) == 2


def test_max_channels_counts_channels_made_by_history_reads_too(clock: Clock) -> None:
    state = ServerState([NamespacePolicy("chat", 10, 60.0)], clock=clock, max_channels=2)
    state.publish("chat:a", b"x")
    state.history("chat:b")  # a read starts the stream: a channel held
    assert code_of(state.publish, "chat:c", b"x") == 100
    assert code_of(state.history, "chat:c") == 100
    assert state.publish("chat:a", b"y")[0] == 2
    clock.advance(61)  # both idle past history_ttl: gone, room for new ones
    assert state.publish("chat:c", b"x")[0] == 1
