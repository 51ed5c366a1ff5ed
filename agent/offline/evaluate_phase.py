"""``or-agent evaluate phase DIR``: a model set's phase model on labelled frames, in time order.

DIR is a folder of frames with a ``phase.csv`` (columns ``image``, ``second``, ``phase``: the frame's
file, its time in the video in seconds and its Cholec80 phase name; other columns are ignored), as
the CholecT50 key frames in ``cholect50-val/VIDnn/``, or a folder of such folders, one per video. Each
video's frames go through the set's phase stage as the live agent would run them: in time order, from
a fresh stage (recurrent state and temporal filter reset), each frame's endoscope content area
cropped (a dark frame keeps the last one found), the stage stepped at the frame's second. Key frames a
few seconds apart are fewer steps than the agent's 5 Hz, so the filter sees sparser evidence than live.

Per video and as the mean over videos (``pipelines.metrics.mean_over_videos``, as Cholec80's ``Main.m``
averages): frame accuracy of the model's own argmax ("raw") and of the phase shown after the temporal
filter; strict per-phase precision, recall and Jaccard of the shown phase; the official Cholec80
figures (``pipelines.metrics.official_phase_scores``); and the majority-class baseline (always the
phase most frequent in the frames evaluated). With ``--out``: ``predictions.csv`` (one row per frame)
and ``phase_eval.json`` (every figure; undefined ones null).
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from or_agent.agent.offline.evaluate import scored_model
from or_agent.pipelines.backends.onnxruntime import OnnxRuntimeBackend
from or_agent.pipelines.errors import InputError
from or_agent.pipelines.files import atomic_write_text, make_output_dir
from or_agent.pipelines.manifest import Task
from or_agent.pipelines.messages import PhaseEstimate
from or_agent.pipelines.metrics import (
    OFFICIAL_WINDOW_S,
    has_official_evaluation,
    mean_over_phases,
    mean_over_videos,
    official_phase_scores,
    phase_scores,
    rounded_figures,
)
from or_agent.pipelines.model_set import load_model_set
from or_agent.pipelines.preprocess import ContentAreaTracker
from or_agent.pipelines.stages import compose

PHASE_FILE = "phase.csv"
COLUMNS = ("image", "second", "phase")


@dataclass(frozen=True)
class LabelledFrame:
    image: Path
    second: float
    phase: int  # id into the phase model's labels


def video_folders(folder: Path) -> list[Path]:
    """``folder`` itself when it has a phase.csv, else its sub-folders that have one."""
    if not folder.is_dir():
        raise InputError(f"{folder}: no such directory")
    if (folder / PHASE_FILE).is_file():
        return [folder]
    videos = sorted(d for d in folder.iterdir() if d.is_dir() and (d / PHASE_FILE).is_file())
    if not videos:
        raise InputError(f"{folder}: no {PHASE_FILE} in it or in its folders (a folder of frames with {PHASE_FILE}: "
                         f"{', '.join(COLUMNS)}; or a folder of such folders, one per video)")
    return videos


def read_phase_csv(path: Path, names: tuple[str, ...], model: str) -> list[LabelledFrame]:
    """The labelled frames of one video, in time order (rows with the same second keep their order)."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot read ({getattr(exc, 'strerror', None) or exc})") from None
    reader = csv.DictReader(text.splitlines())
    missing = [c for c in COLUMNS if c not in (reader.fieldnames or ())]
    if missing:
        raise InputError(f"{path}: no column {missing[0]!r} (expected {', '.join(COLUMNS)})")
    ids = {name: i for i, name in enumerate(names)}
    frames = []
    for row in reader:
        n = reader.line_num
        values = {c: (row.get(c) or "").strip() for c in COLUMNS}
        empty = [c for c in COLUMNS if not values[c]]
        if empty:
            raise InputError(f"{path}:{n}: no {empty[0]} (expected {', '.join(COLUMNS)})")
        try:
            second = float(values["second"])
        except ValueError:
            second = math.nan
        if not math.isfinite(second) or second < 0:
            raise InputError(f"{path}:{n}: second {values['second']!r} is not a time in seconds (a number >= 0)")
        if values["phase"] not in ids:
            raise InputError(f"{path}:{n}: unknown phase {values['phase']!r} (the phases of {model}: {', '.join(names)})")
        image = path.parent / values["image"]
        if not image.is_file():
            raise InputError(f"{path}:{n}: image {values['image']!r}: no such file in {path.parent}")
        frames.append(LabelledFrame(image, second, ids[values["phase"]]))
    if not frames:
        raise InputError(f"{path}: no frames listed")
    return sorted(frames, key=lambda f: f.second)


