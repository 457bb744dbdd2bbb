"""Stand-ins for CUDA and TensorRT, to run the builder and runtime glue on a CPU.

They mirror the real APIs' names (tests/test_tensorrt_api.py checks every name used
here against the real ``tensorrt_lean`` module and the symbol tables of the full
bindings), keep "device memory" in numpy arrays, and compute a known function, so the
code's profile handling, splitting, buffer handling and error paths are checked for
real results. Nothing here claims TensorRT ran.
"""

from __future__ import annotations

import enum
import itertools
import types
from typing import Dict, List, Optional, Tuple

import numpy as np

from engines.base import EngineError
from engines import cuda as real_cuda


# ---------------------------------------------------------------- CUDA ---------

class FakeCuda:
    """Replaces the allocation, copy, stream and graph functions of engines.cuda."""

    def __init__(self, name: str = "NVIDIA L4", cc: Tuple[int, int] = (8, 9), graphs_work: bool = True):
        self.memory: Dict[int, np.ndarray] = {}
        self._next = itertools.count(1)
        self.info = real_cuda.DeviceInfo(0, name, cc[0], cc[1], 24 << 30)
        self.graphs_work = graphs_work
        #: While a graph is being captured: the kernels enqueued so far (else None).
        self.capturing = None
        #: "sync" and "capture" in the order they happened (capture must follow a synchronize).
        self.events: List[str] = []
        self.device_info_calls = 0
        #: (kind, nbytes) of every copy: kind is "h2d", "d2h" or "d2d".
        self.copies: List[Tuple[str, int]] = []
        #: (consumer stream, producer stream handle) of every cross-stream wait.
        self.waits: List[Tuple[int, int]] = []
        fake = self

        class DeviceBuffer:
            def __init__(self, nbytes):
                self.nbytes = max(int(nbytes), 1)
                self.ptr = fake._alloc(self.nbytes)

            def free(self):
                fake.memory.pop(self.ptr, None)
                self.ptr = 0

        class PinnedBuffer(DeviceBuffer):
            def __init__(self, nbytes):
                super().__init__(nbytes)
                self.array = fake.memory[self.ptr]

            view = real_cuda.PinnedBuffer.view

        class Stream:
            def __init__(self):
                self.handle = next(fake._next)

            @property
            def ptr(self):
                return self.handle

            def synchronize(self):
                fake.events.append("sync")

            def destroy(self):
                self.handle = None

        self.DeviceBuffer, self.PinnedBuffer, self.Stream = DeviceBuffer, PinnedBuffer, Stream

    def _alloc(self, n: int) -> int:
        ptr = next(self._next) << 32
        self.memory[ptr] = np.zeros(n, np.uint8)
        return ptr

    def bytes_at(self, ptr: int) -> np.ndarray:
        """The bytes from ``ptr`` (an allocation's start or an address inside it) to the allocation's end."""
        base = ptr & ~0xFFFFFFFF
        return self.memory[base][ptr - base:]

    def device_array(self, array: np.ndarray, stream: Optional[int] = None) -> "FakeDeviceArray":
        """A copy of ``array`` in fake device memory, exposing ``__cuda_array_interface__``."""
        array = np.ascontiguousarray(array)
        ptr = self._alloc(max(array.nbytes, 1))
        self.memory[ptr][:array.nbytes] = array.view(np.uint8).reshape(-1)
        return FakeDeviceArray(ptr, array.shape, array.dtype, stream)

    def install(self, monkeypatch) -> "FakeCuda":
        m = real_cuda
        for name in ("DeviceBuffer", "PinnedBuffer", "Stream"):
            monkeypatch.setattr(m, name, getattr(self, name))
        monkeypatch.setattr(m, "set_device", lambda index: None)
        monkeypatch.setattr(m, "device_count", lambda: 1)
        monkeypatch.setattr(m, "device_info", self.device_info)
        monkeypatch.setattr(m, "copy_h2d_async", lambda *a: self.copy(*a, kind="h2d"))
        monkeypatch.setattr(m, "copy_d2h_async", lambda *a: self.copy(*a, kind="d2h"))
        monkeypatch.setattr(m, "copy_d2d_async", lambda *a: self.copy(*a, kind="d2d"))
        monkeypatch.setattr(m, "wait_for_stream", lambda stream, producer: self.waits.append((stream.ptr, producer)))
        monkeypatch.setattr(m, "capture_graph", self.capture_graph)
        return self

    def device_info(self, index=0):
        self.device_info_calls += 1
        return self.info

    def copy(self, dst, src, nbytes, stream, kind="h2d"):
        self.copies.append((kind, nbytes))
        self.bytes_at(dst)[:nbytes] = self.bytes_at(src)[:nbytes]

    def capture_graph(self, stream, work):
        """Like a CUDA graph: records the kernels ``work`` enqueues, and replays only those."""
        self.events.append("capture")
        if not self.graphs_work:
            return None
        self.capturing = []
        try:
            work()
        except Exception:
            return None
        finally:
            kernels, self.capturing = self.capturing, None
        return types.SimpleNamespace(launch=lambda s: [k() for k in kernels], destroy=lambda: None)


