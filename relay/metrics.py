"""Every Prometheus metric the relay exports, defined in one place (SPEC "Metrics").

The relay's own code moves them through typed events (relay/events.py), so each figure is counted
in exactly one place. Labels never carry secrets: only source names, result kinds, reasons,
topics and partitions.
"""

from __future__ import annotations

from bisect import bisect_right

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

# `*_created` timestamps double the series and no dashboard reads them.
disable_created_metrics()  # type: ignore[no-untyped-call]
REGISTRY = CollectorRegistry(auto_describe=True)

SOURCE_MESSAGES = Counter("relay_source_messages", "Messages read from a source.", ["source"],
                          registry=REGISTRY)
PUBLICATIONS = Counter(
    "relay_publications", "Publications by result: ok (accepted by Centrifugo), dead_letter (one per dead "
    "letter line), retried (publications that needed at least one retry; each counts once).",
    ["result"], registry=REGISTRY)
SINK_BATCHES = Counter("relay_sink_batches", "Batches sent to Centrifugo.", registry=REGISTRY)
SINK_BATCH_SIZE = Histogram(
    "relay_sink_batch_size", "Publications per Batch call Centrifugo answered.", registry=REGISTRY,
    buckets=(1, 10, 50, 100, 200, 300, 400, 500, 1000, 2500, 10000))
SINK_RETRIES = Counter(
    "relay_sink_retries", "Sink calls retried, by reason (unavailable, deadline_exceeded, unauthenticated, "
    "temporary_error ...).", ["reason"], registry=REGISTRY)
PUBLISH_LATENCY = Histogram(
    "relay_publish_latency_seconds", "From source read to accepted by Centrifugo.", registry=REGISTRY,
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
IN_FLIGHT = Gauge("relay_in_flight", "Messages emitted and not yet settled.", ["source"], registry=REGISTRY)
KAFKA_LAG = Gauge("relay_kafka_lag", "High watermark minus committed offset.", ["topic", "partition"],
                  registry=REGISTRY)
REDIS_PENDING = Gauge("relay_redis_pending", "Entries read by the group and not yet acknowledged.",
                      ["stream"], registry=REGISTRY)
REDIS_LAG = Gauge("relay_redis_lag", "Entries not yet read by the group.", ["stream"], registry=REGISTRY)
SOURCE_LAG = Gauge("relay_source_lag", "Messages of a stream not yet read or not yet committed, as its "
                   "source counts them (rows pending in an outbox partition ...).", ["source", "stream"],
                   registry=REGISTRY)
NATS_PENDING = Gauge("relay_nats_pending", "Messages of the stream not yet delivered to the durable consumer.",
                     ["source", "consumer"], registry=REGISTRY)
NATS_ACK_PENDING = Gauge("relay_nats_ack_pending", "Messages delivered to the durable consumer and not yet acked.",
                         ["source", "consumer"], registry=REGISTRY)
FILE_CHECKPOINTS = Counter("relay_file_checkpoints", "Checkpoint files written.", registry=REGISTRY)
FILES_WATCHED = Gauge("relay_files_watched", "Files being tailed.", registry=REGISTRY)
DEAD_LETTERS = Counter("relay_dead_letters", "Dead letters written, by reason.", ["reason"],
                       registry=REGISTRY)
DEAD_LETTER_WRITE_ERRORS = Counter(
    "relay_dead_letter_write_errors", "Failed attempts to write the dead letter file (a full disk, a path "
    "that cannot be a file); its messages wait, unacknowledged, and are retried.", registry=REGISTRY)
READY = Gauge("relay_ready", "1 while sources run and the sink answers.", registry=REGISTRY)


def reason_label(code: int, reason: str) -> str:
    """A short, bounded label for a dead letter reason (never the message text itself)."""
    if code:
        return f"code_{code}"
    lowered = reason.lower()
    for word in ("template", "json", "channel", "oversized", "max_line_bytes", "no route", "empty",
                 "too large", "retries exhausted", "method", "utf-8"):
        if word in lowered:
            return word.replace(" ", "_").replace("-", "")
    return "other"


def observe_latencies(seconds: list[float]) -> None:
    """Observe many latencies at once: one increment per bucket rather than one lock per message.

    This runs for every settled message, the relay's hottest path. It relies on prometheus-client's
    Histogram internals (`_upper_bounds`, `_buckets`, `_sum`); tests/test_metrics.py checks the
    exported histogram, so a change there fails a test rather than skewing figures.
    """
    hist = PUBLISH_LATENCY
    ordered = sorted(seconds)  # then one search per bucket bound, not one per message
    below = 0
    for bucket, bound in zip(hist._buckets, hist._upper_bounds, strict=True):
        upto = bisect_right(ordered, bound)  # values <= bound, as Prometheus' `le` counts them
        if upto > below:
            bucket.inc(upto - below)
            below = upto
    hist._sum.inc(sum(ordered))
