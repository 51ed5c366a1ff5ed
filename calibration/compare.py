"""FP32 vs FP16 vs INT8 on held-out video: what a precision costs, per model.

Every model runs as the pipeline runs it (content-area tracker, the stage's preprocessing, ONNX
Runtime on the CPU with one thread), over the same decoded frames:

- **anatomy**: mean IoU against the ground-truth masks (frame coordinates, classes present in the
  truth, as ``models/evaluate.py``) and **agreement** with the FP32 model (mean IoU of the class
  maps taking FP32's as the truth, and the share of equal pixels), on the frames that have masks
  (every 25th frame when a video has none);
- **phase**: frame accuracy against the phase labels after the temporal filter (``PhaseStage``,
  filtered phase held between 5 Hz steps), raw accuracy, and agreement of the filtered phase with
  FP32's per frame. Steps skip out-of-body frames as the pipeline does, judged the same way for
  every model (the flags, else the FP32 visibility model), so only the phase model differs;
- **visibility**: agreement of both decisions (out of body, low visibility) with FP32's per step,
  and out-of-body recall and low-visibility accuracy against the flags;
- **ms/frame**: median time of the model call (``predict``), ONNX Runtime, 1 thread.

The figures are printed as a table and stored in each converted model's manifest under
``metrics.precision_comparison`` (with the FP32 reference's figures from the same run beside them).
The FP32 manifests are not modified.

The default held-out video is the first of ``synth.splits.HELD_OUT`` (seed 2, time scale
1/25), the surgery the models' held-out figures come from; it is taken from ``data/`` when the
training set-up generated it there, and otherwise generated into ``.cache/calibration/``.
"""

from __future__ import annotations

import datetime
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from or_agent.calibration.common import OutOfBodyJudge, find_labels, iter_video, list_videos, precision_of, update_manifest, video_info
from or_agent.pipelines.backends.onnxruntime import OnnxRuntimeBackend, cpu_int8_kernels
from or_agent.pipelines.errors import InputError
from or_agent.pipelines.manifest import MANIFEST_NAME, ModelManifest, Task, load_manifest, resolve_models_dir
from or_agent.pipelines.metrics import accuracy, confusion, mean_iou_present, recall
from or_agent.pipelines.preprocess import paste_back
from or_agent.pipelines.schedule import Cadence, frame_stepper
from or_agent.pipelines.stages import STAGES, PhaseStage

TASK_ORDER = ("segmentation", "phase", "visibility")
PRECISION_ORDER = {"fp32": 0, "fp16": 1, "int8": 2}
DEFAULT_VARIANT_DIRS = (Path("out") / "models-fp16", Path("out") / "models-int8")
ANATOMY_EVERY_WITHOUT_MASKS = 25
CACHE = Path(__file__).resolve().parent.parent / ".cache" / "calibration"
DATA = Path(__file__).resolve().parent.parent / "data"  # where models.training keeps its datasets


# -- which models ------------------------------------------------------------------------------

def _manifests_in(path: Path) -> list[ModelManifest]:
    if (path / MANIFEST_NAME).is_file():
        return [load_manifest(path / MANIFEST_NAME)]
    if path.is_dir():
        found = sorted(path.glob(f"*/{MANIFEST_NAME}"))
        if found:
            return [load_manifest(p) for p in found]
        raise InputError(f"{path}: no model here (neither manifest.json nor */manifest.json)")
    raise InputError(f"{path}: no such models directory")


@dataclass
class Pairing:
    task: str
    reference: ModelManifest  # FP32
    variants: list[ModelManifest]  # converted models compared against it
    notes: list[str] = field(default_factory=list)


