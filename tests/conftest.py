"""Fixtures live in tests/harness/; this file only registers them."""

pytest_plugins = [
    "tests.harness.embedded",
    "tests.harness.kafka",
    "tests.harness.nats",
    "tests.harness.postgres",
    "tests.harness.centrifugo",
    "tests.harness.subscriber",
    "tests.harness.client_targets",
    "tests.harness.node_client",
    "tests.harness.redis",
]
