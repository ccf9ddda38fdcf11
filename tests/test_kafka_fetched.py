"""The Kafka source reads records from aiokafka's fetched record batches (relay/sources/kafka/fetched.py),
not through getmany(): against a real broker, every record arrives once and in order where that
reading has to keep aiokafka's bookkeeping right (fetches that start inside a batch after a pause,
transaction markers between records), on both reading paths."""

from __future__ import annotations

import asyncio
import gc
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.consumer import fetcher as aiokafka_fetcher

from relay.sources.kafka.fetched import FetchedRecords
from tests.harness.kafka import KafkaBroker, Record
from tests.test_kafka_source import Collector, committed_becomes, reader, running, source_for, unique

pytestmark = pytest.mark.kafka


@pytest.fixture(params=["fetched", "getmany"])
def path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each test runs on the fast path and on the getmany() fallback (an aiokafka it does not know)."""
    if request.param == "getmany":
        monkeypatch.setattr(FetchedRecords, "usable", staticmethod(lambda consumer: False))
    return str(request.param)


async def settle_all(emit: Collector, count: int) -> None:
    """Settle what arrived, a little at a time, until `count` arrived (the cap pauses in between)."""
    settled = 0
    while settled < count:
        await emit.wait_for(settled + 1)
        for message in emit.messages[settled:]:
            message.settle()
        settled = len(emit.messages)
        await asyncio.sleep(0.01)


async def test_the_installed_aiokafka_is_read_from_its_fetched_batches(kafka_broker: KafkaBroker) -> None:
    """Breaks loudly when an aiokafka upgrade changed the internals fetched.py reads (the relay
    would silently fall back to the slower getmany())."""
    topic, group = unique("fast"), unique("g")
    await kafka_broker.create_topic(topic, 1)
    await kafka_broker.produce(topic, [b"1"])
    emit = Collector()
    source = source_for(kafka_broker, topic, group)
    async with running(source, emit):
        await emit.wait_for(1)
        assert reader(source)._fetched is not None, "aiokafka's fetcher changed: update fetched.py"


async def test_pauses_inside_large_batches_lose_nothing_and_repeat_nothing(
        kafka_broker: KafkaBroker, path: str) -> None:
    """The producer writes batches of thousands of records; a cap of 120 pauses the partition in the
    middle of them again and again, so each fetch after a resume starts inside a batch and its
    first reads (500 records) lie wholly before the position."""
    topic, group = unique("inside"), unique("g")
    await kafka_broker.create_topic(topic, 1)
    count = 6000
    await kafka_broker.produce(topic, [Record(b"%d" % i, key=f"k{i % 7}", headers=[("n", str(i))])
                                       for i in range(count)])
    emit = Collector()
    async with running(source_for(kafka_broker, topic, group, max_in_flight_per_partition=120), emit):
        await settle_all(emit, count)
        await committed_becomes(kafka_broker, group, topic, {0: count}, partitions=1)
    assert [m.offset for m in emit.messages] == list(range(count))
    assert [m.data for m in emit.messages] == [b"%d" % i for i in range(count)]
    last = emit.messages[-1]
    assert (last.key, last.headers, last.attributes["offset"]) == (f"k{(count - 1) % 7}", {"n": str(count - 1)},
                                                                    count - 1)


async def test_transaction_markers_between_records_are_skipped(kafka_broker: KafkaBroker, path: str) -> None:
    """Committed transactions leave a control batch (a marker taking an offset) after each; the
    records between come through once, in order, and the relay commits past the last record."""
    topic, group = unique("txn"), unique("g")
    await kafka_broker.create_topic(topic, 1)
    producer = AIOKafkaProducer(bootstrap_servers=kafka_broker.bootstrap, transactional_id=unique("tx"))
    await producer.start()
    try:
        for txn in range(5):
            async with producer.transaction():
                for i in range(10):
                    await producer.send(topic, b"%d-%d" % (txn, i), partition=0)
    finally:
        await producer.stop()
    ends = await kafka_broker.end_offsets(topic, 1)
    assert ends[0] == 55, "five markers among the fifty records"
    emit = Collector()
    async with running(source_for(kafka_broker, topic, group), emit):
        await settle_all(emit, 50)
        await asyncio.sleep(0.5)
        await committed_becomes(kafka_broker, group, topic, {0: emit.messages[-1].offset + 1}, partitions=1)
    values: list[Any] = [m.data for m in emit.messages]
    assert values == [b"%d-%d" % (t, i) for t in range(5) for i in range(10)]
    offsets = [m.offset for m in emit.messages]
    assert offsets == sorted(set(offsets)) and offsets[-1] == 53


async def test_used_up_fetched_responses_are_freed_without_the_cyclic_collector(
        kafka_broker: KafkaBroker) -> None:
    """Each fetched response (up to 1 MB) is let go once its records were taken: with the cyclic
    garbage collector off, at most the responses in use stay alive (RSS stays flat on a backlog)."""
    topic, group = unique("freed"), unique("g")
    await kafka_broker.create_topic(topic, 1)
    count = 6000
    await kafka_broker.produce(topic, [b"%06d" % i + b"x" * 1000 for i in range(count)])  # ~6 MB: many fetches
    emit = Collector()
    gc.collect()
    gc.disable()
    try:
        async with running(source_for(kafka_broker, topic, group), emit):
            await settle_all(emit, count)
            alive = [o for o in gc.get_objects() if isinstance(o, aiokafka_fetcher.PartitionRecords)]
    finally:
        gc.enable()
    assert [m.offset for m in emit.messages] == list(range(count))
    assert len(alive) <= 2, f"{len(alive)} fetched responses still alive after {count} records"
