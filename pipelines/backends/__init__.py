"""Inference backends: one interface, ONNX Runtime on CPU here, TensorRT on the OR box."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Mapping

import numpy as np

from pipelines.manifest import ModelManifest


class InferenceBackend(ABC):
    """Runs one model described by a manifest. Owned resources are released by ``close``."""

    name: str = "backend"

    def __init__(self, manifest: ModelManifest):
        self.manifest = manifest

    @abstractmethod
    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one batch; inputs and outputs are keyed by the manifest's tensor names."""

    def close(self) -> None:
        """Release the session and its buffers."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
