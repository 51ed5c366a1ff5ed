"""TensorRT on the OR box's NVIDIA GPU: engine cache, engine build, and the inference backend.

Nothing here imports TensorRT or pycuda at module import time: both are optional (TensorRT only
exists on the OR box, from NVIDIA's own package index; pycuda only builds where the CUDA toolkit
is). Every entry point that needs them calls ``import_tensorrt()`` / ``import_pycuda()``, which
raise ``DependencyError`` with what to do.

TensorRT 10/11 API only:

* build: ``trt.Builder`` -> ``create_network(0)`` (explicit batch is the only mode since 10; the
  flag is deprecated) -> ``trt.OnnxParser(network, logger).parse(bytes)`` -> ``create_builder_config``
  with a workspace pool limit, one optimisation profile for the (static) manifest shapes, a
  persisted timing cache -> ``build_serialized_network``. **No FP16/INT8 builder flags**: TensorRT
  11 removed them and the implicit calibrators. Precision comes from the ONNX file itself (Q/DQ
  nodes from ``or-agent calibrate int8``, or an FP16-converted ONNX); the manifest's
  ``precision`` only names it for the cache key.
* run: ``Runtime.deserialize_cuda_engine`` -> ``create_execution_context`` -> per tensor
  ``set_input_shape`` / ``set_tensor_address`` -> ``execute_async_v3(stream)`` on a non-default
  pycuda stream, with pinned host buffers and async copies.

Engines are tied to the GPU and the TensorRT version, so they are cached under an ``EngineKey``
(model sha256, TensorRT version, GPU name, compute capability, SM count, precision), built on
the box with ``or-agent build-engines``, and never built during a live case.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections.abc import Collection, Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from or_agent.pipelines.backends import DeviceTensor, InferenceBackend
from or_agent.pipelines.errors import DependencyError, ModelError
from or_agent.pipelines.files import atomic_write_bytes
from or_agent.pipelines.manifest import ModelManifest

if TYPE_CHECKING:  # imported where used: the graphs module needs a GPU driver
    from or_agent.pipelines.gpu.graphs import CapturedGraph, DriverGraphs

TENSORRT_INSTALL_HINT = ("TensorRT is not installed: install it on the OR box from NVIDIA's index "
                         "(pip install --extra-index-url https://pypi.nvidia.com tensorrt)")
PYCUDA_INSTALL_HINT = "install it where the CUDA toolkit is (pip install pycuda, or the wheel built for this box)"
DEFAULT_WORKSPACE_BYTES = 1 << 30
MAX_GRAPHS = 4  # per backend: a recurrent model needs two (its state buffers swap every step)
ENGINE_SUFFIX = ".engine"
TIMING_CACHE_NAME = "timing.cache"  # in the engine cache directory unless given elsewhere
SIDECAR_SUFFIX = ".json"


# --------------------------------------------------------------------------- lazy imports

def import_tensorrt():
    """The ``tensorrt`` module, or ``DependencyError`` with the install hint."""
    try:
        import tensorrt as trt
    except ImportError:
        raise DependencyError(TENSORRT_INSTALL_HINT) from None
    except Exception as exc:  # a broken install (missing libnvinfer) raises OSError and friends
        raise DependencyError(f"TensorRT is installed but cannot be loaded ({type(exc).__name__}: {exc}); "
                              "reinstall it from NVIDIA's index (pip install --extra-index-url "
                              "https://pypi.nvidia.com tensorrt)") from None
    return trt


def tensorrt_version() -> str:
    """TensorRT's version string (e.g. ``11.0.0.12``); DependencyError when absent."""
    return str(import_tensorrt().__version__)


def short_version(version: str) -> str:
    """``11.0.0.12`` -> ``11.0``."""
    return ".".join(version.split(".")[:2])


def import_pycuda():
    """``pycuda.driver`` after ``cuda.init()``, or DependencyError ("no CUDA GPU found (pycuda: ...)")."""
    try:
        import pycuda.driver as cuda
    except ImportError:
        raise DependencyError(f"no CUDA GPU found (pycuda: not installed; {PYCUDA_INSTALL_HINT})") from None
    except Exception as exc:
        raise DependencyError(f"no CUDA GPU found (pycuda: cannot load ({type(exc).__name__}: {exc}))") from None
    try:
        cuda.init()
        if cuda.Device.count() < 1:
            raise DependencyError("no CUDA GPU found (pycuda: the driver reports 0 devices)")
    except DependencyError:
        raise
    except Exception as exc:
        raise DependencyError(f"no CUDA GPU found (pycuda: {type(exc).__name__}: {exc})") from None
    return cuda


class CudaContext:
    """The device's primary context (shared with PyTorch/CuPy in the same process), never
    ``pycuda.autoinit``. Use as ``with ctx:`` around every CUDA call; ``close()`` releases it."""

    def __init__(self, device: int = 0):
        self.cuda = import_pycuda()
        try:
            self.device = self.cuda.Device(device)
            self._ctx = self.device.retain_primary_context()
        except Exception as exc:
            raise DependencyError(f"no CUDA GPU found (pycuda: device {device}: {exc})") from None

    def __enter__(self):
        self._ctx.push()
        return self

    def __exit__(self, *exc):
        self.cuda.Context.pop()

    def close(self) -> None:
        self._ctx = None