class FakeDeviceArray:
    """An array in :class:`FakeCuda` memory, seen through ``__cuda_array_interface__`` (v3) like CuPy's."""

    def __init__(self, ptr: int, shape, dtype, stream: Optional[int] = None):
        self.ptr, self.shape, self.dtype, self.stream = ptr, tuple(shape), np.dtype(dtype), stream

    @property
    def __cuda_array_interface__(self):
        return {"shape": self.shape, "typestr": self.dtype.str, "data": (self.ptr, False), "strides": None,
                "version": 3, "stream": self.stream}

    def __array__(self, *args, **kwargs):
        raise TypeError("a device array cannot become a host array implicitly (the code under test tried)")


class FakeCudart:
    """The subset of ``cuda.bindings.runtime`` that engines.cuda's classes call, recording frees.

    Install with ``monkeypatch.setattr(engines.cuda, "_cudart", FakeCudart())``; results are
    ``(cudaError_t, *values)`` tuples like cuda-python's.
    """

    cudaError_t = types.SimpleNamespace(cudaSuccess=0, cudaErrorStreamCaptureInvalidated=901)
    cudaStreamCaptureMode = types.SimpleNamespace(cudaStreamCaptureModeThreadLocal=1)
    cudaStreamNonBlocking = 1

    def __init__(self):
        import ctypes

        self._ctypes = ctypes
        self._next = itertools.count(1)
        self.host: Dict[int, object] = {}
        self.released: List[Tuple[str, int]] = []

    def cudaMalloc(self, n):
        return 0, next(self._next) << 20

    def cudaFree(self, ptr):
        self.released.append(("cudaFree", ptr))
        return (0,)

    def cudaMallocHost(self, n):
        buf = self._ctypes.create_string_buffer(n)
        ptr = self._ctypes.addressof(buf)
        self.host[ptr] = buf
        return 0, ptr

    def cudaFreeHost(self, ptr):
        self.released.append(("cudaFreeHost", ptr))
        return (0,)

    def cudaStreamCreateWithFlags(self, flags):
        return 0, next(self._next)

    def cudaStreamDestroy(self, handle):
        self.released.append(("cudaStreamDestroy", handle))
        return (0,)

    def cudaStreamBeginCapture(self, handle, mode):
        return (0,)

    def cudaStreamEndCapture(self, handle):
        return self.cudaError_t.cudaErrorStreamCaptureInvalidated, None

    def cudaGetLastError(self):
        return (0,)

    def cudaGetErrorName(self, err):
        return 0, b"cudaErrorStreamCaptureInvalidated"

    def cudaGetErrorString(self, err):
        return 0, b"operation failed due to a previous error during capture"


# ------------------------------------------------------------- TensorRT --------

class Severity(enum.IntEnum):
    INTERNAL_ERROR = 0
    ERROR = 1
    WARNING = 2
    INFO = 3
    VERBOSE = 4


class ILogger:
    Severity = Severity

    def __init__(self):
        pass


class _Named:
    def __init__(self, name):
        self.name = name

    def __repr__(self):
        return f"DataType.{self.name}"


