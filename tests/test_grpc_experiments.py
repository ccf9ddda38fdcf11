"""The gRPC client setting relay/__init__.py makes before grpc is imported."""

from __future__ import annotations

import os
import subprocess
import sys


def _import_both(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    code = "import relay, grpc, os; grpc.insecure_channel('127.0.0.1:1').close(); print(os.environ['GRPC_EXPERIMENTS'])"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60,
                          check=True)


def test_the_classic_client_is_chosen_and_the_installed_grpc_knows_the_experiment() -> None:
    env = {k: v for k, v in os.environ.items() if k != "GRPC_EXPERIMENTS"}
    done = _import_both(env)
    assert done.stdout.strip() == "-event_engine_client"
    # A grpcio that dropped the experiment says so on stderr at every start: fail here instead.
    assert "Unknown experiment" not in done.stderr, done.stderr
    assert "experiment" not in done.stderr.lower(), done.stderr


def test_an_operators_own_setting_wins() -> None:
    env = {**os.environ, "GRPC_EXPERIMENTS": "-event_engine_listener"}
    assert _import_both(env).stdout.strip() == "-event_engine_listener"