@dataclass(frozen=True)
class PhaseEvaluation:
    """Every figure, rounded (``pipelines.metrics.rounded_figures``), as written to phase_eval.json."""

    report: dict

    def table(self) -> list[str]:
        r = self.report
        rows = [f"{r['model']} of set {r['model_set']!r}: {sum(v['frames'] for v in r['videos'])} frames "
                f"in {len(r['videos'])} videos; majority baseline: always {r['majority_phase']}"]
        if r["withheld"]:
            rows.append(f"  note: the set withholds this output from the display ({r['withheld']}); evaluated all the same")
        for v in r["videos"]:
            rows += _block(f"{v['video']} ({v['frames']} frames)", v, r["phases"])
        rows += _block(f"mean over {len(r['videos'])} videos (per phase over the videos that have it)", r["mean"], r["phases"])
        return rows


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.4f}"


def _block(title: str, scores: dict, phases: list[str]) -> list[str]:
    strict, official = scores["strict"], scores.get("official")
    rows = [title,
            f"  frame accuracy: shown {_fmt(strict['accuracy'])}, raw {_fmt(scores['raw_accuracy'])}; "
            f"majority baseline {_fmt(scores['majority_accuracy'])}"]
    if official is not None:
        rows.append(f"  official accuracy {_fmt(official['accuracy'])} (Cholec80's evaluation: in the first "
                    f"{official['window_s']:g} s of a phase the previous one counts as right, in its last the next)")
    head = f"  {'phase':<26} {'frames':>6}   {'strict: precision':>17} {'recall':>7} {'Jaccard':>7}"
    rows.append(head + (f"   {'official: precision':>19} {'recall':>7} {'Jaccard':>7}" if official is not None else ""))
    for name in phases:
        s, o = strict["per_phase"].get(name), (official or {}).get("per_phase", {}).get(name)
        frames = (s or o or {}).get("frames", 0)
        if s is None and not frames:
            continue
        s = s or {}
        line = (f"  {name:<26} {frames:>6}   {_fmt(s.get('precision')):>17} {_fmt(s.get('recall')):>7} "
                f"{_fmt(s.get('jaccard')):>7}")
        if official is not None:
            o = o or {}
            line += f"   {_fmt(o.get('precision')):>19} {_fmt(o.get('recall')):>7} {_fmt(o.get('jaccard')):>7}"
        rows.append(line)
    line = (f"  {'mean over phases':<26} {'':>6}   {_fmt(strict['precision']):>17} {_fmt(strict['recall']):>7} "
            f"{_fmt(strict['jaccard']):>7}")
    if official is not None:
        line += f"   {_fmt(official['precision']):>19} {_fmt(official['recall']):>7} {_fmt(official['jaccard']):>7}"
    rows.append(line)
    return rows


def _with_means(scores: dict) -> dict:
    """A video's scores with each figure's mean over the phases where it is defined."""
    return {**scores, **mean_over_phases(scores["per_phase"])}


def _seconds(value: float) -> str:
    return f"{value:.3f}".rstrip("0").rstrip(".")