DataType = types.SimpleNamespace(**{n: _Named(n) for n in
                                    ("FLOAT", "HALF", "BF16", "INT8", "INT32", "INT64", "BOOL", "UINT8", "INT4")})
TensorIOMode = types.SimpleNamespace(INPUT="INPUT", OUTPUT="OUTPUT", NONE="NONE")

#: The fake engine computes sum = a + b and flag = a > b for a: float32 [N, 4], b: int32 [N, 4].
IO = [("a", "INPUT", "FLOAT", 4), ("b", "INPUT", "INT32", 4), ("sum", "OUTPUT", "FLOAT", 4),
      ("flag", "OUTPUT", "BOOL", 4)]


class FakeContext:
    def __init__(self, engine):
        self.engine = engine
        self.profile = 0
        self.shapes: Dict[str, tuple] = {}
        self.addresses: Dict[str, int] = {}
        self.calls: List[str] = []
        # The batch the kernels run for. Like TensorRT's per-shape setup, execute_async_v3 applies
        # set_input_shape's shapes when it enqueues; a captured graph replays kernels only and so
        # runs with whatever this holds (wrong results if another shape ran since the capture).
        self.enqueued_batch = 0

    def set_optimization_profile_async(self, k, stream):
        # Like the bindings (pyCore.cpp: PY_ASSERT_RUNTIME_ERROR, same message): a failure raises RuntimeError,
        # never returns False. Since TensorRT 9/10 any number of contexts may use one profile.
        if not 0 <= k < len(self.engine.profiles) or self.engine.fail_profile:
            self.engine.logger.log(Severity.ERROR, f"setOptimizationProfileAsync: profile index {k} is invalid "
                                                   f"or the switch failed")
            raise RuntimeError("Error in set optimization profile async.")
        self.calls.append(f"profile {k}")
        self.profile = k
        return True

    def set_input_shape(self, name, shape):
        lo, _, hi = self.engine.profiles[self.profile]
        if not lo <= shape[0] <= hi:
            self.engine.logger.log(Severity.ERROR, f"shape {shape} outside profile {self.profile}")
            return False
        self.shapes[name] = tuple(shape)
        return True

    def infer_shapes(self):
        if self.engine.fail_infer_shapes:  # pyCore.cpp infer_shapes: RuntimeError for a negative count
            self.engine.logger.log(Severity.ERROR, "IExecutionContext::inferShapes: shape inference failed")
            raise RuntimeError("infer_shapes error code: -1")
        return [n for n, mode, _, _ in IO if mode == "INPUT" and n not in self.shapes]

    def get_tensor_shape(self, name):
        return (self.shapes["a"][0], 4)

    def set_tensor_address(self, name, ptr):
        self.addresses[name] = ptr
        return True

    def execute_async_v3(self, stream_handle):
        self.calls.append("execute")
        if self.engine.fail_execute:
            self.engine.logger.log(Severity.ERROR, "fake kernel failure")
            return False
        if self.engine.cuda.capturing is not None:
            self.engine.cuda.capturing.append(self._kernel)
            return True
        self.enqueued_batch = self.shapes["a"][0]
        self._kernel()
        return True

    def _kernel(self):
        at = self.engine.cuda.bytes_at
        n = self.enqueued_batch
        a = at(self.addresses["a"])[:n * 16].view(np.float32).reshape(n, 4)
        b = at(self.addresses["b"])[:n * 16].view(np.int32).reshape(n, 4)
        at(self.addresses["sum"])[:n * 16].view(np.float32).reshape(n, 4)[:] = a + b
        at(self.addresses["flag"])[:n * 4].view(np.bool_).reshape(n, 4)[:] = a > b
        self.engine.executed.append(n)


