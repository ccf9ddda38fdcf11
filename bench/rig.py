"""What every benchmark shares: the processes it starts, how it counts, how it times.

- `ServerProcess`: `relay serve` on a free loopback port, with an API key (auth is part of the cost).
- `start_relay()`: `relay run` from a few TOML lines, in a work dir, aimed at a server;
  `peak_rss_mib()` / `rss_mib()` read its VmHWM / VmRSS from /proc.
- `StreamCounter`: publications a server accepted on some channels, read from their stream tops
  (History with limit 0, one call per channel), and the rate from the first to the last of them.
  Every rate in BENCHMARKS.md that is "measured on the server" comes from here.
- `raw_batch()`: the bare grpc.aio Batch client of bench/server_bench.py, in its own process.
- `Tail`: a History follower in its own process (`python bench/rig.py tail ...`, so it never waits
  for the GIL of the process that writes): it notes when each publication is there and subtracts the
  CLOCK_MONOTONIC time the writer put in the publication's data as `{"t": ...}`.
- `kafka_broker()`, `centrifugo()`: the real Kafka 4.x and Centrifugo v6 of tests/harness.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import grpc

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from relay.proto.centrifugo import api_pb2, api_pb2_grpc  # noqa: E402
from tests.harness.ports import free_port  # noqa: E402
from tests.harness.relay_process import RelayProcess  # noqa: E402

KEY_ENV = "RELAY_BENCH_SERVER_KEY"
API_KEY = "bench-key"
# A free port can be taken by someone else before a server binds it: so many tries with new ports.
PORT_ATTEMPTS = 3


def metadata(api_key: str) -> list[tuple[str, str]]:
    return [("authorization", f"apikey {api_key}")]


# -- the embedded server ------------------------------------------------------------------------


class ServerProcess:
    """`relay serve` on a free loopback port; namespace `chat` keeps `history_size` publications."""

    def __init__(self, history_size: int = 1000, extra: str = "") -> None:
        """`extra`: more lines of the [server] table, like "max_channels = 2000000"."""
        self.api_key = API_KEY
        self._dir = Path(tempfile.mkdtemp(prefix="relay-bench-serve-"))
        config = self._dir / "serve.toml"
        config.write_text(f'[server]\nnamespaces = [{{name = "chat", history_size = {history_size}, '
                          f'history_ttl = "10m"}}]\n{extra}\n')
        env = dict(os.environ, **{KEY_ENV: API_KEY})
        for attempt in range(PORT_ATTEMPTS):
            self.address = f"127.0.0.1:{free_port()}"
            self.process = subprocess.Popen(
                [sys.executable, "-m", "relay", "serve", "-c", str(config), "--listen", self.address,
                 "--api-key-env", KEY_ENV], cwd=ROOT, env=env, stderr=subprocess.PIPE)
            assert self.process.stderr is not None
            line = self.process.stderr.readline().decode()
            if line.startswith("listening on"):
                return
            self.stop()
            if "in use" not in line or attempt == PORT_ATTEMPTS - 1:
                raise RuntimeError(f"relay serve did not start: {line}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# -- the relay ----------------------------------------------------------------------------------


def start_relay(workdir: Path, address: str, body: str, api_key: str = API_KEY, sink: str = "",
                metrics: bool = False, env: dict[str, str] | None = None,
                python: str = sys.executable) -> RelayProcess:
    """`relay run` with `body` (sources and routes) publishing to `address`; its log is in workdir;
    `env` adds variables (a source's secrets); `python` runs it."""
    config = "\n".join([
        "[relay]", f'state_dir = "{workdir}/state"', 'log_level = "warning"',
        "[sink]", f'address = "{address}"', f'api_key_env = "{KEY_ENV}"', sink, body])
    return RelayProcess(workdir, config, env={KEY_ENV: api_key, **(env or {})}, metrics=metrics,
                        python=python).start()


def interpreter(python: str = sys.executable) -> str:
    """An interpreter's version, where it really is, and whether it loads libpython as a shared
    library (README.md, "Which Python": that and PGO move the relay's CPU per record)."""
    real = os.path.realpath(python)
    version = subprocess.run([python, "-c", "import platform; print(platform.python_version())"],
                             capture_output=True, text=True, check=True).stdout.strip()
    if shutil.which("ldd") is None:
        return f"{version} ({real})"
    linked = subprocess.run(["ldd", real], capture_output=True, text=True).stdout
    return f"{version} ({real}, libpython {'shared' if 'libpython' in linked else 'static'})"


def batch_mean(relay: RelayProcess) -> float:
    """The mean publications per Batch call the relay made (relay_sink_batch_size); 0 if none."""
    calls = relay.metric("relay_sink_batch_size_count")
    return round(relay.metric("relay_sink_batch_size_sum") / calls, 1) if calls else 0.0


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time the process has used so far (/proc/PID/stat)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _proc_status(pid: int, field: str) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB
    return 0.0


def peak_rss_mib(pid: int) -> float:
    """The most resident memory the process ever had (VmHWM), in MiB."""
    return _proc_status(pid, "VmHWM")


def rss_mib(pid: int) -> float:
    """Resident memory now (VmRSS), in MiB."""
    return _proc_status(pid, "VmRSS")


# -- counting on the server ---------------------------------------------------------------------


@dataclass
class Rate:
    """Publications counted between the first poll that saw any and the poll that saw them all.

    `middle_per_second` is the rate between the polls that first saw 10% and 90% of them: the
    steady pace, without the start and the tail (a drainer that stalls near the end shows there).
    """

    count: int
    seconds: float
    per_second: int
    middle_per_second: int
    first_seen: int  # publications already there at the first poll that saw any
    first_at: float  # time.perf_counter() of that poll
    last_at: float
    # CPU the publishing process spent per publication between those polls (start-up excluded),
    # in microseconds; 0 when no process was named. On a busy machine a steadier figure than a rate.
    cpu_us_per_record: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {k: round(v, 3) if isinstance(v, float) else v for k, v in asdict(self).items()
                if k not in ("first_at", "last_at")}


class StreamCounter:
    """Publications accepted on `channels` since the counter was made (or since `base`).

    A channel's stream top (History with limit 0) moves by one for every publication the server
    accepted into it, whether or not history still holds it, on the embedded server and on real
    Centrifugo alike. With `base=0` the server may still be starting: errors before the first answer
    are taken as "nothing yet". With `batched`, one poll is one Batch call of History commands
    instead of one call per channel: 50 channels polled every 20 ms would otherwise be 2,500 calls
    a second, CPU taken from the server and the relay being measured on a 2-core machine.
    """

    def __init__(self, address: str, channels: Sequence[str], api_key: str = API_KEY,
                 base: int | None = None, batched: bool = False) -> None:
        self.channels = list(channels)
        self._batch = api_pb2.BatchRequest(commands=[
            api_pb2.Command(history=api_pb2.HistoryRequest(channel=c, limit=0)) for c in self.channels
        ]) if batched else None
        # Reconnect within 50 ms, not after GRPC's default 1 s backoff, when the server comes up late.
        self._channel = grpc.insecure_channel(address, options=[
            ("grpc.initial_reconnect_backoff_ms", 50), ("grpc.min_reconnect_backoff_ms", 50),
            ("grpc.max_reconnect_backoff_ms", 100)])
        self._stub = api_pb2_grpc.CentrifugoApiStub(self._channel)  # type: ignore[no-untyped-call]
        self._metadata = metadata(api_key)
        self.base = self._total() if base is None else base
        self.samples: list[tuple[float, int]] = []

    def _top(self, channel: str) -> int:
        resp = self._stub.History(api_pb2.HistoryRequest(channel=channel, limit=0),
                                  metadata=self._metadata, timeout=5)
        if resp.error.code:
            raise RuntimeError(f"History {channel}: {resp.error.code} {resp.error.message}")
        return int(resp.result.offset)

    def _total(self) -> int:
        if self._batch is None:
            return sum(self._top(c) for c in self.channels)
        resp = self._stub.Batch(self._batch, metadata=self._metadata, timeout=5)
        for channel, reply in zip(self.channels, resp.replies, strict=True):
            if reply.error.code:
                raise RuntimeError(f"History {channel}: {reply.error.code} {reply.error.message}")
        return sum(int(reply.history.offset) for reply in resp.replies)

    def count(self) -> int:
        return self._total() - self.base

    def wait_for(self, count: int, alive: Callable[[], bool] = lambda: True, timeout: float = 600.0,
                 interval: float = 0.02, on_poll: Callable[[float, int], None] | None = None,
                 cpu_of: int | None = None) -> Rate:
        """Poll until `count` publications are there; the rate between the first and last poll, and
        with `cpu_of` (a pid) the CPU that process spent per publication in between."""
        started = time.perf_counter()
        first: tuple[float, int] | None = None
        cpu_first = cpu_last = 0.0
        while True:
            try:
                done = self.count()
            except grpc.RpcError:
                if self.base != 0 or first is not None:
                    raise
                done = 0
            now = time.perf_counter()
            self.samples.append((now, done))
            if cpu_of:
                # A process that finished its work may exit before the last poll: keep the last reading.
                with contextlib.suppress(OSError):
                    cpu_last = cpu_seconds(cpu_of)
            if on_poll is not None:
                on_poll(now, done)
            if done > 0 and first is None:
                first = (now, done)
                cpu_first = cpu_last
            if done >= count:
                break
            if not alive():
                raise RuntimeError(f"the publisher stopped after {done} of {count} publications")
            if now - started > timeout:
                raise TimeoutError(f"{done} of {count} publications after {timeout:.0f}s")
            time.sleep(interval)
        assert first is not None
        seconds = now - first[0]
        rate = round((done - first[1]) / seconds) if seconds > 0 else 0
        cpu = 0.0
        if cpu_of and done > first[1]:
            cpu = round((cpu_last - cpu_first) / (done - first[1]) * 1e6, 2)
        return Rate(done, seconds, rate, self._middle_rate(count), first[1], first[0], now, cpu)

    def _middle_rate(self, count: int, low: float = 0.1, high: float = 0.9) -> int:
        start = next((s for s in self.samples if s[1] >= low * count), None)
        end = next((s for s in self.samples if s[1] >= high * count), None)
        if start is None or end is None or end[0] <= start[0]:
            return 0
        return round((end[1] - start[1]) / (end[0] - start[0]))

    def timeline(self, since: float, points: int = 200) -> list[tuple[float, int]]:
        """(seconds since `since`, publications) of the polls, thinned to about `points`."""
        step = max(1, len(self.samples) // points)
        picked = self.samples[::step] + self.samples[-1:]
        return [(round(t - since, 3), n) for t, n in picked]

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> StreamCounter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def raw_batch(address: str, scenario: str, duration: float, size: int = 0,
              server_pid: int | None = None) -> dict[str, Any]:
    """The bare Batch client of bench/server_bench.py against `address`, in another process.

    `size` (bytes of data per publication, 0 = the default ~100) also caps the commands per call
    so that one call stays under GRPC's 4 MiB. With `server_pid`, the server's CPU per publication
    over the client's run (its start-up included, when the server is idle) is added.
    """
    server_cpu = cpu_seconds(server_pid) if server_pid else 0.0
    script = ROOT / "bench" / "server_bench.py"
    command = [sys.executable, str(script), "--client", address, scenario, str(duration), str(size)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=duration + 120)
    if done.returncode != 0:
        raise RuntimeError(f"bench client {scenario} failed: {done.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(done.stdout)
    if server_pid and result["publications"]:
        used = cpu_seconds(server_pid) - server_cpu
        result["server_cpu_us_per_record"] = round(used / result["publications"] * 1e6, 2)
    return result


def raw_batch_around(address: str, scenario: str, duration: float, server_pid: int | None = None) -> Callable[
        [dict[str, Any]], None]:
    """`raw_batch` now, and again when the returned function is called (after the runs it stands
    beside): it stores the mean of both in `results["raw " + scenario]`, each run in
    `runs_publications_per_second`. On a shared machine the load moves within a minute; a ceiling
    measured on both sides of the relay's runs is the fairer one to divide by."""
    before = raw_batch(address, scenario, duration, server_pid=server_pid)

    def after(results: dict[str, Any]) -> None:
        again = raw_batch(address, scenario, duration, server_pid=server_pid)
        runs = [before["publications_per_second"], again["publications_per_second"]]
        merged = {**before, "publications_per_second": round(sum(runs) / 2), "runs_publications_per_second": runs}
        if "server_cpu_us_per_record" in before and "server_cpu_us_per_record" in again:
            merged["server_cpu_us_per_record"] = round(
                (before["server_cpu_us_per_record"] + again["server_cpu_us_per_record"]) / 2, 2)
        results[f"raw {scenario}"] = merged

    return after


# -- latency ------------------------------------------------------------------------------------


def percentiles(values: Sequence[float]) -> dict[str, float]:
    """p50, p99, p99.9 and max of seconds, in milliseconds (nearest rank)."""
    ordered = sorted(values)
    if not ordered:
        return {"p50_ms": 0.0, "p99_ms": 0.0, "p999_ms": 0.0, "max_ms": 0.0}

    def rank(q: float) -> float:
        return ordered[min(len(ordered) - 1, max(0, int(q * len(ordered) + 0.5) - 1))] * 1000

    return {"p50_ms": round(rank(0.5), 2), "p99_ms": round(rank(0.99), 2),
            "p999_ms": round(rank(0.999), 2), "max_ms": round(ordered[-1] * 1000, 2)}


class Tail:
    """Follows a channel from its current top in another process; `result()` gives the latencies.

    The follower asks History for what came after the last position every `interval` seconds and
    notes, per publication, now minus the data's `t` (CLOCK_MONOTONIC, one clock for every process).
    What it reports is append/produce → accepted by the server, plus up to one poll interval.
    """

    def __init__(self, address: str, channel: str, count: int, api_key: str = API_KEY,
                 interval: float = 0.0005, timeout: float = 120.0) -> None:
        self.count = count
        env = dict(os.environ, **{KEY_ENV: api_key})
        self.process = subprocess.Popen(
            [sys.executable, str(Path(__file__)), "tail", address, channel, str(count), str(interval),
             str(timeout)], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if line.strip() != "ready":
            self.process.kill()
            _, err = self.process.communicate()
            raise RuntimeError(f"the History follower did not start: {line} {err}")

    def result(self, timeout: float = 150.0) -> list[float]:
        out, err = self.process.communicate(timeout=timeout)
        if self.process.returncode != 0:
            raise RuntimeError(f"the History follower failed: {err[-2000:]}")
        latencies: list[float] = json.loads(out)
        if len(latencies) < self.count:
            raise RuntimeError(f"only {len(latencies)} of {self.count} publications arrived")
        return latencies

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def _tail_main(address: str, channel: str, count: int, interval: float, timeout: float) -> None:
    meta = metadata(os.environ[KEY_ENV])
    latencies: list[float] = []
    with grpc.insecure_channel(address) as chan:
        stub = api_pb2_grpc.CentrifugoApiStub(chan)  # type: ignore[no-untyped-call]
        top = stub.History(api_pb2.HistoryRequest(channel=channel, limit=0), metadata=meta, timeout=5)
        offset, epoch = int(top.result.offset), top.result.epoch
        print("ready", flush=True)
        deadline = time.monotonic() + timeout
        while len(latencies) < count and time.monotonic() < deadline:
            since = api_pb2.StreamPosition(offset=offset, epoch=epoch)
            resp = stub.History(api_pb2.HistoryRequest(channel=channel, since=since, limit=-1),
                                metadata=meta, timeout=5)
            if resp.error.code:
                raise RuntimeError(f"History {channel}: {resp.error.code} {resp.error.message}")
            now = time.monotonic()
            for pub in resp.result.publications:
                latencies.append(now - json.loads(pub.data)["t"])
                offset = max(offset, int(pub.offset))
            time.sleep(interval)
    print(json.dumps(latencies))


# -- real Kafka and real Centrifugo -------------------------------------------------------------


def kafka_broker() -> Any:
    """A real Kafka 4.x node (tests/harness/kafka.py); the caller stops it."""
    from tests.harness.kafka import KafkaBroker
    return KafkaBroker.start(heap="768m")


def kafka_version() -> str:
    from tests.harness.kafka import KAFKA_VERSION
    return KAFKA_VERSION


def centrifugo_binary() -> Path:
    """The Centrifugo v6 binary the tests build into the cache (built here on first use)."""
    from tests.harness import centrifugo
    try:
        return centrifugo.centrifugo_binary()
    except BaseException as err:  # the harness skips/fails through pytest outcomes
        if isinstance(err, KeyboardInterrupt):
            raise
        raise RuntimeError(f"no Centrifugo binary: {err}") from None


def centrifugo_version() -> str:
    """The cached Centrifugo binary's version line, without building it."""
    from tests.harness.centrifugo import GOBIN, _binary_version
    return _binary_version(GOBIN / "centrifugo") or "not built (no section needed it)"


def centrifugo(workdir: Path, config_overrides: dict[str, Any] | None = None, start: bool = True) -> Any:
    """A real Centrifugo v6 on free ports (namespace `chat` with history), started unless told."""
    from tests.harness.centrifugo import RealCentrifugo
    binary = centrifugo_binary()
    for attempt in range(PORT_ATTEMPTS):
        server = RealCentrifugo(binary, workdir / f"ports-{attempt}", config_overrides=config_overrides)
        if not start:
            return server
        try:
            server.start()
            return server
        except RuntimeError as err:
            if not port_taken(err) or attempt == PORT_ATTEMPTS - 1:
                raise
    raise AssertionError("unreachable")


def port_taken(err: BaseException) -> bool:
    """The error of a server whose free port someone else took first."""
    return "address already in use" in str(err)


def in_thread(target: Callable[[], Any]) -> Callable[[], Any]:
    """Run `target` in a thread now; the returned function joins it and returns (or raises) its result."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = target()
        except BaseException as err:
            box["error"] = err

    thread = threading.Thread(target=run, daemon=True)
    thread.start()

    def join() -> Any:
        thread.join()
        if "error" in box:
            raise box["error"]
        return box.get("value")

    return join


if __name__ == "__main__":
    if len(sys.argv) == 7 and sys.argv[1] == "tail":
        _tail_main(sys.argv[2], sys.argv[3], int(sys.argv[4]), float(sys.argv[5]), float(sys.argv[6]))
    else:
        sys.exit("usage: rig.py tail ADDRESS CHANNEL COUNT INTERVAL TIMEOUT (API key in $" + KEY_ENV + ")")
