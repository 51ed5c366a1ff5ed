from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
REAL = Path(os.environ.get("OR_AGENT_REAL_DATA", ROOT.parent / "shared" / "data" / "real"))


def run_cli(*args: str, check: bool = False):
    """Run the installed command line in a subprocess, as a user would."""
    import subprocess

    proc = subprocess.run([sys.executable, "-m", "or_agent.agent.cli", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"or-agent {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="session")
def real_data() -> Path:
    if not REAL.is_dir():
        pytest.skip(f"real footage not present at {REAL} (it is not redistributed with the project)")
    return REAL


@pytest.fixture(scope="session")
def small_dataset(tmp_path_factory) -> Path:
    """One short synthetic surgery (about 35 s) with masks every 10 frames."""
    from or_agent.synth.dataset import SynthConfig, write_dataset

    out = tmp_path_factory.mktemp("synth-small")
    write_dataset(out, SynthConfig(videos=1, seed=5, time_scale=60.0, mask_every=10))
    return out


@pytest.fixture(scope="session")
def held_out_video(tmp_path_factory) -> Path:
    """The first held-out surgery the models were measured on (time scale 1/25), regenerated
    bit-for-bit from its seed; about 100 s of video with masks every 25 frames."""
    from or_agent.synth.dataset import write_video
    from or_agent.synth.splits import HELD_OUT

    out = tmp_path_factory.mktemp("held-out")
    write_video(out, 1, HELD_OUT)
    return out


def assert_runs_with_documented_shapes(manifest) -> None:
    """The model runs on ONNX Runtime on a random input of its manifest's shapes (zero state) and every
    output has its declared shape, float32 and finite values."""
    import numpy as np

    from or_agent.pipelines.backends.onnxruntime import OnnxRuntimeBackend

    with OnnxRuntimeBackend(manifest) as backend:
        feed = {manifest.input.name: np.random.default_rng(0).normal(size=manifest.input.shape).astype(np.float32)}
        feed.update({s.name: np.zeros(s.shape, np.float32) for s in manifest.state_inputs})
        out = backend.run(feed)
    for spec in manifest.outputs:
        assert out[spec.name].shape == spec.shape and out[spec.name].dtype == np.float32
        assert np.isfinite(out[spec.name]).all()


# qualify's checks whose outcome depends on how fast the machine is (latency p99 against the budget,
# frames dropped in live play); every other check compares outputs and must pass on any machine
SPEED_DEPENDENT_QUALIFY_CHECKS = ("capture->publish latency p99 (ms)", "frames dropped in live play")


def assert_qualification_consistent(report: dict, exit_code: int) -> None:
    """The report's verdicts follow from its own measurements: each check passes exactly when its
    measured value meets its rule and limit, the verdict is PASS exactly when every check passes and the
    exit code says the same. The output checks must pass; the speed-dependent ones (a loaded or slow
    machine may miss the budget) are only held to their own measurements here, never to a wall clock."""
    assert [c["check"].split(" (")[0] for c in report["checks"]] == [
        "anatomy agreement", "phase agreement", "visibility agreement", "capture->publish latency p99",
        "frames dropped in live play", "frames missing from the deployed run"]
    for c in report["checks"]:
        meets = c["measured"] >= c["limit"] if c["rule"] == ">=" else c["measured"] <= c["limit"]
        assert c["pass"] is bool(meets), c
        if c["check"] not in SPEED_DEPENDENT_QUALIFY_CHECKS:
            assert c["pass"], c
    every = all(c["pass"] for c in report["checks"])
    assert report["verdict"] == ("PASS" if every else "FAIL")
    assert exit_code == (0 if every else 1)


def first_frames_video(source: Path, out: Path, frames: int, fps: float | None = None) -> Path:
    """The first ``frames`` frames of ``source`` re-encoded (mp4v) at ``fps`` (default: the source's rate)."""
    import cv2

    cap = cv2.VideoCapture(str(source))
    fps = fps or cap.get(cv2.CAP_PROP_FPS) or 25.0
    writer = None
    try:
        for _ in range(frames):
            ok, frame = cap.read()
            assert ok, f"{source.name} has fewer than {frames} frames"
            if writer is None:
                h, w = frame.shape[:2]
                writer = cv2.VideoWriter(str(out), cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h))
            writer.write(frame)
    finally:
        cap.release()
        if writer is not None:
            writer.release()
    return out
