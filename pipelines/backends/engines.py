"""TensorRT engines: the cache key, the engine cache on disk, and the engine build.

Kept apart from the inference backend (``tensorrt.py``): ``or-agent build-engines``, ``doctor``,
the backend choice (``select.py``) and calibration read and fill the cache without running a model,
and the backend only loads what is cached here.

Nothing here imports TensorRT at module import time: it only exists on the OR box, from NVIDIA's
own package index. ``import_tensorrt()`` raises ``DependencyError`` with what to do.

Build, TensorRT 10/11 API only: ``trt.Builder`` -> ``create_network(0)`` (explicit batch is the
only mode since 10; the flag is deprecated) -> ``trt.OnnxParser(network, logger).parse(bytes)`` ->
``create_builder_config`` with a workspace pool limit, one optimisation profile for the (static)
manifest shapes, a persisted timing cache -> ``build_serialized_network``. **No FP16/INT8 builder
flags**: TensorRT 11 removed them and the implicit calibrators. Precision comes from the ONNX file
itself (Q/DQ nodes from ``or-agent calibrate int8``, or an FP16-converted ONNX); the manifest's
``precision`` only names it for the cache key.

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
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from or_agent.pipelines.errors import DependencyError, ModelError
from or_agent.pipelines.files import atomic_write_bytes
from or_agent.pipelines.manifest import ModelManifest

if TYPE_CHECKING:  # a type only: the key is made from what gpu_info() read
    from or_agent.pipelines.gpu.context import GpuInfo

TENSORRT_INSTALL_HINT = ("TensorRT is not installed: install it on the OR box from NVIDIA's index "
                         "(pip install --extra-index-url https://pypi.nvidia.com tensorrt)")
DEFAULT_WORKSPACE_BYTES = 1 << 30
ENGINE_SUFFIX = ".engine"
TIMING_CACHE_NAME = "timing.cache"  # in the engine cache directory unless given elsewhere
SIDECAR_SUFFIX = ".json"


# --------------------------------------------------------------------------- lazy import

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


def trt_logger(trt):
    """The logger every TensorRT object here is made with: warnings and errors only."""
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
    logger = trt_logger(trt)
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
