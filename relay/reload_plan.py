"""What a SIGHUP reload changes, decided from the old and the new config alone.

`plan_reload(old, new)` is pure: no sockets, no tasks. `Relay.reload` (relay/daemon.py) carries the
plan out: it builds the new sink, moves the status endpoints, stops `stop`, drains, rebuilds the
pipeline (and the embedded server if `restart_server`) and starts `start`; `keep` runs through it all.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from relay.config import Config


@dataclass(frozen=True)
class ReloadPlan:
    """The parts a reload touches; sources are named by their `[sources.NAME]` key."""

    unchanged: bool  # the configs are equal: nothing to do
    rebuild_pipeline: bool  # routes, sink, lanes: in-flight messages drain through the old ones first
    move_status: bool  # the status endpoints move to the new metrics_listen (or stop)
    restart_server: bool  # the embedded server stops and starts with the new [server]
    keep: tuple[str, ...] = ()  # sources that run on untouched (no rebalance, no re-read)
    stop: tuple[str, ...] = ()  # running sources that stop and commit: changed or removed
    start: tuple[str, ...] = ()  # sources started from their committed positions: changed or added


def plan_reload(old: Config, new: Config) -> ReloadPlan:
    """Decide what a reload from `old` to `new` must stop, rebuild and start."""
    rebuild = pipeline_parts(new) != pipeline_parts(old)
    same_state = new.relay.state_dir == old.relay.state_dir
    # Without a rebuild the sources (part of the pipeline's parts) are all unchanged.
    keep = tuple(name for name in old.sources
                 if not rebuild or (same_state and new.sources.get(name) == old.sources[name]))
    return ReloadPlan(
        unchanged=new == old,
        rebuild_pipeline=rebuild,
        move_status=new.relay.metrics_listen != old.relay.metrics_listen,
        restart_server=new.server != old.server,
        keep=keep,
        stop=tuple(name for name in old.sources if name not in keep),
        start=tuple(name for name in new.sources if name not in keep),
    )


def pipeline_parts(cfg: Config) -> tuple[Any, ...]:
    """What a running pipeline is built from; a change to anything else needs no drain."""
    return (cfg.sources, cfg.routes, cfg.sink, cfg.server, cfg.relay.unmatched, cfg.relay.state_dir,
            cfg.dead_letter_path)
