"""ONNX Runtime on the CPU: the backend everywhere, and the reference for parity checks."""

from __future__ import annotations

import platform
from collections.abc import Collection, Mapping
from functools import lru_cache

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
        try:
            self._session = ort.InferenceSession(str(manifest.model_path), opts, providers=["CPUExecutionProvider"])
        except Exception as exc:  # ORT raises its own exception types per failure
            raise ModelError(f"{manifest.model_path}: ONNX Runtime cannot load the model ({str(exc).splitlines()[0]})") from None
        declared = {manifest.input.name, *(s.name for s in manifest.state_inputs)}
        actual = {i.name for i in self._session.get_inputs()}
        if declared != actual:
            raise ModelError(f"{manifest.path}: inputs {sorted(declared)} do not match the model's {sorted(actual)}")
        self._outputs = [o.name for o in manifest.outputs]
        missing = set(self._outputs) - {o.name for o in self._session.get_outputs()}
        if missing:
            raise ModelError(f"{manifest.path}: outputs {sorted(missing)} are not in the model")

    def run(self, inputs: Mapping[str, np.ndarray | DeviceTensor], *,
            device_outputs: Collection[str] = ()) -> dict[str, np.ndarray]:
        feed = host_inputs(inputs)  # a GPU-prepared input is downloaded once here
        try:
            values = self._session.run(self._outputs, feed)
        except Exception as exc:
            raise ModelError(f"{self.manifest.name}: inference failed ({str(exc).splitlines()[0]})") from None
        return dict(zip(self._outputs, values))

    def close(self) -> None:
        self._session = None
