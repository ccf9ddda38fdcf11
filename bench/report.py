"""BENCHMARKS.md and its plots from the figures of one bench/run.py run."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

# Issue 8's bar. 150 MB (decimal, as written there) is 143.05 MiB.
GOAL_LINES_PER_SECOND = 100_000
GOAL_OF_CEILING = 0.5
GOAL_OF_BARE = 0.8
GOAL_OF_RAW_BATCH = 0.8  # issue 14: file and ticker → relay serve ÷ raw Batch with keys, 4 in flight
GOAL_OF_CENTRIFUGO = 1.0
GOAL_OF_CENTRIFUGO_PARTITIONS = 1.5  # issue 14: 6 partitions
GOAL_CPU_US_PER_RECORD = 5.0  # issue 14
GOAL_FILLED_BATCH = 400  # issue 14: "near batch_max_size" (500) under a backlog
GOAL_P99_MS = 10.0
GOAL_RSS_MIB = 150e6 / 2**20


def _figures(results: dict[str, Any], name: str) -> dict[str, Any] | None:
    section = results.get(name) or {}
    figures: dict[str, Any] | None = section.get("figures")
    return figures


def relay_runs(figures: dict[str, Any], prefix: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the run over several channels, the run on one channel) of a file or ticker section; figures
    from before the spread run (one entry named just `prefix`) give that run for both."""
    runs = [r for name, r in figures.items() if name.startswith(prefix)]
    spread = max(runs, key=lambda r: r.get("channels", 1))
    one = min(runs, key=lambda r: r.get("channels", 1))
    return spread, one


def _raw(figures: dict[str, Any], in_flight: int) -> int:
    rate: int = figures["raw batch500+keys/1" if in_flight == 1 else "raw batch500+keys"]["publications_per_second"]
    return rate


def _n(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:g}"


# -- goals --------------------------------------------------------------------------------------


