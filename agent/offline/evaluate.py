"""``or-agent evaluate segmentation DIR``: a model set's segmentation model on labelled real frames.

The folder is in Endoscapes' format: ``images/<name>.jpg`` (or .png) and ``masks/<name>.png`` (8-bit,
grey value = class id, 255 = boundary or overlap, ignored), with Endoscapes' classes unless a
``classes.txt`` lists others; the model must have the same classes, in the same order. Every image
goes through the agent's own path (the endoscope's content area, the model's crop, resize and
normalisation, ONNX Runtime, the class map pasted back onto the frame), and is scored in frame
pixels: per-class IoU and Dice, and their means over the classes the model has besides background
(a class absent from both truth and prediction in every frame has no score). The set's distance rules
(an instrument near a structure) are judged on every frame, on the model's map as the live agent
judges them and on the truth: how often each would hold, and how often falsely. With ``--out``, the
class maps are written as PNGs (grey value = class id) beside a ``predictions.csv`` of the per-class
areas each frame was given.
"""

from __future__ import annotations

import csv
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from or_agent.pipelines.backends.onnxruntime import OnnxRuntimeBackend
from or_agent.pipelines.cvs import CRITERIA
from or_agent.pipelines.errors import InputError
from or_agent.pipelines.files import atomic_write_text, make_output_dir
from or_agent.pipelines.manifest import Task, load_manifest
from or_agent.pipelines.metrics import average_precision, balanced_accuracy, confusion, per_class_dice, per_class_iou
from or_agent.pipelines.model_set import load_model_set
from or_agent.pipelines.preprocess import ContentArea, detect_content_area, paste_back
from or_agent.pipelines.rules import distance_rule_holds, load_rules
from or_agent.pipelines.stages import SegmentationStage

IGNORE = 255
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
# Endoscapes' class ids; a folder labelled otherwise lists its classes in classes.txt, one per line, in id order
ENDOSCAPES_CLASSES = ("background", "cystic plate", "hepatocystic triangle", "cystic artery", "cystic duct",
                      "gallbladder", "tool")


def _plain(name: str) -> str:
    return " ".join(name.lower().replace("_", " ").replace("-", " ").split())


def folder_classes(folder: Path) -> tuple[str, ...]:
    listed = folder / "classes.txt"
    if listed.is_file():
        names = tuple(line.strip() for line in listed.read_text().splitlines() if line.strip())
        if not names:
            raise InputError(f"{listed}: empty (one class name per line, in id order)")
        return names
    return ENDOSCAPES_CLASSES


@dataclass(frozen=True)
class ConditionCount:
    """How often a distance rule's condition held on the model's class maps and on the truth."""

    rule: str
    classes: tuple[str, str]
    threshold_px: float
    min_class_confidence: float  # the rule's gate on the model's maps (0: none; none on the truth)
    on_model: int
    on_truth: int
    false_alarms: int  # the model's maps say it holds, the truth says it does not
    missed: int

    def line(self, frames: int) -> str:
        gate = f", both at confidence >= {self.min_class_confidence:g}" if self.min_class_confidence else ""
        return (f"  rule {self.rule} ({self.classes[0]} within {self.threshold_px:g} px of {self.classes[1]}{gate}): "
                f"holds on the model's maps in {self.on_model} frames, on the truth in {self.on_truth}; "
                f"false alarms {self.false_alarms} ({100 * self.false_alarms / max(1, frames):.1f} % of frames), "
                f"missed {self.missed}")


@dataclass(frozen=True)
class CriterionScore:
    """One CVS criterion against the raters (achieved: their mean >= 0.5), beside the majority baseline
    (always "not achieved": balanced accuracy 0.5, average precision = the share of positives)."""

    criterion: str
    positives: int
    frames: int
    balanced_accuracy: float
    average_precision: float

    def line(self) -> str:
        return (f"  {self.criterion:<26} balanced accuracy {self.balanced_accuracy:.3f} (majority 0.500), "
                f"AP {self.average_precision:.3f} (majority {self.positives / max(1, self.frames):.3f}); "
                f"{self.positives} of {self.frames} frames achieved")


