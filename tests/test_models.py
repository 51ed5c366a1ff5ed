"""The reference models: they run in ONNX Runtime with the documented shapes, TensorRT can take
them, and they still score on held-out synthetic surgery what their manifests say."""

import json

import numpy as np
import onnx
import pytest

from or_agent.pipelines.backends.onnxruntime import OnnxRuntimeBackend
from or_agent.pipelines.errors import ModelError
from or_agent.pipelines.manifest import discover, find_model, load_manifest
from or_agent.pipelines.preprocess import ContentArea
from or_agent.pipelines.stages import PhaseStage, SegmentationStage, VisibilityStage
from tests.conftest import ROOT, assert_runs_with_documented_shapes

MODELS = ROOT / "models" / "synthetic"
# Ops every TensorRT 10/11 ONNX parser supports.
TENSORRT_OPS = {"Conv", "Relu", "Resize", "Concat", "Gemm", "Sigmoid", "Tanh", "Mul", "Add", "Sub",
                "ReduceMean", "ReduceMax", "Slice", "Constant", "Shape", "Gather", "Unsqueeze", "Cast", "Div"}


@pytest.mark.parametrize("path", discover(MODELS), ids=lambda p: p.parent.name)
def test_model_runs_with_documented_shapes(path):
    assert_runs_with_documented_shapes(load_manifest(path))


@pytest.mark.parametrize("path", discover(MODELS), ids=lambda p: p.parent.name)
def test_model_is_tensorrt_friendly(path):
    model = onnx.load(str(load_manifest(path).model_path))
    assert model.opset_import[0].version <= 17
    ops = {n.op_type for n in model.graph.node}
    assert ops <= TENSORRT_OPS, f"ops outside the TensorRT set: {ops - TENSORRT_OPS}"
    for tensor in list(model.graph.input) + list(model.graph.output):
        dims = [d.dim_value for d in tensor.type.tensor_type.shape.dim]
        assert all(d > 0 for d in dims), f"{tensor.name} has a dynamic dimension"


def test_phase_model_is_causal_and_carries_state():
    """Same frames, different earlier history -> different output; the state is the only memory."""
    stage = PhaseStage(OnnxRuntimeBackend(find_model("phase", MODELS)))
    rng = np.random.default_rng(1)
    frames = [rng.integers(0, 255, (480, 854, 3), dtype=np.uint8) for _ in range(4)]
    area = ContentArea.whole_frame(854, 480)
    xs = [stage.pre_process(f, area) for f in frames]
    stage.reset()
    a = [stage.predict(x) for x in xs]
    stage.reset()
    b = [stage.predict(x) for x in xs]
    assert all(np.array_equal(p, q) for p, q in zip(a, b)), "a reset must restore the start state"
    stage.reset()
    stage.predict(xs[3])
    c = stage.predict(xs[0])
    assert not np.allclose(c, a[0]), "output must depend on the history through the state"


def test_stage_refuses_a_model_of_another_task():
    with pytest.raises(ModelError, match="a phase stage needs a task 'phase' model"):
        PhaseStage(OnnxRuntimeBackend(find_model("visibility", MODELS)))


def test_models_reach_their_recorded_accuracy_on_held_out_surgery(held_out_video):
    from or_agent.models.evaluate import evaluate_dataset

    s = evaluate_dataset(held_out_video, models_dir=MODELS).summary()
    anatomy = json.loads((MODELS / "anatomy" / "manifest.json").read_text())["metrics"]
    phase = json.loads((MODELS / "phase" / "manifest.json").read_text())["metrics"]
    vis = json.loads((MODELS / "visibility" / "manifest.json").read_text())["metrics"]
    # One of the three held-out videos: within tolerance of the three-video figures, and the goals.
    assert s["anatomy_miou"] >= anatomy["anatomy_miou"] - 0.05 and s["anatomy_miou"] >= 0.70
    assert s["phase_accuracy"] >= phase["phase_accuracy"] - 0.06 and s["phase_accuracy"] >= 0.85
    assert s["out_of_body_recall"] >= vis["out_of_body_recall"] - 0.02 and s["out_of_body_recall"] >= 0.97
    assert s["out_of_body_false_positive_rate"] <= 0.02


def test_stages_produce_valid_typed_results(small_dataset):
    import cv2

    cap = cv2.VideoCapture(str(small_dataset / "video01.mp4"))
    _ok, frame = cap.read()
    cap.release()
    from or_agent.pipelines.preprocess import detect_content_area

    area = detect_content_area(frame)
    a = SegmentationStage(OnnxRuntimeBackend(find_model("segmentation", MODELS)))(frame, area)
    assert a.class_map.shape == (256, 448) and abs(sum(a.area_fraction) - 1) < 1e-6
    assert all(0 <= c <= 1 for c in a.confidence)
    v = VisibilityStage(OnnxRuntimeBackend(find_model("visibility", MODELS)))(frame, area)
    assert 0 <= v.p_out_of_body <= 1
    p = PhaseStage(OnnxRuntimeBackend(find_model("phase", MODELS)))(frame, area, 0.0)
    assert p.name in ("Preparation", "CalotTriangleDissection") and p.time_in_phase_s == 0.0


def test_phase_stage_applies_the_manifest_temperature(tmp_path):
    import shutil

    from or_agent.calibration.temperature import apply_temperature
    from or_agent.pipelines.postprocess import softmax

    shutil.copytree(MODELS / "phase", tmp_path / "phase")
    apply_temperature(tmp_path / "phase" / "manifest.json", 2.0, 0.05, 0.02)
    hot = PhaseStage(OnnxRuntimeBackend(load_manifest(tmp_path / "phase")))
    assert hot.temperature == 2.0
    logits = np.array([[4.0, 1.0, 0.0, 0.0, 0.0, 0.0, -1.0]], np.float32)
    est = hot.post_process(logits, t_s=0.0)
    assert np.allclose(est.probabilities, softmax(logits[0] / 2.0))


def test_shipped_temperature_was_fitted_elsewhere_and_improves_held_out_likelihood(held_out_video):
    from or_agent.calibration.temperature import collect_phase_logits, nll

    m = find_model("phase")
    cal = m.extra["calibration"]
    t = cal["temperature"]
    assert cal["temperature_fit"]["folders"] == ["synth-seed3-n6-x25-m25"]  # the calibration split, not held-out
    assert cal["temperature_fit"]["check"]["ece_after"] < cal["temperature_fit"]["check"]["ece_before"]
    logits, labels = collect_phase_logits([held_out_video / "video01.mp4"], m)
    assert len(labels) > 400
    assert nll(logits, labels, t) < nll(logits, labels)  # better probabilities on a surgery not in the fit
    assert PhaseStage(OnnxRuntimeBackend(m)).temperature == t
