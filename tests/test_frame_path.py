"""The frame path: where model inputs are made and segmentation logits reduced.

On every machine: the choice and its reasons; the buffer pool (taken, handed back, never leaked,
exhaustion raised not waited on); the pipeline on the CPU reference of the GPU path (exact area
averaging, pooled buffers handed to the backends as device tensors, the reduction next to the
model) agreeing with the CPU path on a held-out surgery with ground truth. On a GPU (``-m gpu``):
the pipeline on the pycuda kernels against the CPU path.
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from or_agent.pipelines.backends import DeviceTensor, InferenceBackend
from or_agent.pipelines.backends.onnxruntime import OnnxRuntimeBackend
from or_agent.pipelines.errors import DependencyError, InputError, ModelError
from or_agent.pipelines.frame_path import GpuFramePath, HostFramePath, ReferenceFramePath, _HostSlot, _SlotPool, choose_frame_path
from or_agent.pipelines.manifest import find_model
from or_agent.pipelines.metrics import confusion, mean_iou_present
from or_agent.pipelines.postprocess import SegmentationReduction, reduce_logits
from or_agent.pipelines.preprocess import ContentArea
from or_agent.pipelines.runtime import Pipeline, PipelineConfig
from or_agent.pipelines.sources import FirstFrames, VideoFileSource
from or_agent.pipelines.stages import PhaseStage, SegmentationStage, VisibilityStage
from or_agent.synth.dataset import read_phase_file
from tests.conftest import ROOT

MODELS = ROOT / "models" / "synthetic"


def stages():
    return (SegmentationStage(OnnxRuntimeBackend(find_model("segmentation", MODELS))),
            PhaseStage(OnnxRuntimeBackend(find_model("phase", MODELS))),
            VisibilityStage(OnnxRuntimeBackend(find_model("visibility", MODELS))))


def run(video, frame_path, limit=None, anatomy_every=1, stage_set=None):
    results = []
    source = VideoFileSource(video)
    p = Pipeline(FirstFrames(source, limit) if limit else source, (stage_set or stages()),
                 PipelineConfig(anatomy_every=anatomy_every, keep_images=False), frame_path=frame_path)
    p.subscribe(results.append)
    p.run()
    return results


# --------------------------------------------------------------------------- choice

def _no_gpu():
    raise DependencyError("no CUDA GPU found (pycuda: not installed)")


def test_choice_and_its_reasons():
    path, why = choose_frame_path("cpu", ["tensorrt"])
    assert isinstance(path, HostFramePath) and why == "cpu: requested"
    path, why = choose_frame_path("auto", ["onnxruntime-cpu"] * 3, gpu_factory=_no_gpu)
    assert isinstance(path, HostFramePath)
    assert why == "cpu: the models run on ONNX Runtime (CPU), so their inputs are made there"
    path, why = choose_frame_path("auto", ["tensorrt", "onnxruntime-cpu"], gpu_factory=_no_gpu)
    assert isinstance(path, HostFramePath)
    assert why == "cpu: the GPU kernels are unavailable (no CUDA GPU found (pycuda: not installed))"
    made = ReferenceFramePath()
    path, why = choose_frame_path("auto", ["tensorrt"], gpu_factory=lambda: made)
    assert path is made and why == "gpu: pycuda kernels feed the TensorRT engines on the device"
    with pytest.raises(InputError, match=r"^preprocessing: must be one of auto, cpu, gpu, got 'cuda'$"):
        choose_frame_path("cuda", [])


def test_gpu_requested_on_a_machine_without_one_says_so():
    try:
        GpuFramePath().close()
    except DependencyError as exc:
        assert str(exc).startswith("no CUDA GPU found (pycuda:") or "CUDA kernel" in str(exc)
        with pytest.raises(DependencyError):
            choose_frame_path("gpu", ["tensorrt"])
    else:
        pytest.skip("this machine has a GPU: the refusal cannot be shown")


def test_config_refuses_an_unknown_preprocessing(tmp_path):
    from or_agent.agent.config import load_config

    cfg = tmp_path / "agent.toml"
    cfg.write_text('[pipeline]\npreprocessing = "fpga"\n')
    with pytest.raises(InputError, match=r"agent.toml: pipeline.preprocessing: must be auto, cpu or gpu, got 'fpga'$"):
        load_config(str(cfg))


# --------------------------------------------------------------------------- buffers

def test_pool_hands_buffers_back_and_raises_when_dry():
    pool = _SlotPool(_HostSlot, limit=2)
    a, b = pool.acquire("phase", (1, 3, 4, 4)), pool.acquire("phase", (1, 3, 4, 4))
    assert a is not b and pool.in_use() == 2
    with pytest.raises(ModelError, match=r"^phase: all 2 model-input buffers are in use \(a pipeline stage did not hand one back\)$"):
        pool.acquire("phase", (1, 3, 4, 4))
    other = pool.acquire("visibility", (1, 3, 2, 2))  # each model has its own buffers
    pool.release(a)
    pool.release(a)  # twice: still one free buffer, not two
    assert pool.acquire("phase", (1, 3, 4, 4)) is a
    with pytest.raises(ModelError):
        pool.acquire("phase", (1, 3, 4, 4))
    pool.reset()  # a new run: nothing is in flight
    assert pool.in_use() == 0 and len(pool.slots()) == 3 and other in pool.slots()


def test_prepare_gives_buffers_back_when_it_fails():
    anatomy, phase, vis = stages()
    path = ReferenceFramePath()
    frame = np.full((120, 160, 3), 90, np.uint8)
    bad_area = ContentArea(80, 60, 70, 0, 0, 170, 120)  # wider than the frame
    with pytest.raises(ValueError, match=r"^content area 0,0..170,120 extends beyond the 160x120 frame$"):
        path.prepare(frame, bad_area, [vis, phase, anatomy])
    assert path.pool.in_use() == 0

    def failing(frame, area, targets):
        raise RuntimeError("kernel launch failed")

    path._fill = failing  # a failure after the buffers were taken hands them all back
    with pytest.raises(RuntimeError):
        path.prepare(frame, ContentArea.whole_frame(160, 120), [vis, phase, anatomy])
    assert path.pool.in_use() == 0


def test_reduction_message_matches_the_cpu_reduction():
    anatomy = stages()[0]
    logits = (np.random.default_rng(4).normal(size=(1, 13, 256, 448)) * 3).astype(np.float32)
    area = ContentArea.whole_frame(448, 256)
    a = anatomy.post_process(logits, area)
    b = anatomy.post_process(SegmentationReduction(*reduce_logits(logits)), area)
    assert np.array_equal(a.class_map, b.class_map) and a.area_fraction == b.area_fraction and a.confidence == b.confidence
    cmap, counts, conf = reduce_logits(logits)
    with pytest.raises(ValueError, match="counts add up to"):
        SegmentationReduction(cmap, counts + 1, conf)
    with pytest.raises(ModelError, match="4 classes in the output, the manifest labels 13"):
        anatomy.post_process(SegmentationReduction(*reduce_logits(logits[:, :4])), area)


def test_onnxruntime_takes_a_device_tensor_as_its_input():
    vis = stages()[2]
    path = ReferenceFramePath()
    frame = np.random.default_rng(1).integers(0, 255, (480, 854, 3), np.uint8)
    area = ContentArea.whole_frame(854, 480)
    (slot,) = path.prepare(frame, area, [vis])
    assert isinstance(slot, DeviceTensor) and slot.device_ptr is None and slot.shape == (1, 3, 64, 112)
    got = vis.predict(slot)
    want = vis.predict(slot.to_host().copy())
    path.release(slot)
    assert np.array_equal(got, want) and path.pool.in_use() == 0


class _Counting(InferenceBackend):
    """Records what the pipeline hands to the backend (to show inputs arrive as device tensors)."""

    name = "counting"

    def __init__(self, inner):
        super().__init__(inner.manifest)
        self.inner, self.kinds = inner, set()

    def run(self, inputs, *, device_outputs=()):
        self.kinds |= {type(v).__name__ for v in inputs.values()}
        return self.inner.run(inputs)


# --------------------------------------------------------------------------- the pipeline on the GPU path's arithmetic

def test_pipeline_on_the_gpu_paths_reference_agrees_with_the_cpu_path(held_out_video):
    video = held_out_video / "video01.mp4"
    limit = 1000  # 40 s: every phase transition of the opening, an out-of-body excursion or not
    host = run(video, HostFramePath(), limit, anatomy_every=5)
    anatomy, phase, vis = stages()
    anatomy = SegmentationStage(_Counting(anatomy.backend))
    ref_path = ReferenceFramePath()
    ref = run(video, ref_path, limit, anatomy_every=5, stage_set=(anatomy, phase, vis))
    assert [r.seq for r in ref] == [r.seq for r in host] == list(range(limit))
    assert "_HostSlot" in anatomy.backend.kinds  # inputs went through the pooled buffers
    assert ref_path.pool.in_use() == 0, "every buffer was handed back"
    assert 0 < len(ref_path.pool.slots()) <= 3 * ref_path.POOL_LIMIT

    n = 13
    conf = np.zeros((n, n), np.int64)
    for a, b in zip(host, ref):
        if a.segmentation_fresh and b.segmentation_fresh:
            conf += confusion(a.segmentation.class_map, b.segmentation.class_map, n)
    # The same input (the GPU arithmetic is INTER_AREA's), hence the same outputs
    assert mean_iou_present(conf) > 0.999
    vis_same = np.mean([a.out_of_body == b.out_of_body for a, b in zip(host, ref)])
    assert vis_same == 1.0
    truth = read_phase_file(held_out_video / "video01-phase.txt")[:limit]
    for results in (host, ref):
        pred = np.array([r.phase.phase if r.phase else -1 for r in results])
        assert (pred == truth).mean() > 0.85
    phase_same = np.mean([a.phase.phase == b.phase.phase for a, b in zip(host, ref) if a.phase and b.phase])
    assert phase_same == 1.0


def test_a_stopped_run_leaves_no_buffer_taken_for_the_next(small_dataset):
    import time

    path = ReferenceFramePath()
    s = stages()
    p = Pipeline(VideoFileSource(small_dataset / "video01.mp4", paced=True), s, frame_path=path)
    p.start()
    time.sleep(1.0)
    p.stop()  # frames were in flight: their buffers are still marked taken
    results = run(small_dataset / "video01.mp4", path, limit=60, stage_set=s)
    assert len(results) == 60 and path.pool.in_use() == 0


# --------------------------------------------------------------------------- on a GPU

@pytest.mark.gpu
def test_pipeline_on_the_gpu_kernels_agrees_with_the_cpu_path(held_out_video, tmp_path):
    try:
        gpu = GpuFramePath()
    except DependencyError as exc:
        pytest.skip(str(exc))
    import cv2

    # A 1080p copy of the opening, as the OR tower delivers it.
    src = cv2.VideoCapture(str(held_out_video / "video01.mp4"))
    out = cv2.VideoWriter(str(tmp_path / "hd.avi"), cv2.VideoWriter_fourcc(*"MJPG"), 25, (1920, 1080))
    for _ in range(250):
        ok, f = src.read()
        if not ok:
            break
        out.write(cv2.resize(f, (1920, 1080), interpolation=cv2.INTER_LINEAR))
    src.release()
    out.release()
    with gpu:
        host = run(tmp_path / "hd.avi", HostFramePath(), anatomy_every=2)
        dev = run(tmp_path / "hd.avi", gpu, anatomy_every=2)
        assert gpu.pool.in_use() == 0
    assert [r.seq for r in dev] == [r.seq for r in host]
    conf = np.zeros((13, 13), np.int64)
    for a, b in zip(host, dev):
        if a.segmentation_fresh and b.segmentation_fresh:
            conf += confusion(a.segmentation.class_map, b.segmentation.class_map, 13)
    assert mean_iou_present(conf) > 0.99  # qualify asks >= 0.98 of the deployed path
    assert np.mean([a.phase.phase == b.phase.phase for a, b in zip(host, dev) if a.phase and b.phase]) > 0.99


def test_asking_for_the_gpu_frame_path_without_a_gpu_is_one_line(small_dataset, tmp_path):
    from tests.conftest import run_cli

    try:
        GpuFramePath().close()
        pytest.skip("this machine has a GPU: the refusal cannot be shown")
    except DependencyError:
        pass
    proc = run_cli("qualify", "--preprocessing", "gpu", "--clip", str(small_dataset / "video01.mp4"),
                   "--out", str(tmp_path / "q"))
    assert proc.returncode == 5
    assert proc.stderr.strip().splitlines()[-1].startswith("or-agent: error: no CUDA GPU found (pycuda: ")
    assert "Traceback" not in proc.stderr and not (tmp_path / "q").exists()


def test_the_cpu_path_makes_a_divisible_size_from_the_larger_input_within_one_grey_level():
    from types import SimpleNamespace

    from or_agent.pipelines.preprocess import InputSpec, crop_resize, detect_content_area, normalise

    rng = np.random.default_rng(5)
    frame = cv2.GaussianBlur(rng.integers(0, 256, (1080, 1920, 3), dtype=np.uint8), (0, 0), 3)
    cv2.circle(frame, (960, 540), 700, (0, 0, 0), 400)  # a dark border: an endoscope's circle
    area = detect_content_area(frame)
    spec = lambda h, w: InputSpec(h, w, "RGB", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))  # noqa: E731
    stages = [SimpleNamespace(spec=spec(64, 112)), SimpleNamespace(spec=spec(256, 448)), SimpleNamespace(spec=spec(112, 192))]
    made = HostFramePath().prepare(frame, area, stages)
    for s, x in zip(stages, made):
        direct = normalise(crop_resize(frame, area, s.spec.height, s.spec.width), s.spec)
        assert x.shape == direct.shape == (1, 3, s.spec.height, s.spec.width)
        # one grey level, standardised: 1 / (255 * std) at most
        assert np.abs(x - direct).max() <= 1.0 / (255 * min(s.spec.std)) + 1e-5, s.spec
    assert np.array_equal(made[1], normalise(crop_resize(frame, area, 256, 448), stages[1].spec))  # the largest: exact
    assert np.array_equal(made[2], normalise(crop_resize(frame, area, 112, 192), stages[2].spec))  # 256/112 not whole
