"""Emulated TensorRT 10/11 Python API for tests (see tests/emulated_gpu/README.md): the names and call
shapes the agent uses, with ONNX Runtime doing the arithmetic on emulated device memory."""

import numpy as np
import onnxruntime as ort
from pycuda.driver import capturing, device_bytes

__version__ = "11.0.0.0"
build_calls: list[str] = []  # names of the ONNX graphs built, in order (tests read it)


class Logger:
    WARNING = 2

    def __init__(self, severity=WARNING):
        self.severity = severity


class TensorIOMode:
    INPUT = "INPUT"
    OUTPUT = "OUTPUT"


class MemoryPoolType:
    WORKSPACE = "WORKSPACE"


def nptype(dtype):
    return dtype


# ----------------------------------------------------------------------------- build

class _Tensor:
    def __init__(self, name):
        self.name = name


class _Network:
    def __init__(self):
        self.onnx = None
        self.inputs: list[str] = []

    @property
    def num_inputs(self):
        return len(self.inputs)

    def get_input(self, i):
        return _Tensor(self.inputs[i])


class _ParserError:
    def __init__(self, text):
        self._text = text

    def desc(self):
        return self._text


class OnnxParser:
    def __init__(self, network, logger):
        self.network, self._errors = network, []

    @property
    def num_errors(self):
        return len(self._errors)

    def get_error(self, i):
        return _ParserError(self._errors[i])

    def parse(self, model: bytes) -> bool:
        try:
            sess = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
        except Exception as exc:
            self._errors.append(f"ModelImporter: {str(exc).splitlines()[0]}")
            return False
        self.network.onnx = bytes(model)
        self.network.inputs = [i.name for i in sess.get_inputs()]
        return True


class _Profile:
    def __init__(self):
        self.shapes = {}

    def set_shape(self, name, min_shape, opt_shape, max_shape):
        if not (tuple(min_shape) == tuple(opt_shape) == tuple(max_shape)):
            raise ValueError("the emulation takes static shapes only")
        self.shapes[name] = tuple(opt_shape)


class _TimingCache:
    def __init__(self, data: bytes):
        self.entries = data.decode().split("\n") if data else []

    def serialize(self):
        return "\n".join(self.entries).encode()


class _BuilderConfig:
    def __init__(self):
        self.pools, self.profiles, self.timing_cache = {}, [], None

    def set_memory_pool_limit(self, pool, size):
        self.pools[pool] = int(size)

    def add_optimization_profile(self, profile):
        self.profiles.append(profile)
        return len(self.profiles) - 1

    def create_timing_cache(self, data: bytes):
        return _TimingCache(data)

    def set_timing_cache(self, cache, ignore_mismatch):
        self.timing_cache = cache
        return True


class Builder:
    def __init__(self, logger):
        self.logger = logger

    def create_network(self, flags=0):
        if flags != 0:
            raise ValueError("TensorRT 10+: explicit batch is the only mode; pass 0")
        return _Network()

    def create_builder_config(self):
        return _BuilderConfig()

    def create_optimization_profile(self):
        return _Profile()

    def build_serialized_network(self, network, config):
        missing = set(network.inputs) - {n for p in config.profiles for n in p.shapes}
        if network.onnx is None or missing or not config.profiles:
            return None
        if config.timing_cache is not None:
            config.timing_cache.entries.append(f"timed {len(network.onnx)} bytes")
        build_calls.append(ort.InferenceSession(network.onnx, providers=["CPUExecutionProvider"]).get_modelmeta().graph_name)
        return b"EMULATED-ENGINE\n" + network.onnx


# ----------------------------------------------------------------------------- run

class Runtime:
    def __init__(self, logger):
        pass

    def deserialize_cuda_engine(self, data: bytes):
        head = b"EMULATED-ENGINE\n"
        if not data.startswith(head):
            return None
        return _Engine(data[len(head):])


class _Engine:
    def __init__(self, onnx: bytes):
        self.session = ort.InferenceSession(onnx, providers=["CPUExecutionProvider"])
        self.io = ([(i.name, TensorIOMode.INPUT, tuple(i.shape)) for i in self.session.get_inputs()]
                   + [(o.name, TensorIOMode.OUTPUT, tuple(o.shape)) for o in self.session.get_outputs()])

    @property
    def num_io_tensors(self):
        return len(self.io)

    def get_tensor_name(self, i):
        return self.io[i][0]

    def _find(self, name):
        return next(t for t in self.io if t[0] == name)

    def get_tensor_mode(self, name):
        return self._find(name)[1]

    def get_tensor_shape(self, name):
        return self._find(name)[2]

    def get_tensor_dtype(self, name):
        return np.float32

    def create_execution_context(self):
        return _ExecutionContext(self)


class _ExecutionContext:
    def __init__(self, engine):
        self.engine, self.addresses, self.input_shapes, self.executions = engine, {}, {}, 0

    def set_input_shape(self, name, shape):
        if tuple(shape) != self.engine.get_tensor_shape(name):
            return False
        self.input_shapes[name] = tuple(shape)
        return True

    def get_tensor_shape(self, name):
        return self.engine.get_tensor_shape(name)

    def set_tensor_address(self, name, address):
        self.addresses[name] = int(address)
        return True

    def execute_async_v3(self, stream_handle):
        if int(stream_handle) in capturing:  # recorded with the addresses bound now, run at launch
            bound = dict(self.addresses)
            capturing[int(stream_handle)].append(lambda: self._execute(bound))
            return True
        return self._execute(self.addresses)

    def _execute(self, addresses):
        feed = {}
        for name, mode, shape in self.engine.io:
            if name not in addresses:
                return False
            if mode == TensorIOMode.INPUT:
                if name not in self.input_shapes:
                    return False
                n = 4 * int(np.prod(shape))
                feed[name] = device_bytes(addresses[name], n).view(np.float32).reshape(shape).copy()
        outputs = self.engine.session.run(None, feed)
        for (name, _mode, _shape), value in zip([t for t in self.engine.io if t[1] == TensorIOMode.OUTPUT], outputs):
            b = np.ascontiguousarray(value, np.float32).reshape(-1).view(np.uint8)
            device_bytes(addresses[name], b.size)[:] = b
        self.executions += 1
        return True
