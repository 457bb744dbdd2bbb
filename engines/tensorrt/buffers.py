"""Execution slots: device buffers, pinned host buffers and a stream per execution context.

This is the CUDA side of the TensorRT runner, kept apart from TensorRT itself: a slot
only knows tensor names, dtypes and byte sizes, and calls two callables for the model:

* ``prepare(stream, input_shapes) -> output_shapes``: host-side setup for this batch
  (for TensorRT: choose the profile, ``set_input_shape``, read output shapes);
* ``enqueue(stream, input_shapes, addresses)``: put the computation on ``stream``
  (for TensorRT: ``set_tensor_address`` + ``execute_async_v3``). Any CUDA kernel
  launched on the stream stands in for it in tests (tests/gpu/test_cuda_machinery.py).

Inputs may be host (numpy) or device arrays (``__cuda_array_interface__``, e.g. CuPy or
DALI output): a device input is copied device-to-device into the slot's own input buffer
on the slot's stream, never through the host; only the outputs the caller asks for are
copied back. The slot keeps its own buffers (rather than pointing TensorRT at the
caller's memory) so tensor addresses never change: CUDA graphs stay valid, and a chunk of
a split or padded batch is laid out contiguously. A device-to-device copy of a batch
(e.g. 256 x 224 x 224 x 3 uint8, 38 MB) takes tens of microseconds on an H100, against
milliseconds for the host round trip it replaces.

A :class:`SlotPool` keeps several slots so that the host-to-device copy, compute and
device-to-host copy of consecutive batches overlap: :meth:`SlotPool.run` keeps up to
one batch in flight per slot, and several threads may run at once, each taking free
slots. Buffers are sized once, for the largest shape the engine accepts.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import queue
import threading
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from engines.base import EngineError, array_info
from engines import cuda

_LOG = logging.getLogger(__name__)

Shape = Tuple[int, ...]
Prepare = Callable[[int, Mapping[str, Shape]], Mapping[str, Shape]]
Enqueue = Callable[[int, Mapping[str, Shape], Mapping[str, int]], None]


@dataclasses.dataclass(frozen=True)
class TensorLayout:
    """One input or output a slot holds buffers for.

    Attributes:
        name: Tensor name.
        dtype: numpy dtype (raw bytes such as ``V2`` for bf16 are fine).
        max_bytes: Size of the largest tensor ever copied (the profile max shape).
    """

    name: str
    dtype: np.dtype
    max_bytes: int

    def __post_init__(self):
        object.__setattr__(self, "dtype", np.dtype(self.dtype))
        if self.max_bytes < 0:
            raise EngineError(f"Tensor {self.name}: max_bytes must be >= 0, got {self.max_bytes}")


def nbytes(dtype: np.dtype, shape: Sequence[int]) -> int:
    count = 1
    for d in shape:
        if d < 0:
            raise EngineError(f"shape {tuple(shape)} has an unresolved (-1) dimension")
        count *= int(d)
    return count * np.dtype(dtype).itemsize


@dataclasses.dataclass(frozen=True)
class Rows:
    """Rows ``[start, stop)`` of a host or device array, run as a batch with ``pad`` copies of the last row.

    How a split or padded chunk of a batch reaches a slot without a host copy of a device
    array (numpy slicing would not apply to it) and without concatenating host arrays.
    """

    array: Any
    start: int
    stop: int
    pad: int = 0

    @classmethod
    def whole(cls, array: Any) -> "Rows":
        shape = array_info(array).shape
        return cls(array, 0, shape[0] if shape else 1)

    @property
    def shape(self) -> Shape:
        full = array_info(self.array).shape
        if not full:
            return full
        return (self.stop - self.start + self.pad,) + tuple(full[1:])


def _stream_of(array: Any) -> Optional[int]:
    """The producer stream a device array names (``__cuda_array_interface__`` v3), or None."""
    cai = getattr(array, "__cuda_array_interface__", None)
    stream = cai.get("stream") if cai else None
    return int(stream) if stream else None


class ExecutionSlot:
    """Buffers, a stream and (optionally) CUDA graphs for one execution context.

    Not thread-safe on its own: a :class:`SlotPool` hands each slot to one thread at a time.

    Args:
        inputs: Input tensors, in any order.
        outputs: Output tensors.
        prepare: See the module docstring; called before every batch, outside any capture.
        enqueue: See the module docstring; must only enqueue work on the stream it is given.
        cuda_graphs: Capture ``enqueue`` into a CUDA graph per input shape and replay it when
            the previous batch on this slot had the same shapes (else enqueue plainly once);
            when capture fails for a shape, that shape falls back to plain enqueue. Default False.
        max_graphs: Most graphs kept per slot; further shapes use plain enqueue. Default 64.
        device: GPU index the buffers live on. Default 0.
        name: Label for logs. Default "slot".
    """

    def __init__(self, inputs: Sequence[TensorLayout], outputs: Sequence[TensorLayout], prepare: Prepare,
                 enqueue: Enqueue, *, cuda_graphs: bool = False, max_graphs: int = 64, device: int = 0,
                 name: str = "slot"):
        self.name = name
        self.device = int(device)
        self._inputs = {t.name: t for t in inputs}
        self._outputs = {t.name: t for t in outputs}
        self._prepare = prepare
        self._enqueue = enqueue
        self._cuda_graphs = bool(cuda_graphs)
        self._max_graphs = int(max_graphs)
        self._graphs: Dict[tuple, cuda.Graph] = {}
        self._graph_output_shapes: Dict[tuple, Mapping[str, Shape]] = {}
        self._no_graph: set = set()
        #: Input shapes of this slot's last plain enqueue (the shapes its context last applied).
        self._last_enqueued: Optional[tuple] = None
        self.counts = collections.Counter()
        self._pending: Optional[Mapping[str, Shape]] = None
        cuda.set_device(self.device)
        self.stream = cuda.Stream()
        self.device_buffers: Dict[str, cuda.DeviceBuffer] = {}
        self.host_buffers: Dict[str, cuda.PinnedBuffer] = {}
        try:
            for t in list(inputs) + list(outputs):
                self.device_buffers[t.name] = cuda.DeviceBuffer(t.max_bytes)
                self.host_buffers[t.name] = cuda.PinnedBuffer(t.max_bytes)
        except Exception:
            self.close()
            raise
        self.addresses = {name: buf.ptr for name, buf in self.device_buffers.items()}

    def submit(self, feed: Mapping[str, Union[Rows, Any]], outputs: Optional[Sequence[str]] = None) -> None:
        """Stages ``feed`` and enqueues copy-in, compute and copy-out of the requested outputs.

        Host arrays are staged in pinned memory and copied host-to-device; device arrays are
        copied device-to-device (after the stream they name, if any). Returns at once;
        :meth:`wait` returns the outputs.

        Args:
            feed: One array (numpy or device) or :class:`Rows` per input name.
            outputs: Output names to copy back. Default None: every output.

        Raises:
            EngineError: a tensor larger than its buffer, or a CUDA/model failure.
        """
        if self._pending is not None:
            raise EngineError(f"{self.name}: submit() called twice without wait()")
        names = list(self._outputs) if outputs is None else list(outputs)
        cuda.set_device(self.device)
        shapes = {}
        for name, layout in self._inputs.items():
            rows = feed[name] if isinstance(feed[name], Rows) else Rows.whole(feed[name])
            shape = rows.shape
            size = nbytes(layout.dtype, shape)
            if size > layout.max_bytes:
                raise EngineError(f"Input tensor: {name} | shape {shape} needs {size} bytes, more than "
                                  f"the {layout.max_bytes} bytes sized for the largest profile shape")
            self._stage(name, layout, rows, size)
            shapes[name] = shape
        out_shapes = {k: tuple(int(d) for d in v) for k, v in self._prepare(self.stream.ptr, shapes).items()}
        self._run(shapes)
        for name in names:
            layout = self._outputs[name]
            size = nbytes(layout.dtype, out_shapes[name])
            if size > layout.max_bytes:
                raise EngineError(f"Output tensor: {name} | shape {out_shapes[name]} needs {size} bytes, more "
                                  f"than the {layout.max_bytes} bytes sized for it")
            cuda.copy_d2h_async(self.host_buffers[name].ptr, self.device_buffers[name].ptr, size, self.stream)
        self._pending = {name: out_shapes[name] for name in names}

    def _stage(self, name: str, layout: TensorLayout, rows: Rows, size: int) -> None:
        """Puts ``rows`` (and its padding) into this slot's device buffer for input ``name``."""
        info = array_info(rows.array)
        n = rows.stop - rows.start
        row_bytes = nbytes(layout.dtype, info.shape[1:]) if info.shape else size
        dst = self.device_buffers[name].ptr
        if info.on_device:
            producer = _stream_of(rows.array)
            if producer is not None:
                cuda.wait_for_stream(self.stream, producer)
            src = info.device_ptr + rows.start * row_bytes
            cuda.copy_d2d_async(dst, src, n * row_bytes, self.stream)
            last = dst + (n - 1) * row_bytes
            for i in range(rows.pad):  # padding repeats the last row, on the device
                cuda.copy_d2d_async(dst + (n + i) * row_bytes, last, row_bytes, self.stream)
            return
        array = np.asarray(rows.array)
        staged = self.host_buffers[name].view(layout.dtype, rows.shape)
        if info.shape:
            np.copyto(staged[:n], array[rows.start:rows.stop], casting="no")
            if rows.pad:
                staged[n:] = staged[n - 1]
        else:
            np.copyto(staged, array, casting="no")
        cuda.copy_h2d_async(dst, self.host_buffers[name].ptr, size, self.stream)

    def _run(self, shapes: Mapping[str, Shape]) -> None:
        key = tuple(sorted(shapes.items()))
        if not self._cuda_graphs:
            self._enqueue_plain(key, shapes)
            return
        graph = self._graphs.get(key)
        # A graph is valid for one (context, profile, shapes, addresses) (docs/tensorrt.md, "CUDA graphs"): it replays
        # kernels only, not the per-shape setup execute_async_v3 does after set_input_shape. So
        # replay only when this context's previous enqueue had these very shapes; after another
        # shape, one plain enqueue re-applies them and the next batch of this shape replays.
        if graph is not None and self._last_enqueued == key:
            graph.launch(self.stream)
            self.counts["graph_launch"] += 1
            return
        # A plain run (which also computes this batch, and lets the model do its lazy per-shape
        # setup before capture, as TensorRT requires), then capture if this shape has no graph.
        self._enqueue_plain(key, shapes)
        if graph is not None or key in self._no_graph or len(self._graphs) >= self._max_graphs:
            return
        # docs/tensorrt.md, "CUDA graphs": enqueue once and synchronize, then capture.
        self.stream.synchronize()
        graph = cuda.capture_graph(self.stream, lambda: self._enqueue(self.stream.ptr, shapes, self.addresses))
        if graph is None:
            self._no_graph.add(key)
            self.counts["capture_failed"] += 1
            _LOG.warning("%s: CUDA graph capture failed for input shapes %s; using plain enqueue for them",
                         self.name, dict(shapes))
        else:
            self._graphs[key] = graph
            self.counts["captured"] += 1

    def _enqueue_plain(self, key: tuple, shapes: Mapping[str, Shape]) -> None:
        self._last_enqueued = None  # unknown if the enqueue fails half way
        self._enqueue(self.stream.ptr, shapes, self.addresses)
        self._last_enqueued = key
        self.counts["enqueue"] += 1

    def wait(self) -> Dict[str, np.ndarray]:
        """Waits for the submitted batch and returns fresh copies of its requested outputs."""
        if self._pending is None:
            raise EngineError(f"{self.name}: wait() called without submit()")
        out_shapes, self._pending = self._pending, None
        self.stream.synchronize()
        return {name: self.host_buffers[name].view(self._outputs[name].dtype, shape).copy()
                for name, shape in out_shapes.items()}

    def abandon(self) -> None:
        """Waits for whatever is in flight and forgets it (after an error)."""
        self._pending = None
        self._last_enqueued = None  # prepare() may have set shapes that were never enqueued
        if self.stream is not None and self.stream.handle is not None:
            try:
                self.stream.synchronize()
            except EngineError as e:
                _LOG.warning("%s: %s", self.name, e)

    @property
    def graph_count(self) -> int:
        return len(self._graphs)

    def close(self) -> None:
        """Frees graphs, buffers and the stream. Safe to call twice."""
        if getattr(self, "stream", None) is not None:
            self.abandon()
        for graph in self._graphs.values():
            graph.destroy()
        self._graphs.clear()
        for buffers in (getattr(self, "device_buffers", {}), getattr(self, "host_buffers", {})):
            for buf in buffers.values():
                buf.free()
            buffers.clear()
        if getattr(self, "stream", None) is not None:
            self.stream.destroy()
            self.stream = None


