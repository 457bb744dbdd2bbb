"""ONNX -> serialized TensorRT engine ("plan"), for TensorRT 10.x and 11.x.

Follows the build recipe in docs/tensorrt.md ("TensorRT facts"), in four steps as
Polygraphy splits it (``NetworkFromOnnxBytes`` -> ``CreateConfig`` ->
``EngineBytesFromNetwork``): :func:`parse_onnx` (``create_network(0)`` on both versions:
11.x has no EXPLICIT_BATCH flag), :func:`configure` (workspace, flags, one optimisation
profile per :class:`~engines.tensorrt.options.Profile` applied to every dynamic-batch
input, each added once whatever the number of execution contexts), :func:`build_serialized`
(``build_serialized_network`` with the timing cache loaded before and merged back after,
under a lock) and :func:`describe_plan` (the sidecar). fp16: ``BuilderFlag.FP16`` on 10.x;
11.x networks are strongly typed (no precision flags), so the ONNX model is converted to
fp16 first with onnxconverter-common, keeping its input/output types (uint8 in, float32 out).
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import logging
from typing import Any, Dict, List, Optional, Union

from engines import storage
from engines.tensorrt.locks import machine_lock
from engines.base import EngineError
from engines import cuda
from engines.tensorrt._trt import capturing_logger, import_tensorrt, version_tuple
from engines.model_adapter import convert_to_fp16
from engines.tensorrt.options import BuildOptions
from engines.onnx_summary import OnnxSummary, summarize_onnx
from engines.tensorrt.plan import PlanInfo

_LOG = logging.getLogger(__name__)

OnnxSource = Union[bytes, str]


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_onnx(source: OnnxSource) -> bytes:
    """The serialized ONNX model from bytes or a path (local or gs://)."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source)
    return storage.read_bytes(str(source))


def check_batch_dims(summary: OnnxSummary) -> None:
    """Refuses models the profiles cannot describe: no dynamic batch, or other dynamic dims.

    Raises:
        EngineError: naming the input and the fix (re-export with a dynamic batch axis only).
    """
    if not summary.inputs:
        raise EngineError("The ONNX model has no inputs")
    dynamic = []
    for name, _, dims in summary.inputs:
        if not dims:
            continue
        if any(d == -1 for d in dims[1:]):
            raise EngineError(
                f"Input tensor: {name} | dims {list(dims)} have a dynamic dimension other than the batch "
                f"(dimension 0). Note: profiles here vary the batch only; re-export the model with fixed "
                f"non-batch dimensions (e.g. 224x224x3)")
        if dims[0] == -1:
            dynamic.append(name)
    if not dynamic:
        raise EngineError(
            f"No input of the ONNX model has a dynamic batch dimension (inputs: "
            f"{[(n, list(d)) for n, _, d in summary.inputs]}). Note: re-export it with a dynamic axis 0 "
            f"(torch.onnx.export(..., dynamic_axes={{'input': {{0: 'batch'}}}}))")


@dataclasses.dataclass(frozen=True)
class BuiltEngine:
    """A serialized engine and its sidecar information."""

    plan: bytes
    info: PlanInfo


def _parser_errors(parser) -> List[str]:
    errors = []
    for i in range(parser.num_errors):
        err = parser.get_error(i)
        errors.append(f"node {err.node()} ({err.node_name()}, op {err.node_operator()}): {err.desc()} "
                      f"[code {err.code()}]")
    return errors


#: ``--hardware_compatibility`` value -> (``HardwareCompatibilityLevel`` member, first TensorRT with it).
HARDWARE_LEVELS = {"ampere_plus": ("AMPERE_PLUS", "8.6"), "same_compute_capability": ("SAME_COMPUTE_CAPABILITY", "10.9")}


def hardware_level(trt, name: str):
    """The ``HardwareCompatibilityLevel`` member for ``name``, looked up only when asked for.

    Raises:
        EngineError: this TensorRT lacks it (SAME_COMPUTE_CAPABILITY first exists in 10.9).
    """
    member, since = HARDWARE_LEVELS[name]
    level = getattr(trt.HardwareCompatibilityLevel, member, None)
    if level is None:
        raise EngineError(f"--hardware_compatibility {name} needs TensorRT {since} or later "
                          f"(HardwareCompatibilityLevel.{member}); this is TensorRT {trt.__version__}. Note: use "
                          f"--hardware_compatibility ampere_plus, or build with a newer TensorRT image")
    return level


@dataclasses.dataclass
class Network:
    """A parsed network and the objects that must outlive it (builder, parser)."""

    builder: Any
    network: Any
    parser: Any


def parse_onnx(trt, logger, model_bytes: bytes, local_path: Optional[str] = None) -> Network:
    """Parses an ONNX model into a TensorRT network.

    Args:
        local_path: The model's local path, so the parser can resolve weights stored outside
            the .onnx file (models over 2 GB). Default None.

    Raises:
        EngineError: with the parser's errors and TensorRT's log.
    """
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode on 10 and 11
    parser = trt.OnnxParser(network, logger)
    since = logger.mark()  # the error below must carry this parse's messages only
    if not (parser.parse(model_bytes, local_path) if local_path else parser.parse(model_bytes)):
        raise EngineError(f"TensorRT {trt.__version__} could not parse the ONNX model: "
                          f"{'; '.join(_parser_errors(parser)) or '(no parser errors)'}. "
                          f"TensorRT log: {logger.text(since=since)}")
    return Network(builder, network, parser)


def configure(trt, logger, net: Network, options: BuildOptions):
    """The builder config: workspace, optimisation level, flags and one profile per option profile.

    Raises:
        EngineError: a compatibility level this TensorRT lacks, or a profile TensorRT refuses.
    """
    major = version_tuple(trt)[0]
    config = net.builder.create_builder_config()
    if options.workspace_gib is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(options.workspace_gib * (1 << 30)))
    config.builder_optimization_level = options.opt_level
    if options.precision == "fp16" and major == 10:
        # Deprecated in 10.12 and removed in 11.0 (docs/tensorrt.md): only ever reached on 10.x.
        config.set_flag(trt.BuilderFlag.FP16)
    if options.version_compatible:
        config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
        if options.exclude_lean_runtime:
            config.set_flag(trt.BuilderFlag.EXCLUDE_LEAN_RUNTIME)
    if options.hardware_compatibility != "none":
        config.hardware_compatibility_level = hardware_level(trt, options.hardware_compatibility)
    network = net.network
    inputs = [network.get_input(i) for i in range(network.num_inputs)]
    # Each profile once: since TensorRT 9/10 any number of execution contexts may use the same
    # profile at once (docs/tensorrt.md, "Profiles and contexts").
    for profile in options.profiles:
        since = logger.mark()
        trt_profile = net.builder.create_optimization_profile()
        for tensor in inputs:
            dims = tuple(tensor.shape)
            if dims and dims[0] == -1:
                rest = dims[1:]
                trt_profile.set_shape(tensor.name, (profile.min,) + rest, (profile.opt,) + rest,
                                      (profile.max,) + rest)
        if config.add_optimization_profile(trt_profile) < 0:
            raise EngineError(f"TensorRT refused the optimization profile {profile.describe()}: "
                              f"{logger.text(since=since)}")
    return config