def evaluate_phase(folder: str | Path, models: str | None = None, out: str | Path | None = None,
                   log: Callable[[str], None] = print, variant: str | Path | None = None) -> PhaseEvaluation:
    """Scores the set's phase model, or ``variant`` (a phase model folder with the same phases) in its place."""
    folder = Path(folder)
    videos = video_folders(folder)
    model_set = load_model_set(models)
    if not model_set.for_task(Task.PHASE):
        raise InputError(f"model set {model_set.name!r} has no phase model (choose a set with one: --models)")
    manifest = scored_model(model_set, Task.PHASE, variant)
    names = tuple(lab.name for lab in manifest.labels)
    labelled = {v: read_phase_csv(v / PHASE_FILE, names, manifest.name) for v in videos}  # every file checked first
    out_dir = Path(out) if out is not None else None
    if out_dir is not None:
        make_output_dir(out_dir)
    counts = np.bincount([f.phase for frames in labelled.values() for f in frames], minlength=len(names))
    majority = int(np.argmax(counts))
    official = has_official_evaluation(names)
    per_video, rows = [], []
    with OnnxRuntimeBackend(manifest, threads=1) as backend:
        stage = compose([backend]).one(Task.PHASE)
        assert stage is not None
        for video, frames in labelled.items():
            stage.reset()
            tracker = ContentAreaTracker(every=1)
            shown, raw = np.empty(len(frames), np.int64), np.empty(len(frames), np.int64)
            for k, f in enumerate(frames):
                frame = cv2.imread(str(f.image), cv2.IMREAD_COLOR)
                if frame is None:
                    raise InputError(f"{f.image}: not an image OpenCV can decode")
                estimate = stage(frame, tracker.update(frame), f.second)
                assert isinstance(estimate, PhaseEstimate)
                shown[k], raw[k] = estimate.phase, estimate.raw_phase
                rows.append([video.name, f.image.name, _seconds(f.second), names[estimate.phase],
                             names[estimate.raw_phase], f"{estimate.confidence:.4f}"])
                if (k + 1) % 25 == 0 or k + 1 == len(frames):
                    log(f"  {video.name}: {k + 1}/{len(frames)} frames")
            truth = np.array([f.phase for f in frames], np.int64)
            scores = {"video": video.name, "frames": len(frames), "raw_accuracy": float(np.mean(raw == truth)),
                      "majority_accuracy": float(np.mean(truth == majority)),
                      "strict": _with_means(phase_scores(truth, shown, names))}
            if official:
                seconds = np.array([f.second for f in frames])
                scores["official"] = _with_means(official_phase_scores(truth, shown, seconds, names))
            per_video.append(scores)
    mean: dict = {"videos": len(per_video),
                  "raw_accuracy": float(np.mean([v["raw_accuracy"] for v in per_video])),
                  "majority_accuracy": float(np.mean([v["majority_accuracy"] for v in per_video])),
                  "strict": mean_over_videos([v["strict"] for v in per_video])}
    if official:
        mean["official"] = {"window_s": OFFICIAL_WINDOW_S, **mean_over_videos([v["official"] for v in per_video])}
    withheld = dict(model_set.withheld).get(str(Task.PHASE))
    report = rounded_figures({
        "folder": str(folder), "model_set": model_set.name, "model": manifest.name, "model_version": manifest.version,
        "variant": str(variant) if variant is not None else None, "withheld": withheld, "phases": list(names),
        "majority_phase": names[majority],
        "videos": per_video, "mean": mean})
    if out_dir is not None:
        table = io.StringIO()
        writer = csv.writer(table, lineterminator="\n")
        writer.writerow(("video", "image", "second", "phase", "raw_phase", "confidence"))
        writer.writerows(rows)
        atomic_write_text(out_dir / "predictions.csv", table.getvalue())
        atomic_write_text(out_dir / "phase_eval.json", json.dumps(report, indent=1) + "\n")
        log(f"wrote {out_dir / 'predictions.csv'} and {out_dir / 'phase_eval.json'}")
    return PhaseEvaluation(report)