# --------------------------------------------------------------------------- GPU identity

@dataclass(frozen=True)
class GpuInfo:
    name: str
    compute_capability: tuple[int, int]
    multiprocessors: int
    total_memory: int  # bytes
    driver_version: int  # as CUDA reports it: 13000 = CUDA 13.0

    @property
    def driver_cuda(self) -> str:
        return f"{self.driver_version // 1000}.{(self.driver_version % 1000) // 10}"

    def describe(self) -> str:
        major, minor = self.compute_capability
        return f"{self.name} (sm {major}.{minor}, {self.multiprocessors} SMs)"


def gpu_info(device: int = 0) -> GpuInfo:
    """What the engine cache keys on, read through pycuda; DependencyError without a GPU."""
    cuda = import_pycuda()
    try:
        dev = cuda.Device(device)
        attr = cuda.device_attribute
        return GpuInfo(name=dev.name(), compute_capability=tuple(dev.compute_capability()),
                       multiprocessors=int(dev.get_attribute(attr.MULTIPROCESSOR_COUNT)),
                       total_memory=int(dev.total_memory()), driver_version=int(cuda.get_driver_version()))
    except Exception as exc:
        raise DependencyError(f"no CUDA GPU found (pycuda: device {device}: {type(exc).__name__}: {exc})") from None


# --------------------------------------------------------------------------- engine cache

def manifest_precision(manifest: ModelManifest) -> str:
    p = manifest.extra.get("precision", "fp32")
    return p if isinstance(p, str) and p else "fp32"


def _safe(text: str) -> str:
    return re.sub(r"[^a-z0-9.]+", "-", text.lower()).strip("-.") or "x"


@dataclass(frozen=True)
class EngineKey:
    """Everything a serialized engine depends on. Any field differing is a cache miss."""

    model_sha256: str
    tensorrt_version: str
    gpu_name: str
    compute_capability: tuple[int, int]
    multiprocessors: int
    precision: str = "fp32"

    @classmethod
    def for_model(cls, manifest: ModelManifest, gpu: GpuInfo, trt_version: str) -> EngineKey:
        major, minor = gpu.compute_capability
        return cls(manifest.sha256, trt_version, gpu.name, (int(major), int(minor)), gpu.multiprocessors,
                   manifest_precision(manifest))

    def as_dict(self) -> dict:
        d = asdict(self)
        d["compute_capability"] = list(self.compute_capability)
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> EngineKey:
        major, minor = (int(v) for v in d["compute_capability"])
        return cls(str(d["model_sha256"]), str(d["tensorrt_version"]), str(d["gpu_name"]),
                   (major, minor), int(d["multiprocessors"]),
                   str(d.get("precision", "fp32")))

    def digest(self) -> str:
        canon = json.dumps(self.as_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canon.encode()).hexdigest()

    def filename(self) -> str:
        """Deterministic and filesystem-safe: a readable prefix plus a hash of every field."""
        major, minor = self.compute_capability
        return (f"{self.model_sha256[:12]}_{_safe(self.gpu_name)}_sm{major}{minor}_{self.multiprocessors}sm_"
                f"trt{_safe(self.tensorrt_version)}_{_safe(self.precision)}_{self.digest()[:16]}{ENGINE_SUFFIX}")

    def describe(self) -> str:
        major, minor = self.compute_capability
        return (f"{self.gpu_name} (sm {major}.{minor}, {self.multiprocessors} SMs, "
                f"TensorRT {short_version(self.tensorrt_version)})")


@dataclass(frozen=True)
class CacheEntry:
    path: Path
    key: EngineKey | None  # None: the sidecar is missing or unreadable
    model: str = ""


