"""relay/proto/ is generated from protos/ by `make protos`; this fails when someone forgot."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from relay.proto.centrifugo import api_pb2 as v6
from relay.proto.centrifugo_v2 import api_pb2 as v2

ROOT = Path(__file__).resolve().parent.parent


def test_generated_code_is_current() -> None:
    proc = subprocess.run([sys.executable, "protos/generate.py", "--check"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_a_changed_proto_is_noticed(tmp_path: Path) -> None:
    """The check itself can fail: generated code that differs from the protos is reported."""
    sys.path.insert(0, str(ROOT / "protos"))
    try:
        import generate
    finally:
        sys.path.pop(0)
    generate.generate(tmp_path)
    assert generate.differences(tmp_path, ROOT / "relay" / "proto") == []
    stale = tmp_path / "centrifugo" / "api_pb2.py"
    stale.write_text(stale.read_text() + "\n# edited by hand\n")
    assert generate.differences(tmp_path, ROOT / "relay" / "proto") == ["centrifugo/api_pb2.py"]


def test_wire_field_numbers() -> None:
    """A few numbers from the reference, straight from the descriptors."""
    def numbers(message: type) -> dict[str, int]:
        return {f.name: f.number for f in message.DESCRIPTOR.fields}  # type: ignore[attr-defined]

    assert numbers(v6.PublishRequest) == {"channel": 1, "data": 2, "b64data": 3, "skip_history": 4, "tags": 5,
                                          "idempotency_key": 6, "delta": 7, "version": 8, "version_epoch": 9}
    assert numbers(v6.Command) == {"publish": 4, "broadcast": 5, "subscribe": 6, "unsubscribe": 7, "disconnect": 8,
                                   "presence": 9, "presence_stats": 10, "history": 11, "history_remove": 12,
                                   "info": 13, "channels": 16}
    assert numbers(v6.DisconnectRequest) == {"user": 1, "disconnect": 2, "client": 3, "whitelist": 4}
    assert numbers(v6.Reply)["error"] == 2 and numbers(v6.Reply)["channels"] == 16
    assert numbers(v6.Publication) == {"data": 2, "info": 3, "offset": 4, "tags": 5}
    assert numbers(v6.HistoryRequest) == {"channel": 1, "limit": 2, "since": 3, "reverse": 4}
    assert numbers(v6.NodeResult)["num_subs"] == 10
    assert v6.DESCRIPTOR.package == "centrifugal.centrifugo.api"
    assert v2.DESCRIPTOR.package == "api"
    assert numbers(v2.ChannelsResult) == {"channels": 1}
    channels = v2.ChannelsResult.DESCRIPTOR.fields[0]
    assert channels.is_repeated and channels.message_type is None  # repeated string, not a map
    assert list(v6.DESCRIPTOR.services_by_name) == ["CentrifugoApi"]
    assert list(v2.DESCRIPTOR.services_by_name) == ["Centrifugo"]


def test_client_protocol_field_numbers() -> None:
    """The client protocol's numbers the SDKs rely on (shared/reference/centrifugo-client-protocol.md)."""
    from relay.proto.centrifuge_client import client_pb2 as client

    def numbers(message: type) -> dict[str, int]:
        return {f.name: f.number for f in message.DESCRIPTOR.fields}  # type: ignore[attr-defined]

    assert client.DESCRIPTOR.package == "centrifugo_relay.client_protocol"  # the SDKs' name is taken by them
    assert numbers(client.Command)["connect"] == 4 and numbers(client.Command)["sub_refresh"] == 15
    assert numbers(client.Reply)["push"] == 4 and numbers(client.Reply)["subscribe"] == 6
    assert {k: numbers(client.Publication)[k] for k in ("data", "info", "offset", "tags", "delta")} == {
        "data": 4, "info": 5, "offset": 6, "tags": 7, "delta": 8}
    assert numbers(client.SubscribeRequest)["delta"] == 12 and numbers(client.SubscribeResult)["was_recovering"] == 12
