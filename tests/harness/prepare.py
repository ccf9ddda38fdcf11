"""Fetch and build the real components before the suite starts: `make test` runs this first.

A first run on a new machine resolves Kafka's jars with Maven, builds Centrifugo and the seed Go
client with `go` and installs Debian's redis-server when missing (as root): minutes of work that
should not count against one test's timeout. Everything lands in the cache (RELAY_CACHE), so later
runs find it at once. In CI a component that cannot be had fails here, loudly; locally the affected
tests skip later and say why.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from typing import Any


def _steps() -> list[tuple[str, Callable[[], Any]]]:
    from tests.harness.centrifugo import centrifugo_binary
    from tests.harness.kafka import kafka_jars
    from tests.harness.postgres import postgres_binaries
    from tests.harness.redis import redis_binary
    from tests.test_seed_client_go import seed_client_binary
    return [("Kafka broker jars (Maven)", kafka_jars),
            ("Centrifugo (go install)", centrifugo_binary),
            ("the seed document's Go client (go build)", seed_client_binary),
            ("redis-server (Debian's package)", redis_binary),
            ("PostgreSQL 15 (installed, nothing to fetch)", postgres_binaries)]


def main() -> int:
    failed = []
    for what, step in _steps():
        started = time.monotonic()
        try:
            step()
        except KeyboardInterrupt:
            raise
        except BaseException as err:  # the harness reports through pytest's fail/skip, BaseExceptions
            failed.append(what)
            print(f"prepare: NOT READY: {what}: {err}", file=sys.stderr)
            continue
        print(f"prepare: ready: {what} ({time.monotonic() - started:.1f}s)")
    if failed and os.environ.get("CI"):
        print(f"prepare: CI needs every component; missing: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
