"""`type = "ticker"`: a message every interval (or on a 5-field cron schedule), `count` times."""

from __future__ import annotations

import asyncio
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from relay.message import NOTHING, Message
from relay.sources.engine import READ_MAX, READ_MAX_BYTES, Batch
from relay.templates import Template
from relay.units import Duration

DEFAULT_DATA = '{"type": "tick", "seq": {{ seq }}, "at": "{{ now }}"}'
# The template fields and `when` keys of its messages.
FIELDS = ("seq", "now", "json.*")


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    type: Literal["ticker"]
    interval: Duration = Field(1.0, description='Time between messages; "0s" = as fast as the sink takes.')
    cron: str = Field("", description='A 5-field cron schedule instead of interval, like "*/5 * * * *".')
    count: int = Field(0, ge=0, description="Messages to emit, then stop; 0 = forever.")
    data: str = Field(DEFAULT_DATA, description="Data template: {{ seq }} (from 1), {{ now }} (RFC 3339 UTC).")

    @field_validator("data")
    @classmethod
    def _data(cls, value: str) -> str:
        for name in Template.compile(value).fields:
            if name not in ("seq", "now", "source"):
                raise ValueError(f"the ticker's data has no {{{{ {name} }}}} (it has seq, now, source)")
        return value

    @field_validator("cron")
    @classmethod
    def _cron(cls, value: str) -> str:
        if value:
            from croniter import croniter
            if len(value.split()) != 5 or not croniter.is_valid(value):
                raise ValueError(f"bad cron expression {value!r} (want 5 fields, like \"*/5 * * * *\")")
        return value

    @model_validator(mode="after")
    def _schedule(self) -> Config:
        if self.interval < 0:
            raise ValueError("interval must not be negative")
        return self


class Ticker:
    """Renders `data` with a growing `seq`; positions are (run id, seq). Nothing to commit: ticks
    are not replayed after a restart."""

    def __init__(self, name: str, config: Config) -> None:
        self.name = name
        self.config = config
        self._template = Template.compile(config.data)
        # Ticks are not replayed after a restart, so a restart must not collide with the
        # idempotency keys of the previous run: each run is its own stream.
        self._stream = uuid.uuid4().hex[:12]
        self._seq = 0
        self._fast = not config.cron and config.interval == 0
        self._read_max = max(1, min(READ_MAX, READ_MAX_BYTES // max(1, len(config.data))))

    def _data_format(self, now: str) -> tuple[bytes, int]:
        """The data template with `now` and `source` filled in, as a bytes %-format taking `seq`
        (as `%d`, which writes what str() does) that many times: one operation per tick."""
        values = {"now": now, "source": self.name}
        parts: list[bytes] = []
        seqs = 0
        template = self._template
        for literal, name in zip(template.literals, (*template.fields, None), strict=True):
            parts.append(literal.encode().replace(b"%", b"%%"))
            if name == "seq":
                parts.append(b"%d")
                seqs += 1
            elif name is not None:
                parts.append(values[name].encode().replace(b"%", b"%%"))
        return b"".join(parts), seqs

    async def _sleep_until_next(self) -> None:
        if self.config.cron:
            from croniter import croniter
            delay = croniter(self.config.cron, datetime.now(UTC)).get_next(float) - time.time()
        else:
            delay = self.config.interval
        if delay > 0:
            await asyncio.sleep(delay)

    async def connect(self) -> None:
        return None

    async def read(self) -> list[Batch] | None:
        limit = self.config.count
        if limit and self._seq >= limit:
            return None
        if not self._fast:
            await self._sleep_until_next()
        n = min(self._read_max, limit - self._seq) if (self._fast and limit) else (self._read_max if self._fast else 1)
        first = self._seq + 1
        self._seq += n
        # One clock reading per read: a batch of ticks is made within a millisecond or so.
        now = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        read_at = time.monotonic()
        data, seqs = self._data_format(now)
        name, stream = self.name, self._stream
        # Built inline, by position: this runs for every tick.
        messages = [Message(name, data % ((seq,) * seqs), stream, seq, None, NOTHING, {"seq": seq, "now": now},
                            read_at) for seq in range(first, first + n)]
        return [Batch(stream, messages, end=self._seq + 1)]

    async def commit(self, positions: dict[str, int]) -> None:
        return None

    async def close(self) -> None:
        return None


def build(name: str, config: Config, state_dir: Path) -> Ticker:
    return Ticker(name, config)
