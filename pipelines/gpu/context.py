"""The CUDA device through pycuda: the context every GPU user shares, and what the device is.

Both the TensorRT backend (``pipelines/backends/tensorrt.py``) and the GPU kernels (``kernels.py``)
need a CUDA context, and the engine cache keys on the GPU's identity. Kept here, below both, so that
neither the backends nor the kernels import the other to reach the device: the GPU package depends on
no backend, and a backend depends on the GPU package only for this module.

Nothing here imports pycuda at module import time: it only builds where the CUDA toolkit is.
``import_pycuda()`` raises ``DependencyError`` ("no CUDA GPU found (pycuda: ...)") with what to do.
"""

from __future__ import annotations

from dataclasses import dataclass

from or_agent.pipelines.errors import DependencyError

PYCUDA_INSTALL_HINT = "install it where the CUDA toolkit is (pip install pycuda, or the wheel built for this box)"


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
