"""What an engine accepts: its named inputs and outputs and its optimisation profiles.

:class:`EngineLayout` is a pure function of the engine's tensors and profile shapes
(:meth:`EngineLayout.from_tensors` takes plain values, so every rule is tested without
TensorRT or fakes); :func:`read_layout` is the thin reader over a deserialized
``ICudaEngine``. The runner sizes its buffers and chooses profiles from the layout.

Each profile is stored once in the plan and any number of execution contexts may use
it at the same time (TensorRT 10.x/11.x; docs/tensorrt.md, "Profiles and contexts").
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Mapping, Sequence, Tuple

import numpy as np

from engines.base import EngineError, TensorSpec
from engines.tensorrt.shapes import TensorRange, batch_limits, check_batch_coverage

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


def numpy_dtype(type_name: str, tensor: str) -> np.dtype:
    """The numpy dtype for a TensorRT ``DataType`` member name.

    Raises:
        EngineError: packed sub-byte types (INT4, FP4) that cannot be fed as numpy arrays.
    """
    if type_name not in DTYPES:
        raise EngineError(f"Tensor: {tensor} | TensorRT type {type_name} is not supported for engine "
                          f"inputs/outputs (supported: {sorted(DTYPES)}). Note: keep packed types inside the network")
    return DTYPES[type_name]


@dataclasses.dataclass(frozen=True)
class TensorDesc:
    """One I/O tensor as the engine declares it.

    Attributes:
        name: Tensor name.
        is_input: True for inputs.
        type_name: TensorRT ``DataType`` member name ("FLOAT", "UINT8", ...).
        shape: Declared shape, -1 for dynamic dimensions.
        shape_tensor: A host-side shape input (``is_shape_inference_io``).
    """

    name: str
    is_input: bool
    type_name: str
    shape: Tuple[int, ...]
    shape_tensor: bool = False


@dataclasses.dataclass(frozen=True)
class EngineLayout:
    """An engine's inputs, outputs and profiles.

    Attributes:
        inputs: Input specs by name, in engine order.
        outputs: Output specs by name, in engine order.
        ranges: For each optimisation profile, the (min, opt, max) shape of every input.
    """

    inputs: Dict[str, TensorSpec]
    outputs: Dict[str, TensorSpec]
    ranges: Tuple[Mapping[str, TensorRange], ...]

    @classmethod
    def from_tensors(cls, tensors: Sequence[TensorDesc],
                     profile_shapes: Sequence[Mapping[str, Sequence[Sequence[int]]]]) -> "EngineLayout":
        """Builds and checks a layout.

        Args:
            tensors: Every I/O tensor of the engine.
            profile_shapes: For each profile, ``{input name: (min, opt, max) shapes}``.

        Raises:
            EngineError: shape tensors or unsupported dtypes; no profile; profiles whose
                batch ranges leave a gap (splitting and padding need every batch from the
                smallest min to the largest max to fit some profile).
        """
        inputs: Dict[str, TensorSpec] = {}
        outputs: Dict[str, TensorSpec] = {}
        for t in tensors:
            if t.shape_tensor:
                raise EngineError(f"Tensor: {t.name} | shape tensors (host-side shape inputs) are not supported")
            spec = TensorSpec(t.name, numpy_dtype(t.type_name, t.name), tuple(t.shape))
            (inputs if t.is_input else outputs)[t.name] = spec
        if not profile_shapes:
            raise EngineError("the engine has no optimization profile")
        ranges = tuple({name: TensorRange(*profile[name]) for name in inputs} for profile in profile_shapes)
        limits = [batch_limits(p) for p in ranges]
        check_batch_coverage([(lo, hi) for lo, _, hi in limits],
                             [f"profile {k} (batch {lo}..{hi})" for k, (lo, _, hi) in enumerate(limits)])
        return cls(inputs, outputs, ranges)

    @property
    def profiles(self) -> List[Tuple[int, int, int]]:
        """(min, opt, max) batch of each optimisation profile."""
        return [batch_limits(p) for p in self.ranges]

    @property
    def max_batch(self) -> int:
        return max(hi for _, _, hi in self.profiles)

    @property
    def min_batch(self) -> int:
        return min(lo for lo, _, _ in self.profiles)

    @property
    def dynamic_batch(self) -> bool:
        """True when every input has a dynamic batch dimension (batches may be split and padded)."""
        return all(spec.dynamic_batch for spec in self.inputs.values())

    def max_input_shapes(self) -> List[Dict[str, Tuple[int, ...]]]:
        """For each profile, the largest shape of every input (what buffers are sized for)."""
        return [{name: r.max for name, r in profile.items()} for profile in self.ranges]


def _type_name(trt_dtype: Any) -> str:
    return getattr(trt_dtype, "name", str(trt_dtype).split(".")[-1])


def read_layout(engine: Any, trt: Any) -> EngineLayout:
    """Reads the layout of a deserialized ``ICudaEngine``."""
    tensors = []
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        tensors.append(TensorDesc(name, engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT,
                                  _type_name(engine.get_tensor_dtype(name)), tuple(engine.get_tensor_shape(name)),
                                  bool(engine.is_shape_inference_io(name))))
    inputs = [t.name for t in tensors if t.is_input]
    profile_shapes = [{name: tuple(engine.get_tensor_profile_shape(name, k)) for name in inputs}
                      for k in range(engine.num_optimization_profiles)]
    return EngineLayout.from_tensors(tensors, profile_shapes)

