"""``or-agent qualify``: the on-site acceptance test of a box.

Runs every model on ONNX Runtime (the reference) and on the backend the box will use (``auto``:
TensorRT where an engine exists) over a reference clip, checks their agreement (anatomy mIoU between
the two >= 0.98, phase agreement >= 99 %, visibility agreement >= 99 %), plays the clip live through
the pipeline on the deployed backend and checks capture-to-publish latency p99 against the budget,
and writes an acceptance report (``qualification.json`` and ``qualification.html``) with the box's
identity, versions, model hashes and a pass/fail verdict per check. Exit 0 only if every check passes.
"""

from __future__ import annotations

import html
import json
import os
import platform
import socket
import time
from pathlib import Path

import numpy as np

from or_agent.agent import VERSION
from or_agent.agent.build_info import build_record
from or_agent.agent.session import LoadedModels
from or_agent.pipelines.errors import InputError
from or_agent.pipelines.files import atomic_write_text, output_dir
from or_agent.pipelines.manifest import Task
from or_agent.pipelines.messages import FrameResult
from or_agent.pipelines.metrics import confusion, mean_iou_present
from or_agent.pipelines.runtime import PipelineConfig
from or_agent.pipelines.sources import FirstFrames, VideoFileSource

MIN_ANATOMY_MIOU = 0.98
MIN_PHASE_AGREEMENT = 0.99
MIN_VISIBILITY_AGREEMENT = 0.99


def default_clip(cache: Path) -> Path:
    """The first held-out synthetic surgery, regenerated from its seed (identical on every box)."""
    from or_agent.synth.dataset import write_video
    from or_agent.synth.splits import HELD_OUT

    cache.mkdir(parents=True, exist_ok=True)
    clip = cache / "video01.mp4"
    if not clip.exists():
        print(f"generating the reference clip in {cache} ...", flush=True)
        write_video(cache, 1, HELD_OUT)
    return clip


def _results(clip: Path, models: LoadedModels, limit: int, anatomy_every: int) -> dict[int, FrameResult]:
    """Every result of the pipeline on ``models`` (their backends and frame path), unpaced, by frame."""
    out: dict[int, FrameResult] = {}
    pipe = models.pipeline(FirstFrames(VideoFileSource(clip), limit),
                           PipelineConfig(anatomy_every=anatomy_every, keep_images=False))
    pipe.subscribe(lambda r: out.__setitem__(r.seq, r))
    pipe.run()
    return out


def _agreement(clip: Path, fps: float, reference: LoadedModels, deployed: LoadedModels, frames: int) -> dict:
    """The same frames through the reference (ONNX Runtime, CPU preprocessing) and the deployed
    pipeline (its backends and frame path, the GPU kernels included): ``frames`` anatomy frames and
    phase steps, both at 5 per second of video, visibility on every frame."""
    stride = max(1, int(round(fps / 5.0)))
    ref = _results(clip, reference, frames * stride, stride)
    dep = _results(clip, deployed, frames * stride, stride)
    if not ref:
        raise InputError(f"{clip}: no frame could be decoded")
    segmentation = reference.stages.one(Task.SEGMENTATION)  # the set's first: the one the gates compare
    n_cls = len(segmentation.names) if segmentation is not None else 1
    conf = np.zeros((n_cls, n_cls), np.int64)
    anatomy_frames = phase_same = phase_steps = vis_same = 0
    for seq, r in ref.items():
        d = dep.get(seq)
        if d is None:
            continue
        vis_same += (r.out_of_body, bool(r.visibility and r.visibility.low_visibility)) == (
            d.out_of_body, bool(d.visibility and d.visibility.low_visibility))
        if r.segmentation_fresh and d.segmentation_fresh:
            conf += confusion(r.segmentation.class_map, d.segmentation.class_map, n_cls)
            anatomy_frames += 1
        if r.phase_fresh and d.phase_fresh:
            phase_same += r.phase.phase == d.phase.phase
            phase_steps += 1
    compared = sum(seq in dep for seq in ref)
    return {"frames": anatomy_frames, "phase_steps": phase_steps, "frames_compared": compared,
            "frames_missing": len(ref) - compared,
            "anatomy_miou": mean_iou_present(conf) if anatomy_frames else 0.0,
            "phase_agreement": phase_same / phase_steps if phase_steps else 0.0,
            "visibility_agreement": vis_same / max(1, len(ref))}


def _latency(clip: Path, fps: float, models: LoadedModels, seconds: float) -> dict:
    limit = int(seconds * fps)
    pipe = models.pipeline(FirstFrames(VideoFileSource(clip, paced=True), limit), PipelineConfig())
    pipe.run()
    stats = pipe.stats()
    return {"seconds": seconds, "frames": stats["frames_out"], "dropped": stats["frames_dropped_source"],
            **stats["latency_ms"]["end_to_end"]}


def _identity(deployed: LoadedModels) -> dict:
    import onnxruntime

    ident = {"host": socket.gethostname(), "platform": platform.platform(), "python": platform.python_version(),
             "cpu_cores": os.cpu_count(), "onnxruntime": onnxruntime.__version__, "agent_version": VERSION}
    try:
        from or_agent.pipelines.backends.engines import tensorrt_version
        from or_agent.pipelines.gpu.context import gpu_info

        ident["gpu"] = gpu_info().describe()
        ident["tensorrt"] = tensorrt_version()
    except Exception as exc:
        ident.setdefault("gpu", f"none ({str(exc).splitlines()[0][:120]})")
    ident["models"] = {s.name: {"task": str(s.task), "version": s.manifest.version, "sha256": s.manifest.sha256,
                                "backend": s.backend.name, "why": deployed.reasons.get(s.name, ""),
                                "cuda_graph": getattr(s.backend, "graph_status", "n/a")} for s in deployed.stages.stages}
    ident["preprocessing"] = deployed.frame_path_reason
    return ident


