"""``or-agent evaluate visibility``: a model set's visibility model (the gate) on groups of frames.

Each group is a list of PATHs, each a folder (walked recursively for images and videos; annotation
masks, i.e. anything under a folder named ``masks`` or ending in ``-masks``/``_masks``, are not
frames and are left out) or one image or video file; of a video every ``every``-th frame counts.
Every frame goes through the visibility stage as in the agent: an image's own content area (the
endoscope's circle, or the whole frame when too dark), a video's content area tracked as the live
pipeline tracks it, the model's crop, resize and normalisation, ONNX Runtime, and the stage's
threshold (``VisibilityEstimate``: out of body first; low visibility only when in body).

The groups say what the frames are, and the goals are judged on them:

- ``in-body``: none may be called out of body (false positives <= 0.5 %, the gate pauses the AI and
  redacts the picture on them)
- ``clear``: clear views; low visibility false positives <= 5 %
- ``smoky``: surgical smoke; recall of low visibility >= 0.8
- ``out-of-body``: the camera outside the patient; recall of out of body >= 0.95 (the project's
  own goal: no real out-of-body footage is distributed with the real data)

Without any PATH the real data folders (``$OR_AGENT_REAL_DATA``, else ``../shared/data/real`` beside
the repository) are used when present: every one of them as in-body, ``smoke/clear`` and the
Endoscapes frames (picked as clear views) as clear, ``smoke/smoky`` as smoky.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from or_agent.pipelines.backends.onnxruntime import OnnxRuntimeBackend
from or_agent.pipelines.errors import InputError
from or_agent.pipelines.manifest import MANIFEST_NAME, ModelManifest, Task, load_manifest
from or_agent.pipelines.messages import VisibilityEstimate
from or_agent.pipelines.model_set import load_model_set
from or_agent.pipelines.preprocess import ContentArea, ContentAreaTracker, detect_content_area
from or_agent.pipelines.runtime import PipelineConfig
from or_agent.pipelines.sources import VIDEO_SUFFIXES, VideoFileSource
from or_agent.pipelines.stages import VisibilityStage

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")
GROUPS = ("in-body", "clear", "smoky", "out-of-body")
REPOSITORY = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Goal:
    """A goal on one group: the share of its frames given a verdict, against a limit."""

    name: str
    group: str
    verdict: str  # "out of body" or "low visibility": what is counted
    rule: str  # "<=" or ">="
    limit: float

    def __post_init__(self):
        if self.group not in GROUPS or self.rule not in ("<=", ">=") or not 0.0 <= self.limit <= 1.0:
            raise ValueError(f"goal {self.name!r}: group one of {', '.join(GROUPS)}, rule <= or >=, limit in [0, 1]")


GOALS = (
    Goal("out-of-body false positives on in-body frames", "in-body", "out of body", "<=", 0.005),
    Goal("low-visibility false positives on clear frames", "clear", "low visibility", "<=", 0.05),
    Goal("smoke recall (low visibility on smoky frames)", "smoky", "low visibility", ">=", 0.8),
    Goal("out-of-body recall on out-of-body frames", "out-of-body", "out of body", ">=", 0.95),
)


@dataclass(frozen=True)
class SourceCounts:
    """One PATH of a group: its frames and how many the model called out of body or low visibility."""

    group: str
    source: str
    frames: int
    out_of_body: int
    low_visibility: int

    def __post_init__(self):
        if self.group not in GROUPS:
            raise ValueError(f"group must be one of {', '.join(GROUPS)}, got {self.group!r}")
        if not 0 <= self.out_of_body <= self.frames or not 0 <= self.low_visibility <= self.frames - self.out_of_body:
            raise ValueError(f"{self.source}: counts outside 0..{self.frames} frames")


@dataclass(frozen=True)
class GoalResult:
    goal: Goal
    frames: int
    hits: int

    def __post_init__(self):
        if not 0 <= self.hits <= self.frames:
            raise ValueError(f"{self.goal.name}: {self.hits} hits outside 0..{self.frames} frames")

    @property
    def rate(self) -> float | None:
        return self.hits / self.frames if self.frames else None

    @property
    def met(self) -> bool | None:
        """None when the goal's group has no frames."""
        rate = self.rate
        if rate is None:
            return None
        return rate <= self.goal.limit if self.goal.rule == "<=" else rate >= self.goal.limit

    def line(self) -> str:
        g = self.goal
        limit = f"{100 * g.limit:g} %" if g.rule == "<=" else f"{g.limit:g}"
        if self.rate is None:
            return f"  {g.name:<48} not measured (no {g.group} frames given), goal {g.rule} {limit}"
        value = f"{100 * self.rate:.2f} %" if g.rule == "<=" else f"{self.rate:.3f}"
        return (f"  {g.name:<48} {value} ({self.hits} of {self.frames}), goal {g.rule} {limit}: "
                f"{'met' if self.met else 'NOT MET'}")


