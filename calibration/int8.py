"""INT8 by explicit quantisation: a Q/DQ ONNX model with the scales in the file.

TensorRT 11 has no INT8 builder flag and no implicit calibrator: an INT8 engine is built from an
ONNX file whose QuantizeLinear/DequantizeLinear nodes say where and how tensors are quantised.
This module writes such a file with ONNX Runtime's static quantiser:

- calibration frames from recorded videos (``calibration.sampling``: the pipeline's preprocessing,
  stratified by phase and visibility state where labels exist, recurrent state from the FP32
  model stepped through the video);
- ``quant_pre_process`` first (ONNX Runtime's basic graph optimisation and ONNX shape inference;
  symbolic shape inference is skipped: the models have static shapes, and it would need sympy);
- ``quantize_static`` in QDQ format, int8 activations and weights, **symmetric** (every zero point
  0, as TensorRT requires), per-channel weights, MinMax calibration. Two options on top, both for
  TensorRT's ONNX parser: biases stay float (it refuses a DequantizeLinear of an int32 bias and
  fuses float biases itself) and each consumer gets its own Q/DQ pair (it cannot share them);
- the opset stays the source's (<= 17), unused opset imports are dropped, the ONNX checker and an
  ONNX Runtime run with the manifest's shapes must pass before anything is written.

Output: ``<out>/<name>-int8/model.onnx`` and ``manifest.json`` (the FP32 manifest with the new name,
``precision: "int8"``, the new sha256 and a ``calibration`` block: method, frames, coverage, the
source videos' names).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from or_agent.calibration.common import (
    check_model,
    default_opset,
    derived_manifest,
    list_videos,
    require_onnx,
    resolve_model,
    scratch_dir,
    strip_unused_opsets,
    write_model_dir,
)
from or_agent.calibration.sampling import CalibrationSet, coverage_lines, sample_frames
from or_agent.pipelines.errors import InputError, ModelError
from or_agent.pipelines.manifest import ModelManifest

DEFAULT_OUT = Path("out") / "models-int8"
DEFAULT_FRAMES = 256
QUANT_EXTRA_OPTIONS = {
    "ActivationSymmetric": True,
    "WeightSymmetric": True,
    "QuantizeBias": False,  # TensorRT: no DequantizeLinear of int32 biases; it fuses float biases
    "DedicatedQDQPair": True,  # TensorRT: a Q/DQ pair cannot be shared between consumers
}


def qdq_summary(model) -> dict:
    """Q/DQ node counts and the zero points that are not all zero (should be none)."""
    from onnx import numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    consts = {n.output[0]: n.attribute[0].t for n in model.graph.node if n.op_type == "Constant" and n.attribute}
    counts = {"QuantizeLinear": 0, "DequantizeLinear": 0}
    nonzero, missing, dtypes = [], [], set()
    for n in model.graph.node:
        if n.op_type not in counts:
            continue
        counts[n.op_type] += 1
        if len(n.input) < 3 or not n.input[2]:
            missing.append(n.name)  # no zero point input: defaults to 0, still symmetric
            continue
        t = inits.get(n.input[2]) or consts.get(n.input[2])
        if t is None:
            nonzero.append(f"{n.name} (zero point is not a constant)")
            continue
        zp = numpy_helper.to_array(t)
        dtypes.add(str(zp.dtype))
        if np.any(zp != 0):
            nonzero.append(n.name)
    return {**counts, "zero_point_types": sorted(dtypes), "nonzero_zero_points": nonzero,
            "without_zero_point": len(missing)}


def _reader(cal: CalibrationSet):
    """ONNX Runtime's ``CalibrationDataReader`` over a calibration set."""
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        """Feeds are normalised on the fly: a few hundred anatomy inputs would hold ~0.4 GB."""

        def __init__(self):
            self._it = cal.feeds()

        def get_next(self):
            return next(self._it, None)

        def rewind(self):
            self._it = cal.feeds()

        def __len__(self):
            return len(cal.frames)

    return Reader()


