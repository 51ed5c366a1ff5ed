"""The offline install (README "Install offline"): the locks agree with setup.py, `or-agent bundle` builds a
wheelhouse with install.sh, SBOM and checksums, and install.sh installs it into a fresh virtual environment
with no index, where `or-agent models` runs. One bundle per session (it downloads ~130 MB from PyPI the
first time; pip's cache makes reruns quick); skipped, with the reason, where PyPI cannot be reached."""

from __future__ import annotations

import asyncio
import hashlib
import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from or_agent.agent import bundle
from or_agent.agent.bundle import RUNTIME_LOCK, BundleSummary, Target, build_bundle, read_lock
from or_agent.pipelines.errors import InputError, OrAgentError
from tests.conftest import ROOT, run_cli


def _offline_env() -> dict[str, str]:
    """The test's environment without pip's settings, so nothing but the bundle can feed the install."""
    return {k: v for k, v in os.environ.items() if not k.startswith("PIP_") and k not in ("PYTHONPATH", "OR_AGENT_MODELS")}


@pytest.fixture(scope="session")
def built(tmp_path_factory) -> BundleSummary:
    out = tmp_path_factory.mktemp("bundle") / "or-agent-bundle"
    try:
        return build_bundle(out, Target())
    except OrAgentError as exc:
        if "cannot reach the package index" in str(exc):
            pytest.skip(f"PyPI unreachable: {exc}")
        raise


