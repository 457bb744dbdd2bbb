"""Real models as users bring them, made at test time from the shipped float32 NCHW export.

``models/efficientnet_lite0_float32_nchw.onnx`` (``make test`` exports it) is the plain export a
torchvision user writes: float32 NCHW input normalised with the ImageNet mean/std outside the
model, output ``logits``. Each function here returns a copy changed the way another user's model
differs from it, with onnx alone (no torch), so every variant is the real pretrained network:

- :func:`bgr`: trained on BGR images (the first convolution's input channels reversed).
- :func:`nhwc`: float32 NHWC input (a Transpose in front, as TensorFlow-born exports have).
- :func:`float16`: every weight and the input and output in float16 (what ``model.half()`` exports).
- :func:`softmax_ended` / :func:`sigmoid_ended`: the head ends in Softmax (``probs``) or in a
  multi-label Sigmoid (``scores``).
- :func:`resized`: another input size; EfficientNet is convolutional with global pooling and its
  graph reshapes with the batch only, so any size runs (its "same" padding was fixed for 224 at
  export, which changes nothing these tests compare: wrapped and original run the same graph).

Each keeps the ``labels`` metadata. :func:`crops` gives the demo's photos as the pipeline's uint8
batch and :func:`run` runs a model on it with the project's ONNX Runtime engine.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from engines.onnxruntime_engine import OnnxRuntimeEngine
from images.pillow_decoder import PreprocessConfig, resize_and_crop
from pipelines.demo import PHOTOS
from tests.conftest import photo

REPO = Path(__file__).resolve().parent.parent
FLOAT_MODEL = REPO / "models" / "efficientnet_lite0_float32_nchw.onnx"
#: ``make test`` writes it (with ``.data`` beside it) in .venv-export: python -m tests.torch_export.
TORCH_EXPORT = REPO / "models" / "efficientnet_lite0_torch_export.onnx"
#: The demo's photos, one of each source, in a fixed order: astronaut, camera, chelsea, coffee, rocket.
SOURCES = sorted({source for _, source, _ in PHOTOS})


def crops(height: int, width: int) -> np.ndarray:
    """The demo photos as one uint8 RGB batch (N, height, width, 3): the pipeline's own resize-and-crop,
    the shorter side first resized to 256/224 of the crop's longer side (256 for 224)."""
    config = PreprocessConfig(resize=round(max(height, width) * 256 / 224), crop=height, crop_width=width)
    return np.stack([resize_and_crop(Image.fromarray(photo(name)).convert("RGB"), config) for name in SOURCES])


def run(model: onnx.ModelProto, batch: np.ndarray) -> np.ndarray:
    """ONNX Runtime on the model's one input; its first output."""
    engine = OnnxRuntimeEngine(model.SerializeToString())
    with engine:
        outputs = engine.infer({engine.input_names()[0]: batch})
    return next(iter(outputs.values()))


def load_float_model() -> onnx.ModelProto:
    """The shipped float32 NCHW export; a clear failure when ``make test`` has not made it."""
    if not FLOAT_MODEL.exists():
        pytest.fail(f"{FLOAT_MODEL} is missing: run `make test` (it exports it with the model)")
    return onnx.load(str(FLOAT_MODEL))


def load_torch_export() -> onnx.ModelProto:
    """The network exported as users write it (tests/torch_export.py), weights read from beside it."""
    if not TORCH_EXPORT.exists():
        pytest.fail(f"{TORCH_EXPORT} is missing: run `make test` (it exports it in .venv-export)")
    from engines.model_adapter import load_model

    return load_model(str(TORCH_EXPORT))


