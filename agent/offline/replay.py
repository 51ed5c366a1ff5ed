"""``or-agent replay``: run the pipeline over recorded surgeries and write what a team reviews.

Per video, in ``OUT/<video name>/``:

- ``annotated.mp4``   the video with the overlays burned in (out-of-body frames redacted and paused, frames of
  a scene the models do not know paused):
  H.264 that a browser plays, at most ``video_height`` tall (odd sizes padded by a pixel); none with
  ``video="none"``
- ``timeline.csv`` / ``timeline.json``  one row per phase step: phase, probabilities, visibility, why the AI
  was paused (``ai_paused``: "camera out of body", "unfamiliar scene" or empty), anatomy areas (and the
  true phase when labels are known)
- ``phase_ribbon.png``  recognised phases over time, above the ground truth when labels are known
- ``alerts.csv``  every alert the decision-support rules raised and cleared, with its evidence
- ``report.html`` / ``summary.json``  the figures: phase accuracy, per-phase precision, recall, F1
  and Jaccard (strict, then the official Cholec80 evaluation's, ``pipelines.metrics``), per-class IoU and Dice with masks,
  throughput and latency, source events

Labels are found next to each video when not given: ``<name>-phase.txt`` (Cholec80) or
``<name>-phase.csv``, and masks in ``masks/<name>/frameNNNNNN.png``. Every file is written under a
temporary name and renamed when complete. One video failing is reported and the others go on.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from or_agent.agent.build_info import build_record
from or_agent.agent.offline.progress import Progress
from or_agent.agent.offline.report import phase_ribbon, write_html_report, write_png
from or_agent.agent.session import LoadedModels
from or_agent.pipelines.errors import InputError, OrAgentError
from or_agent.pipelines.files import atomic_write_text, output_dir, refuse_file_in_the_way
from or_agent.pipelines.manifest import Task
from or_agent.pipelines.messages import PAUSED_REASONS, FrameResult, SourceEvent
from or_agent.pipelines.metrics import (
    confusion,
    has_official_evaluation,
    mean_iou_present,
    official_phase_scores,
    per_class_dice,
    per_class_iou,
    phase_scores,
    rounded_figures,
)
from or_agent.pipelines.overlay import AlertBanner, OverlayRenderer
from or_agent.pipelines.preprocess import paste_back
from or_agent.pipelines.rules import AlertTransition, Rule, RulesEngine
from or_agent.pipelines.runtime import PipelineConfig
from or_agent.pipelines.sinks import QueuedSubscriber
from or_agent.pipelines.sources import VideoFileSource, video_files
from or_agent.pipelines.video_out import MIN_VIDEO_HEIGHT, H264Writer, video_size
from or_agent.synth.dataset import read_phase_file


@dataclass(frozen=True)
class ReplayInputs:
    video: Path
    labels: Path | None
    masks: Path | None


def expand_inputs(paths: Sequence[str], labels: str | None, masks: str | None) -> list[ReplayInputs]:
    """Videos named directly or found in directories, each with its labels and masks."""
    videos = video_files(paths, must_exist=False)  # a missing or bad file is reported when its turn comes
    if labels and len(videos) > 1:
        raise InputError("--labels names one phase file, so give exactly one video (or put <name>-phase.txt next to each)")
    if masks and not Path(masks).is_dir():
        raise InputError(f"{masks}: no such masks folder (--masks: a folder of frameNNNNNN.png masks, "
                         "or of one such folder per video, named as the video)")
    out = []
    for v in videos:
        lab = Path(labels) if labels else next((c for c in (v.with_name(f"{v.stem}-phase.txt"), v.with_name(f"{v.stem}-phase.csv"))
                                                if c.is_file()), None)
        if masks:
            m = Path(masks)
            m = m / v.stem if (m / v.stem).is_dir() else m
        else:
            m = v.parent / "masks" / v.stem
            m = m if m.is_dir() else None
        out.append(ReplayInputs(v, lab, m))
    return out


class _Collector:
    """Everything replay keeps per frame: small numbers only, so memory stays flat."""

    def __init__(self, n_classes: int, masks: Path | None):
        self.phase: list[int] = []
        self.seq: list[int] = []
        self.oob: list[bool] = []
        self.paused_frames: dict[str, int] = dict.fromkeys(PAUSED_REASONS, 0)  # frames paused, by reason
        self.rows: list[dict] = []
        self.masks = masks
        # The labelled frames, listed once: the publish thread must not stat a file per frame.
        self.mask_frames_available = ({int(p.stem[5:]) for p in masks.glob("frame*.png") if p.stem[5:].isdigit()}
                                      if masks is not None else set())
        self.conf = np.zeros((n_classes, n_classes), np.int64)
        self.mask_frames = 0
        self.events: list[SourceEvent] = []
        self.area_sum = np.zeros(n_classes)
        self.area_frames = 0

    def on_result(self, r: FrameResult) -> None:
        self.seq.append(r.seq)
        self.phase.append(-1 if r.phase is None else r.phase.phase)
        self.oob.append(r.out_of_body)
        paused = r.paused_reason
        if paused is not None:
            self.paused_frames[paused] += 1
        seg = r.segmentation
        fractions = seg.frame_fractions(r.frame_size) if seg is not None else ()
        if seg is not None and r.segmentation_fresh:
            self.area_sum += np.asarray(fractions)
            self.area_frames += 1
        if r.phase_fresh or (r.out_of_body and r.seq % 5 == 0):
            row = {"frame": r.seq, "time_s": round(r.media_ms / 1000.0, 3),
                   "phase": r.phase.name if r.phase else "", "phase_id": r.phase.phase if r.phase else -1,
                   "confidence": round(r.phase.confidence, 4) if r.phase else 0.0,
                   "time_in_phase_s": round(r.phase.time_in_phase_s, 2) if r.phase else 0.0,
                   "out_of_body": int(r.out_of_body),
                   "low_visibility": int(bool(r.visibility and r.visibility.low_visibility)),
                   "p_out_of_body": round(r.visibility.p_out_of_body, 4) if r.visibility else 0.0,
                   "p_low_visibility": round(r.visibility.p_low_visibility, 4) if r.visibility else 0.0,
                   "ai_paused": paused or "",
                   "probabilities": [round(p, 4) for p in r.phase.probabilities] if r.phase and r.phase_fresh else [],
                   "anatomy_area": [round(a, 5) for a in fractions],
                   # image-level outputs (the CVS criteria): the archive's cohort report reads them
                   "classifications": {label: round(p, 4) for c in r.classifications for label, p in c.items()}}
            self.rows.append(row)
        if r.seq in self.mask_frames_available:
            truth = cv2.imread(str(self.masks / f"frame{r.seq:06d}.png"), cv2.IMREAD_UNCHANGED)
            if truth is not None and truth.shape[:2] == (r.frame_size[1], r.frame_size[0]):
                pred = np.zeros(truth.shape[:2], np.uint8)
                if seg is not None:
                    pred = paste_back(seg.class_map, seg.area, r.frame_size[0], r.frame_size[1])
                self.conf += confusion(np.minimum(truth, self.conf.shape[0] - 1), pred, self.conf.shape[0])
                self.mask_frames += 1


def _alerts_csv(events: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["frame", "time_s", "rule", "severity", "event", "message", "evidence"])
    for e in events:
        w.writerow([e["frame"], e["time_s"], e["rule"], e["severity"], e["event"], e["message"],
                    "; ".join(f"{k}={v}" for k, v in e["evidence"].items())])
    return buf.getvalue()


VIDEO_CHOICES = ("annotated", "none")
DEFAULT_VIDEO_HEIGHT = 720  # taller sources are recorded scaled down: 1080p at full size cannot keep up on 2 cores


def _timeline_csv(rows: list[dict], phase_names: Sequence[str], class_names: Sequence[str], truth: np.ndarray | None) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    header = ["frame", "time_s", "phase", "phase_id", "confidence", "time_in_phase_s", "out_of_body", "low_visibility",
              "p_out_of_body", "p_low_visibility", "ai_paused"]
    fixed = len(header)
    header += [f"p_{n}" for n in phase_names] + [f"area_{n}" for n in class_names]
    if truth is not None:
        header.append("true_phase")
    w.writerow(header)
    for r in rows:
        probs = r["probabilities"] or [""] * len(phase_names)
        areas = r["anatomy_area"] or [""] * len(class_names)
        line = [r[k] for k in header[:fixed]] + list(probs) + list(areas)
        if truth is not None:
            line.append(phase_names[truth[r["frame"]]] if r["frame"] < len(truth) else "")
        w.writerow(line)
    return buf.getvalue()


@dataclass(frozen=True)
class ReplayResult:
    summary: dict
    phase_per_frame: np.ndarray  # filtered phase id per frame (-1 before the first step)
    out_of_body: np.ndarray  # per frame
    truth: np.ndarray | None  # phase labels, when known
    mean_area: np.ndarray  # per class, mean fraction of the frame over in-body frames


def _rules_for(video: Path, models: LoadedModels, rules_file: str | None, time_scale: float | None) -> list[Rule]:
    """The rules, with the phase-duration limits scaled for a time-compressed (synthetic) video: from
    ``time_scale`` if given, else from the video's generator metadata (``<name>.json``)."""
    if time_scale is None:
        meta = video.with_suffix(".json")
        try:
            time_scale = float(json.loads(meta.read_text()).get("time_scale", 1.0)) if meta.is_file() else 1.0
        except (ValueError, OSError, AttributeError):
            time_scale = 1.0
    return models.rules(rules_file, overrides={"phase_too_long": {"time_scale": time_scale}})