@pytest.fixture(scope="session")
def installed(built, tmp_path_factory) -> Path:
    venv = tmp_path_factory.mktemp("box") / "venv"
    proc = subprocess.run([str(built.out / "install.sh"), str(venv)], capture_output=True, text=True,
                          env={**_offline_env(), "PYTHON": sys.executable}, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return venv


def test_the_lock_pins_every_runtime_requirement_within_setup_py(tmp_path):
    locked = {e.name.lower(): e for e in read_lock(ROOT / RUNTIME_LOCK)}
    for text in importlib.metadata.requires("or-agent") or []:
        req = Requirement(text)
        if req.marker is not None and "extra" in str(req.marker):
            continue
        name = req.name.lower().replace("_", "-")
        assert name in locked, f"{name} is in setup.py but not in {RUNTIME_LOCK} (regenerate it: see its header)"
        assert req.specifier.contains(locked[name].version), f"{name}=={locked[name].version} is outside {req.specifier}"
    assert "opencv-python" not in locked and "opencv-python-headless" in locked  # the box's OpenCV has no GUI


def test_each_lock_line_carries_hashes_and_says_how_to_regenerate():
    for lock in (ROOT / RUNTIME_LOCK, *(ROOT / p for p in bundle.EXTRA_LOCKS.values())):
        assert all(e.hashes and all(h.startswith("sha256:") for h in e.hashes) for e in read_lock(lock))
        assert f"uv pip compile {'setup.py' if lock.name == 'requirements.lock' else 'packaging/'}" in lock.read_text()


@pytest.mark.parametrize(("version", "platform", "message"), [
    ("3.9", None, "--python-version: expected a CPython version 3.10 or newer such as 3.11, got '3.9'"),
    ("311", None, "--python-version: expected a CPython version 3.10 or newer such as 3.11, got '311'"),
    (None, "win_amd64", "--platform: expected a Linux wheel platform tag such as manylinux_2_28_x86_64, got 'win_amd64'"),
])
def test_a_bad_target_is_refused_in_one_line(version, platform, message):
    with pytest.raises(InputError) as err:
        Target(python_version=version, platform=platform)
    assert str(err.value) == message


def test_a_target_picks_its_own_lines_of_the_lock():
    entries = read_lock(ROOT / RUNTIME_LOCK)
    py310 = {e.name for e in entries if e.applies_to(Target("3.10", "manylinux_2_28_x86_64").marker_environment())}
    py312 = {e.name for e in entries if e.applies_to(Target("3.12", "manylinux_2_28_aarch64").marker_environment())}
    assert "tomli" in py310 and "tomli" not in py312  # tomli only below 3.11 (setup.py)
    numpy = [e.version for e in entries if e.name == "numpy" and e.applies_to(Target("3.12").marker_environment())]
    assert len(numpy) == 1


def test_a_manylinux_target_also_takes_older_glibc_wheels():
    # pip matches --platform tags exactly; cffi, for one, ships only manylinux2014 (glibc 2.17) wheels
    tags = Target("3.10", "manylinux_2_28_x86_64").platform_tags()
    assert tags[0] == "manylinux_2_28_x86_64" and "manylinux_2_17_x86_64" in tags and "manylinux2014_x86_64" in tags
    assert "manylinux_2_29_x86_64" not in tags and not any("aarch64" in t for t in tags)
    assert Target("3.10", "manylinux2014_aarch64").platform_tags()[0] == "manylinux_2_17_aarch64"
    assert Target("3.10", "linux_x86_64").platform_tags() == ["linux_x86_64"]
    assert Target().platform_tags() == []


def test_no_network_says_so_and_leaves_nothing(tmp_path, monkeypatch):
    def offline_pip(args):
        if args[0] == "wheel":
            (Path(args[args.index("-w") + 1]) / "or_agent-0.1.0-py3-none-any.whl").write_bytes(b"")
            return subprocess.CompletedProcess(args, 0, "", "")
        return subprocess.CompletedProcess(args, 1, "", "WARNING: Retrying ... NewConnectionError(...): "
                                           "Failed to establish a new connection: [Errno -3] Temporary failure in name resolution\n"
                                           "ERROR: No matching distribution found for cffi==2.1.1\n")
    monkeypatch.setattr(bundle, "_run_pip", offline_pip)
    with pytest.raises(OrAgentError) as err:
        build_bundle(tmp_path / "b", Target())
    assert str(err.value) == ("cannot reach the package index: or-agent bundle downloads the wheels, so run it on a "
                              "machine with network access (or a pip mirror)")
    assert list(tmp_path.iterdir()) == []  # neither the bundle nor its staging folder


def test_a_missing_wheel_for_the_target_names_it(tmp_path, monkeypatch):
    def pip(args):
        if args[0] == "wheel":
            (Path(args[args.index("-w") + 1]) / "or_agent-0.1.0-py3-none-any.whl").write_bytes(b"")
            return subprocess.CompletedProcess(args, 0, "", "")
        return subprocess.CompletedProcess(args, 1, "", "ERROR: Could not find a version that satisfies the requirement "
                                           "onnxruntime==1.32.0 (from versions: none)\n")
    monkeypatch.setattr(bundle, "_run_pip", pip)
    with pytest.raises(InputError) as err:
        build_bundle(tmp_path / "b", Target("3.11", "manylinux_2_28_aarch64"))
    assert str(err.value) == ("no wheel of onnxruntime==1.32.0 for CPython 3.11 on manylinux_2_28_aarch64: check "
                              "--python-version and --platform (manylinux_2_28_x86_64 suits Ubuntu 20.04 and newer)")
    assert list(tmp_path.iterdir()) == []


def test_the_cli_refuses_an_existing_folder_and_an_unknown_extra(tmp_path):
    proc = run_cli("bundle", "--out", str(tmp_path))
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"or-agent: error: {tmp_path}: already exists; a bundle is written to a new folder"
    proc = run_cli("bundle", "--out", str(tmp_path / "b"), "--extras", "gpu,cuda")
    assert proc.returncode == 2 and proc.stderr.strip() == "or-agent: error: --extras: unknown cuda (known: gpu)"


def test_the_bundle_holds_wheels_install_script_sbom_and_checksums(built):
    out = built.out
    assert not list(out.parent.glob(".*partial*"))
    wheels = sorted(p.name for p in (out / "wheels").iterdir())
    assert all(w.endswith(".whl") for w in wheels) and len(wheels) == built.wheels
    assert any(w.startswith("or_agent-") for w in wheels) and any(w.startswith("opencv_python_headless-") for w in wheels)
    assert not any(w.startswith("opencv_python-") for w in wheels)
    required = [line.split("==")[0] for line in (out / "requirements.txt").read_text().splitlines()]
    assert len(required) == built.wheels - 1  # every locked package for this target, plus or-agent itself
    sums = dict(reversed(line.split("  ", 1)) for line in (out / "SHA256SUMS").read_text().splitlines())
    files = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file() and p.name != "SHA256SUMS"}
    assert set(sums) == files
    assert all(hashlib.sha256((out / f).read_bytes()).hexdigest() == sums[f] for f in files)
    sbom = json.loads((out / "sbom.cdx.json").read_text())
    assert sbom["bomFormat"] == "CycloneDX" and sbom["metadata"]["component"]["name"] == "or-agent"
    assert sorted(c["name"] for c in sbom["components"]) == sorted(required)
    print(f"bundle: {built.wheels} wheels, {built.size_bytes / 1e6:.1f} MB")


