"""Thin, checked wrappers over the CUDA runtime API (cuda-python's ``cuda.bindings.runtime``).

Only what the engines and the GPU decoder need: device checks, free memory, device and pinned
host memory, streams, async copies and CUDA graphs (the TensorRT runner, ``images.decoder_service``'s
buffers, ``engines.gpu_memory``). Every call's status is checked and turned into an
:class:`EngineError` naming the call. cuda-python is imported lazily.
"""

from __future__ import annotations

import ctypes
import dataclasses
import logging
import threading
import weakref
from typing import Optional

import numpy as np

from engines.base import EngineError

_LOG = logging.getLogger(__name__)

_cudart = None
_lock = threading.Lock()


def cudart():
    """The CUDA runtime bindings module (``cuda.bindings.runtime``, or ``cuda.cudart`` before 12.6), from
    :func:`engines.devices.cuda_runtime`, so GPU decode and the engine find the same one.

    Raises:
        ImportError: cuda-python is not installed; the message names the fix.
    """
    global _cudart
    if _cudart is None:
        with _lock:
            if _cudart is None:
                from engines.devices import cuda_runtime

                _cudart = cuda_runtime()
    return _cudart


def _error_text(rt, err) -> str:
    try:
        name = rt.cudaGetErrorName(err)[1]
        text = rt.cudaGetErrorString(err)[1]
        return f"{name.decode() if isinstance(name, bytes) else name}: " \
               f"{text.decode() if isinstance(text, bytes) else text}"
    except Exception:  # the error path must not raise a second, less useful error
        return str(err)


def check(result, what: str):
    """Unpacks a cuda-python ``(status, *values)`` result, raising on a non-success status.

    Returns:
        None, the single value, or a tuple of values.
    """
    rt = cudart()
    if isinstance(result, tuple):
        err, values = result[0], result[1:]
    else:
        err, values = result, ()
    if err != rt.cudaError_t.cudaSuccess:
        raise EngineError(f"CUDA call {what} failed with {_error_text(rt, err)}")
    if not values:
        return None
    return values[0] if len(values) == 1 else values


@dataclasses.dataclass(frozen=True)
class DeviceInfo:
    """The GPU a plan is built for or run on."""

    index: int
    name: str
    major: int
    minor: int
    total_memory: int

    @property
    def compute_capability(self) -> str:
        return f"{self.major}.{self.minor}"


def device_count() -> int:
    """Number of visible CUDA GPUs.

    Raises:
        EngineError: no CUDA driver, or no GPU visible. (Checked before any TensorRT runtime is
            created: without a driver ``trt.Runtime`` returns an object whose next use segfaults.)
    """
    rt = cudart()
    err, count = rt.cudaGetDeviceCount()
    if err != rt.cudaError_t.cudaSuccess or count < 1:
        reason = _error_text(rt, err) if err != rt.cudaError_t.cudaSuccess else "0 devices"
        raise EngineError(
            f"No CUDA GPU is usable here (cudaGetDeviceCount: {reason}). TensorRT needs an NVIDIA GPU and "
            f"driver: on Dataflow pass --dataflow_service_options=\"worker_accelerator=type:nvidia-l4;count:1;"
            f"install-nvidia-driver:latest\"; locally check `nvidia-smi`. There is no CPU fallback for TensorRT; use "
            f"--engine onnxruntime to run on CPU")
    return int(count)


def device_info(index: int = 0) -> DeviceInfo:
    """Name, compute capability and memory of GPU ``index`` (after :func:`device_count`)."""
    count = device_count()
    if not 0 <= index < count:
        raise EngineError(f"GPU {index} does not exist: {count} GPU(s) are visible (indices 0..{count - 1})")
    rt = cudart()
    props = check(rt.cudaGetDeviceProperties(index), f"cudaGetDeviceProperties({index})")
    name = props.name
    if isinstance(name, (bytes, bytearray)):
        name = bytes(name).split(b"\0", 1)[0].decode("utf-8", "replace")
    return DeviceInfo(index, str(name), int(props.major), int(props.minor), int(props.totalGlobalMem))


