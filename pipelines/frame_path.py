"""Where each frame's model inputs are made and the segmentation logits reduced.

Three paths, one interface, chosen once per agent process (``choose_frame_path``):

* ``cpu`` (``HostFramePath``): each stage's ``pre_process`` arithmetic (OpenCV INTER_AREA resize and the
  fused normalisation; a size that a larger one divides by whole factors made from that one), logits
  reduced by ``reduce_logits`` on the postprocess thread. Everywhere.
* ``gpu`` (``GpuFramePath``): the frame's content crop is uploaded once and the pycuda kernel writes
  each model's normalised NCHW input straight into a device buffer; TensorRT copies it device to
  device into the engine, and the anatomy logits are reduced by the second kernel right after the
  engine ran, so only the class map and three per-class arrays come back to the host. With ONNX
  Runtime models the prepared inputs are downloaded once (the CPU is spared the resize of a 4K frame).
* ``reference`` (``ReferenceFramePath``): the GPU path's arithmetic (exact area averaging) and
  plumbing (buffers taken from and returned to a pool, inputs handed over as ``DeviceTensor``,
  the reduction done next to the model) on the host, in numpy. It is what the GPU path is checked
  against, and lets the pipeline's handling of the GPU path be tested on a machine without one.

Buffers: a prepared input belongs to the pipeline until the stage that consumed it hands it back
(``release``); a pool per model holds enough for every frame the bounded queues can have in flight.
A pool that runs dry means a buffer was not handed back: that is raised, never waited on.
"""

from __future__ import annotations

import logging
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence

import cv2
import numpy as np

from or_agent.pipelines.backends import DeviceTensor
from or_agent.pipelines.errors import DependencyError, InputError, ModelError
from or_agent.pipelines.gpu.kernels import GpuLogitsReducer, GpuPreprocessor, GpuResources, preprocess_reference
from or_agent.pipelines.options import FRAME_PATHS
from or_agent.pipelines.postprocess import SegmentationReduction, reduce_logits
from or_agent.pipelines.preprocess import ContentArea, InputSpec, crop_resize, normalise

log = logging.getLogger("or-agent.frame-path")


