"""The quick-start job: a synthetic surgery, the pipeline and the three reference models over it.

Prints the phase timeline the agent recognised beside the ground truth, the out-of-body spans it
detected, and each anatomy class's mean area, predicted and true; the full replay outputs
(annotated video, timeline, report) are written next to the surgery.
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np

from agent.progress import Progress
from agent.replay import ReplayInputs, ReplayModels, replay_one
from pipelines.errors import InputError
from pipelines.surgery import ANATOMY_NAMES, PHASES
from synth.dataset import SynthConfig, write_dataset

MASK_EVERY = 5  # frames with ground-truth masks in the demo surgery


def segments(per_frame: np.ndarray) -> list[tuple[int, int, int]]:
    """Runs of equal values: (value, first frame, end frame)."""
    out = []
    start = 0
    for i in range(1, len(per_frame) + 1):
        if i == len(per_frame) or per_frame[i] != per_frame[start]:
            out.append((int(per_frame[start]), start, i))
            start = i
    return out


def _ensure_surgery(out_dir: Path, seed: int, time_scale: float) -> dict:
    cfg = SynthConfig(videos=1, seed=seed, time_scale=time_scale, mask_every=MASK_EVERY)
    meta_path = out_dir / "video01.json"
    if meta_path.exists() and (out_dir / "video01.mp4").exists():
        meta = json.loads(meta_path.read_text())
        if meta.get("seed") == cfg.video_seed(1) and meta.get("time_scale") == time_scale:
            print(f"reusing the synthetic surgery in {out_dir}")
            return meta
    bar: list[Progress] = []

    def progress(_v, _n, frame, frames):
        if not bar:
            bar.append(Progress("generating synthetic surgery", frames))
        bar[0].update(frame + 1)

    meta = write_dataset(out_dir, cfg, progress)[0]
    if bar:
        bar[0].close()
    return meta


def _mean_true_areas(mask_dir: Path, in_body: np.ndarray) -> np.ndarray:
    total = np.zeros(len(ANATOMY_NAMES))
    n = 0
    for path in sorted(mask_dir.glob("frame*.png")):
        f = int(path.stem[5:])
        if f < len(in_body) and in_body[f]:
            m = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
            total += np.bincount(m.ravel(), minlength=len(ANATOMY_NAMES))[:len(ANATOMY_NAMES)] / m.size
            n += 1
    return total / max(1, n)


def run_demo(out_dir: Path, seed: int, time_scale: float, models_dir=None) -> int:
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"{out_dir}: exists and is not a directory")
    models = ReplayModels(models_dir)
    try:
        meta = _ensure_surgery(out_dir, seed, time_scale)
        video = out_dir / "video01.mp4"
        item = ReplayInputs(video, out_dir / "video01-phase.txt", out_dir / "masks" / "video01")
        result = replay_one(item, out_dir / "replay", models, paced=False, anatomy_every=1,
                            progress_label="running the pipeline (phase, anatomy, visibility)")
    finally:
        models.close()
    s, fps = result.summary, meta["fps"]
    pred, truth = result.phase_per_frame, result.truth
    print(f"\nPhase timeline of {video} ({s['frames']} frames, {s['duration_s']:.0f} s at {fps:g} fps; "
          f"processed at {s['fps_processed']:.0f} fps, capture->publish p99 {s['latency_ms']['p99_ms']:.0f} ms)")
    print(f"  {'from':>7} {'to':>7}  recognised phase")
    for p, a, b in segments(pred):
        print(f"  {a / fps:6.1f}s {b / fps:6.1f}s  {PHASES[p] if p >= 0 else '(starting)'}")
    print(f"  {'from':>7} {'to':>7}  ground truth")
    for p, a, b in segments(truth):
        print(f"  {a / fps:6.1f}s {b / fps:6.1f}s  {PHASES[p]}")
    ph = s["phase_metrics"]
    print(f"  frame accuracy {100 * ph['strict']['accuracy']:.1f} % "
          f"({100 * ph['relaxed']['accuracy']:.1f} % with the +-{ph['relaxed_window_s']:g} s relaxed boundary)")

    spans = [(a, b) for v, a, b in segments(result.out_of_body.astype(np.int64)) if v == 1]
    oob_true = [e for e in meta["events"] if e["kind"] == "out_of_body"]
    print("\nOut of body (overlay paused, no alert):")
    print("  detected: " + (", ".join(f"{a / fps:.1f}-{b / fps:.1f}s" for a, b in spans) or "none"))
    print("  truth:    " + (", ".join(f"{e['start'] / fps:.1f}-{e['end'] / fps:.1f}s" for e in oob_true) or "none"))

    true_area = _mean_true_areas(item.masks, ~result.out_of_body)
    print("\nAnatomy: mean area per class over the in-body frames (% of the frame)")
    print(f"  {'class':<24} {'predicted':>9} {'truth':>7}")
    for c, name in enumerate(ANATOMY_NAMES):
        if result.mean_area[c] > 0 or true_area[c] > 0:
            print(f"  {name:<24} {100 * result.mean_area[c]:8.2f}% {100 * true_area[c]:6.2f}%")
    if "anatomy_metrics" in s:
        print(f"  mean IoU over the classes present: {s['anatomy_metrics']['miou']:.3f}")
    print(f"\nReplay outputs (annotated video, timeline, report): {out_dir / 'replay' / 'video01'}")
    print("These reference models are trained on synthetic data: they show the pipeline working "
          "and are not for clinical use.")
    return 0
