"""Class names (from a file or an ONNX model's ``labels`` metadata) and an ONNX model's named I/O."""

from __future__ import annotations

import json
from typing import Dict, List, NamedTuple, Optional, Tuple, Union

from engines.base import EngineError


def parse_labels(text: Optional[str]) -> Optional[List[str]]:
    """Class names from text: a JSON list, else one name per line. None stays None.

    Raises:
        EngineError: text that starts like a JSON list but does not parse.
    """
    if text is None:
        return None
    stripped = text.strip()
    if stripped.startswith("["):
        try:
            return [str(x) for x in json.loads(stripped)]
        except ValueError as e:
            raise EngineError(f"labels look like a JSON list but do not parse: {e}") from e
    return [line for line in text.splitlines() if line.strip()]


def onnx_labels(model: bytes) -> Optional[List[str]]:
    """Class names from a serialized ONNX model's ``labels`` metadata (see engines.export_efficientnet)."""
    return onnx_summary(model).labels


class OnnxSummary(NamedTuple):
    """What the launcher needs from an ONNX model, without loading it into an engine.

    Attributes:
        labels: Class names from the ``labels`` metadata, or None.
        inputs: Input name -> (element type name such as ``UINT8``, dims: int, or str for a
            named dynamic dimension, or None when unknown).
        outputs: Output names, in graph order.
    """

    labels: Optional[List[str]]
    inputs: Dict[str, Tuple[str, Tuple[Union[int, str, None], ...]]]
    outputs: List[str]


def onnx_summary(model: bytes) -> OnnxSummary:
    """Labels and graph inputs/outputs of a serialized ONNX model (initializers are not inputs)."""
    import onnx

    proto = onnx.load_model_from_string(model)
    initializers = {i.name for i in proto.graph.initializer}
    inputs = {}
    for value in proto.graph.input:
        if value.name in initializers:
            continue
        tensor = value.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tensor.shape.dim)
        inputs[value.name] = (onnx.TensorProto.DataType.Name(tensor.elem_type), dims)
    labels = parse_labels({p.key: p.value for p in proto.metadata_props}.get("labels"))
    return OnnxSummary(labels, inputs, [o.name for o in proto.graph.output])
