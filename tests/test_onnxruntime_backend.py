"""The CPU backend hands a model's final upsampling to OpenCV (``final_upsampling_split``): the outputs must
be ONNX Runtime's own to float rounding, the model file untouched, and any graph it cannot safely split
run whole."""

import hashlib

import numpy as np
import onnxruntime as ort
import pytest

from or_agent.pipelines.backends.onnxruntime import FinalUpsampling, OnnxRuntimeBackend, final_upsampling_split
from or_agent.pipelines.errors import ModelError
from or_agent.pipelines.manifest import load_manifest
from tests.conftest import ROOT


def _ort(model) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])


def _same_classes_but_float_ties(a: np.ndarray, b: np.ndarray, tie: float = 1e-5) -> bool:
    """The per-pixel winning class of two [N,C,H,W] logits agrees wherever b's top two are further apart
    than float rounding (two arithmetics may order a near-tie either way, differently on each CPU)."""
    top2 = np.sort(b, axis=1)[:, -2:]
    clear = (top2[:, 1] - top2[:, 0]) > tie
    return bool(np.array_equal(a.argmax(1)[clear], b.argmax(1)[clear]))


def _resize_net(path, *, scales=(1.0, 1.0, 2.0, 2.0), mode="linear", transform="half_pixel", consumed=False,
                exclude_outside=0, channels=5, height=6, width=7):
    """A real ONNX model: a 3x3 convolution to ``channels`` planes, then a Resize as the last node (or, with
    ``consumed``, a ReLU after it)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(3)
    weight = numpy_helper.from_array(rng.normal(size=(channels, 3, 3, 3)).astype(np.float32), "w")
    scale = numpy_helper.from_array(np.array(scales, np.float32), "scales")
    out_h, out_w = int(height * scales[2]), int(width * scales[3])
    nodes = [helper.make_node("Conv", ["x", "w"], ["features"], pads=[1, 1, 1, 1]),
             helper.make_node("Resize", ["features", "", "scales"], ["up" if consumed else "logits"], mode=mode,
                              coordinate_transformation_mode=transform, exclude_outside=exclude_outside)]
    if consumed:
        nodes.append(helper.make_node("Relu", ["up"], ["logits"]))
    graph = helper.make_graph(
        nodes, "resize_net", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, height, width])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, channels, out_h, out_w])],
        initializer=[weight, scale])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


@pytest.mark.parametrize("factors", [(2, 2), (3, 2), (4, 4), (1, 3)])
def test_a_final_linear_upsampling_is_split_off_and_computes_the_same_numbers(tmp_path, factors):
    path = _resize_net(tmp_path / "m.onnx", scales=(1.0, 1.0, *map(float, factors)))
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    model, split = final_upsampling_split(path)
    assert split == {"logits": FinalUpsampling("features", *factors)}
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before  # edited in memory only
    x = np.random.default_rng(0).normal(size=(1, 3, 6, 7)).astype(np.float32)
    low = _ort(model).run(["features"], {"x": x})[0]
    assert low.shape == (1, 5, 6, 7)
    ours = split["logits"].apply(low)
    whole = _ort(str(path)).run(["logits"], {"x": x})[0]
    assert ours.shape == whole.shape == (1, 5, 6 * factors[0], 7 * factors[1])
    np.testing.assert_allclose(ours, whole, rtol=0, atol=1e-5)
    assert _same_classes_but_float_ties(ours, whole)


@pytest.mark.parametrize("variant", [dict(mode="nearest"), dict(transform="align_corners"), dict(consumed=True),
                                     dict(exclude_outside=1), dict(scales=(1.0, 1.0, 1.5, 2.0)),
                                     dict(scales=(1.0, 2.0, 2.0, 2.0)),
                                     dict(scales=(1.0, 1.0, 0.5, 0.5), height=8, width=8)])
def test_what_it_cannot_split_exactly_runs_whole(tmp_path, variant):
    path = _resize_net(tmp_path / "m.onnx", **variant)
    assert final_upsampling_split(path) == (str(path), {})


def test_an_unreadable_model_is_left_to_onnx_runtime_to_name(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a protobuf at all")
    assert final_upsampling_split(bad) == (str(bad), {})


def test_the_upsampling_refuses_what_is_not_nchw():
    with pytest.raises(ModelError, match=r"expected an NCHW tensor to upsample, got shape \(5, 6\)"):
        FinalUpsampling("features", 2, 2).apply(np.zeros((5, 6), np.float32))
    with pytest.raises(ValueError, match="whole and at least 1"):
        FinalUpsampling("features", 0, 2)


def test_the_synthetic_anatomy_model_gives_onnx_runtimes_logits_from_the_split_backend():
    manifest = load_manifest(ROOT / "models" / "synthetic" / "anatomy" / "manifest.json")
    backend = OnnxRuntimeBackend(manifest)
    name = manifest.outputs[0].name
    assert backend._upsampled[name].factor_y == backend._upsampled[name].factor_x == 2
    x = np.random.default_rng(0).random((1, 3, manifest.input.shape[2], manifest.input.shape[3]), dtype=np.float32)
    ours = backend.run({manifest.input.name: x})[name]
    whole = _ort(str(manifest.model_path)).run([name], {manifest.input.name: x})[0]
    assert ours.shape == whole.shape and ours.dtype == np.float32
    np.testing.assert_allclose(ours, whole, rtol=0, atol=1e-4)
    assert _same_classes_but_float_ties(ours, whole)


def test_an_upsampling_appended_to_a_trained_model_is_the_one_the_backend_splits_off(tmp_path):
    """The training recipe's ``--append-upsampling`` (for a model whose checkpoint is gone) writes the
    half-pixel bilinear resize torch exports, so the backend hands it to OpenCV and the numbers are the same."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from or_agent.models.training.real.anatomy import append_final_upsampling

    rng = np.random.default_rng(5)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["logits"], pads=[1, 1, 1, 1])], "conv_net",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 6, 7])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 4, 6, 7])],
        initializer=[numpy_helper.from_array(rng.normal(size=(4, 3, 3, 3)).astype(np.float32), "w")])
    low_path, up_path = tmp_path / "low.onnx", tmp_path / "up.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(low_path))
    append_final_upsampling(low_path, up_path, 4)

    dims = [d.dim_value for d in onnx.load(str(up_path)).graph.output[0].type.tensor_type.shape.dim]
    assert dims == [1, 4, 24, 28]
    model, split = final_upsampling_split(up_path)
    assert split == {"logits": FinalUpsampling("logits_before_upsampling", 4, 4)}
    x = rng.normal(size=(1, 3, 6, 7)).astype(np.float32)
    low = _ort(str(low_path)).run(["logits"], {"x": x})[0]
    whole = _ort(str(up_path)).run(["logits"], {"x": x})[0]
    np.testing.assert_allclose(split["logits"].apply(low), whole, rtol=0, atol=1e-5)
    np.testing.assert_allclose(_ort(model).run(["logits_before_upsampling"], {"x": x})[0], low, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="at least 2"):
        append_final_upsampling(low_path, tmp_path / "none.onnx", 1)
