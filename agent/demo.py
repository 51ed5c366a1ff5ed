"""The quick-start job: a synthetic surgery, the three reference models over it, and what they saw.

Prints the phase timeline the agent recognised next to the ground truth, the out-of-body
spans it detected, and the mean area of each anatomy class, predicted and true.
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np

from agent.progress import Progress
from pipelines.backends.onnxruntime import OnnxRuntimeBackend
from pipelines.errors import InputError
from pipelines.manifest import find_model
from pipelines.metrics import accuracy
from pipelines.preprocess import ContentAreaTracker, paste_back
from pipelines.stages import AnatomyStage, PhaseStage, VisibilityStage
from pipelines.surgery import ANATOMY_NAMES, PHASES
from synth.dataset import SynthConfig, read_phase_file, write_dataset

ANATOMY_EVERY = 5  # frames


def segments(per_frame: np.ndarray) -> list[tuple[int, int, int]]:
    """Runs of equal values: (value, first frame, end frame)."""
    out = []
    start = 0
    for i in range(1, len(per_frame) + 1):
        if i == len(per_frame) or per_frame[i] != per_frame[start]:
            out.append((int(per_frame[start]), start, i))
            start = i
    return out


def _ensure_surgery(out_dir: Path, seed: int, time_scale: float) -> tuple[Path, dict]:
    cfg = SynthConfig(videos=1, seed=seed, time_scale=time_scale, mask_every=ANATOMY_EVERY)
    meta_path = out_dir / "video01.json"
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if meta.get("seed") == cfg.video_seed(1) and meta.get("time_scale") == time_scale and (out_dir / "video01.mp4").exists():
            print(f"reusing the synthetic surgery in {out_dir}")
            return out_dir / "video01.mp4", meta
    bar: list[Progress] = []

    def progress(_v, _n, frame, frames):
        if not bar:
            bar.append(Progress("generating synthetic surgery", frames))
        bar[0].update(frame + 1)

    meta = write_dataset(out_dir, cfg, progress)[0]
    if bar:
        bar[0].close()
    return out_dir / "video01.mp4", meta


def run_demo(out_dir: Path, seed: int, time_scale: float, models_dir=None) -> int:
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"{out_dir}: exists and is not a directory")
    models = {task: find_model(task, models_dir) for task in ("segmentation", "phase", "visibility")}
    video, meta = _ensure_surgery(out_dir, seed, time_scale)
    fps = meta["fps"]
    phase = PhaseStage(OnnxRuntimeBackend(models["phase"], threads=1))
    anatomy = AnatomyStage(OnnxRuntimeBackend(models["segmentation"], threads=1))
    vis = VisibilityStage(OnnxRuntimeBackend(models["visibility"], threads=1))
    stride = max(1, int(round(fps / models["phase"].extra.get("step_rate_hz", 5.0))))
    cap = cv2.VideoCapture(str(video))
    tracker = ContentAreaTracker()
    frames = int(meta["frames"])
    bar = Progress("running phase, anatomy and visibility models", frames)
    pred_phase, pred_oob = [], []
    areas_pred = np.zeros(len(ANATOMY_NAMES))
    areas_true = np.zeros(len(ANATOMY_NAMES))
    n_area = 0
    current, oob = 0, False
    f = 0
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        area = tracker.update(frame)
        if f % stride == 0:
            v = vis(frame, area)
            oob = v.out_of_body
            current = phase(frame, area, f / fps).phase
        if f % ANATOMY_EVERY == 0 and not oob:
            est = anatomy(frame, area)
            full = paste_back(est.class_map, area, frame.shape[1], frame.shape[0])
            truth = cv2.imread(str(out_dir / "masks" / "video01" / f"frame{f:06d}.png"), cv2.IMREAD_UNCHANGED)
            areas_pred += np.bincount(full.ravel(), minlength=len(ANATOMY_NAMES)) / full.size
            if truth is not None:
                areas_true += np.bincount(truth.ravel(), minlength=len(ANATOMY_NAMES)) / truth.size
            n_area += 1
        pred_phase.append(current)
        pred_oob.append(oob)
        f += 1
        bar.update(f)
    bar.close()
    cap.release()
    if f == 0:
        raise InputError(f"{video}: no frame could be decoded")

    truth_phase = read_phase_file(out_dir / "video01-phase.txt")[:f]
    pred = np.array(pred_phase[:len(truth_phase)])
    print(f"\nPhase timeline of {video} ({f} frames, {f / fps:.0f} s at {fps:g} fps)")
    print(f"  {'from':>7} {'to':>7}  {'recognised phase':<26}")
    for p, a, b in segments(pred):
        print(f"  {a / fps:6.1f}s {b / fps:6.1f}s  {PHASES[p]:<26}")
    print("  ground truth:")
    for p, a, b in segments(truth_phase):
        print(f"  {a / fps:6.1f}s {b / fps:6.1f}s  {PHASES[p]:<26}")
    print(f"  frame accuracy: {100 * accuracy(truth_phase, pred):.1f} %")

    oob_true = [e for e in meta["events"] if e["kind"] == "out_of_body"]
    spans = [(a, b) for v_, a, b in segments(np.array(pred_oob, np.int64)) if v_ == 1]
    print("\nOut of body (no overlay, no alert):")
    print("  detected: " + (", ".join(f"{a / fps:.1f}-{b / fps:.1f}s" for a, b in spans) or "none"))
    print("  truth:    " + (", ".join(f"{e['start'] / fps:.1f}-{e['end'] / fps:.1f}s" for e in oob_true) or "none"))

    print(f"\nAnatomy: mean area per class over {n_area} in-body frames (% of frame)")
    print(f"  {'class':<24} {'predicted':>9} {'truth':>7}")
    for c, name in enumerate(ANATOMY_NAMES):
        if areas_pred[c] > 0 or areas_true[c] > 0:
            print(f"  {name:<24} {100 * areas_pred[c] / max(1, n_area):8.2f}% {100 * areas_true[c] / max(1, n_area):6.2f}%")
    print("\nThese reference models are trained on synthetic data: they show the pipeline working "
          "and are not for clinical use.")
    return 0
