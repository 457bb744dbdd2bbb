"""A CUDA kernel (CuPy) standing in for TensorRT's ``execute_async_v3``, for the CUDA machinery tests.

The stand-in mirrors the TensorRT runtime API subset that TensorRTEngine uses, so
the real runtime code runs with real device buffers, pinned memory, streams and CUDA
graphs; only the network is replaced by this kernel. It is not TensorRT.

The "model": x uint8 [N, D] -> y float32 [N, D // 16] (sums of 16 consecutive x,
times 2, plus 1), z int32 [N, D] (x - 1). ``iters`` repeats a multiply-add that
leaves the values unchanged, to dial the compute time.
"""

from __future__ import annotations

import types

import numpy as np

KERNEL = r"""
extern "C" __global__ void standin(const unsigned char* x, float* y, int* z, long long rows, int d,
                                   int iters, float a, float b) {
    long long j = blockIdx.x * (long long)blockDim.x + threadIdx.x;   // one thread per 16-wide group
    long long groups = rows * (d / 16);
    if (j >= groups) return;
    long long base = j * 16;
    float acc = 0.f;
    for (int k = 0; k < 16; ++k) {
        float v = (float)x[base + k];
        for (int i = 0; i < iters; ++i) v = v * a + b;   // a = 1, b = 0 at run time: exact, not foldable
        acc += v;
        z[base + k] = (int)x[base + k] - 1;
    }
    y[j] = acc * 2.f + 1.f;
}
"""


def reference(x: np.ndarray):
    rows, d = x.shape
    y = x.reshape(rows, d // 16, 16).astype(np.float32).sum(-1) * 2 + 1
    return {"y": y.astype(np.float32), "z": x.astype(np.int32) - 1}


class StandIn:
    """Launches the kernel on a given stream over raw device pointers."""

    def __init__(self, d: int, iters: int = 1):
        import cupy

        self.cupy = cupy
        self.d = d
        self.iters = iters
        self.kernel = cupy.RawKernel(KERNEL, "standin")
        self.launches = 0

    def output_shapes(self, shapes):
        n = shapes["x"][0]
        return {"y": (n, self.d // 16), "z": (n, self.d)}

    def enqueue(self, stream, shapes, addresses):
        cupy = self.cupy
        n = shapes["x"][0]
        groups = n * (self.d // 16)
        with cupy.cuda.ExternalStream(int(stream)):
            self.kernel(((groups + 255) // 256,), (256,),
                        (np.uint64(addresses["x"]), np.uint64(addresses["y"]), np.uint64(addresses["z"]),
                         np.int64(n), np.int32(self.d), np.int32(self.iters), np.float32(1.0), np.float32(0.0)))
        self.launches += 1


# -- the same, behind the TensorRT runtime API subset TensorRTEngine uses --------------------

class _Severity(int):
    pass


class ILogger:
    class Severity:
        INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = 0, 1, 2, 3, 4

    def __init__(self):
        pass


def _dt(name):
    return types.SimpleNamespace(name=name)


class Context:
    def __init__(self, engine):
        self.engine = engine
        self.shapes = {}
        self.addresses = {}
        self.profile = 0

    def set_optimization_profile_async(self, k, stream):
        self.profile = k
        return True

    def set_input_shape(self, name, shape):
        lo, _, hi = self.engine.profiles[self.profile]
        if not lo <= shape[0] <= hi or tuple(shape[1:]) != (self.engine.standin.d,):
            return False
        self.shapes[name] = tuple(shape)
        return True

    def infer_shapes(self):
        return [] if "x" in self.shapes else ["x"]

    def get_tensor_shape(self, name):
        return self.engine.standin.output_shapes(self.shapes)[name]

    def set_tensor_address(self, name, ptr):
        self.addresses[name] = ptr
        return True

    def execute_async_v3(self, stream):
        self.engine.standin.enqueue(stream, self.shapes, self.addresses)
        return True


class Engine:
    IO = [("x", "INPUT", "UINT8"), ("y", "OUTPUT", "FLOAT"), ("z", "OUTPUT", "INT32")]

    def __init__(self, standin: StandIn, profiles):
        self.standin = standin
        self.profiles = profiles

    num_io_tensors = property(lambda self: len(self.IO))
    num_optimization_profiles = property(lambda self: len(self.profiles))

    def get_tensor_name(self, i):
        return self.IO[i][0]

    def get_tensor_mode(self, name):
        return dict((n, m) for n, m, _ in self.IO)[name]

    def get_tensor_dtype(self, name):
        return _dt(dict((n, t) for n, _, t in self.IO)[name])

    def get_tensor_shape(self, name):
        return {"x": (-1, self.standin.d), "y": (-1, self.standin.d // 16), "z": (-1, self.standin.d)}[name]

    def is_shape_inference_io(self, name):
        return False

    def get_tensor_profile_shape(self, name, k):
        lo, opt, hi = self.profiles[k]
        return [(lo, self.standin.d), (opt, self.standin.d), (hi, self.standin.d)]

    def create_execution_context(self):
        return Context(self)


def module(standin: StandIn, profiles, version: str = "10.11.0.33"):
    """A module-like namespace: TensorRTEngine(plan) deserializes to the stand-in engine."""

    class Runtime:
        def __init__(self, logger):
            self.engine_host_code_allowed = False

        def deserialize_cuda_engine(self, plan):
            return Engine(standin, profiles)

    return types.SimpleNamespace(__name__="tensorrt", __version__=version, ILogger=ILogger, Runtime=Runtime,
                                 TensorIOMode=types.SimpleNamespace(INPUT="INPUT", OUTPUT="OUTPUT"))
