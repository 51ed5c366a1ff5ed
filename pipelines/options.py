"""The choices the agent's settings and command line offer for the dataflow, in one place.

``agent/config.py`` checks ``[pipeline] backend`` and ``preprocessing`` against these, ``agent/cli.py``
offers them as ``--backend`` and ``--preprocessing``, and the pipelines modules that act on them
(``backends/select.py``, ``frame_path.py``) validate against the same tuples. Kept in a module that
imports nothing, so naming a choice never loads a backend, the GPU kernels or the frame paths.
"""

# Which inference backend runs the models (backends/select.py): auto takes TensorRT where an engine
# for this GPU is cached, else ONNX Runtime on the CPU.
BACKENDS = ("auto", "onnxruntime", "tensorrt")

# Where each frame's model inputs are made (frame_path.py): auto takes the GPU kernels where a model
# runs on TensorRT and the kernels compile, else the CPU.
FRAME_PATHS = ("auto", "cpu", "gpu")
