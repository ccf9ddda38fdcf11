"""The pipeline when a part under it fails in a way it cannot handle: loud, never a silent stall.

Unit tests of relay/pipeline.py with an in-memory sink (the real-process tests of the same faults
are in tests/test_dead_letters.py)."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from relay.config import parse_config
from relay.dead_letter import DeadLetterFile
from relay.message import Message
from relay.pipeline import Pipeline
from relay.routing import Publication, RoutingTable

CONFIG = '[sources.s]\ntype = "ticker"\n[[routes]]\nsource = "s"\nchannel = "chat:x"\n'


class BrokenSink:
    """A sink with a bug: every delivery raises."""

    async def deliver(self, batch: list[Publication]) -> dict[int, list[object]]:
        raise RuntimeError("a bug in the sink")


async def test_a_lane_that_fails_is_logged_and_makes_the_pipeline_not_ready(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    config = parse_config(CONFIG)
    pipeline = Pipeline(RoutingTable(config.routes), BrokenSink(),  # type: ignore[arg-type]
                        DeadLetterFile(tmp_path / "dead.jsonl"), lanes=1, batch_max_size=10, batch_linger=0)
    pipeline.start()
    assert pipeline.problem == ""
    await pipeline.emit([Message("s", b"{}", offset=1)])
    for _ in range(200):
        if pipeline.problem:
            break
        await asyncio.sleep(0.01)
    await pipeline.stop()
    assert pipeline.problem == "lane-0 failed: RuntimeError('a bug in the sink')"
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and errors[0].exc_info is not None and "lane-0 failed" in errors[0].getMessage()
