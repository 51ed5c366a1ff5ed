"""The TensorRT inference backend: a cached engine run on the OR box's NVIDIA GPU.

Engines are built and cached by ``engines.py`` (``or-agent build-engines``); this module only loads
one and runs it. The CUDA context comes from ``pipelines/gpu/context.py``, shared with the GPU kernels.

Nothing here imports TensorRT or pycuda at module import time: both are optional (TensorRT only
exists on the OR box; pycuda only builds where the CUDA toolkit is). The backend's constructor calls
``import_tensorrt()`` and makes a ``CudaContext``, which raise ``DependencyError`` with what to do.

Run, TensorRT 10/11 API only: ``Runtime.deserialize_cuda_engine`` -> ``create_execution_context``
-> per tensor ``set_input_shape`` / ``set_tensor_address`` -> ``execute_async_v3(stream)`` on a
non-default pycuda stream, with pinned host buffers and async copies.
"""

from __future__ import annotations

import os
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from or_agent.pipelines.backends import DeviceTensor, InferenceBackend
from or_agent.pipelines.backends.engines import import_tensorrt, trt_logger
from or_agent.pipelines.errors import ModelError
from or_agent.pipelines.gpu.context import CudaContext
from or_agent.pipelines.manifest import ModelManifest

if TYPE_CHECKING:  # imported where used: the graphs module needs a GPU driver
    from or_agent.pipelines.gpu.graphs import CapturedGraph, DriverGraphs

MAX_GRAPHS = 4  # per backend: a recurrent model needs two (its state buffers swap every step)


class _Binding:
    __slots__ = ("device", "dtype", "host", "is_input", "name", "nbytes", "shape")

    def __init__(self, name, shape, dtype, is_input, device, host):
        self.name, self.shape, self.dtype, self.is_input = name, shape, dtype, is_input
        self.device, self.host, self.nbytes = device, host, host.nbytes


class _OutputOnDevice(DeviceTensor):
    """An engine output left on the GPU (for the reduction kernel): valid until the backend's next run."""

    def __init__(self, backend: TensorRTBackend, binding: _Binding):
        self._backend, self._binding = backend, binding
        self._ptr = int(binding.device)
        self.shape, self.dtype = binding.shape, binding.dtype

    @property
    def device_ptr(self) -> int:
        return self._ptr

    def to_host(self) -> np.ndarray:
        b = self._binding
        with self._backend._ctx:
            self._backend.cuda.memcpy_dtoh(b.host, self._ptr)
        return b.host.copy()


