"""Regenerate the committed protobuf / gRPC code from proto/miscnet/v1/*.proto.

The include root is ``proto/``, so the schema files are ``miscnet/v1/*.proto`` to protoc and the code
imports as ``miscnet.v1.*_pb2``: the Python package mirrors the protobuf package ``miscnet.v1``, and
the installed package maps ``miscnet.v1`` onto ``proto/miscnet/v1`` (pyproject.toml).

Run from anywhere: ``python proto/generate.py`` (or ``make proto``). ``--check`` regenerates into a
temporary folder and exits 1 if the committed files differ (the test suite runs it).
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from pathlib import Path

INCLUDE_ROOT = Path(__file__).resolve().parent
SCHEMA_DIR = INCLUDE_ROOT / "miscnet" / "v1"


def generate(out_root: Path) -> list[Path]:
    """Write *_pb2.py / *_pb2_grpc.py for every schema under out_root (mirroring the repo layout)."""
    from grpc_tools import protoc  # dev dependency only

    protos = sorted(SCHEMA_DIR.glob("*.proto"))
    include = Path(protoc.__file__).parent / "_proto"
    # gRPC stubs only for files that define services: the others would get empty *_pb2_grpc.py files
    with_services = [p for p in protos if "\nservice " in p.read_text()]
    for out_flag, files in (("--python_out", protos), ("--grpc_python_out", with_services)):
        args = ["protoc", f"-I{INCLUDE_ROOT}", f"-I{include}", f"{out_flag}={out_root}",
                *[str(p.relative_to(INCLUDE_ROOT)) for p in files]]
        if files and protoc.main(args) != 0:
            raise SystemExit("protoc failed")
    return sorted((out_root / "miscnet" / "v1").glob("*_pb2*.py"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if committed code is stale")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp))
        stale = []
        for path in fresh:
            committed = SCHEMA_DIR / path.name
            if args.check:
                if not committed.exists() or not filecmp.cmp(path, committed, shallow=False):
                    stale.append(committed.name)
            else:
                shutil.copyfile(path, committed)
        if args.check:
            expected = {p.name for p in fresh}
            extra = [p.name for p in SCHEMA_DIR.glob("*_pb2*.py") if p.name not in expected]
            if stale or extra:
                print(f"generated protobuf code is stale: {', '.join(stale + extra)}; run `make proto`")
                return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