class SlotPool:
    """Hands out execution slots and pipelines batches over them.

    Args:
        slots: The slots (one per execution context). Two or more let copies and
            compute of consecutive batches overlap.
    """

    def __init__(self, slots: Sequence[ExecutionSlot]):
        if not slots:
            raise EngineError("a SlotPool needs at least one execution slot")
        self.slots: List[ExecutionSlot] = list(slots)
        self._free: "queue.Queue[ExecutionSlot]" = queue.Queue()
        for slot in self.slots:
            self._free.put(slot)
        self._closed = False
        self._lock = threading.Lock()

    @property
    def size(self) -> int:
        return len(self.slots)

    def run(self, feeds: Iterable[Mapping[str, Any]], depth: Optional[int] = None,
            outputs: Optional[Sequence[str]] = None) -> Iterator[Dict[str, np.ndarray]]:
        """Runs feeds in order with up to ``depth`` batches in flight; yields outputs in order.

        Deadlock-free with any number of threads: a thread blocks for a slot only while it
        holds none; otherwise it takes a free slot if there is one, or reuses its oldest.

        Args:
            feeds: Batches, each already validated and within the slots' buffer sizes.
            depth: Most batches in flight for this call. Default: the number of slots.
            outputs: Output names to copy back. Default None: every output.
        """
        if self._closed:
            raise EngineError("the engine is closed")
        depth = max(1, min(int(depth or self.size), self.size))
        in_flight: "collections.deque[ExecutionSlot]" = collections.deque()
        idle: List[ExecutionSlot] = []
        try:
            for feed in feeds:
                slot = idle.pop() if idle else None
                if slot is None and len(in_flight) < depth:
                    slot = self._acquire(block=not in_flight)
                if slot is None:
                    slot = in_flight.popleft()
                    result = slot.wait()
                    idle.append(slot)
                    yield result
                    slot = idle.pop()
                try:
                    slot.submit(feed, outputs)
                except BaseException:
                    slot.abandon()
                    idle.append(slot)
                    raise
                in_flight.append(slot)
            while in_flight:
                slot = in_flight.popleft()
                result = slot.wait()
                idle.append(slot)
                yield result
        finally:
            for slot in in_flight:
                slot.abandon()
            for slot in list(in_flight) + idle:
                self._free.put(slot)

    def _acquire(self, block: bool) -> Optional[ExecutionSlot]:
        try:
            return self._free.get(block=block)
        except queue.Empty:
            return None

    def close(self) -> None:
        """Frees every slot; call when no thread is running."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        for slot in self.slots:
            slot.close()
