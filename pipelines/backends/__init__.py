"""Inference backends: one interface, ONNX Runtime on CPU here, TensorRT on the OR box."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Collection, Mapping

import numpy as np

from or_agent.pipelines.manifest import ModelManifest


class DeviceTensor(ABC):
    """A model input or output that may live in GPU memory.

    The GPU frame path hands these to the backends so that a frame prepared on the device goes
    into the engine without a trip through host memory; a backend that runs on the host
    (ONNX Runtime) calls ``to_host``. ``device_ptr`` is None for tensors that live on the host
    (the CPU reference of the GPU path).
    """

    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    @abstractmethod
    def device_ptr(self) -> int | None:
        """The CUDA device address of the data, ready to read (its producer has synchronised)."""

    @abstractmethod
    def to_host(self) -> np.ndarray:
        """The values as a numpy array (a copy, or a view that stays valid until release)."""

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * np.dtype(self.dtype).itemsize


def host_inputs(inputs: Mapping[str, object]) -> dict[str, np.ndarray]:
    """Inputs for a host backend: device tensors copied to the host, arrays as they are."""
    return {k: (v.to_host() if isinstance(v, DeviceTensor) else np.asarray(v)) for k, v in inputs.items()}


class InferenceBackend(ABC):
    """Runs one model described by a manifest. Owned resources are released by ``close``."""

    name: str = "backend"
    device_outputs: bool = False  # can leave outputs on the GPU (run(..., device_outputs=names))

    def __init__(self, manifest: ModelManifest):
        self.manifest = manifest

    @abstractmethod
    def run(self, inputs: Mapping[str, np.ndarray | DeviceTensor], *,
            device_outputs: Collection[str] = ()) -> dict[str, np.ndarray | DeviceTensor]:
        """Run one batch; inputs and outputs are keyed by the manifest's tensor names. Inputs may be
        ``DeviceTensor``s. Outputs named in ``device_outputs`` come back as ``DeviceTensor``s valid
        until the next call where the backend supports it (``device_outputs`` True), else as arrays."""

    def close(self) -> None:
        """Release the session and its buffers."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