def pair_models(model_paths: Sequence[str | Path] | None, models_dir=None) -> list[Pairing]:
    """Group the models to compare by task, each with its FP32 reference.

    ``model_paths`` are model folders or models directories; by default the FP32 models of
    ``models_dir`` (the bundled ones) and ``out/models-fp16`` / ``out/models-int8`` where they exist.
    A task without an FP32 model among them takes it from ``models_dir``.
    """
    ref_root = resolve_models_dir(models_dir)
    if model_paths:
        manifests = [m for p in model_paths for m in _manifests_in(Path(p))]
    else:
        manifests = _manifests_in(ref_root) + [m for d in DEFAULT_VARIANT_DIRS if d.is_dir() for m in _manifests_in(d)]
    seen, unique = set(), []
    for m in manifests:
        if m.path.resolve() not in seen:
            seen.add(m.path.resolve())
            unique.append(m)
    fp32_pool = [m for m in unique if precision_of(m) == "fp32"]
    fallback = [m for m in (_manifests_in(ref_root) if ref_root.is_dir() else []) if precision_of(m) == "fp32"]
    pairings: dict[tuple[str, str], Pairing] = {}
    for m in unique:
        m.verify_file()
        if precision_of(m) == "fp32":
            continue
        src = (m.extra.get("calibration") or {}).get("source_model", {})
        ref = next((r for r in fp32_pool + fallback if r.task == m.task and r.sha256 == src.get("sha256")), None)
        note = None
        if ref is None:
            same_task = [r for r in fp32_pool + fallback if r.task == m.task]
            if not same_task:
                raise InputError(f"{m.path}: no FP32 {m.task} model to compare it with (add its models directory to --models)")
            ref = same_task[0]
            note = f"{m.name}: its source model ({src.get('name', '?')}) is not installed; compared with {ref.name}"
        ref.verify_file()
        if (m.input.shape, m.outputs, len(m.labels)) != (ref.input.shape, ref.outputs, len(ref.labels)):
            raise InputError(f"{m.path}: its input, outputs or labels differ from {ref.name}'s: not a precision variant of it")
        p = pairings.setdefault((m.task, str(ref.path)), Pairing(m.task, ref, []))
        p.variants.append(m)
        if note:
            p.notes.append(note)
    for r in fp32_pool:  # FP32 models asked for without variants: still measured
        pairings.setdefault((r.task, str(r.path)), Pairing(r.task, r, []))
    if not pairings:
        raise InputError("no models to compare (run `or-agent calibrate int8` / `fp16` first, or name them with --models)")
    out = sorted(pairings.values(), key=lambda p: (TASK_ORDER.index(p.task), p.reference.name))
    for p in out:
        p.variants.sort(key=lambda m: (PRECISION_ORDER.get(precision_of(m), 9), m.name))
    return out


# -- the default held-out video ----------------------------------------------------------------

def default_held_out(log: Callable[[str], None] = print, data_dir: Path | None = DATA, cache: Path = CACHE) -> Path:
    """The first held-out surgery (``HELD_OUT``, video 1): the training set-up's copy in ``data_dir``
    when it is there and complete, else generated once into ``cache``."""
    from dataclasses import asdict

    from or_agent.synth.dataset import write_video
    from or_agent.synth.render import GENERATOR_VERSION
    from or_agent.synth.splits import HELD_OUT

    wanted = {**asdict(HELD_OUT), "generator_version": GENERATOR_VERSION}
    for stamp in (data_dir.glob("synth-seed*/COMPLETE.json") if data_dir is not None else ()):
        try:
            if json.loads(stamp.read_text()) == wanted and (stamp.parent / "video01.mp4").is_file():
                return stamp.parent / "video01.mp4"
        except (OSError, ValueError):
            continue
    out = cache / f"held-out-seed{HELD_OUT.seed}-x{HELD_OUT.time_scale:g}-m{HELD_OUT.mask_every}-g{GENERATOR_VERSION}"
    stamp = out / "COMPLETE.json"
    if not (stamp.is_file() and (out / "video01.mp4").is_file()):
        log(f"generating the held-out surgery (HELD_OUT video 1) into {out} ...")
        out.mkdir(parents=True, exist_ok=True)
        write_video(out, HELD_OUT.first_index, HELD_OUT)
        stamp.write_text(json.dumps(wanted))
    return out / "video01.mp4"


# -- measuring -----------------------------------------------------------------------------------

class _Timer:
    def __init__(self):
        self.times: dict[str, list[float]] = {}

    def call(self, key: str, fn, *args):
        t0 = time.perf_counter()
        out = fn(*args)
        self.times.setdefault(key, []).append(time.perf_counter() - t0)
        return out

    def ms(self, key: str) -> float | None:
        v = self.times.get(key)
        return round(1000 * float(np.median(v)), 3) if v else None


def _key(m: ModelManifest) -> str:
    return str(m.path)


@dataclass(frozen=True)
class _Member:
    """One model run of a comparison. An INT8 model runs twice: on this CPU's integer kernels (what a CPU
    deployment computes, which differs between CPUs) and in the ONNX-specified arithmetic (the same on
    every CPU), so its agreement can be stated for any machine and for this one."""
    manifest: ModelManifest
    reference_arithmetic: bool = False

    @property
    def key(self) -> str:
        return _key(self.manifest) + ("#reference-arithmetic" if self.reference_arithmetic else "")

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def task(self) -> str:
        return self.manifest.task