class FakeEngine:
    def __init__(self, cuda: FakeCuda, logger, profiles):
        self.cuda = cuda
        self.logger = logger
        self.profiles = profiles
        self.contexts: List[FakeContext] = []
        self.executed: List[int] = []
        self.fail_execute = False
        self.fail_profile = False
        self.fail_infer_shapes = False

    @property
    def num_io_tensors(self):
        return len(IO)

    @property
    def num_optimization_profiles(self):
        return len(self.profiles)

    def get_tensor_name(self, i):
        return IO[i][0]

    def _row(self, name):
        return next(row for row in IO if row[0] == name)

    def get_tensor_mode(self, name):
        return self._row(name)[1]

    def get_tensor_dtype(self, name):
        return getattr(DataType, self._row(name)[2])

    def get_tensor_shape(self, name):
        return (-1, self._row(name)[3])

    def is_shape_inference_io(self, name):
        return False

    def get_tensor_profile_shape(self, name, k):
        lo, opt, hi = self.profiles[k]
        return [(lo, 4), (opt, 4), (hi, 4)]

    def create_execution_context(self):
        ctx = FakeContext(self)
        self.contexts.append(ctx)
        return ctx


def fake_tensorrt(cuda: FakeCuda, version: str = "10.11.0.33", profiles=((1, 2, 4), (5, 8, 16)),
                  deserialize_ok: bool = True, module_name: str = "tensorrt", needs_host_code: bool = False,
                  deserialize_error: Optional[str] = None):
    """A module-like namespace with the runtime API subset TensorRTEngine uses."""
    state = types.SimpleNamespace(runtimes=[], engines=[], deserialize_calls=0)

    class Runtime:
        def __init__(self, logger):
            self.logger = logger
            self.engine_host_code_allowed = False
            state.runtimes.append(self)

        def deserialize_cuda_engine(self, plan):
            state.deserialize_calls += 1
            if not deserialize_ok:
                self.logger.log(Severity.ERROR, deserialize_error or "The engine plan file is generated on an "
                                                "incompatible device, expecting compute 8.9 got compute 9.0")
                return None
            if needs_host_code and not self.engine_host_code_allowed:
                self.logger.log(Severity.ERROR, "Cannot deserialize an engine with host code when host code "
                                                "is not allowed")
                return None
            engine = FakeEngine(cuda, self.logger, profiles)
            state.engines.append(engine)
            return engine

    return types.SimpleNamespace(__name__=module_name, __version__=version, ILogger=ILogger, Runtime=Runtime,
                                 TensorIOMode=TensorIOMode, DataType=DataType, state=state)


def plan_bytes(major=10, minor=11, patch=0, build=33, size=64) -> bytes:
    """Bytes with a real plan header layout (magic + version at 24-27)."""
    head = b"ftrt" + bytes(20) + bytes([major, minor, patch, build])
    return head + bytes(size - len(head))


# --------------------------------------------------------- TensorRT builder ----