class FramePath(ABC):
    name: str = "frame-path"
    reduces_on_device: bool = False  # ask backends to leave the segmentation logits on the GPU

    def reset(self) -> None:
        """Start of a pipeline run: every buffer is free again (nothing is in flight)."""

    @abstractmethod
    def prepare(self, frame: np.ndarray, area: ContentArea, stages: Sequence) -> list:
        """One model input per stage (``stage.spec`` says size and normalisation), in order."""

    def release(self, x) -> None:
        """Hand back an input from ``prepare`` once its model has run (or was skipped). None is fine."""

    def reduce(self, logits):
        """Called on the inference thread right after the segmentation model ran: logits, or an
        ``SegmentationReduction`` computed there (the engine's output buffer is reused by the next run)."""
        return logits

    def close(self) -> None:
        """Release device memory."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class HostFramePath(FramePath):
    name = "cpu"

    def prepare(self, frame, area, stages):
        # Each input size once, the largest first. A size that a larger one divides by whole factors is made
        # from it by OpenCV's integer INTER_AREA path (block means): the same area average of the crop to
        # within one grey level (the larger one's rounding), without reading the crop again: the synthetic
        # set's 64x112 visibility input from its 256x448 anatomy input (``python -m bench.cpu_paths_bench``).
        sizes = sorted({(s.spec.height, s.spec.width) for s in stages}, key=lambda hw: -hw[0] * hw[1])
        made: dict[tuple[int, int], np.ndarray] = {}
        for h, w in sizes:
            parent = next((img for (ph, pw), img in made.items() if ph % h == 0 and pw % w == 0), None)
            made[(h, w)] = (crop_resize(frame, area, h, w) if parent is None
                            else cv2.resize(parent, (w, h), interpolation=cv2.INTER_AREA))
        return [normalise(made[(s.spec.height, s.spec.width)], s.spec) for s in stages]


# --------------------------------------------------------------------------- pooled buffers

class _Slot(DeviceTensor):
    """One model input buffer from a pool; ``release`` returns it."""

    def __init__(self, pool: _SlotPool, task: str, shape: tuple[int, ...]):
        self.pool, self.task, self.shape, self.dtype = pool, task, tuple(shape), np.dtype(np.float32)
        self.in_use = False


class _HostSlot(_Slot):
    def __init__(self, pool, task, shape):
        super().__init__(pool, task, shape)
        self.array = np.empty(shape, np.float32)

    @property
    def device_ptr(self) -> None:
        return None

    def to_host(self) -> np.ndarray:
        return self.array


class _SlotPool:
    """Per-model free lists of input buffers; grows on demand up to ``limit`` per model."""

    def __init__(self, make: Callable[[_SlotPool, str, tuple[int, ...]], _Slot], limit: int):
        self._make, self.limit = make, limit
        self._lock = threading.Lock()
        self._all: dict[str, list[_Slot]] = {}
        self._free: dict[str, list[_Slot]] = {}

    def acquire(self, task: str, shape: tuple[int, ...]) -> _Slot:
        with self._lock:
            free = self._free.setdefault(task, [])
            slot = free.pop() if free else None
            if slot is None:
                made = self._all.setdefault(task, [])
                if len(made) >= self.limit:
                    raise ModelError(f"{task}: all {self.limit} model-input buffers are in use "
                                     "(a pipeline stage did not hand one back)")
                slot = self._make(self, task, tuple(shape))
                made.append(slot)
            slot.in_use = True
            return slot

    def release(self, slot: _Slot) -> None:
        with self._lock:
            if slot.in_use:  # twice is harmless: a buffer is never in a free list twice
                slot.in_use = False
                self._free.setdefault(slot.task, []).append(slot)

    def reset(self) -> None:
        with self._lock:
            for task, slots in self._all.items():
                for s in slots:
                    s.in_use = False
                self._free[task] = list(slots)

    def slots(self) -> list[_Slot]:
        with self._lock:
            return [s for slots in self._all.values() for s in slots]

    def in_use(self) -> int:
        with self._lock:
            return sum(s.in_use for slots in self._all.values() for s in slots)


class _PooledFramePath(FramePath):
    # More than a frame's worth of buffers for every place a frame can wait between preprocess and
    # the last model: the queues (2 each by default) and the stages holding one each.
    POOL_LIMIT = 16

    def __init__(self):
        self.pool = _SlotPool(self._new_slot, self.POOL_LIMIT)

    @abstractmethod
    def _new_slot(self, pool: _SlotPool, task: str, shape: tuple[int, ...]) -> _Slot:
        ...

    @abstractmethod
    def _fill(self, frame: np.ndarray, area: ContentArea, targets: list[tuple[InputSpec, _Slot]]) -> None:
        ...

    def reset(self) -> None:
        self.pool.reset()

    def prepare(self, frame, area, stages):
        h, w = frame.shape[:2]  # HxWx3 BGR: every source converts (messages.Frame checks it)
        if area.x1 > w or area.y1 > h:  # the kernel would read past the frame's rows
            raise ValueError(f"content area {area.x0},{area.y0}..{area.x1},{area.y1} extends beyond the {w}x{h} frame")
        slots = []
        try:
            for s in stages:
                spec = s.spec
                slots.append(self.pool.acquire(s.name, (1, 3, spec.height, spec.width)))
            self._fill(frame, area, [(s.spec, slot) for s, slot in zip(stages, slots)])
        except BaseException:
            for slot in slots:
                self.pool.release(slot)
            raise
        return slots

    def release(self, x) -> None:
        if isinstance(x, _Slot):
            x.pool.release(x)


class ReferenceFramePath(_PooledFramePath):
    """The GPU path's arithmetic and buffer handling, in numpy on the host (see the module doc)."""

    name = "reference"

    def _new_slot(self, pool, task, shape):
        return _HostSlot(pool, task, shape)

    def _fill(self, frame, area, targets):
        for spec, slot in targets:
            slot.array[...] = preprocess_reference(frame, area, spec)

    def reduce(self, logits):
        return SegmentationReduction(*reduce_logits(logits))


# --------------------------------------------------------------------------- the GPU