@dataclass(frozen=True)
class VisibilityScores:
    model: str
    model_set: str
    threshold: float
    every: int
    sources: tuple[SourceCounts, ...]
    ms_per_frame: float  # the model call, ONNX Runtime on the CPU, one thread (median)
    note: str = ""  # where the frames came from when no PATH was given

    def totals(self, group: str) -> tuple[int, int, int]:
        """Frames, out of body, low visibility over the group's sources."""
        mine = [s for s in self.sources if s.group == group]
        return (sum(s.frames for s in mine), sum(s.out_of_body for s in mine), sum(s.low_visibility for s in mine))

    def goals(self) -> tuple[GoalResult, ...]:
        results = []
        for goal in GOALS:
            frames, oob, low = self.totals(goal.group)
            results.append(GoalResult(goal, frames, oob if goal.verdict == "out of body" else low))
        return tuple(results)

    @property
    def all_measured_goals_met(self) -> bool:
        return all(r.met is not False for r in self.goals())

    def table(self) -> list[str]:
        every = "every frame" if self.every == 1 else f"one frame in {self.every}"
        rows = [f"{self.model} (set {self.model_set}): threshold {self.threshold:g}, {self.ms_per_frame:.2f} ms per frame "
                f"(ONNX Runtime, CPU, 1 thread); videos: {every}"]
        for group in GROUPS:
            frames, oob, low = self.totals(group)
            if not frames:
                continue
            rows.append(f"  {group}: {_counts(frames, oob, low)}")
            rows += [f"    {s.source}: {_counts(s.frames, s.out_of_body, s.low_visibility)}"
                     for s in self.sources if s.group == group]
        rows.append("goals:")
        rows += [r.line() for r in self.goals()]
        return rows


def _counts(frames: int, out_of_body: int, low_visibility: int) -> str:
    return (f"{frames} frames, out of body {100 * out_of_body / frames:.2f} % ({out_of_body}), "
            f"low visibility {100 * low_visibility / frames:.2f} % ({low_visibility})")


def real_data_root() -> Path:
    return Path(os.environ.get("OR_AGENT_REAL_DATA") or REPOSITORY.parent / "shared" / "data" / "real")


def default_groups(root: Path | None = None) -> tuple[dict[str, list[Path]], str]:
    """The real data folders as groups (see the module doc), and a line saying which were used."""
    root = root or real_data_root()
    in_body = [root / n for n in ("endoscapes-seg50", "cholect50-val", "cholect50-clips", "cholec80-video01-clip",
                                  "cholec80-video01-frames", "smoke")]
    groups = {"in-body": [p for p in in_body if p.is_dir()],
              "clear": [p for p in (root / "smoke" / "clear", root / "endoscapes-seg50") if p.is_dir()],
              "smoky": [p for p in (root / "smoke" / "smoky",) if p.is_dir()]}
    if not any(groups.values()):
        raise InputError(f"no frames given (--in-body, --clear, --smoky, --out-of-body) and no real data at {root} "
                         "(set OR_AGENT_REAL_DATA to its folder)")
    said = "; ".join(f"{g}: {', '.join(p.relative_to(root).as_posix() for p in paths)}" for g, paths in groups.items() if paths)
    return groups, f"no PATH given: the real data in {root} ({said}; no out-of-body frames)"


def _is_mask_folder(name: str) -> bool:
    name = name.lower()
    return name == "masks" or name.endswith(("-masks", "_masks"))


def frame_files(path: Path) -> list[Path]:
    """The images and videos a PATH names: itself, or those in its folder tree (masks left out), sorted."""
    if path.is_dir():
        found = []
        for folder, dirs, files in os.walk(path):
            dirs[:] = sorted(d for d in dirs if not _is_mask_folder(d))
            found += [Path(folder) / f for f in sorted(files)
                      if Path(f).suffix.lower() in IMAGE_SUFFIXES + VIDEO_SUFFIXES and ".part" not in f]
        if not found:
            raise InputError(f"{path}: no images ({', '.join(IMAGE_SUFFIXES)}) or videos ({', '.join(VIDEO_SUFFIXES)}) "
                             "in it or its subfolders")
        return found
    if not path.exists():
        raise InputError(f"{path}: no such file or directory")
    if path.suffix.lower() not in IMAGE_SUFFIXES + VIDEO_SUFFIXES:
        raise InputError(f"{path}: not an image ({', '.join(IMAGE_SUFFIXES)}) or video ({', '.join(VIDEO_SUFFIXES)}) file")
    return [path]


