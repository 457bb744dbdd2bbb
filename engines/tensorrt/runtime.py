"""Runs a serialized TensorRT engine: :class:`TensorRTEngine`, an :class:`engines.base.Engine`.

Three jobs with different lifetimes, as in Polygraphy (``EngineFromBytes`` -> runner):

* loading: :class:`~engines.tensorrt.deserialize.EngineFromBytes` checks the plan against
  this runtime and GPU, then deserializes it;
* the layout: :func:`~engines.tensorrt.layout.read_layout`, a pure function of the engine
  (inputs, outputs, profiles);
* running: this module's :class:`TensorRTEngine` owns the execution contexts, one stream and
  buffer set per context (an :class:`~engines.tensorrt.buffers.ExecutionSlot`).

Works with the full ``tensorrt`` module or the lean runtime ``tensorrt_lean`` (for
version-compatible plans). Any number of named inputs and outputs; dtypes are read
from the engine; the batch may be any size: batches within a profile run as one,
larger ones are split into chunks that each fit a profile and their outputs concatenated,
a chunk below the smallest profile min is padded by repeating its last example (those
outputs are dropped), and other shapes outside every profile are refused before anything
is enqueued. Inputs may be host or device arrays (device ones never pass through the host).

Every context uses the one engine and, for each batch, selects the profile that covers it:
TensorRT 10.x/11.x let any number of contexts use the same profile at once
(docs/tensorrt.md, "Profiles and contexts"). With ``num_contexts >= 2`` consecutive batches
overlap copies and compute, whether they come from one call (split batches,
:meth:`TensorRTEngine.infer_many`) or from several threads.
"""

from __future__ import annotations

import logging
import weakref
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from engines.base import Engine, EngineError, Feed, Outputs, TensorSpec, array_info, check_feed
from engines import cuda
from engines.tensorrt.buffers import ExecutionSlot, Rows, SlotPool, TensorLayout, nbytes
from engines.tensorrt.deserialize import EngineFromBytes, LoadedEngine
from engines.tensorrt.layout import EngineLayout, read_layout
from engines.tensorrt.plan import PlanInfo
from engines.tensorrt.shapes import Shape, select_profile, split_points

_LOG = logging.getLogger(__name__)


