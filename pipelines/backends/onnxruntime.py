"""ONNX Runtime on the CPU: the backend everywhere, and the reference for parity checks."""

from __future__ import annotations

from typing import Collection, Mapping

import numpy as np

from pipelines.backends import DeviceTensor, InferenceBackend, host_inputs
from pipelines.errors import ModelError
from pipelines.manifest import ModelManifest


class OnnxRuntimeBackend(InferenceBackend):
    name = "onnxruntime-cpu"

    def __init__(self, manifest: ModelManifest, threads: int = 1, verify: bool = True):
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
