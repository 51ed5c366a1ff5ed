"""CUDA graphs through the CUDA driver API (``libcuda``), for replaying a TensorRT enqueue.

The pycuda builds the OR box gets (2026.1 here) expose no stream capture, so the capture goes
through the driver library every NVIDIA driver installs, with ctypes:
``cuStreamBeginCapture_v2`` (thread-local mode: the preprocessing thread keeps using CUDA
meanwhile), ``cuStreamEndCapture``, ``cuGraphInstantiateWithFlags``, ``cuGraphLaunch`` and the
two destroy calls. Every call is checked; a failure raises ``GraphError`` with the driver's own
error name, and the caller falls back to eager execution.

All calls must run with the owning CUDA context current (the backend's ``with ctx:``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Callable

CU_STREAM_CAPTURE_MODE_THREAD_LOCAL = 1


class GraphError(RuntimeError):
    pass


def load_libcuda():
    """The CUDA driver library (ctypes), or GraphError naming what is missing."""
    name = ctypes.util.find_library("cuda") or "libcuda.so.1"
    try:
        return ctypes.CDLL(name)
    except OSError as exc:
        raise GraphError(f"no CUDA driver library for graph capture ({exc})") from None


class DriverGraphs:
    """Capture, instantiate, launch and destroy CUDA graphs on a stream given by its handle."""

    def __init__(self, lib=None):
        self._lib = lib if lib is not None else load_libcuda()
        vp = ctypes.c_void_p
        signatures = {
            "cuStreamBeginCapture_v2": [vp, ctypes.c_int],
            "cuStreamEndCapture": [vp, ctypes.POINTER(vp)],
            "cuGraphInstantiateWithFlags": [ctypes.POINTER(vp), vp, ctypes.c_ulonglong],
            "cuGraphLaunch": [vp, vp],
            "cuGraphExecDestroy": [vp],
            "cuGraphDestroy": [vp],
            "cuGetErrorName": [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)],
        }
        self._fn = {}
        for name, args in signatures.items():
            try:
                f = getattr(self._lib, name)
            except AttributeError:
                raise GraphError(f"the CUDA driver has no {name} (driver too old for graph capture)") from None
            f.argtypes, f.restype = args, ctypes.c_int
            self._fn[name] = f

    def _call(self, name: str, *args) -> None:
        rc = self._fn[name](*args)
        if rc != 0:
            text = ctypes.c_char_p()
            self._fn["cuGetErrorName"](rc, ctypes.byref(text))
            raise GraphError(f"{name} failed: {(text.value or b'CUDA error').decode()} ({rc})")

    def capture(self, stream_handle: int, enqueue: Callable[[], None]) -> CapturedGraph:
        """Record what ``enqueue`` puts on the stream (nothing runs), and instantiate it."""
        stream = ctypes.c_void_p(int(stream_handle))
        self._call("cuStreamBeginCapture_v2", stream, CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
        graph = ctypes.c_void_p()
        try:
            enqueue()
        finally:
            # Always end the capture: a stream left capturing would refuse every later launch.
            self._call("cuStreamEndCapture", stream, ctypes.byref(graph))
        exec_ = ctypes.c_void_p()
        try:
            self._call("cuGraphInstantiateWithFlags", ctypes.byref(exec_), graph, 0)
        except GraphError:
            self._call("cuGraphDestroy", graph)
            raise
        return CapturedGraph(self, graph, exec_)


class CapturedGraph:
    def __init__(self, driver: DriverGraphs, graph: ctypes.c_void_p, exec_: ctypes.c_void_p):
        self._driver = driver
        self._graph: ctypes.c_void_p | None = graph
        self._exec: ctypes.c_void_p | None = exec_

    def launch(self, stream_handle: int) -> None:
        self._driver._call("cuGraphLaunch", self._exec, ctypes.c_void_p(int(stream_handle)))

    def close(self) -> None:
        if self._exec is not None:
            self._driver._call("cuGraphExecDestroy", self._exec)
            self._driver._call("cuGraphDestroy", self._graph)
            self._exec = self._graph = None
