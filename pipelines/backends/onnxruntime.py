"""ONNX Runtime on the CPU: the backend everywhere, and the reference for parity checks."""

from __future__ import annotations

import platform
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import cv2
import numpy as np

from or_agent.pipelines.backends import DeviceTensor, InferenceBackend, host_inputs
from or_agent.pipelines.errors import ModelError
from or_agent.pipelines.manifest import ModelManifest


@lru_cache(maxsize=1)
def cpu_int8_kernels() -> str:
    """Which of ONNX Runtime's integer kernel families this CPU gets, by the instruction set they need.

    Quantised models do not compute the same numbers on every x86 CPU: with VNNI the int8 dot products
    accumulate exactly in int32; on AVX2 alone the u8s8 kernels use VPMADDUBSW, whose int16 pairwise sums
    saturate, so a few activations differ. Reports of INT8 agreement name this, and a test of INT8 holds
    only the ONNX-specified arithmetic (``int8_kernels=False``) to a fixed bar."""
    flags: set[str] = set()
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "flags" and not flags:
                    flags = set(value.split())
                elif key.strip() == "model name" and model in ("", platform.machine()):
                    model = value.strip()
    except OSError:
        pass
    for flag, family in (("avx512_vnni", "avx512-vnni"), ("avx_vnni", "avx-vnni"), ("avx512bw", "avx512bw"),
                         ("avx2", "avx2"), ("sse4_1", "sse4.1")):
        if flag in flags:
            return f"{family} ({model})"
    return f"{platform.machine() or 'unknown'} ({model})"


class OnnxRuntimeBackend(InferenceBackend):
    name = "onnxruntime-cpu"

    def __init__(self, manifest: ModelManifest, threads: int = 1, verify: bool = True, int8_kernels: bool = True):
        """``int8_kernels=False`` runs a quantised model's QuantizeLinear/DequantizeLinear pairs as the ONNX
        specification defines them (dequantise, float operator, quantise) instead of fusing them into this
        CPU's integer kernels: slower, but the same numbers on any CPU (see ``cpu_int8_kernels``)."""
        super().__init__(manifest)
        import onnxruntime as ort

        if verify:
            manifest.verify_file()
        if threads < 1:
            raise ModelError(f"{manifest.name}: threads must be at least 1, got {threads}")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.log_severity_level = 3
        if not int8_kernels:
            opts.add_session_config_entry("session.disable_quant_qdq", "1")
        model, self._upsampled = final_upsampling_split(manifest.model_path)
        try:
            self._session = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
        except Exception as exc:  # ORT raises its own exception types per failure
            raise ModelError(f"{manifest.model_path}: ONNX Runtime cannot load the model ({str(exc).splitlines()[0]})") from None
        declared = {manifest.input.name, *(s.name for s in manifest.state_inputs)}
        actual = {i.name for i in self._session.get_inputs()}
        if declared != actual:
            raise ModelError(f"{manifest.path}: inputs {sorted(declared)} do not match the model's {sorted(actual)}")
        self._outputs = [o.name for o in manifest.outputs]
        # what ONNX Runtime computes for each declared output: an upsampled one's input
        self._fetch = [self._upsampled[o].source if o in self._upsampled else o for o in self._outputs]
        produced = {o.name for o in self._session.get_outputs()}
        missing = {o for o, fetched in zip(self._outputs, self._fetch) if fetched not in produced}
        if missing:
            raise ModelError(f"{manifest.path}: outputs {sorted(missing)} are not in the model")

    def run(self, inputs: Mapping[str, np.ndarray | DeviceTensor], *,
            device_outputs: Collection[str] = ()) -> dict[str, np.ndarray]:
        feed = host_inputs(inputs)  # a GPU-prepared input is downloaded once here
        try:
            values = self._session.run(self._fetch, feed)
        except Exception as exc:
            raise ModelError(f"{self.manifest.name}: inference failed ({str(exc).splitlines()[0]})") from None
        out = dict(zip(self._outputs, values))
        for name in self._upsampled.keys() & out.keys():
            out[name] = self._upsampled[name].apply(out[name])
        return out

    def close(self) -> None:
        self._session = None


# --------------------------------------------------------------------------- a final upsampling, by OpenCV