def _file_lock(path: str, timeout_s: float = 600.0):
    """An exclusive lock on ``path`` among the processes of this machine.

    For a gs:// path the lock is local (keyed by the path), so only processes on one machine
    exclude each other; across machines the read-merge-write still keeps what the other wrote
    before the read.
    """
    return machine_lock(f"timing-cache:{path}", timeout_s, f"merging the timing cache {path}")


def _timing_cache_from(config, data: bytes, path: str):
    """``config.create_timing_cache(data)``, or an empty cache (with a warning) when TensorRT refuses ``data``."""
    cache = config.create_timing_cache(data)
    if cache is None and data:
        _LOG.warning("timing cache %s is corrupt or from another TensorRT version; starting an empty one (it is "
                     "rewritten after this build)", path)
        cache = config.create_timing_cache(b"")
    return cache


def load_timing_cache(config, path: str) -> None:
    """Gives the builder the timing cache at ``path`` (empty when missing, corrupt or foreign)."""
    previous = storage.read_bytes(path) if storage.exists(path) else b""
    cache = _timing_cache_from(config, previous, path)
    if cache is None:
        _LOG.warning("TensorRT could not create a timing cache; building without one")
        return
    if not config.set_timing_cache(cache, False):
        _LOG.warning("timing cache %s does not match this GPU/TensorRT; starting an empty one", path)
        empty = config.create_timing_cache(b"")
        if empty is not None:
            config.set_timing_cache(empty, False)
    else:
        _LOG.info("timing cache %s: %s", path, f"loaded {len(previous)} bytes" if previous else "new")


