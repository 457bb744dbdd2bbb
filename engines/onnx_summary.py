"""What the launcher and the TensorRT builder need from an ONNX model, read with onnx alone.

Named inputs and outputs with their element types and dimensions, metadata, and the class
names an exported model carries (``labels`` metadata, see model_tools.export_efficientnet).
No inference library is involved, so a job can check its model before anything runs.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Dict, Optional

from engines.base import EngineError, import_optional
from engines.labels import parse_labels

ONNX_HINT = "Install the project: pip install -e . (it depends on onnx)."


@dataclasses.dataclass(frozen=True)
class OnnxSummary:
    """What the launcher and the build need to know about an ONNX model, read without an engine.

    Attributes:
        inputs: ``[(name, onnx elem type name, dims)]``; a dynamic dim is -1.
        outputs: Likewise for outputs.
        metadata: The model's ``metadata_props``.
        labels: Parsed ``labels`` metadata (JSON list or one per line), or None.
    """

    inputs: tuple
    outputs: tuple
    metadata: Dict[str, str]
    labels: Optional[tuple]


def summarize_onnx(model_bytes: bytes) -> OnnxSummary:
    """Reads inputs, outputs and metadata of an ONNX model (onnx only, no TensorRT).

    Raises:
        EngineError: the bytes are not an ONNX model.
    """
    onnx = import_optional("onnx", ONNX_HINT)
    try:
        model = onnx.load_model_from_string(model_bytes)
    except Exception as e:  # protobuf raises DecodeError and friends
        raise EngineError(f"Not an ONNX model ({len(model_bytes)} bytes): {e}") from e
    return summarize_model(model)


def summarize_model(model) -> OnnxSummary:
    """:func:`summarize_onnx` of a model already read (an ``onnx.ModelProto``)."""
    onnx = import_optional("onnx", ONNX_HINT)
    initializers = {i.name for i in model.graph.initializer}

    def describe(values):
        out = []
        for v in values:
            if v.name in initializers:
                continue
            t = v.type.tensor_type
            dims = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else -1 for d in t.shape.dim)
            out.append((v.name, onnx.TensorProto.DataType.Name(t.elem_type), dims))
        return tuple(out)

    meta = {p.key: p.value for p in model.metadata_props}
    labels = parse_labels(meta.get("labels"))
    return OnnxSummary(describe(model.graph.input), describe(model.graph.output), meta,
                       tuple(labels) if labels is not None else None)


@functools.lru_cache(maxsize=4)
def read_summary(path: str, flag: str = "--model") -> OnnxSummary:
    """:func:`summarize_onnx` of a model file (local or any Beam filesystem), read once per process.

    Args:
        path: The model file.
        flag: The flag that named it, for error messages. Default "--model".

    Raises:
        EngineError: the file is missing or not an ONNX model, naming ``flag`` and the path.
    """
    from engines import storage

    data = storage.read_bytes(path, f"{flag} file")
    try:
        return summarize_onnx(data)
    except EngineError as e:
        raise EngineError(f"{flag} {path}: {e}; pass an .onnx model file (`make model` prepares the default "
                          f"one)") from None
