"""Measuring the installed models on held-out synthetic videos, the way the agent runs them.

Each video is decoded with OpenCV, its content area tracked, and every model run through ONNX
Runtime with the manifest's preprocessing; phase goes through the shipped temporal filter.
As in the pipeline, the phase model is not stepped on frames the visibility model calls out of
body. Anatomy is scored in frame coordinates against the CholecSeg8k-format masks (mean IoU over the
classes present), phase per frame against the Cholec80 phase file (the filtered phase held
between steps), visibility against the per-frame flags.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from or_agent.pipelines.backends.onnxruntime import OnnxRuntimeBackend
from or_agent.pipelines.manifest import ModelManifest, find_model
from or_agent.pipelines.metrics import accuracy, confusion, mean_iou_present, per_class_iou, recall
from or_agent.pipelines.preprocess import ContentAreaTracker, paste_back
from or_agent.pipelines.schedule import frame_stepper
from or_agent.pipelines.stages import PhaseStage, SegmentationStage, VisibilityStage
from or_agent.pipelines.surgery import ANATOMY_NAMES
from or_agent.synth.dataset import read_phase_file


@dataclass
class HeldOutResult:
    anatomy_confusion: np.ndarray
    phase_truth: list[np.ndarray]
    phase_raw: list[np.ndarray]
    phase_filtered: list[np.ndarray]
    oob_truth: np.ndarray
    oob_pred: np.ndarray
    lowvis_truth: np.ndarray
    lowvis_pred: np.ndarray
    ms_per_frame: dict[str, float]

    def summary(self) -> dict:
        t = np.concatenate(self.phase_truth)
        iou = per_class_iou(self.anatomy_confusion)
        present = self.anatomy_confusion.sum(1) > 0
        return {
            "anatomy_miou": round(mean_iou_present(self.anatomy_confusion), 4),
            "anatomy_iou_per_class": {ANATOMY_NAMES[c]: round(float(iou[c]), 4) for c in np.flatnonzero(present)},
            "phase_accuracy_raw": round(accuracy(t, np.concatenate(self.phase_raw)), 4),
            "phase_accuracy": round(accuracy(t, np.concatenate(self.phase_filtered)), 4),
            "out_of_body_recall": round(recall(self.oob_truth, self.oob_pred), 4),
            "out_of_body_false_positive_rate": round(float((self.oob_pred & ~self.oob_truth).sum() / max(1, (~self.oob_truth).sum())), 4),
            "low_visibility_recall": round(recall(self.lowvis_truth, self.lowvis_pred), 4),
            "low_visibility_accuracy": round(accuracy(self.lowvis_truth, self.lowvis_pred), 4),
            "ms_per_frame_ort_1_thread": {k: round(v, 2) for k, v in self.ms_per_frame.items()},
        }


def _read_flags(path: Path) -> np.ndarray:
    return np.loadtxt(path, delimiter=",", skiprows=1, dtype=np.int64, ndmin=2)


def evaluate_dataset(dataset: str | Path, videos: list[str] | None = None, models_dir=None,
                     manifests: dict[str, ModelManifest] | None = None) -> HeldOutResult:
    dataset = Path(dataset)
    names = videos or sorted(p.stem for p in dataset.glob("video*.json"))
    m = manifests or {task: find_model(task, models_dir) for task in ("segmentation", "phase", "visibility")}
    anatomy = SegmentationStage(OnnxRuntimeBackend(m["segmentation"], threads=1))
    phase = PhaseStage(OnnxRuntimeBackend(m["phase"], threads=1))
    vis = VisibilityStage(OnnxRuntimeBackend(m["visibility"], threads=1))
    n_cls = anatomy.classes
    conf = np.zeros((n_cls, n_cls), np.int64)
    timing = {"segmentation": [], "phase": [], "visibility": []}

    def timed(key, fn, *args):
        t0 = time.perf_counter()
        out = fn(*args)
        timing[key].append(time.perf_counter() - t0)
        return out

    ph_t, ph_raw, ph_f, oob_t, oob_p, lv_t, lv_p = [], [], [], [], [], [], []
    for name in names:
        meta = json.loads((dataset / f"{name}.json").read_text())
        flags = _read_flags(dataset / f"{name}-flags.csv")
        truth_phase = read_phase_file(dataset / f"{name}-phase.txt")
        steps = frame_stepper(m["phase"].cadence, meta["fps"])  # as the pipeline steps the phase model
        cap = cv2.VideoCapture(str(dataset / f"{name}.mp4"))
        tracker = ContentAreaTracker()
        phase.reset()
        raw_now = filt_now = 0
        raw_seq, filt_seq = [], []
        f = 0
        while True:
            ok, frame = cap.read()
            if not ok:
                break
            area = tracker.update(frame)
            if steps(f):
                v = vis.post_process(timed("visibility", vis.predict, vis.pre_process(frame, area)))
                if not v.out_of_body:  # as in the pipeline: the room says nothing about the phase
                    est = phase.post_process(timed("phase", phase.predict, phase.pre_process(frame, area)), area, f / meta["fps"])
                    raw_now, filt_now = est.raw_phase, est.phase
                oob_t.append(bool(flags[f, 2]))
                oob_p.append(v.out_of_body)
                lv_t.append(bool(flags[f, 3] or flags[f, 4]))
                lv_p.append(v.p_low_visibility > v.threshold)
            raw_seq.append(raw_now)
            filt_seq.append(filt_now)
            mask_path = dataset / "masks" / name / f"frame{f:06d}.png"
            if f % meta["mask_every"] == 0 and mask_path.exists():
                est = anatomy.post_process(timed("segmentation", anatomy.predict, anatomy.pre_process(frame, area)), area)
                pred = paste_back(est.class_map, area, frame.shape[1], frame.shape[0])
                truth = cv2.imread(str(mask_path), cv2.IMREAD_UNCHANGED)
                conf += confusion(truth, pred, n_cls)
            f += 1
        cap.release()
        n = min(len(truth_phase), len(raw_seq))
        ph_t.append(truth_phase[:n])
        ph_raw.append(np.array(raw_seq[:n]))
        ph_f.append(np.array(filt_seq[:n]))
    for stage in (anatomy, phase, vis):
        stage.backend.close()
    ms = {k: 1000 * float(np.median(v)) for k, v in timing.items() if v}
    return HeldOutResult(conf, ph_t, ph_raw, ph_f, np.array(oob_t), np.array(oob_p), np.array(lv_t), np.array(lv_p), ms)


def main(argv=None) -> int:
    """``python -m or_agent.models.evaluate [--models-dir DIR]``: the held-out figures of the installed models,
    printed (the manifests are not touched; ``models.training.train measure`` writes them)."""
    import argparse

    from or_agent.synth.splits import HELD_OUT, ensure_dataset

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--models-dir", default=None, help="models directory (default: the bundled models/)")
    ap.add_argument("--data", default="data", help="where the held-out set is generated or reused (default data/)")
    args = ap.parse_args(argv)
    dataset = ensure_dataset(args.data, HELD_OUT)
    print(json.dumps(evaluate_dataset(dataset, models_dir=args.models_dir).summary(), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