def test_install_sh_installs_offline_and_or_agent_runs(installed, tmp_path):
    env = _offline_env()
    proc = subprocess.run([str(installed / "bin" / "or-agent"), "models"], capture_output=True, text=True, cwd=tmp_path,
                          env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert [line.split()[1] for line in proc.stdout.splitlines() if line.startswith("set ")] == ["endoscapes", "synthetic"]
    assert "FAIL" not in proc.stdout
    probe = subprocess.run([str(installed / "bin" / "python"), "-c",
                            "import cv2, or_agent.proto.oragent.v1.agent_pb2_grpc, importlib.metadata as m; "
                            "print(m.version('protobuf'), m.version('grpcio'), "
                            "[l for l in cv2.getBuildInformation().splitlines() if 'GUI:' in l][0].split()[-1])"],
                           capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert probe.returncode == 0, probe.stderr
    pins = {e.name: e.version for e in read_lock(ROOT / RUNTIME_LOCK) if e.applies_to(Target().marker_environment())}
    assert probe.stdout.split() == [pins["protobuf"], pins["grpcio"], "NONE"]  # the lock's versions, headless OpenCV


def test_install_sh_refuses_tampered_files(built, tmp_path):
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-r", str(built.out), str(copy)], check=True)
    (copy / "requirements.txt").write_text("evil==1.0\n")
    proc = subprocess.run([str(copy / "install.sh"), str(tmp_path / "venv")], capture_output=True, text=True,
                          env={**_offline_env(), "PYTHON": sys.executable}, timeout=300)
    assert proc.returncode == 2 and "install.sh: error: the bundle's files do not match SHA256SUMS" in proc.stderr
    assert not (tmp_path / "venv").exists()


def test_the_display_window_without_a_gui_opencv_is_a_one_line_error():
    from or_agent.agent.display import Display, opencv_has_gui

    if opencv_has_gui():
        pytest.skip("this environment's OpenCV has a GUI build")
    with pytest.raises(InputError) as err:
        asyncio.run(Display("127.0.0.1:1").run())
    assert str(err.value) == ("the display window needs OpenCV's GUI build, and this one is headless: "
                              "pip install 'or-agent[display]' (see README), or record with --headless OUT.mp4")


def test_an_extra_without_a_wheel_for_the_target_is_named_and_left_out(tmp_path, monkeypatch):
    """The GPU lock's pycuda is a source package: the bundle says so and install.sh installs the rest."""
    def pip(args):
        if args[0] == "wheel":
            (Path(args[args.index("-w") + 1]) / "or_agent-0.1.0-py3-none-any.whl").write_bytes(b"")
            return subprocess.CompletedProcess(args, 0, "", "")
        wanted = Path(args[args.index("-r") + 1]).read_text()
        if wanted.startswith("pycuda=="):
            return subprocess.CompletedProcess(args, 1, "", "ERROR: No matching distribution found for pycuda==2026.1\n")
        for line in wanted.splitlines():  # what pip would have fetched
            name, version = line.split()[0].split("==")
            (Path(args[args.index("-d") + 1]) / f"{name.replace('-', '_')}-{version}-py3-none-any.whl").write_bytes(b"")
        return subprocess.CompletedProcess(args, 0, "", "")
    monkeypatch.setattr(bundle, "_run_pip", pip)
    lines: list[str] = []
    summary = build_bundle(tmp_path / "b", Target("3.10", "manylinux_2_28_x86_64"), ["gpu"], log=lines.append)
    assert summary.not_bundled == ("pycuda==2026.1: no wheel for CPython 3.10 on manylinux_2_28_x86_64; install it on the box",)
    gpu = (summary.out / "requirements-gpu.txt").read_text()
    assert "tensorrt-cu12==" in gpu and "pycuda" not in gpu
    assert '-r "$here/requirements-gpu.txt"' in (summary.out / "install.sh").read_text()
    assert "downloading pycuda==2026.1 (gpu)" in lines
    sbom = json.loads((summary.out / "sbom.cdx.json").read_text())
    assert {"tensorrt-cu12", "pycuda", "tomli"} <= {c["name"] for c in sbom["components"]}


def test_the_container_recipe_installs_the_bundle_as_a_non_root_service():
    text = (ROOT / "packaging" / "Dockerfile").read_text()
    instructions = [line.split()[0] for line in text.splitlines() if line and not line[0].isspace() and line[0] != "#"]
    froms = [line.split()[1] for line in text.splitlines() if line.startswith("FROM ")]
    assert froms == ["nvidia/cuda:${CUDA_VERSION}-cudnn-devel-${UBUNTU}", "nvidia/cuda:${CUDA_VERSION}-cudnn-runtime-${UBUNTU}"]
    assert "/opt/or-agent/bundle/install.sh /opt/or-agent/venv" in text
    assert 'USER or-agent' in text and instructions.index("USER") > instructions.index("RUN")
    assert 'ENTRYPOINT ["/opt/or-agent/venv/bin/or-agent", "serve"]' in text
    assert 'service="oragent.v1.OrAgent/liveness"' in text and "HEALTHCHECK" in instructions
    assert 'VOLUME ["/etc/or-agent", "/var/lib/or-agent/audit", "/var/lib/or-agent/models"]' in text
    assert "opencv" not in text.lower().replace("the agent's opencv is the headless build", "")
    gpu = {e.name: e for e in read_lock(ROOT / bundle.EXTRA_LOCKS["gpu"])}
    assert f"ARG PYCUDA_VERSION={gpu['pycuda'].version}" in text
    assert f"ARG PYCUDA_SHA256={gpu['pycuda'].hashes[0].removeprefix('sha256:')}" in text