def goals(results: dict[str, Any]) -> list[tuple[str, str, str, bool | None, str]]:
    """(goal, measured, target, met, how far) for every goal whose section ran."""
    rows: list[tuple[str, str, str, bool | None, str]] = []

    def add(goal: str, value: float | None, target: float, fmt: str, higher_is_better: bool = True) -> None:
        if value is None:
            rows.append((goal, "not measured", fmt.format(target), None, ""))
            return
        met = value >= target if higher_is_better else value <= target
        gap = value / target - 1
        how = "" if met else (f"{abs(gap):.0%} short" if higher_is_better else f"{gap:.0%} over")
        rows.append((goal, fmt.format(value), fmt.format(target), met, how))

    file = _figures(results, "file")
    if file:
        relay, _ = relay_runs(file, "relay file→serve")
        spread = f", {relay['channels']} channels" if relay.get("channels", 1) > 1 else ""
        ceiling = max(_raw(file, 1), _raw(file, 4))
        add(f"(1) file → relay serve{spread}, lines/s", relay["lines_per_second"], GOAL_LINES_PER_SECOND,
            "{:,.0f}")
        add(f"(1) file lines/s{spread} ÷ raw Batch ceiling (best of 1 and 4 in flight)",
            relay["lines_per_second"] / ceiling, GOAL_OF_CEILING, "{:.2f}")
        add(f"(14) file → relay serve{spread} ÷ raw Batch with keys, 4 in flight",
            relay["lines_per_second"] / _raw(file, 4), GOAL_OF_RAW_BATCH, "{:.2f}")
        add("(14) relay CPU µs per line, file → relay serve" + spread, relay.get("cpu_us_per_record"),
            GOAL_CPU_US_PER_RECORD, "{:.1f}", higher_is_better=False)
    ticker = _figures(results, "pipeline")
    if ticker:
        relay, _ = relay_runs(ticker, "relay ticker→serve")
        spread = f", {relay['channels']} channels" if relay.get("channels", 1) > 1 else ""
        add(f"(14) ticker → relay serve{spread} ÷ raw Batch with keys, 4 in flight",
            relay["publications_per_second"] / _raw(ticker, 4), GOAL_OF_RAW_BATCH, "{:.2f}")
    kafka = _figures(results, "kafka")
    if kafka:
        bare = kafka["bare aiokafka read"]["records_per_second"]
        add("(2) Kafka → relay serve ÷ bare aiokafka consumer",
            kafka["relay kafka→serve"]["records_per_second"] / bare if bare else None, GOAL_OF_BARE, "{:.2f}")
        add("(14) relay CPU µs per Kafka record, format = data (section 2)",
            kafka["relay kafka→serve"].get("median_cpu_us_per_record",
                                           kafka["relay kafka→serve"].get("cpu_us_per_record")),
            GOAL_CPU_US_PER_RECORD, "{:.1f}",
            higher_is_better=False)
    compare = _figures(results, "centrifugo")
    if compare:
        for name, r in compare.items():
            several = r.get("partitions", 1) > 1
            add(f"(3, 14) relay ÷ Centrifugo's own Kafka consumer, {name}", r["relay_over_centrifugo"],
                GOAL_OF_CENTRIFUGO_PARTITIONS if several else GOAL_OF_CENTRIFUGO, "{:.2f}")
        one = next(iter(compare.values()))["relay"]
        add("(14) relay CPU µs per Kafka record, format = centrifugo (section 3, 1 partition)",
            one.get("median_cpu_us_per_record", one.get("cpu_us_per_record")), GOAL_CPU_US_PER_RECORD, "{:.1f}",
            higher_is_better=False)
        add("(14) publications per Batch call draining a backlog (batch_max_size 500; section 3)",
            one.get("publications_per_batch"), GOAL_FILLED_BATCH, "{:.0f}")
    outbox = _figures(results, "postgres")
    for name, r in (outbox or {}).items():
        add(f"(16) PostgreSQL outbox: relay ÷ Centrifugo's postgresql consumer, {name}", r["relay_over_centrifugo"],
            GOAL_OF_CENTRIFUGO, "{:.2f}")
    for section, issue, what in (("redis", 17, "Redis Streams: relay ÷ Centrifugo's redis_stream consumer"),
                                 ("nats", 18, "NATS JetStream: relay ÷ Centrifugo's nats_jetstream consumer")):
        for name, r in (_figures(results, section) or {}).items():
            add(f"({issue}) {what}, {name}", r["relay_over_centrifugo"], GOAL_OF_CENTRIFUGO, "{:.2f}")
    memory = _figures(results, "kafka-memory")
    for fmt, r in (memory or {}).get("formats", {}).items():
        add(f"(14) relay peak RSS draining {memory['count']:,} Kafka records, format = {fmt}, MiB (150 MB)",
            r["relay_peak_rss_mib"], GOAL_RSS_MIB, "{:.1f}", higher_is_better=False)
    for section in ("latency-file", "latency-kafka"):
        latency = _figures(results, section)
        for r in (latency or {}).values():
            if r["rate"] == 1000:
                add(f"(4) p99 ms, {r['source']} source at 1,000 msg/s", r["p99_ms"], GOAL_P99_MS, "{:.1f}",
                    higher_is_better=False)
    if file:
        drained = relay_runs(file, "relay file→serve")
        add(f"(5) relay peak RSS draining {drained[0]['lines']:,} lines, MiB (150 MB)",
            max(r["peak_rss_mib"] for r in drained), GOAL_RSS_MIB, "{:.1f}", higher_is_better=False)
    return rows


# -- tables -------------------------------------------------------------------------------------


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _against_raw(f: dict[str, Any], rate_key: str) -> str:
    """The rows of a relay section beside its raw Batch runs: rate, CPU, ÷ 1 and ÷ 4 in flight."""
    one, four = _raw(f, 1), _raw(f, 4)
    rows = []
    for name, r in f.items():
        rate = r.get(rate_key) or r["publications_per_second"]
        cpu = r.get("cpu_us_per_record")
        runs = r.get("runs_publications_per_second")
        label = f"{name} (mean of {' and '.join(f'{v:,}' for v in runs)}: before and after)" if runs else name
        rows.append([label, f"{rate:,}", "" if name.startswith("raw") or cpu is None else cpu,
                     r.get("server_cpu_us_per_record", ""), f"{rate / one:.2f}", f"**{rate / four:.2f}**"])
    return _table(["what", "per second", "relay CPU µs each", "server CPU µs each", "÷ raw Batch, 1 in flight",
                   "÷ raw Batch, 4 in flight"], rows)


