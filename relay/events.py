"""Internal events: what happened inside the relay, as typed values that update metrics and log.

The pipeline and the sink say what happened (`events.PublicationsAccepted(n).emit()`); which
Prometheus series move and what goes to the log is decided here, once, so a figure on /metrics
always means the same thing wherever it is counted (SPEC "Metrics"; the idea is Vector's
`internal_events`).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from operator import attrgetter

from relay import metrics
from relay.message import Message

_source_of = attrgetter("source")

log = logging.getLogger("relay.pipeline")
sink_log = logging.getLogger("relay.sink")
dead_letter_log = logging.getLogger("relay.dead_letter")
source_log = logging.getLogger("relay.sources")


@dataclass(slots=True, frozen=True)
class ReadinessProbed:
    """Where the relay's readiness comes from; /metrics asks it at every scrape."""

    probe: Callable[[], bool]

    def emit(self) -> None:
        probe = self.probe
        metrics.READY.set_function(lambda: 1.0 if probe() else 0.0)


@dataclass(slots=True, frozen=True)
class SourceUnreachable:
    """A source's input could not be reached (connect) or was lost (read); the engine retries."""

    source: str
    reason: str
    attempt: int = 1
    lost: bool = False

    def emit(self) -> None:
        extra = {"source": self.source, "attempt": self.attempt, "reason": self.reason}
        if self.lost:
            source_log.warning("source %s: connection lost (%s); reconnecting", self.source, self.reason,
                               extra=extra)
        elif self.attempt in (1, 10) or self.attempt % 100 == 0:
            source_log.warning("source %s: not reachable yet (%s); retrying, attempt %d", self.source,
                               self.reason, self.attempt, extra=extra)


@dataclass(slots=True, frozen=True)
class SourceCommitFailed:
    """A source could not commit settled positions; the next commit tries again."""

    source: str
    reason: str

    def emit(self) -> None:
        source_log.warning("source %s: commit failed: %s", self.source, self.reason,
                           extra={"source": self.source, "reason": self.reason})


@dataclass(slots=True, frozen=True)
class MessagesReceived:
    """A source handed `count` messages to the pipeline; `in_flight` of them made publications."""

    source: str
    count: int
    in_flight: int

    def emit(self) -> None:
        metrics.SOURCE_MESSAGES.labels(source=self.source).inc(self.count)
        if self.in_flight:
            metrics.IN_FLIGHT.labels(source=self.source).inc(self.in_flight)


@dataclass(slots=True, frozen=True)
class MessagesSettled:
    """Every publication of these messages was accepted or dead-lettered: their positions may commit."""

    messages: Iterable[Message]

    def emit(self) -> None:
        now = time.monotonic()
        messages = self.messages if isinstance(self.messages, list) else list(self.messages)
        if not messages:
            return
        metrics.observe_latencies([now - msg.read_at for msg in messages])
        sources = Counter(map(_source_of, messages))  # counted in C: this runs for every message
        for source, count in sources.items():
            metrics.IN_FLIGHT.labels(source=source).dec(count)


@dataclass(slots=True, frozen=True)
class MessagesAbandoned:
    """A pipeline was torn down with messages unsettled (drain timed out); their sources replay them."""

    def emit(self) -> None:
        for metric in metrics.IN_FLIGHT.collect():
            for sample in metric.samples:
                metrics.IN_FLIGHT.labels(source=sample.labels["source"]).set(0)


@dataclass(slots=True, frozen=True)
class PublicationsAccepted:
    """Centrifugo accepted `count` publications."""

    count: int

    def emit(self) -> None:
        if self.count:
            metrics.PUBLICATIONS.labels(result="ok").inc(self.count)


@dataclass(slots=True, frozen=True)
class DeadLettered:
    """One line was written to the dead letter file (one publication, or one channel of a broadcast)."""

    message: Message
    reason: str
    code: int = 0
    channel: str = ""

    def emit(self) -> None:
        label = metrics.reason_label(self.code, self.reason)
        metrics.DEAD_LETTERS.labels(reason=label).inc()
        metrics.PUBLICATIONS.labels(result="dead_letter").inc()
        log.warning("dead letter: %s at %s: %s", self.message.source, self.message.position, self.reason,
                    extra={"source": self.message.source, "position": self.message.position,
                           "channel": self.channel, "error_code": self.code, "reason": label})


