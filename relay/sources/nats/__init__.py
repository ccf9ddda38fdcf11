"""`type = "nats"`: a NATS JetStream stream read through a durable pull consumer, acked after delivery.

- `config`: the `[sources.NAME]` table (README's option table is made from it);
- `reader`: `NatsReader`, the reader the source engine runs: the durable, order, the start-up hold,
  acks (its docstring has the rules);
- `wire`: the pull connection, a minimal NATS client for the pull replies and the acks (nats-py
  keeps the control connection: consumer info and creation, authentication errors).
"""

from __future__ import annotations

from pathlib import Path

from relay.sources.nats.config import Config
from relay.sources.nats.reader import FIELDS, NatsReader, NatsSourceError

__all__ = ["FIELDS", "Config", "NatsReader", "NatsSourceError", "build"]


def build(name: str, config: Config, state_dir: Path) -> NatsReader:
    """The engine's reader of one `[sources.NAME]` table."""
    return NatsReader(name, config)