def _members(p: Pairing) -> list[_Member]:
    out = [_Member(p.reference)]
    for v in p.variants:
        out.append(_Member(v))
        if precision_of(v) == "int8":
            out.append(_Member(v, reference_arithmetic=True))
    return out


def compare(pairings: Sequence[Pairing], videos: Sequence[Path], log: Callable[[str], None] = print,
            max_frames: int | None = None) -> dict[str, dict]:
    """Run every model over ``videos``; figures per model (keyed by manifest path)."""
    timer = _Timer()
    stages: dict[str, object] = {}
    for p in pairings:
        for m in _members(p):
            backend = OnnxRuntimeBackend(m.manifest, threads=1, int8_kernels=not m.reference_arithmetic)
            stages[m.key] = STAGES[Task(m.task)](backend)
    by_task = {t: [p for p in pairings if p.task == t] for t in TASK_ORDER}
    n_cls = {_Member(p.reference).key: len(p.reference.labels) for p in by_task["segmentation"]}
    acc: dict[str, dict] = {k: {} for k in stages}
    for k in stages:
        acc[k].update(conf_truth=None, conf_ref=None, pix_eq=0, pix_n=0, frames=0, ph_f=[], ph_raw=[], ph_truth=[],
                      ph_ref=[], vis=[], vis_ref=[], oob_t=[], lv_t=[], steps=0)
    ref_vis = next((p.reference for p in by_task["visibility"]), None)
    judge = OutOfBodyJudge(None, stage=stages[_Member(ref_vis).key] if ref_vis is not None else None)
    try:
        for video in videos:
            labels = find_labels(video)
            judge.labels = labels
            fps, _ = video_info(video)
            masks = video.parent / "masks" / video.stem
            has_masks = masks.is_dir() and any(masks.glob("frame*.png"))
            phase_ref_manifest = by_task["phase"][0].reference if by_task["phase"] else None
            # visibility is compared on the phase model's steps (the frames where it decides whether to step)
            steps = frame_stepper(phase_ref_manifest.cadence if phase_ref_manifest else Cadence(hz=5.0), fps)
            for s in stages.values():
                if isinstance(s, PhaseStage):
                    s.reset()
            cur = {k: (0, 0) for k, s in stages.items() if isinstance(s, PhaseStage)}
            seq = {k: [] for k in cur}
            raw_seq = {k: [] for k in cur}
            n_frames = 0
            for f, frame, area in iter_video(video):
                if max_frames is not None and f >= max_frames:
                    break
                n_frames += 1
                prepared: dict = {}

                def prep(stage, frame=frame, area=area, prepared=prepared):
                    """Each distinct input spec is prepared once per frame (converted models share FP32's)."""
                    if stage.spec not in prepared:
                        prepared[stage.spec] = stage.pre_process(frame, area)
                    return prepared[stage.spec]

                if steps(f):
                    vis_now = {}
                    for p in by_task["visibility"]:
                        for m in _members(p):
                            st = stages[m.key]
                            v = st.post_process(timer.call(m.key, st.predict, prep(st)))
                            vis_now[m.key] = (v.out_of_body, v.low_visibility)
                        for m in _members(p):
                            a = acc[m.key]
                            a["vis"].append(vis_now[m.key])
                            a["vis_ref"].append(vis_now[_Member(p.reference).key])
                            a["steps"] += 1
                            vstate = labels.visibility_at(f)
                            if vstate is not None:
                                a["oob_t"].append(vstate == 1)
                                a["lv_t"].append(vstate == 2)
                    # the FP32 visibility verdict just computed, when it is what decides
                    model_says = vis_now[_Member(ref_vis).key][0] if ref_vis is not None else None
                    if by_task["phase"] and not judge(f, frame, area, model_says):
                        for p in by_task["phase"]:
                            for m in _members(p):
                                st = stages[m.key]
                                est = st.post_process(timer.call(m.key, st.predict, prep(st)), t_s=f / fps)
                                cur[m.key] = (est.phase, est.raw_phase)
                                acc[m.key]["steps"] += 1
                for k in cur:
                    seq[k].append(cur[k][0])
                    raw_seq[k].append(cur[k][1])
                mask_path = masks / f"frame{f:06d}.png"
                want_anatomy = mask_path.is_file() if has_masks else f % ANATOMY_EVERY_WITHOUT_MASKS == 0
                if by_task["segmentation"] and want_anatomy:
                    truth = cv2.imread(str(mask_path), cv2.IMREAD_UNCHANGED) if has_masks else None
                    for p in by_task["segmentation"]:
                        n = n_cls[_Member(p.reference).key]
                        maps = {}
                        for m in _members(p):
                            st = stages[m.key]
                            maps[m.key] = st.post_process(timer.call(m.key, st.predict, prep(st)), area).class_map
                        ref_map = maps[_Member(p.reference).key]
                        for m in _members(p):
                            a = acc[m.key]
                            cm = confusion(ref_map, maps[m.key], n)
                            a["conf_ref"] = cm if a["conf_ref"] is None else a["conf_ref"] + cm
                            a["pix_eq"] += int((ref_map == maps[m.key]).sum())
                            a["pix_n"] += ref_map.size
                            a["frames"] += 1
                            if truth is not None:
                                pred = paste_back(maps[m.key], area, frame.shape[1], frame.shape[0])
                                ct = confusion(truth, pred, n)
                                a["conf_truth"] = ct if a["conf_truth"] is None else a["conf_truth"] + ct
            for p in by_task["phase"]:
                ref_seq = np.array(seq[_Member(p.reference).key])
                for m in _members(p):
                    a = acc[m.key]
                    a["ph_f"].append(np.array(seq[m.key]))
                    a["ph_raw"].append(np.array(raw_seq[m.key]))
                    a["ph_ref"].append(ref_seq)
                    if labels.phase is not None:
                        n = min(len(labels.phase), n_frames)
                        a["ph_truth"].append((labels.phase[:n], n))
            log(f"  {video.name}: {n_frames} frames, {fps:g} fps, masks {'yes' if has_masks else 'no'}, "
                f"phase labels {'yes' if labels.phase is not None else 'no'}, flags {'yes' if labels.visibility is not None else 'no'}")
    finally:
        for s in stages.values():
            s.backend.close()

    results: dict[str, dict] = {}
    for p in pairings:
        for m in _members(p):
            a, r = acc[m.key], {"model": m.name, "precision": precision_of(m.manifest), "task": m.task,
                                  "sha256": m.manifest.sha256, "ms_per_frame_onnxruntime_cpu_1_thread": timer.ms(m.key)}
            if r["precision"] == "int8" and not m.reference_arithmetic:
                r["cpu_int8_kernels"] = cpu_int8_kernels()
            if m.task == "segmentation":
                r["frames"] = a["frames"]
                if a["conf_truth"] is not None:
                    r["anatomy_miou"] = round(mean_iou_present(a["conf_truth"]), 4)
                if a["conf_ref"] is not None:
                    r["agreement_miou_vs_fp32"] = round(mean_iou_present(a["conf_ref"]), 4)
                    r["pixel_agreement_vs_fp32"] = round(a["pix_eq"] / max(1, a["pix_n"]), 4)
            elif m.task == "phase":
                r["steps"] = a["steps"]
                if a["ph_truth"]:
                    t = np.concatenate([tr[:n] for tr, n in a["ph_truth"]])
                    f_ = np.concatenate([s[:n] for s, (_, n) in zip(a["ph_f"], a["ph_truth"])])
                    raw = np.concatenate([s[:n] for s, (_, n) in zip(a["ph_raw"], a["ph_truth"])])
                    r["phase_accuracy"] = round(accuracy(t, f_), 4)
                    r["phase_accuracy_raw"] = round(accuracy(t, raw), 4)
                if a["ph_f"]:
                    r["phase_agreement_vs_fp32"] = round(accuracy(np.concatenate(a["ph_ref"]), np.concatenate(a["ph_f"])), 4)
            else:
                r["steps"] = a["steps"]
                if a["vis"]:
                    v, vr = np.array(a["vis"], bool), np.array(a["vis_ref"], bool)
                    r["visibility_agreement_vs_fp32"] = round(float((v == vr).all(1).mean()), 4)
                    if a["oob_t"]:
                        oob_t, lv_t = np.array(a["oob_t"]), np.array(a["lv_t"])
                        rec = recall(oob_t, v[:, 0])
                        r["out_of_body_recall"] = None if np.isnan(rec) else round(rec, 4)
                        r["low_visibility_accuracy"] = round(accuracy(lv_t, v[:, 1]), 4)
            if m.reference_arithmetic:  # beside the figures of the same model on this CPU's kernels
                results[_Member(m.manifest).key]["reference_arithmetic"] = {
                    k: v for k, v in r.items() if k not in ("model", "precision", "task", "sha256")}
            else:
                results[m.key] = r
    return results


