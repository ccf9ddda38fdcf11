"""/metrics and /readyz of a real relay process: every figure equals a count the test observed
itself (Centrifugo's History, the dead letter file), never the relay's logs."""

from __future__ import annotations

import json
import re
import time
import uuid
from pathlib import Path

from relay.sources.engine import EMIT_CHUNK
from tests.harness.centrifugo import RealCentrifugo
from tests.harness.history import history, wait_for_count
from tests.harness.relay_process import RelayProcess

SPEC_METRICS = {
    "relay_source_messages_total": "counter", "relay_publications_total": "counter",
    "relay_sink_batches_total": "counter", "relay_sink_batch_size": "histogram",
    "relay_sink_retries_total": "counter",
    "relay_publish_latency_seconds": "histogram", "relay_in_flight": "gauge", "relay_kafka_lag": "gauge",
    "relay_file_checkpoints_total": "counter", "relay_files_watched": "gauge",
    "relay_dead_letters_total": "counter", "relay_ready": "gauge",
    "relay_dead_letter_write_errors_total": "counter",
    "relay_redis_pending": "gauge", "relay_redis_lag": "gauge", "relay_source_lag": "gauge",
    "relay_nats_pending": "gauge", "relay_nats_ack_pending": "gauge",  # issue 18: pending per consumer
}


def sink(server: RealCentrifugo) -> str:
    return f"""
[sink]
address = "{server.grpc_address}"
api_key_env = "CENTRIFUGO_GRPC_API_KEY"
retry = {{ initial_backoff = "20ms", max_backoff = "200ms" }}
"""


def burst(count: int) -> str:
    """A ticker that emits `count` messages at once, so they travel as one batch, and an idle one
    that keeps the relay running after the burst (with every source finished, `relay run` exits)."""
    return f"""
[sources.burst]
type = "ticker"
interval = "0s"
count = {count}
data = '{{"seq": {{{{ seq }}}}}}'

[sources.idle]
type = "ticker"
interval = "1h"
"""


def wait_metric(relay: RelayProcess, name: str, labels: str, value: float, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while relay.metric(name, labels) != value and time.monotonic() < deadline:
        time.sleep(0.05)
    assert relay.metric(name, labels) == value, (name, labels, relay.logs()[-2000:])


def types(text: str) -> dict[str, str]:
    return dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, re.MULTILINE))


def test_sink_down_then_up_readyz_and_counts(fresh_centrifugo: RealCentrifugo, tmp_path: Path) -> None:
    server = fresh_centrifugo
    server.stop()
    n = EMIT_CHUNK  # one routing chunk, so one batch: every publication is in the attempts that fail
    channel = f"chat:metrics-{uuid.uuid4().hex[:8]}"
    route = f'[[routes]]\nsource = "burst"\nchannel = "{channel}"\n'
    relay = RelayProcess(tmp_path, sink(server) + burst(n) + route,
                         env={"CENTRIFUGO_GRPC_API_KEY": server.api_key}).start()
    try:
        relay.wait_http()
        wait_metric(relay, "relay_in_flight", 'source="burst"', n)  # emitted, waiting for the sink
        code, body = relay.get("/readyz")
        assert code == 503 and body.startswith("not ready: sink not connected: UNAVAILABLE"), body
        assert relay.metric("relay_ready") == 0
        assert relay.get("/healthz") == (200, "ok\n")
        time.sleep(0.5)  # a few retries while it is down
        server.start()
        pubs = wait_for_count(server.grpc_address, channel, n, server.api_key, timeout=15)
        wait_metric(relay, "relay_in_flight", 'source="burst"', 0)
        deadline = time.monotonic() + 10
        while relay.get("/readyz")[0] != 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert relay.get("/readyz") == (200, "ready\n")
        assert relay.metric("relay_ready") == 1
        _, text = relay.get("/metrics")
    finally:
        relay.stop()
    assert [json.loads(p.data)["seq"] for p in pubs] == list(range(1, n + 1))
    assert types(text) == SPEC_METRICS  # every SPEC metric is exported, with its type
    sample = lambda name, labels="": relay_sample(text, name, labels)  # noqa: E731
    assert sample("relay_source_messages_total", 'source="burst"') == n
    assert sample("relay_publications_total", 'result="ok"') == n
    # Each publication that needed a retry counts once, however many attempts it took.
    assert sample("relay_publications_total", 'result="retried"') == n
    assert sample("relay_publications_total", 'result="dead_letter"') == 0
    assert sample("relay_sink_retries_total", 'reason="unavailable"') >= 2
    assert sample("relay_sink_batches_total") == 1  # the one batch, answered once Centrifugo was back
    assert sample("relay_publish_latency_seconds_count") == n
    assert sample("relay_publish_latency_seconds_bucket", 'le="0.25"') == 0  # they waited > 0.5 s
    assert sample("relay_in_flight", 'source="burst"') == 0