class _AlertTimeline:
    """Rule transitions during a replay, and the banners active at each frame."""

    def __init__(self, rules: list[Rule]):
        self.engine = RulesEngine(rules, self._on)
        self.events: list[dict] = []
        self.active: dict[str, AlertBanner] = {}

    def _on(self, t: AlertTransition) -> None:
        self.events.append({"frame": t.seq, "time_s": round(t.t_s, 3), "rule": t.rule, "severity": t.severity,
                            "event": t.kind, "message": t.message, "evidence": t.evidence})
        if t.kind == "raised":
            self.active[t.rule] = AlertBanner(t.severity, t.message)
        else:
            self.active.pop(t.rule, None)

    def on_result(self, r: FrameResult) -> None:
        self.engine.on_result(r)

    def banners(self) -> list[AlertBanner]:
        order = {"critical": 0, "warning": 1, "info": 2}
        return sorted(self.active.values(), key=lambda b: order[b.severity])


@contextlib.contextmanager
def opencv_single_threaded() -> Iterator[None]:
    """OpenCV's calls on one thread each while the block runs (the setting is the process's; restored after).

    An unpaced replay keeps every core busy with threads of its own (decoder, one per pipeline stage,
    overlay, encoder); OpenCV splitting a resize across its pool then adds only hand-offs, and a pool
    thread that waits for a busy core. Measured, it is no worse and at most a little better: 0.98-1.00x the
    CPU per 854x480 frame in three runs of ``python -m bench.cpu_paths_bench`` (section 9)."""
    before = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        yield
    finally:
        cv2.setNumThreads(before)


