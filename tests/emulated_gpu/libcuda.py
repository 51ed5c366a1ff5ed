"""Emulated CUDA driver library (the graph calls of pipelines/gpu/graphs.py), on the emulated pycuda:
capture records the work enqueued on a stream instead of running it; a launch replays it."""

import itertools

from pycuda.driver import capturing

CUDA_SUCCESS, CUDA_ERROR_INVALID_VALUE, CUDA_ERROR_STREAM_CAPTURE_INVALIDATED = 0, 1, 901
_handles = itertools.count(1000)
graphs: dict[int, list] = {}
execs: dict[int, list] = {}
launches: list[int] = []  # graph exec handles launched, in order (tests read it)


def _fn(f):
    f.argtypes = f.restype = None  # set by the caller, as on a ctypes function
    return f


class EmulatedLibcuda:
    @staticmethod
    @_fn
    def cuStreamBeginCapture_v2(stream, mode):
        h = stream.value
        if h in capturing or mode != 1:
            return CUDA_ERROR_INVALID_VALUE
        capturing[h] = []
        return CUDA_SUCCESS

    @staticmethod
    @_fn
    def cuStreamEndCapture(stream, graph_out):
        work = capturing.pop(stream.value, None)
        if work is None:
            return CUDA_ERROR_STREAM_CAPTURE_INVALIDATED
        graph_out._obj.value = h = next(_handles)
        graphs[h] = work
        return CUDA_SUCCESS

    @staticmethod
    @_fn
    def cuGraphInstantiateWithFlags(exec_out, graph, flags):
        if graph.value not in graphs:
            return CUDA_ERROR_INVALID_VALUE
        exec_out._obj.value = h = next(_handles)
        execs[h] = graphs[graph.value]
        return CUDA_SUCCESS

    @staticmethod
    @_fn
    def cuGraphLaunch(exec_, stream):
        if exec_.value not in execs:
            return CUDA_ERROR_INVALID_VALUE
        launches.append(exec_.value)
        for work in execs[exec_.value]:
            if work() is False:
                return CUDA_ERROR_INVALID_VALUE
        return CUDA_SUCCESS

    @staticmethod
    @_fn
    def cuGraphExecDestroy(exec_):
        return CUDA_SUCCESS if execs.pop(exec_.value, None) is not None else CUDA_ERROR_INVALID_VALUE

    @staticmethod
    @_fn
    def cuGraphDestroy(graph):
        return CUDA_SUCCESS if graphs.pop(graph.value, None) is not None else CUDA_ERROR_INVALID_VALUE

    @staticmethod
    @_fn
    def cuGetErrorName(rc, text_out):
        text_out._obj.value = {1: b"CUDA_ERROR_INVALID_VALUE", 901: b"CUDA_ERROR_STREAM_CAPTURE_INVALIDATED"}.get(rc, b"?")
        return CUDA_SUCCESS