def set_device(index: int) -> None:
    """Makes GPU ``index`` current for the calling thread (each thread starts on GPU 0)."""
    check(cudart().cudaSetDevice(index), f"cudaSetDevice({index})")


def _release(call: str, handle) -> None:
    """Frees a CUDA resource whose owner was garbage-collected without ``free()``/``destroy()``.

    Runs from ``weakref.finalize`` (Beam never calls ``close()`` on a model), maybe at
    interpreter exit when CUDA may be gone: failures are logged, never raised.
    """
    try:
        rt = cudart()
        err = getattr(rt, call)(handle)
        err = err[0] if isinstance(err, tuple) else err
        if err != rt.cudaError_t.cudaSuccess:
            _LOG.debug("%s in a finalizer failed with %s", call, _error_text(rt, err))
    except Exception as e:  # a finalizer must not raise
        _LOG.debug("%s in a finalizer failed: %s", call, e)


class DeviceBuffer:
    """``nbytes`` of device memory from ``cudaMalloc``; freed by :meth:`free` or when collected."""

    def __init__(self, nbytes: int):
        self.nbytes = max(int(nbytes), 1)
        self.ptr = int(check(cudart().cudaMalloc(self.nbytes), f"cudaMalloc({self.nbytes})"))
        self._finalizer = weakref.finalize(self, _release, "cudaFree", self.ptr)

    def free(self) -> None:
        if self.ptr:
            self._finalizer.detach()
            check(cudart().cudaFree(self.ptr), "cudaFree")
            self.ptr = 0


class PinnedBuffer:
    """``nbytes`` of page-locked host memory from ``cudaMallocHost``, viewed as a numpy array.

    Copies from pinned memory are truly asynchronous, so copies of one batch overlap
    compute of another; from pageable memory they are not. Freed by :meth:`free` or when
    collected.
    """

    def __init__(self, nbytes: int):
        self.nbytes = max(int(nbytes), 1)
        self.ptr = int(check(cudart().cudaMallocHost(self.nbytes), f"cudaMallocHost({self.nbytes})"))
        self._finalizer = weakref.finalize(self, _release, "cudaFreeHost", self.ptr)
        raw = (ctypes.c_uint8 * self.nbytes).from_address(self.ptr)
        self.array = np.frombuffer(raw, dtype=np.uint8)

    def view(self, dtype: np.dtype, shape) -> np.ndarray:
        """The first bytes of the buffer as an array of ``dtype`` and ``shape``."""
        dtype = np.dtype(dtype)
        count = int(np.prod(shape, dtype=np.int64)) if len(shape) else 1
        nbytes = count * dtype.itemsize
        if nbytes > self.nbytes:
            raise EngineError(f"{nbytes} bytes for shape {tuple(shape)} exceed the {self.nbytes}-byte buffer")
        return self.array[:nbytes].view(dtype).reshape(shape)

    def free(self) -> None:
        if self.ptr:
            self.array = None
            self._finalizer.detach()
            check(cudart().cudaFreeHost(self.ptr), "cudaFreeHost")
            self.ptr = 0


class Stream:
    """A non-blocking CUDA stream (does not synchronize with the legacy default stream).

    Destroyed by :meth:`destroy` or when collected.
    """

    def __init__(self):
        rt = cudart()
        self.handle = check(rt.cudaStreamCreateWithFlags(rt.cudaStreamNonBlocking), "cudaStreamCreateWithFlags")
        self._finalizer = weakref.finalize(self, _release, "cudaStreamDestroy", self.handle)

    @property
    def ptr(self) -> int:
        """The ``cudaStream_t`` as an int (what ``execute_async_v3`` and CuPy take)."""
        return int(self.handle)

    def synchronize(self) -> None:
        check(cudart().cudaStreamSynchronize(self.handle), "cudaStreamSynchronize")

    def destroy(self) -> None:
        if self.handle is not None:
            self._finalizer.detach()
            check(cudart().cudaStreamDestroy(self.handle), "cudaStreamDestroy")
            self.handle = None


