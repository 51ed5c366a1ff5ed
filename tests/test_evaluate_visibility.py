"""`or-agent evaluate visibility`: a set's visibility model (the gate) on groups of frames, its verdict
rates and goals; and the shipped real visibility model against the goals on the real footage."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import cv2
import numpy as np
import onnx
import onnxruntime as ort
import pytest

from or_agent.agent.offline.evaluate_visibility import GOALS, evaluate_visibility
from or_agent.pipelines.manifest import load_manifest
from or_agent.pipelines.preprocess import ContentArea, crop_resize, detect_content_area, normalise
from tests.conftest import ROOT, assert_runs_with_documented_shapes, run_cli
from tests.test_models import TENSORRT_OPS

SYNTHETIC = ROOT / "models" / "synthetic" / "visibility"
REAL_MODEL = ROOT / "models" / "endoscapes" / "visibility"


@pytest.fixture(scope="module")
def frames(tmp_path_factory) -> dict[str, Path]:
    """Frames of the first held-out synthetic surgery (the one the synthetic model was measured on):
    in-body frames outside every event, the operating room seen from outside the patient, and a short
    video of in-body frames, written as the generator renders them."""
    from or_agent.synth.render import SurgeryRenderer
    from or_agent.synth.splits import HELD_OUT
    from or_agent.synth.timeline import sample_timeline

    out = tmp_path_factory.mktemp("visibility-frames")
    seed = HELD_OUT.video_seed(HELD_OUT.first_index)
    tl = sample_timeline(np.random.default_rng(seed), fps=HELD_OUT.fps, time_scale=HELD_OUT.time_scale)
    renderer = SurgeryRenderer(tl, seed=seed + 1, width=HELD_OUT.width, height=HELD_OUT.height)
    room = [f for f in range(tl.frames) if tl.active("out_of_body", f) is not None]
    quiet = [f for f in range(tl.frames) if not any(tl.active(k, f) for k in ("out_of_body", "smoke", "blur", "bleeding"))]
    assert len(room) >= 6 and len(quiet) >= 100
    for folder, picks in (("in-body", quiet[10:100:15]), ("room/nested", room[::max(1, len(room) // 6)][:6])):
        (out / folder).mkdir(parents=True)
        for f in picks:
            cv2.imwrite(str(out / folder / f"frame{f:06d}.png"), renderer.render(f).image)
    # an annotation mask beside the frames: not a frame, left out
    (out / "in-body" / "masks").mkdir()
    cv2.imwrite(str(out / "in-body" / "masks" / "frame000000.png"), np.zeros((480, 854), np.uint8))
    writer = cv2.VideoWriter(str(out / "clip.mp4"), cv2.VideoWriter.fourcc(*"mp4v"), 25.0, (854, 480))
    for f in quiet[100:110]:
        writer.write(renderer.render(f).image)
    writer.release()
    return {"in-body": out / "in-body", "room": out / "room", "clip": out / "clip.mp4", "root": out}


class Independent:
    """The visibility model run with ONNX Runtime directly: per frame the content area, crop, resize,
    normalisation and its two sigmoids, the verdicts as the manifest defines them (> 0.5)."""

    def __init__(self, model_dir: Path):
        self.manifest = load_manifest(model_dir)
        self.session = ort.InferenceSession(str(self.manifest.model_path), providers=["CPUExecutionProvider"])

    def verdicts(self, frame: np.ndarray) -> tuple[bool, bool]:
        h, w = frame.shape[:2]
        area = detect_content_area(frame) or ContentArea.whole_frame(w, h)
        spec = self.manifest.input_spec
        x = normalise(crop_resize(frame, area, spec.height, spec.width), spec)
        p = 1 / (1 + np.exp(-self.session.run(None, {"frame": x})[0].ravel().astype(np.float64)))
        return bool(p[0] > 0.5), bool(p[0] <= 0.5 and p[1] > 0.5)

    def counts(self, frames: list[np.ndarray]) -> tuple[int, int, int]:
        v = [self.verdicts(f) for f in frames]
        return len(v), sum(o for o, _ in v), sum(low for _, low in v)


def images(folder: Path) -> list[np.ndarray]:
    out = [cv2.imread(str(p)) for p in sorted(folder.rglob("*.png")) if "masks" not in p.parts]
    return [im for im in out if im is not None]


def video_frames(path: Path, every: int) -> list[np.ndarray]:
    cap = cv2.VideoCapture(str(path))
    out, i = [], 0
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        if i % every == 0:
            out.append(frame)
        i += 1
    cap.release()
    return out


def row(stdout: str, label: str) -> tuple[int, int, int]:
    """frames, out of body, low visibility of a group's or a source's line of the table."""
    m = re.search(rf"^ +{re.escape(label)}: (\d+) frames, out of body [\d.]+ % \((\d+)\), low visibility [\d.]+ % \((\d+)\)$",
                  stdout, re.M)
    assert m, f"no line {label!r} in:\n{stdout}"
    return int(m[1]), int(m[2]), int(m[3])


def test_rates_and_goals_match_the_predictions_recomputed_frame_by_frame(frames):
    proc = run_cli("evaluate", "visibility", "--models", "synthetic", "--in-body", str(frames["in-body"]),
                   str(frames["clip"]), "--out-of-body", str(frames["room"]), "--clear", str(frames["in-body"]),
                   "--every", "3")
    ref = Independent(SYNTHETIC)
    in_body = ref.counts(images(frames["in-body"]))
    clip = ref.counts(video_frames(frames["clip"], 3))
    room = ref.counts(images(frames["room"]))
    assert in_body[0] == 6 and clip[0] == 4 and room[0] == 6  # the mask is no frame; frames 0, 3, 6, 9 of 10
    # the generator's ground truth: the synthetic model calls its rooms out of body and its quiet frames in body
    assert room[1] == 6 and in_body[1] == clip[1] == 0
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert out.splitlines()[0] == f"read {frames['in-body']} (in-body): 6 frames"
    (first,) = [line for line in out.splitlines() if line.startswith("visibility ")]
    assert first.startswith("visibility 1.0.0 (set synthetic): threshold 0.5, ")
    assert first.endswith(" ms per frame (ONNX Runtime, CPU, 1 thread); videos: one frame in 3")
    assert row(out, "in-body") == tuple(a + b for a, b in zip(in_body, clip))
    assert row(out, str(frames["in-body"])) == in_body
    assert row(out, str(frames["clip"])) == clip
    assert row(out, "out-of-body") == room
    assert row(out, "clear") == in_body
    n, oob, _ = row(out, "in-body")
    assert f"out-of-body false positives on in-body frames    {100 * oob / n:.2f} % ({oob} of {n}), goal <= 0.5 %: met" in out
    assert f"low-visibility false positives on clear frames   {100 * in_body[2] / 6:.2f} % ({in_body[2]} of 6), goal <= 5 %: " in out
    assert "smoke recall (low visibility on smoky frames)    not measured (no smoky frames given), goal >= 0.8" in out
    assert "out-of-body recall on out-of-body frames         1.000 (6 of 6), goal >= 0.95: met" in out


def test_a_missed_goal_exits_1(frames):
    """The rooms given as in-body frames: every one a false out-of-body verdict."""
    proc = run_cli("evaluate", "visibility", "--models", "synthetic", "--in-body", str(frames["room"]))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "out-of-body false positives on in-body frames    100.00 % (6 of 6), goal <= 0.5 %: NOT MET" in proc.stdout


def test_one_model_folder_is_accepted_in_place_of_a_set(frames):
    s = evaluate_visibility({"out-of-body": [frames["room"]]}, SYNTHETIC, log=lambda m: None)
    assert s.model_set == f"model folder {SYNTHETIC}" and s.totals("out-of-body") == (6, 6, 0)
    assert s.goals()[3].met is True and all(r.met is None for r in s.goals()[:3])


def test_without_paths_it_uses_the_real_data_folders_and_says_which(frames, tmp_path, monkeypatch):
    """A stand-in for the real data folder: its frames are found where the real ones are, masks left out."""
    fake = tmp_path / "real"
    for sub in ("smoke/clear", "smoke/smoky", "endoscapes-seg50/val/images", "endoscapes-seg50/val/masks"):
        (fake / sub).mkdir(parents=True)
    quiet = sorted(frames["in-body"].glob("*.png"))
    shutil.copy(quiet[0], fake / "smoke" / "clear" / "1.png")
    shutil.copy(quiet[1], fake / "smoke" / "smoky" / "2.png")
    shutil.copy(quiet[2], fake / "endoscapes-seg50" / "val" / "images" / "a.png")
    cv2.imwrite(str(fake / "endoscapes-seg50" / "val" / "masks" / "a.png"), np.zeros((480, 854), np.uint8))
    monkeypatch.setenv("OR_AGENT_REAL_DATA", str(fake))
    lines: list[str] = []
    s = evaluate_visibility(None, "synthetic", log=lines.append)
    assert lines[0] == (f"no PATH given: the real data in {fake} (in-body: endoscapes-seg50, smoke; "
                        "clear: smoke/clear, endoscapes-seg50; smoky: smoke/smoky; no out-of-body frames)")
    assert [s.totals(g)[0] for g in ("in-body", "clear", "smoky", "out-of-body")] == [3, 2, 1, 0]


@pytest.mark.parametrize("args, message, code", [
    (["--in-body", "{tmp}/missing"], "{tmp}/missing: no such file or directory", 2),
    (["--in-body", "{tmp}/empty"], "{tmp}/empty: no images (.jpg, .jpeg, .png, .bmp) or videos (.mp4, .avi, .mkv, .mov, "
                                   ".m4v, .mpg, .mpeg, .webm) in it or its subfolders", 2),
    (["--in-body", "{tmp}/notes.txt"], "{tmp}/notes.txt: not an image (.jpg, .jpeg, .png, .bmp) or video (.mp4, .avi, "
                                       ".mkv, .mov, .m4v, .mpg, .mpeg, .webm) file", 2),
    (["--clear", "{tmp}/broken.jpg"], "{tmp}/broken.jpg: not an image OpenCV can decode", 2),
    (["--in-body", "{room}", "--every", "0"], "--every must be at least 1, got 0", 2),
    (["--in-body", "{room}", "--models", "{tmp}/no-visibility"],
     "{tmp}/no-visibility: no model with task 'visibility' in model set 'no-visibility'", 3),
    (["--in-body", "{room}", "--models", str(ROOT / "models" / "synthetic" / "phase")],
     f"{ROOT / 'models' / 'synthetic' / 'phase'}: a phase model, not a visibility model", 2),
])
def test_bad_input_is_one_line(frames, tmp_path, args, message, code):
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("not a frame")
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    shutil.copytree(ROOT / "models" / "synthetic" / "anatomy", tmp_path / "no-visibility" / "anatomy")
    fill = {"tmp": str(tmp_path), "room": str(frames["room"])}
    proc = run_cli("evaluate", "visibility", *(a.format(**fill) for a in args))
    assert proc.returncode == code
    assert proc.stderr == f"or-agent: error: {message.format(**fill)}\n"


def test_without_paths_or_real_data_it_says_what_to_give(tmp_path, monkeypatch):
    monkeypatch.setenv("OR_AGENT_REAL_DATA", str(tmp_path / "nowhere"))
    proc = run_cli("evaluate", "visibility")
    assert proc.returncode == 2
    assert proc.stderr == (f"or-agent: error: no frames given (--in-body, --clear, --smoky, --out-of-body) and no real "
                           f"data at {tmp_path / 'nowhere'} (set OR_AGENT_REAL_DATA to its folder)\n")


def test_goals_are_the_issues():
    assert [(g.group, g.rule, g.limit) for g in GOALS] == [
        ("in-body", "<=", 0.005), ("clear", "<=", 0.05), ("smoky", ">=", 0.8), ("out-of-body", ">=", 0.95)]


# -- the shipped real visibility model -------------------------------------------------------------

def test_the_real_visibility_model_is_a_drop_in_for_the_synthetic_one():
    real, synthetic = load_manifest(REAL_MODEL), load_manifest(SYNTHETIC)
    real.verify_file()
    assert real.task == "visibility" and real.license == "CC-BY-NC-SA-4.0"
    assert real.input == synthetic.input and real.outputs == synthetic.outputs and real.labels == synthetic.labels
    assert {d.license for d in real.datasets} == {"CC-BY-NC-SA-4.0", "CC-BY-NC-4.0", "Apache-2.0"}
    assert real.training["command"].startswith("OMP_NUM_THREADS=1 python -m or_agent.models.training.real.visibility")
    assert_runs_with_documented_shapes(real)
    model = onnx.load(str(real.model_path))
    assert model.opset_import[0].version == 17
    assert {n.op_type for n in model.graph.node} <= TENSORRT_OPS


@pytest.fixture(scope="module")
def on_real_frames(real_data):
    """The shipped real visibility model on every real frame (evaluate's default groups)."""
    import os

    before = os.environ.get("OR_AGENT_REAL_DATA")
    os.environ["OR_AGENT_REAL_DATA"] = str(real_data)
    try:
        return evaluate_visibility(None, REAL_MODEL, log=lambda m: None)
    finally:
        if before is None:
            del os.environ["OR_AGENT_REAL_DATA"]
        else:
            os.environ["OR_AGENT_REAL_DATA"] = before


@pytest.mark.real_data
def test_the_real_visibility_model_meets_the_out_of_body_and_clear_goals_on_the_real_frames(on_real_frames):
    oob_fp, clear_fp, _, oob_recall = on_real_frames.goals()
    assert oob_fp.frames == 4603 and oob_fp.met, oob_fp.line()
    assert clear_fp.frames == 443 and clear_fp.met, clear_fp.line()
    assert oob_recall.met is None  # no real out-of-body footage
    recorded = json.loads((REAL_MODEL / "manifest.json").read_text())["metrics"]["all_real"]
    # the same model, frames and arithmetic: only ONNX Runtime's CPU kernels may flip a frame near 0.5
    assert abs(oob_fp.hits - round(recorded["out_of_body_false_positive_rate"] * oob_fp.frames)) <= 2
    assert abs(clear_fp.hits - round(recorded["low_visibility_false_positive_rate_on_clear"] * clear_fp.frames)) <= 2
    # the gate warns of low visibility on few real in-body frames (the synthetic model: 21 %)
    frames, _, low = on_real_frames.totals("in-body")
    assert low / frames <= 0.02


@pytest.mark.real_data
@pytest.mark.xfail(strict=True, reason="the shipped model finds 2 of the 3 real smoky frames (smoky/408.jpg, a thin veil "
                                       "over the pale abdominal wall, is missed); the goal 0.8 needs all 3")
def test_the_real_visibility_model_meets_the_smoke_goal_on_the_real_frames(on_real_frames):
    smoke = on_real_frames.goals()[2]
    assert smoke.frames == 3 and smoke.met, smoke.line()