@dataclass(frozen=True)
class FinalUpsampling:
    """A graph output made by a last ``Resize`` (linear, half-pixel, whole factors on H and W of an NCHW
    tensor): ONNX Runtime computes ``source``, its input, and OpenCV scales it up.

    ONNX Runtime runs convolutions in its blocked NCHWc layout; a resize at the end then upsamples all the
    blocked channels and reorders the large result back to NCHW: for the synthetic anatomy model's 13x256x448
    logits those two steps took 46 % of the model's time (ONNX Runtime's profiler,
    ``SessionOptions.enable_profiling``, one thread: Upsample 26 %, ReorderOutput 20 %). OpenCV's bilinear resize
    of each plane computes the same half-pixel interpolation (the same numbers to float rounding: tested)
    in less (the whole model 0.65-0.92x the time in eight of nine runs, 1.19x in one on a noisy machine:
    ``python -m bench.cpu_paths_bench``, section 7)."""

    source: str
    factor_y: int
    factor_x: int

    def __post_init__(self):
        if self.factor_y < 1 or self.factor_x < 1:
            raise ValueError(f"upsampling factors must be whole and at least 1, got {self.factor_y}x{self.factor_x}")

    def apply(self, low: np.ndarray) -> np.ndarray:
        """``low`` [N,C,H,W] scaled up to [N,C,H*factor_y,W*factor_x], float32."""
        if low.ndim != 4:
            raise ModelError(f"{self.source}: expected an NCHW tensor to upsample, got shape {low.shape}")
        low = np.asarray(low, np.float32)
        n, c, h, w = low.shape
        size = (w * self.factor_x, h * self.factor_y)
        out = np.empty((n, c, size[1], size[0]), np.float32)
        for i in range(n):
            for j in range(c):
                cv2.resize(low[i, j], size, dst=out[i, j], interpolation=cv2.INTER_LINEAR)
        return out


def final_upsampling_split(model_path: Path) -> tuple[str | bytes, dict[str, FinalUpsampling]]:
    """The model for ONNX Runtime, without the final linear resizes OpenCV does faster, and those resizes by
    the output they make. The model file itself is unchanged (its hash is the manifest's); a graph
    without such a resize, or one ``onnx`` cannot read (ONNX Runtime then names the problem), is given as is."""
    try:
        import onnx
        from onnx import numpy_helper

        model = onnx.load(str(model_path))
    except Exception:
        return str(model_path), {}
    graph = model.graph
    constants = {t.name: t for t in graph.initializer}
    constants.update({n.output[0]: a.t for n in graph.node if n.op_type == "Constant"
                      for a in n.attribute if a.name == "value"})
    consumers: dict[str, int] = {}
    for n in graph.node:
        for i in n.input:
            consumers[i] = consumers.get(i, 0) + 1
    outputs = {o.name: o for o in graph.output}
    found: dict[str, FinalUpsampling] = {}
    for node in list(graph.node):
        if node.op_type != "Resize" or node.output[0] not in outputs or consumers.get(node.output[0]):
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if (attrs.get("mode") != b"linear" or attrs.get("coordinate_transformation_mode", b"half_pixel") != b"half_pixel"
                or "axes" in attrs or attrs.get("antialias", 0) or attrs.get("exclude_outside", 0)
                or len(node.input) != 3 or node.input[2] not in constants
                or node.input[0] in outputs or outputs[node.output[0]].type.tensor_type.elem_type != onnx.TensorProto.FLOAT):
            continue
        scales = numpy_helper.to_array(constants[node.input[2]])
        if (scales.shape != (4,) or tuple(scales[:2]) != (1.0, 1.0) or min(scales[2:]) < 1
                or any(float(v) != int(v) for v in scales[2:])):
            continue
        found[node.output[0]] = FinalUpsampling(node.input[0], int(scales[2]), int(scales[3]))
        out = outputs[node.output[0]]
        out.name = node.input[0]
        for dim in out.type.tensor_type.shape.dim[2:]:
            dim.Clear()  # the smaller size; ONNX Runtime takes it from the graph
        graph.node.remove(node)
        for unused in node.input[1:]:
            if unused and consumers.get(unused) == 1:
                for n in [n for n in graph.node if n.op_type == "Constant" and n.output[0] == unused]:
                    graph.node.remove(n)
                for t in [t for t in graph.initializer if t.name == unused]:
                    graph.initializer.remove(t)
    if not found:
        return str(model_path), {}
    return model.SerializeToString(), found
