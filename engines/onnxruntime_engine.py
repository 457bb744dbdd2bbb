"""ONNX Runtime engine: the embedded default, runs anywhere (CPU by default).

Execution providers are selectable, so the CUDA and TensorRT providers are used
where the installed onnxruntime build has them. A provider that is asked for and
missing is an error, never a silent fall-back to CPU.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import queue
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from engines import storage
from engines.devices import Device, check_device, cuda_device_count, resolve_device
from engines.base import (Engine, EngineError, EngineRecipe, Feed, Outputs, TensorSpec, UsageError, WorkerPath,
                          array_info, check_feed, import_optional, is_device_array)
from engines.flags import MAX_THREADS, PRECISIONS, THREADS_WHY, FlagDefaults, FlagRange, ModelFile
from engines.model_adapter import Preprocessing, adapted_model_bytes, convert_to_fp16

_LOG = logging.getLogger(__name__)

# ONNX Runtime's type strings -> numpy dtypes (bf16 has no numpy type: raw bytes).
_ORT_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(uint8)": np.uint8,
    "tensor(int8)": np.int8,
    "tensor(uint16)": np.uint16,
    "tensor(int16)": np.int16,
    "tensor(int32)": np.int32,
    "tensor(int64)": np.int64,
    "tensor(uint32)": np.uint32,
    "tensor(uint64)": np.uint64,
    "tensor(bool)": np.bool_,
    "tensor(bfloat16)": np.dtype("V2"),
}

PROVIDER_ALIASES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}


def _spec(node) -> TensorSpec:
    if node.type not in _ORT_DTYPES:
        raise EngineError(f"Tensor: {node.name} | Unsupported ONNX type {node.type}")
    shape = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in node.shape)
    return TensorSpec(node.name, _ORT_DTYPES[node.type], shape)


_GPU_PROVIDER_NAMES = ("CUDAExecutionProvider", "TensorrtExecutionProvider")


def _gpu_options(provider: str, device_id: int) -> Dict[str, str]:
    options = {"device_id": str(device_id)}
    if provider == "CUDAExecutionProvider":
        options["arena_extend_strategy"] = "kSameAsRequested"
    return options


def _cuda_device_id(session) -> int:
    options = session.get_provider_options().get("CUDAExecutionProvider", {})
    return int(options.get("device_id", 0))


class OnnxRuntimeEngine(Engine):
    """Runs an ONNX model with ONNX Runtime.

    Args:
        model: The serialized ONNX model (bytes) or a local file path.
        providers: Execution providers in priority order, full names or the
            aliases ``cpu``, ``cuda``, ``tensorrt``. Default ``("cpu",)``.
        intra_op_threads: Threads one ``infer`` call uses; 0 lets ONNX
            Runtime choose (one per physical core). Default 0.
        name: A label for stats (the model's URI). Default "".
        allow_spinning: Let idle intra-op threads spin-wait for work. Faster for an engine
            alone; in a pipeline the spinning steals cores from decoding. Default True.
        stop_spinning_after_run: With ``allow_spinning``, threads spin between the operators
            of one ``infer`` call but stop when it returns (ONNX Runtime's
            ``session.force_spinning_stop``), leaving the cores to decoding between batches.
            Default False.
        sessions: Sessions of the same model, each with its own ``intra_op_threads`` pool.
            Concurrent ``infer`` calls (several bundle threads) each take a free session
            instead of sharing one pool, the CPU analogue of TensorRT's execution contexts.
            Default 1.
        device_id: The GPU the CUDA and TensorRT providers use. Default 0.

    Raises:
        EngineError: the model cannot be parsed, or a provider is unavailable.
    """

    kind = "onnxruntime"

    def __init__(self, model, providers: Sequence[str] = ("cpu",), intra_op_threads: int = 0,
                 name: str = "", allow_spinning: bool = True, sessions: int = 1,
                 stop_spinning_after_run: bool = False, device_id: int = 0):
        ort = import_optional("onnxruntime", "Install the project: pip install -e . (it depends on onnxruntime).")
        self._name = name or (model if isinstance(model, str) else "<bytes>")
        wanted = [PROVIDER_ALIASES.get(p.lower(), p) for p in providers]
        available = ort.get_available_providers()
        missing = [p for p in wanted if p not in available]
        if missing:
            raise EngineError(
                f"ONNX Runtime execution provider(s) {missing} are not available in this onnxruntime "
                f"build (available: {available}). Install onnxruntime-gpu for CUDA/TensorRT providers, "
                f"or pass --providers cpu.")
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(intra_op_threads)
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if allow_spinning else "0")
        if allow_spinning and stop_spinning_after_run:
            options.add_session_config_entry("session.force_spinning_stop", "1")
        if sessions < 1:
            raise EngineError(f"sessions must be >= 1, got {sessions}")
        try:
            # Each GPU provider is told its device; the CPU provider takes no options. The CUDA
            # arena grows by what is asked, not to the next power of two: every SDK process of a
            # GPU worker holds one engine, and the doubling was memory those processes need
            # (benchmarks/gpu_memory.py).
            provider_options = [_gpu_options(p, device_id) if p in _GPU_PROVIDER_NAMES else {} for p in wanted]
            self._sessions = [ort.InferenceSession(model, sess_options=options, providers=wanted,
                                                   provider_options=provider_options)
                              for _ in range(sessions)]
        except Exception as e:  # onnxruntime raises its own exception types
            raise EngineError(f"ONNX Runtime could not load model {self._name}: {e}") from e
        self._session = self._sessions[0]
        self._free: "queue.Queue" = queue.Queue()
        for session in self._sessions:
            self._free.put(session)
        self._providers = tuple(self._session.get_providers())
        self._device_id = _cuda_device_id(self._session) if "CUDAExecutionProvider" in self._providers else None
        self._inputs = {n.name: _spec(n) for n in self._session.get_inputs()}
        self._outputs = {n.name: _spec(n) for n in self._session.get_outputs()}
        _LOG.info("onnxruntime engine loaded %s with providers %s%s", self._name, list(self._providers),
                  f", {sessions} sessions" if sessions > 1 else "")

    @property
    def providers(self) -> Tuple[str, ...]:
        return self._providers

    def device_index(self) -> Optional[int]:
        return self._device_id

    def concurrent_calls(self) -> int:
        return max(1, len(self._sessions))

    def infer(self, feed: Feed, outputs: Optional[Sequence[str]] = None) -> Outputs:
        check_feed(self._inputs, feed)
        names = self._output_names(outputs)
        if any(is_device_array(v) for v in feed.values()):
            return self._infer_device(feed, names)
        arrays = {k: np.ascontiguousarray(v) for k, v in feed.items()}
        # InferenceSession.run releases the GIL; a free session each, so concurrent calls do not
        # share one intra-op thread pool.
        session = self._free.get()
        try:
            values = session.run(names, arrays)
        finally:
            self._free.put(session)
        return dict(zip(names, values))

    def _infer_device(self, feed: Feed, names: Sequence[str]) -> Outputs:
        """Device-resident inputs: bound where they are (IOBinding), only ``names`` copied back.

        The arrays must be ready (their producer synchronized, as DALI's outputs are) and stay
        alive for the call.
        """
        if self._device_id is None:
            raise EngineError("device-resident inputs need the CUDA execution provider (--providers cuda); "
                              "this session runs on " + ", ".join(self._providers))
        session = self._free.get()
        try:
            binding = session.io_binding()
            for name, value in feed.items():
                info = array_info(value)
                if not info.on_device:  # a host array beside device ones: ONNX Runtime copies it
                    binding.bind_cpu_input(name, np.ascontiguousarray(value))
                    continue
                binding.bind_input(name, "cuda", self._device_id, info.dtype, list(info.shape), info.device_ptr)
            for name in names:
                binding.bind_output(name, "cpu")
            session.run_with_iobinding(binding)
            values = binding.copy_outputs_to_cpu()
        finally:
            self._free.put(session)
        return dict(zip(names, values))

    def describe(self):
        info = super().describe()
        info.update(model=self._name, providers=list(self._providers))
        if len(self._sessions) > 1:
            info["sessions"] = len(self._sessions)
        return info

    def close(self) -> None:
        # The free-session queue holds the sessions too: empty it, or nothing is released.
        self._session = None
        self._sessions = []
        self._free = queue.Queue()


@dataclasses.dataclass(frozen=True)
class OnnxRuntimeLoader:
    """A picklable recipe that loads :class:`OnnxRuntimeEngine` on the worker.

    Attributes:
        model_path: Any Beam filesystem path (local, ``gs://``) to an ONNX model.
        providers: Execution providers, see :class:`OnnxRuntimeEngine`. Default ``("cpu",)``.
        intra_op_threads: Threads per ``infer`` call, 0 = ONNX Runtime's choice. Default 0.
        allow_spinning: See :class:`OnnxRuntimeEngine`. Default True.
        sessions: See :class:`OnnxRuntimeEngine`. Default 1.
        stop_spinning_after_run: See :class:`OnnxRuntimeEngine`. Default False.
        device: GPU index for the CUDA/TensorRT providers, or "auto": consecutive engine copies on
            consecutive GPUs (``engines.devices``; ``--model_copies`` N on N GPUs). Default 0.
        preprocessing: The model's ``--mean``/``--std``/``--channel_order``
            (``engines.model_adapter.Preprocessing``): the model is read with the weights beside it
            and, where its input is not the pipeline's uint8 NHWC RGB, loaded with the conversion
            prepended (``engines.model_adapter.wrap``). Default None: the file is loaded as it is.
        precision: "fp32" (default), or "fp16": the model's weights and compute converted to float16
            where it loads (``engines.model_adapter.convert_to_fp16``), its uint8 input and float32
            outputs kept.
        sha256: With ``preprocessing``: the model's digest at launch, checked where it loads
            (``engines.model_adapter.adapted_model_bytes``). Default None.
    """

    model_path: str
    providers: Tuple[str, ...] = ("cpu",)
    intra_op_threads: int = 0
    allow_spinning: bool = True
    sessions: int = 1
    stop_spinning_after_run: bool = False
    device: Device = 0
    preprocessing: Optional[Preprocessing] = None
    precision: str = "fp32"
    sha256: Optional[str] = None

    def __post_init__(self):
        object.__setattr__(self, "providers", tuple(self.providers))
        if self.precision not in PRECISIONS:
            raise EngineError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if not self.providers:
            raise EngineError("providers must name at least one execution provider, e.g. ('cpu',)")
        if self.intra_op_threads < 0:
            raise EngineError(f"intra_op_threads must be >= 0, got {self.intra_op_threads}")
        if self.sessions < 1:
            raise EngineError(f"sessions must be >= 1, got {self.sessions}")
        check_device(self.device)

    def _device_id(self) -> int:
        if not any(PROVIDER_ALIASES.get(p.lower(), p) in _GPU_PROVIDER_NAMES for p in self.providers):
            return 0  # CPU only: no GPU to choose
        return resolve_device(self.device, cuda_device_count())

    def __call__(self) -> OnnxRuntimeEngine:
        if self.preprocessing is None:
            model = storage.read_bytes(self.model_path)
        else:
            model = adapted_model_bytes(self.model_path, self.preprocessing, "--model file", self.sha256)
        if self.precision == "fp16":
            model = convert_to_fp16(model)
        return OnnxRuntimeEngine(model, self.providers,
                                 self.intra_op_threads, name=self.model_path, allow_spinning=self.allow_spinning,
                                 sessions=self.sessions, stop_spinning_after_run=self.stop_spinning_after_run,
                                 device_id=self._device_id())



#: Batch sizes chosen when --batch_size is not given. On a CPU, fixed batches of 32: Beam's adaptive
#: sizing settled near 14 at max 32 and cost 13% of throughput on 16 cores (benchmarks/NOTES.md). On a
#: GPU, 256: the GPU measurements (10.5k images/s for EfficientNet-Lite0 on an H100, benchmarks/NOTES.md)
#: used it.
CPU_BATCH_SIZE = 32
GPU_BATCH_SIZE = 256
_GPU_PROVIDERS = ("cuda", "tensorrt", "cudaexecutionprovider", "tensorrtexecutionprovider")
#: Where ``make model`` (python -m model_tools.export_efficientnet) puts the default ``--model``.
DEFAULT_MODEL = str(Path(__file__).resolve().parent.parent / "models" / "efficientnet_lite0.onnx")
#: Local CPU runs on at least this many cores default to two bundle threads, each with its own
#: ONNX Runtime session on half the cores (benchmarks/NOTES.md: +10-15% on 16 cores, no gain on 2).
PARALLEL_LOCAL_MIN_CORES = 8
#: ONNX Runtime on CPU took 70-85 x a batch's uint8 input bytes of extra resident memory for
#: EfficientNet-Lite0 at batches 16-256 (activations; measured with ru_maxrss). Models
#: differ; this is used only to refuse batch sizes that cannot fit, not to pick one.
ACTIVATION_BYTES_PER_INPUT_BYTE = 90

#: ``--precision`` when not given (the flag is every engine's: ``pipelines/engine_registry.py``): the
#: model as exported. fp16 is a choice to validate first (``model_tools.validate --precision fp16``).
DEFAULT_PRECISION = "fp32"
#: Bounds of this engine's numeric flags, checked at start whatever --engine is (``engines/flags.py``).
FLAG_RANGES = (
    FlagRange("--intra_op_threads", "intra_op_threads", 0, MAX_THREADS, THREADS_WHY),
    FlagRange("--ort_sessions", "ort_sessions", 1, MAX_THREADS, "each session holds its own activations"),
)


def add_flags(parser) -> None:
    """Adds ``--engine onnxruntime``'s flags (see ``pipelines/engine_registry.py``)."""
    group = parser.add_argument_group("--engine onnxruntime")
    group.add_argument("--model", default=None,
                       help=f"ONNX model for --engine onnxruntime (default: the prepared "
                            f"EfficientNet-Lite0, {DEFAULT_MODEL}).")
    group.add_argument("--providers", default="cpu",
                       help="ONNX Runtime execution providers, comma-separated: cpu, cuda, tensorrt. "
                            "Default: cpu.")
    group.add_argument("--intra_op_threads", type=int, default=0,
                       help="ONNX Runtime threads per batch; 0 = one per core. Default: 0.")
    group.add_argument("--ort_sessions", type=int, default=1,
                       help="ONNX Runtime sessions of the model per process, each with its own "
                            "--intra_op_threads: concurrent batches (several bundle threads, e.g. "
                            "--direct_running_mode=multi_threading) each get one. Default: 1.")
    group.add_argument("--ort_spinning", default="off", choices=("on", "off", "run"),
                       help="ONNX Runtime idle threads spin-wait (on), sleep (off, leaves the cores to "
                            "decoding), or spin only while a batch runs and stop when it returns (run). "
                            "Default: off.")


def _providers(options) -> Tuple[str, ...]:
    return tuple(p.strip() for p in options.providers.split(",") if p.strip())


def _model(options) -> str:
    return options.model or DEFAULT_MODEL


def cli_on_gpu(options) -> bool:
    """``--providers`` names a GPU provider (see ``pipelines/engine_registry.py``)."""
    return any(p.lower() in _GPU_PROVIDERS for p in _providers(options))


def _provider_name(alias: str) -> Optional[str]:
    """The ONNX Runtime provider an alias or full name stands for, or None when it is neither."""
    if alias.lower() in PROVIDER_ALIASES:
        return PROVIDER_ALIASES[alias.lower()]
    return alias if alias.endswith("ExecutionProvider") else None


def cli_check(options, local: bool) -> None:
    """Refuses ``--providers`` that cannot work, at start (see ``pipelines/engine_registry.py``).

    Every runner: a name that is no provider. Local runs: a provider this machine's onnxruntime
    lacks (the CPU package has no CUDA provider), which would otherwise fail every worker's model
    load after the job started. Remote runners' workers run the image's onnxruntime-gpu, not this
    machine's, so availability is theirs to check.

    Raises:
        UsageError: naming ``--providers`` and the fix.
    """
    flag = f"--providers {options.providers}"
    wanted = []
    for alias in _providers(options):
        name = _provider_name(alias)
        if name is None:
            raise UsageError(f"{flag}: {alias!r} is not an ONNX Runtime execution provider; use cpu, cuda, tensorrt or "
                             f"a full provider name (...ExecutionProvider)")
        wanted.append(name)
    if not local:
        return
    if options.precision == "fp16":
        import_optional("onnxconverter_common", "--precision fp16 converts the model with onnxconverter-common: pip "
                                                "install onnxconverter-common, or pass --precision fp32")
    ort = import_optional("onnxruntime", "Install the project: pip install -e . (it depends on onnxruntime).")
    available = ort.get_available_providers()
    missing = [name for name in wanted if name not in available]
    if missing:
        build = "a GPU build" if any(p in available for p in _GPU_PROVIDER_NAMES) else "the CPU build"
        raise UsageError(f"{flag}: this onnxruntime ({ort.__version__}, {build}) has no {', '.join(missing)} (it has "
                         f"{', '.join(available)}): install onnxruntime-gpu for this machine's CUDA in its place (pip "
                         f"uninstall onnxruntime; pip install 'onnxruntime-gpu<1.27' for CUDA 12, 'onnxruntime-gpu>=1.27' "
                         f"for CUDA 13), or pass --providers cpu")


def cli_worker_paths(options) -> List[WorkerPath]:
    """``--model``, which every worker reads (see ``pipelines/engine_registry.py``); None: its default,
    the model ``make model`` prepares on the launching machine."""
    return [WorkerPath("--model", options.model or None,
                       default="the prepared model", note="models/efficientnet_lite0.onnx, from `make model`")]


def cli_model_file(options) -> ModelFile:
    """``--model`` (or its default), which the launcher reads before anything runs (see
    ``pipelines/engine_registry.py``)."""
    return ModelFile(_model(options), "--model")


def memory_limit_bytes() -> Optional[int]:
    """The memory this process may use: its cgroup limit (v2 or v1) or the machine's RAM, or None."""
    limits = []
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path) as f:
                text = f.read().strip()
            if text.isdigit() and int(text) < 1 << 60:
                limits.append(int(text))
        except OSError:
            continue
    try:
        limits.append(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        pass
    return min(limits) if limits else None


def cli_fit_batch(options, batch_size: Optional[int], *, summary, image_bytes: int, prefetch: int,
                  local: bool) -> Optional[int]:
    """Fits the batch size to the model's batch dimension and, on a local CPU run, to memory (see
    ``pipelines/engine_registry.py``).

    A model exported with a fixed batch of 1 gets batches of 1 (logged); any other fixed batch,
    or a ``--batch_size`` the model does not take, stops the job here instead of failing every
    batch. A batch whose activations and prefetched images cannot fit in memory would turn every
    image into a "failed to allocate" dead letter; it is refused with the largest that fits.

    Args:
        options: The parsed options (read by attribute, never changed).
        batch_size: ``--batch_size``, or None for this engine's default.
        summary: The model's ``engines.onnx_summary.OnnxSummary``.
        image_bytes: Bytes of one preprocessed image (crop x crop x 3).
        prefetch: Batches each reader holds ahead of the engine.
        local: The engine runs on this machine, so its memory is the one to fit.

    Returns:
        The batch size to ask :func:`cli_recipe` for: ``batch_size``, or 1 for a fixed batch of 1.

    Raises:
        EngineError: a model with a fixed batch dimension other than 1.
        UsageError: a ``--batch_size`` the model does not take, or one that cannot fit in memory,
            naming ``--batch_size`` and the fix.
    """
    model = _model(options)
    (name, _, dims), = summary.inputs
    if dims and dims[0] > 0:
        if dims[0] != 1:
            raise EngineError(f"{model} has a fixed batch dimension of {dims[0]} (input {name!r} is {list(dims)}); "
                              f"the last batch of a run is shorter, so export the model with a dynamic batch "
                              f"dimension (see `python -m model_tools.export_efficientnet --help`)")
        if (batch_size or 1) != 1 or (options.min_batch_size or 1) != 1:
            raise UsageError(f"--batch_size {batch_size} does not fit {model}: its input {name!r} is "
                             f"{list(dims)}, a fixed batch of 1; pass --batch_size 1 or export the model with a "
                             f"dynamic batch dimension")
        batch_size = 1
        _LOG.info("batch size 1 chosen from the model's fixed batch dimension (%s is %s)", name, list(dims))
    if not local or options.providers.strip().lower() != "cpu":
        return batch_size  # the workers' or the GPU's memory is not this machine's
    limit = memory_limit_bytes()
    batch = batch_size or CPU_BATCH_SIZE
    prefetched = prefetch * batch  # --prefetch counts batches
    sessions = options.ort_sessions  # concurrent batches: each ONNX Runtime session runs one
    need = (batch * ACTIVATION_BYTES_PER_INPUT_BYTE * sessions + prefetched + batch) * image_bytes
    if limit and need > 0.8 * limit:
        fits = int(0.8 * limit / image_bytes / (ACTIVATION_BYTES_PER_INPUT_BYTE * sessions + 3))
        raise UsageError(f"--batch_size {batch} needs about {need / 2**30:.1f} GiB (activations of "
                         f"{sessions} concurrent batch(es) and {prefetched} prefetched images), over the "
                         f"{limit / 2**30:.1f} GiB this job may use; pass --batch_size {max(fits, 1)} or less")
    return batch_size


def cli_local_defaults(options, cores: int) -> Optional[FlagDefaults]:
    """Two concurrent callers, each with its own session on half the cores, for ONNX Runtime on a CPU
    of :data:`PARALLEL_LOCAL_MIN_CORES` or more cores (see ``pipelines/engine_registry.py``).

    One caller feeding one session leaves most of a large machine idle between batches; two,
    each with its own session of half the cores, keep the engine busier. On a GPU one bundle thread
    stays the default: at 200,000 images on an H100 eight threads sharing the engine and decoder made
    4,489 images/s in steady state against 4,791 for one, and four SDK processes 6,777 at 3.6x the GPU
    memory (benchmarks/NOTES.md, 2026-12-06).

    Returns:
        The session flags and two callers, or None (a GPU provider, or a small machine).
    """
    if options.providers.strip().lower() != "cpu" or cores < PARALLEL_LOCAL_MIN_CORES:
        return None
    return FlagDefaults({"ort_sessions": 2, "intra_op_threads": cores // 2},
                        f"--ort_sessions 2 --intra_op_threads {cores // 2}", callers=2)


def cli_recipe(options, batch_size: Optional[int], preprocessing: Optional[Preprocessing] = None,
               sha256: Optional[str] = None) -> EngineRecipe:
    """The ONNX Runtime recipe from ``--model``, ``--providers``, ``--intra_op_threads``, ``--ort_sessions``
    and ``--ort_spinning`` (see ``pipelines/engine_registry.py``).

    Args:
        options: The parsed options (read by attribute, never changed).
        batch_size: Images per batch (:func:`cli_fit_batch`'s answer), or None for
            :data:`GPU_BATCH_SIZE` with a GPU provider, else :data:`CPU_BATCH_SIZE`.
        preprocessing: The conversion to prepend to the model where it loads, or None to load
            it as it is (``OnnxRuntimeLoader.preprocessing``).
        sha256: The model's digest at launch, checked where it loads, or None.
    """
    on_gpu = cli_on_gpu(options)
    model = _model(options)
    loader = OnnxRuntimeLoader(model, _providers(options), options.intra_op_threads,
                               allow_spinning=options.ort_spinning in ("on", "run"), sessions=options.ort_sessions,
                               stop_spinning_after_run=options.ort_spinning == "run",
                               # Each engine copy (one per SDK process, or --model_copies N of a
                               # shared model) takes the next GPU: one per GPU (engines.devices).
                               device="auto" if on_gpu else 0, preprocessing=preprocessing, sha256=sha256,
                               precision=options.precision or DEFAULT_PRECISION)
    info = {"engine": "onnxruntime", "model": model, "providers": list(loader.providers),
            "precision": loader.precision,
            "ort_spinning": options.ort_spinning, "ort_sessions": options.ort_sessions,
            "intra_op_threads": options.intra_op_threads, "device": loader.device}
    return EngineRecipe(loader, batch_size or (GPU_BATCH_SIZE if on_gpu else CPU_BATCH_SIZE), info,
                        labels_model=model, labels_flag="--model")
