"""Which backend runs a model on this box, and why.

``auto`` takes TensorRT only when TensorRT and a CUDA GPU are present *and* an engine built for
this GPU and TensorRT version is in the cache; otherwise ONNX Runtime on the CPU, with the reason.
An engine is not built here for a live agent (``or-agent build-engines`` builds them before) unless
``build_missing`` (config ``pipeline.build_engines_live``) says to build missing engines when the
agent starts, which takes minutes.

The probes (``trt_version``, ``gpu_info``) and the TensorRT backend factory are injectable, so the
decision is testable on a machine with neither TensorRT nor a GPU.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from or_agent.pipelines.backends import InferenceBackend, engines
from or_agent.pipelines.backends.tensorrt import TensorRTBackend
from or_agent.pipelines.errors import DependencyError, InputError, ModelError
from or_agent.pipelines.gpu import context as gpu_context
from or_agent.pipelines.manifest import ModelManifest
from or_agent.pipelines.options import BACKENDS


@dataclass(frozen=True)
class BackendPlan:
    backend: str  # "tensorrt" or "onnxruntime-cpu"
    reason: str  # one line, starts with the backend's name
    engine_path: Path | None = None
    key: engines.EngineKey | None = None
    build_first: bool = False  # tensorrt requested outside a live case and no engine yet


def plan_backend(manifest: ModelManifest, preference: str = "auto", cache_dir: str | os.PathLike | None = None,
                 live_session: bool = False, *, trt_version: Callable[[], str] = engines.tensorrt_version,
                 gpu_info: Callable[[], gpu_context.GpuInfo] = gpu_context.gpu_info, build_missing: bool = False) -> BackendPlan:
    """The decision alone (nothing loaded). Raises for ``tensorrt`` requested but impossible."""
    if preference not in BACKENDS:
        raise InputError(f"backend: must be one of {', '.join(BACKENDS)}, got {preference!r}")
    if preference == "onnxruntime":
        return BackendPlan("onnxruntime-cpu", "onnxruntime-cpu: requested")
    explicit = preference == "tensorrt"
    try:
        version = trt_version()
        gpu = gpu_info()
    except DependencyError as exc:
        if explicit:
            raise
        return BackendPlan("onnxruntime-cpu", f"onnxruntime-cpu: {exc}")
    cache = engines.EngineCache(cache_dir if cache_dir is not None else engines.default_cache_dir())
    key = engines.EngineKey.for_model(manifest, gpu, version)
    path = cache.path_for(key)
    if cache.has(key):
        return BackendPlan("tensorrt", f"tensorrt: engine {path.name} for {key.describe()}", path, key)
    if explicit or build_missing:
        if live_session and not build_missing:
            raise ModelError(engines.refuse_live_build_message(manifest, key))
        return BackendPlan("tensorrt", f"tensorrt: building engine {path.name} for {key.describe()} (takes minutes)",
                           path, key, build_first=True)
    return BackendPlan("onnxruntime-cpu", "onnxruntime-cpu: no engine for this GPU yet (run or-agent build-engines)",
                       None, key)


def _onnxruntime(manifest: ModelManifest, threads: int) -> InferenceBackend:
    from or_agent.pipelines.backends.onnxruntime import OnnxRuntimeBackend

    return OnnxRuntimeBackend(manifest, threads=threads)


def _tensorrt(manifest: ModelManifest, engine_path: Path, cuda_graphs: bool = False) -> InferenceBackend:
    return TensorRTBackend(manifest, engine_path, cuda_graph=cuda_graphs)


def choose_backend(manifest: ModelManifest, preference: str = "auto", cache_dir: str | os.PathLike | None = None,
                   threads: int = 1, live_session: bool = False, *,
                   trt_version: Callable[[], str] = engines.tensorrt_version,
                   gpu_info: Callable[[], gpu_context.GpuInfo] = gpu_context.gpu_info,
                   tensorrt_factory: Callable[[ModelManifest, Path], InferenceBackend] | None = None,
                   onnxruntime_factory: Callable[[ModelManifest, int], InferenceBackend] = _onnxruntime,
                   timing_cache_path: str | os.PathLike | None = None, cuda_graphs: bool = False,
                   build_missing: bool = False) -> tuple[InferenceBackend, str]:
    """The loaded backend for ``manifest`` and a one-line reason (log it, show it in status)."""
    plan = plan_backend(manifest, preference, cache_dir, live_session, trt_version=trt_version, gpu_info=gpu_info,
                        build_missing=build_missing)
    if plan.backend != "tensorrt":
        return onnxruntime_factory(manifest, threads), plan.reason
    assert plan.engine_path is not None  # a TensorRT plan always names its engine
    if plan.build_first:
        cache = engines.EngineCache(plan.engine_path.parent)
        tc = timing_cache_path or cache.timing_cache_path
        engines.build_engine(manifest, cache, plan.key, tc, live_session=live_session, allow_build_live=build_missing)
    try:
        if tensorrt_factory is None:
            return _tensorrt(manifest, plan.engine_path, cuda_graphs), plan.reason
        return tensorrt_factory(manifest, plan.engine_path), plan.reason
    except (DependencyError, ModelError) as exc:
        if preference == "tensorrt":
            raise
        # auto: an engine that does not load (corrupt file, driver trouble) must not stop the case.
        return onnxruntime_factory(manifest, threads), f"onnxruntime-cpu: the TensorRT engine did not load ({exc})"
