"""The activations post-processing applies (engines/activations.py)."""

from __future__ import annotations

import numpy as np
import pytest

from engines.activations import apply_activation
from engines.base import UsageError


def test_apply_activation_is_stable_for_large_logits():
    logits = np.array([[1000.0, 0.0, -1000.0]], np.float32)
    np.testing.assert_allclose(apply_activation(logits, "softmax"), [[1.0, 0.0, 0.0]])
    np.testing.assert_allclose(apply_activation(logits, "sigmoid"), [[1.0, 0.5, 0.0]])
    with pytest.raises(UsageError, match="apply_activation takes softmax, sigmoid or none, got 'auto'"):
        apply_activation(logits, "auto")


def test_softmax_rows_sum_to_one_and_none_keeps_values():
    logits = np.array([[2.0, 1.0, 0.1], [0.0, 0.0, 0.0]], np.float16)
    probs = apply_activation(logits, "softmax")
    assert probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(axis=1), [1.0, 1.0], rtol=1e-6)
    np.testing.assert_allclose(probs[1], [1 / 3] * 3, rtol=1e-6)
    np.testing.assert_array_equal(apply_activation(logits, "none"), logits.astype(np.float32))
