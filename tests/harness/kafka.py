"""A real Apache Kafka 4.x broker for the suite: one KRaft node, run with `java` from Maven's jars.

The jars are resolved once by `mvn dependency:copy-dependencies` (tests/harness/kafka/pom.xml) into
CACHE/kafka/<version>/ outside the work tree and reused. The session fixture `kafka_broker` formats a
storage dir in a tmp dir, starts the node on free loopback ports, waits until it answers, and kills
and deletes it afterwards. Without java or mvn, or if the broker cannot start: `unavailable(reason)`.

Listeners: PLAINTEXT (`.bootstrap`), SASL_PLAINTEXT with PLAIN, SCRAM-SHA-256 and SCRAM-SHA-512
(`.sasl_bootstrap`, user `.sasl_username` / `.sasl_password`), and, when `trustme` is installed,
SSL (`.ssl_bootstrap`, CA at `.ca_file`; the broker's certificate is for 127.0.0.1).

Outside pytest (bench/), `KafkaBroker.start()` raises BrokerUnavailable instead of skipping.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import fcntl
import hashlib
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest

from tests.harness.ports import free_port, wait_for_port
from tests.harness.require import CACHE, unavailable

KAFKA_VERSION = "4.1.1"
POM = Path(__file__).parent / "kafka" / "pom.xml"
START_TIMEOUT = 90.0
SASL_USERNAME = "relay-test"
SASL_PASSWORD = "relay-test-secret"

T = TypeVar("T")


class BrokerUnavailable(RuntimeError):
    """Java, Maven or the broker itself could not be had; the text says why."""


@dataclass(slots=True)
class Record:
    """One record to produce; `partition` None lets the key (or round robin) choose."""

    value: bytes | None
    key: bytes | str | None = None
    headers: Sequence[tuple[str, bytes | str]] = ()
    partition: int | None = None


def run_sync(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine to completion on a private loop in a thread (usable inside a running loop)."""
    result: list[T] = []
    error: list[BaseException] = []

    def target() -> None:
        try:
            result.append(asyncio.run(coro))
        except BaseException as err:
            error.append(err)

    thread = threading.Thread(target=target, name="kafka-harness")
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]


def _pom_digest() -> str:
    return hashlib.sha256(POM.read_bytes()).hexdigest()[:16]


