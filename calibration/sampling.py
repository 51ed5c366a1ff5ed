"""Choosing calibration frames from recorded videos, and saying what they cover.

INT8 scales are only as good as the frames they were measured on: a set drawn from the first
minutes of one surgery never shows the model smoke, blood or the gallbladder in its bag. Frames
are prepared with the pipeline's own preprocessing (content-area tracker, the stage's crop,
resize and normalisation) and chosen:

- **stratified** where a video has labels next to it (``<name>-phase.txt`` or ``-phase.csv``,
  ``<name>-flags.csv``): the budget is spread over the (phase, visibility state) cells present, every
  phase and every visibility state first, then evenly, frames evenly spaced within a cell;
- **uniformly** (evenly spaced) where it has none.

Visibility states are ``in_body``, ``out_of_body`` and ``smoke_or_blur``. The pipeline never runs
the anatomy or phase model on out-of-body frames, so those are left out of their sets (the
coverage report says so); the visibility model gets all three. For a recurrent model (the phase
model) the FP32 model is stepped through each whole video at its step rate, as the pipeline
steps it, so every chosen frame comes with the recurrent state a real case would feed with it.

The coverage report (frames per phase, per visibility state and per video, and what is absent)
is printed by ``or-agent calibrate int8`` and stored in the INT8 model's manifest.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from or_agent.calibration.common import VISIBILITY_STATES, OutOfBodyJudge, VideoLabels, find_labels, iter_video, phase_steps, video_info
from or_agent.pipelines.errors import InputError
from or_agent.pipelines.manifest import ModelManifest
from or_agent.pipelines.preprocess import crop_resize, normalise
from or_agent.pipelines.surgery import PHASES

OOB = VISIBILITY_STATES.index("out_of_body")


@dataclass
class CalibrationFrame:
    video: str  # file name
    frame: int
    phase: int | None
    visibility: int | None  # index into VISIBILITY_STATES
    image: np.ndarray = field(repr=False)  # model-sized crop, uint8 BGR
    state: dict[str, np.ndarray] = field(default_factory=dict, repr=False)  # recurrent inputs at this step


@dataclass
class CalibrationSet:
    manifest: ModelManifest
    frames: list[CalibrationFrame]
    coverage: dict
    videos: list[str]

    def feeds(self) -> Iterator[dict[str, np.ndarray]]:
        """The model inputs, normalised as the manifest says, state included."""
        m = self.manifest
        for fr in self.frames:
            yield {m.input.name: normalise(fr.image, m.input_spec), **fr.state}


@dataclass(frozen=True)
class _Candidate:
    video: int
    frame: int
    phase: int | None
    vis: int | None


def _spaced(n_items: int, k: int) -> np.ndarray:
    """``k`` indices evenly spread over ``n_items`` (the middle of each of ``k`` equal runs)."""
    return np.floor((np.arange(k) + 0.5) * n_items / k).astype(np.int64)


def _allocate(cells: dict[tuple[int, int], int], budget: int) -> dict[tuple[int, int], int]:
    """Frames per (phase, visibility) cell: one for every phase and visibility state present first,
    then the rest spread evenly (water-filling: small cells take all they have)."""
    alloc = dict.fromkeys(cells, 0)
    cover: list[tuple[int, int]] = []
    for axis in (0, 1):
        for value in sorted({k[axis] for k in cells if k[axis] >= 0}):
            if any(k[axis] == value for k in cover):
                continue
            cover.append(max((k for k in cells if k[axis] == value), key=lambda k: cells[k]))
    for k in dict.fromkeys(cover):
        if budget - sum(alloc.values()) > 0:
            alloc[k] = 1
    remaining = budget - sum(alloc.values())
    while remaining > 0:
        open_cells = sorted((k for k in cells if alloc[k] < cells[k]), key=lambda k: cells[k] - alloc[k])
        if not open_cells:
            break
        share = max(1, remaining // len(open_cells))
        for k in open_cells:
            add = min(share, cells[k] - alloc[k], remaining)
            alloc[k] += add
            remaining -= add
            if remaining == 0:
                break
    return alloc


def select(candidates: Sequence[_Candidate], budget: int) -> list[int]:
    """Indices of the chosen candidates: stratified where labelled, evenly spaced where not."""
    labelled = [i for i, c in enumerate(candidates) if c.phase is not None or c.vis is not None]
    unlabelled = [i for i, c in enumerate(candidates) if c.phase is None and c.vis is None]
    budget = min(budget, len(candidates))
    if labelled and unlabelled:
        n_lab = int(round(budget * len(labelled) / len(candidates)))
        n_lab = min(len(labelled), max(1, min(budget - 1, n_lab)))
    else:
        n_lab = budget if labelled else 0
    chosen = [unlabelled[j] for j in _spaced(len(unlabelled), budget - n_lab)] if budget - n_lab > 0 else []
    cells: dict[tuple[int, int], list[int]] = {}
    for i in labelled:
        c = candidates[i]
        cells.setdefault((-1 if c.phase is None else c.phase, -1 if c.vis is None else c.vis), []).append(i)
    alloc = _allocate({k: len(v) for k, v in cells.items()}, n_lab)
    for k, members in cells.items():
        chosen += [members[j] for j in _spaced(len(members), alloc[k])]
    return sorted(chosen)


def coverage_report(frames: Sequence[CalibrationFrame], eligible: Sequence[_Candidate], videos: Sequence[str],
                    requested: int, recurrent: bool, oob_excluded: bool, oob_sources: dict[str, str]) -> dict:
    """What the chosen frames cover, and what they do not."""
    per_phase = dict.fromkeys(PHASES, 0)
    per_vis = dict.fromkeys(VISIBILITY_STATES, 0)
    per_video = dict.fromkeys(videos, 0)
    unlabelled_phase = unlabelled_vis = 0
    for fr in frames:
        per_video[fr.video] += 1
        if fr.phase is None:
            unlabelled_phase += 1
        else:
            per_phase[PHASES[fr.phase]] += 1
        if fr.visibility is None:
            unlabelled_vis += 1
        else:
            per_vis[VISIBILITY_STATES[fr.visibility]] += 1
    in_labels_phase = [PHASES[p] for p in sorted({c.phase for c in eligible if c.phase is not None})]
    in_labels_vis = [VISIBILITY_STATES[v] for v in sorted({c.vis for c in eligible if c.vis is not None})]
    any_labels = bool(in_labels_phase or in_labels_vis)
    all_labels = all(c.phase is not None or c.vis is not None for c in eligible)
    method = ("stratified by phase and visibility state" if all_labels and any_labels else
              "stratified where labelled, evenly spaced elsewhere" if any_labels else
              "evenly spaced (no labels next to the videos)")
    report = {
        "method": method,
        "frames": len(frames),
        "requested": requested,
        "per_phase": per_phase,
        "per_visibility": per_vis,
        "per_video": per_video,
        "frames_without_phase_label": unlabelled_phase,
        "frames_without_visibility_label": unlabelled_vis,
        "phases_in_labels": in_labels_phase,
        "visibility_in_labels": in_labels_vis,
        "absent_phases": [n for n, k in per_phase.items() if k == 0],
        "absent_visibility": [n for n, k in per_vis.items() if k == 0],
        "labelled_but_not_sampled": [n for n in in_labels_phase if per_phase[n] == 0]
                                    + [n for n in in_labels_vis if per_vis[n] == 0],
    }
    if oob_excluded:
        report["excluded"] = {"out_of_body": "the pipeline does not run this model on out-of-body frames",
                              "judged_by": oob_sources}
    if recurrent:
        report["recurrent_state"] = "from the FP32 model stepped through each whole video at its step rate"
    return report


def coverage_lines(cov: dict) -> list[str]:
    """The coverage report as printed lines."""
    lines = [f"calibration frames: {cov['frames']} of {cov['requested']} asked, {cov['method']}"]
    lines.append("  per phase:      " + ", ".join(f"{k} {v}" for k, v in cov["per_phase"].items()))
    lines.append("  per visibility: " + ", ".join(f"{k} {v}" for k, v in cov["per_visibility"].items()))
    if cov["frames_without_phase_label"] or cov["frames_without_visibility_label"]:
        lines.append(f"  unlabelled:     {cov['frames_without_phase_label']} without phase, "
                     f"{cov['frames_without_visibility_label']} without visibility state")
    lines.append("  per video:      " + ", ".join(f"{k} {v}" for k, v in cov["per_video"].items()))
    absent = cov["absent_phases"] + cov["absent_visibility"]
    lines.append("  absent:         " + (", ".join(absent) if absent else "none"))
    if cov["labelled_but_not_sampled"]:
        lines.append("  in the labels but not sampled (too few frames asked): " + ", ".join(cov["labelled_but_not_sampled"]))
    if "excluded" in cov:
        lines.append("  excluded:       out_of_body (" + cov["excluded"]["out_of_body"] + ")")
    return lines


def _frame_count(video: Path, labels: VideoLabels) -> int:
    _, count = video_info(video)
    if labels.frames:
        return labels.frames
    if count > 0:
        return count
    import cv2

    cap = cv2.VideoCapture(str(video))
    n = 0
    while cap.grab():
        n += 1
    cap.release()
    return n


def sample_frames(videos: Sequence[Path], manifest: ModelManifest, frames: int, models_dir=None,
                  log: Callable[[str], None] | None = None) -> CalibrationSet:
    """Calibration frames for ``manifest``'s model from ``videos`` (see the module docstring)."""
    if frames < 1:
        raise InputError(f"--frames must be at least 1, got {frames}")
    say = log or (lambda s: None)
    names = [v.name for v in videos]
    if len(set(names)) != len(names):
        raise InputError("--videos: two videos have the same file name; calibration records videos by name")
    recurrent = bool(manifest.state_inputs)
    exclude_oob = manifest.task in ("segmentation", "phase")
    spec = manifest.input_spec
    labels = [find_labels(v) for v in videos]
    oob_sources: dict[str, str] = {}
    eligible: list[_Candidate] = []
    chosen_frames: list[CalibrationFrame] = []

    if recurrent:
        from or_agent.pipelines.backends.onnxruntime import OnnxRuntimeBackend

        backend = OnnxRuntimeBackend(manifest, threads=1, verify=False)
        pool: list[tuple[_Candidate, np.ndarray, dict]] = []
        judge = OutOfBodyJudge(None, models_dir)
        try:
            for vi, (video, lab) in enumerate(zip(videos, labels)):
                judge.labels = lab
                fps = video_info(video)[0]
                n0 = len(pool)
                for step in phase_steps(video, backend, judge, fps):
                    c = _Candidate(vi, step.frame, lab.phase_at(step.frame), lab.visibility_at(step.frame))
                    pool.append((c, step.image, step.state))
                oob_sources[video.name] = judge.source
                say(f"  {video.name}: {len(pool) - n0} phase steps (at {manifest.cadence}, "
                    f"out-of-body judged by {judge.source})")
        finally:
            backend.close()
        eligible = [c for c, _, _ in pool]
        for i in select(eligible, frames):
            c, img, state = pool[i]
            chosen_frames.append(CalibrationFrame(videos[c.video].name, c.frame, c.phase, c.vis, img, state))
    else:
        for vi, (video, lab) in enumerate(zip(videos, labels)):
            n = _frame_count(video, lab)
            if n == 0:
                raise InputError(f"{video}: no frames could be read from the video")
            for f in range(n):
                vis = lab.visibility_at(f)
                if exclude_oob and vis == OOB:
                    continue
                eligible.append(_Candidate(vi, f, lab.phase_at(f), vis))
            if exclude_oob:
                oob_sources[video.name] = "flags" if lab.visibility is not None else "not judged (no flags)"
        picks = [eligible[i] for i in select(eligible, frames)]
        for vi, video in enumerate(videos):
            wanted = {c.frame: c for c in picks if c.video == vi}
            got = 0
            if wanted:
                last = max(wanted)
                for f, frame, area in iter_video(video):
                    c = wanted.get(f)
                    if c is not None:
                        img = crop_resize(frame, area, spec.height, spec.width)
                        chosen_frames.append(CalibrationFrame(video.name, f, c.phase, c.vis, img))
                        got += 1
                    if f >= last:
                        break
            else:
                next(iter_video(video), None)  # still refuse a video without frames
            say(f"  {video.name}: {got} frames taken")
    if not chosen_frames:
        raise InputError("no calibration frames could be taken from " + ", ".join(names))
    cov = coverage_report(chosen_frames, eligible, names, frames, recurrent, exclude_oob, oob_sources)
    return CalibrationSet(manifest, chosen_frames, cov, names)
