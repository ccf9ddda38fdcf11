"""Records straight from the record batches aiokafka has fetched, without `getmany()`.

`getmany()` makes a `ConsumerRecord` (eleven fields, a headers tuple) of every record, through a
generator step per record: about 1.2 µs each, a tenth of what the relay spends on a record. The
batches aiokafka keeps in its fetcher yield their records from C at about 0.1 µs; this module hands
those records (with `offset`, `timestamp`, `key`, `value`, `headers`) to the source in slices.

It does what `getmany()` → `Fetcher.fetched_records()` → `FetchResult.getall()` →
`PartitionRecords` do (aiokafka 0.14), and only that: records of a partition that was paused,
revoked or sought since its fetch are dropped (`FetchResult.check_assignment`); the partition's
position moves to after what was taken, or past a whole batch once it is used up (control batches,
offsets compacted away); records before the fetch offset (a fetch that starts inside a batch) are
skipped; CRCs are checked; a fetch error is raised once no records came before it; an exhausted
result is removed and the fetcher told to fetch again. `read_committed` (aborted transactions) is
left to `getmany()`: the relay reads `read_uncommitted`, as it always has.

`FetchedRecords.usable(consumer)` says whether the installed aiokafka still has what this relies
on; when not, the source uses `getmany()` (tests/test_kafka_fetched.py fails loudly then).
"""

from __future__ import annotations

import asyncio
import time
from itertools import chain, islice
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.consumer import fetcher as aiokafka_fetcher
from aiokafka.errors import ConsumerStoppedError, CorruptRecordException

# What a raw record is: aiokafka's DefaultRecord (or LegacyRecord), read through these attributes.
RawRecord = Any
# The fetcher internals used here, by the names aiokafka 0.14 gives them.
_FETCHER_NEEDS = ("_records", "_notify", "_create_fetch_waiter", "_closed", "_check_crcs",
                  "_isolation_level")
_RESULT_NEEDS = ("check_assignment", "has_more", "_update_position")
_PARTITION_RECORDS_NEEDS = ("_records", "next_fetch_offset", "_records_iterator")


class _Cursor:
    """Where taking stopped inside one fetched response of a partition."""

    __slots__ = ("batch", "records", "rest")

    def __init__(self, records: Any) -> None:
        self.records = records  # aiokafka's PartitionRecords
        self.batch: Any = None  # the record batch being taken from
        self.rest: Any = None  # its records not taken yet (an iterator)


