"""Emulated ``pycuda.driver``: device memory as numpy bytes behind integer addresses; work completes at once."""

import numpy as np

_allocations: dict[int, "DeviceAllocation"] = {}
_next_address = [1 << 20]


class DeviceAllocation:
    def __init__(self, nbytes: int):
        self.address = _next_address[0]
        _next_address[0] += int(nbytes) + 4096  # a gap, so an overrun lands in no allocation
        self.bytes = np.zeros(int(nbytes), np.uint8)
        _allocations[self.address] = self

    def __int__(self):
        return self.address

    __index__ = __int__

    def free(self):
        _allocations.pop(self.address, None)


def device_bytes(pointer, nbytes: int) -> np.ndarray:
    """A writable view of ``nbytes`` at ``pointer``; raises for addresses outside any live allocation."""
    p = int(pointer)
    for base, a in _allocations.items():
        if base <= p and p + nbytes <= base + a.bytes.size:
            return a.bytes[p - base:p - base + nbytes]
    raise RuntimeError(f"emulated CUDA: {nbytes} bytes at {p:#x} are not inside a live allocation")


def live_allocations() -> int:
    return len(_allocations)


def init():
    pass


class device_attribute:
    MULTIPROCESSOR_COUNT = "MULTIPROCESSOR_COUNT"


def get_driver_version():
    return 13000


class _PrimaryContext:
    def push(self):
        pass


class Context:
    @staticmethod
    def pop():
        pass


class Device:
    @staticmethod
    def count():
        return 1

    def __init__(self, ordinal):
        if ordinal != 0:
            raise RuntimeError(f"invalid device ordinal {ordinal}")

    def retain_primary_context(self):
        return _PrimaryContext()

    def name(self):
        return "Emulated GPU"

    def compute_capability(self):
        return (9, 0)

    def get_attribute(self, attribute):
        return 132

    def total_memory(self):
        return 80 * 1024**3


capturing: dict[int, list] = {}  # stream handle -> work recorded while the stream captures (libcuda.py)
_next_stream = [1]


class Stream:
    def __init__(self, flags=0):
        self.handle = _next_stream[0]
        _next_stream[0] += 1

    def synchronize(self):
        if self.handle in capturing:
            raise RuntimeError("emulated CUDA: synchronize on a capturing stream (CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED)")


class Event:
    def record(self, stream=None):
        pass

    def synchronize(self):
        pass

    def time_since(self, other):
        return 0.0


def mem_alloc(nbytes):
    return DeviceAllocation(nbytes)


def pagelocked_empty(shape, dtype):
    return np.zeros(shape, dtype)


def _host_bytes(array) -> np.ndarray:
    if not array.flags.c_contiguous:
        raise ValueError("emulated CUDA: host buffers must be contiguous (as pycuda requires)")
    return array.reshape(-1).view(np.uint8)


def memcpy_htod_async(dest, src, stream=None):
    b = _host_bytes(np.asarray(src))
    device_bytes(dest, b.size)[:] = b


memcpy_htod = memcpy_htod_async


def memcpy_dtoh_async(dest, src, stream=None):
    b = _host_bytes(dest)
    b[:] = device_bytes(src, b.size)


memcpy_dtoh = memcpy_dtoh_async


def memcpy_dtod_async(dest, src, size, stream=None):
    device_bytes(dest, size)[:] = device_bytes(src, size)


def memset_d32_async(dest, value, count, stream=None):
    device_bytes(dest, 4 * count).view(np.uint32)[:] = value


class Memcpy2D:
    src_x_in_bytes = src_y = 0

    def set_src_host(self, array):
        self._src = _host_bytes(array)

    def set_dst_device(self, pointer):
        self._dst = pointer

    def __call__(self, stream=None):
        dst = device_bytes(self._dst, self.dst_pitch * (self.height - 1) + self.width_in_bytes)
        for r in range(self.height):
            s0 = (self.src_y + r) * self.src_pitch + self.src_x_in_bytes
            dst[r * self.dst_pitch:r * self.dst_pitch + self.width_in_bytes] = self._src[s0:s0 + self.width_in_bytes]
