"""`relay run`: builds the pipeline from a config, runs it, reloads it on SIGHUP, and stops it on
SIGTERM without losing anything.

Start order: status endpoints → embedded server (if enabled) → sink → pipeline lanes → sources.
systemd hears READY=1 once the sink answered and the sources started.

Stop (SIGTERM, SIGINT): STOPPING=1; sources stop reading; what is in flight gets
`shutdown_timeout` to settle; sources commit what settled; everything closes; exit 0. What did not
settle in time is not committed, so Kafka and files read it again after the restart (its
idempotency keys make the repeat invisible).

Reload (SIGHUP): the file is read and validated first; a broken one is logged, one line per
problem, and the running pipeline goes on untouched. A valid one is applied without losing or
repeating anything: sources are held at the door (their next emit waits), what is in flight drains
through the old sink, then a new routing table, sink and lanes take over and the door opens.
Sources whose table did not change keep running through all of it (no Kafka rebalance, no file
re-read, a ticker's seq goes on); changed, added and removed ones stop and commit first, and start
again from their committed positions. If the drain runs out of time every source restarts that
way, so nothing left unsettled is lost. The embedded server restarts only if `[server]` changed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from pathlib import Path
from typing import Any

from relay import events, logs, sources
from relay.config import Config, load_config
from relay.dead_letter import DeadLetterFile
from relay.errors import ConfigError, FatalError
from relay.pipeline import Pipeline
from relay.reload_plan import plan_reload
from relay.routing import RoutingTable
from relay.secrets import SecretError
from relay.sinks.grpc_centrifugo import GrpcCentrifugoSink
from relay.status_server import StatusServer
from relay.systemd import SystemdNotifier

log = logging.getLogger("relay")

# How often the sink is pinged while it does not answer, and while it answers but nothing flows.
PING_DOWN_INTERVAL = 0.5
PING_IDLE_INTERVAL = 2.0
# How often readiness changes reach systemd's STATUS= (and READY=1 the first time).
REPORT_INTERVAL = 0.1


class StartError(Exception):
    """A part of the pipeline could not start: a port taken, a secret missing, a bad source."""


class Relay:
    """The running pipeline of one config, which a reload replaces piece by piece."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.server: Any = None
        self.status: StatusServer | None = None
        self.sink: GrpcCentrifugoSink | None = None
        self.pipeline: Pipeline | None = None
        self.sources: dict[str, sources.SourceEngine] = {}
        self.source_tasks: dict[str, asyncio.Task[None]] = {}
        self.state = "starting"  # starting | running | reloading | draining
        self._door = asyncio.Event()  # set while sources may hand messages to the pipeline
        self._door.set()
        self._supervisor: asyncio.Task[None] | None = None
        # Bytes read and not yet settled, all sources together (relay.max_buffer_bytes).
        self.budget = sources.ByteBudget(config.relay.max_buffer_bytes)

    # -- readiness ---------------------------------------------------------------------------

    def readiness(self) -> tuple[bool, str]:
        """(ready, why not): ready only while the sources run and the sink answers."""
        if self.state != "running":
            return False, self.state
        for source in list(self.sources.values()):
            up, why = source.readiness()
            if not up:
                return False, why
        if self.sink is None or not self.sink.healthy:
            why = self.sink.last_error if self.sink is not None else ""
            return False, f"sink not connected{': ' + why if why else ''}"
        if self.pipeline is not None and self.pipeline.problem:
            return False, self.pipeline.problem
        return True, ""

    def reopen_files(self) -> None:
        """SIGUSR1: close the dead letter file and open its path again (after a rotation)."""
        if self.pipeline is not None:
            log.info("SIGUSR1: reopening the dead letter file %s", self.pipeline.dead_letters.path)
            self.pipeline.dead_letters.reopen()

    def describe(self) -> str:
        """One line for systemd's STATUS=."""
        ready, why = self.readiness()
        cfg = self.config
        if ready:
            return (f"running: {len(self.sources)} source(s), {len(cfg.routes)} route(s), "
                    f"Centrifugo at {cfg.sink.address} answers")
        if self.state == "running" and (self.sink is None or not self.sink.healthy):
            error = self.sink.last_error if self.sink is not None else ""
            return f"waiting for Centrifugo at {cfg.sink.address}: sink not connected{': ' + error if error else ''}"
        return why

    async def _supervise(self) -> None:
        # Readiness follows the sink even while no messages flow (an idle ticker, a quiet topic).
        while True:
            sink, pipeline = self.sink, self.pipeline
            if sink is not None and (not sink.healthy or pipeline is None or pipeline.unsettled == 0):
                with contextlib.suppress(Exception):  # a sink closed by a reload under our feet
                    await sink.ping()
            healthy = sink is not None and sink.healthy
            await asyncio.sleep(PING_IDLE_INTERVAL if healthy else PING_DOWN_INTERVAL)

    # -- start -------------------------------------------------------------------------------

    async def start(self) -> None:
        events.ReadinessProbed(lambda: self.readiness()[0]).emit()
        await self._bring_up(self.config)
        self._supervisor = asyncio.create_task(self._supervise(), name="supervisor")
        self.state = "running"
        log.info("relay running: %d source(s), %d route(s)", len(self.sources), len(self.config.routes))

    async def _bring_up(self, cfg: Config, sink: GrpcCentrifugoSink | None = None) -> None:
        """Start whatever part of `cfg` is not running yet: status endpoints, embedded server, sink
        (`sink`, if already built) and lanes, sources. Raises StartError."""
        if cfg.relay.metrics_listen and self.status is None:
            status = StatusServer(cfg.relay.metrics_listen, self.readiness)
            try:
                await status.start()
            except (OSError, ValueError) as err:
                raise StartError(f"relay.metrics_listen: cannot listen on {cfg.relay.metrics_listen}: "
                                 f"{getattr(err, 'strerror', None) or err}") from None
            self.status = status
        if cfg.server.enabled and self.server is None:
            from relay.server.app import EmbeddedServer, ServerStartError
            server = EmbeddedServer(cfg.server)
            try:
                await server.start()
            except ServerStartError as err:
                raise StartError(str(err)) from None
            self.server = server
            log.info("embedded server listening on %s", server.address)
        if self.pipeline is None:
            await self._start_pipeline(cfg, sink or self._new_sink(cfg))
        state_dir = Path(cfg.relay.state_dir)
        state_dir.mkdir(parents=True, exist_ok=True)
        for name, source_config in cfg.sources.items():
            if name in self.sources:
                continue
            try:
                source = sources.build(name, source_config, state_dir, self.budget)
            except Exception as err:
                raise StartError(f"sources.{name}: {err}") from None
            self.sources[name] = source
            self.source_tasks[name] = asyncio.create_task(source.run(self._emit_from(name)),
                                                          name=f"source-{name}")

    @staticmethod
    def _new_sink(cfg: Config) -> GrpcCentrifugoSink:
        try:
            return GrpcCentrifugoSink(cfg.sink)
        except SecretError as err:
            raise StartError(f"sink: {err}") from None

    async def _start_pipeline(self, cfg: Config, sink: GrpcCentrifugoSink) -> None:
        await sink.start()
        if await sink.ping():
            log.info("sink: Centrifugo at %s answers (api %s)", cfg.sink.address, cfg.sink.api)
        else:
            log.warning("sink: Centrifugo at %s does not answer yet (%s); messages wait and are retried",
                        cfg.sink.address, sink.last_error)
        routes = RoutingTable(cfg.routes, cfg.relay.unmatched, max_output_bytes=cfg.sink.max_message_bytes)
        pipeline = Pipeline(routes, sink,
                            DeadLetterFile(cfg.dead_letter_path), lanes=cfg.sink.max_in_flight,
                            batch_max_size=cfg.sink.batch_max_size, batch_linger=cfg.sink.batch_linger)
        pipeline.start()
        self.sink, self.pipeline = sink, pipeline

    def _emit_from(self, name: str) -> sources.Emit:
        async def emit(batch: list[Any]) -> None:
            # The door is shut only while a reload swaps the pipeline; a source waits here, holding
            # its batch, and hands it to the new pipeline.
            while not self._door.is_set():
                await self._door.wait()
            assert self.pipeline is not None
            # No await between the door and the pipeline counting the batch as in flight, so a
            # drain that starts after the door shut sees every message that got through.
            await self.pipeline.emit(batch)
        return emit

    async def wait_sources(self) -> None:
        """Returns when every source finished (a ticker with `count`), raising a source's error.

        Cancelling this wait leaves the sources running."""
        tasks = list(self.source_tasks.values())
        if tasks:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in tasks:
            error = task.exception() if task.done() and not task.cancelled() else None
            if error is not None:
                raise error

    # -- stop --------------------------------------------------------------------------------

    async def _stop_sources(self, names: list[str], deadline: float) -> None:
        """Ask sources to stop reading and give their loops until `deadline` to return."""
        for name in names:
            await self.sources[name].stop()
        running = [self.source_tasks[n] for n in names if not self.source_tasks[n].done()]
        if running:
            await asyncio.wait(running, timeout=max(0.0, deadline - time.monotonic()))

    async def _close_sources(self, names: list[str]) -> None:
        """After the drain: end source loops still running, then let each commit what settled."""
        tasks = [self.source_tasks[n] for n in names]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for name in names:
            try:
                await self.sources[name].close()
            except Exception as err:
                log.error("closing source %s: %s", name, err)
            del self.sources[name], self.source_tasks[name]

    async def _drain(self, deadline: float, why: str) -> bool:
        assert self.pipeline is not None
        drained = await self.pipeline.drain(max(0.0, deadline - time.monotonic()))
        if not drained:
            log.warning("%s: %d message(s) not settled within %gs; their positions are not committed "
                        "and they will be read again", why, self.pipeline.unsettled,
                        self.config.relay.shutdown_timeout)
            events.MessagesAbandoned().emit()
        return drained

    async def _stop_pipeline(self) -> None:
        if self.pipeline is not None:
            await self.pipeline.stop()
            self.pipeline = None
        if self.sink is not None:
            await self.sink.close()
            self.sink = None

    async def _stop_server(self) -> None:
        if self.server is not None:
            await self.server.stop(1.0)
            self.server = None

    async def stop(self) -> bool:
        """Drain and close; False when the drain ran out of time (the rest is read again later)."""
        self.state = "draining"
        deadline = time.monotonic() + self.config.relay.shutdown_timeout
        names = list(self.sources)
        await self._stop_sources(names, deadline)
        drained = True
        if self.pipeline is not None:
            drained = await self._drain(deadline, "shutdown")
        await self._close_sources(names)
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
        await self._stop_pipeline()
        await self._stop_server()
        if self.status is not None:
            await self.status.stop()
            self.status = None
        return drained

    # -- reload ------------------------------------------------------------------------------

    async def reload(self, new: Config) -> bool:
        """Apply a validated config; False (and the old one running) when it cannot be.

        Raises StartError only if neither the new config nor the old one can run."""
        old = self.config
        plan = plan_reload(old, new)
        if plan.unchanged:
            log.info("reload: the config did not change")
            return True
        sink = None
        if plan.rebuild_pipeline:
            try:
                sink = self._new_sink(new)  # a missing secret fails here, before anything stops
            except StartError as err:
                log.error("reload rejected: %s; the running config stays in force", err)
                return False
        if plan.move_status and not await self._move_status(new):
            return False
        if sink is None:
            self.config = new
            self.budget.limit = new.relay.max_buffer_bytes
            log.info("reload: applied (the pipeline did not change)")
            return True
        self.state = "reloading"
        deadline = time.monotonic() + old.relay.shutdown_timeout
        keep, restart = list(plan.keep), list(plan.stop)
        # Sources that go away stop first, with the door still open, so a batch they hold can
        # still get in; then the door shuts and everything in flight drains.
        await self._stop_sources(restart, deadline)
        self._door.clear()
        if not await self._drain(deadline, "reload"):
            await self._stop_sources(keep, time.monotonic() + 1.0)
            restart += keep
            keep = []
        await self._close_sources(restart)
        await self._stop_pipeline()
        if plan.restart_server:
            await self._stop_server()
        self.config = new
        self.budget.limit = new.relay.max_buffer_bytes
        try:
            await self._bring_up(new, sink)
        except StartError as err:
            log.error("reload: %s; going back to the previous config", err)
            await self._roll_back(old)
            return False
        finally:
            self._door.set()
            self.state = "running"
        log.info("reload: applied: %d source(s) kept running, %d (re)started, %d route(s)",
                 len(keep), len(self.sources) - len(keep), len(self.config.routes))
        return True

    async def _move_status(self, new: Config) -> bool:
        """Serve the status endpoints at the new address (or nowhere); keep the old one if it cannot."""
        status = None
        if new.relay.metrics_listen:
            status = StatusServer(new.relay.metrics_listen, self.readiness)
            try:
                await status.start()
            except (OSError, ValueError) as err:
                why = getattr(err, "strerror", None) or err
                log.error("reload rejected: relay.metrics_listen: cannot listen on %s: %s; the running "
                          "config stays in force", new.relay.metrics_listen, why)
                return False
        if self.status is not None:
            await self.status.stop()
        self.status = status
        return True

    async def _roll_back(self, old: Config) -> None:
        names = list(self.sources)
        await self._stop_sources(names, time.monotonic() + old.relay.shutdown_timeout)
        if self.pipeline is not None:
            await self._drain(time.monotonic() + old.relay.shutdown_timeout, "reload")
        await self._close_sources(names)
        await self._stop_pipeline()
        await self._stop_server()
        self.config = old
        await self._bring_up(old)