def _file_table(f: dict[str, Any]) -> str:
    notes = [f"- {name}: {r['lines']:,} lines of {r['line_bytes']} bytes ({r['bytes'] / 2**20:.0f} MiB) in "
             f"{r['seconds']} s ({r['mib_per_second']} MiB/s), {r['wall_seconds_with_startup']} s with the "
             f"relay's start-up; relay peak RSS (VmHWM) **{r['peak_rss_mib']} MiB**."
             for name, r in f.items() if name.startswith("relay")]
    return _against_raw(f, "lines_per_second") + "\n\n" + "\n".join(notes)


def _kafka_table(k: dict[str, Any]) -> str:
    relay, bare = k["relay kafka→serve"], k["bare aiokafka read"]
    drains = relay.get("all_records_per_second")
    rows = [["relay (Kafka source → relay serve), from commits" + ("; median of 3" if drains else ""),
             f"{relay['records_per_second']:,}",
             relay["seconds"], relay["wall_seconds_with_startup"]],
            ["bare aiokafka consumer (reads, does nothing; median of 3)", f"{bare['records_per_second']:,}",
             bare["seconds"], bare["wall_seconds_with_startup"]]]
    ratio = relay["records_per_second"] / bare["records_per_second"] if bare["records_per_second"] else 0
    backlog = k["backlog"]
    return (_table(["what", "records/s", "seconds", "with start-up"], rows)
            + f"\n\nrelay ÷ bare: **{ratio:.2f}**. Backlog: {backlog['records']:,} keyed JSON records "
            f"(~100 B), 3 partitions, 50 keys; relay peak RSS {relay.get('peak_rss_mib', '?')} MiB."
            + (f" Every relay drain: {', '.join(f'{v:,}' for v in drains)} records/s; relay CPU µs per record "
               f"{', '.join(str(v) for v in relay['all_cpu_us_per_record'])}, median "
               f"{relay['median_cpu_us_per_record']}." if drains else ""))


def _runs(side: dict[str, Any], key: str) -> str:
    return ", ".join(f"{v:,}" for v in side.get(f"runs_{key}", [side[key]]))


def _cpu_runs(side: dict[str, Any]) -> str:
    runs = side.get("runs_cpu_us_per_record", [side.get("cpu_us_per_record")])
    median = side.get("median_cpu_us_per_record")
    return ", ".join(str(v) for v in runs) + (f", median {median}" if median is not None else "")


def _compare_table(c: dict[str, Any]) -> str:
    rows = []
    for name, r in c.items():
        rel, cen = r["relay"], r["centrifugo"]
        middle = r.get("relay_over_centrifugo_middle")
        rows.append([name, f"{rel['per_second']:,}", f"{cen['per_second']:,}",
                     "?" if r["relay_over_centrifugo"] is None else f"**{r['relay_over_centrifugo']:.2f}**",
                     f"{rel['middle_per_second']:,} / {cen['middle_per_second']:,} = "
                     f"{'?' if middle is None else f'{middle:.2f}'}",
                     f"{rel['cpu_seconds']} ({rel['cpu_seconds_relay']} + {rel['cpu_seconds_centrifugo']})",
                     cen["cpu_seconds"]])
    runs = [f"- {name}: relay {_runs(r['relay'], 'per_second')} (middle {_runs(r['relay'], 'middle_per_second')}; "
            f"relay CPU µs per record {_cpu_runs(r['relay'])}); "
            f"Centrifugo {_runs(r['centrifugo'], 'per_second')} (middle "
            f"{_runs(r['centrifugo'], 'middle_per_second')})" for name, r in c.items()]
    return (_table(["backlog", "relay/s", "Centrifugo consumer/s", "relay ÷ Centrifugo (goal 3)",
                    "middle 10→90%: relay / Centrifugo", "CPU s relay side (relay + Centrifugo)",
                    "CPU s Centrifugo side"], rows)
            + "\n\nEvery drain, in turn order (msg/s, first to last publication; the median counts):\n\n"
            + "\n".join(runs))


def _latency_table(sections: list[dict[str, Any]]) -> str:
    rows = []
    for latency in sections:
        for r in latency.values():
            share = r["histogram_within_10ms"]
            rows.append([r["source"], f"{r['rate']:,.0f}", f"{r['messages']:,}", r["p50_ms"], r["p99_ms"],
                         r["p999_ms"], r["max_ms"], "" if share is None else f"{share:.1%}",
                         r.get("bare_p99_ms", "")])
    return _table(["source", "msg/s", "messages", "p50 ms", "p99 ms", "p99.9 ms", "max ms",
                   "≤ 10 ms by the relay's histogram", "bare aiokafka p99 ms (same run)"], rows)


