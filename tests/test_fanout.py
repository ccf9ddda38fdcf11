"""1,000 WebSocket subscribers on one channel: every one gets every publication, in order (not timed).

The same driver as bench/fanout_bench.py, with a lighter load (200 publications at 1,000/s) and
the order of each subscriber's offsets checked; run against the embedded server and real Centrifugo.
"""

from __future__ import annotations

from bench.fanout_bench import fan_out
from tests.harness.client_targets import ClientTarget


async def test_every_subscriber_gets_every_publication_in_order(client_target: ClientTarget) -> None:
    figures = await fan_out(client_target.ws_url, client_target.api_url, client_target.api_key,
                            subscribers=1000, publications=200, rate=1000, check_order=True, timeout=240)
    assert figures["errors"] == []
    assert figures["deliveries"] == figures["expected_deliveries"] == 200_000
