"""Runs a serialized TensorRT engine: :class:`TensorRTEngine`, an :class:`engines.base.Engine`.

Works with the full ``tensorrt`` module or the lean runtime ``tensorrt_lean`` (for
version-compatible plans). Any number of named inputs and outputs; dtypes are read
from the engine; the batch may be any size: batches within a profile run as one,
larger ones are split into chunks that each fit a profile and their outputs concatenated,
a chunk below the smallest profile min is padded by repeating its last example (those
outputs are dropped), and other shapes outside every profile are refused before anything
is enqueued. Plans whose profiles leave a gap in batch sizes are refused at load.

Each execution context has its own stream and buffers (an
:class:`~engines.tensorrt.buffers.ExecutionSlot`); with ``num_contexts >= 2``
consecutive batches overlap copies and compute, whether they come from one call
(split batches, :meth:`TensorRTEngine.infer_many`) or from several threads.
"""

from __future__ import annotations

import logging
import weakref
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from engines.base import Engine, EngineError, Feed, Outputs, TensorSpec, check_feed
from engines.tensorrt import cuda
from engines.tensorrt._trt import capturing_logger, import_tensorrt, is_lean, version_tuple
from engines.tensorrt.buffers import ExecutionSlot, SlotPool, TensorLayout, nbytes
from engines.tensorrt.plan import PlanInfo, check_plan_version, read_plan_header
from engines.tensorrt.shapes import (ProfileRanges, Shape, TensorRange, batch_limits, check_batch_coverage,
                                     select_profile, split_points)

_LOG = logging.getLogger(__name__)

#: TensorRT DataType member name -> numpy dtype. bf16 and the 8-bit floats have no numpy
#: type: they travel as raw bytes of the right size (``trt.nptype`` raises for them).
DTYPES = {
    "FLOAT": np.dtype(np.float32),
    "HALF": np.dtype(np.float16),
    "BF16": np.dtype("V2"),
    "INT8": np.dtype(np.int8),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "FP8": np.dtype("V1"),
    "E8M0": np.dtype("V1"),
}


def numpy_dtype(trt_dtype, tensor: str) -> np.dtype:
    """The numpy dtype for a TensorRT ``DataType`` (by member name).

    Raises:
        EngineError: packed sub-byte types (INT4, FP4) that cannot be fed as numpy arrays.
    """
    name = getattr(trt_dtype, "name", str(trt_dtype).split(".")[-1])
    if name not in DTYPES:
        raise EngineError(f"Tensor: {tensor} | TensorRT type {name} is not supported for engine inputs/outputs "
                          f"(supported: {sorted(DTYPES)}). Note: keep packed types inside the network")
    return DTYPES[name]


class _ContextProgram:
    """``prepare``/``enqueue`` of one execution context, for an :class:`ExecutionSlot`.

    ``profile_ids[k]`` is the engine profile this context uses for logical profile ``k``:
    TensorRT requires every execution context in concurrent use to have its own
    optimisation profile, so each context gets its own copy of every profile.
    """

    def __init__(self, context, ranges: ProfileRanges, profile_ids: Sequence[int], outputs: Sequence[str], logger,
                 label: str):
        self.context = context
        self.ranges = ranges
        self.profile_ids = list(profile_ids)
        self.outputs = list(outputs)
        self.logger = logger
        self.label = label
        self.profile: Optional[int] = None
        self._addresses: Dict[str, int] = {}

    def use_profile(self, stream: int, k: int) -> None:
        actual = self.profile_ids[k]
        if actual != self.profile:
            since = self.logger.mark()
            if not self.context.set_optimization_profile_async(actual, stream):
                raise EngineError(f"{self.label}: set_optimization_profile_async({actual}) failed: "
                                  f"{self.logger.text(since=since)}")
            self.profile = actual

    def prepare(self, stream: int, shapes: Mapping[str, Shape]) -> Dict[str, Shape]:
        ctx = self.context
        k = select_profile(self.ranges, shapes)
        self.use_profile(stream, k)
        for name, shape in shapes.items():
            since = self.logger.mark()
            if not ctx.set_input_shape(name, tuple(shape)):
                raise EngineError(f"Input tensor: {name} | TensorRT refused shape {tuple(shape)} in profile {k} "
                                  f"({self.ranges[k][name].describe()}): {self.logger.text(since=since)}")
        unset = ctx.infer_shapes()
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


