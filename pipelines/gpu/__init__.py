"""GPU-resident pre- and post-processing (pycuda kernels), with their CPU reference implementations.

Importing this package needs neither pycuda nor a GPU: the kernels are compiled when a
``GpuPreprocessor`` or ``GpuLogitsReducer`` is made, which raises ``DependencyError`` without them.
``context`` is the device itself (the shared CUDA context and what GPU it is), used by the kernels
and the TensorRT backend alike, so that neither imports the other.
"""

from or_agent.pipelines.gpu.kernels import (
                                   GpuLogitsReducer,
                                   GpuPreprocessor,
                                   area_resize_reference,
                                   preprocess_reference,
                                   reduce_logits_reference,
                                   same_input,
)

__all__ = [
                                   "GpuLogitsReducer",
                                   "GpuPreprocessor",
                                   "area_resize_reference",
                                   "preprocess_reference",
                                   "reduce_logits_reference",
                                   "same_input",
]
