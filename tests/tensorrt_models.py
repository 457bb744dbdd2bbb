"""Tiny ONNX models built with onnx.helper for the TensorRT tests (no downloads)."""

from __future__ import annotations

import json
from typing import Optional, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

LABELS = [f"class_{i}" for i in range(10)]


def image_classifier(size: int = 16, classes: int = 10, seed: int = 0, bias_shift: float = 0.0,
                     batch: object = "N", labels: Optional[Sequence[str]] = LABELS, opset: int = 17) -> bytes:
    """uint8 images [N, size, size, 3] -> float32 logits [N, classes]: cast, conv, relu, pool, gemm.

    Args:
        batch: The batch dimension: a name (dynamic) or an int (fixed).
        bias_shift: Added to the first class's bias (a "wrong" candidate for validate tests).
    """
    rng = np.random.default_rng(seed)
    w = rng.normal(0, 0.05, (8, 3, 3, 3)).astype(np.float32)
    b = rng.normal(0, 0.1, (8,)).astype(np.float32)
    fc = rng.normal(0, 0.5, (classes, 8)).astype(np.float32)
    fcb = rng.normal(0, 0.5, (classes,)).astype(np.float32)
    fcb[0] += bias_shift
    scale = np.array(1 / 255, np.float32)
    nodes = [
        helper.make_node("Cast", ["images"], ["x_f"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["x_f", "scale"], ["x_s"]),
        helper.make_node("Transpose", ["x_s"], ["x_nchw"], perm=[0, 3, 1, 2]),
        helper.make_node("Conv", ["x_nchw", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("GlobalAveragePool", ["r"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("Gemm", ["f", "fc", "fcb"], ["logits"], transB=1),
    ]
    graph = helper.make_graph(
        nodes, "tiny_classifier",
        [helper.make_tensor_value_info("images", TensorProto.UINT8, [batch, size, size, 3])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, classes])],
        [numpy_helper.from_array(scale, "scale"), numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b"),
         numpy_helper.from_array(fc, "fc"), numpy_helper.from_array(fcb, "fcb")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    if labels is not None:
        helper.set_model_props(model, {"labels": json.dumps(list(labels))})
    onnx.checker.check_model(model)
    return model.SerializeToString()


def two_in_two_out(batch: object = "N") -> bytes:
    """a: float32 [N,4], b: int32 [N,4] -> sum: float32 [N,4] (a + b), flag: bool [N,4] (a > b)."""
    nodes = [
        helper.make_node("Cast", ["b"], ["b_f"], to=TensorProto.FLOAT),
        helper.make_node("Add", ["a", "b_f"], ["sum"]),
        helper.make_node("Greater", ["a", "b_f"], ["flag"]),
    ]
    graph = helper.make_graph(
        nodes, "two_in_two_out",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [batch, 4]),
         helper.make_tensor_value_info("b", TensorProto.INT32, [batch, 4])],
        [helper.make_tensor_value_info("sum", TensorProto.FLOAT, [batch, 4]),
         helper.make_tensor_value_info("flag", TensorProto.BOOL, [batch, 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()