class TensorRTBackend(InferenceBackend):
    """A cached engine run on a non-default CUDA stream with pinned host buffers.

    Recurrent state: the manifest's ``state_of`` pairs (``state_out`` -> ``state_in``) get a device
    buffer each; after a step the two device pointers are swapped, so the state never crosses to the
    host and back. The returned state array is a host mirror (copied in the same stream sync, a few
    hundred bytes); when the caller passes that same array object back as the next step's state input
    (what ``PhaseStage`` does), it is not uploaded. Any other array (zeros at a case start) is uploaded.

    ``cuda_graph=True`` captures one CUDA graph per pointer arrangement (two for a recurrent model,
    because of the swap) after a first eager run, and replays it (``pipelines/gpu/graphs.py``: the
    driver API, since pycuda has no stream capture); if capture fails it stays eager and says why
    in ``graph_status``.
    """

    name = "tensorrt"
    device_outputs = True

    def __init__(self, manifest: ModelManifest, engine: bytes | str | os.PathLike, *, device: int = 0,
                 cuda_graph: bool = False):
        super().__init__(manifest)
        trt = import_tensorrt()
        self._trt = trt
        self._ctx = CudaContext(device)
        self.cuda = self._ctx.cuda
        self._closed = False
        data = engine if isinstance(engine, (bytes, bytearray)) else Path(engine).read_bytes()
        with self._ctx:
            try:
                self._runtime = trt.Runtime(trt_logger(trt))
                self._engine = self._runtime.deserialize_cuda_engine(bytes(data))
                if self._engine is None:
                    raise ModelError(f"{manifest.name}: TensorRT cannot deserialize the engine (built for another "
                                     "GPU or TensorRT version?): run `or-agent build-engines`")
                self._context = self._engine.create_execution_context()
                self._stream = self.cuda.Stream()
                self._bindings = self._allocate()
            except BaseException:
                self._release()
                raise
        self._state_pairs = {o.name: o.state_of for o in manifest.outputs if o.state_of}  # out -> in
        self._state_mirror: dict[str, np.ndarray] = {}  # state_in name -> array we returned last step
        self._outputs = [o.name for o in manifest.outputs]
        self.cuda_graph = cuda_graph
        self._graphs: dict[tuple, CapturedGraph | None] = {}
        self._graph_driver: DriverGraphs | None = None
        self._warmed = False
        self.graph_status = "off" if not cuda_graph else "on (captured at the first run)"

    def _allocate(self) -> dict[str, _Binding]:
        trt, cuda, eng = self._trt, self.cuda, self._engine
        declared = {self.manifest.input.name: self.manifest.input.shape,
                    **{s.name: s.shape for s in self.manifest.state_inputs}}
        bindings = {}
        for i in range(eng.num_io_tensors):
            name = eng.get_tensor_name(i)
            is_input = eng.get_tensor_mode(name) == trt.TensorIOMode.INPUT
            shape = tuple(eng.get_tensor_shape(name))
            if is_input:
                if name not in declared:
                    raise ModelError(f"{self.manifest.path}: engine input {name!r} is not declared in the manifest")
                shape = tuple(declared[name])
                self._context.set_input_shape(name, shape)
        for i in range(eng.num_io_tensors):
            name = eng.get_tensor_name(i)
            is_input = eng.get_tensor_mode(name) == trt.TensorIOMode.INPUT
            shape = tuple(self._context.get_tensor_shape(name)) if not is_input else tuple(declared[name])
            if any(d < 0 for d in shape):
                raise ModelError(f"{self.manifest.name}: tensor {name!r} has unresolved shape {shape}")
            dtype = np.dtype(trt.nptype(eng.get_tensor_dtype(name)))
            host = cuda.pagelocked_empty(shape, dtype)
            dev = cuda.mem_alloc(max(1, host.nbytes))
            self._context.set_tensor_address(name, int(dev))
            bindings[name] = _Binding(name, shape, dtype, is_input, dev, host)
        missing = [o.name for o in self.manifest.outputs if o.name not in bindings]
        if missing:
            raise ModelError(f"{self.manifest.path}: outputs {missing} are not in the engine")
        return bindings

    def _execute(self) -> None:
        if not self._context.execute_async_v3(self._stream.handle):
            raise ModelError(f"{self.manifest.name}: TensorRT execute_async_v3 failed")

    def _enqueue(self) -> None:
        if self.cuda_graph:
            # One graph per arrangement of device pointers (the state swap gives a recurrent model two).
            key = tuple(int(b.device) for b in self._bindings.values())
            graph = self._graphs.get(key)
            if graph is None and len(self._graphs) < MAX_GRAPHS:
                graph = self._capture(key)
            if graph is not None:
                graph.launch(self._stream.handle)
                return
        self._execute()

    def _capture(self, key: tuple):
        try:
            if self._graph_driver is None:
                from or_agent.pipelines.gpu.graphs import DriverGraphs

                self._graph_driver = DriverGraphs()
            graph = self._graph_driver.capture(self._stream.handle, self._execute)
        except Exception as exc:  # GraphError, or TensorRT refusing to be captured: stay eager, say why
            self.cuda_graph, self.graph_status = False, f"eager (capture failed: {exc})"
            return None
        self._graphs[key] = graph
        self.graph_status = f"captured {len(self._graphs)}"
        return graph

    def run(self, inputs: Mapping[str, np.ndarray | DeviceTensor], *,
            device_outputs: Collection[str] = ()) -> dict[str, np.ndarray | DeviceTensor]:
        """Inputs may be host arrays (copied through the pinned buffers) or device tensors (copied
        device to device on this stream: a GPU-prepared frame never visits the host). Outputs named
        in ``device_outputs`` stay on the device, valid until the next call."""
        if self._closed:
            raise ModelError(f"{self.manifest.name}: backend is closed")
        unknown = set(device_outputs) - set(self._outputs)
        if unknown:
            raise ModelError(f"{self.manifest.name}: device_outputs {sorted(unknown)} are not outputs of the model")
        cuda = self.cuda
        with self._ctx:
            for name, b in self._bindings.items():
                if not b.is_input:
                    continue
                if name not in inputs:
                    raise ModelError(f"{self.manifest.name}: missing input {name!r}")
                value = inputs[name]
                if self._state_mirror.get(name) is value:
                    continue  # the state is already on the device (pointer swapped after the last step)
                if isinstance(value, DeviceTensor):
                    if tuple(value.shape) != b.shape or np.dtype(value.dtype) != b.dtype:
                        raise ModelError(f"{self.manifest.name}: input {name!r} is {np.dtype(value.dtype)} {tuple(value.shape)}, "
                                         f"engine wants {b.dtype} {b.shape}")
                    if value.device_ptr is not None:
                        cuda.memcpy_dtod_async(b.device, value.device_ptr, b.nbytes, self._stream)
                        continue
                    value = value.to_host()
                arr = np.asarray(value, dtype=b.dtype)
                if arr.shape != b.shape:
                    raise ModelError(f"{self.manifest.name}: input {name!r} has shape {arr.shape}, engine wants {b.shape}")
                np.copyto(b.host, arr)
                cuda.memcpy_htod_async(b.device, b.host, self._stream)
            if self.cuda_graph and not self._warmed:  # TensorRT wants one eager run before a capture
                self._execute()
                self._warmed = True
            self._enqueue()
            host_names = [n for n in self._outputs if n not in device_outputs]
            for name in host_names:
                b = self._bindings[name]
                cuda.memcpy_dtoh_async(b.host, b.device, self._stream)
            self._stream.synchronize()
            result: dict = {name: self._bindings[name].host.copy() for name in host_names}
            for name in device_outputs:
                result[name] = _OutputOnDevice(self, self._bindings[name])
            # State: swap device pointers so this step's state_out is the next step's state_in.
            self._state_mirror = {}
            for out_name, in_name in self._state_pairs.items():
                bo, bi = self._bindings[out_name], self._bindings[in_name]
                bo.device, bi.device = bi.device, bo.device
                self._context.set_tensor_address(out_name, int(bo.device))
                self._context.set_tensor_address(in_name, int(bi.device))
                if out_name in result and not isinstance(result[out_name], DeviceTensor):
                    self._state_mirror[in_name] = result[out_name]
        return result

    def _release(self) -> None:
        for g in getattr(self, "_graphs", {}).values():
            try:
                g.close()
            except Exception:
                pass
        for b in getattr(self, "_bindings", {}).values():
            try:
                b.device.free()
            except Exception:
                pass
        self._bindings = {}
        self._graphs = {}
        self._context = self._engine = self._runtime = self._stream = None

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with self._ctx:
            self._release()
        self._ctx.close()