def replay_one(item: ReplayInputs, out_root: Path, models: LoadedModels, paced: bool, anatomy_every: int | None,
               progress_label: str, rules_file: str | None = None, time_scale: float | None = None,
               video_out: str = "annotated", video_height: int | None = DEFAULT_VIDEO_HEIGHT) -> ReplayResult:
    video = item.video
    truth = read_phase_file(item.labels) if item.labels else None
    source = VideoFileSource(video, paced=paced)
    source.start()  # opens and checks the file now, so a bad one fails before anything is written
    out_dir = out_root / video.stem
    out_dir.mkdir(parents=True, exist_ok=True)
    fps = source.nominal_fps or 25.0
    total = source.frame_count or 0
    pipeline = models.pipeline(source, PipelineConfig(anatomy_every=anatomy_every or 0))
    overlay = OverlayRenderer.for_models(models.model_set.models)
    # the label masks and the timeline's areas are the set's first segmentation model's; the phase its phase model's
    segmentation, phase_model = models.stages.one(Task.SEGMENTATION), models.stages.one(Task.PHASE)
    class_names = list(segmentation.names) if segmentation is not None else []
    names = phase_model.names if phase_model is not None else ()
    collector = _Collector(max(1, len(class_names)), item.masks if segmentation is not None else None)
    alerts = _AlertTimeline(_rules_for(video, models, rules_file, time_scale))
    bar = Progress(progress_label, total or 1)
    recording = H264Writer(out_dir / "annotated.mp4", fps, max_height=video_height) if video_out == "annotated" else None

    def record(item) -> None:
        r, banners = item
        # drawn after scaling to the recording's size: fewer pixels to blend than at the source's
        size = video_size(r.frame_size[0], r.frame_size[1], video_height)
        img = r.image if size == r.frame_size else cv2.resize(r.image, size, interpolation=cv2.INTER_LINEAR)
        recording.write(overlay.draw(img, r, banners), r.seq)
        bar.update(r.seq + 1)

    pipeline.subscribe(alerts.on_result)  # first: the frame's banners include what it raised
    pipeline.subscribe(collector.on_result)
    if recording is not None:
        # drawing on its own thread, encoding on the writer's: both overlap with the pipeline
        recorder = QueuedSubscriber(record, maxsize=4, name="recorder")
        pipeline.subscribe(lambda r: recorder((r, alerts.banners())))
    else:
        pipeline.subscribe(lambda r: bar.update(r.seq + 1))
    pipeline.subscribe_events(collector.events.append)
    ok = False
    try:
        if recording is not None:
            recording.start()
            recorder.start()
        with contextlib.nullcontext() if paced else opencv_single_threaded():
            pipeline.run()
        if recording is not None:
            recorder.stop()
        ok = True
    finally:
        if recording is not None:
            if not ok:
                try:
                    recorder.stop()
                except Exception:
                    pass
            recording.close(commit=ok and bool(collector.seq))
        bar.close()
    if not collector.seq:
        raise InputError(f"{video}: no frame could be decoded")
    stats = pipeline.stats()
    errors = [e for e in collector.events if e.kind == "error"]
    options = {"paced": paced, "anatomy_every": anatomy_every or 0, "rules_file": rules_file or "",
               "time_scale": time_scale, "video": video_out, "video_height": video_height}
    pred = np.array(collector.phase, np.int64)
    seq = np.array(collector.seq, np.int64)
    summary = {
        # frames the pipeline processed; the duration is the media's (a paced replay may drop frames)
        "video": str(video), "frames": len(seq), "fps": fps, "duration_s": float((int(seq.max()) + 1) / fps),
        "fps_processed": round(stats["fps_out"], 2), "frames_dropped": stats["frames_dropped_source"],
        "latency_ms": stats["latency_ms"]["end_to_end"], "stage_latency_ms": stats["latency_ms"],
        "out_of_body_frames": int(np.sum(collector.oob)),
        # media time the overlay was paused, by reason (out of body, a scene the models do not know)
        "paused_s": {reason: round(n / fps, 3) for reason, n in collector.paused_frames.items()},
        "models": {m.name: {"task": str(m.task), "version": m.version, "sha256": m.sha256} for m in models.model_set.models},
        "events": [{"kind": e.kind, "message": e.message, "seq": e.seq} for e in collector.events],
        "complete": not errors,
        "alerts": alerts.events,
        "annotated_video": ({"file": recording.path.name, "codec": "h264", "encoder": recording.encoder,
                             "size": list(recording.size or ()), "frames": recording.frames}
                            if recording is not None else None),
        # what produced these figures: two summaries with the same three are comparable
        **build_record(models.model_set, options), "replay_options": options,
    }
    if truth is not None and phase_model is not None:
        keep = seq < len(truth)
        t, p = truth[seq[keep]], pred[keep]
        phase_metrics = {"labels": str(item.labels), "strict": phase_scores(t, p, names)}
        if has_official_evaluation(names):
            phase_metrics["official"] = official_phase_scores(t, p, seq[keep] / fps, names)
        summary["phase_metrics"] = rounded_figures(phase_metrics)
    if collector.mask_frames:
        iou, dice = per_class_iou(collector.conf), per_class_dice(collector.conf)
        present = collector.conf.sum(1) > 0
        summary["anatomy_metrics"] = {
            "masks": str(item.masks), "frames": collector.mask_frames, "miou": round(mean_iou_present(collector.conf), 4),
            "per_class": {class_names[c]: {"iou": round(float(iou[c]), 4), "dice": round(float(dice[c]), 4)}
                          for c in np.flatnonzero(present)}}
    truth_aligned = truth[:len(pred)] if truth is not None else None
    if phase_model is not None:
        colours = [tuple(lab.color) for lab in phase_model.manifest.labels]
        write_png(out_dir / "phase_ribbon.png", phase_ribbon(pred, truth_aligned, names, colours, fps))
    atomic_write_text(out_dir / "timeline.csv", _timeline_csv(collector.rows, names, class_names, truth))
    atomic_write_text(out_dir / "timeline.json", json.dumps({"video": str(video), "fps": fps, "phases": names,
                                                             "classes": class_names, "rows": collector.rows,
                                                             "alerts": alerts.events}) + "\n")
    atomic_write_text(out_dir / "alerts.csv", _alerts_csv(alerts.events))
    atomic_write_text(out_dir / "summary.json", json.dumps(summary, indent=1) + "\n")
    write_html_report(out_dir / "report.html", summary, "phase_ribbon.png", video.name,
                      recording.path.name if recording is not None else None)
    return ReplayResult(summary, pred, np.array(collector.oob), truth_aligned,
                        collector.area_sum / max(1, collector.area_frames))


