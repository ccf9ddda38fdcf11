"""The NATS reader's bookkeeping (relay/sources/nats/reader.py) without a server: deliveries are
fed as the pull connection cuts them, acks are read from what it writes. What is emitted, in
which order, and exactly which deliveries each commit acks (the real-server tests are in
tests/test_nats_source.py)."""

from __future__ import annotations

import asyncio

from relay.sources.nats import Config, NatsReader
from relay.sources.nats.reader import COMMIT_INTERVAL, MIN_COMMIT_INTERVAL
from relay.sources.nats.wire import Delivery, PullWire
from tests.test_nats_wire import Transport


def delivery(seq: int, delivered: int = 1) -> Delivery:
    return (b"s.%d" % seq, b"$JS.ACK.S.d.%d.%d.%d.1700000000000000000.0" % (delivered, seq, seq), b"", b"%d" % seq)


def acked(transport: Transport) -> list[int]:
    """The stream sequences of the acks written so far, in order (and forgets them)."""
    lines = transport.written.split(b"\r\n")
    transport.written = b""
    assert all(line in (b"", b"PUB") or line.startswith(b"PUB $JS.ACK.") for line in lines), lines
    return [int(line.split(b".")[5]) for line in lines if line.startswith(b"PUB ")]


def reader() -> tuple[NatsReader, Transport]:
    nats = NatsReader("jet", Config.model_validate({"type": "nats", "stream": "S"}))
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
    assert interval(5000) == COMMIT_INTERVAL == 0.05  # the default durable: as before
    assert interval(100_000) == COMMIT_INTERVAL
    assert interval(1000) == 0.01
    assert interval(100) == interval(1) == MIN_COMMIT_INTERVAL


def test_the_engine_cap_is_above_the_servers_window() -> None:
    # The server never hands out more than max_ack_pending: the engine's pause never comes first.
    config = Config.model_validate({"type": "nats", "stream": "S", "max_ack_pending": 100})
    assert NatsReader("jet", config).max_in_flight == 101