@dataclass(frozen=True)
class DrawnRegions:
    """What the confidence gate does to the regions a display would draw: a class region of a frame
    (at least ``MIN_REGION_CELLS`` cells of the model's map) is mostly wrong when less than half of its
    pixels are that structure in the truth."""

    min_confidence: float
    right: int  # regions mostly right
    right_drawn: int  # ... of them, confident enough to be drawn
    wrong: int
    wrong_drawn: int

    def line(self) -> str:
        return (f"  regions drawn at confidence >= {self.min_confidence:g}: {self.right_drawn} of {self.right} mostly right "
                f"(>= half their pixels on the structure) and {self.wrong_drawn} of {self.wrong} mostly wrong; "
                f"without the gate all {self.right + self.wrong}")


# the smallest region (model-map cells) counted: as small as the polygons a display is sent
MIN_REGION_CELLS = 12


@dataclass(frozen=True)
class SegmentationScores:
    model: str
    frames: int
    classes: tuple[str, ...]
    iou: tuple[float, ...]  # per class, NaN where the class is in neither truth nor prediction
    dice: tuple[float, ...]
    ms_per_frame: float  # the model call, ONNX Runtime on the CPU, one thread (median)
    conditions: tuple[ConditionCount, ...] = ()  # the set's distance rules, measured frame by frame
    cvs: tuple[CriterionScore, ...] = ()  # where the model assesses the CVS and the folder has ratings
    drawn: DrawnRegions | None = None

    @property
    def cvs_mean_balanced_accuracy(self) -> float:
        return float(np.nanmean([c.balanced_accuracy for c in self.cvs])) if self.cvs else float("nan")

    @property
    def mean_iou(self) -> float:
        """Over the classes besides background (class 0) that have a score."""
        return float(np.nanmean(self.iou[1:]))

    @property
    def mean_dice(self) -> float:
        return float(np.nanmean(self.dice[1:]))

    def table(self) -> list[str]:
        rows = [f"{self.model}: {self.frames} frames, {self.ms_per_frame:.1f} ms per frame (ONNX Runtime, CPU, 1 thread)",
                f"  {'class':<26} {'IoU':>6} {'Dice':>6}"]
        for name, iou, dice in zip(self.classes, self.iou, self.dice):
            rows.append(f"  {name:<26} {_fmt(iou):>6} {_fmt(dice):>6}")
        rows.append(f"  {'mean (without background)':<26} {_fmt(self.mean_iou):>6} {_fmt(self.mean_dice):>6}")
        rows += [c.line(self.frames) for c in self.conditions]
        if self.drawn is not None:
            rows.append(self.drawn.line())
        if self.cvs:
            rows.append(f"  critical view of safety (mean balanced accuracy {self.cvs_mean_balanced_accuracy:.3f}):")
            rows += [c.line() for c in self.cvs]
        return rows


def _fmt(v: float) -> str:
    return "-" if np.isnan(v) else f"{v:.3f}"