@dataclass(slots=True, frozen=True)
class DeadLetterWriteFailed:
    """An attempt to write the dead letter file failed; `lines` wait for the next one."""

    problem: str
    lines: int
    attempt: int

    def emit(self) -> None:
        metrics.DEAD_LETTER_WRITE_ERRORS.inc()
        if self.attempt in (1, 10) or self.attempt % 100 == 0:
            dead_letter_log.error("%s; %d dead letter line(s) wait, their messages unacknowledged; "
                                  "retrying (attempt %d)", self.problem, self.lines, self.attempt,
                                  extra={"attempt": self.attempt})


@dataclass(slots=True, frozen=True)
class DeadLetterWriteRecovered:
    """The dead letter file could be written again; the lines that waited are in it."""

    path: str
    lines: int
    failed_attempts: int

    def emit(self) -> None:
        dead_letter_log.warning("dead letter file %s written again: %d waiting line(s) written after %d "
                                "failed attempt(s)", self.path, self.lines, self.failed_attempts)


@dataclass(slots=True, frozen=True)
class SinkRetrying:
    """A sink call failed in a way worth retrying; `publications` of the batch are retried for the
    first time (each publication counts once under result="retried", however often it is retried)."""

    reason: str
    attempt: int
    publications: int

    def emit(self) -> None:
        metrics.SINK_RETRIES.labels(reason=self.reason).inc()
        if self.publications:
            metrics.PUBLICATIONS.labels(result="retried").inc(self.publications)
        if self.attempt in (1, 10) or self.attempt % 100 == 0:
            sink_log.warning("sink: retrying (%s), attempt %d", self.reason, self.attempt,
                             extra={"reason": self.reason, "attempt": self.attempt})


@dataclass(slots=True, frozen=True)
class BatchSent:
    """One Batch request of `size` publications reached Centrifugo and was answered."""

    size: int

    def emit(self) -> None:
        metrics.SINK_BATCHES.inc()
        metrics.SINK_BATCH_SIZE.observe(self.size)


@dataclass(slots=True, frozen=True)
class FilesWatched:
    """A file source follows `change` more (or, negative, fewer) files."""

    change: int

    def emit(self) -> None:
        metrics.FILES_WATCHED.inc(self.change)


@dataclass(slots=True, frozen=True)
class CheckpointsWritten:
    """A checkpoint file was written (and synced) to disk."""

    def emit(self) -> None:
        metrics.FILE_CHECKPOINTS.inc()


@dataclass(slots=True, frozen=True)
class RedisGroupMeasured:
    """Pending entries and lag of a Redis source's consumer group, per stream."""

    pending: Mapping[str, int]
    lag: Mapping[str, int]

    def emit(self) -> None:
        for stream, count in self.pending.items():
            metrics.REDIS_PENDING.labels(stream=stream).set(count)
        for stream, count in self.lag.items():
            metrics.REDIS_LAG.labels(stream=stream).set(count)


@dataclass(slots=True, frozen=True)
class SourceLagMeasured:
    """What a source's streams have pending (its reader's `pending()`); streams gone stop being reported."""

    source: str
    lags: Mapping[str, int]
    gone: Iterable[str] = ()

    def emit(self) -> None:
        for stream, lag in self.lags.items():
            metrics.SOURCE_LAG.labels(source=self.source, stream=stream).set(lag)
        for stream in self.gone:
            with contextlib.suppress(KeyError):
                metrics.SOURCE_LAG.remove(self.source, stream)


@dataclass(slots=True, frozen=True)
class KafkaLagMeasured:
    """Consumer lag of the partitions a Kafka source owns; partitions it gave up stop being reported."""

    lags: Mapping[tuple[str, int], int]
    gone: Iterable[tuple[str, int]] = ()

    def emit(self) -> None:
        for (topic, partition), lag in self.lags.items():
            metrics.KAFKA_LAG.labels(topic=topic, partition=str(partition)).set(lag)
        for topic, partition in self.gone:
            with contextlib.suppress(KeyError):
                metrics.KAFKA_LAG.remove(topic, str(partition))


@dataclass(slots=True, frozen=True)
class NatsPendingMeasured:
    """A NATS source's durable consumer: messages not yet delivered to it, and delivered but unacked."""

    source: str
    consumer: str
    pending: int
    ack_pending: int

    def emit(self) -> None:
        metrics.NATS_PENDING.labels(source=self.source, consumer=self.consumer).set(self.pending)
        metrics.NATS_ACK_PENDING.labels(source=self.source, consumer=self.consumer).set(self.ack_pending)