async def _report(relay: Relay, notifier: SystemdNotifier) -> None:
    """Tell systemd READY=1 the first time the relay is ready, and STATUS= whenever that changes."""
    last = ""
    while True:
        text = relay.describe()
        if not notifier.ready_sent and relay.readiness()[0]:
            notifier.ready(text)
            log.info("ready: %s", text)
        elif text != last:
            notifier.status(text)
        last = text
        await asyncio.sleep(REPORT_INTERVAL)


async def _reload(relay: Relay, path: str, notifier: SystemdNotifier) -> None:
    log.info("SIGHUP: reading %s", path)
    try:
        new = load_config(path)
    except ConfigError as err:
        for problem in err.problems:
            log.error("reload rejected: %s", problem)
        log.error("reload rejected: %d problem(s); the running config stays in force", len(err.problems))
        notifier.status(f"reload of {path} rejected ({len(err.problems)} problem(s)); running the "
                        "previous config")
        return
    # Before the first READY=1 systemd is still waiting for the start; a reload is not its business.
    announced = notifier.ready_sent
    if announced:
        notifier.reloading(f"reloading {path}")
    logs.setup(new.relay.log_level, new.relay.log_format)
    try:
        await relay.reload(new)
    except StartError as err:
        raise FatalError(f"reload: {err}") from None
    finally:
        logs.setup(relay.config.relay.log_level, relay.config.relay.log_format)
        if announced:
            notifier.ready(relay.describe())


