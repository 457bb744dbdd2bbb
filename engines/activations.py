"""How a model's output becomes scores: the activations post-processing applies, in numpy alone.

``engines.model_adapter.resolve_activation`` decides which one a model's output needs (``auto``
reads the end of its graph); the pipeline's post-processing (``transforms/postprocess.py``) and
``model_tools.validate`` apply it with :func:`apply_activation`. Kept apart from the adapter so
the transforms use it without reaching into the ONNX graph code.
"""

from __future__ import annotations

import numpy as np

from engines.base import UsageError

#: What ``--activation`` takes; ``auto`` is resolved into one of the others before anything runs.
ACTIVATIONS = ("auto", "softmax", "sigmoid", "none")


def apply_activation(scores: np.ndarray, activation: str) -> np.ndarray:
    """Applies a resolved activation to a ``(N, classes)`` batch of outputs, in float32.

    Args:
        scores: The model's outputs, one row per image.
        activation: "softmax" (over each row), "sigmoid" (each value alone) or "none".

    Raises:
        UsageError: ``activation`` is "auto" (resolve it first) or unknown.
    """
    x = np.asarray(scores, dtype=np.float32)
    if activation == "none":
        return x
    if activation == "softmax":
        e = np.exp(x - x.max(axis=-1, keepdims=True))
        return e / e.sum(axis=-1, keepdims=True)
    if activation == "sigmoid":
        # exp of a non-positive number only: no overflow for large logits of either sign.
        e = np.exp(-np.abs(x))
        return np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e)).astype(np.float32)
    raise UsageError(f"apply_activation takes softmax, sigmoid or none, got {activation!r}")
