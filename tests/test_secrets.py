"""Secrets never leak: the relay runs at debug level with known secrets (the sink's API key, the
embedded server's API key, a SASL password, and wrong ones) and every output is searched for them:
stdout, stderr, logs (text and JSON), `relay check`, /metrics, /readyz, the dead letter file, every
file under the state directory, `relay serve`'s log and `relay publish`'s error. The formatter that
blanks secrets out of log lines is also checked against a library that echoes one at debug."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from relay import logs
from relay.secrets import REDACTED, Secret, redact
from tests.harness.embedded import EmbeddedServerFactory
from tests.harness.history import history
from tests.harness.kafka import KafkaBroker, Record, run_sync
from tests.harness.ports import free_port
from tests.harness.relay_process import RelayProcess

SINK_KEY = "sink-key-5f1c9e0b"
SERVER_KEY = "server-key-8a7d2031"
WRONG_SINK_KEY = "wrong-sink-key-77ab19"
WRONG_SASL = "wrong-sasl-pw-31d7c4"
KAFKA_RECORDS = 30
TICKS = 20


def test_log_lines_never_carry_a_loaded_secret(capsys: pytest.CaptureFixture[str]) -> None:
    """Whatever a library writes at debug (a config dump, a header, a traceback) is blanked out."""
    key = Secret('pa"ss\\word-Ünï-4f2a').reveal()  # quotes, backslashes and non-ASCII: JSON escapes them
    for fmt in ("text", "json"):
        logs.setup("debug", fmt)
        chatty = logging.getLogger("relay.sources.kafka.client")
        chatty.debug("connecting with config %s", {"sasl_plain_password": key}, extra={"config": key})
        try:
            raise RuntimeError(f"handshake failed for password={key}")
        except RuntimeError:
            chatty.exception("failed")
    logging.getLogger().handlers.clear()
    err = capsys.readouterr().err
    assert err.count(REDACTED) == 6, err  # message, field and traceback, in each format
    for form in (key, json.dumps(key)[1:-1], json.dumps(key, ensure_ascii=False)[1:-1]):
        assert form not in err
    assert redact(f"x {key} y {key}") == f"x {REDACTED} y {REDACTED}"
    assert redact("abc") == "abc" and Secret("abc").reveal() == "abc"  # too short to blank out anywhere


def test_no_output_holds_a_secret(kafka_broker: KafkaBroker, tmp_path: Path,
                                  embedded_server_factory: EmbeddedServerFactory) -> None:
    sasl_password = kafka_broker.sasl_password
    secrets = [SINK_KEY, SERVER_KEY, WRONG_SINK_KEY, WRONG_SASL, sasl_password]
    target = embedded_server_factory(api_key=SINK_KEY, namespaces=[{"name": "chat"}])
    topic = f"leak-{uuid.uuid4().hex[:8]}"
    run_sync(kafka_broker.create_topic(topic, 2))
    records = [Record(json.dumps({"n": n}).encode(), key=f"room-{n % 3}") for n in range(KAFKA_RECORDS - 5)]
    records += [Record(b"not json", key="room-1"), Record(b'{"n": -1}', key="bad*key"),
                Record(b'{"n": -2}', key=None), Record(b"{}", key="x" * 300), Record(b'{"n": -3}', key="ok")]
    run_sync(kafka_broker.produce(topic, records))
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "app.log").write_text('{"line": 1}\nnot json\n{"line": 3}\n')
    env = {"SINK_KEY": SINK_KEY, "SERVER_KEY": SERVER_KEY, "KAFKA_PW": sasl_password, "WRONG_PW": WRONG_SASL,
           "WRONG_KEY": WRONG_SINK_KEY}

    def config(log_format: str, sink_key_env: str, password_env: str) -> str:
        return f"""
[relay]
state_dir = "STATE"
log_level = "debug"
log_format = "{log_format}"
unmatched = "dead_letter"
shutdown_timeout = "3s"

[server]
enabled = true
listen = "127.0.0.1:{free_port()}"
api_key_env = "SERVER_KEY"
namespaces = ["chat"]

[sink]
address = "{target.address}"
api_key_env = "{sink_key_env}"
retry = {{ initial_backoff = "20ms", max_backoff = "200ms" }}

[sources.events]
type = "kafka"
brokers = ["{kafka_broker.sasl_bootstrap}"]
topics = ["{topic}"]
group_id = "leak-{uuid.uuid4().hex[:8]}"
security_protocol = "SASL_PLAINTEXT"
connect_timeout = "20s"
sasl = {{ mechanism = "SCRAM-SHA-256", username = "{kafka_broker.sasl_username}", \
password_env = "{password_env}" }}