# -- reporting -------------------------------------------------------------------------------------

def _fmt(v, digits=3):
    return "-" if v is None else f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def table_lines(pairings: Sequence[Pairing], results: dict[str, dict]) -> list[str]:
    rows = [("model", "precision", "ms/frame", "vs ground truth", "vs FP32")]
    for p in pairings:
        for m in (p.reference, *p.variants):
            r = results[_key(m)]
            if m.task == "segmentation":
                truth = f"mIoU {_fmt(r.get('anatomy_miou'))}" + f" ({r['frames']} frames)"
                ref = f"mIoU {_fmt(r.get('agreement_miou_vs_fp32'))}, pixels {_fmt(r.get('pixel_agreement_vs_fp32'))}"
            elif m.task == "phase":
                truth = f"accuracy {_fmt(r.get('phase_accuracy'))} (raw {_fmt(r.get('phase_accuracy_raw'))})"
                ref = f"phase agreement {_fmt(r.get('phase_agreement_vs_fp32'))}"
            else:
                truth = f"OOB recall {_fmt(r.get('out_of_body_recall'))}, low-vis acc {_fmt(r.get('low_visibility_accuracy'))}"
                ref = f"agreement {_fmt(r.get('visibility_agreement_vs_fp32'))}"
            if m is p.reference:
                ref = "(reference)"
            elif "reference_arithmetic" in r:  # INT8: this CPU's kernels, then the CPU-independent arithmetic
                spec = r["reference_arithmetic"]
                key = {"segmentation": "agreement_miou_vs_fp32", "phase": "phase_agreement_vs_fp32",
                       "visibility": "visibility_agreement_vs_fp32"}[m.task]
                ref += f" on {r['cpu_int8_kernels'].split(' ')[0]} kernels; {_fmt(spec.get(key))} as specified"
            rows.append((m.name, r["precision"], _fmt(r["ms_per_frame_onnxruntime_cpu_1_thread"], 2), truth, ref))
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    if any("cpu_int8_kernels" in r for r in results.values()):
        lines.append(f"INT8 ran on this CPU's integer kernels, {cpu_int8_kernels()}, whose results differ by CPU "
                     "(AVX2 alone saturates int16 sums); 'as specified' is the same model in ONNX's Q/DQ arithmetic, "
                     "the same on any CPU")
    return lines