def _size_table(s: dict[str, Any]) -> str:
    rows = [[f"{r['size']:,}", f"{r['lines']:,}", f"{r['relay_per_second']:,}", r["relay_mib_per_second"],
             f"{r['raw_per_second']:,}", r["raw_mib_per_second"], f"{r['relay_over_raw']:.2f}",
             r["relay_peak_rss_mib"]] for r in s.values()]
    return _table(["bytes/message", "lines", "relay msg/s", "relay MiB/s", "raw Batch/1 msg/s", "raw MiB/s",
                   "relay ÷ raw", "relay peak RSS MiB"], rows)


def _server_table(s: dict[str, Any]) -> str:
    rows = [[name, f"{r['publications_per_second']:,}", f"{r['calls_per_second']:,}", r["p50_ms"],
             r["p99_ms"], r["errors"]] for name, r in s.items()]
    return _table(["scenario", "publications/s", "calls/s", "p50 ms", "p99 ms", "errors"], rows)


def _fanout_table(f: dict[str, Any]) -> str:
    rows = [[name, f"{r['deliveries']:,} of {r['expected_deliveries']:,}", f"{r['deliveries_per_second']:,}",
             r["p50_ms"], r["p99_ms"], len(r["errors"])] for name, r in f.items() if name != "load"]
    return _table(["server", "deliveries", "deliveries/s", "p50 ms", "p99 ms", "errors"], rows)


def _pipeline_table(p: dict[str, Any]) -> str:
    return _against_raw(p, "publications_per_second")


def _text(paragraph: str) -> str:
    return " ".join(paragraph.split())


