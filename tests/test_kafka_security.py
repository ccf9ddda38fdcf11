"""Kafka SASL (PLAIN, SCRAM-SHA-256, SCRAM-SHA-512) and TLS through `relay run`, against the real
broker's SASL_PLAINTEXT and SSL listeners. A wrong password or an untrusted broker certificate
stops the relay at once (not after connect_timeout) with one line naming the source and the
mechanism, and the password appears nowhere."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import pytest
import trustme

from tests.harness.embedded import EmbeddedServerFactory, EmbeddedServerProcess
from tests.harness.history import history_json, wait_for_count
from tests.harness.kafka import KafkaBroker, run_sync
from tests.harness.relay_process import RelayProcess

pytestmark = pytest.mark.kafka

MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")
RECORDS = 50
WRONG_PASSWORD = "not-the-password-9c1e"


def relay_config(server: EmbeddedServerProcess, brokers: str, topic: str, channel: str, security: str) -> str:
    return f"""
[relay]
shutdown_timeout = "2s"

[sink]
address = "{server.address}"
api_key_env = "SINK_KEY"

[sources.events]
type = "kafka"
brokers = ["{brokers}"]
topics = ["{topic}"]
group_id = "g-{uuid.uuid4().hex[:8]}"
connect_timeout = "30s"
{security}

[[routes]]
source = "events"
channel = "{channel}"
"""


def sasl(broker: KafkaBroker, mechanism: str) -> str:
    return (f'security_protocol = "SASL_PLAINTEXT"\nsasl = {{ mechanism = "{mechanism}", '
            f'username = "{broker.sasl_username}", password_env = "KAFKA_PASSWORD" }}')


@pytest.fixture(scope="module")
def topic(kafka_broker: KafkaBroker) -> str:
    name = f"secure-{uuid.uuid4().hex[:8]}"
    run_sync(kafka_broker.create_topic(name, 2))
    run_sync(kafka_broker.produce(name, [json.dumps({"n": n}).encode() for n in range(RECORDS)]))
    return name


def test_every_sasl_mechanism_through_the_relay(kafka_broker: KafkaBroker, topic: str, tmp_path: Path,
                                                embedded_server: EmbeddedServerProcess) -> None:
    env = {"SINK_KEY": embedded_server.api_key, "KAFKA_PASSWORD": kafka_broker.sasl_password}
    relays = {mech: RelayProcess(tmp_path / mech, relay_config(
        embedded_server, kafka_broker.sasl_bootstrap, topic, f"chat:sasl-{mech}", sasl(kafka_broker, mech)),
        env=env).start() for mech in MECHANISMS}
    try:
        for mech, relay in relays.items():
            wait_for_count(embedded_server.address, f"chat:sasl-{mech}", RECORDS, embedded_server.api_key, 60)
            assert relay.terminate(30) == 0
    finally:
        for relay in relays.values():
            relay.stop()
    for mech in MECHANISMS:
        got = history_json(embedded_server.address, f"chat:sasl-{mech}", embedded_server.api_key)
        assert sorted(d["n"] for d in got) == list(range(RECORDS))


def test_a_wrong_password_stops_the_relay_with_one_clear_line(kafka_broker: KafkaBroker, topic: str,
                                                              tmp_path: Path,
                                                              embedded_server: EmbeddedServerProcess) -> None:
    env = {"SINK_KEY": embedded_server.api_key, "KAFKA_PASSWORD": WRONG_PASSWORD}
    began = time.monotonic()
    relays = {mech: RelayProcess(tmp_path / mech, relay_config(
        embedded_server, kafka_broker.sasl_bootstrap, topic, f"chat:refused-{mech}",
        sasl(kafka_broker, mech)), env=env).start() for mech in MECHANISMS}
    try:
        for mech, relay in relays.items():
            assert relay.wait(25) == 1, relay.logs()
            assert time.monotonic() - began < 25, "a refused login must not wait for connect_timeout (30s)"
            log = relay.logs()
            ours = [line for line in log.splitlines() if "kafka source 'events'" in line]
            assert len(ours) == 1, log
            assert (f"SASL {mech} authentication as user '{kafka_broker.sasl_username}' failed" in ours[0]
                    and "check sasl.username and the password in $KAFKA_PASSWORD" in ours[0]), ours
            assert " ERROR " in ours[0]
            assert WRONG_PASSWORD not in log and kafka_broker.sasl_password not in log
    finally:
        for relay in relays.values():
            relay.stop()
    for mech in MECHANISMS:
        assert history_json(embedded_server.address, f"chat:refused-{mech}", embedded_server.api_key) == []


def test_an_untrusted_broker_certificate_stops_the_relay_at_once(
        kafka_broker: KafkaBroker, topic: str, tmp_path: Path,
        embedded_server_factory: EmbeddedServerFactory) -> None:
    if not kafka_broker.ssl_bootstrap:
        pytest.fail("the broker harness has no SSL listener (trustme is a test dependency)")
    server = embedded_server_factory()
    other_ca = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other_ca))
    trusted = RelayProcess(tmp_path / "trusted", relay_config(
        server, kafka_broker.ssl_bootstrap, topic, "chat:ssl",
        f'security_protocol = "SSL"\ntls = {{ ca_file = "{kafka_broker.ca_file}" }}'),
        env={"SINK_KEY": server.api_key}).start()
    untrusted = RelayProcess(tmp_path / "untrusted", relay_config(
        server, kafka_broker.ssl_bootstrap, topic, "chat:ssl-untrusted",
        f'security_protocol = "SSL"\ntls = {{ ca_file = "{other_ca}" }}'),
        env={"SINK_KEY": server.api_key}).start()
    try:
        assert untrusted.wait(25) == 1
        lines = [line for line in untrusted.logs().splitlines() if "kafka source 'events'" in line]
        assert len(lines) == 1 and "the broker's certificate is not trusted" in lines[0], lines
        wait_for_count(server.address, "chat:ssl", RECORDS, server.api_key, 60)
        assert trusted.terminate(30) == 0
    finally:
        trusted.stop()
        untrusted.stop()
