"""The checked-in codegen step: regenerate the Python stubs from the .proto files.

    python -m proto.generate            # rewrite proto/oragent/v1/*_pb2*.py
    python -m proto.generate --check    # exit 1 if the checked-in stubs are stale

Uses grpcio-tools (the `dev` extra). The stubs are committed so that the agent needs only grpcio
and protobuf at run time.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTOS = sorted((ROOT / "proto").rglob("*.proto"))


def generate(out_root: Path) -> list[Path]:
    from grpc_tools import protoc

    import grpc_tools

    include = str(Path(grpc_tools.__file__).parent / "_proto")
    written = []
    for proto in PROTOS:
        rel = proto.relative_to(ROOT)
        args = ["protoc", f"-I{ROOT}", f"-I{include}", f"--python_out={out_root}", f"--pyi_out={out_root}",
                f"--grpc_python_out={out_root}", str(rel)]
        if protoc.main(args) != 0:
            raise SystemExit(f"protoc failed on {rel}")
        stem = rel.with_suffix("")
        written += [out_root / f"{stem}_pb2.py", out_root / f"{stem}_pb2.pyi", out_root / f"{stem}_pb2_grpc.py"]
    return written


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="only compare with the checked-in stubs")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp))
        stale = []
        for f in fresh:
            rel = f.relative_to(tmp)
            target = ROOT / rel
            if args.check:
                if not target.exists() or not filecmp.cmp(f, target, shallow=False):
                    stale.append(str(rel))
            else:
                shutil.copyfile(f, target)
                print(f"wrote {rel}")
    if stale:
        print("stale generated stubs (run: python -m proto.generate): " + ", ".join(stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
