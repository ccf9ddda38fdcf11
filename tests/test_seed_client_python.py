"""The seed document's Python client, made exactly its way, works against `relay serve`.

The client is generated from the project's legacy proto with
`python -m grpc_tools.protoc -I. --python_out=. --grpc_python_out=. api.proto` and run in its own
process: its `api` proto package would collide with relay.proto's copy in this one.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.harness.embedded import EmbeddedServerProcess
from tests.harness.history import history, history_json

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parent.parent

# What the seed document does: CentrifugoStub(channel).Info(InfoRequest()), read resp.error.code
# and resp.result; then Publish to chat:index and read the History back, all with the generated code.
CLIENT = r'''
import json, sys
import grpc
import api_pb2
from api_pb2_grpc import CentrifugoStub

address, key, channel = sys.argv[1:4]
metadata = [("authorization", "apikey " + key)] if key else []
stub = CentrifugoStub(grpc.insecure_channel(address))
out = {}
try:
    resp = stub.Info(api_pb2.InfoRequest(), metadata=metadata)
except grpc.RpcError as err:
    print(json.dumps({"rpc_error": err.code().name, "details": err.details()}))
    sys.exit(0)
out["info_error"] = resp.error.code
out["nodes"] = [{"name": n.name, "version": n.version} for n in resp.result.nodes]
request = api_pb2.PublishRequest(channel=channel, data=b'{"input": "hello"}')
published = stub.Publish(request, metadata=metadata)
out["publish_error"] = [published.error.code, published.error.message]
hist = stub.History(api_pb2.HistoryRequest(channel=channel), metadata=metadata)
out["history_error"] = hist.error.code
out["history"] = [json.loads(p.data) for p in hist.result.publications]
print(json.dumps(out))
'''


@pytest.fixture(scope="module")
def seed_client(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory with api_pb2.py and api_pb2_grpc.py generated the seed document's way."""
    workdir = tmp_path_factory.mktemp("seed-client-python")
    shutil.copy(ROOT / "protos" / "centrifugo_v2" / "api.proto", workdir / "api.proto")
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-I.", "--python_out=.", "--grpc_python_out=.",
                    "api.proto"], cwd=workdir, check=True, capture_output=True, timeout=60)
    assert {p.name for p in workdir.glob("api_pb2*.py")} == {"api_pb2.py", "api_pb2_grpc.py"}
    (workdir / "client.py").write_text(CLIENT)
    return workdir


def run_client(workdir: Path, address: str, key: str, channel: str) -> dict[str, Any]:
    done = subprocess.run([sys.executable, "client.py", address, key, channel], cwd=workdir,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def test_seed_python_client_calls_info_and_publishes(seed_client: Path,
                                                     embedded_server: EmbeddedServerProcess) -> None:
    first = run_client(seed_client, embedded_server.address, embedded_server.api_key, "chat:index")
    second = run_client(seed_client, embedded_server.address, embedded_server.api_key, "chat:index")
    assert first["info_error"] == 0
    assert [n["version"].startswith("centrifugo-relay") for n in first["nodes"]] == [True]
    assert (first["publish_error"], first["history_error"]) == ([0, ""], 0)
    assert first["history"] == [{"input": "hello"}]
    assert second["history"] == [{"input": "hello"}] * 2
    # The current API sees the same two publications, with their offsets.
    address, key = embedded_server.address, embedded_server.api_key
    assert history_json(address, "chat:index", key) == [{"input": "hello"}] * 2
    assert [p.offset for p in history(address, "chat:index", key)] == [1, 2]


def test_seed_python_client_reads_errors_from_the_response(seed_client: Path,
                                                           embedded_server: EmbeddedServerProcess) -> None:
    out = run_client(seed_client, embedded_server.address, embedded_server.api_key, "nowhere:index")
    assert out["info_error"] == 0
    assert out["publish_error"] == [102, "unknown channel"]
    assert out["history_error"] == 102


def test_seed_python_client_without_the_key_is_unauthenticated(
        seed_client: Path, embedded_server: EmbeddedServerProcess) -> None:
    out = run_client(seed_client, embedded_server.address, "", "chat:index")
    assert out == {"rpc_error": "UNAUTHENTICATED", "details": "unauthenticated"}
    assert history(embedded_server.address, "chat:index", embedded_server.api_key) == []
