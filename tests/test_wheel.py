"""A normal (non-editable) install works: the wheel, installed into a fresh virtual environment, runs
`or-agent models` and a replay from outside the repository, and imports beside Google's proto-plus
(whose top-level `proto` package our stubs once collided with)."""

from __future__ import annotations

import os
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.conftest import ROOT


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A fresh venv with only the wheel installed; its dependencies are seen from the test's own
    environment through a path entry (no download, and none of the editable install's import hooks)."""
    tmp = tmp_path_factory.mktemp("wheel")
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation",
                            "-q", "-w", str(tmp / "dist")], capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr
    (wheel,) = (tmp / "dist").glob("or_agent-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"or_agent"}, top
    for needed in ("or_agent/models/synthetic/model-set.json", "or_agent/models/synthetic/rules_cholecystectomy.toml",
                   "or_agent/models/synthetic/anatomy/model.onnx", "or_agent/agent/agent.example.toml",
                   "or_agent/proto/oragent/v1/agent_pb2_grpc.py"):
        assert needed in names, needed
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    py = venv / "bin" / "python"
    purelib = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    Path(purelib, "or_agent_test_deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    install = subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
                             capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stderr
    return venv


def _run(venv: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "OR_AGENT_MODELS")}
    return subprocess.run([str(venv / "bin" / args[0]), *args[1:]], capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=600)


def test_the_installed_wheel_lists_its_models_and_replays_a_video(installed, small_dataset, tmp_path):
    proc = _run(installed, "or-agent", "models", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    sets = [line for line in proc.stdout.splitlines() if line.startswith("set ")]
    assert [line.split()[1] for line in sets] == ["endoscapes", "synthetic"]  # both sets, the shared models too
    assert "site-packages/or_agent/models/synthetic" in proc.stdout and "FAIL" not in proc.stdout
    video = small_dataset / "video01.mp4"
    proc = _run(installed, "or-agent", "replay", str(video), "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (tmp_path / "out" / "video01" / "timeline.csv").is_file() and (tmp_path / "out" / "video01" / "alerts.csv").is_file()
    where = _run(installed, "python", "-c", "import or_agent.pipelines as p; print(p.__file__)", cwd=tmp_path)
    assert "site-packages/or_agent/pipelines" in where.stdout, where.stdout + where.stderr


def test_the_installed_wheel_imports_beside_proto_plus(installed, tmp_path):
    proc = _run(installed, "python", "-c",
                "import proto, or_agent.proto.oragent.v1.agent_pb2 as pb; "
                "print(proto.Message.__module__, pb.Overlay.__module__)", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["proto.message", "or_agent.proto.oragent.v1.agent_pb2"]
