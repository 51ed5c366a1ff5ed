"""Precision conversion and confidence calibration of the models, for the box.

TensorRT 10 deprecated and TensorRT 11 removed the builder's FP16/INT8 flags and implicit INT8
calibrators: the precision a model runs at must be written into the ONNX file itself. This
package writes those files, each next to its own manifest, and measures what they cost:

- ``calibration.int8``         explicit INT8: Q/DQ model from frames sampled across phases and
                               visibility states (``or-agent calibrate int8``)
- ``calibration.fp16``         float16 weights and activations, float32 inputs and outputs
                               (``or-agent calibrate fp16``)
- ``calibration.compare``      FP32 vs FP16 vs INT8 on held-out video (``or-agent calibrate compare``)
- ``calibration.temperature``  temperature scaling of the phase model's confidence
                               (``or-agent calibrate temperature``)
- ``calibration.sampling``     the calibration frame sampler and its coverage report
- ``calibration.common``       what they share: models, videos, labels, decoding, writing

The ``or-agent calibrate`` subcommands are parsed and printed in ``agent.cli``; these modules
report progress through the ``log`` callback it passes in.

The converted models are written to their own models directories (``out/models-int8``,
``out/models-fp16`` by default), never next to the FP32 models: the agent keeps one model per
task in a models directory, so a converted set is selected with ``--models-dir`` (or
``$OR_AGENT_MODELS``).

Needs the ``onnx`` package (``pip install 'or-agent[calibrate]'``) besides ONNX Runtime.
"""