HOW = {
    "file": _text("""
        A file of JSON lines of about 100 bytes (1,000,000 in the full run), each naming one of 50
        rooms, is read from the beginning by `relay run` (route `data = "json"`, sink defaults:
        Batch of up to 500, no linger, idempotency keys, 4 lanes) into `relay serve` in a third
        process, twice: routed by room (`channel = "chat:filebench-{{ json.room }}"`, 50 channels,
        so all 4 lanes have batches in flight) and routed to one channel (one lane: order per
        channel allows one batch in flight). The rate is measured on the server: the sum of the
        channels' stream tops (History with limit 0) polled every 20 ms, from the first poll that
        sees a publication to the one that sees all; the relay's CPU per line is read from /proc over
        the same span, the server's from the relay's start to its last line. Beside it, against the
        same server process: the raw ceiling, a bare grpc.aio client (bench/server_bench.py) sending
        Batch of 500 publications with idempotency keys over 16 channels, 1 call in flight (what the
        one-channel route can use; just before) and 4 (what the by-room route can use: goal 14's
        figure; just before and just after the relay's runs, the mean counts, as the load of a shared
        machine moves within a minute). The relay's VmRSS is sampled at every poll and its VmHWM
        read at the end: that is goal (5)."""),
    "kafka": _text("""
        A backlog of keyed JSON records on a real Kafka broker, drained by `relay run` (route
        `chat:{{ key }}`) into `relay serve`; the relay's rate is read from the group's committed
        offsets (commit_interval 100 ms), first commit to last (it commits only what the server
        accepted). The relay drains it three times, each time with a consumer group of its own: the
        median rate counts, and the median of the drains' CPU per record (goal 14's `data` line).
        Beside it, a bare aiokafka consumer in the bench process reads the same backlog and
        does nothing with it (no group, no commits), counted from its first batch to the last
        record; it takes well under a second, so it reads the backlog three times and the median
        counts."""),
    "centrifugo": _text("""
        Records in Centrifugo's command form on 1- and 6-partition topics (12 channels, each in one
        partition). Centrifugo's own consumer (`consumers: [{name, enabled: true, type: "kafka",
        kafka: {brokers, topics, consumer_group}}]`, its defaults otherwise) and the relay
        (`format = "centrifugo"`, its defaults) each drain it into a fresh real Centrifugo, with a
        consumer group of their own. Both rates are measured the same way: the sum of the 12 channels'
        stream tops, polled every 20 ms, first publication seen to last (the goal's figure), and the
        middle rate from 10% to 90% of the backlog, which leaves out start-up and the tail (with 6
        partitions Centrifugo's consumer takes most of the backlog fast, then finishes the last
        partitions in steps about 0.5 s apart, the length of its default `fetch_max_wait`; see the
        plot). For Centrifugo's consumer the polling starts before Centrifugo does. Each side drains
        the backlog three times, taking turns, each time with a new consumer group; the median run
        counts. After each drain, the total (exactly the backlog: nothing lost, nothing twice) and
        every channel's last publication are checked. CPU seconds are read from /proc over the
        drain. The relay's CPU per record (goal 14) is each drain's relay CPU from the first
        publication seen to the last, over the records; the goal line gives the median of the
        three drains, every drain's figure is listed below the table."""),
    "redis": _text("""
        One Redis stream (Debian's redis-server, appendonly) holds the records of (3) in Centrifugo's
        command form, field `payload`. Centrifugo's own `redis_stream` consumer (its defaults: one
        worker; its group created at 0 first) and the relay (`format = "centrifugo"`, its defaults)
        each drain it into a fresh real Centrifugo with a group of their own, measured as in (3);
        after each drain the total and every channel's last publication are checked."""),
    "kafka-memory": _text("""
        One partition holds the backlog (1,000,000 records in the full run) in Centrifugo's command
        form, about 110 bytes each, 12 channels. For each format a relay with a consumer group of its
        own drains it into a fresh real Centrifugo: `format = "centrifugo"` as written, and `format =
        "data"` with routes reading the channel and data from the JSON. The relay's peak RSS is its
        VmHWM at the end of the drain; delivery is checked as in (3): every record once, each
        channel's last record last."""),
    "nats": _text("""
        Messages in Centrifugo's command form on a JetStream stream (12 channels, subjects
        `chat.cmp-<c>`). Centrifugo's own `nats_jetstream` consumer (its defaults: max_ack_pending
        100) and the relay (`type = "nats"`, `format = "centrifugo"`, its defaults) each drain it
        into a fresh real Centrifugo, each time with a durable consumer of its own (deliver all),
        counted as in (3); the median of the drains counts, and each drain is checked complete."""),
    "postgres": _text("""
        An outbox table in Centrifugo's layout (12 channels, each in one partition; 1 and 3
        partitions), one fresh copy of the backlog per drain in PostgreSQL 15. Centrifugo's own
        consumer (`consumers: [{type: "postgresql", postgresql: {dsn, outbox_table_name,
        num_partitions}}]`, its defaults otherwise) and the relay (postgres source, `format =
        "centrifugo"`, its defaults) each drain it into a fresh real Centrifugo; rates are measured as
        in (3), and after each drain the total, every channel's last publication and the empty table
        are checked."""),
    "latency": _text("""
        The bench process writes at a fixed rate, each message carrying the CLOCK_MONOTONIC time of
        its write (file: an unbuffered append; Kafka: just before the aiokafka producer's `send`,
        linger 0, a 1-partition topic). A History follower in its own process polls the server every
        1 ms for what came after its last position and notes arrival minus write time: that includes
        up to about 1 ms of polling. The last column is a cross-check without polling: the share of
        publications that the relay's own `relay_publish_latency_seconds` histogram (source read →
        accepted) puts within its 10 ms bucket, over the same run. The server keeps 200,000
        publications of history here."""),
    "sizes": _text("""
        Files of JSON lines of exactly N bytes, drained by the relay as in (1); beside each, the raw
        Batch client with data of the same size, 1 call in flight, at most 500 commands and 3 MiB per
        call. The line count per size is what fits 96 MiB, from 2,000 to 200,000 (less in a quick run);
        the server keeps 16
        publications per channel so that big messages do not fill its memory."""),
    "server": _text("""
        `relay serve` alone, driven by the grpc.aio client of bench/server_bench.py in another
        process: the ceiling the other figures are compared with."""),
    "fanout": _text("""
        N subscribers on one channel (raw client-protocol JSON frames, aiohttp, in two client
        processes) and one publisher sending `/api/batch` calls of 10 publications at the rate, each
        stamped with its send time; deliveries/s counts every publication every subscriber received,
        from the first publication to the last delivery; latency is receive time minus send time.
        The same client load runs against `relay serve` with its HTTP side, then real Centrifugo.
        The client processes share the 2 cores with the server, so at 1,000,000 deliveries/s offered
        both servers are held back by the clients as much as by themselves."""),
    "pipeline": _text("""
        Tickers with `interval = "0s"` through the relay into `relay serve`: the relay's own cost
        without any source I/O. Twice: 16 tickers each routed to a channel of its own (all 4 lanes
        busy) and one ticker on one channel (one lane); beside them the raw Batch client of (1),
        1 and 4 calls in flight, against the same server process."""),
}


