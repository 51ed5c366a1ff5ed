"""The checked-in codegen step: regenerate the Python stubs from the .proto files.

    python -m or_agent.proto.generate            # rewrite proto/oragent/v1/*_pb2*.py
    python -m or_agent.proto.generate --check    # exit 1 if the checked-in stubs are stale

Uses grpcio-tools (the `dev` extra). The stubs are committed so that the agent needs only grpcio
and protobuf at run time. protoc names the stubs' modules after the .proto's path (``proto/...``);
they are installed under the one ``or_agent`` package, so their module names are moved there
(the .proto file name and the wire package ``oragent.v1`` stay as they are).
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
    import grpc_tools
    from grpc_tools import protoc

    include = str(Path(grpc_tools.__file__).parent / "_proto")
    written = []
    for proto in PROTOS:
        rel = proto.relative_to(ROOT)
        args = ["protoc", f"-I{ROOT}", f"-I{include}", f"--python_out={out_root}", f"--pyi_out={out_root}",
                f"--grpc_python_out={out_root}", str(rel)]
        if protoc.main(args) != 0:
            raise SystemExit(f"protoc failed on {rel}")
        stem = rel.with_suffix("")
        outputs = [out_root / f"{stem}_pb2.py", out_root / f"{stem}_pb2.pyi", out_root / f"{stem}_pb2_grpc.py"]
        for out in outputs:
            out.write_text(_into_package(out.read_text()))
        written += outputs
    return written


def _into_package(text: str) -> str:
    """The generated stubs' own module names (``proto.oragent...``), under the ``or_agent`` package."""
    return (text.replace("from proto.oragent.", "from or_agent.proto.oragent.")
                .replace("'proto.oragent.", "'or_agent.proto.oragent."))


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
        print("stale generated stubs (run: python -m or_agent.proto.generate): " + ", ".join(stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
