"""ONNX -> serialized TensorRT engine ("plan"), for TensorRT 10.x and 11.x.

Follows the build recipe in /work/shared/TENSORRT.md: ``create_network(0)`` on both
versions (11.x has no EXPLICIT_BATCH flag), ``set_memory_pool_limit`` for the
workspace, one optimisation profile per :class:`~engines.tensorrt.options.Profile`
applied to every dynamic-batch input, a timing cache loaded from and saved to a path,
and ``build_serialized_network``. fp16: ``BuilderFlag.FP16`` on 10.x; 11.x networks
are strongly typed (no precision flags), so the ONNX model is converted to fp16 first
with onnxconverter-common, keeping its input/output types (uint8 in, float32 out).
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import logging
import warnings
from typing import Any, Dict, List, Union

from engines import storage
from engines.base import EngineError, import_optional
from engines.tensorrt import cuda
from engines.tensorrt._trt import capturing_logger, import_tensorrt, version_tuple
from engines.tensorrt.options import BuildOptions
from engines.onnx_summary import ONNX_HINT, OnnxSummary, summarize_onnx
from engines.tensorrt.plan import PlanInfo

_LOG = logging.getLogger(__name__)

OnnxSource = Union[bytes, str]

_FP16_HINT = ("fp16 builds on TensorRT 11.x convert the ONNX model first: pip install onnxconverter-common "
              "(it is in the image built from Dockerfile).")


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


def convert_to_fp16(model_bytes: bytes) -> bytes:
    """Converts float32 weights and compute to float16, keeping the model's input/output types.

    Used on TensorRT 11.x, whose strongly typed networks take their precision from the
    ONNX model (TENSORRT.md, "11.0 changed").
    """
    onnx = import_optional("onnx", ONNX_HINT)
    float16 = import_optional("onnxconverter_common.float16", _FP16_HINT)
    model = onnx.load_model_from_string(model_bytes)
    float_casts = {node.output[0] for node in model.graph.node
                   if node.op_type == "Cast" and _cast_to(node) == onnx.TensorProto.FLOAT}
    with warnings.catch_warnings(record=True) as caught:  # one warning per clamped weight: summarise
        warnings.simplefilter("always")
        converted = float16.convert_float_to_float16(model, keep_io_types=True)
    if caught:
        _LOG.info("fp16 conversion: %d float32 values were clamped to the float16 range (%s)", len(caught),
                  caught[0].message)
    # The converter retypes the outputs of the model's own Cast(to=float) nodes (e.g. the
    # uint8 -> float cast at the input) to float16 but leaves their `to` attribute, which
    # makes the graph inconsistent (ONNX Runtime refuses it; a strongly typed TensorRT
    # network would mix types). Casts it inserted itself, and casts to graph outputs, stay.
    outputs = {o.name for o in converted.graph.output}
    for node in converted.graph.node:
        if node.op_type == "Cast" and node.output[0] in float_casts and node.output[0] not in outputs:
            for attr in node.attribute:
                if attr.name == "to":
                    attr.i = onnx.TensorProto.FLOAT16
    return converted.SerializeToString()


def _cast_to(node) -> int:
    for attr in node.attribute:
        if attr.name == "to":
            return attr.i
    return -1


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


def build_plan(onnx: OnnxSource, options: BuildOptions = BuildOptions(), device: int = 0,
                 log_severity: str = "WARNING") -> BuiltEngine:
    """Builds a plan from an ONNX model on GPU ``device``.

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
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode on 10 and 11
    parser = trt.OnnxParser(network, logger)
    since = logger.mark()  # the error below must carry this parse's messages only
    # With the model's local path the parser can resolve weights stored outside the .onnx file
    # (models over 2 GB); the fp16-converted copy exists only in memory.
    local_path = str(onnx) if isinstance(onnx, str) and "://" not in onnx and to_parse is model_bytes else None
    if not (parser.parse(to_parse, local_path) if local_path else parser.parse(to_parse)):
        raise EngineError(f"TensorRT {trt.__version__} could not parse the ONNX model: "
                          f"{'; '.join(_parser_errors(parser)) or '(no parser errors)'}. "
                          f"TensorRT log: {logger.text(since=since)}")

    config = builder.create_builder_config()
    if options.workspace_gib is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(options.workspace_gib * (1 << 30)))
    config.builder_optimization_level = options.opt_level
    if options.precision == "fp16" and major == 10:
        # Deprecated in 10.12 and removed in 11.0 (TENSORRT.md): only ever reached on 10.x.
        config.set_flag(trt.BuilderFlag.FP16)
    if options.version_compatible:
        config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
        if options.exclude_lean_runtime:
            config.set_flag(trt.BuilderFlag.EXCLUDE_LEAN_RUNTIME)
    if options.hardware_compatibility != "none":
        levels = {"ampere_plus": trt.HardwareCompatibilityLevel.AMPERE_PLUS,
                  "same_compute_capability": trt.HardwareCompatibilityLevel.SAME_COMPUTE_CAPABILITY}
        config.hardware_compatibility_level = levels[options.hardware_compatibility]

    inputs = [network.get_input(i) for i in range(network.num_inputs)]
    # Each concurrent execution context needs its own profile (TensorRT's IExecutionContext
    # contract for dynamic shapes), so every profile is added once per context.
    since = logger.mark()
    for profile in [p for _ in range(options.contexts) for p in options.profiles]:
        trt_profile = builder.create_optimization_profile()
        for tensor in inputs:
            dims = tuple(tensor.shape)
            if dims and dims[0] == -1:
                rest = dims[1:]
                trt_profile.set_shape(tensor.name, (profile.min,) + rest, (profile.opt,) + rest,
                                      (profile.max,) + rest)
        if config.add_optimization_profile(trt_profile) < 0:
            raise EngineError(f"TensorRT refused the optimization profile {profile.describe()}: "
                              f"{logger.text(since=since)}")

    if options.timing_cache:
        previous = storage.read_bytes(options.timing_cache) if storage.exists(options.timing_cache) else b""
        cache = config.create_timing_cache(previous)
        if not config.set_timing_cache(cache, False):
            _LOG.warning("timing cache %s does not match this GPU/TensorRT; starting an empty one",
                         options.timing_cache)
            config.set_timing_cache(config.create_timing_cache(b""), False)
        else:
            _LOG.info("timing cache %s: %s", options.timing_cache,
                      f"loaded {len(previous)} bytes" if previous else "new")

    since = logger.mark()  # the error below must carry this build's messages only
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineError(f"TensorRT {trt.__version__} could not build the engine on {dev.name} "
                          f"(compute {dev.compute_capability}) with {options.to_json()}: "
                          f"{logger.text(since=since)}")
    plan = bytes(serialized)
    if options.timing_cache:
        storage.write_bytes(options.timing_cache, bytes(config.get_timing_cache().serialize()))

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
    info = PlanInfo(tensorrt_version=str(trt.__version__), gpu_name=dev.name,
                    compute_capability=dev.compute_capability, profiles=options.profiles,
                    precision=options.precision, onnx_sha256=sha256_hex(model_bytes),
                    version_compatible=options.version_compatible,
                    exclude_lean_runtime=options.exclude_lean_runtime,
                    hardware_compatibility=options.hardware_compatibility, labels=summary.labels, extra=extra)
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