async def _delivered_or_stopped(relay: Relay, stop: asyncio.Event) -> None:
    """Sources that finished by themselves (a ticker with `count`) cannot be read again, so what
    they emitted is waited for without a deadline; only a stop signal cuts the wait short."""
    if relay.pipeline is None:
        return
    delivered = asyncio.create_task(relay.pipeline.drain(None))
    stopped = asyncio.create_task(stop.wait())
    await asyncio.wait({delivered, stopped}, return_when=asyncio.FIRST_COMPLETED)
    delivered.cancel()
    stopped.cancel()


async def run_pipeline(config: Config, path: str) -> None:
    """`relay run` until a stop signal or every source finished; FatalError when it cannot start or
    a source failed (after the stop, so what settled is committed)."""
    logs.setup(config.relay.log_level, config.relay.log_format)
    notifier = SystemdNotifier()
    relay = Relay(config)
    stop, hup = asyncio.Event(), asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_stop_signal() -> None:
        if not stop.is_set():
            timeout = relay.config.relay.shutdown_timeout
            notifier.stopping(f"draining in-flight publications (up to {timeout:g}s)")
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_stop_signal)
    loop.add_signal_handler(signal.SIGHUP, hup.set)
    loop.add_signal_handler(signal.SIGUSR1, relay.reopen_files)
    notifier.status("starting")
    try:
        await relay.start()
    except StartError as err:
        await relay.stop()
        raise FatalError(str(err)) from None
    helpers = [asyncio.create_task(_report(relay, notifier), name="sd-notify"),
               asyncio.create_task(notifier.keep_watchdog_fed(), name="sd-watchdog")]
    failure: BaseException | None = None
    try:
        while True:
            waits = {asyncio.create_task(relay.wait_sources()), asyncio.create_task(stop.wait()),
                     asyncio.create_task(hup.wait())}
            done, pending = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            for task in pending:
                task.cancel()
            if stop.is_set():
                log.info("stopping: draining in-flight publications (up to %gs)",
                         relay.config.relay.shutdown_timeout)
                break
            if hup.is_set():
                hup.clear()
                await _reload(relay, path, notifier)
                continue
            finished = done.pop()
            failure = finished.exception()
            if failure is not None:
                log.error("source failed: %s", failure)
            else:
                log.info("every source finished; waiting until everything is delivered")
                await _delivered_or_stopped(relay, stop)
            notifier.stopping("every source finished; draining")
            break
    finally:
        for task in helpers:
            task.cancel()
        drained = await relay.stop()
        notifier.close()
    log.info("stopped" if drained else "stopped (some messages will be read again after the restart)")
    if failure is not None:
        raise FatalError(f"source failed: {failure}", logged=True) from failure