class FakeBuild:
    """The builder API subset build_plan uses; records what the code asked for."""

    def __init__(self, version="10.11.0.33", parse_ok=True, build_ok=True):
        self.version = version
        #: Called inside build_serialized_network (e.g. to let "another process" write the timing cache).
        self.during_build = None
        #: Timing entries this build adds to its cache.
        self.new_timings = {b"conv-" + version.encode()}
        #: ignore_mismatch of every ITimingCache.combine call.
        self.combine_calls: List[bool] = []
        self.parse_ok = parse_ok
        self.build_ok = build_ok
        self.flags: List[str] = []
        self.profiles: List[Dict[str, tuple]] = []
        self.parsed: List[bytes] = []
        self.parse_paths: List[Optional[str]] = []
        self.config = None
        build = self

        class Flag:
            def __init__(self, name):
                self.name = name

        class BuilderFlag:
            VERSION_COMPATIBLE = Flag("VERSION_COMPATIBLE")
            EXCLUDE_LEAN_RUNTIME = Flag("EXCLUDE_LEAN_RUNTIME")

        if version.startswith("10."):
            BuilderFlag.FP16 = Flag("FP16")  # removed in 11.0, like the real bindings

        class Tensor:
            def __init__(self, name, shape):
                self.name, self.shape = name, shape

        class Network:
            def __init__(self):
                self.inputs = []

            @property
            def num_inputs(self):
                return len(self.inputs)

            def get_input(self, i):
                return self.inputs[i]

        class ParserError:
            def desc(self):
                return "Unsupported operator FancyOp"

            def code(self):
                return "UNSUPPORTED_NODE"

            def node(self):
                return 3

            def node_name(self):
                return "fancy_0"

            def node_operator(self):
                return "FancyOp"

        class OnnxParser:
            def __init__(self, network, logger):
                self.network, self.logger = network, logger

            def parse(self, model, path=None):
                build.parsed.append(model)
                build.parse_paths.append(path)
                if not build.parse_ok:
                    self.logger.log(Severity.ERROR, "ModelImporter.cpp: failed to import node 3")
                    return False
                import onnx

                m = onnx.load_model_from_string(model)
                for v in m.graph.input:
                    dims = tuple(d.dim_value if d.dim_value > 0 else -1 for d in v.type.tensor_type.shape.dim)
                    self.network.inputs.append(Tensor(v.name, dims))
                return True

            @property
            def num_errors(self):
                return 0 if build.parse_ok else 1

            def get_error(self, i):
                return ParserError()

        class Profile:
            def __init__(self):
                self.shapes = {}

            def set_shape(self, name, lo, opt, hi):
                self.shapes[name] = (lo, opt, hi)

        class TimingCache:
            """Entries serialized as b"timing:" + sorted entries joined by b";" (anything else is corrupt)."""

            def __init__(self, entries):
                self.entries = set(entries)

            @staticmethod
            def parse(data):
                data = bytes(data)
                if not data:
                    return TimingCache(())
                if not data.startswith(b"timing:"):
                    return None  # the real create_timing_cache gives None for a corrupt or foreign blob
                return TimingCache(e for e in data[len(b"timing:"):].split(b";") if e)

            def serialize(self):
                return memoryview(b"timing:" + b";".join(sorted(self.entries)))

            def combine(self, other, ignore_mismatch):
                build.combine_calls.append(ignore_mismatch)
                self.entries |= other.entries
                return True

        class Config:
            def __init__(self):
                self.pool = {}
                self.builder_optimization_level = None
                self.hardware_compatibility_level = None
                self.cache = None
                build.config = self

            def set_memory_pool_limit(self, pool, size):
                self.pool[pool] = size

            def set_flag(self, flag):
                build.flags.append(flag.name)

            def add_optimization_profile(self, profile):
                build.profiles.append(profile.shapes)
                return len(build.profiles) - 1

            def create_timing_cache(self, data):
                return TimingCache.parse(data)

            def set_timing_cache(self, cache, ignore_mismatch):
                if cache is None:
                    raise TypeError("set_timing_cache(): incompatible function arguments (cache is None)")
                self.cache = cache
                return True

            def get_timing_cache(self):
                return self.cache

        class Builder:
            def __init__(self, logger):
                self.logger = logger

            def create_network(self, flags):
                if flags != 0:
                    raise AttributeError("networks are always explicit batch; pass 0")
                return Network()

            def create_builder_config(self):
                return Config()

            def create_optimization_profile(self):
                return Profile()

            def build_serialized_network(self, network, config):
                if not build.build_ok:
                    self.logger.log(Severity.ERROR, "Error Code 4: Internal Error (out of workspace)")
                    return None
                if build.during_build:
                    build.during_build()
                if config.cache is not None:
                    config.cache.entries |= build.new_timings
                return memoryview(plan_bytes(*[int(x) for x in build.version.split(".")]))

        # SAME_COMPUTE_CAPABILITY first exists in TensorRT 10.9.
        levels = {"AMPERE_PLUS": "AMPERE_PLUS"}
        if tuple(int(x) for x in version.split(".")[:2]) >= (10, 9):
            levels["SAME_COMPUTE_CAPABILITY"] = "SAME_COMPUTE_CAPABILITY"
        self.module = types.SimpleNamespace(
            __name__="tensorrt", __version__=version, ILogger=ILogger, Builder=Builder, OnnxParser=OnnxParser,
            BuilderFlag=BuilderFlag,
            MemoryPoolType=types.SimpleNamespace(WORKSPACE="WORKSPACE"),
            HardwareCompatibilityLevel=types.SimpleNamespace(**levels))


def no_gpu(*args, **kwargs):
    raise EngineError("No CUDA GPU is usable here (fake)")
