"""The GPU path: engine cache keys, backend selection, doctor, and (on a GPU) the kernels.

Runs everywhere: selection with TensorRT absent or with fake GPU/TensorRT probes, cache
invalidation, the live-build refusal, the numpy references against OpenCV, the doctor.
Needs a GPU (``-m gpu``): the kernels against their numpy references. Needs TensorRT
(``-m tensorrt``): building and running an engine. Both skip with the reason where absent.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from or_agent.pipelines.backends import InferenceBackend, engines
from or_agent.pipelines.backends.select import choose_backend, plan_backend
from or_agent.pipelines.errors import DependencyError, InputError, ModelError
from or_agent.pipelines.gpu.context import GpuInfo, gpu_info
from or_agent.pipelines.manifest import find_model, load_manifest

ROOT = Path(__file__).resolve().parent.parent
H200 = GpuInfo("NVIDIA H200", (9, 0), 132, 140 * 1024**3, 13000)
L4 = GpuInfo("NVIDIA L4", (8, 9), 58, 24 * 1024**3, 12040)


def _trt(version="11.0.0.9"):
    return lambda: version


def _no_trt():
    raise DependencyError(engines.TENSORRT_INSTALL_HINT)


class FakeBackend(InferenceBackend):
    name = "fake-tensorrt"

    def __init__(self, manifest, engine_path=None):
        super().__init__(manifest)
        self.engine_path = engine_path

    def run(self, inputs):
        return {}


def fake_ort(manifest, threads):
    b = FakeBackend(manifest)
    b.name = "onnxruntime-cpu"
    return b


@pytest.fixture(scope="module")
def anatomy():
    return load_manifest(ROOT / "models" / "synthetic" / "anatomy")


# --------------------------------------------------------------------------- engine key and cache

def test_engine_key_filename_is_deterministic_safe_and_field_sensitive(anatomy):
    k = engines.EngineKey.for_model(anatomy, H200, "11.0.0.9")
    assert k.filename() == engines.EngineKey.for_model(anatomy, H200, "11.0.0.9").filename()
    name = k.filename()
    assert name.endswith(".engine") and "/" not in name and " " not in name
    assert name.startswith(anatomy.sha256[:12]) and "nvidia-h200" in name and "sm90" in name and "trt11.0.0.9" in name
    assert k.precision == "fp32"
    variants = [engines.EngineKey.for_model(anatomy, L4, "11.0.0.9"), engines.EngineKey.for_model(anatomy, H200, "10.9.0"),
                engines.EngineKey(k.model_sha256, k.tensorrt_version, k.gpu_name, k.compute_capability, 114),
                engines.EngineKey(k.model_sha256, k.tensorrt_version, k.gpu_name, k.compute_capability, 132, "int8"),
                engines.EngineKey("0" * 64, k.tensorrt_version, k.gpu_name, k.compute_capability, 132)]
    assert len({v.filename() for v in variants} | {name}) == 6
    assert engines.EngineKey.from_dict(k.as_dict()) == k
    assert k.describe() == "NVIDIA H200 (sm 9.0, 132 SMs, TensorRT 11.0)"


def test_engine_cache_write_read_miss_and_prune(tmp_path, anatomy):
    cache = engines.EngineCache(tmp_path / "engines")
    k = engines.EngineKey.for_model(anatomy, H200, "11.0.0.9")
    assert not cache.has(k)
    p = cache.write(k, b"engine-bytes", model="anatomy")
    assert cache.has(k) and cache.read(k) == b"engine-bytes" and p == cache.path_for(k)
    assert p.with_suffix(".json").is_file() and not list(p.parent.glob(".*.tmp"))
    # another GPU or TensorRT version: a miss, nothing to load
    assert not cache.has(engines.EngineKey.for_model(anatomy, L4, "11.0.0.9"))
    assert not cache.has(engines.EngineKey.for_model(anatomy, H200, "11.1.0.2"))
    with pytest.raises(ModelError, match="no engine cached"):
        cache.read(engines.EngineKey.for_model(anatomy, L4, "11.0.0.9"))
    # an engine without its sidecar (crash between the two writes) is a miss too
    p.with_suffix(".json").unlink()
    assert not cache.has(k)
    cache.write(k, b"engine-bytes")
    old = engines.EngineKey("f" * 64, "11.0.0.9", "NVIDIA H200", (9, 0), 132)
    cache.write(old, b"old")
    assert cache.prune([anatomy.sha256]) == [cache.path_for(old)]
    cache.prune([anatomy.sha256], remove=True)
    assert not cache.path_for(old).exists() and cache.has(k)
    with pytest.raises(ModelError):
        cache.write(k, b"")


def test_build_engine_is_refused_during_a_live_case(tmp_path, anatomy):
    k = engines.EngineKey.for_model(anatomy, H200, "11.0.0.9")
    with pytest.raises(ModelError) as e:
        engines.build_engine(anatomy, engines.EngineCache(tmp_path), k, live_session=True)
    assert str(e.value) == ("no TensorRT engine for anatomy on NVIDIA H200 (TensorRT 11.0); building one takes minutes "
                            "and is refused during a live case: run `or-agent build-engines` before the case "
                            "(or set pipeline.build_engines_live = true to build missing engines when the agent starts)")


# --------------------------------------------------------------------------- selection

def test_auto_without_tensorrt_is_onnxruntime_with_reason(anatomy, tmp_path):
    backend, reason = choose_backend(anatomy, "auto", tmp_path, trt_version=_no_trt, gpu_info=lambda: H200)
    try:
        assert backend.name == "onnxruntime-cpu"
        assert reason == "onnxruntime-cpu: " + engines.TENSORRT_INSTALL_HINT
    finally:
        backend.close()


def test_auto_on_this_machine_really_falls_back(anatomy, tmp_path):
    """No injection: whatever this machine lacks is named (here TensorRT and a GPU are absent)."""
    backend, reason = choose_backend(anatomy, "auto", tmp_path)
    try:
        if backend.name == "tensorrt":
            pytest.skip("this machine has TensorRT, a GPU and an engine")
        assert reason.startswith("onnxruntime-cpu: ")
        out = backend.run({"frame": np.zeros(anatomy.input.shape, np.float32)})
        assert out["logits"].shape == (1, 13, 256, 448)
    finally:
        backend.close()


def test_auto_without_gpu_names_pycuda(anatomy, tmp_path):
    def no_gpu():
        raise DependencyError("no CUDA GPU found (pycuda: cuInit failed: no CUDA-capable device is detected)")

    plan = plan_backend(anatomy, "auto", tmp_path, trt_version=_trt(), gpu_info=no_gpu)
    assert plan.backend == "onnxruntime-cpu"
    assert plan.reason == "onnxruntime-cpu: no CUDA GPU found (pycuda: cuInit failed: no CUDA-capable device is detected)"


def test_auto_picks_tensorrt_only_with_an_engine_for_this_gpu(anatomy, tmp_path):
    cache = engines.EngineCache(tmp_path)
    kw = dict(trt_version=_trt(), gpu_info=lambda: H200, tensorrt_factory=FakeBackend, onnxruntime_factory=fake_ort)
    backend, reason = choose_backend(anatomy, "auto", tmp_path, **kw)
    assert backend.name == "onnxruntime-cpu"
    assert reason == "onnxruntime-cpu: no engine for this GPU yet (run or-agent build-engines)"
    # an engine for another GPU does not count
    cache.write(engines.EngineKey.for_model(anatomy, L4, "11.0.0.9"), b"x")
    assert choose_backend(anatomy, "auto", tmp_path, **kw)[0].name == "onnxruntime-cpu"
    key = engines.EngineKey.for_model(anatomy, H200, "11.0.0.9")
    path = cache.write(key, b"x")
    backend, reason = choose_backend(anatomy, "auto", tmp_path, live_session=True, **kw)
    assert backend.name == "fake-tensorrt" and backend.engine_path == path
    assert reason == f"tensorrt: engine {path.name} for NVIDIA H200 (sm 9.0, 132 SMs, TensorRT 11.0)"
    # a TensorRT upgrade invalidates it
    assert choose_backend(anatomy, "auto", tmp_path, **{**kw, "trt_version": _trt("11.1.0.3")})[0].name == "onnxruntime-cpu"


def test_auto_falls_back_when_the_engine_does_not_load(anatomy, tmp_path):
    engines.EngineCache(tmp_path).write(engines.EngineKey.for_model(anatomy, H200, "11.0.0.9"), b"x")

    def broken(manifest, path):
        raise ModelError("anatomy: TensorRT cannot deserialize the engine")

    backend, reason = choose_backend(anatomy, "auto", tmp_path, trt_version=_trt(), gpu_info=lambda: H200,
                                     tensorrt_factory=broken, onnxruntime_factory=fake_ort)
    assert backend.name == "onnxruntime-cpu" and "did not load" in reason


def test_explicit_tensorrt_refused_when_unavailable(anatomy, tmp_path):
    with pytest.raises(DependencyError, match="TensorRT is not installed: install it on the OR box"):
        choose_backend(anatomy, "tensorrt", tmp_path, trt_version=_no_trt, gpu_info=lambda: H200)
    with pytest.raises(ModelError, match="refused during a live case"):
        choose_backend(anatomy, "tensorrt", tmp_path, live_session=True, trt_version=_trt(), gpu_info=lambda: H200,
                       tensorrt_factory=FakeBackend)
    plan = plan_backend(anatomy, "tensorrt", tmp_path, live_session=False, trt_version=_trt(), gpu_info=lambda: H200)
    assert plan.build_first and plan.reason.startswith("tensorrt: building engine")
    with pytest.raises(InputError, match="backend: must be one of"):
        plan_backend(anatomy, "cuda", tmp_path)
    assert plan_backend(anatomy, "onnxruntime", tmp_path).reason == "onnxruntime-cpu: requested"


def test_missing_engines_built_at_start_only_when_configured(anatomy, tmp_path):
    probes = {"trt_version": _trt(), "gpu_info": lambda: H200}
    # not configured: a live agent refuses (tensorrt) or falls back with the reason (auto)
    assert not plan_backend(anatomy, "auto", tmp_path, live_session=True, **probes).build_first
    # configured: the engine is built before the case, for tensorrt and for auto alike
    for preference in ("tensorrt", "auto"):
        plan = plan_backend(anatomy, preference, tmp_path, live_session=True, build_missing=True, **probes)
        assert plan.build_first and plan.backend == "tensorrt" and "(takes minutes)" in plan.reason
    # and where TensorRT is absent, auto still runs on ONNX Runtime
    plan = plan_backend(anatomy, "auto", tmp_path, live_session=True, build_missing=True, trt_version=_no_trt,
                        gpu_info=lambda: H200)
    assert plan.backend == "onnxruntime-cpu" and not plan.build_first


def test_build_engines_live_is_a_checked_setting(tmp_path):
    from or_agent.agent.config import load_config

    cfg = tmp_path / "agent.toml"
    cfg.write_text('[pipeline]\nbuild_engines_live = true\ncuda_graphs = true\n')
    p = load_config(str(cfg)).pipeline
    assert p.build_engines_live is True and p.cuda_graphs is True
    cfg.write_text('[pipeline]\nbuild_engines_live = "yes"\n')
    with pytest.raises(InputError, match="pipeline.build_engines_live"):
        load_config(str(cfg))


def test_modules_import_without_tensorrt_or_pycuda():
    import bench.gpu_check  # noqa: F401
    import or_agent.agent.offline.doctor
    import or_agent.pipelines.gpu  # noqa: F401


def test_missing_dependencies_raise_clear_errors():
    for mod in ("tensorrt", "pycuda"):
        try:
            __import__(mod)
            pytest.skip(f"{mod} is installed here")
        except ImportError:
            pass
    with pytest.raises(DependencyError, match=r"^TensorRT is not installed: install it on the OR box from NVIDIA's index"):
        engines.tensorrt_version()
    with pytest.raises(DependencyError, match=r"^no CUDA GPU found \(pycuda: "):
        gpu_info()
    from or_agent.pipelines.gpu import GpuPreprocessor

    with pytest.raises(DependencyError, match="no CUDA GPU found"):
        GpuPreprocessor(load_manifest(ROOT / "models" / "synthetic" / "anatomy").input_spec, (1080, 1920))


# --------------------------------------------------------------------------- CPU references

def _frame(h, w, seed=0):
    import cv2

    return cv2.GaussianBlur(np.random.default_rng(seed).integers(0, 256, (h, w, 3), np.uint8), (0, 0), 2)


@pytest.mark.parametrize("shape", [(1080, 1920), (2160, 3840), (480, 854)])
def test_gpu_arithmetic_reproduces_the_cpu_path(anatomy, shape):
    """The kernels' arithmetic (area average rounded to whole grey levels) is OpenCV's INTER_AREA."""
    from or_agent.pipelines.gpu import preprocess_reference, same_input
    from or_agent.pipelines.gpu.kernels import grey_level_differences
    from or_agent.pipelines.preprocess import ContentArea, crop_resize, normalise

    h, w = shape
    frame = _frame(h, w)
    area = ContentArea.from_circle(w / 2 + 3, h / 2 - 1, h / 2 - 7, w, h)
    for m in (anatomy, load_manifest(ROOT / "models" / "synthetic" / "phase"), load_manifest(ROOT / "models" / "synthetic" / "visibility")):
        spec = m.input_spec
        ref = preprocess_reference(frame, area, spec)
        cpu = normalise(crop_resize(frame, area, spec.height, spec.width), spec)
        assert ref.shape == cpu.shape == (1, 3, spec.height, spec.width) and ref.dtype == np.float32
        same, worst, share = same_input(ref, cpu, spec)
        assert same and share < 1e-4, (m.name, worst, share)
    # without the rounding (the exact area average) the inputs would differ by up to half a level everywhere
    from or_agent.pipelines.gpu import area_resize_reference

    spec = anatomy.input_spec
    crop = frame[area.y0:area.y1, area.x0:area.x1]
    exact = ((area_resize_reference(crop, spec.height, spec.width) / 255.0)[..., ::-1] - spec.mean) / spec.std
    exact = exact.transpose(2, 0, 1)[None]
    d = grey_level_differences(exact, normalise(crop_resize(frame, area, spec.height, spec.width), spec), spec)
    assert 0.4 < d.max() <= 0.5 + 1e-4 and (d > 0.01).mean() > 0.5


def test_reduce_reference_matches_anatomy_stage(anatomy):
    from or_agent.pipelines.gpu import reduce_logits_reference
    from or_agent.pipelines.preprocess import ContentArea
    from or_agent.pipelines.stages import SegmentationStage

    class Dummy(InferenceBackend):
        def run(self, inputs):
            return {}

    logits = np.random.default_rng(3).normal(size=(1, 13, 256, 448)).astype(np.float32)
    est = SegmentationStage(Dummy(anatomy)).post_process(logits, ContentArea.whole_frame(448, 256))
    cmap, counts, conf = reduce_logits_reference(logits)
    assert np.array_equal(cmap, est.class_map)
    assert np.allclose(counts / cmap.size, est.area_fraction) and np.allclose(conf, est.confidence)


# --------------------------------------------------------------------------- doctor

def test_doctor_on_this_machine(tmp_path):
    from or_agent.agent.offline.doctor import run_doctor

    lines = []
    code = run_doctor(cache_dir=tmp_path / "engines", out=lines.append, work_dir=tmp_path, audit_dir=tmp_path / "audit")
    text = "\n".join(lines)
    assert "ONNX Runtime" in text and "CPUExecutionProvider" in text
    for name in ("anatomy", "phase", "visibility"):
        assert f"ok    model {name}" in text
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        assert engines.TENSORRT_INSTALL_HINT in text
    assert code == 0, text
    assert lines[-1].startswith("READY")


def test_doctor_names_a_corrupt_model(tmp_path):
    from or_agent.agent.offline.doctor import run_doctor

    models = tmp_path / "models"
    shutil.copytree(ROOT / "models" / "synthetic", models, ignore=shutil.ignore_patterns("training", "*.py", "__pycache__"))
    onnx = models / "phase" / find_model("phase").file
    onnx.write_bytes(onnx.read_bytes()[:-100] + b"\0" * 100)
    lines = []
    code = run_doctor(models_dir=models, cache_dir=tmp_path / "engines", out=lines.append, work_dir=tmp_path,
                      audit_dir=None, probe_capture=False)
    text = "\n".join(lines)
    assert code != 0
    assert f"FAIL  {models / 'phase' / 'manifest.json'}: sha256: {onnx.name}" in text
    assert lines[-1].startswith("NOT READY")


def test_gpu_check_exits_cleanly_without_a_gpu(capsys):
    from bench.gpu_check import main

    try:
        gpu_info()
        pytest.skip("this machine has a GPU: run `python -m bench.gpu_check` instead")
    except DependencyError:
        pass
    assert main([]) == 0
    assert "gpu_check: skipped: no CUDA GPU found" in capsys.readouterr().out


# --------------------------------------------------------------------------- on a GPU

def _need_gpu():
    try:
        gpu_info()
    except DependencyError as exc:
        pytest.skip(str(exc))


def _need_tensorrt():
    try:
        engines.tensorrt_version()
    except DependencyError as exc:
        pytest.skip(str(exc))
    _need_gpu()


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(1080, 1920), (2160, 3840)])
def test_gpu_preprocess_matches_reference(shape, anatomy):
    _need_gpu()
    from or_agent.pipelines.gpu import GpuPreprocessor, preprocess_reference, same_input
    from or_agent.pipelines.preprocess import ContentArea, crop_resize, normalise

    h, w = shape
    frame = _frame(h, w, 1)
    area = ContentArea.from_circle(w / 2 + 3, h / 2 - 1, h / 2 - 7, w, h)
    spec = anatomy.input_spec
    with GpuPreprocessor(spec, (2160, 3840)) as pre:
        got = pre.run(frame, area)
        pinned = pre.pinned_frame(h, w)
        pinned[:] = frame
        again = pre.run(pinned, area)
    assert np.array_equal(got, again)
    assert same_input(got, preprocess_reference(frame, area, spec), spec)[0]
    assert same_input(got, normalise(crop_resize(frame, area, spec.height, spec.width), spec), spec)[0]


@pytest.mark.gpu
def test_gpu_reducer_matches_reference():
    _need_gpu()
    from or_agent.pipelines.gpu import GpuLogitsReducer, reduce_logits_reference

    logits = (np.random.default_rng(2).normal(size=(1, 13, 256, 448)) * 3).astype(np.float32)
    with GpuLogitsReducer(13, 256, 448) as red:
        cmap, counts, conf = red.reduce(logits)
        _, counts2, _ = red.reduce(logits, want_map=False)  # counters are reset between calls
    rmap, rcounts, rconf = reduce_logits_reference(logits)
    assert np.array_equal(cmap, rmap) and np.array_equal(counts, rcounts) and np.array_equal(counts2, rcounts)
    assert np.abs(conf - rconf).max() < 1e-4


@pytest.mark.tensorrt
@pytest.mark.gpu
def test_tensorrt_engine_matches_onnxruntime(tmp_path):
    _need_tensorrt()
    from or_agent.pipelines.backends.onnxruntime import OnnxRuntimeBackend

    m = find_model("phase")
    info, version = gpu_info(), engines.tensorrt_version()
    cache = engines.EngineCache(tmp_path)
    key = engines.EngineKey.for_model(m, info, version)
    engines.build_engine(m, cache, key, tmp_path / "timing.cache")
    assert cache.has(key) and (tmp_path / "timing.cache").is_file()
    backend, reason = choose_backend(m, "auto", tmp_path, live_session=True)
    assert backend.name == "tensorrt", reason
    ort = OnnxRuntimeBackend(m)
    try:
        rng = np.random.default_rng(0)
        s_t = s_o = np.zeros(m.state_inputs[0].shape, np.float32)
        for _ in range(5):  # the state stays on the device between steps (pointer swap)
            x = rng.normal(size=m.input.shape).astype(np.float32)
            a, b = backend.run({"frame": x, "state_in": s_t}), ort.run({"frame": x, "state_in": s_o})
            s_t, s_o = a["state_out"], b["state_out"]
            assert np.allclose(a["phase_logits"], b["phase_logits"], atol=1e-3)
    finally:
        backend.close()
        ort.close()


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))


def test_qualify_writes_an_acceptance_report(small_dataset, tmp_path):
    from tests.conftest import assert_qualification_consistent, run_cli

    clip = str(small_dataset / "video01.mp4")
    proc = run_cli("qualify", "--clip", clip, "--out", str(tmp_path / "q"), "--seconds", "3", "--frames", "20",
                   "--budget-ms", "1000")
    report = json.loads((tmp_path / "q" / "qualification.json").read_text())
    assert_qualification_consistent(report, proc.returncode)
    assert report["box"]["models"]["anatomy"]["sha256"] and report["box"]["onnxruntime"]
    assert report["box"]["preprocessing"] == "cpu: the models run on ONNX Runtime (CPU), so their inputs are made there"
    assert report["box"]["models"]["phase"]["cuda_graph"] == "n/a"  # ONNX Runtime has none
    # deployed backend and frame path here are the reference's own: identical, frame for frame
    assert report["agreement"]["anatomy_miou"] == 1.0 and report["agreement"]["frames_missing"] == 0
    assert report["agreement"]["frames"] == 20 and 15 <= report["agreement"]["phase_steps"] <= 20
    assert "PASS" in (tmp_path / "q" / "qualification.html").read_text()
    # an impossible latency budget fails that check, and the command says so with a non-zero exit
    proc = run_cli("qualify", "--clip", clip, "--out", str(tmp_path / "q2"), "--seconds", "2", "--frames", "5",
                   "--budget-ms", "0.001")
    report = json.loads((tmp_path / "q2" / "qualification.json").read_text())
    assert proc.returncode == 1 and report["verdict"] == "FAIL"
    assert_qualification_consistent(report, proc.returncode)
    assert [c["pass"] for c in report["checks"]][3] is False and "FAIL  capture->publish latency p99" in proc.stdout
