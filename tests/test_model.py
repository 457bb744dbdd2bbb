"""The real prepared EfficientNet-Lite0 scoring real photos through the project's own preprocessing."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from engines.onnxruntime_engine import OnnxRuntimeEngine
from tests.conftest import CAT_CLASSES, ESPRESSO_OR_CUP, jpeg_bytes, photo
from transforms.postprocess import top_k_batch
from images.pillow_decoder import preprocess_image


@pytest.fixture(scope="module")
def engine(model_path):
    with OnnxRuntimeEngine(model_path) as e:
        yield e


def _scores(engine, names):
    batch = np.stack([preprocess_image(jpeg_bytes(photo(n))) for n in names])
    return engine.infer({"images": batch})["logits"]


def test_model_contract(engine, model_path):
    assert [s.describe() for s in engine.input_specs.values()] == ["images: uint8[N, 224, 224, 3]"]
    assert [s.describe() for s in engine.output_specs.values()] == ["logits: float32[N, 1000]"]
    meta = {p.key: p.value for p in onnx.load(model_path, load_external_data=False).metadata_props}
    labels = json.loads(meta["labels"])
    assert len(labels) == 1000 and labels[285] == "Egyptian Mau" and labels[967] == "espresso"


def test_chelsea_is_a_cat_and_coffee_is_espresso_or_a_cup(engine, model_path):
    logits = _scores(engine, ["chelsea", "coffee"])
    cat, coffee = ([p["class_id"] for p in row[:k]] for row, k in zip(top_k_batch(logits, 5), (5, 3)))
    assert CAT_CLASSES & set(cat), cat
    assert ESPRESSO_OR_CUP & set(coffee), coffee


def test_batch_composition_does_not_change_scores(engine):
    alone = _scores(engine, ["chelsea"])
    together = _scores(engine, ["coffee", "chelsea", "astronaut"])
    np.testing.assert_allclose(together[1], alone[0], atol=1e-4, rtol=1e-4)


def test_top_k_softmax_and_labels():
    logits = np.array([1.0, 3.0, 2.0, 3.0], np.float32)
    rows, = top_k_batch(logits[None], 3, ["a", "b", "c", "d"])
    probs = np.exp(logits - 3) / np.exp(logits - 3).sum()
    assert [r["class_id"] for r in rows] == [1, 3, 2]
    assert [r["label"] for r in rows] == ["b", "d", "c"]
    np.testing.assert_allclose([r["score"] for r in rows], probs[[1, 3, 2]], atol=1e-6)
    unnamed, = top_k_batch(logits[None], 10)
    assert unnamed[0]["label"] == "class_1" and len(unnamed) == 4