def write_results(pairings: Sequence[Pairing], results: dict[str, dict], videos: Sequence[Path]) -> list[Path]:
    """Store each converted model's figures (and its FP32 reference's) in its manifest."""
    written = []
    when = datetime.date.today().isoformat()
    for p in pairings:
        ref = results[_key(p.reference)]
        for m in p.variants:
            block = {
                "held_out": ", ".join(v.name for v in videos),
                "measured_on": when,
                "runtime": "onnxruntime CPU, 1 thread",
                "reference": {"model": p.reference.name, "sha256": p.reference.sha256},
                "this_model": {k: v for k, v in results[_key(m)].items() if k not in ("model", "sha256", "task")},
                "fp32": {k: v for k, v in ref.items() if k not in ("model", "sha256", "task")},
            }

            def update(doc, block=block):
                metrics = doc.setdefault("metrics", {})
                if not isinstance(metrics, dict):
                    doc["metrics"] = metrics = {}
                metrics["precision_comparison"] = block

            update_manifest(m.path, update)
            written.append(m.path)
    return written


def run_compare(videos: Sequence[str] | None = None, models: Sequence[str] | None = None, models_dir=None,
                write: bool = True, log: Callable[[str], None] = print, max_frames: int | None = None) -> dict[str, dict]:
    """``or-agent calibrate compare``."""
    pairings = pair_models(models, models_dir)
    paths = list_videos(videos) if videos else [default_held_out(log)]
    names = ", ".join(f"{m.name} ({precision_of(m)})" for p in pairings for m in (p.reference, *p.variants))
    log(f"comparing {names} on {len(paths)} video(s)")
    results = compare(pairings, paths, log, max_frames=max_frames)
    for p in pairings:
        for note in p.notes:
            log(f"note: {note}")
    for line in table_lines(pairings, results):
        log(line)
    if write:
        for path in write_results(pairings, results, paths):
            log(f"wrote metrics.precision_comparison into {path}")
    return results