def copy_h2d_async(dst: int, src: int, nbytes: int, stream: Stream) -> None:
    rt = cudart()
    check(rt.cudaMemcpyAsync(dst, src, nbytes, rt.cudaMemcpyKind.cudaMemcpyHostToDevice, stream.handle),
          "cudaMemcpyAsync(host to device)")


def copy_d2h_async(dst: int, src: int, nbytes: int, stream: Stream) -> None:
    rt = cudart()
    check(rt.cudaMemcpyAsync(dst, src, nbytes, rt.cudaMemcpyKind.cudaMemcpyDeviceToHost, stream.handle),
          "cudaMemcpyAsync(device to host)")


def copy_d2d_async(dst: int, src: int, nbytes: int, stream: Stream) -> None:
    rt = cudart()
    check(rt.cudaMemcpyAsync(dst, src, nbytes, rt.cudaMemcpyKind.cudaMemcpyDeviceToDevice, stream.handle),
          "cudaMemcpyAsync(device to device)")


def wait_for_stream(stream: Stream, producer: int) -> None:
    """Makes ``stream`` wait for the work enqueued so far on the stream handle ``producer``.

    For device arrays whose ``__cuda_array_interface__`` names the stream that produced them
    (v3 ``stream`` key): the consumer must order its reads after that stream's work. 1 and 2
    are the legacy and per-thread default streams, as in the interface's specification.
    """
    rt = cudart()
    event = check(rt.cudaEventCreateWithFlags(rt.cudaEventDisableTiming), "cudaEventCreateWithFlags")
    try:
        check(rt.cudaEventRecord(event, producer), f"cudaEventRecord(stream {producer})")
        check(rt.cudaStreamWaitEvent(stream.handle, event, 0), "cudaStreamWaitEvent")
    finally:
        rt.cudaEventDestroy(event)  # released once the wait is satisfied; safe to destroy now


class Graph:
    """A captured CUDA graph, instantiated and ready to replay on a stream."""

    def __init__(self, graph, exec_graph):
        self._graph = graph
        self._exec = exec_graph

    def launch(self, stream: Stream) -> None:
        check(cudart().cudaGraphLaunch(self._exec, stream.handle), "cudaGraphLaunch")

    def destroy(self) -> None:
        rt = cudart()
        if self._exec is not None:
            rt.cudaGraphExecDestroy(self._exec)
            self._exec = None
        if self._graph is not None:
            rt.cudaGraphDestroy(self._graph)
            self._graph = None


def capture_graph(stream: Stream, work) -> Optional[Graph]:
    """Captures what ``work()`` enqueues on ``stream`` into a graph.

    Returns:
        The instantiated graph, or None when capture failed (the stream is left usable and
        the caller falls back to plain enqueue); the reason is logged. ``work`` raising
        counts as a failure.
    """
    rt = cudart()
    err, = rt.cudaStreamBeginCapture(stream.handle, rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal)
    if err != rt.cudaError_t.cudaSuccess:
        _LOG.warning("CUDA graph capture: cudaStreamBeginCapture failed with %s", _error_text(rt, err))
        rt.cudaGetLastError()
        return None
    failure = None
    try:
        work()
    except Exception as e:  # any failure inside capture means: no graph, enqueue normally
        failure = e
    err, graph = rt.cudaStreamEndCapture(stream.handle)
    if failure is not None or err != rt.cudaError_t.cudaSuccess or graph is None:
        if failure is not None:
            _LOG.warning("CUDA graph capture: the enqueue raised %s: %s", type(failure).__name__, failure)
        else:
            _LOG.warning("CUDA graph capture: cudaStreamEndCapture failed with %s", _error_text(rt, err))
        rt.cudaGetLastError()
        if graph is not None and err == rt.cudaError_t.cudaSuccess:
            rt.cudaGraphDestroy(graph)
        return None
    err, exec_graph = rt.cudaGraphInstantiate(graph, 0)
    if err != rt.cudaError_t.cudaSuccess:
        _LOG.warning("CUDA graph capture: cudaGraphInstantiate failed with %s", _error_text(rt, err))
        rt.cudaGetLastError()
        rt.cudaGraphDestroy(graph)
        return None
    return Graph(graph, exec_graph)
