"""TensorRT engine: build from ONNX, run with dynamic batch shapes, serve RunInference.

Importing this package imports neither TensorRT nor CUDA; they are loaded inside the
functions that need them (``engines.tensorrt._trt.import_tensorrt``,
``engines.cuda.cudart``). See docs/tensorrt.md.

    plan = EngineFromOnnx("model.onnx", BuildOptions(profiles=(Profile(1, 64, 256),)))()   # build
    with TensorRTEngine(EngineFromBytes(plan)) as engine:                                 # load + run
        outputs = engine.infer({"images": batch}, outputs=["logits"])   # numpy or device arrays
"""

from engines.tensorrt._trt import import_tensorrt
from engines.tensorrt.builder import BuiltEngine, EngineFromOnnx, build_plan, convert_to_fp16, summarize_onnx
from engines.tensorrt.cache import BuildTarget, EngineCache, cache_key
from engines.tensorrt.deserialize import EngineFromBytes, LoadedEngine
from engines.tensorrt.layout import EngineLayout, read_layout
from engines.tensorrt.loader import TensorRTLoader
from engines.tensorrt.options import BuildOptions, Profile
from engines.tensorrt.plan import (PlanHeader, PlanInfo, check_plan_version, read_plan_header, read_sidecar,
                                   sidecar_path, write_sidecar)
from engines.tensorrt.runtime import TensorRTEngine

__all__ = [
    "BuildOptions", "BuildTarget", "BuiltEngine", "EngineCache", "EngineFromBytes", "EngineFromOnnx", "EngineLayout",
    "LoadedEngine", "PlanHeader", "PlanInfo", "read_layout",
    "Profile", "TensorRTEngine", "TensorRTLoader", "build_plan", "cache_key", "check_plan_version",
    "convert_to_fp16", "import_tensorrt", "read_plan_header", "read_sidecar", "sidecar_path",
    "summarize_onnx", "write_sidecar",
]
