"""The NATS reader's bookkeeping (relay/sources/nats/reader.py) without a server: deliveries are
fed as the pull connection cuts them, acks are read from what it writes. What is emitted, in
which order, and exactly which deliveries each commit acks (the real-server tests are in
tests/test_nats_source.py)."""

from __future__ import annotations

import asyncio

import pytest

from relay.sources.nats import Config, NatsReader, NatsSourceError
from relay.sources.nats.reader import COMMIT_INTERVAL, MIN_COMMIT_INTERVAL
from relay.sources.nats.wire import Delivery, PullWire
from tests.test_nats_wire import Transport


def delivery(seq: int, delivered: int = 1, dseq: int | None = None) -> Delivery:
    """A delivery of stream sequence `seq` (consumer sequence `dseq`, by default the same)."""
    reply = b"$JS.ACK.S.d.%d.%d.%d.1700000000000000000.0" % (delivered, seq, seq if dseq is None else dseq)
    return (b"s.%d" % seq, reply, b"", b"%d" % seq)


def acked(transport: Transport) -> list[int]:
    """The stream sequences of the acks written so far, in order (and forgets them)."""
    lines = transport.written.split(b"\r\n")
    transport.written = b""
    assert all(line in (b"", b"PUB") or line.startswith(b"PUB $JS.ACK.") for line in lines), lines
    return [int(line.split(b".")[5]) for line in lines if line.startswith(b"PUB ")]


def reader(ack_policy: str = "explicit") -> tuple[NatsReader, Transport]:
    """A reader of a durable acked per message (`explicit`) or up to a sequence (`all`)."""
    nats = NatsReader("jet", Config.model_validate({"type": "nats", "stream": "S", "ack_policy": ack_policy}))
    wire = PullWire(b"_INBOX.x")
    transport = Transport()
    wire.connection_made(transport)
    wire._handshaking = False
    nats._wire = wire
    return nats, transport


def offsets(nats: NatsReader, *seqs: int, delivered: int = 1) -> list[int]:
    return [m.offset for m in nats._accept([delivery(s, delivered) for s in seqs])]


def commit(nats: NatsReader, position: int) -> None:
    asyncio.run(nats.commit({"S": position}))


def test_a_sequence_delivered_twice_in_one_read_is_emitted_once() -> None:
    nats, transport = reader()
    assert offsets(nats, 1, 2, 2, 3) == [1, 2, 3]
    commit(nats, 4)
    assert acked(transport) == [1, 2, 3]


def test_each_commit_acks_exactly_what_was_emitted_before_the_position() -> None:
    nats, transport = reader()
    assert offsets(nats, 1, 2, 3) == [1, 2, 3]
    assert offsets(nats, 4, 5, 6) == [4, 5, 6]
    commit(nats, 1)
    assert acked(transport) == []
    commit(nats, 5)  # all of the first read and part of the second
    assert acked(transport) == [1, 2, 3, 4]
    assert len(nats._in_flight) == 2
    commit(nats, 5)
    assert acked(transport) == []
    commit(nats, 7)
    assert acked(transport) == [5, 6]
    assert len(nats._in_flight) == 0


def test_redeliveries_are_dropped_or_acked_again_and_the_rest_comes_in_stream_order() -> None:
    nats, transport = reader()
    assert offsets(nats, 1, 2, 3, 4, 5) == [1, 2, 3, 4, 5]
    commit(nats, 3)
    assert acked(transport) == [1, 2]
    # 4 and 3 are in flight (dropped), 2 was acked (its ack was lost: acked again), 7 and 6 are new.
    assert offsets(nats, 4, 7, 2, 6, 3, delivered=2) == [6, 7]
    assert acked(transport) == [2]
    commit(nats, 8)
    assert acked(transport) == [3, 4, 5, 6, 7]
    assert offsets(nats, 8, 9) == [8, 9]  # and new ones read as before


def test_a_lower_sequence_than_any_emitted_is_new_when_it_was_not_ours() -> None:
    # Another relay on the durable died: its message 3 comes here after 10..12.
    nats, transport = reader()
    assert offsets(nats, 10, 11, 12) == [10, 11, 12]
    assert offsets(nats, 3) == [3]
    commit(nats, 13)
    assert acked(transport) == [10, 11, 12, 3]  # in the order emitted, as the engine counts them


def test_a_durable_with_a_small_max_ack_pending_is_acked_more_often() -> None:
    # The server sends no more than max_ack_pending unacked messages: 100 acked every 50 ms is 2,000/s.
    def interval(max_ack_pending: int) -> float:
        config = Config.model_validate({"type": "nats", "stream": "S", "max_ack_pending": max_ack_pending})
        return NatsReader("jet", config).commit_interval
    assert interval(20_000) == interval(5000) == COMMIT_INTERVAL == 0.05  # the default durable and a big one
    assert interval(100_000) == COMMIT_INTERVAL
    assert interval(1000) == 0.01
    assert interval(100) == interval(1) == MIN_COMMIT_INTERVAL


def test_the_engine_cap_is_above_the_servers_window() -> None:
    # The server never hands out more than max_ack_pending: the engine's pause never comes first.
    config = Config.model_validate({"type": "nats", "stream": "S", "max_ack_pending": 100})
    assert NatsReader("jet", config).max_in_flight == 101


def test_with_ack_policy_all_a_commit_sends_one_ack_the_highest_settled() -> None:
    nats, transport = reader("all")
    assert offsets(nats, 1, 2, 3) == [1, 2, 3]
    assert offsets(nats, 4, 5, 6) == [4, 5, 6]
    commit(nats, 5)
    assert acked(transport) == [4]  # settles 1..4 on the server
    commit(nats, 5)
    assert acked(transport) == []
    commit(nats, 7)
    assert acked(transport) == [6]


def test_with_ack_policy_all_no_ack_passes_an_unsettled_message_of_ours() -> None:
    # 3 came after 10..12 (the start-up hold gave up): an ack of 10 would settle 3 before it was.
    nats, transport = reader("all")

    def read(*deliveries: Delivery) -> list[int]:
        return [m.offset for m in nats._accept(list(deliveries))]

    assert read(delivery(10, dseq=1), delivery(11, dseq=2), delivery(12, dseq=3)) == [10, 11, 12]
    assert read(delivery(3, dseq=4)) == [3]
    commit(nats, 12)  # 10 and 11 settled, 12 and 3 not
    assert acked(transport) == []
    assert read(delivery(11, 2, dseq=5), delivery(10, 2, dseq=6)) == []  # settled, their ack waits
    commit(nats, 13)
    assert acked(transport) == [12]


def test_with_ack_policy_all_another_client_on_the_durable_stops_the_reader_before_emitting() -> None:
    nats, _ = reader("all")
    assert offsets(nats, 1, 2, 3) == [1, 2, 3]
    with pytest.raises(NatsSourceError, match=r"another client reads durable 'centrifugo-relay' too \(its "
                                              r"deliveries 4 to 5 went there\)"):
        nats._accept([delivery(4, dseq=6)])
    nats, _ = reader("all")
    with pytest.raises(NatsSourceError, match="deliveries some of 1 to 4 went there"):
        nats._accept([delivery(1), delivery(2), delivery(3, dseq=4)])
    nats, _ = reader("explicit")  # acks of its own only: others may share the durable
    assert offsets(nats, 1, 2, 3) == [1, 2, 3]
    assert [m.offset for m in nats._accept([delivery(4, dseq=6)])] == [4]