[sources.applog]
type = "file"
paths = ["{tmp_path}/logs/*.log"]
read_from = "beginning"

[sources.tick]
type = "ticker"
interval = "10ms"
count = {TICKS}

[[routes]]
source = "events"
channel = "chat:leak-{{{{ key }}}}"

[[routes]]
source = "applog"
channel = "chat:leak-file"

[[routes]]
source = "tick"
channel = "nope:leak"
"""

    good = RelayProcess(tmp_path / "good", config("text", "SINK_KEY", "KAFKA_PW").replace(
        "STATE", str(tmp_path / "good" / "state")), env=env)
    wrong = RelayProcess(tmp_path / "wrong", config("json", "WRONG_KEY", "WRONG_PW").replace(
        "STATE", str(tmp_path / "wrong" / "state")), env=env)
    outputs: dict[str, str] = {}
    checked = subprocess.run([sys.executable, "-m", "relay", "check", "-c", str(good.config_path)],
                             capture_output=True, text=True, timeout=30, env={**os.environ, **env})
    assert checked.returncode == 0, checked.stderr
    outputs["relay check"] = checked.stdout + checked.stderr
    good.start()
    wrong.start()
    try:
        # The good relay: 26 records published, 4 dead letters from Kafka (not JSON, a reserved
        # character, no key, a channel over 255 bytes), 1 from the file, 20 ticks refused by the
        # server (namespace "nope" does not exist: error 102).
        expected_dead = 4 + 1 + TICKS
        dead_file = good.workdir / "state" / "dead-letter.jsonl"
        deadline = time.monotonic() + 60
        published = 0
        while time.monotonic() < deadline:
            published = sum(len(history(target.address, f"chat:leak-{k}", SINK_KEY))
                            for k in ("room-0", "room-1", "room-2", "ok"))
            dead = len(dead_file.read_text().splitlines()) if dead_file.exists() else 0
            if published >= KAFKA_RECORDS - 4 and dead >= expected_dead:
                break
            time.sleep(0.2)
        assert published == KAFKA_RECORDS - 4
        assert len(history(target.address, "chat:leak-file", SINK_KEY)) == 2
        assert len(dead_file.read_text().splitlines()) == expected_dead
        for endpoint in ("/metrics", "/readyz", "/healthz"):
            status, body = good.get(endpoint)
            assert status == 200, (endpoint, body)
            outputs[f"good {endpoint}"] = body
        assert 'relay_dead_letters_total{reason="code_102"} 20.0' in outputs["good /metrics"]
        # The wrong relay: the sink's key is refused (not ready), the SASL password is refused (exit 1).
        assert wrong.wait(30) == 1
        assert good.terminate(30) == 0
    finally:
        good.stop()
        wrong.stop()
    publish = subprocess.run([sys.executable, "-m", "relay", "publish", "chat:x", "{}", "--address",
                              target.address, "--api-key-env", "WRONG_KEY"], capture_output=True, text=True,
                             timeout=30, env={**os.environ, **env})
    assert publish.returncode == 1 and "UNAUTHENTICATED" in publish.stderr
    outputs["relay publish"] = publish.stdout + publish.stderr
    outputs["good log"] = good.logs()
    outputs["wrong log"] = wrong.logs()
    outputs["relay serve log"] = target.log_tail(10**9)
    for relay in (good, wrong):
        for path in sorted((relay.workdir / "state").rglob("*")):
            if path.is_file():
                outputs[str(path)] = path.read_text(errors="replace")
    # The outputs are real: debug lines, both failures told clearly, dead letters and checkpoints.
    assert " DEBUG " in outputs["good log"]
    assert '"level": "debug"' in outputs["wrong log"]
    sasl_failed = [line for line in outputs["wrong log"].splitlines()
                   if "SASL SCRAM-SHA-256 authentication" in line]
    assert len(sasl_failed) == 1 and "kafka source 'events'" in sasl_failed[0], outputs["wrong log"]
    assert "check sasl.username and the password in $WRONG_PW" in sasl_failed[0]
    assert "refused the API key" in outputs["wrong log"]
    assert any(name.endswith("dead-letter.jsonl") for name in outputs)
    assert any("checkpoint" in name or name.endswith(".json") for name in outputs), sorted(outputs)
    assert "from $SINK_KEY (set)" in outputs["relay check"]
    leaks = [(secret, where) for secret in secrets for where, text in outputs.items() if secret in text]
    assert leaks == []
