"""The benchmarks still run: `bench/run.py --quick` on its cheap sections, the report from the committed
figures, and (with the suite's Kafka broker) the Kafka benchmarks at tiny counts. Figures are not
checked here, only that every piece runs and says what it measured."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bench import (
    centrifugo_bench,
    kafka_bench,
    latency_bench,
    nats_bench,
    nats_source_bench,
    postgres_bench,
    report,
    run,
)
from tests.harness.kafka import KafkaBroker

ROOT = Path(__file__).resolve().parent.parent


def test_quick_run_writes_the_report_and_plots(tmp_path: Path) -> None:
    out = tmp_path / "BENCHMARKS.md"
    assert run.main(["--quick", "--only", "file,sizes,latency-file", "--out", str(out)]) == 0
    text = out.read_text()
    assert "--quick" in text and "## The machine" in text
    assert "(1) file → relay serve, 50 channels, lines/s" in text
    assert "(14) file → relay serve, 50 channels ÷ raw Batch with keys, 4 in flight" in text
    assert "(4) p99 ms, file source at 1,000 msg/s" in text
    assert "(5) relay peak RSS" in text
    for plot in ("throughput", "rss", "latency", "sizes"):
        assert (tmp_path / "plots" / f"{plot}.png").stat().st_size > 1000
        assert f"](plots/{plot}.png)" in text
    figures = json.loads((tmp_path / "results.json").read_text())["results"]
    # Issue 14: the file is drained spread over channels (all lanes busy) and to one channel (one lane),
    # each counted over the channels it went to.
    file = figures["file"]["figures"]
    assert file["relay file→serve, 50 channels"]["lines"] == run.QUICK.file_lines
    assert file["relay file→serve, 50 channels"]["channels"] == 50
    assert file["relay file→serve, 1 channel"]["lines"] == run.QUICK.file_lines
    assert file["relay file→serve, 1 channel"]["cpu_us_per_record"] > 0
    assert {r["messages"] for r in figures["latency-file"]["figures"].values()} == {1000, 10000}


def test_the_committed_figures_still_render(tmp_path: Path) -> None:
    """BENCHMARKS.md can be rebuilt from bench/results.json by the current report code."""
    committed = json.loads((ROOT / "bench" / "results.json").read_text())
    plots = report.plots(committed["results"], tmp_path)
    text = report.markdown(committed["machine"], committed["results"], {k: str(v) for k, v in plots.items()})
    for goal in ("(1)", "(2)", "(3)", "(4)", "(5)"):
        assert goal in text
    assert set(plots) == {"throughput", "rss", "latency", "sizes", "centrifugo"}


def test_the_ticker_benchmark_spreads_over_channels(tmp_path: Path) -> None:
    """Issue 14's ticker figure: 16 tickers on 16 channels (all lanes busy) beside one on one channel."""
    out = tmp_path / "BENCHMARKS.md"
    assert run.main(["--quick", "--only", "pipeline", "--out", str(out)]) == 0
    ticker = json.loads((tmp_path / "results.json").read_text())["results"]["pipeline"]["figures"]
    assert ticker["relay ticker→serve, 16 channels"]["count"] == run.QUICK.pipeline_count
    assert ticker["relay ticker→serve, 1 channel"]["count"] == run.QUICK.pipeline_count
    assert "(14) ticker → relay serve, 16 channels ÷ raw Batch with keys, 4 in flight" in out.read_text()


@pytest.mark.kafka
@pytest.mark.centrifugo
def test_the_hotpath_benchmark_runs_every_scenario() -> None:
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "hotpath_bench.py"), "--count", "3200", "--turns", "1"],
                         capture_output=True, text=True, check=True, timeout=120).stdout
    for scenario in ("ticker16", "records", "json-key"):
        line = next(line for line in out.splitlines() if line.startswith(scenario))
        assert float(line.split()[2]) > 0


def test_the_kafka_benchmarks_run(kafka_broker: KafkaBroker, centrifugo_bin: Path) -> None:
    kafka: dict[str, Any] = kafka_bench.run(3000, broker=kafka_broker)
    assert kafka["relay kafka→serve"]["records"] == 3000
    # Issue 14's figures: CPU per record (start-up excluded) and how full the Batch calls were.
    # (3,000 records may all be in the first commit: then there is no span to divide by.)
    assert "cpu_us_per_record" in kafka["relay kafka→serve"]
    assert 1 <= kafka["relay kafka→serve"]["publications_per_batch"] <= 500
    compare = centrifugo_bench.run(3000, (2,), broker=kafka_broker, repeats=1)
    both = compare["2 partitions"]
    assert both["relay"]["delivered"] == both["centrifugo"]["delivered"] == 3000
    assert 1 <= both["relay"]["publications_per_batch"] <= 500
    latency = latency_bench.run((1000,), 0.5, ("kafka",), broker=kafka_broker)
    assert latency["kafka 1000/s"]["messages"] == 500


@pytest.mark.centrifugo
def test_the_fanout_benchmark_runs(tmp_path: Path, centrifugo_bin: Path) -> None:
    out = tmp_path / "BENCHMARKS.md"
    assert run.main(["--quick", "--only", "fanout", "--out", str(out)]) == 0
    figures = json.loads((tmp_path / "results.json").read_text())["results"]["fanout"]["figures"]
    for server in ("embedded", "centrifugo"):
        assert figures[server]["deliveries"] == figures[server]["expected_deliveries"] == 100 * 200
    assert "WebSocket fan-out" in out.read_text()


def test_the_nats_benchmark_runs(centrifugo_bin: Path, tmp_path: Path) -> None:
    both = nats_bench.run(2000, repeats=1)["1 stream"]
    assert both["relay"]["delivered"] == both["centrifugo"]["delivered"] == 2000
    text = report.markdown({**json.loads((ROOT / "bench" / "results.json").read_text())["machine"]},
                           {"nats": {"figures": {"1 stream": both}, "seconds": 1, "command": "x"}}, {})
    assert "NATS JetStream → real Centrifugo" in text
def test_the_nats_source_benchmark_runs() -> None:
    results = nats_source_bench.run(2000, 1, [str(ROOT)])
    assert sorted(results) == [f"{ROOT} centrifugo", f"{ROOT} data"]
    assert all(r["messages"] == 2000 and r["cpu_us_per_message"] > 0 for r in results.values())


def test_the_postgres_benchmark_runs(postgres_server: Any, centrifugo_bin: Path, tmp_path: Path) -> None:
    compare = postgres_bench.run(2000, (2,), repeats=1)
    both = compare["2 partitions"]
    assert both["relay"]["delivered"] == both["centrifugo"]["delivered"] == 2000
    assert both["relay"]["rows_left"] == both["centrifugo"]["rows_left"] == 0
    assert "relay_over_centrifugo_middle" in both  # the report's middle ratio (it printed "?")
    text = report.markdown(json.loads((ROOT / "bench" / "results.json").read_text())["machine"],
                           {"postgres": {"command": "postgres_bench", "seconds": 1, "figures": compare}}, {})
    assert "8. PostgreSQL outbox" in text and "(16) PostgreSQL outbox" in text