def _memory_table(m: dict[str, Any]) -> str:
    return _table(["format", "relay peak RSS MiB (goal 143.1)", "records/s", "relay CPU µs/record", "delivered"], [
        [fmt, f"**{r['relay_peak_rss_mib']}**", f"{r['per_second']:,}", r["cpu_us_per_record"], f"{r['delivered']:,}"]
        for fmt, r in m["formats"].items()])


def _redis_table(figures: dict[str, Any]) -> str:
    return _table(["backlog", "entries", "relay/s", "Centrifugo/s", "relay ÷ Centrifugo", "CPU s relay (+C)",
                   "CPU s Centrifugo"], [
        [name, f"{r['entries']:,}", f"{r['relay']['per_second']:,}", f"{r['centrifugo']['per_second']:,}",
         "?" if r["relay_over_centrifugo"] is None else f"**{r['relay_over_centrifugo']:.2f}**",
         r["relay"]["cpu_seconds"], r["centrifugo"]["cpu_seconds"]] for name, r in figures.items()])


def markdown(info: dict[str, Any], results: dict[str, Any], plots: dict[str, str]) -> str:
    out: list[str] = ["# Benchmarks", ""]
    out.append(f"Produced by `make bench` (`{info['command']}`) on {info['date']} in {info['minutes']} "
               f"minutes, at commit `{info['commit']}`"
               + (f" with {info['relay_files_changed']} uncommitted file(s) under relay/" if
                  info.get("relay_files_changed") else "") + ". Every figure below comes from that one run."
               + (" **This was a `--quick` smoke run: small counts, not the figures to quote.**"
                  if info.get("quick") else ""))
    out.append("")
    out.append(_text("""
        The machine is shared with other work (see the load average), so absolute figures move from
        run to run; each figure stands beside its best alternative measured in the same run, minutes
        apart, and the **ratios** are what to read. Rerun one part with the command under its
        heading."""))
    out += ["", "## The machine", ""]
    pkgs = ", ".join(f"{k} {v}" for k, v in info["packages"].items())
    out.append(_table(["", ""], [
        ["CPU", info["cpu"]], ["cores", info["cores"]], ["RAM", f"{info['ram_gib']} GiB"],
        ["kernel", info["kernel"]], ["Python", info["python"]], ["packages", pkgs],
        ["Kafka", f"{info['kafka']}, {info['java']}"], ["Centrifugo", info["centrifugo"]],
        ["load average (1, 5, 15 min)",
         f"{info['load_average_start']} at start, {info['load_average_end']} at end"],
    ]))

    rows = goals(results)
    if rows:
        out += ["", "## Goals (issues 8, 14, 16, 17, 18)", ""]
        out.append(_table(["goal", "measured", "target", "met", "gap"], [
            [g, m, t, "—" if ok is None else ("yes" if ok else "**no**"), how] for g, m, t, ok, how in rows]))

    def section(number: str, name: str, title: str, body: Callable[[dict[str, Any]], str],
                how: str, plot: str = "") -> None:
        result = results.get(name)
        if result is None:
            return
        out.extend(["", f"## {number}{title}", "", f"    {result['command']}", ""])
        if "error" in result:
            out.append(f"**Failed** after {result['seconds']} s: `{result['error'][-800:]}`")
            return
        out.append(body(result["figures"]))
        if plot and plot in plots:
            out.extend(["", f"![{title}]({plots[plot]})"])
        out.extend(["", f"How: {HOW[how]}"])

    section("1. ", "file", "File → relay serve, beside the raw Batch ceiling (and 5. peak RSS)", _file_table,
            "file", "rss")
    section("2. ", "kafka", "Kafka → relay serve, beside a bare aiokafka consumer", _kafka_table, "kafka")
    section("3. ", "centrifugo", "Kafka → real Centrifugo: the relay beside Centrifugo's own Kafka consumer",
            _compare_table, "centrifugo", "centrifugo")
    latency = [results[n] for n in ("latency-file", "latency-kafka") if n in results]
    if latency:
        out += ["", "## 4. Latency, source → accepted by the server", ""]
        out += [f"    {r['command']}" for r in latency]
        out.append("")
        good = [r["figures"] for r in latency if "figures" in r]
        out += [f"**Failed** after {r['seconds']} s: `{r['error'][-800:]}`" for r in latency if "error" in r]
        if good:
            out.append(_latency_table(good))
            if "latency" in plots:
                out += ["", f"![latency]({plots['latency']})"]
        out += ["", f"How: {HOW['latency']}"]
    section("6. ", "sizes", "Throughput against message size", _size_table, "sizes", "sizes")
    section("7. ", "fanout", "WebSocket fan-out: the embedded server beside real Centrifugo", _fanout_table,
            "fanout")
    section("8. ", "postgres", "PostgreSQL outbox → real Centrifugo: the relay beside Centrifugo's own postgresql "
            "consumer (goal 1.0)", _compare_table, "postgres")
    section("9. ", "redis", "Redis Streams → real Centrifugo: the relay beside Centrifugo's own consumer "
            "(goal 1.0)", _redis_table, "redis")
    section("10. ", "nats", "NATS JetStream → real Centrifugo: the relay beside Centrifugo's own nats_jetstream "
            "consumer (goal 1.0)", _compare_table, "nats")
    section("11. ", "kafka-memory", "Kafka → real Centrifugo, 1 partition, a large backlog: the relay's peak RSS "
            "(goal 150 MB)", _memory_table, "kafka-memory")
    section("", "server", "Context: the embedded server alone", _server_table, "server")
    section("", "pipeline", "Ticker → relay serve, beside the raw Batch ceiling", _pipeline_table, "pipeline")
    if "throughput" in plots:
        out += ["", "## All side-by-side rates", "", f"![rates]({plots['throughput']})"]
    return "\n".join(out) + "\n"