def run_replay(paths: Sequence[str], out: str, labels: str | None = None, masks: str | None = None,
               paced: bool = False, anatomy_every: int | None = None, models_dir=None, rules_file: str | None = None,
               time_scale: float | None = None, video_out: str = "annotated",
               video_height: int | None = DEFAULT_VIDEO_HEIGHT) -> int:
    out_root = Path(out)
    if video_out not in VIDEO_CHOICES:
        raise InputError(f"--video must be one of {', '.join(VIDEO_CHOICES)}, got {video_out!r}")
    if video_height is not None and video_height < MIN_VIDEO_HEIGHT:
        raise InputError(f"--video-height must be at least {MIN_VIDEO_HEIGHT}, got {video_height}")
    refuse_file_in_the_way(out_root)
    items = expand_inputs(paths, labels, masks)
    # made once up front, not as each video's failure; not left behind empty when no video could be replayed;
    # the models loaded once and reused for every video
    with output_dir(out_root), LoadedModels(models_dir, live_session=False) as models:
        models.rules(rules_file)  # a bad rules file is one error up front, not one per video
        failed = 0
        for i, item in enumerate(items, start=1):
            label = f"[{i}/{len(items)}] {item.video.name}"
            try:
                s = replay_one(item, out_root, models, paced, anatomy_every, label, rules_file, time_scale,
                               video_out, video_height).summary
            except OrAgentError as exc:
                failed += 1
                print(f"FAILED {item.video}: {exc}")
                continue
            except Exception as exc:
                failed += 1
                print(f"FAILED {item.video}: internal error: {type(exc).__name__}: {exc}")
                continue
            print(f"ok     {item.video} -> {out_root / item.video.stem}/report.html: {_outcome(s)}")
        print(f"{len(items) - failed} of {len(items)} videos replayed" + (f", {failed} failed" if failed else ""))
        return 1 if failed else 0


def _outcome(s: dict) -> str:
    """One video's summary in a line: frames and rate, its scores where it had labels, alerts, and what
    cut it short."""
    parts = [f"{s['frames']} frames at {s['fps_processed']:.0f} fps"]
    if "phase_metrics" in s:
        ph = s["phase_metrics"]
        parts.append(f"phase accuracy {100 * ph['strict']['accuracy']:.1f} %"
                     + (f" (official {100 * ph['official']['accuracy']:.1f} %)" if "official" in ph else ""))
    if "anatomy_metrics" in s:
        parts.append(f"anatomy mIoU {s['anatomy_metrics']['miou']:.3f}")
    raised = [a for a in s["alerts"] if a["event"] == "raised"]
    parts.append(f"{len(raised)} alerts")
    if not s["complete"]:
        parts.append("INCOMPLETE: " + "; ".join(e["message"] for e in s["events"] if e["kind"] == "error"))
    return ", ".join(parts)