def save_timing_cache(config, path: str) -> None:
    """Merges this build's timings into the cache at ``path``, under a lock.

    Two builds (e.g. two workers filling the engine cache) both read the cache, then each
    would overwrite the other's additions; so, as Polygraphy's ``EngineBytesFromNetwork``
    does, the file is read again under the lock and combined into this build's cache before
    writing. ``path`` is one GPU type's and TensorRT version's file
    (:func:`engines.tensorrt.cache.timing_cache_path`), so ``combine(prev, ignore_mismatch=False)``:
    a cache TensorRT says is from another device is replaced, never merged.
    """
    cache = config.get_timing_cache()
    if cache is None:
        return
    with _file_lock(path):
        if storage.exists(path):
            prev = config.create_timing_cache(storage.read_bytes(path))
            if prev is None:
                _LOG.warning("timing cache %s is corrupt or foreign; replacing it with this build's", path)
            elif not cache.combine(prev, False):
                _LOG.warning("could not merge the timing cache %s into this build's (another device or TensorRT "
                             "version, says TensorRT); replacing it", path)
        storage.write_bytes(path, bytes(cache.serialize()))


def build_serialized(trt, logger, net: Network, config, options: BuildOptions, dev: cuda.DeviceInfo) -> bytes:
    """``build_serialized_network`` with the timing cache loaded before and merged back after.

    Raises:
        EngineError: the build failed, with TensorRT's log.
    """
    timing_cache = None
    if options.timing_cache:
        from engines.tensorrt.cache import BuildTarget, timing_cache_path

        timing_cache = timing_cache_path(options.timing_cache,
                                         BuildTarget(dev.name, dev.compute_capability, str(trt.__version__)))
        load_timing_cache(config, timing_cache)
    since = logger.mark()  # the error below must carry this build's messages only
    serialized = net.builder.build_serialized_network(net.network, config)
    if serialized is None:
        raise EngineError(f"TensorRT {trt.__version__} could not build the engine on {dev.name} "
                          f"(compute {dev.compute_capability}) with {options.to_json()}: "
                          f"{logger.text(since=since)}")
    plan = bytes(serialized)
    if timing_cache:
        save_timing_cache(config, timing_cache)
    return plan


def _activations(model_bytes: bytes):
    """What ``--activation auto`` resolves to for each output, and the activations the graph ends in, for
    the sidecar: a job running the plan has no graph to read them from (``engines.model_adapter``)."""
    import onnx

    from engines.model_adapter import output_activations

    return output_activations(onnx.load_model_from_string(model_bytes))