class FetchedRecords:
    """Takes up to `max_records` records of the partitions aiokafka has fetched, per partition in
    order, moving aiokafka's positions as `getmany()` would."""

    def __init__(self, consumer: AIOKafkaConsumer) -> None:
        self._consumer = consumer
        self._fetcher = consumer._fetcher
        self._subscription = consumer._subscription
        self._cursors: dict[TopicPartition, _Cursor] = {}

    @staticmethod
    def usable(consumer: AIOKafkaConsumer) -> bool:
        """The consumer (started) has the internals this module reads, and reads uncommitted."""
        fetcher = getattr(consumer, "_fetcher", None)
        result_type = getattr(aiokafka_fetcher, "FetchResult", None)
        records_type = getattr(aiokafka_fetcher, "PartitionRecords", None)
        if fetcher is None or result_type is None or records_type is None:
            return False
        if not all(hasattr(fetcher, name) for name in _FETCHER_NEEDS):
            return False
        if not all(hasattr(result_type, name) for name in _RESULT_NEEDS):
            return False
        if "_partition_records" not in _assigned(result_type) \
                or not set(_PARTITION_RECORDS_NEEDS) <= _assigned(records_type):
            return False
        subscription = getattr(consumer, "_subscription", None)
        return (fetcher._isolation_level == aiokafka_fetcher.READ_UNCOMMITTED
                and hasattr(subscription, "fetch_context")
                and hasattr(subscription, "reassignment_in_progress")
                and hasattr(getattr(consumer, "_coordinator", None), "check_errors"))

    async def take(self, timeout: float, max_records: int) -> dict[TopicPartition, list[RawRecord]]:
        """Records fetched so far, waiting up to `timeout` seconds for some (`getmany()`'s contract)."""
        fetcher = self._fetcher
        if fetcher._closed:
            raise ConsumerStoppedError()
        self._consumer._coordinator.check_errors()
        with self._subscription.fetch_context():
            while True:
                # Records fetched before a rebalance finished may not be ours any more.
                if self._subscription.reassignment_in_progress:
                    await self._subscription.wait_for_assignment()
                started = time.monotonic()
                drained = self._drain(max_records)
                if drained or not timeout:
                    return drained
                waiter = fetcher._create_fetch_waiter()
                done, pending = await asyncio.wait([waiter], timeout=timeout)
                if not done or fetcher._closed:
                    for future in pending:
                        future.cancel()
                    return {}
                waiter.result()  # raises what the coordination failed with (authorization ...)
                timeout = max(0.0, timeout - (time.monotonic() - started))

    def _drain(self, left: int) -> dict[TopicPartition, list[RawRecord]]:
        fetcher = self._fetcher
        buffered = fetcher._records
        drained: dict[TopicPartition, list[RawRecord]] = {}
        for tp in list(buffered):
            result = buffered[tp]
            if type(result) is not aiokafka_fetcher.FetchResult:  # a FetchError
                if drained:
                    break  # raised on the next call, after these records
                del buffered[tp]
                fetcher._notify(fetcher._wait_consume_future)
                result.check_raise()
            records = self._take(tp, result, left)
            if not result.has_more():
                del buffered[tp]
                fetcher._notify(fetcher._wait_consume_future)  # fetch this partition again
                self._cursors.pop(tp, None)
            if records:
                drained[tp] = records
                left -= len(records)
                if left <= 0:
                    break
        for tp in [tp for tp in self._cursors if tp not in buffered]:
            _release(self._cursors.pop(tp).records)  # dropped by aiokafka (seek, revoke)
        return drained

    def _take(self, tp: TopicPartition, result: Any, limit: int) -> list[RawRecord]:
        """Up to `limit` records of one fetched response, moving the partition's position."""
        fetched = result._partition_records
        if not result.check_assignment(tp) or not result.has_more():
            _release(fetched)
            return []  # paused, revoked or sought since it was fetched: aiokafka dropped it
        cursor = self._cursors.get(tp)
        if cursor is None or cursor.records is not fetched:
            cursor = self._cursors[tp] = _Cursor(fetched)
        taken: list[RawRecord] = []
        while len(taken) < limit:
            if cursor.rest is None and not self._next_batch(cursor, tp):
                result._update_position()
                result._partition_records = None  # used up
                _release(fetched)
                return taken
            position = fetched.next_fetch_offset
            got = list(islice(cursor.rest, limit - len(taken)))
            if not got:  # the batch is used up; its end may lie past its last record (compaction)
                fetched.next_fetch_offset = max(position, cursor.batch.next_offset)
                cursor.batch = cursor.rest = None
                continue
            if got[0].offset < position:  # the fetch started inside this batch
                got = [r for r in got if r.offset >= position]
                if not got:
                    continue
            taken += got
            fetched.next_fetch_offset = got[-1].offset + 1
        result._update_position()
        return taken

    def _next_batch(self, cursor: _Cursor, tp: TopicPartition) -> bool:
        """Move to the next batch that has records for the consumer; False when none is left."""
        fetched = cursor.records
        batches = fetched._records
        while batches.has_next():
            batch = batches.next_batch()
            if self._fetcher._check_crcs and not batch.validate_crc():
                raise CorruptRecordException(f"Invalid CRC - {tp}")
            if batch.is_control_batch:  # transaction markers: never records for the consumer
                fetched.next_fetch_offset = max(fetched.next_fetch_offset, batch.next_offset)
                continue
            # A batch must not be asked for a record after its last (it reads past its end and
            # raises): chain() stops asking once it said there are no more.
            cursor.batch, cursor.rest = batch, chain(batch)
            return True
        return False


def _release(fetched: Any) -> None:
    """Let a fetched response go now. PartitionRecords and its record generator refer to each other,
    and the generator ends that only when it ran to its end, which it never does here: without this
    every fetched response (its ~1 MB of bytes) would wait for the cyclic garbage collector."""
    if fetched is not None:
        fetched._records_iterator = None


def _assigned(cls: type) -> set[str]:
    """The attribute names a class's __init__ uses (its bytecode's names): instance attributes
    cannot be checked on the class."""
    code = getattr(vars(cls).get("__init__"), "__code__", None)
    return set(code.co_names) if code is not None else set()