def kafka_jars(version: str = KAFKA_VERSION) -> Path:
    """The directory of broker jars, resolved by Maven into the cache on first use."""
    java, mvn = shutil.which("java"), shutil.which("mvn")
    if not java:
        raise BrokerUnavailable("java is not installed (the Kafka test broker runs on a JVM)")
    if not mvn:
        raise BrokerUnavailable("mvn is not installed (it resolves the Kafka broker's jars)")
    home = CACHE / "kafka" / version
    libs = home / "libs"
    marker = home / "complete"
    digest = _pom_digest()
    if marker.exists() and marker.read_text().strip() == digest:
        return libs
    home.mkdir(parents=True, exist_ok=True)
    with open(home / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another pytest process may be resolving the same jars
        if marker.exists() and marker.read_text().strip() == digest:
            return libs
        staging = Path(tempfile.mkdtemp(prefix="libs-", dir=home))
        cmd = [mvn, "-q", "-B", "-f", str(POM), "dependency:copy-dependencies",
               f"-DoutputDirectory={staging}", "-DincludeScope=runtime", f"-Dkafka.version={version}"]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
        if proc.returncode != 0 or not any(staging.glob("kafka_2.13-*.jar")):
            shutil.rmtree(staging, ignore_errors=True)
            tail = (proc.stdout + proc.stderr).strip().splitlines()[-15:]
            raise BrokerUnavailable(f"mvn could not resolve Kafka {version}: " + " | ".join(tail))
        shutil.rmtree(libs, ignore_errors=True)
        staging.rename(libs)
        marker.write_text(digest)
    return libs


def _cluster_id() -> str:
    # May start with "-": pass it as --cluster-id=ID so the tool does not take it for an option.
    return base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")


_LOG4J = """\
status = error
appender.file.type = File
appender.file.name = file
appender.file.fileName = {log}
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = info
rootLogger.appenderRef.file.ref = file
logger.kafka.name = kafka
logger.kafka.level = info
logger.state.name = state.change.logger
logger.state.level = warn
"""


@dataclass
class KafkaBroker:
    """One KRaft node (broker + controller) on loopback; `bootstrap` is "127.0.0.1:PORT"."""

    workdir: Path
    heap: str = "512m"
    port: int = field(default_factory=free_port)
    sasl_port: int = field(default_factory=free_port)
    ssl_port: int = field(default_factory=free_port)
    controller_port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None
    ca_file: str = ""
    started_in: float = 0.0

    sasl_username: str = SASL_USERNAME
    sasl_password: str = SASL_PASSWORD

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def sasl_bootstrap(self) -> str:
        return f"127.0.0.1:{self.sasl_port}"

    @property
    def ssl_bootstrap(self) -> str:
        return f"127.0.0.1:{self.ssl_port}" if self.ca_file else ""

    @property
    def log_file(self) -> Path:
        return self.workdir / "broker.log"

    # -- life cycle ---------------------------------------------------------------------------

    @classmethod
    def start(cls, workdir: Path | None = None, heap: str = "512m") -> KafkaBroker:
        """Resolve, format and start a broker; raises BrokerUnavailable with the reason."""
        libs = kafka_jars()
        broker = cls(workdir=Path(workdir or tempfile.mkdtemp(prefix="relay-kafka-")), heap=heap)
        broker._launch(libs)
        return broker

    def _properties(self) -> str:
        data = self.workdir / "data"
        listeners = [f"PLAINTEXT://127.0.0.1:{self.port}", f"SASL_PLAINTEXT://127.0.0.1:{self.sasl_port}"]
        protocols = ["PLAINTEXT:PLAINTEXT", "SASL_PLAINTEXT:SASL_PLAINTEXT", "CONTROLLER:PLAINTEXT"]
        ssl_lines: list[str] = []
        if self._make_tls():
            listeners.append(f"SSL://127.0.0.1:{self.ssl_port}")
            protocols.append("SSL:SSL")
            ssl_lines = [
                "listener.name.ssl.ssl.keystore.type=PEM",
                f"listener.name.ssl.ssl.keystore.location={self.workdir / 'broker.pem'}",
                "listener.name.ssl.ssl.client.auth=none",
            ]
        advertised = [x for x in listeners if not x.startswith("CONTROLLER")]
        listeners.append(f"CONTROLLER://127.0.0.1:{self.controller_port}")
        plain_users = f'user_{self.sasl_username}="{self.sasl_password}"'
        lines = [
            "process.roles=broker,controller",
            "node.id=1",
            f"controller.quorum.voters=1@127.0.0.1:{self.controller_port}",
            "controller.listener.names=CONTROLLER",
            "inter.broker.listener.name=PLAINTEXT",
            f"listeners={','.join(listeners)}",
            f"advertised.listeners={','.join(advertised)}",
            f"listener.security.protocol.map={','.join(protocols)}",
            f"log.dirs={data}",
            # One node: every internal topic has one replica; fast group joins for short tests.
            "num.partitions=3",
            "default.replication.factor=1",
            "offsets.topic.replication.factor=1",
            "offsets.topic.num.partitions=3",
            "transaction.state.log.replication.factor=1",
            "transaction.state.log.min.isr=1",
            "share.coordinator.state.topic.replication.factor=1",
            "share.coordinator.state.topic.min.isr=1",
            "group.initial.rebalance.delay.ms=0",
            "group.min.session.timeout.ms=1000",  # e2e relays die and rejoin: short sessions
            "auto.create.topics.enable=true",
            "num.network.threads=2",
            "num.io.threads=2",
            "sasl.enabled.mechanisms=PLAIN,SCRAM-SHA-256,SCRAM-SHA-512",
            "listener.name.sasl_plaintext.plain.sasl.jaas.config="
            f"org.apache.kafka.common.security.plain.PlainLoginModule required {plain_users};",
            "listener.name.sasl_plaintext.scram-sha-256.sasl.jaas.config="
            "org.apache.kafka.common.security.scram.ScramLoginModule required;",
            "listener.name.sasl_plaintext.scram-sha-512.sasl.jaas.config="
            "org.apache.kafka.common.security.scram.ScramLoginModule required;",
            *ssl_lines,
        ]
        return "\n".join(lines) + "\n"

    def _make_tls(self) -> bool:
        """A CA and a server certificate for 127.0.0.1, if trustme is installed (test extra)."""
        try:
            import trustme
        except ImportError:
            return False
        from cryptography.hazmat.primitives import serialization
        # The broker's PEM key store reads unencrypted PKCS#8 RSA keys only.
        ca = trustme.CA(key_type=trustme.KeyType.RSA)
        cert = ca.issue_cert("127.0.0.1", "localhost", key_type=trustme.KeyType.RSA)
        key = serialization.load_pem_private_key(cert.private_key_pem.bytes(), password=None)
        pkcs8 = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption())
        pem = self.workdir / "broker.pem"
        pem.write_bytes(pkcs8 + b"".join(c.bytes() for c in cert.cert_chain_pems))
        ca_path = self.workdir / "ca.pem"
        ca.cert_pem.write_to_path(str(ca_path))
        self.ca_file = str(ca_path)
        return True

    def _java(self, libs: Path, *args: str, heap: str, quick: bool = False) -> list[str]:
        java = shutil.which("java") or "java"
        # A short-lived tool starts faster with the client compiler only.
        jit = ["-XX:TieredStopAtLevel=1"] if quick else []
        return [java, f"-Xmx{heap}", "-Xms64m", "-XX:+UseSerialGC", *jit, "-Djava.awt.headless=true",
                f"-Dlog4j2.configurationFile={self.workdir / 'log4j2.properties'}",
                "-cp", f"{libs}/*", *args]

    def _launch(self, libs: Path) -> None:
        began = time.monotonic()
        self.workdir.mkdir(parents=True, exist_ok=True)
        props = self.workdir / "server.properties"
        props.write_text(self._properties())
        (self.workdir / "log4j2.properties").write_text(_LOG4J.format(log=self.log_file))
        scram = [f"SCRAM-SHA-{bits}=[name={self.sasl_username},password={self.sasl_password}]"
                 for bits in (256, 512)]
        fmt = self._java(libs, "kafka.tools.StorageTool", "format", f"--cluster-id={_cluster_id()}",
                         "-c", str(props), "--add-scram", scram[0], "--add-scram", scram[1],
                         heap="256m", quick=True)
        proc = subprocess.run(fmt, capture_output=True, text=True, timeout=120, check=False)
        if proc.returncode != 0:
            output = (proc.stdout + proc.stderr).strip()[-800:]
            raise BrokerUnavailable(f"kafka-storage format failed: {output}")
        out = open(self.workdir / "stdout.log", "wb")  # noqa: SIM115 - the child owns it
        self.process = subprocess.Popen(self._java(libs, "kafka.Kafka", str(props), heap=self.heap),
                                        stdout=out, stderr=subprocess.STDOUT, cwd=self.workdir,
                                        start_new_session=True)
        out.close()
        try:
            self._wait_ready(began + START_TIMEOUT)
        except BaseException:
            self.stop()
            raise
        self.started_in = time.monotonic() - began

    def _tail(self, lines: int = 20) -> str:
        text = ""
        for name in ("stdout.log", "broker.log"):
            path = self.workdir / name
            if path.exists():
                text += "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) + "\n"
        return text.strip()

    def _wait_ready(self, deadline: float) -> None:
        assert self.process is not None
        while True:
            if self.process.poll() is not None:
                code = self.process.returncode
                raise BrokerUnavailable(f"the Kafka broker exited with {code}: {self._tail()}")
            try:
                wait_for_port(self.port, timeout=0.5)
                run_sync(self._answers())
                return
            except Exception as err:  # not up yet: refused, timed out, no metadata
                if time.monotonic() > deadline:
                    raise BrokerUnavailable(f"the Kafka broker did not answer in {START_TIMEOUT:.0f}s "
                                            f"({err!r}): {self._tail()}") from None
                time.sleep(0.1)

    async def _answers(self) -> None:
        from aiokafka.admin import AIOKafkaAdminClient
        admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap, request_timeout_ms=3000)
        await admin.start()
        try:
            await admin.describe_cluster()
        finally:
            await admin.close()

    def stop(self) -> None:
        """Kill the node (its data is thrown away, so no clean shutdown is owed) and delete its dir."""
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)
        shutil.rmtree(self.workdir, ignore_errors=True)

    # -- helpers ------------------------------------------------------------------------------

    async def create_topic(self, name: str, partitions: int = 3) -> None:
        """Create a topic and wait until every partition has a leader."""
        from aiokafka.admin import AIOKafkaAdminClient, NewTopic
        admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap)
        await admin.start()
        try:
            await admin.create_topics([NewTopic(name, partitions, 1)])
            for _ in range(200):
                described = await admin.describe_topics([name])
                parts = described[0].get("partitions", []) if described else []
                if len(parts) == partitions and all(p.get("leader", -1) >= 0 for p in parts):
                    return
                await asyncio.sleep(0.05)
        finally:
            await admin.close()

    async def produce(self, topic: str, records: Iterable[Record | bytes]) -> int:
        """Produce records (in order, per partition) and wait until all are acknowledged."""
        from aiokafka import AIOKafkaProducer
        producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap, linger_ms=5, acks="all",
                                    max_batch_size=512 * 1024, enable_idempotence=True)
        await producer.start()
        pending: list[Awaitable[Any]] = []
        count = 0
        try:
            for item in records:
                rec = item if isinstance(item, Record) else Record(item)
                key = rec.key.encode() if isinstance(rec.key, str) else rec.key
                headers = [(k, v.encode() if isinstance(v, str) else v) for k, v in rec.headers]
                pending.append(await producer.send(topic, rec.value, key=key, partition=rec.partition,
                                                   headers=headers or None))
                count += 1
                if len(pending) >= 5000:
                    await asyncio.gather(*pending)
                    pending.clear()
            await asyncio.gather(*pending)
        finally:
            await producer.stop()
        return count

    async def committed(self, group: str, topic: str, partitions: int = 3) -> dict[int, int | None]:
        """The group's committed offset per partition, read by a separate client."""
        from aiokafka import AIOKafkaConsumer, TopicPartition
        consumer = AIOKafkaConsumer(bootstrap_servers=self.bootstrap, group_id=group,
                                    enable_auto_commit=False)
        await consumer.start()
        try:
            return {p: await consumer.committed(TopicPartition(topic, p)) for p in range(partitions)}
        finally:
            await consumer.stop()

    async def end_offsets(self, topic: str, partitions: int = 3) -> dict[int, int]:
        from aiokafka import AIOKafkaConsumer, TopicPartition
        consumer = AIOKafkaConsumer(bootstrap_servers=self.bootstrap)
        await consumer.start()
        try:
            tps = [TopicPartition(topic, p) for p in range(partitions)]
            ends = await consumer.end_offsets(tps)
            return {tp.partition: off for tp, off in ends.items()}
        finally:
            await consumer.stop()


def broker_or_unavailable(factory: Callable[[], KafkaBroker]) -> KafkaBroker:
    try:
        return factory()
    except BrokerUnavailable as err:
        unavailable(str(err))


@pytest.fixture(scope="session")
def kafka_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaBroker]:
    """One real Kafka node for the whole session (see the module docstring)."""
    workdir = tmp_path_factory.mktemp("kafka")
    broker = broker_or_unavailable(lambda: KafkaBroker.start(workdir))
    try:
        yield broker
    finally:
        broker.stop()
