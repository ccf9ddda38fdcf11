"""Config text the tests write for `relay run`: one place for the tables many tests share."""

from __future__ import annotations

# Ticks as `{"seq": N}`, so a test can read the sequence back from History.
SEQ_DATA = '{"seq": {{ seq }}}'


def sink_table(address: str, key_env: str = "CENTRIFUGO_GRPC_API_KEY", extra: str = "") -> str:
    """A [sink] that retries quickly, so outages in tests take seconds, not minutes."""
    return f'''
[sink]
address = "{address}"
api_key_env = "{key_env}"
retry = {{ initial_backoff = "20ms", max_backoff = "200ms" }}
{extra}
'''


def ticker_tables(channel: str, *, count: int = 0, interval: str = "0s", name: str = "tick",
                  data: str = SEQ_DATA) -> str:
    """A ticker source and the route that sends its ticks to `channel`."""
    return f'''
[sources.{name}]
type = "ticker"
interval = "{interval}"
count = {count}
data = '{data}'

[[routes]]
source = "{name}"
channel = "{channel}"
'''
