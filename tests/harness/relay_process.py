"""`relay run` as a real subprocess: start, signal, kill -9, read its endpoints and logs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from tests.harness.ports import free_port


class RelayProcess:
    """A relay run from a config file written into `workdir`; stderr goes to a log file."""

    def __init__(self, workdir: Path, config_text: str, env: dict[str, str] | None = None,
                 metrics: bool = True, python: str = sys.executable) -> None:
        self.workdir = workdir
        self.python = python  # the interpreter (of a venv with the relay installed) that runs it
        workdir.mkdir(parents=True, exist_ok=True)
        self.metrics_port = free_port() if metrics else 0
        listen = f'"127.0.0.1:{self.metrics_port}"' if metrics else '""'
        if "[relay]" in config_text:
            config_text = config_text.replace("[relay]", f"[relay]\nmetrics_listen = {listen}", 1)
        else:
            config_text = f'[relay]\nstate_dir = "{workdir}/state"\nmetrics_listen = {listen}\n' + config_text
        self.config_path = workdir / "relay.toml"
        self.config_path.write_text(config_text)
        self.env = {**os.environ, **(env or {})}
        self.process: subprocess.Popen[bytes] | None = None
        self.runs = 0

    @property
    def log_path(self) -> Path:
        return self.workdir / f"relay-{self.runs}.log"

    def start(self) -> RelayProcess:
        self.runs += 1
        log = open(self.log_path, "wb")  # noqa: SIM115 - handed to the child
        self.process = subprocess.Popen([self.python, "-m", "relay", "run", "-c", str(self.config_path)],
                                        stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=self.workdir)
        log.close()
        return self

    def logs(self) -> str:
        return "".join(p.read_text(errors="replace") for p in sorted(self.workdir.glob("relay-*.log")))

    def wait(self, timeout: float = 60) -> int:
        assert self.process is not None
        return self.process.wait(timeout)

    def terminate(self, timeout: float = 30) -> int:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)

    def kill(self) -> None:
        """kill -9: no chance to commit anything."""
        assert self.process is not None
        self.process.kill()
        self.process.wait(10)

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def get(self, path: str) -> tuple[int, str]:
        url = f"http://127.0.0.1:{self.metrics_port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                return resp.status, resp.read().decode()
        except urllib.error.HTTPError as err:
            return err.code, err.read().decode()

    def wait_http(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                self.get("/healthz")
                return
            except OSError:
                time.sleep(0.05)
        raise TimeoutError(f"relay endpoints not up; log:\n{self.logs()[-2000:]}")

    def metric(self, name: str, labels: str = "") -> float:
        """One sample's value from /metrics (0 when absent), e.g. metric("relay_publications_total", 'result="ok"')."""
        _, text = self.get("/metrics")
        want = f"{name}{{{labels}}}" if labels else name
        for line in text.splitlines():
            if line.startswith(want + " "):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    def stop(self) -> None:
        if self.alive():
            try:
                self.terminate(15)
            except subprocess.TimeoutExpired:
                self.kill()