def _pairs(folder: Path) -> list[tuple[Path, Path]]:
    images_dir, masks_dir = folder / "images", folder / "masks"
    if not folder.is_dir():
        raise InputError(f"{folder}: no such directory")
    if not images_dir.is_dir() or not masks_dir.is_dir():
        raise InputError(f"{folder}: not a labelled segmentation folder (needs images/ and masks/, Endoscapes' format)")
    images = sorted(p for p in images_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise InputError(f"{images_dir}: no .jpg or .png images")
    pairs = []
    for image in images:
        mask = masks_dir / f"{image.stem}.png"
        if not mask.is_file():
            raise InputError(f"{mask}: missing (every image needs its mask)")
        pairs.append((image, mask))
    return pairs


def _read(image: Path, mask: Path, classes: int, model: str) -> tuple[np.ndarray, np.ndarray]:
    frame = cv2.imread(str(image), cv2.IMREAD_COLOR)
    if frame is None:
        raise InputError(f"{image}: not an image OpenCV can decode")
    truth = cv2.imread(str(mask), cv2.IMREAD_UNCHANGED)
    if truth is None or truth.ndim != 2 or truth.dtype != np.uint8:
        raise InputError(f"{mask}: not an 8-bit single-channel mask")
    if truth.shape != frame.shape[:2]:
        raise InputError(f"{mask}: {truth.shape[1]}x{truth.shape[0]}, its image is {frame.shape[1]}x{frame.shape[0]}")
    unknown = sorted(set(np.unique(truth).tolist()) - set(range(classes)) - {IGNORE})
    if unknown:
        raise InputError(f"{mask}: class ids {', '.join(map(str, unknown))} are not classes of {model} "
                         f"(0..{classes - 1}, {IGNORE} ignored)")
    return frame, truth


def scored_model(model_set, task: Task, variant: str | Path | None):
    """The set's model for ``task``, or ``variant`` (a model folder for the same task and labels, e.g. its
    FP16 or INT8 version) to be scored in its place."""
    manifest = model_set.model(task)
    if variant is None:
        return manifest
    own, manifest = manifest, load_manifest(variant)
    if manifest.task != task or [lab.name for lab in manifest.labels] != [lab.name for lab in own.labels]:
        raise InputError(f"{variant}: not a variant of {own.name}: a {manifest.task} model with classes "
                         f"{', '.join(lab.name for lab in manifest.labels)}")
    return manifest


def evaluate_segmentation(folder: str | Path, models: str | None = None, out: str | Path | None = None,
                          log: Callable[[str], None] = print, variant: str | Path | None = None) -> SegmentationScores:
    """Scores the set's segmentation model, or ``variant`` (a model folder with the same classes, e.g.
    its FP16 or INT8 version) in its place, with the set's rules."""
    folder = Path(folder)
    pairs = _pairs(folder)
    model_set = load_model_set(models)
    manifest = scored_model(model_set, Task.SEGMENTATION, variant)
    names = tuple(lab.name for lab in manifest.labels)
    n = len(names)
    labelled = folder_classes(folder)
    if tuple(map(_plain, labelled)) != tuple(map(_plain, names)):
        raise InputError(f"{folder}: labelled with {', '.join(labelled)}; model {manifest.name} of set {model_set.name!r} "
                         f"has {', '.join(names)} (choose a set with the folder's classes: --models)")
    out_dir = Path(out) if out is not None else None
    if out_dir is not None:
        make_output_dir(out_dir / "class_maps")
    # the set's distance rules, judged per frame on the model's map as the live agent judges it and on the truth
    distance_rules = [r for r in load_rules(model_set.rules_file, vocabulary=model_set.outputs,
                                            owner=f"model set {model_set.name!r}") if r.kind == "distance_below"]
    held = {r.id: [0, 0, 0, 0] for r in distance_rules}  # on model, on truth, false alarms, missed
    assesses_cvs = "cvs" in manifest.extra
    ratings = read_ratings(folder) if assesses_cvs else {}
    cvs_prob: list[list[float]] = []
    cvs_truth: list[list[bool]] = []
    conf = np.zeros((n, n), np.int64)
    regions = [0, 0, 0, 0]  # right, right drawn, wrong, wrong drawn
    times, rows = [], []
    with OnnxRuntimeBackend(manifest, threads=1) as backend:
        stage = SegmentationStage(backend)
        for k, (image, mask) in enumerate(pairs, start=1):
            frame, truth = _read(image, mask, n, manifest.name)
            h, w = truth.shape
            area = detect_content_area(frame) or ContentArea.whole_frame(w, h)
            x = stage.pre_process(frame, area)
            t0 = time.perf_counter()
            logits = stage.predict(x)
            times.append(time.perf_counter() - t0)
            estimate = stage.post_process(logits, area)
            pred = paste_back(estimate.class_map, area, w, h)
            cw, ch = area.crop_size
            px_per_cell = float(np.sqrt(cw / estimate.class_map.shape[1] * ch / estimate.class_map.shape[0]))
            for r in distance_rules:
                on_model = distance_rule_holds(r, estimate.class_map, px_per_cell, estimate.confidence)
                on_truth = distance_rule_holds(r, truth)
                counts = held[r.id]
                counts[0] += on_model
                counts[1] += on_truth
                counts[2] += on_model and not on_truth
                counts[3] += on_truth and not on_model
            probabilities = dict(estimate.cvs)  # assessed by the stage, as in the live pipeline
            if probabilities and image.stem in ratings:
                cvs_prob.append([probabilities[c] for c in CRITERIA])
                cvs_truth.append([ratings[image.stem][c] >= 0.5 for c in CRITERIA])
            keep = truth != IGNORE
            conf += confusion(truth[keep], pred[keep], n)
            cells = np.bincount(estimate.class_map.ravel(), minlength=n)
            for c in np.flatnonzero(cells[1:] >= MIN_REGION_CELLS) + 1:
                on_it = truth[(pred == c) & keep]
                slot = 2 * (on_it.size == 0 or float(np.mean(on_it == c)) < 0.5)  # right or wrong
                regions[slot] += 1
                regions[slot + 1] += estimate.drawn(int(c))
            if out_dir is not None:
                if not cv2.imwrite(str(out_dir / "class_maps" / f"{image.stem}.png"), pred.astype(np.uint8)):
                    raise InputError(f"{out_dir / 'class_maps'}: cannot write the class map of {image.name}")
                fractions = np.bincount(pred.ravel(), minlength=n)[:n] / pred.size
                rows.append([image.stem, *(f"{probabilities[c]:.4f}" for c in CRITERIA if probabilities),
                             *(f"{v:.5f}" for v in fractions)])
            if k % 25 == 0 or k == len(pairs):
                log(f"  {k}/{len(pairs)} frames")
    cvs = ()
    if cvs_truth:
        t, p = np.array(cvs_truth), np.array(cvs_prob)
        cvs = tuple(CriterionScore(c, int(t[:, i].sum()), len(t), balanced_accuracy(t[:, i], p[:, i] >= 0.5),
                                   average_precision(t[:, i], p[:, i])) for i, c in enumerate(CRITERIA))
    conditions = tuple(ConditionCount(r.id, tuple(r.params["classes"]), float(r.params["threshold_px"]),
                                      float(r.params.get("min_class_confidence", 0.0)), *held[r.id])
                       for r in distance_rules)
    scores = SegmentationScores(manifest.name, len(pairs), names, tuple(per_class_iou(conf).tolist()),
                                tuple(per_class_dice(conf).tolist()), 1000 * float(np.median(times)), conditions, cvs,
                                DrawnRegions(stage.draw_min_confidence, *regions))
    if out_dir is not None:
        lines = [",".join(["image", *(CRITERIA if assesses_cvs else ()),
                           *(f"area_{name.lower().replace(' ', '_')}" for name in names)])]
        lines += [",".join(r) for r in rows]
        atomic_write_text(out_dir / "predictions.csv", "\n".join(lines) + "\n")
        log(f"wrote {out_dir / 'predictions.csv'} and {len(rows)} class maps in {out_dir / 'class_maps'}")
    return scores



def read_ratings(folder: Path) -> dict[str, dict[str, float]]:
    """``index.csv``'s CVS ratings per image (the raters' mean per criterion); empty without the file."""
    path = folder / "index.csv"
    if not path.is_file():
        return {}
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in ("image", *CRITERIA) if c not in (reader.fieldnames or ())]
        if missing:
            raise InputError(f"{path}: no column {missing[0]!r} (expected image, {', '.join(CRITERIA)})")
        try:
            return {row["image"]: {c: float(row[c]) for c in CRITERIA} for row in reader}
        except ValueError as exc:
            raise InputError(f"{path}: a rating is not a number ({exc})") from None