class _GpuSlot(_Slot):
    def __init__(self, pool, task, shape, path: GpuFramePath):
        super().__init__(pool, task, shape)
        self._path = path
        self.device = path.memory.alloc(self.nbytes)
        self._host: np.ndarray | None = None

    @property
    def device_ptr(self) -> int:
        return int(self.device)

    def to_host(self) -> np.ndarray:
        mem = self._path.memory
        with mem._ctx:
            if self._host is None:
                self._host = mem.cuda.pagelocked_empty(self.shape, np.float32)
            mem.cuda.memcpy_dtoh(self._host, self.device)
        return self._host


class GpuFramePath(_PooledFramePath):
    """Model inputs made by the pycuda preprocessing kernel, segmentation reduced by the other one.

    Compiles both kernels when made (``DependencyError`` without pycuda, a GPU or nvcc). The
    preprocessor is sized for the largest frame seen (at least 1080p) and remade if a larger one
    arrives; the reducer for the engine's logits shape on first use.
    """

    name = "gpu"
    reduces_on_device = True
    MIN_FRAME = (1080, 1920)

    def __init__(self, device: int = 0):
        super().__init__()
        self._device = device
        self.memory = GpuResources(device)  # the pooled input buffers
        self._closed = False
        self._reducer: GpuLogitsReducer | None = None
        # Compile both kernels now, so a missing nvcc is reported when the agent starts, not mid-case.
        probe = InputSpec(8, 8, "RGB", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
        self._pre = GpuPreprocessor(probe, self.MIN_FRAME, device)
        GpuLogitsReducer(2, 8, 8, device).close()

    def _new_slot(self, pool, task, shape):
        return _GpuSlot(pool, task, shape, self)

    def _fill(self, frame, area, targets):
        h, w = frame.shape[:2]
        if h > self._pre.max_h or w > self._pre.max_w:
            spec, shape = self._pre.spec, (max(h, self._pre.max_h), max(w, self._pre.max_w))
            self._pre.close()
            self._pre = GpuPreprocessor(spec, shape, self._device)
        pre = self._pre
        with pre._ctx:
            pre.enqueue_into(frame, area, [(spec, slot.device) for spec, slot in targets])
            # Synchronise here, on the preprocess thread: the inputs are complete when handed on,
            # so the engine's stream needs no event, and the pinned frame is free for the next one.
            pre.stream.synchronize()

    def reduce(self, logits):
        if not isinstance(logits, DeviceTensor) or logits.device_ptr is None:
            return logits  # a host backend's logits: reduced on the CPU, on the postprocess thread
        shape = tuple(logits.shape)
        if len(shape) != 4 or shape[0] != 1:
            raise ModelError(f"segmentation output shape {shape}: expected [1, classes, height, width]")
        c, h, w = shape[1:]
        r = self._reducer
        if r is None or (r.classes, r.height, r.width) != (c, h, w):
            if r is not None:
                r.close()
            r = self._reducer = GpuLogitsReducer(c, h, w, self._device)
        class_map, counts, conf = r.reduce_device(logits.device_ptr)
        return SegmentationReduction(class_map, counts, conf)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for obj in (self._pre, self._reducer, self.memory):
            if obj is not None:
                obj.close()


# --------------------------------------------------------------------------- choice

def choose_frame_path(preference: str, backend_names: Sequence[str], *,
                      gpu_factory: Callable[[], FramePath] = GpuFramePath) -> tuple[FramePath, str]:
    """The frame path for this process and a one-line reason (log it, show it in status).

    ``auto`` takes the GPU where a model runs on TensorRT (its inputs then never leave the device)
    and the kernels compile; otherwise the CPU. ``gpu`` insists (DependencyError without one).
    """
    if preference not in FRAME_PATHS:
        raise InputError(f"preprocessing: must be one of {', '.join(FRAME_PATHS)}, got {preference!r}")
    if preference == "cpu":
        return HostFramePath(), "cpu: requested"
    if preference == "gpu":
        return gpu_factory(), "gpu: requested (pycuda kernels)"
    if "tensorrt" not in backend_names:
        return HostFramePath(), "cpu: the models run on ONNX Runtime (CPU), so their inputs are made there"
    try:
        return gpu_factory(), "gpu: pycuda kernels feed the TensorRT engines on the device"
    except DependencyError as exc:
        return HostFramePath(), f"cpu: the GPU kernels are unavailable ({exc})"