def frames_of(file: Path, every: int) -> Iterator[tuple[np.ndarray, ContentArea]]:
    """A file's frames (of a video, every ``every``-th) with the content area the agent would use."""
    if file.suffix.lower() in IMAGE_SUFFIXES:
        frame = cv2.imread(str(file), cv2.IMREAD_COLOR)
        if frame is None:
            raise InputError(f"{file}: not an image OpenCV can decode")
        h, w = frame.shape[:2]
        yield frame, detect_content_area(frame) or ContentArea.whole_frame(w, h)
        return
    # as the live pipeline: the circle re-estimated every content_every frames, kept in between
    tracker = ContentAreaTracker(PipelineConfig().content_every)
    with VideoFileSource(file) as source:
        while (got := source.read()) is not None:
            area = tracker.update(got.image)
            if got.seq % every == 0:
                yield got.image, area
        errors = [e.message for e in source.drain_events() if e.kind == "error"]
    if errors:
        raise InputError(errors[0])


def visibility_model(models: str | os.PathLike | None) -> tuple[ModelManifest, str]:
    """The visibility model of the set ``models`` names, or the model in the folder it names; and the set's name."""
    if models is not None and (Path(models) / MANIFEST_NAME).is_file():
        manifest = load_manifest(Path(models))
        if manifest.task != Task.VISIBILITY:
            raise InputError(f"{models}: a {manifest.task.value} model, not a visibility model")
        manifest.verify_file()
        return manifest, f"model folder {models}"
    model_set = load_model_set(models)
    return model_set.model(Task.VISIBILITY), model_set.name


@dataclass
class _Runner:
    """The stage, with each file's estimates kept: a file in two groups is run once."""

    stage: VisibilityStage
    every: int
    times: list[float] = field(default_factory=list)
    done: dict[Path, list[VisibilityEstimate]] = field(default_factory=dict)

    def estimates(self, file: Path) -> list[VisibilityEstimate]:
        key = file.resolve()
        if key not in self.done:
            out = []
            for frame, area in frames_of(file, self.every):
                x = self.stage.pre_process(frame, area)
                t0 = time.perf_counter()
                raw = self.stage.predict(x)
                self.times.append(time.perf_counter() - t0)
                out.append(self.stage.post_process(raw))
            self.done[key] = out
        return self.done[key]


def evaluate_visibility(groups: dict[str, list[str | os.PathLike]] | None = None, models: str | os.PathLike | None = None,
                        every: int = 1, log: Callable[[str], None] = print) -> VisibilityScores:
    """Runs the visibility model of ``models`` over each group's PATHs (the real data folders when no
    group has any) and counts its verdicts per PATH."""
    if every < 1:
        raise InputError(f"--every must be at least 1, got {every}")
    unknown = sorted(set(groups or {}) - set(GROUPS))
    if unknown:
        raise InputError(f"unknown group {unknown[0]!r} (groups: {', '.join(GROUPS)})")
    given = {g: [Path(p) for p in paths] for g, paths in (groups or {}).items() if paths}
    note = ""
    if not given:
        given, note = default_groups()
        log(note)
    files = {(g, p): frame_files(p) for g, paths in given.items() for p in paths}  # every PATH checked before any runs
    manifest, set_name = visibility_model(models)
    counts = []
    with OnnxRuntimeBackend(manifest, threads=1) as backend:
        runner = _Runner(VisibilityStage(backend), every)
        for (group, path), names in files.items():
            estimates = [e for f in names for e in runner.estimates(f)]
            counts.append(SourceCounts(group, str(path), len(estimates), sum(e.out_of_body for e in estimates),
                                       sum(e.low_visibility for e in estimates)))
            log(f"read {path} ({group}): {len(estimates)} frames")
        threshold = runner.stage.threshold
    ms = 1000 * float(np.median(runner.times)) if runner.times else float("nan")
    return VisibilityScores(f"{manifest.name} {manifest.version}", set_name, threshold, every, tuple(counts), ms, note)
