"""Fail when the generated gRPC code in propensity/v1 differs from what protos/ generates now."""

from __future__ import annotations

import filecmp
import subprocess
import sys
import tempfile
from pathlib import Path

from propensity.settings import PROJECT_ROOT

GENERATED_PACKAGE = Path("propensity") / "v1"


def generate(proto_root: Path, out_dir: Path) -> list[Path]:
    """Run grpc_tools.protoc over every .proto under proto_root; return the files written."""
    protos = sorted(str(p.relative_to(proto_root)) for p in proto_root.rglob("*.proto"))
    command = [sys.executable, "-m", "grpc_tools.protoc", f"-I{proto_root}", f"--python_out={out_dir}",
               f"--grpc_python_out={out_dir}", f"--pyi_out={out_dir}", *protos]
    subprocess.run(command, check=True, cwd=proto_root)
    return sorted(p for p in out_dir.rglob("*") if p.suffix in {".py", ".pyi"})


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(PROJECT_ROOT / "protos", Path(tmp))
        stale = []
        for path in fresh:
            committed = PROJECT_ROOT / path.relative_to(tmp)
            if not committed.exists() or not filecmp.cmp(path, committed, shallow=False):
                stale.append(str(committed.relative_to(PROJECT_ROOT)))
    if stale:
        print("generated code is out of sync with protos/: " + ", ".join(stale) + "\nrun `make proto` and commit the result")
        return 1
    print(f"generated code in sync with protos/ ({len(fresh)} files)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
