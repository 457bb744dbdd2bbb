""":class:`TensorRTLoader`: the picklable recipe a Beam worker calls to get a :class:`TensorRTEngine`."""

from __future__ import annotations

import dataclasses
import logging
from typing import Optional

from engines import storage
from engines.base import EngineError
from engines.devices import Device, check_device, resolve_device
from engines.model_adapter import Preprocessing, adapted_model_bytes
from engines.tensorrt.options import BuildOptions
from engines.tensorrt.plan import PlanInfo, read_sidecar

_LOG = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class TensorRTLoader:
    """Loads a TensorRT engine on the worker; holds only paths and options until called.

    Give either ``engine_path`` (a plan built by ``python -m model_tools.build`` for the
    worker's GPU type) or ``onnx_path`` (built on the worker; with ``engine_cache`` only
    the first worker per GPU type builds, the others download).

    Attributes:
        engine_path: A plan, local or gs://. Its sidecar ``<plan>.json`` is used when present.
        onnx_path: An ONNX model, local or gs://.
        engine_cache: With ``onnx_path``: a local directory or gs:// prefix of cached plans.
            Default None (build in memory on every worker).
        build_options: With ``onnx_path``: how to build. Default ``BuildOptions()``.
        num_contexts: Execution contexts (streams and buffer sets). Default 2.
        cuda_graphs: Replay CUDA graphs per batch shape. Default False.
        device: GPU index, or "auto" to spread copies round-robin over the machine's GPUs.
            Default 0.
        preprocessing: With ``onnx_path``: the model's ``--mean``/``--std``/``--channel_order``
            (``engines.model_adapter.Preprocessing``); the model is built with the conversion to
            its input prepended where it needs one (``engines.model_adapter.wrap``), so the plan
            takes uint8 NHWC RGB and the cache keys it by the wrapped model's bytes. Default None:
            the file is built as it is. A plan (``engine_path``) is used as it was built:
            prepare the model before ``python -m model_tools.build``.
        sha256: With ``onnx_path`` and ``preprocessing``: the model's digest at launch, checked where
            it loads (``engines.model_adapter.adapted_model_bytes``). Default None.
    """

    engine_path: Optional[str] = None
    onnx_path: Optional[str] = None
    engine_cache: Optional[str] = None
    build_options: BuildOptions = BuildOptions()
    num_contexts: int = 2
    cuda_graphs: bool = False
    device: Device = 0
    preprocessing: Optional[Preprocessing] = None
    sha256: Optional[str] = None

    def __post_init__(self):
        if bool(self.engine_path) == bool(self.onnx_path):
            raise EngineError("Give exactly one of engine_path (a .plan built for the worker's GPU) or onnx_path "
                              f"(an ONNX model to build on the worker); got engine_path={self.engine_path!r}, "
                              f"onnx_path={self.onnx_path!r}")
        if self.engine_cache and not self.onnx_path:
            raise EngineError("engine_cache is used with onnx_path (plans are built from the ONNX model on a miss)")
        if not isinstance(self.build_options, BuildOptions):
            raise EngineError(f"build_options must be a BuildOptions, got {type(self.build_options).__name__}")
        if isinstance(self.num_contexts, bool) or not isinstance(self.num_contexts, int) or self.num_contexts < 1:
            raise EngineError(f"num_contexts must be an int >= 1, got {self.num_contexts!r}")
        check_device(self.device)

    def plan_info(self) -> Optional[PlanInfo]:
        """The sidecar of ``engine_path`` (None if absent or when building from ONNX); no TensorRT needed."""
        return read_sidecar(self.engine_path, required=False) if self.engine_path else None

    def _device_index(self) -> int:
        from engines import cuda

        return resolve_device(self.device, cuda.device_count())

    def __call__(self):
        """Loads (building or fetching if needed) and returns a :class:`TensorRTEngine`."""
        from engines.tensorrt._trt import import_tensorrt
        from engines.tensorrt.runtime import TensorRTEngine

        if self.engine_path and not storage.exists(self.engine_path):
            raise EngineError(f"Engine file not found: {self.engine_path}. Build one with `python -m "
                              f"model_tools.build --onnx MODEL.onnx --output {self.engine_path}` on the target "
                              f"GPU type, or pass onnx_path (and engine_cache) to build on the worker")
        import_tensorrt(lean_ok=True)  # a missing TensorRT is named (with its fix) before any GPU question
        device = self._device_index()
        if self.engine_path:
            plan = storage.read_bytes(self.engine_path)
            info = self.plan_info()
            name = self.engine_path
        else:
            onnx_bytes = (storage.read_bytes(self.onnx_path) if self.preprocessing is None else
                          adapted_model_bytes(self.onnx_path, self.preprocessing, "--onnx_path file", self.sha256))
            if self.engine_cache:
                from engines.tensorrt.cache import EngineCache

                plan, info, name = EngineCache(self.engine_cache).get_or_build(onnx_bytes, self.build_options,
                                                                               device)
            else:
                from engines.tensorrt.builder import build_plan

                _LOG.info("building a TensorRT engine from %s on this worker (no engine_cache: every worker "
                          "builds its own; pass engine_cache to build once per GPU type)", self.onnx_path)
                built = build_plan(onnx_bytes, self.build_options, device)
                plan, info, name = built.plan, built.info, f"{self.onnx_path} (built in memory)"
        return TensorRTEngine(plan, num_contexts=self.num_contexts, cuda_graphs=self.cuda_graphs, device=device,
                              info=info, name=name)
