"""Plan bytes -> a deserialized TensorRT engine: :class:`EngineFromBytes` (Polygraphy's loader pattern).

Its ``__init__`` only stores arguments; calling it checks what can be checked without
the GPU (plan header, versions, lean-runtime rules), then the GPU (driver, compute
capability against how the plan was built), and only then creates ``trt.Runtime`` and
deserializes, putting TensorRT's own log into any error. The runner
(:class:`engines.tensorrt.runtime.TensorRTEngine`) takes the result from there.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Optional

from engines.base import EngineError
from engines import cuda
from engines.tensorrt._trt import capturing_logger, import_tensorrt, is_lean, version_tuple
from engines.tensorrt.plan import (PlanHeader, PlanInfo, check_plan_version, read_plan_header, serialization_version,
                                   unread_header_reason)

_LOG = logging.getLogger(__name__)

#: What the lean runtime logs when asked to load a plan that is not version-compatible
#: (NVIDIA/TensorRT#4790); matched to say so instead of blaming the version or GPU.
LEAN_STUB_MESSAGE = "Unexpected call to stub"


@dataclasses.dataclass
class LoadedEngine:
    """A deserialized engine and what it was loaded with (kept alive together).

    Attributes:
        trt: The TensorRT module (``tensorrt`` or ``tensorrt_lean``).
        runtime: The ``trt.Runtime`` (must outlive the engine).
        engine: The ``ICudaEngine``.
        logger: The process-wide capturing logger.
        device: The GPU it is loaded on.
        name: Label for logs and errors.
    """

    trt: Any
    runtime: Any
    engine: Any
    logger: Any
    device: cuda.DeviceInfo
    name: str

    @property
    def trt_version(self) -> str:
        return str(self.trt.__version__)


def check_gpu(info: Optional[PlanInfo], dev: cuda.DeviceInfo, name: str) -> None:
    """Refuses a GPU the plan cannot run on, as its sidecar says it was built.

    * ``hardware_compatibility`` "none" and "same_compute_capability": the GPU's compute
      capability must equal the build GPU's;
    * "ampere_plus": any GPU of compute capability 8.0 or newer.

    A different GPU name with the same compute capability loads (maybe not at its fastest),
    which is logged; for "ampere_plus" plans, made to move between GPUs, it is not.

    Raises:
        EngineError: naming both GPUs and the fix.
    """
    if info is None:
        return
    level = info.hardware_compatibility
    if level == "ampere_plus":
        if (dev.major, dev.minor) < (8, 0):
            raise EngineError(
                f"The plan {name} was built --hardware_compatibility ampere_plus, which runs on Ampere or newer GPUs "
                f"(compute 8.0+), and this GPU is {dev.name} (compute {dev.compute_capability}). Note: build a plan "
                f"on this GPU type without --hardware_compatibility (use --engine_cache to build on the worker)")
        return
    if info.compute_capability != dev.compute_capability:
        how = "with --hardware_compatibility same_compute_capability, which" if level == "same_compute_capability" \
            else "without --hardware_compatibility; such"
        raise EngineError(
            f"The plan {name} was built on {info.gpu_name} (compute {info.compute_capability}) {how} plans run only "
            f"on GPUs of that compute capability, and this GPU is {dev.name} (compute {dev.compute_capability}). "
            f"Note: build on this GPU type (use --engine_cache to build on the worker), or build with "
            f"--hardware_compatibility ampere_plus")
    if info.gpu_name != dev.name:
        _LOG.warning("plan %s was built on %s, running on %s (same compute %s): it loads, but may not be the "
                     "fastest for this GPU", name, info.gpu_name, dev.name, dev.compute_capability)


class EngineFromBytes:
    """Loader: deserializes a plan on a GPU when called.

    Args:
        plan: The serialized engine.
        device: GPU index. Default 0.
        info: The plan's sidecar (:func:`engines.tensorrt.plan.read_sidecar`), used to refuse a
            plan for another TensorRT version or GPU with a clear message. Default None.
        name: A label for logs and errors (the plan's path). Default "".
        engine_host_code_allowed: Let the runtime run the lean runtime embedded in a
            version-compatible plan. Default None: True for version-compatible plans (per
            ``info``) and under the lean runtime module, else False (and, with no sidecar,
            one retry with True when the first attempt fails).
    """

    def __init__(self, plan: bytes, *, device: int = 0, info: Optional[PlanInfo] = None, name: str = "",
                 engine_host_code_allowed: Optional[bool] = None):
        self.plan = plan
        self.device = int(device)
        self.info = info
        self.name = name or "<plan bytes>"
        self.engine_host_code_allowed = engine_host_code_allowed

    def check_versions(self, trt: Any) -> Optional[PlanHeader]:
        """The checks needing neither GPU nor runtime: header, versions, lean-runtime rules.

        Returns:
            The plan header, or None when it has no readable header (TensorRT decides; logged).
        """
        header = read_plan_header(self.plan)
        info = self.info
        if header is None:
            layout = serialization_version(self.plan)
            why = (f"has plan header serialization version {layout} (bytes 4-7; trtexec reads the version at bytes "
                   f"24-27 only in version 0)" if layout is not None else "does not start with the plan magic b'ftrt'")
            _LOG.warning("%s %s, so its TensorRT version is unknown here; letting TensorRT %s decide whether it "
                         "loads", self.name, why, trt.__version__)
            return None
        check_plan_version(header, version_tuple(trt), info.version_compatible if info else None,
                           exclude_lean_runtime=bool(info and info.exclude_lean_runtime), lean_runtime=is_lean(trt))
        return header

    def __call__(self) -> LoadedEngine:
        """Checks, then deserializes.

        Raises:
            ImportError: no TensorRT or cuda-python.
            EngineError: not a plan; built by a TensorRT this runtime cannot load; no GPU or the
                wrong GPU for the plan; TensorRT refused it (with TensorRT's own reason).
        """
        trt = import_tensorrt(lean_ok=True)
        header = self.check_versions(trt)  # no GPU needed: refuse what can be refused here first
        dev = cuda.device_info(self.device)  # raises when there is no driver/GPU, before trt.Runtime
        check_gpu(self.info, dev, self.name)
        cuda.set_device(dev.index)
        logger = capturing_logger(trt, "WARNING")
        runtime = trt.Runtime(logger)
        engine = self._deserialize(trt, runtime, logger, header, dev)
        return LoadedEngine(trt, runtime, engine, logger, dev, self.name)

    def _deserialize(self, trt, runtime, logger, header: Optional[PlanHeader], dev: cuda.DeviceInfo):
        info = self.info
        allowed = self.engine_host_code_allowed
        auto = allowed is None
        if auto:
            allowed = bool(is_lean(trt) or (info and info.version_compatible and not info.exclude_lean_runtime))
        if allowed:
            # Version-compatible plans carry their own lean runtime, which is host code.
            runtime.engine_host_code_allowed = True
        since = logger.mark()  # the error below must carry this deserialization's messages only
        engine = runtime.deserialize_cuda_engine(self.plan)
        if engine is None and auto and not allowed and info is None:
            # No sidecar says how the plan was built: it may be version-compatible with an embedded
            # lean runtime, which loads only with host code allowed. The job chose this plan; retry.
            _LOG.warning("plan %s did not load with host code disallowed and has no sidecar; retrying with "
                         "engine_host_code_allowed=True (a version-compatible plan embeds its runtime)", self.name)
            runtime.engine_host_code_allowed = True
            engine = runtime.deserialize_cuda_engine(self.plan)
        if engine is not None:
            return engine
        log = logger.text(since=since)
        if is_lean(trt) and LEAN_STUB_MESSAGE in log:
            raise EngineError(
                f"The lean runtime (tensorrt_lean {trt.__version__}) could not load the plan {self.name}: it runs "
                f"only plans built --version_compatible, and this one is not ({log}). Note: rebuild the plan with "
                f"--version_compatible, or install the full TensorRT (the image built from Dockerfile)")
        built = (f"built by TensorRT {header.version}" if header
                 else f"its TensorRT version is not read here: {unread_header_reason(self.plan)}")
        if info:
            built += f" on {info.gpu_name} (compute {info.compute_capability})"
        raise EngineError(
            f"TensorRT {trt.__version__} could not deserialize the plan {self.name} ({built}) on {dev.name} "
            f"(compute {dev.compute_capability}): {log}. Note: a plan runs only with the TensorRT version and GPU "
            f"type it was built for (unless built --version_compatible / --hardware_compatibility); rebuild it here")