def smoke_run(model_bytes: bytes, manifest: ModelManifest, where: str) -> dict[str, np.ndarray]:
    """Run the converted model once in ONNX Runtime with the manifest's shapes; check the outputs'
    names, shapes, float32 type and finiteness."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    try:
        sess = ort.InferenceSession(model_bytes, opts, providers=["CPUExecutionProvider"])
        rng = np.random.default_rng(0)
        feeds = {manifest.input.name: rng.standard_normal(manifest.input.shape).astype(np.float32)}
        feeds.update({s.name: np.zeros(s.shape, np.float32) for s in manifest.state_inputs})
        names = [o.name for o in manifest.outputs]
        values = sess.run(names, feeds)
    except Exception as exc:
        raise ModelError(f"{where}: ONNX Runtime cannot run the converted model ({str(exc).splitlines()[0]})") from None
    out = dict(zip(names, values))
    for o in manifest.outputs:
        v = out[o.name]
        if tuple(v.shape) != tuple(o.shape) or v.dtype != np.float32 or not np.all(np.isfinite(v)):
            raise ModelError(f"{where}: output {o.name} is {v.dtype} {list(v.shape)}"
                             f"{'' if np.all(np.isfinite(v)) else ' with non-finite values'}, "
                             f"the manifest says float32 {list(o.shape)}")
    return out


def quantize_int8(manifest: ModelManifest, cal: CalibrationSet, out_dir: str | Path = DEFAULT_OUT,
                  name: str | None = None) -> ModelManifest:
    """Write the Q/DQ INT8 model of ``manifest``'s model, calibrated on ``cal``; returns its manifest."""
    onnx = require_onnx()
    import onnxruntime
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    name = name or f"{manifest.name}-int8"
    where = f"{name}"
    with scratch_dir("int8") as tmp:
        pre, q = Path(tmp) / "pre.onnx", Path(tmp) / "int8.onnx"
        try:
            quant_pre_process(str(manifest.model_path), str(pre), skip_symbolic_shape=True)
            quantize_static(str(pre), str(q), _reader(cal), quant_format=QuantFormat.QDQ,
                            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, per_channel=True,
                            calibrate_method=CalibrationMethod.MinMax, extra_options=dict(QUANT_EXTRA_OPTIONS))
        except Exception as exc:
            raise ModelError(f"{manifest.model_path}: INT8 quantisation failed "
                             f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
        model = onnx.load(str(q))
    strip_unused_opsets(model)
    check_model(model, where)
    qdq = qdq_summary(model)
    if not qdq["QuantizeLinear"] or not qdq["DequantizeLinear"]:
        raise ModelError(f"{where}: the quantiser inserted no Q/DQ nodes")
    if qdq["nonzero_zero_points"]:
        raise ModelError(f"{where}: zero points not 0 (not symmetric) at {', '.join(qdq['nonzero_zero_points'][:3])}")
    data = model.SerializeToString()
    smoke_run(data, manifest, where)
    block = {
        "method": ("explicit quantisation (QuantizeLinear/DequantizeLinear in the ONNX file), onnxruntime "
                   "quantize_static after quant_pre_process: MinMax calibration, int8 activations and weights, "
                   "symmetric (all zero points 0), per-channel weights, float biases, dedicated Q/DQ pairs"),
        "tool": {"onnxruntime": onnxruntime.__version__, "onnx": onnx.__version__,
                 "quant_format": "QDQ", "activation_type": "QInt8", "weight_type": "QInt8", "per_channel": True,
                 "calibrate_method": "MinMax", "extra_options": dict(QUANT_EXTRA_OPTIONS)},
        "opset": default_opset(model),
        "qdq_nodes": {k: qdq[k] for k in ("QuantizeLinear", "DequantizeLinear")},
        "frames": len(cal.frames),
        "videos": list(cal.videos),
        "coverage": cal.coverage,
    }
    return write_model_dir(out_dir, name, data, lambda sha: derived_manifest(manifest, name, "int8", sha, block))


def calibrate_int8(model: str, videos: Sequence[str], out_dir: str | Path = DEFAULT_OUT, frames: int = DEFAULT_FRAMES,
                   models_dir=None, log=print) -> ModelManifest:
    """``or-agent calibrate int8``: sample, print the coverage, quantise, write."""
    if frames < 1:
        raise InputError(f"--frames must be at least 1, got {frames}")
    m = resolve_model(model, models_dir)
    if m.extra.get("precision", "fp32") != "fp32":
        raise InputError(f"{model}: is a {m.extra['precision']} model; calibrate the FP32 model it came from")
    paths = list_videos(videos)
    log(f"sampling {frames} calibration frames for {m.name} from {len(paths)} video(s)")
    cal = sample_frames(paths, m, frames, models_dir=models_dir, log=log)
    for line in coverage_lines(cal.coverage):
        log(line)
    out = quantize_int8(m, cal, out_dir)
    qdq = out.extra["calibration"]["qdq_nodes"]
    log(f"wrote {out.model_path} ({out.model_path.stat().st_size / 1e6:.2f} MB, opset "
        f"{out.extra['calibration']['opset']}, {qdq['QuantizeLinear']} QuantizeLinear, {qdq['DequantizeLinear']} "
        f"DequantizeLinear, zero points 0) and {out.path}; sha256 {out.sha256[:12]}")
    return out
