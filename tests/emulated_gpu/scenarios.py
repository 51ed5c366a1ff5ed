"""Scenarios run by tests/test_emulated_gpu.py in a subprocess whose import path puts the emulated
``pycuda`` and ``tensorrt`` first (see README.md here). Each prints one JSON line of findings.

    python -m scenarios NAME ARGS...   (cwd: the repository root; PYTHONPATH: this folder, then the root)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np


def _emulated() -> None:
    import pycuda
    import tensorrt

    here = Path(__file__).resolve().parent
    for mod in (pycuda, tensorrt):
        if here not in Path(mod.__file__).resolve().parents:
            raise SystemExit(f"not the emulation: {mod.__file__}")
    # The CUDA driver library (graph capture) is loaded with ctypes; here it is the emulated one.
    import libcuda

    from or_agent.pipelines.gpu import graphs

    graphs.load_libcuda = libcuda.EmulatedLibcuda


def phase_state(steps: str) -> dict:
    """The TensorRT backend steps the recurrent phase model like ONNX Runtime does, with the state
    kept on the device: after the first step only the frame is uploaded."""
    import pycuda.driver as cuda

    from or_agent.pipelines.backends import engines
    from or_agent.pipelines.backends.onnxruntime import OnnxRuntimeBackend
    from or_agent.pipelines.backends.tensorrt import TensorRTBackend
    from or_agent.pipelines.gpu.context import gpu_info
    from or_agent.pipelines.manifest import find_model
    from or_agent.pipelines.stages import PhaseStage

    m = find_model("phase")
    info, version = gpu_info(), engines.tensorrt_version()
    uploads: list[int] = []
    real_htod = cuda.memcpy_htod_async

    def counting_htod(dest, src, stream=None):
        uploads.append(np.asarray(src).nbytes)
        return real_htod(dest, src, stream)

    cuda.memcpy_htod_async = counting_htod
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        cache = engines.EngineCache(tmp)
        key = engines.EngineKey.for_model(m, info, version)
        engines.build_engine(m, cache, key, Path(tmp) / "timing.cache")
        trt_stage = PhaseStage(TensorRTBackend(m, cache.path_for(key), cuda_graph=True))
    ort_stage = PhaseStage(OnnxRuntimeBackend(m))
    rng = np.random.default_rng(0)
    diffs, per_step_uploads = [], []
    for _i in range(int(steps)):
        x = rng.normal(size=m.input.shape).astype(np.float32)
        before = len(uploads)
        a, b = trt_stage.predict(x), ort_stage.predict(x)
        per_step_uploads.append(uploads[before:])
        diffs.append(float(np.abs(a - b).max()))
    state_bytes = sum(int(np.prod(s.shape)) * 4 for s in m.state_inputs)
    frame_bytes = int(np.prod(m.input.shape)) * 4
    import libcuda

    launches_before_reset = len(libcuda.launches)
    trt_stage.reset()  # a new case: zero state uploaded again
    before = len(uploads)
    trt_stage.predict(rng.normal(size=m.input.shape).astype(np.float32))
    graph_status = trt_stage.backend.graph_status
    executions = trt_stage.backend._context.executions
    trt_stage.backend.close()
    return {"graph_launches": launches_before_reset, "distinct_graphs": len(set(libcuda.launches)),
            "graphs_left_after_close": len(libcuda.execs), "engine_executions": executions,
            "max_logit_diff": max(diffs), "first_step_uploads": sorted(per_step_uploads[0]),
            "later_step_uploads": sorted({n for step in per_step_uploads[1:] for n in step}),
            "after_reset_uploads": sorted(uploads[before:]), "state_bytes": state_bytes, "frame_bytes": frame_bytes,
            "graph_status": graph_status}


def build_and_pipeline(video: str, cache_dir: str, frames: str) -> dict:
    """``build-engines`` into a cache, ``auto`` then picks TensorRT and the GPU frame path, and the
    pipeline's results on them equal the CPU reference of the GPU path on ONNX Runtime."""
    import io
    from contextlib import redirect_stdout

    import pycuda.driver as cuda
    import tensorrt

    from or_agent.agent.cli import main as cli_main
    from or_agent.agent.session import LoadedModels
    from or_agent.pipelines.frame_path import ReferenceFramePath
    from or_agent.pipelines.manifest import Task
    from or_agent.pipelines.runtime import PipelineConfig
    from or_agent.pipelines.sources import FirstFrames, VideoFileSource

    doctor_before = io.StringIO()
    with redirect_stdout(doctor_before):
        cli_main(["doctor", "--cache-dir", cache_dir])
    code = cli_main(["build-engines", "--cache-dir", cache_dir])
    again = cli_main(["build-engines", "--cache-dir", cache_dir])  # all cached: nothing rebuilt
    built = list(tensorrt.build_calls)

    def results(models, frame_path=None):
        out = []
        pipe = models.pipeline(FirstFrames(VideoFileSource(video), int(frames)), PipelineConfig(keep_images=False))
        if frame_path is not None:
            pipe.frame_path = frame_path
        pipe.subscribe(out.append)
        pipe.run()
        return out

    doctor_after = io.StringIO()
    with redirect_stdout(doctor_after):
        cli_main(["doctor", "--cache-dir", cache_dir])
    deployed = LoadedModels(backend="auto", cache_dir=cache_dir, live_session=True, cuda_graphs=True)
    reference = LoadedModels(backend="onnxruntime", preprocessing="cpu", live_session=False)
    allocations_with_models = cuda.live_allocations()
    try:
        dev = results(deployed)
        ref = results(reference, ReferenceFramePath())
        in_use = deployed.frame_path.pool.in_use()
        anatomy_runs = deployed.stages.one(Task.SEGMENTATION).backend._context.executions
        graph_status = {str(s.task): s.backend.graph_status for s in deployed.stages.stages}
        pool_slots = len(deployed.frame_path.pool.slots())
    finally:
        reasons = dict(deployed.reasons)
        frame_path_reason = deployed.frame_path_reason
        backends = {str(s.task): s.backend.name for s in deployed.stages.stages}
        deployed.close()
        reference.close()
    pairs = list(zip(ref, dev))
    phase_pairs = [(a.phase, b.phase) for a, b in pairs if a.phase and b.phase]
    return {
        "build_exit": code, "rebuild_exit": again,
        "doctor_before": doctor_before.getvalue().splitlines(), "doctor_after": doctor_after.getvalue().splitlines(),
        "built": built, "backends": backends, "reasons": reasons,
        "frame_path": frame_path_reason, "graph_status": graph_status, "frames": [len(ref), len(dev)],
        "seq_equal": [r.seq for r in ref] == [r.seq for r in dev],
        "anatomy_fresh": sum(b.segmentation_fresh for b in dev), "anatomy_runs": anatomy_runs,
        "class_maps_equal": float(np.mean([np.array_equal(a.segmentation.class_map, b.segmentation.class_map)
                                           for a, b in pairs if a.segmentation_fresh and b.segmentation_fresh])),
        "area_fraction_diff": max(float(np.abs(np.subtract(a.segmentation.area_fraction, b.segmentation.area_fraction)).max())
                                  for a, b in pairs if a.segmentation_fresh and b.segmentation_fresh),
        "phase_equal": float(np.mean([p.phase == q.phase for p, q in phase_pairs])),
        "phase_prob_diff": max(float(np.abs(np.subtract(p.probabilities, q.probabilities)).max()) for p, q in phase_pairs),
        "visibility_equal": float(np.mean([a.out_of_body == b.out_of_body for a, b in pairs])),
        "buffers_in_use_after": in_use, "pool_slots": pool_slots,
        "allocations_left_after_close": cuda.live_allocations(), "allocations_while_loaded": allocations_with_models,
    }


