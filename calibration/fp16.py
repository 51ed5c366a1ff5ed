"""FP16: float16 weights and activations, float32 inputs and outputs.

TensorRT 11 builds the precision the ONNX file carries, so an FP16 engine needs an FP16 file.
The conversion is ONNX Runtime's ``onnxruntime.transformers.float16.convert_float_to_float16``
with ``keep_io_types=True``: the network computes in float16 between a Cast after each input
and a Cast before each output, so the agent feeds and reads float32 as before (recurrent state
included). Tensors that must stay float32 (a Resize's scales, ops without float16 support) are
kept float32 by the converter behind Casts; constants it stored as float16 and cast straight back
are restored to their exact float32 values, so a Resize keeps its exact output size.

Output: ``<out>/<name>-fp16/model.onnx`` and ``manifest.json`` (``precision: "fp16"``). ONNX Runtime
runs it on the CPU (slower there than FP32: float16 is for the GPU).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from or_agent.calibration.common import (
    check_model,
    default_opset,
    derived_manifest,
    require_onnx,
    resolve_model,
    strip_unused_opsets,
    toposort,
    write_model_dir,
)
from or_agent.calibration.int8 import smoke_run
from or_agent.pipelines.errors import InputError, ModelError
from or_agent.pipelines.manifest import ModelManifest

DEFAULT_OUT = Path("out") / "models-fp16"


def _float_constants(model) -> dict[str, np.ndarray]:
    from onnx import TensorProto, numpy_helper

    out = {}
    for n in model.graph.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value" \
                and n.attribute[0].t.data_type == TensorProto.FLOAT:
            out[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    return out


def _restore_float32_constants(model, originals: dict[str, np.ndarray]) -> int:
    """Undo float32 -> float16 -> Cast(float32) round trips of constants; returns how many."""
    from onnx import TensorProto, numpy_helper

    g = model.graph
    consumers: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    producers = {o: n for n in g.node for o in n.output}
    graph_outputs = {o.name for o in g.output}
    restored = 0
    for name, value in originals.items():
        const = producers.get(name)
        users = consumers.get(name, [])
        casts = [u for u in users if u.op_type == "Cast"
                 and any(a.name == "to" and a.i == TensorProto.FLOAT for a in u.attribute)]
        if const is None or const.op_type != "Constant" or not casts or len(casts) != len(users) or name in graph_outputs:
            continue
        if any(c.output[0] in graph_outputs for c in casts):
            continue
        const.attribute[0].t.CopyFrom(numpy_helper.from_array(value.astype(np.float32), const.attribute[0].t.name))
        for c in casts:
            for u in consumers.get(c.output[0], []):
                for k, i in enumerate(u.input):
                    if i == c.output[0]:
                        u.input[k] = name
            g.node.remove(c)
        restored += 1
    return restored


def float_types(model) -> dict:
    """Element types of the graph's inputs, outputs and float initializers (for checks and tests)."""
    from onnx import TensorProto

    def tname(t):
        return TensorProto.DataType.Name(t).lower()

    return {
        "inputs": {i.name: tname(i.type.tensor_type.elem_type) for i in model.graph.input},
        "outputs": {o.name: tname(o.type.tensor_type.elem_type) for o in model.graph.output},
        "initializers": sorted({tname(t.data_type) for t in model.graph.initializer
                                if t.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE)}),
    }


def convert_fp16(manifest: ModelManifest, out_dir: str | Path = DEFAULT_OUT, name: str | None = None) -> ModelManifest:
    """Write the float16 model of ``manifest``'s model; returns its manifest."""
    onnx = require_onnx()
    import onnxruntime

    try:
        from onnxruntime.transformers.float16 import convert_float_to_float16
    except ImportError as exc:
        raise ModelError(f"onnxruntime {onnxruntime.__version__} has no float16 converter ({exc})") from None
    name = name or f"{manifest.name}-fp16"
    model = onnx.load(str(manifest.model_path))
    originals = _float_constants(model)
    try:
        half = convert_float_to_float16(model, keep_io_types=True)
    except Exception as exc:
        raise ModelError(f"{manifest.model_path}: float16 conversion failed ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    restored = _restore_float32_constants(half, originals)
    toposort(half)
    strip_unused_opsets(half)
    check_model(half, name)
    types = float_types(half)
    if set(types["inputs"].values()) != {"float"} or set(types["outputs"].values()) != {"float"}:
        raise ModelError(f"{name}: inputs and outputs must stay float32, got {types['inputs']} {types['outputs']}")
    data = half.SerializeToString()
    smoke_run(data, manifest, name)
    block = {
        "method": ("float16 weights and activations, float32 inputs and outputs: "
                   "onnxruntime.transformers.float16.convert_float_to_float16(keep_io_types=True)"
                   + (f"; {restored} constant(s) read as float32 (such as Resize scales) kept exact in float32"
                      if restored else "")),
        "tool": {"onnxruntime": onnxruntime.__version__, "onnx": onnx.__version__, "keep_io_types": True},
        "opset": default_opset(half),
        "initializer_types": types["initializers"],
    }
    return write_model_dir(out_dir, name, data, lambda sha: derived_manifest(manifest, name, "fp16", sha, block))


def calibrate_fp16(model: str, out_dir: str | Path = DEFAULT_OUT, models_dir=None, log=print) -> ModelManifest:
    """``or-agent calibrate fp16``."""
    m = resolve_model(model, models_dir)
    if m.extra.get("precision", "fp32") != "fp32":
        raise InputError(f"{model}: is a {m.extra['precision']} model; convert the FP32 model it came from")
    out = convert_fp16(m, out_dir)
    log(f"wrote {out.model_path} ({out.model_path.stat().st_size / 1e6:.2f} MB, opset {out.extra['calibration']['opset']}, "
        f"float16 inside, float32 inputs and outputs) and {out.path}; sha256 {out.sha256[:12]}")
    return out
