"""A real PostgreSQL 15 server for the suite, from Debian's /usr/lib/postgresql/15/bin.

The session fixture `postgres_server` runs initdb in a temp dir (trust auth, loopback only), starts
`postgres` on a free port with its unix socket dir inside the temp dir, and stops and deletes it
afterwards. PostgreSQL refuses to run as root, so when the suite is root the server runs as the
`postgres` system user (setpriv, which execs: the Popen pid is the server itself).

`postgres_db` gives each test its own database; `PostgresServer.restart()` stops the server (fast
shutdown: every connection is cut) and starts it again on the same port, for the "database
restarted mid-stream" tests. Outside pytest (bench/), `PostgresServer.start()` raises
PostgresUnavailable instead of skipping.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness.ports import free_port, wait_for_port
from tests.harness.require import unavailable

BIN = Path(os.environ.get("RELAY_PG_BIN", "/usr/lib/postgresql/15/bin"))
START_TIMEOUT = 30.0

# Centrifugo's outbox layout (internal/consuming/postgresql.go; docs/server/consumers.md).
OUTBOX_DDL = """
CREATE TABLE {table} (
    id BIGSERIAL PRIMARY KEY,
    method TEXT NOT NULL,
    payload JSONB NOT NULL,
    partition BIGINT NOT NULL DEFAULT 0,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX {table}_partition_id_idx ON {table} (partition, id);
"""


class PostgresUnavailable(RuntimeError):
    """The PostgreSQL binaries are missing or the server would not start; the text says why."""


def postgres_binaries() -> Path:
    """The directory holding initdb and postgres; PostgresUnavailable if they are not installed."""
    for tool in ("initdb", "postgres", "pg_isready", "psql"):
        if not (BIN / tool).exists():
            raise PostgresUnavailable(f"{BIN / tool} not found (apt install postgresql-15, or set RELAY_PG_BIN)")
    return BIN


class PostgresServer:
    """One initdb'd cluster in a temp dir, served on a free loopback port."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="relay-pg-"))
        self.data_dir = self.root / "data"
        self.socket_dir = self.root / "sock"
        self.log_path = self.root / "postgres.log"
        self.port = free_port()
        self.user = "postgres"
        self._proc: subprocess.Popen[bytes] | None = None
        self._as_postgres = os.geteuid() == 0

    def _command(self, *args: str) -> list[str]:
        if not self._as_postgres:
            return list(args)
        return ["setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups", "--", *args]

    def start(self) -> PostgresServer:
        """initdb (first time) and start; raises PostgresUnavailable."""
        postgres_binaries()
        if self._as_postgres:
            try:
                entry = pwd.getpwnam("postgres")
            except KeyError:
                raise PostgresUnavailable("running as root and there is no postgres system user") from None
            os.chmod(self.root, 0o755)
            os.chown(self.root, entry.pw_uid, entry.pw_gid)
        if not self.data_dir.exists():
            self.socket_dir.mkdir()
            if self._as_postgres:
                os.chown(self.socket_dir, pwd.getpwnam("postgres").pw_uid, -1)
            done = subprocess.run(self._command(str(BIN / "initdb"), "-D", str(self.data_dir), "-U", self.user,
                                                "--auth=trust", "-E", "UTF8", "--no-sync"),
                                  capture_output=True, timeout=120, check=False)
            if done.returncode != 0:
                raise PostgresUnavailable(f"initdb failed: {done.stderr.decode()[-500:]}")
        self._launch()
        return self

    def _launch(self) -> None:
        log = open(self.log_path, "ab")  # noqa: SIM115  # the server writes to it until stopped
        self._proc = subprocess.Popen(
            self._command(str(BIN / "postgres"), "-D", str(self.data_dir), "-p", str(self.port),
                          "-k", str(self.socket_dir), "-c", "listen_addresses=127.0.0.1",
                          "-c", "fsync=off", "-c", "synchronous_commit=off",
                          "-c", "full_page_writes=off", "-c", "max_connections=300"),
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self._proc.poll() is not None:
                raise PostgresUnavailable(f"postgres exited: {self.log_path.read_text()[-800:]}")
            ready = subprocess.run([str(BIN / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port),
                                    "-U", self.user], capture_output=True, check=False)
            if ready.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise PostgresUnavailable(f"postgres not ready after {START_TIMEOUT}s")
            time.sleep(0.1)

    def cpu_seconds(self) -> float:
        """CPU time the server has used so far: the postmaster, its live backends and the ones that
        ended (bench/: what the queries of a drain cost PostgreSQL)."""
        assert self._proc is not None
        root, total = self._proc.pid, 0.0
        tick = os.sysconf("SC_CLK_TCK")
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    fields = stat.read().rsplit(")", 1)[1].split()
            except OSError:
                continue  # ended meanwhile: counted in the postmaster's children times
            if int(entry) == root:
                total += sum(int(f) for f in fields[11:15]) / tick  # its own and its ended children's
            elif int(fields[1]) == root:
                total += (int(fields[11]) + int(fields[12])) / tick
        return total

    def dsn(self, database: str = "postgres") -> str:
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{database}"

    def psql(self, sql: str, database: str = "postgres") -> str:
        """Runs SQL with psql (on-error-stop); returns its unaligned output."""
        done = subprocess.run([str(BIN / "psql"), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1",
                               "-d", self.dsn(database), "-c", sql],
                              capture_output=True, timeout=60, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"psql failed: {done.stderr.decode()[-500:]}")
        return done.stdout.decode().strip()

    def create_database(self) -> str:
        name = "t_" + uuid.uuid4().hex[:12]
        self.psql(f"CREATE DATABASE {name}")
        return name

    def stop(self, mode: signal.Signals = signal.SIGINT) -> None:
        """SIGINT = fast shutdown (connections cut, clean); SIGKILL would need crash recovery."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(mode)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def restart(self) -> None:
        """Stops the server (every client connection is cut) and starts it again on the same port."""
        self.stop()
        self._launch()
        wait_for_port(self.port)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    server = PostgresServer()
    try:
        server.start()
    except PostgresUnavailable as err:
        server.close()
        unavailable(str(err))
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def postgres_db(postgres_server: PostgresServer) -> Iterator[str]:
    """A fresh database for one test; its name. Dropped afterwards (connections forced out)."""
    name = postgres_server.create_database()
    yield name
    with contextlib.suppress(RuntimeError):
        postgres_server.psql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