class EngineCache:
    """A directory of ``<key.filename()>`` engines, each with a JSON sidecar of its key.

    A lookup is by exact filename, so an engine built for another GPU, TensorRT version or model
    file simply is not found (a miss), and is rebuilt by ``or-agent build-engines``.
    """

    def __init__(self, directory: str | os.PathLike):
        self.dir = Path(directory)

    @property
    def timing_cache_path(self) -> Path:
        return self.dir / TIMING_CACHE_NAME

    def path_for(self, key: EngineKey) -> Path:
        return self.dir / key.filename()

    def has(self, key: EngineKey) -> bool:
        p = self.path_for(key)
        return p.is_file() and p.stat().st_size > 0 and self._sidecar_key(p) == key

    def read(self, key: EngineKey) -> bytes:
        p = self.path_for(key)
        if not self.has(key):
            raise ModelError(f"{p}: no engine cached for {key.describe()}")
        return p.read_bytes()

    def write(self, key: EngineKey, data: bytes, model: str = "") -> Path:
        """Atomically: engine first, then its sidecar (an engine without a sidecar is a miss)."""
        if not data:
            raise ModelError(f"{self.dir}: refusing to cache an empty engine")
        self.dir.mkdir(parents=True, exist_ok=True)
        p = self.path_for(key)
        atomic_write_bytes(p, bytes(data), durable=True)
        meta = {"key": key.as_dict(), "model": model, "bytes": len(data),
                "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        atomic_write_bytes(p.with_suffix(SIDECAR_SUFFIX), (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode(),
                           durable=True)
        return p

    def entries(self) -> list[CacheEntry]:
        if not self.dir.is_dir():
            return []
        out = []
        for p in sorted(self.dir.glob(f"*{ENGINE_SUFFIX}")):
            meta = self._sidecar(p)
            key = None
            if meta is not None:
                try:
                    key = EngineKey.from_dict(meta["key"])
                except (KeyError, TypeError, ValueError):
                    key = None
            out.append(CacheEntry(p, key, str((meta or {}).get("model", ""))))
        return out

    def prune(self, installed_sha256: Iterable[str], remove: bool = False) -> list[Path]:
        """Engines whose model file is no longer installed (or whose sidecar is unreadable);
        deleted (with their sidecars) when ``remove``."""
        keep = set(installed_sha256)
        stale = [e.path for e in self.entries() if e.key is None or e.key.model_sha256 not in keep]
        if remove:
            for p in stale:
                p.unlink(missing_ok=True)
                p.with_suffix(SIDECAR_SUFFIX).unlink(missing_ok=True)
        return stale

    @staticmethod
    def _sidecar(p: Path) -> dict | None:
        try:
            meta = json.loads(p.with_suffix(SIDECAR_SUFFIX).read_text())
        except (OSError, ValueError):
            return None
        return meta if isinstance(meta, dict) else None

    def _sidecar_key(self, p: Path) -> EngineKey | None:
        meta = self._sidecar(p)
        try:
            return EngineKey.from_dict(meta["key"]) if meta else None
        except (KeyError, TypeError, ValueError):
            return None


def default_cache_dir() -> Path:
    """``$OR_AGENT_ENGINE_CACHE`` if set, else ``~/.cache/or-agent/engines``."""
    env = os.environ.get("OR_AGENT_ENGINE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "or-agent" / "engines"


# --------------------------------------------------------------------------- build

def refuse_live_build_message(manifest: ModelManifest, key: EngineKey) -> str:
    return (f"no TensorRT engine for {manifest.name} on {key.gpu_name} (TensorRT {short_version(key.tensorrt_version)}); "
            "building one takes minutes and is refused during a live case: run `or-agent build-engines` before the case "
            "(or set pipeline.build_engines_live = true to build missing engines when the agent starts)")


def _logger(trt):
    return trt.Logger(trt.Logger.WARNING)


def build_engine(manifest: ModelManifest, cache: EngineCache, key: EngineKey,
                 timing_cache_path: str | os.PathLike | None = None, *, live_session: bool = False,
                 allow_build_live: bool = False, workspace_bytes: int = DEFAULT_WORKSPACE_BYTES,
                 verify: bool = True) -> Path:
    """Build the engine for ``manifest`` on this GPU and cache it under ``key``; returns its path.

    Refused with ModelError during a live case (unless ``allow_build_live``): it takes minutes.
    The timing cache at ``timing_cache_path`` is loaded when present and written back after.
    """
    if live_session and not allow_build_live:
        raise ModelError(refuse_live_build_message(manifest, key))
    trt = import_tensorrt()
    if verify:
        manifest.verify_file()
    logger = _logger(trt)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch: the only mode in TensorRT 10+
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(manifest.model_path.read_bytes()):
        errors = "; ".join(str(parser.get_error(i).desc()) for i in range(parser.num_errors))
        raise ModelError(f"{manifest.model_path}: TensorRT cannot parse the ONNX model ({errors or 'no detail'})")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_bytes))
    # Precision: none of the removed FP16/INT8 flags. The ONNX file carries it (Q/DQ or fp16 weights).

    # One optimisation profile with the manifest's (static) shapes as min = opt = max, for every input.
    shapes = {manifest.input.name: manifest.input.shape, **{s.name: s.shape for s in manifest.state_inputs}}
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        name = network.get_input(i).name
        if name not in shapes:
            raise ModelError(f"{manifest.path}: the model's input {name!r} is not declared in the manifest")
        shp = tuple(shapes[name])
        profile.set_shape(name, shp, shp, shp)
    config.add_optimization_profile(profile)

    tc_path = Path(timing_cache_path) if timing_cache_path else None
    tc_bytes = tc_path.read_bytes() if tc_path and tc_path.is_file() else b""
    timing_cache = config.create_timing_cache(tc_bytes)
    config.set_timing_cache(timing_cache, ignore_mismatch=False)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ModelError(f"{manifest.model_path}: TensorRT could not build an engine for {key.describe()} "
                         "(see the TensorRT log above)")
    path = cache.write(key, bytes(serialized), model=manifest.name)
    if tc_path is not None:
        tc_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(tc_path, bytes(timing_cache.serialize()), durable=True)
    return path


# --------------------------------------------------------------------------- run

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
                self._runtime = trt.Runtime(_logger(trt))
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