def live_build(cache_dir: str) -> dict:
    """A live agent with no engines: refused by default, built at start-up when configured."""
    import tensorrt

    from or_agent.agent.session import LoadedModels
    from or_agent.pipelines.errors import ModelError

    try:
        LoadedModels(backend="tensorrt", cache_dir=cache_dir, live_session=True)
        refused = ""
    except ModelError as exc:
        refused = str(exc)
    models = LoadedModels(backend="tensorrt", cache_dir=cache_dir, live_session=True, build_engines_live=True)
    try:
        return {"refused": refused, "built": len(tensorrt.build_calls), "reasons": dict(models.reasons),
                "backends": sorted({models.backend_name(t) for t in models.manifests}),
                "cached": sorted(p.suffix for p in Path(cache_dir).iterdir())}
    finally:
        models.close()


def qualify(video: str, cache_dir: str, out: str) -> dict:
    """The acceptance test on the emulated box: engines built, then TensorRT + the GPU frame path +
    CUDA graphs qualified against ONNX Runtime on the CPU path."""
    from or_agent.agent.cli import main as cli_main

    assert cli_main(["build-engines", "--cache-dir", cache_dir]) == 0
    import os

    os.environ["OR_AGENT_ENGINE_CACHE"] = cache_dir
    code = cli_main(["qualify", "--clip", video, "--out", out, "--seconds", "3", "--frames", "20",
                     "--budget-ms", "2000", "--cuda-graphs"])
    return {"exit": code, "report": json.loads((Path(out) / "qualification.json").read_text())}


if __name__ == "__main__":
    _emulated()
    name, *args = sys.argv[1:]
    scenarios = {"phase_state": phase_state, "build_and_pipeline": build_and_pipeline, "qualify": qualify,
                 "live_build": live_build}
    print(json.dumps(scenarios[name](*args)))
