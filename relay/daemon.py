"""`relay run`: builds the pipeline from a config, runs it, and stops it without losing anything.

Start order: embedded server (if enabled) → sink → pipeline lanes → sources. Stop order is the
reverse, with a drain in the middle: sources stop reading, in-flight publications get
`shutdown_timeout` to settle, then sources commit what was settled and everything closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from pathlib import Path
from typing import Any

from relay import logs, metrics, sources
from relay.config import Config
from relay.dead_letter import DeadLetterFile
from relay.pipeline import Pipeline
from relay.routing import RoutingTable
from relay.secrets import SecretError, load_secret
from relay.sinks.grpc_centrifugo import GrpcCentrifugoSink
from relay.status_server import StatusServer

log = logging.getLogger("relay")

SINK_PING_INTERVAL = 2.0


class FatalStartError(Exception):
    pass


class Relay:
    """One running pipeline built from one config."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.server: Any = None
        self.sink: GrpcCentrifugoSink | None = None
        self.pipeline: Pipeline | None = None
        self.sources: dict[str, sources.Source] = {}
        self.source_tasks: dict[str, asyncio.Task[None]] = {}
        self.status: StatusServer | None = None
        self.draining = False
        self._ping_task: asyncio.Task[None] | None = None

    # -- readiness ---------------------------------------------------------------------------

    def readiness(self) -> tuple[bool, str]:
        if self.draining:
            return False, "draining"
        if self.sink is None or not self.sink.healthy:
            why = self.sink.last_error if self.sink is not None else ""
            return False, f"sink not connected{': ' + why if why else ''}"
        if not self.source_tasks:
            return False, "sources not started"
        return True, ""

    def _update_ready(self) -> None:
        metrics.READY.set(1 if self.readiness()[0] else 0)

    async def _ping_sink(self) -> None:
        # Readiness follows the sink even while no messages flow (an idle ticker, a quiet topic).
        assert self.sink is not None
        while True:
            if not self.sink.healthy or not self.pipeline or self.pipeline.unsettled == 0:
                await self.sink.ping()
            self._update_ready()
            await asyncio.sleep(SINK_PING_INTERVAL)

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        cfg = self.config
        if cfg.server.enabled:
            from relay.server.app import EmbeddedServer
            self.server = EmbeddedServer(cfg.server)
            await self.server.start()
            log.info("embedded server listening on %s", self.server.address)
        try:
            api_key = load_secret(cfg.sink.api_key_env, cfg.sink.api_key_file)
        except SecretError as err:
            raise FatalStartError(f"sink: {err}") from None
        self.sink = GrpcCentrifugoSink(cfg.sink, api_key)
        await self.sink.start()
        if await self.sink.ping():
            log.info("sink: Centrifugo at %s answers (api %s)", cfg.sink.address, cfg.sink.api)
        else:
            log.warning("sink: Centrifugo at %s does not answer yet (%s); messages wait and are retried",
                        cfg.sink.address, self.sink.last_error)
        router = RoutingTable(cfg.routes, cfg.relay.unmatched)
        self.pipeline = Pipeline(router, self.sink, DeadLetterFile(cfg.dead_letter_path),
                                 lanes=cfg.sink.max_in_flight, batch_max_size=cfg.sink.batch_max_size,
                                 batch_linger=cfg.sink.batch_linger)
        self.pipeline.start()
        if cfg.relay.metrics_listen:
            self.status = StatusServer(cfg.relay.metrics_listen, self.readiness)
            await self.status.start()
        state_dir = Path(cfg.relay.state_dir)
        state_dir.mkdir(parents=True, exist_ok=True)
        for name, source_config in cfg.sources.items():
            self.sources[name] = sources.build(name, source_config, state_dir)
        for name, source in self.sources.items():
            self.source_tasks[name] = asyncio.create_task(self._run_source(name, source), name=f"source-{name}")
        self._ping_task = asyncio.create_task(self._ping_sink())
        self._update_ready()
        log.info("relay running: %d source(s), %d route(s)", len(self.sources), len(cfg.routes))

    async def _run_source(self, name: str, source: sources.Source) -> None:
        assert self.pipeline is not None
        await source.run(self.pipeline.emit)

    async def wait_sources(self) -> None:
        """Returns when every source finished (a ticker with `count`), raising a source's error."""
        if self.source_tasks:
            await asyncio.gather(*self.source_tasks.values())

    async def stop(self) -> bool:
        """Drain and close; False when the drain ran out of time (the rest is redelivered later)."""
        self.draining = True
        self._update_ready()
        for source in self.sources.values():
            await source.stop()
        for task in self.source_tasks.values():
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(asyncio.shield(task), 5)
        drained = True
        if self.pipeline is not None:
            drained = await self.pipeline.drain(self.config.relay.shutdown_timeout)
            if not drained:
                log.warning("shutdown: %d message(s) not settled within %gs; their positions are not "
                            "committed and they will be delivered again", self.pipeline.unsettled,
                            self.config.relay.shutdown_timeout)
        for source in self.sources.values():
            try:
                await source.close()
            except Exception as err:
                log.error("closing source %s: %s", getattr(source, "name", "?"), err)
        for task in self.source_tasks.values():
            task.cancel()
        if self._ping_task is not None:
            self._ping_task.cancel()
        if self.pipeline is not None:
            await self.pipeline.stop()
        if self.sink is not None:
            await self.sink.close()
        if self.status is not None:
            await self.status.stop()
        if self.server is not None:
            await self.server.stop(1.0)
        return drained


async def run_pipeline(config: Config, path: str) -> int:
    logs.setup(config.relay.log_level, config.relay.log_format)
    relay = Relay(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await relay.start()
    except FatalStartError as err:
        from relay.cli import FatalError
        await relay.stop()
        raise FatalError(str(err)) from None
    finished = asyncio.create_task(relay.wait_sources())
    stopping = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait({finished, stopping}, return_when=asyncio.FIRST_COMPLETED)
    code = 0
    if finished in done and finished.exception() is not None:
        log.error("source failed: %s", finished.exception())
        code = 1
    elif finished in done:
        log.info("every source finished; draining")
    else:
        log.info("stopping: draining in-flight publications (up to %gs)", config.relay.shutdown_timeout)
    stopping.cancel()
    await relay.stop()
    log.info("stopped")
    return code