# -- plots --------------------------------------------------------------------------------------


def plots(results: dict[str, Any], directory: Path) -> dict[str, Path]:
    """Write the PNGs the report shows; returns name → path for those that had figures."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    directory.mkdir(parents=True, exist_ok=True)
    made: dict[str, Path] = {}

    def save(fig: Any, name: str) -> None:
        path = directory / f"{name}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        made[name] = path

    pairs: list[tuple[str, list[tuple[str, float]]]] = []
    file = _figures(results, "file")
    if file:
        spread, one = relay_runs(file, "relay file→serve")
        relays = [(f"relay\n{spread.get('channels', 1)} ch.", spread["lines_per_second"])]
        if one is not spread:
            relays.append(("relay\n1 ch.", one["lines_per_second"]))
        pairs.append(("file → relay serve (lines/s)", [
            *relays, ("raw Batch\n1 in flight", _raw(file, 1)), ("raw Batch\n4 in flight", _raw(file, 4))]))
    kafka = _figures(results, "kafka")
    if kafka:
        pairs.append(("Kafka → relay serve (records/s)", [
            ("relay", kafka["relay kafka→serve"]["records_per_second"]),
            ("bare\naiokafka", kafka["bare aiokafka read"]["records_per_second"])]))
    for name, r in (_figures(results, "centrifugo") or {}).items():
        pairs.append((f"Kafka → Centrifugo, {name} (msg/s)", [
            ("relay", r["relay"]["per_second"]), ("Centrifugo's\nconsumer", r["centrifugo"]["per_second"])]))
    if pairs:
        fig, axes = plt.subplots(1, len(pairs), figsize=(3.6 * len(pairs), 3.6), squeeze=False)
        for ax, (title, bars) in zip(axes[0], pairs, strict=True):
            values = [v for _, v in bars]
            ax.bar([label for label, _ in bars], values, color=["tab:blue"] + ["tab:gray"] * (len(bars) - 1))
            for i, v in enumerate(values):
                ratio = f"\nrelay ÷ this: {values[0] / v:.2f}" if i and v else ""
                ax.text(i, v, f"{v:,.0f}{ratio}", ha="center", va="bottom", fontsize=7)
            ax.set_title(title, fontsize=9)
            ax.set_ylim(0, max(values) * 1.3)
            ax.tick_params(axis="x", labelsize=8)
            ax.ticklabel_format(axis="y", style="plain")
        save(fig, "throughput")

    compare = _figures(results, "centrifugo")
    if compare and all("timeline" in r["relay"] for r in compare.values()):
        fig, axes = plt.subplots(1, len(compare), figsize=(4.5 * len(compare), 3.6), squeeze=False)
        for ax, (name, r) in zip(axes[0], compare.items(), strict=True):
            for side, label, style in (("relay", "relay", "-"), ("centrifugo", "Centrifugo's consumer", "--")):
                points = r[side]["timeline"]
                ax.plot([p[0] for p in points], [p[1] for p in points], style, label=label)
            ax.set_title(f"Kafka → Centrifugo, {name}", fontsize=9)
            ax.set_xlabel("seconds since the drainer started")
            ax.set_ylabel("publications accepted")
            ax.ticklabel_format(axis="y", style="plain")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=8)
        save(fig, "centrifugo")

    latency = [r for n in ("latency-file", "latency-kafka") for r in (_figures(results, n) or {}).values()]
    if latency:
        fig, ax = plt.subplots(figsize=(7, 3.8))
        width = 0.27
        labels = [f"{r['source']}\n{r['rate']:,.0f}/s" for r in latency]
        for k, (key, name) in enumerate((("p50_ms", "p50"), ("p99_ms", "p99"), ("p999_ms", "p99.9"))):
            ax.bar([i + (k - 1) * width for i in range(len(latency))], [r[key] for r in latency], width,
                   label=name)
        ax.axhline(GOAL_P99_MS, color="red", linestyle="--", linewidth=1,
                   label="goal: p99 ≤ 10 ms at 1,000/s")
        ax.set_xticks(range(len(latency)), labels)
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.tick_params(axis="y", which="minor", labelsize=7)
        ax.set_ylabel("ms, source → accepted")
        ax.legend(fontsize=8)
        ax.set_title("Latency from the source to accepted by the server", fontsize=10)
        save(fig, "latency")

    sizes = _figures(results, "sizes")
    if sizes:
        rows = list(sizes.values())
        x = [r["size"] for r in rows]
        fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.8))
        left.plot(x, [r["relay_per_second"] for r in rows], "o-", label="relay (file → serve)")
        left.plot(x, [r["raw_per_second"] for r in rows], "s--", color="tab:gray",
                  label="raw Batch, 1 in flight")
        left.set_ylabel("messages/s")
        right.plot(x, [r["relay_mib_per_second"] for r in rows], "o-", label="relay (file → serve)")
        right.plot(x, [r["raw_mib_per_second"] for r in rows], "s--", color="tab:gray",
                   label="raw Batch, 1 in flight")
        right.set_ylabel("MiB/s of data")
        for ax in (left, right):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("bytes per message")
            ax.set_xticks(x, [f"{v:,}" for v in x], fontsize=8)
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=8)
        left.set_yscale("log")
        fig.suptitle("Throughput against message size", fontsize=10)
        save(fig, "sizes")

    drained = relay_runs(file, "relay file→serve")[0] if file else {}
    if drained.get("rss_samples"):
        samples = drained["rss_samples"]
        fig, ax = plt.subplots(figsize=(7, 3.5))
        ax.plot([s[0] for s in samples], [s[1] for s in samples], color="tab:blue", label="relay VmRSS")
        ax.axhline(GOAL_RSS_MIB, color="red", linestyle="--", linewidth=1, label="goal: 150 MB")
        ax.set_xlabel("seconds since the relay started")
        ax.set_ylabel("MiB")
        ax.set_ylim(0, max(GOAL_RSS_MIB, max(s[1] for s in samples)) * 1.15)
        other = ax.twinx()
        other.plot([s[0] for s in samples], [s[2] for s in samples], color="tab:gray", linestyle=":",
                   label="lines accepted")
        other.set_ylabel("lines accepted by the server")
        other.ticklabel_format(axis="y", style="plain")
        handles = ax.get_legend_handles_labels()
        more = other.get_legend_handles_labels()
        ax.legend(handles[0] + more[0], handles[1] + more[1], fontsize=8, loc="lower right")
        ax.set_title(f"Relay memory while draining {drained['lines']:,} lines "
                     f"({drained.get('channels', 1)} channels)", fontsize=10)
        save(fig, "rss")
    return made