def run_qualify(out_dir: Path, clip: str | None = None, models_dir=None, backend: str = "auto", preprocessing: str = "auto",
                cuda_graphs: bool = False,
                budget_ms: float = 50.0, seconds: float = 20.0, frames: int = 200) -> int:
    if budget_ms <= 0 or seconds <= 0 or frames < 1:
        raise InputError("--budget-ms and --seconds must be positive, --frames at least 1")
    clip_path = Path(clip) if clip else default_clip(Path(".cache") / "qualify-clip")
    if not clip_path.is_file():
        raise InputError(f"{clip_path}: no such reference clip")
    with output_dir(out_dir):  # made before the minutes of measuring, and not left behind empty
        return _qualify(out_dir, clip_path, models_dir, backend, preprocessing, cuda_graphs, budget_ms, seconds, frames)


def _qualify(out_dir: Path, clip_path: Path, models_dir, backend: str, preprocessing: str, cuda_graphs: bool,
             budget_ms: float, seconds: float, frames: int) -> int:
    probe = VideoFileSource(clip_path)
    probe.start()  # a clip that does not decode fails here, before any model is loaded
    fps = probe.nominal_fps or 25.0
    probe.stop()
    reference = LoadedModels(models_dir, backend="onnxruntime", live_session=False, preprocessing="cpu")
    try:
        deployed = LoadedModels(models_dir, backend=backend, live_session=False, preprocessing=preprocessing,
                                cuda_graphs=cuda_graphs)
    except BaseException:
        reference.close()
        raise
    t0 = time.time()
    try:
        print(f"agreement: reference ONNX Runtime vs deployed ({', '.join(deployed.backend_name(t) for t in deployed.manifests)}) "
              f"on {clip_path.name} ...", flush=True)
        agree = _agreement(clip_path, fps, reference, deployed, frames)
        print(f"latency: {seconds:g} s of the clip played live through the pipeline ...", flush=True)
        lat = _latency(clip_path, fps, deployed, seconds)
        ident = _identity(deployed)
    finally:
        reference.close()
        deployed.close()
    checks = [
        ("anatomy agreement (mIoU, deployed vs ONNX Runtime)", agree["anatomy_miou"], MIN_ANATOMY_MIOU, ">="),
        ("phase agreement", agree["phase_agreement"], MIN_PHASE_AGREEMENT, ">="),
        ("visibility agreement", agree["visibility_agreement"], MIN_VISIBILITY_AGREEMENT, ">="),
        ("capture->publish latency p99 (ms)", lat["p99_ms"], budget_ms, "<="),
        ("frames dropped in live play", lat["dropped"], 0, "<="),
        ("frames missing from the deployed run", agree["frames_missing"], 0, "<="),
    ]
    results = [{"check": name, "measured": round(float(v), 4), "limit": limit, "rule": rule,
                "pass": bool(v >= limit if rule == ">=" else v <= limit)} for name, v, limit, rule in checks]
    verdict = all(r["pass"] for r in results)
    options = {"clip": clip_path.name, "backend": backend, "preprocessing": preprocessing, "cuda_graphs": cuda_graphs,
               "budget_ms": budget_ms, "seconds": seconds, "frames": frames}
    report = {"verdict": "PASS" if verdict else "FAIL", "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t0)),
              "clip": clip_path.name, **build_record(deployed.model_set, options), "qualify_options": options,
              "box": ident, "checks": results, "agreement": agree, "latency_ms": lat}
    atomic_write_text(out_dir / "qualification.json", json.dumps(report, indent=1) + "\n")
    rows = "".join(f"<tr><td>{html.escape(r['check'])}</td><td>{r['measured']}</td><td>{r['rule']} {r['limit']}</td>"
                   f"<td class={'ok' if r['pass'] else 'bad'}>{'PASS' if r['pass'] else 'FAIL'}</td></tr>" for r in results)
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>or-agent qualification</title><style>"
            f"body{{font-family:sans-serif;margin:2em}} td,th{{border:1px solid #bbb;padding:4px 8px}} table{{border-collapse:collapse}}"
            f".ok{{color:#070}} .bad{{color:#a00;font-weight:bold}}</style></head><body>"
            f"<h1>Qualification: <span class={'ok' if verdict else 'bad'}>{report['verdict']}</span></h1>"
            f"<p>{html.escape(ident['host'])}, {html.escape(report['date'])}, clip {html.escape(clip_path.name)}</p>"
            f"<table><tr><th>check</th><th>measured</th><th>required</th><th>verdict</th></tr>{rows}</table>"
            f"<h2>Box, versions, models</h2><pre>{html.escape(json.dumps(ident, indent=1))}</pre></body></html>\n")
    atomic_write_text(out_dir / "qualification.html", page)
    for r in results:
        print(f"{'PASS' if r['pass'] else 'FAIL'}  {r['check']}: {r['measured']} ({r['rule']} {r['limit']})")
    print(f"{report['verdict']}: report in {out_dir / 'qualification.html'} and qualification.json")
    return 0 if verdict else 1