class _ContextProgram:
    """``prepare``/``enqueue`` of one execution context, for an :class:`ExecutionSlot`.

    Selects, per batch, the profile covering its shapes (``set_optimization_profile_async``
    when it differs from the context's current one). The bindings raise RuntimeError when
    ``set_optimization_profile_async`` or ``infer_shapes`` fail (``PY_ASSERT_RUNTIME_ERROR``
    in NVIDIA/TensorRT's pyCore.cpp); those are turned into an EngineError carrying TensorRT's log.
    """

    def __init__(self, context, layout: EngineLayout, logger, label: str):
        self.context = context
        self.ranges = layout.ranges
        self.outputs = list(layout.outputs)
        self.logger = logger
        self.label = label
        self.profile: Optional[int] = None
        self._addresses: Dict[str, int] = {}

    def use_profile(self, stream: int, k: int) -> None:
        if k == self.profile:
            return
        since = self.logger.mark()
        self.profile = None  # unknown if the switch fails half way
        try:
            ok = self.context.set_optimization_profile_async(k, stream)
        except RuntimeError as e:
            raise EngineError(f"{self.label}: set_optimization_profile_async({k}) failed: {e}: "
                              f"{self.logger.text(since=since)}") from e
        if not ok:
            raise EngineError(f"{self.label}: set_optimization_profile_async({k}) failed: "
                              f"{self.logger.text(since=since)}")
        self.profile = k

    def prepare(self, stream: int, shapes: Mapping[str, Shape]) -> Dict[str, Shape]:
        ctx = self.context
        k = select_profile(self.ranges, shapes)
        self.use_profile(stream, k)
        for name, shape in shapes.items():
            since = self.logger.mark()
            if not ctx.set_input_shape(name, tuple(shape)):
                raise EngineError(f"Input tensor: {name} | TensorRT refused shape {tuple(shape)} in profile {k} "
                                  f"({self.ranges[k][name].describe()}): {self.logger.text(since=since)}")
        since = self.logger.mark()
        try:
            unset = ctx.infer_shapes()
        except RuntimeError as e:
            raise EngineError(f"{self.label}: shape inference failed for input shapes {dict(shapes)}: {e}: "
                              f"{self.logger.text(since=since)}") from e
        if unset:
            raise EngineError(f"{self.label}: input shapes still unset after set_input_shape: {list(unset)}")
        out = {}
        for name in self.outputs:
            shape = tuple(ctx.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise EngineError(f"Output tensor: {name} | shape {shape} depends on the data; engines with "
                                  f"data-dependent output shapes are not supported (no IOutputAllocator)")
            out[name] = shape
        return out

    def enqueue(self, stream: int, shapes: Mapping[str, Shape], addresses: Mapping[str, int]) -> None:
        ctx = self.context
        for name, ptr in addresses.items():
            if self._addresses.get(name) != ptr:  # buffers are fixed: set once per context
                since = self.logger.mark()
                if not ctx.set_tensor_address(name, int(ptr)):
                    raise EngineError(f"{self.label}: set_tensor_address({name}) failed: "
                                      f"{self.logger.text(since=since)}")
                self._addresses[name] = ptr
        # The logger is shared by every context, engine and thread of the process: read only
        # what was logged from here on rather than clearing others' messages.
        since = self.logger.mark()
        if not ctx.execute_async_v3(stream):
            raise EngineError(f"{self.label}: execute_async_v3 failed for input shapes {dict(shapes)}: "
                              f"{self.logger.text(since=since)}")


def create_contexts(loaded: LoadedEngine, count: int) -> List[Any]:
    """``count`` execution contexts on the one engine.

    Raises:
        EngineError: TensorRT could not create one (out of GPU memory), with its log.
    """
    contexts = []
    for i in range(count):
        since = loaded.logger.mark()
        ctx = loaded.engine.create_execution_context()
        if ctx is None:
            raise EngineError(f"could not create execution context {i + 1} of {count} on {loaded.device.name} "
                              f"(out of GPU memory?): {loaded.logger.text(since=since)}. Note: use fewer contexts")
        contexts.append(ctx)
    return contexts


def buffer_sizes(layout: EngineLayout, program: _ContextProgram) -> Tuple[List[TensorLayout], List[TensorLayout]]:
    """Bytes each input and output buffer needs: the largest over every profile's max shapes.

    Output shapes are what TensorRT infers for each profile's max input shapes, asked of one context.
    """
    in_bytes = {name: 0 for name in layout.inputs}
    out_bytes = {name: 0 for name in layout.outputs}
    probe = cuda.Stream()
    try:
        for shapes in layout.max_input_shapes():
            out_shapes = program.prepare(probe.ptr, shapes)
            for name, shape in shapes.items():
                in_bytes[name] = max(in_bytes[name], nbytes(layout.inputs[name].dtype, shape))
            for name, shape in out_shapes.items():
                out_bytes[name] = max(out_bytes[name], nbytes(layout.outputs[name].dtype, shape))
        probe.synchronize()
    finally:
        probe.destroy()
    return ([TensorLayout(n, layout.inputs[n].dtype, b) for n, b in in_bytes.items()],
            [TensorLayout(n, layout.outputs[n].dtype, b) for n, b in out_bytes.items()])


class TensorRTEngine(Engine):
    """A deserialized TensorRT engine with a pool of execution contexts.

    Args:
        plan: The serialized engine, or an :class:`~engines.tensorrt.deserialize.EngineFromBytes`
            loader (then ``device``, ``info``, ``name`` and ``engine_host_code_allowed`` are its own).
        num_contexts: Execution contexts (each with its stream and buffers sized for the
            largest profile), all on one engine. 2 or more overlap copies and compute. Default 2.
        cuda_graphs: Replay a CUDA graph per (context, input shapes) instead of enqueueing
            kernel by kernel; falls back to plain enqueue where capture fails. Default False.
        device: GPU index. Default 0.
        info: The plan's sidecar (:func:`engines.tensorrt.plan.read_sidecar`), used to refuse a
            plan for another TensorRT version or GPU with a clear message. Default None.
        name: A label for logs and errors (the plan's path). Default "".
        engine_host_code_allowed: See :class:`~engines.tensorrt.deserialize.EngineFromBytes`.
            Default None (decided from ``info`` and the runtime module).

    Raises:
        ImportError: no TensorRT or cuda-python.
        EngineError: not a plan, no GPU, built by another TensorRT version or for another GPU
            (with TensorRT's own reason), unsupported I/O, or out of memory.
    """

    kind = "tensorrt"

    def __init__(self, plan: Union[bytes, EngineFromBytes], *, num_contexts: int = 2, cuda_graphs: bool = False,
                 device: int = 0, info: Optional[PlanInfo] = None, name: str = "",
                 engine_host_code_allowed: Optional[bool] = None):
        if num_contexts < 1:
            raise EngineError(f"num_contexts must be >= 1, got {num_contexts}")
        load = plan if isinstance(plan, EngineFromBytes) else EngineFromBytes(
            plan, device=device, info=info, name=name, engine_host_code_allowed=engine_host_code_allowed)
        self._name = load.name
        self._pool: Optional[SlotPool] = None
        self._contexts: List[Any] = []
        self._cuda_graphs = bool(cuda_graphs)
        self._loaded: Optional[LoadedEngine] = load()
        try:
            self._layout = read_layout(self._loaded.engine, self._loaded.trt)
            self._activate(int(num_contexts))
        except BaseException:
            self.close()
            raise
        _LOG.info("tensorrt engine %s loaded on %s: %d context(s) on one engine, profiles %s, cuda graphs %s; "
                  "batches are split at %d and chunks below %d padded by repeating the last example", self._name,
                  self._loaded.device.name, num_contexts, self.profiles, cuda_graphs, self._layout.max_batch,
                  self._layout.min_batch)

    def _activate(self, num_contexts: int) -> None:
        """Contexts, then buffer sizes, then one slot (stream + buffers) per context."""
        loaded = self._loaded
        self._contexts = create_contexts(loaded, num_contexts)
        programs = [_ContextProgram(ctx, self._layout, loaded.logger, f"{self._name} context {i}")
                    for i, ctx in enumerate(self._contexts)]
        in_layout, out_layout = buffer_sizes(self._layout, programs[0])
        slots = []
        try:
            for i, program in enumerate(programs):
                slots.append(ExecutionSlot(in_layout, out_layout, program.prepare, program.enqueue,
                                           cuda_graphs=self._cuda_graphs, device=loaded.device.index,
                                           name=f"{self._name} context {i}"))
        except BaseException:
            for slot in slots:
                slot.close()
            raise
        self._pool = SlotPool(slots)
        # Beam never calls close() on a model: free the CUDA side when the engine is collected.
        # The finalizer holds the pool and the lists, never self.
        self._finalizer = weakref.finalize(self, _release, self._pool, self._contexts, [loaded])

    # -- Engine interface ---------------------------------------------------------------

    @property
    def input_specs(self) -> Dict[str, TensorSpec]:
        return dict(self._layout.inputs)

    @property
    def output_specs(self) -> Dict[str, TensorSpec]:
        return dict(self._layout.outputs)

    @property
    def layout(self) -> EngineLayout:
        """The engine's inputs, outputs and profiles."""
        return self._layout

    @property
    def profiles(self) -> List[Tuple[int, int, int]]:
        """(min, opt, max) batch of each optimisation profile."""
        return self._layout.profiles

    @property
    def max_batch_size(self) -> Optional[int]:
        """The largest batch one profile takes (larger batches are split by :meth:`infer`)."""
        return self._layout.max_batch

    def batch_limit(self) -> Optional[int]:
        """None: :meth:`infer` takes any batch size.

        This engine splits large batches and pads short chunks itself, knowing every
        profile's range, so a caller (``images.scoring.ImageScorer``) must not
        pre-split: an even split made without the profiles can land in a profile gap or
        below a profile's min. A plain method, not a property, so that Beam's cross-process
        shared-model proxy forwards it.
        """
        return None

    def _chunks(self, feed: Feed) -> List[Tuple[Dict[str, Rows], int]]:
        """(chunk feed, rows of it that are real) for each engine call ``feed`` needs.

        A chunk is rows of the fed arrays (host or device, never copied here); one below the
        smallest profile min is padded with copies of its last example, whose outputs
        :func:`_trim` drops.
        """
        batch = check_feed(self._layout.inputs, feed)
        ranges = self._layout.ranges
        if not self._layout.dynamic_batch:
            select_profile(ranges, {n: array_info(a).shape for n, a in feed.items()})
            return [({n: Rows.whole(a) for n, a in feed.items()}, batch)]
        chunks = []
        for c in split_points(batch, ranges):
            chunk = {name: Rows(array, c.start, c.stop, c.pad) for name, array in feed.items()}
            select_profile(ranges, {n: rows.shape for n, rows in chunk.items()})  # refuse before enqueue
            chunks.append((chunk, c.stop - c.start))
        return chunks

    def infer(self, feed: Feed, outputs: Optional[Sequence[str]] = None) -> Outputs:
        """Runs one batch of any size: split across profiles, and padded up to the smallest
        profile min, where needed.

        Args:
            feed: One array per input: numpy, or device arrays (``__cuda_array_interface__``,
                C-contiguous), which are copied device-to-device, never through the host.
                Device arrays must stay unchanged until this returns.
            outputs: Output names to copy to the host. Default None: every output.

        Raises:
            EngineError: the feed does not match the inputs, a shape is outside every profile,
                or an unknown output name.
        """
        names = self._output_names(outputs)
        chunks = self._chunks(feed)
        if not chunks:
            return {name: np.zeros((0,) + self._layout.outputs[name].shape[1:], self._layout.outputs[name].dtype)
                    for name in names}
        results = self._pool.run([chunk for chunk, _ in chunks], outputs=names)
        return _concat([_trim(result, rows) for result, (_, rows) in zip(results, chunks)])

    def infer_many(self, feeds: Iterable[Feed], outputs: Optional[Sequence[str]] = None) -> Iterator[Outputs]:
        """Runs many batches with up to one in flight per context; yields outputs in order.

        While one batch computes, the next is copied in and the previous copied out. Device
        arrays must stay unchanged until their batch's outputs are yielded.
        """
        names = self._output_names(outputs)

        def all_chunks():
            for index, feed in enumerate(feeds):
                chunks = self._chunks(feed)
                if not chunks:
                    yield index, True, 0, None
                for j, (chunk, rows) in enumerate(chunks):
                    yield index, j == len(chunks) - 1, rows, chunk

        pending: List[Outputs] = []
        meta: List[Tuple[int, bool, int]] = []
        empties: List[int] = []

        def feeds_only():
            for index, last, rows, chunk in all_chunks():
                if chunk is None:  # an empty batch: nothing to run; yielded in order below
                    empties.append(index)
                    continue
                meta.append((index, last, rows))
                yield chunk

        empty = {name: np.zeros((0,) + self._layout.outputs[name].shape[1:], self._layout.outputs[name].dtype)
                 for name in names}
        for i, result in enumerate(self._pool.run(feeds_only(), outputs=names)):
            index, last, rows = meta[i]
            while empties and empties[0] < index:
                empties.pop(0)
                yield dict(empty)
            pending.append(_trim(result, rows))
            if last:
                yield _concat(pending)
                pending = []
        for _ in empties:
            yield dict(empty)

    def device_index(self) -> Optional[int]:
        return self._loaded.device.index if self._loaded is not None else None

    def concurrent_calls(self) -> int:
        return self._pool.size if self._pool is not None else 1

    def describe(self) -> Dict[str, Any]:
        info = super().describe()
        counts: Dict[str, int] = {}
        if self._pool:
            for slot in self._pool.slots:
                for k, v in slot.counts.items():
                    counts[k] = counts.get(k, 0) + v
        loaded = self._loaded
        info.update(plan=self._name, tensorrt_version=loaded.trt_version if loaded else None,
                    gpu=loaded.device.name if loaded else None,
                    compute_capability=loaded.device.compute_capability if loaded else None,
                    profiles=self.profiles, contexts=len(self._contexts), cuda_graphs=self._cuda_graphs,
                    enqueues=counts)
        return info

    def close(self) -> None:
        """Frees streams, buffers, contexts and the engine. Safe to call twice; also runs when collected."""
        finalizer = getattr(self, "_finalizer", None)
        if finalizer is not None:
            finalizer()  # runs _release once
        elif self._pool is not None:
            self._pool.close()
        self._pool = None
        # Release in reverse order of creation: contexts, then the engine, then the runtime.
        self._contexts = []
        self._loaded = None


def _release(pool: SlotPool, contexts: List[Any], loaded: List[Any]) -> None:
    """Frees an engine's slots, then its contexts, then the engine and its runtime."""
    try:
        pool.close()
    except Exception as e:  # from a finalizer, maybe at interpreter exit: log, never raise
        _LOG.warning("closing TensorRT execution slots failed: %s", e)
    contexts.clear()
    for held in loaded:  # the engine before the runtime that deserialized it
        held.engine = None
        held.runtime = None
    loaded.clear()


def _trim(result: Outputs, rows: int) -> Outputs:
    """Drops the outputs of padding rows."""
    return {name: value[:rows] if len(value) != rows else value for name, value in result.items()}


def _concat(results: List[Outputs]) -> Outputs:
    if len(results) == 1:
        return results[0]
    return {name: np.concatenate([r[name] for r in results]) for name in results[0]}
