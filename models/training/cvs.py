"""Fit the CVS assessor of a model set's segmentation model on the training split's expert ratings.

    ./dev python -m or_agent.models.training.cvs --models endoscapes \\
        --train ../shared/data/real/endoscapes-seg50/train --val ../shared/data/real/endoscapes-seg50/val

Runs the set's segmentation model over the training frames the way the agent does (content area,
crop, the model, its class map), measures each map (``pipelines.cvs``), fits one class-balanced
logistic regression per criterion on the raters' means (achieved: >= 0.5), writes the weights into the
model's manifest (``cvs``) and scores the result on the validation split with ``or-agent evaluate``.
The training frames are the ones the segmentation model was trained on, so the maps it is fitted on are
cleaner than those it will see: the validation figures are the honest ones.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import cv2
import numpy as np

from or_agent.agent.offline.evaluate import evaluate_segmentation, read_ratings
from or_agent.pipelines.backends.onnxruntime import OnnxRuntimeBackend
from or_agent.pipelines.cvs import CRITERIA, FEATURES, cvs_measurements, fit_assessor
from or_agent.pipelines.errors import InputError
from or_agent.pipelines.files import atomic_write_text
from or_agent.pipelines.manifest import Task
from or_agent.pipelines.model_set import load_model_set
from or_agent.pipelines.preprocess import ContentArea, detect_content_area
from or_agent.pipelines.stages import SegmentationStage


def measure_split(folder: Path, manifest) -> tuple[np.ndarray, np.ndarray]:
    ratings = read_ratings(folder)
    if not ratings:
        raise InputError(f"{folder}: no index.csv with CVS ratings")
    names = tuple(lab.name for lab in manifest.labels)
    x, y = [], []
    with OnnxRuntimeBackend(manifest, threads=1) as backend:
        stage = SegmentationStage(backend)
        for image, rating in sorted(ratings.items()):
            frame = cv2.imread(str(folder / "images" / f"{image}.jpg"), cv2.IMREAD_COLOR)
            if frame is None:
                raise InputError(f"{folder / 'images' / image}.jpg: missing or not decodable")
            area = detect_content_area(frame) or ContentArea.whole_frame(frame.shape[1], frame.shape[0])
            estimate = stage.post_process(stage.predict(stage.pre_process(frame, area)), area)
            ms = cvs_measurements(estimate.class_map, names)
            x.append([ms[f] for f in FEATURES])
            y.append([rating[c] >= 0.5 for c in CRITERIA])
    return np.array(x), np.array(y, float)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", required=True, help="the model set whose segmentation model gets the assessor")
    ap.add_argument("--train", required=True, type=Path, help="Endoscapes-format training split (images/, index.csv)")
    ap.add_argument("--val", required=True, type=Path, help="Endoscapes-format validation split, for the figures")
    ap.add_argument("--l2", type=float, default=1.0, help="L2 penalty of the logistic regressions (default 1)")
    args = ap.parse_args(argv)
    manifest = load_model_set(args.models).model(Task.SEGMENTATION)
    x, y = measure_split(args.train, manifest)
    print(f"{len(x)} training frames; achieved per criterion: "
          + ", ".join(f"{c} {int(y[:, i].sum())}" for i, c in enumerate(CRITERIA)))
    assessor = fit_assessor(x, y, l2=args.l2)
    doc = json.loads(manifest.path.read_text())
    doc["cvs"] = {**assessor.as_dict(), "fitted_on": f"{args.train} ({len(x)} frames, raters' mean >= 0.5)",
                  "l2": args.l2,
                  "command": f"python -m or_agent.models.training.cvs --models {args.models} --l2 {args.l2:g} "
                             f"--train {args.train} --val {args.val}"}
    atomic_write_text(manifest.path, json.dumps(doc, indent=2) + "\n")
    print(f"wrote the cvs block into {manifest.path}")
    scores = evaluate_segmentation(args.val, args.models)
    for line in scores.table():
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