def copy(model: onnx.ModelProto) -> onnx.ModelProto:
    """A deep copy (variants and savers never touch the model they are given)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def _initializer(model: onnx.ModelProto, name: str):
    return next(i for i in model.graph.initializer if i.name == name)


def _first_conv(model: onnx.ModelProto):
    return next(n for n in model.graph.node if n.op_type == "Conv")


def bgr(model: onnx.ModelProto) -> onnx.ModelProto:
    """The same network taking BGR input: the first convolution's input channels reversed.

    The padding before it is channel-independent, so BGR pixels in give exactly the RGB model's
    outputs.
    """
    out = copy(model)
    weight = _initializer(out, _first_conv(out).input[1])
    array = numpy_helper.to_array(weight)
    if array.shape[1] != 3:
        raise ValueError(f"first Conv takes {array.shape[1]} channels, expected 3")
    weight.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(array[:, ::-1]), weight.name))
    return out


def nhwc(model: onnx.ModelProto) -> onnx.ModelProto:
    """The same network taking float32 NHWC input: a Transpose to NCHW in front of it."""
    out = copy(model)
    graph = out.graph
    old = graph.input[0]
    inner = f"{old.name}_nchw"
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name == old.name:
                node.input[i] = inner
    n, c, h, w = old.type.tensor_type.shape.dim
    new = helper.make_tensor_value_info(old.name, old.type.tensor_type.elem_type, [
        n.dim_param or n.dim_value, h.dim_value, w.dim_value, c.dim_value])
    graph.node.insert(0, helper.make_node("Transpose", [old.name], [inner], perm=[0, 3, 1, 2], name="to_nchw"))
    del graph.input[:]
    graph.input.append(new)
    return out


def float16(model: onnx.ModelProto) -> onnx.ModelProto:
    """Every float32 weight, constant, cast and graph input/output turned float16.

    What ``model.half()`` before ``torch.onnx.export`` gives, written for this graph with onnx
    alone (onnxconverter-common is not a test dependency): its ops (Conv, Clip, Add, Pad,
    GlobalAveragePool, Gemm) all take float16.
    """
    out = copy(model)
    graph = out.graph
    for i, init in enumerate(graph.initializer):
        if init.data_type == TensorProto.FLOAT:
            graph.initializer[i].CopyFrom(numpy_helper.from_array(
                numpy_helper.to_array(init).astype(np.float16), init.name))
    for node in graph.node:
        for attr in node.attribute:
            if node.op_type == "Constant" and attr.name == "value" and attr.t.data_type == TensorProto.FLOAT:
                attr.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(attr.t).astype(np.float16),
                                                        attr.t.name))
            if node.op_type == "Cast" and attr.name == "to" and attr.i == TensorProto.FLOAT:
                attr.i = TensorProto.FLOAT16
    for value in list(graph.input) + list(graph.output) + list(graph.value_info):
        if value.type.tensor_type.elem_type == TensorProto.FLOAT:
            value.type.tensor_type.elem_type = TensorProto.FLOAT16
    return out


def _append_activation(model: onnx.ModelProto, op: str, output: str, **attrs) -> onnx.ModelProto:
    out = copy(model)
    graph = out.graph
    (old,) = graph.output
    raw = f"{old.name}_raw"
    for node in graph.node:
        for i, name in enumerate(node.output):
            if name == old.name:
                node.output[i] = raw
    graph.node.append(helper.make_node(op, [raw], [output], name=f"head_{op.lower()}", **attrs))
    new = onnx.ValueInfoProto()
    new.CopyFrom(old)
    new.name = output
    del graph.output[:]
    graph.output.append(new)
    return out


def softmax_ended(model: onnx.ModelProto) -> onnx.ModelProto:
    """The classifier with a Softmax appended: output ``probs`` holds probabilities already."""
    return _append_activation(model, "Softmax", "probs", axis=-1)


def sigmoid_ended(model: onnx.ModelProto) -> onnx.ModelProto:
    """A multi-label head: a Sigmoid on each of the 1000 logits, output ``scores``."""
    return _append_activation(model, "Sigmoid", "scores")


def resized(model: onnx.ModelProto, height: int, width: int) -> onnx.ModelProto:
    """The same network with a fixed ``height`` x ``width`` input instead of 224 x 224."""
    out = copy(model)
    dims = out.graph.input[0].type.tensor_type.shape.dim
    dims[2].dim_value, dims[3].dim_value = height, width
    return out