class TensorRTEngine(Engine):
    """A deserialized TensorRT engine with a pool of execution contexts.

    Args:
        plan: The serialized engine.
        num_contexts: Execution contexts (each with its stream and buffers sized for the
            largest profile). 2 or more overlap copies and compute. Default 2.
        cuda_graphs: Replay a CUDA graph per (context, input shapes) instead of enqueueing
            kernel by kernel; falls back to plain enqueue where capture fails. Default False.
        device: GPU index. Default 0.
        info: The plan's sidecar (:func:`engines.tensorrt.plan.read_sidecar`), used to refuse a
            plan for another TensorRT version or GPU with a clear message. Default None.
        name: A label for logs and errors (the plan's path). Default "".
        engine_host_code_allowed: Let the runtime run the lean runtime embedded in a
            version-compatible plan. Default None: True for version-compatible plans (per
            ``info``) and under the lean runtime module, else False.

    Raises:
        ImportError: no TensorRT or cuda-python.
        EngineError: not a plan, no GPU, built by another TensorRT version or for another GPU
            (with TensorRT's own reason), unsupported I/O, or out of memory.
    """

    kind = "tensorrt"

    def __init__(self, plan: bytes, *, num_contexts: int = 2, cuda_graphs: bool = False, device: int = 0,
                 info: Optional[PlanInfo] = None, name: str = "", engine_host_code_allowed: Optional[bool] = None):
        if num_contexts < 1:
            raise EngineError(f"num_contexts must be >= 1, got {num_contexts}")
        self._name = name or "<plan bytes>"
        self._pool: Optional[SlotPool] = None
        self._contexts: List[Any] = []
        self._engine = None
        self._engines: List[Any] = []
        self._runtime = None
        header = read_plan_header(plan)  # no GPU needed: refuse what can be refused here first
        trt = import_tensorrt(lean_ok=True)
        self._trt_version = str(trt.__version__)
        check_plan_version(header, version_tuple(trt), info.version_compatible if info else None)
        dev = cuda.device_info(device)  # raises when there is no driver/GPU, before trt.Runtime
        if info and info.hardware_compatibility == "none" and info.compute_capability != dev.compute_capability:
            raise EngineError(
                f"The plan {self._name} was built on {info.gpu_name} (compute {info.compute_capability}) and this "
                f"GPU is {dev.name} (compute {dev.compute_capability}); plans run only on the compute capability "
                f"they were built for. Note: build on this GPU type (use --engine_cache to build on the worker), "
                f"or build with --hardware_compatibility ampere_plus")
        if info and info.gpu_name != dev.name:
            _LOG.warning("plan %s was built on %s, running on %s (same compute %s): it loads, but may not be the "
                         "fastest for this GPU", self._name, info.gpu_name, dev.name, dev.compute_capability)
        self._device = dev
        cuda.set_device(dev.index)

        self._logger = capturing_logger(trt, "WARNING")
        self._runtime = trt.Runtime(self._logger)
        auto_host_code = engine_host_code_allowed is None
        if auto_host_code:
            engine_host_code_allowed = bool(is_lean(trt) or (info and info.version_compatible
                                                             and not info.exclude_lean_runtime))
        if engine_host_code_allowed:
            # Version-compatible plans carry their own lean runtime, which is host code.
            self._runtime.engine_host_code_allowed = True
        since = self._logger.mark()  # the error below must carry this deserialization's messages only
        engine = self._runtime.deserialize_cuda_engine(plan)
        if engine is None and auto_host_code and not engine_host_code_allowed and info is None:
            # No sidecar says how the plan was built: it may be version-compatible with an embedded
            # lean runtime, which loads only with host code allowed. The job chose this plan; retry.
            _LOG.warning("plan %s did not load with host code disallowed and has no sidecar; retrying with "
                         "engine_host_code_allowed=True (a version-compatible plan embeds its runtime)", self._name)
            self._runtime.engine_host_code_allowed = True
            engine = self._runtime.deserialize_cuda_engine(plan)
        if engine is None:
            built = f"built by TensorRT {header.version}"
            if info:
                built += f" on {info.gpu_name} (compute {info.compute_capability})"
            raise EngineError(
                f"TensorRT {self._trt_version} could not deserialize the plan {self._name} ({built}) on "
                f"{dev.name} (compute {dev.compute_capability}): {self._logger.text(since=since)}. Note: a plan runs only "
                f"with the TensorRT version and GPU type it was built for (unless built --version_compatible / "
                f"--hardware_compatibility); rebuild it here")
        self._engine = engine
        self._engines = [engine]
        try:
            self._setup(trt, plan, int(num_contexts), bool(cuda_graphs))
        except BaseException:
            self.close()
            raise
        _LOG.info("tensorrt engine %s loaded on %s: %d context(s), profiles %s, cuda graphs %s; batches are split "
                  "at %d and chunks below %d padded by repeating the last example", self._name, dev.name,
                  num_contexts, self.profiles, cuda_graphs, self.max_batch_size, min(lo for lo, _, _ in self.profiles))

    def _setup(self, trt, plan: bytes, num_contexts: int, cuda_graphs: bool) -> None:
        engine = self._engine
        inputs: Dict[str, TensorSpec] = {}
        outputs: Dict[str, TensorSpec] = {}
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            if engine.is_shape_inference_io(name):
                raise EngineError(f"Tensor: {name} | shape tensors (host-side shape inputs) are not supported")
            spec = TensorSpec(name, numpy_dtype(engine.get_tensor_dtype(name), name),
                              tuple(engine.get_tensor_shape(name)))
            if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                inputs[name] = spec
            else:
                outputs[name] = spec
        self._inputs, self._outputs = inputs, outputs
        all_ranges = [{name: TensorRange(*engine.get_tensor_profile_shape(name, k)) for name in inputs}
                      for k in range(engine.num_optimization_profiles)]
        if not all_ranges:
            raise EngineError("the engine has no optimization profile")
        # Profiles with identical ranges are copies (engines.build adds each profile once per
        # concurrent context): the logical profiles are the distinct ones, and context i of an
        # engine instance uses copy i of each.
        groups: Dict[tuple, List[int]] = {}
        for k, ranges in enumerate(all_ranges):
            key = tuple(sorted((n, r.min, r.opt, r.max) for n, r in ranges.items()))
            groups.setdefault(key, []).append(k)
        self._ranges = [all_ranges[ids[0]] for ids in groups.values()]
        limits = [batch_limits(p) for p in self._ranges]
        # Splitting and padding need every batch from the smallest min to the largest max to fit
        # some profile; a plan with a gap is refused here rather than failing on some batch later.
        check_batch_coverage([(lo, hi) for lo, _, hi in limits],
                             [f"profile {k} (batch {lo}..{hi})" for k, (lo, _, hi) in enumerate(limits)])
        copies = min(len(ids) for ids in groups.values())
        instances = -(-num_contexts // copies)
        if instances > 1:
            _LOG.info("%s: the plan holds %d copy(ies) of each profile and TensorRT needs a profile per concurrent "
                      "context, so %d contexts use %d engine instances (weights loaded %d times); build with "
                      "--contexts %d to share one", self._name, copies, num_contexts, instances, instances,
                      num_contexts)

        programs = []
        for i in range(num_contexts):
            instance, copy = divmod(i, copies)
            since = self._logger.mark()
            if instance == len(self._engines):
                extra = self._runtime.deserialize_cuda_engine(plan)
                if extra is None:
                    raise EngineError(f"could not load engine instance {instance + 1} for context {i + 1} (out of "
                                      f"GPU memory?): {self._logger.text(since=since)}. Note: use fewer contexts")
                self._engines.append(extra)
            ctx = self._engines[instance].create_execution_context()
            if ctx is None:
                raise EngineError(f"could not create execution context {i + 1} of {num_contexts} (out of GPU "
                                  f"memory?): {self._logger.text(since=since)}. Note: use fewer contexts")
            self._contexts.append(ctx)
            programs.append(_ContextProgram(ctx, self._ranges, [ids[copy] for ids in groups.values()],
                                            list(outputs), self._logger, f"{self._name} context {i}"))

        # Size every buffer once, for the largest shape of any profile.
        in_bytes = {name: 0 for name in inputs}
        out_bytes = {name: 0 for name in outputs}
        probe = cuda.Stream()
        try:
            for program in programs:  # each context takes its own profile copy before any use
                program.use_profile(probe.ptr, 0)
            for k, profile in enumerate(self._ranges):
                shapes = {name: profile[name].max for name in inputs}
                out_shapes = programs[0].prepare(probe.ptr, shapes)
                for name, shape in shapes.items():
                    in_bytes[name] = max(in_bytes[name], nbytes(inputs[name].dtype, shape))
                for name, shape in out_shapes.items():
                    out_bytes[name] = max(out_bytes[name], nbytes(outputs[name].dtype, shape))
            probe.synchronize()
        finally:
            probe.destroy()
        in_layout = [TensorLayout(n, inputs[n].dtype, b) for n, b in in_bytes.items()]
        out_layout = [TensorLayout(n, outputs[n].dtype, b) for n, b in out_bytes.items()]
        slots = []
        try:
            for i, program in enumerate(programs):
                slots.append(ExecutionSlot(in_layout, out_layout, program.prepare, program.enqueue,
                                           cuda_graphs=cuda_graphs, device=self._device.index,
                                           name=f"{self._name} context {i}"))
        except BaseException:
            for slot in slots:
                slot.close()
            raise
        self._pool = SlotPool(slots)
        self._cuda_graphs = cuda_graphs
        # Beam never calls close() on a model: free the CUDA side when the engine is collected.
        # The finalizer holds the pool and the lists, never self.
        self._finalizer = weakref.finalize(self, _release, self._pool, self._contexts, self._engines)

    # -- Engine interface ---------------------------------------------------------------

    @property
    def input_specs(self) -> Dict[str, TensorSpec]:
        return dict(self._inputs)

    @property
    def output_specs(self) -> Dict[str, TensorSpec]:
        return dict(self._outputs)

    @property
    def profiles(self) -> List[Tuple[int, int, int]]:
        """(min, opt, max) batch of each optimisation profile."""
        return [batch_limits(p) for p in self._ranges]

    @property
    def max_batch_size(self) -> Optional[int]:
        """The largest batch one profile takes (larger batches are split by :meth:`infer`)."""
        return max(hi for _, _, hi in self.profiles)

    def batch_limit(self) -> Optional[int]:
        """None: :meth:`infer` takes any batch size.

        This engine splits large batches and pads short chunks itself, knowing every
        profile's range, so a caller (``transforms.inference.EngineModelHandler``) must not
        pre-split: an even split made without the profiles can land in a profile gap or
        below a profile's min. A plain method, not a property, so that Beam's cross-process
        shared-model proxy forwards it.
        """
        return None

    @property
    def preferred_batch_sizes(self) -> Sequence[int]:
        return sorted({opt for _, opt, _ in self.profiles})

    def _chunks(self, feed: Feed) -> List[Tuple[Dict[str, np.ndarray], int]]:
        """(chunk feed, rows of it that are real) for each engine call ``feed`` needs.

        A chunk below the smallest profile min is padded with copies of its last example;
        the outputs of those rows are dropped by :func:`_trim`.
        """
        batch = check_feed(self._inputs, feed)
        if not all(spec.dynamic_batch for spec in self._inputs.values()):
            select_profile(self._ranges, {n: tuple(a.shape) for n, a in feed.items()})
            return [(dict(feed), batch)]
        chunks = []
        for c in split_points(batch, self._ranges):
            chunk = {name: _pad(array[c.start:c.stop], c.pad) for name, array in feed.items()}
            select_profile(self._ranges, {n: tuple(a.shape) for n, a in chunk.items()})  # refuse before enqueue
            chunks.append((chunk, c.stop - c.start))
        return chunks

    def infer(self, feed: Feed) -> Outputs:
        """Runs one batch of any size: split across profiles, and padded up to the smallest
        profile min, where needed.

        Raises:
            EngineError: the feed does not match the inputs, or a shape is outside every profile.
        """
        chunks = self._chunks(feed)
        if not chunks:
            return {name: np.zeros((0,) + spec.shape[1:], spec.dtype) for name, spec in self._outputs.items()}
        results = self._pool.run([chunk for chunk, _ in chunks])
        return _concat([_trim(result, rows) for result, (_, rows) in zip(results, chunks)])

    def infer_many(self, feeds: Iterable[Feed]) -> Iterator[Outputs]:
        """Runs many batches with up to one in flight per context; yields outputs in order.

        While one batch computes, the next is copied in and the previous copied out.
        """
        def all_chunks():
            for index, feed in enumerate(feeds):
                chunks = self._chunks(feed)
                for j, (chunk, rows) in enumerate(chunks):
                    yield index, j == len(chunks) - 1, rows, chunk

        pending: List[Outputs] = []
        work = all_chunks()
        meta: List[Tuple[int, bool, int]] = []

        def feeds_only():
            for index, last, rows, chunk in work:
                meta.append((index, last, rows))
                yield chunk

        for i, result in enumerate(self._pool.run(feeds_only())):
            pending.append(_trim(result, meta[i][2]))
            if meta[i][1]:
                yield _concat(pending)
                pending = []

    def describe(self) -> Dict[str, Any]:
        info = super().describe()
        counts: Dict[str, int] = {}
        if self._pool:
            for slot in self._pool.slots:
                for k, v in slot.counts.items():
                    counts[k] = counts.get(k, 0) + v
        info.update(plan=self._name, tensorrt_version=self._trt_version, gpu=self._device.name,
                    compute_capability=self._device.compute_capability, profiles=self.profiles,
                    contexts=len(self._contexts), engine_instances=len(self._engines),
                    cuda_graphs=getattr(self, "_cuda_graphs", False),
                    enqueues=counts)
        return info

    def close(self) -> None:
        """Frees streams, buffers, contexts and engines. Safe to call twice; also runs when collected."""
        finalizer = getattr(self, "_finalizer", None)
        if finalizer is not None:
            finalizer()  # runs _release once
        elif self._pool is not None:
            self._pool.close()
        self._pool = None
        # Release in reverse order of creation: contexts, then the engine, then the runtime.
        self._contexts = []
        self._engine = None
        self._engines = []
        self._runtime = None


def _release(pool: SlotPool, contexts: List[Any], engines: List[Any]) -> None:
    """Frees an engine's slots, then its contexts, then its engine instances (runtime last, by its owner)."""
    try:
        pool.close()
    except Exception as e:  # from a finalizer, maybe at interpreter exit: log, never raise
        _LOG.warning("closing TensorRT execution slots failed: %s", e)
    contexts.clear()
    engines.clear()


def _pad(array: np.ndarray, pad: int) -> np.ndarray:
    """``array`` with ``pad`` copies of its last row appended (a chunk below every profile min)."""
    if pad <= 0:
        return array
    return np.concatenate([array, np.repeat(array[-1:], pad, axis=0)])


def _trim(result: Outputs, rows: int) -> Outputs:
    """Drops the outputs of padding rows."""
    return {name: value[:rows] if len(value) != rows else value for name, value in result.items()}


def _concat(results: List[Outputs]) -> Outputs:
    if len(results) == 1:
        return results[0]
    return {name: np.concatenate([r[name] for r in results]) for name in results[0]}
