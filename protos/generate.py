"""Regenerate relay/proto/ from protos/*.proto (`make protos`).

grpc_tools writes absolute imports (`from centrifugo import api_pb2`); they are rewritten to
`relay.proto....` so the generated modules import as part of the package. `--check` compares a
fresh generation with what is committed and exits 1 when they differ (a test runs it).
"""

from __future__ import annotations

import argparse
import filecmp
import re
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
TARGET = ROOT / "relay" / "proto"
FILES = ["centrifugo/api.proto", "centrifugo_v2/api.proto", "centrifuge_client/client.proto"]
IMPORT = re.compile(r"^from (centrifugo(?:_v2)?) import ", re.MULTILINE)


def generate(out: Path) -> None:
    for sub in ("centrifugo", "centrifugo_v2", "centrifuge_client"):
        (out / sub).mkdir(parents=True, exist_ok=True)
        (out / sub / "__init__.py").write_text("")
    (out / "__init__.py").write_text('"""Generated from protos/ by `make protos`; do not edit."""\n')
    args = ["protoc", f"-I{PROTOS}", f"--python_out={out}", f"--pyi_out={out}",
            f"--grpc_python_out={out}"]
    if protoc.main(args + FILES) != 0:
        sys.exit("protoc failed")
    for path in out.rglob("*_grpc.py"):
        path.write_text(IMPORT.sub(r"from relay.proto.\1 import ", path.read_text()))


def differences(a: Path, b: Path) -> list[str]:
    names = sorted({p.relative_to(root) for root in (a, b) for p in root.rglob("*.py*")
                    if "__pycache__" not in p.parts})  # bytecode caches are not generated code
    same = [n for n in names if (a / n).exists() and (b / n).exists() and filecmp.cmp(a / n, b / n, shallow=False)]
    return [str(n) for n in names if n not in same]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if relay/proto is stale")
    if not parser.parse_args().check:
        generate(TARGET)
        return
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        stale = differences(Path(tmp), TARGET)
    if stale:
        sys.exit("relay/proto is stale, run `make protos`: " + ", ".join(stale))


if __name__ == "__main__":
    main()