def relay_sample(text: str, name: str, labels: str = "") -> float:
    want = f"{name}{{{labels}}}" if labels else name
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(want + " ")]
    assert len(values) <= 1
    return values[0] if values else 0.0


def test_dead_letters_and_publications_equal_what_the_file_and_history_hold(
        real_centrifugo: RealCentrifugo, tmp_path: Path) -> None:
    server = real_centrifugo
    n = 30
    ok = f"chat:dl-ok-{uuid.uuid4().hex[:8]}"
    routes = f"""
[[routes]]
source = "burst"
channel = "{ok}"
continue = true

[[routes]]   # Centrifugo answers 102: unknown namespace
source = "burst"
channel = "nowhere:x"
continue = true

[[routes]]   # the template cannot be filled: a dead letter before it reaches the sink
source = "burst"
channel = "chat:never"
data = '{{"v": {{{{ json.missing }}}}}}'
"""
    relay = RelayProcess(tmp_path, sink(server) + burst(n) + routes,
                         env={"CENTRIFUGO_GRPC_API_KEY": server.api_key}).start()
    try:
        relay.wait_http()
        assert len(wait_for_count(server.grpc_address, ok, n, server.api_key, timeout=15)) == n
        wait_metric(relay, "relay_in_flight", 'source="burst"', 0)
        _, text = relay.get("/metrics")
    finally:
        relay.stop()
    lines = [json.loads(line) for line in (tmp_path / "state" / "dead-letter.jsonl").read_text().splitlines()]
    by_reason: dict[str, int] = {}
    for line in lines:
        kind = "template" if "template" in line["reason"] else f"code_{line['error_code']}"
        by_reason[kind] = by_reason.get(kind, 0) + 1
    assert by_reason == {"code_102": n, "template": n}
    assert len(history(server.grpc_address, ok, server.api_key)) == n
    sample = lambda name, labels="": relay_sample(text, name, labels)  # noqa: E731
    assert sample("relay_source_messages_total", 'source="burst"') == n
    assert sample("relay_publications_total", 'result="ok"') == n
    assert sample("relay_publications_total", 'result="dead_letter"') == len(lines) == 2 * n
    assert sample("relay_dead_letters_total", 'reason="code_102"') == n
    assert sample("relay_dead_letters_total", 'reason="template"') == n
    assert sample("relay_publications_total", 'result="retried"') == 0
    assert sample("relay_publish_latency_seconds_count") == n


def test_bulk_latency_observation_matches_prometheus_buckets() -> None:
    """observe_latencies uses the histogram's internals; it must bucket exactly as observe() does."""
    from prometheus_client import CollectorRegistry, Histogram

    from relay import metrics

    values = [0.0, 0.0005, 0.001, 0.0011, 0.01, 0.3, 29.9, 30.0, 31.0, 1e9]
    reference = Histogram("reference_seconds", "x", registry=CollectorRegistry(),
                          buckets=metrics.PUBLISH_LATENCY._upper_bounds[:-1])
    for value in values:
        reference.observe(value)

    def samples(hist: Histogram) -> dict[str, float]:
        return {s.labels.get("le", s.name.rsplit("_", 1)[-1]): s.value
                for metric in hist.collect() for s in metric.samples if not s.name.endswith("_created")}

    before = samples(metrics.PUBLISH_LATENCY)
    metrics.observe_latencies(values)
    after = samples(metrics.PUBLISH_LATENCY)
    assert {k: round(after[k] - before[k], 6) for k in after} == {k: round(v, 6) for k, v in samples(reference).items()}