def describe_plan(plan: bytes, model_bytes: bytes, summary: OnnxSummary, options: BuildOptions,
                  trt_version: str, dev: cuda.DeviceInfo, fp16_via: Optional[str]) -> PlanInfo:
    """The sidecar information of a freshly built plan."""
    extra: Dict[str, Any] = {
        "inputs": [{"name": n, "onnx_type": t, "dims": list(d)} for n, t, d in summary.inputs],
        "outputs": [{"name": n, "onnx_type": t, "dims": list(d)} for n, t, d in summary.outputs],
        "onnx_metadata": summary.metadata,
        "build_options": options.to_json(),
        "cache_key": options.cache_key(),
        "plan_sha256": sha256_hex(plan),
        "plan_bytes": len(plan),
        "built_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "fp16_via": fp16_via,
    }
    extra["activations"], extra["final_activations"] = _activations(model_bytes)
    return PlanInfo(tensorrt_version=trt_version, gpu_name=dev.name, compute_capability=dev.compute_capability,
                    profiles=options.profiles, precision=options.precision, onnx_sha256=sha256_hex(model_bytes),
                    version_compatible=options.version_compatible, exclude_lean_runtime=options.exclude_lean_runtime,
                    hardware_compatibility=options.hardware_compatibility, labels=summary.labels, extra=extra)


def build_plan(onnx: OnnxSource, options: BuildOptions = BuildOptions(), device: int = 0,
               log_severity: str = "WARNING") -> BuiltEngine:
    """Builds a plan from an ONNX model on GPU ``device``: parse, configure, build, describe.

    Args:
        onnx: The serialized model, or a path (local or gs://).
        options: Profiles, precision, workspace, timing cache, compatibility. Default ``BuildOptions()``.
        device: GPU index to build on (the plan is tuned for it). Default 0.
        log_severity: Least severe TensorRT message kept for errors and logs. Default "WARNING".

    Returns:
        The plan bytes and the :class:`PlanInfo` for its sidecar.

    Raises:
        ImportError: TensorRT (the full module with the builder) is not installed.
        EngineError: no GPU; the model has no dynamic batch; the parser or builder failed
            (with the parser's errors and TensorRT's log messages).
    """
    model_bytes = read_onnx(onnx)
    summary = summarize_onnx(model_bytes)
    check_batch_dims(summary)
    trt = import_tensorrt(lean_ok=False)
    major = version_tuple(trt)[0]
    dev = cuda.device_info(device)  # before any TensorRT object: without a GPU they crash the process
    cuda.set_device(device)

    to_parse = model_bytes
    fp16_via = None
    if options.precision == "fp16":
        if major >= 11:
            to_parse = convert_to_fp16(model_bytes)
            fp16_via = "onnx converted to fp16 (onnxconverter-common, keep_io_types) for a strongly typed build"
        else:
            fp16_via = "BuilderFlag.FP16"
        _LOG.info("fp16 on TensorRT %s: %s", trt.__version__, fp16_via)

    logger = capturing_logger(trt, log_severity)
    # The fp16-converted copy exists only in memory: nothing to resolve external weights against.
    local = isinstance(onnx, str) and not storage.is_url(onnx) and to_parse is model_bytes
    local_path = str(onnx) if local else None
    net = parse_onnx(trt, logger, to_parse, local_path)
    config = configure(trt, logger, net, options)
    plan = build_serialized(trt, logger, net, config, options, dev)
    info = describe_plan(plan, model_bytes, summary, options, str(trt.__version__), dev, fp16_via)
    _LOG.info("built a %d-byte %s plan on %s with TensorRT %s", len(plan), options.precision, dev.name,
              trt.__version__)
    return BuiltEngine(plan, info)


class EngineFromOnnx:
    """Loader: builds a plan from an ONNX model when called (Polygraphy's loader pattern).

    Args:
        onnx: The serialized model or a path (local or gs://).
        options: Build options. Default ``BuildOptions()``.
        device: GPU index to build on. Default 0.
    """

    def __init__(self, onnx: OnnxSource, options: BuildOptions = BuildOptions(), device: int = 0):
        self.onnx = onnx
        self.options = options
        self.device = device

    def build(self) -> BuiltEngine:
        """The plan and its sidecar information."""
        return build_plan(self.onnx, self.options, self.device)

    def __call__(self) -> bytes:
        """The plan bytes."""
        return self.build().plan
