"""transforms/postprocess.py: outputs -> prediction rows in each layout, with a fake scored batch."""

from __future__ import annotations

import numpy as np
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

import apache_beam as beam
from engines.activations import apply_activation
from transforms.images import DEAD_LETTER, ImageRef
from transforms.inference import ScoredBatch
from transforms.postprocess import PredictionRows, RowLayout, above_threshold_batch, raw_values, top_k_batch

LOGITS = np.array([[2.0, 0.5, -1.0, 3.0], [-4.0, 4.0, 0.0, 1.0]], np.float32)
LABELS = ["ant", "bee", "cat", "dog"]


def test_top_k_applies_the_activation_it_is_given():
    softmax = top_k_batch(LOGITS, 2, LABELS)
    assert [[c["label"] for c in row] for row in softmax] == [["dog", "ant"], ["bee", "dog"]]
    np.testing.assert_allclose([c["score"] for c in softmax[0]], apply_activation(LOGITS, "softmax")[0, [3, 0]],
                               atol=1e-6)
    probs = apply_activation(LOGITS, "softmax")
    # Already probabilities ("none"): the scores are the model's own, not softmaxed again.
    assert [c["score"] for c in top_k_batch(probs, 1, activation="none")[0]] == [round(float(probs[0, 3]), 6)]
    sigmoid = top_k_batch(LOGITS, 4, activation="sigmoid")[1]
    np.testing.assert_allclose([c["score"] for c in sigmoid], [0.982014, 0.731059, 0.5, 0.017986], atol=1e-6)
    assert sigmoid[0]["label"] == "class_1"


def test_equal_scores_rank_by_the_models_output_then_by_class_id():
    """A sigmoid saturates at 1.0 and a softmax underflows to 0.0 in float32: the larger logit still ranks first,
    and exactly equal logits go by class id, so a row never depends on how a sort broke a tie."""
    saturated = np.array([[30.0, 40.0, 20.0, 35.0, -5.0]], np.float32)
    assert apply_activation(saturated, "sigmoid")[0, :4].tolist() == [1.0] * 4
    assert [c["class_id"] for c in top_k_batch(saturated, 4, activation="sigmoid")[0]] == [1, 3, 0, 2]
    underflow = np.array([[0.0, -300.0, -200.0, -400.0, -200.0]], np.float32)
    assert [c["class_id"] for c in top_k_batch(underflow, 5)[0]] == [0, 2, 4, 1, 3]
    assert [c["score"] for c in top_k_batch(underflow, 5)[0]] == [1.0, 0.0, 0.0, 0.0, 0.0]
    # Every class equal: which three are listed at the cut is numpy's choice, the same for the same row, and
    # those three go by class id.
    chosen = [[c["class_id"] for c in row] for row in top_k_batch(np.zeros((3, 6), np.float16), 3)]
    assert chosen[0] == sorted(chosen[0]) and len(set(chosen[0])) == 3 and chosen == [chosen[0]] * 3


def test_the_best_scores_are_listed_even_where_a_larger_logit_scores_lower():
    """numpy's float32 exp and sigmoid are not monotonic: one float32 step up in the logit can give a smaller
    score. The k listed are the k best scores, as the activation computes them."""
    softmax = np.array([[0.0, -0.006785232108086348, -0.00678523164242506]], np.float32)
    probs = apply_activation(softmax, "softmax")[0]
    assert probs[1] > probs[2]  # the smaller logit scores higher here
    assert [c["class_id"] for c in top_k_batch(softmax, 2)[0]] == [0, 1]
    sigmoid = np.array([[5.0, -0.32527742, -0.3252774]], np.float32)
    scores = apply_activation(sigmoid, "sigmoid")[0]
    assert scores[1] > scores[2]
    assert [c["class_id"] for c in top_k_batch(sigmoid, 2, activation="sigmoid")[0]] == [0, 1]


def test_equal_scores_at_the_cut_and_within_go_by_output_then_class_id_and_nan_ranks_last():
    ties = np.array([[2, 1, 1, 0, 0, 0, 0, 0, 0, 2, 1, 2]], np.float32)
    assert [c["class_id"] for c in top_k_batch(ties, 6, activation="none")[0]] == [0, 9, 11, 1, 2, 10]
    assert [c["class_id"] for c in top_k_batch(ties, 4, activation="none")[0]] == [0, 9, 11, 1]  # the cut: by id
    saturated = np.array([[30.0, 40.0, 20.0, 35.0, 38.0, 50.0, -5.0]], np.float32)  # sigmoid 1.0 for all but one
    assert [c["class_id"] for c in top_k_batch(saturated, 3, activation="sigmoid")[0]] == [5, 1, 4]
    nan = np.array([[1.0, np.nan, 3.0, 2.0]], np.float32)
    assert [c["class_id"] for c in top_k_batch(nan, 2, activation="none")[0]] == [2, 3]
    assert [c["class_id"] for c in top_k_batch(nan, 4, activation="none")[0]] == [2, 3, 0, 1]
    assert [c["class_id"] for c in top_k_batch(nan, 4, activation="sigmoid")[0]] == [2, 3, 0, 1]
    more = np.array([[np.nan, -0.24, 1.82, np.nan, 0.09, 1.65, -1.49, np.nan]] * 3, np.float32)
    for activation in ("none", "sigmoid"):
        assert [[c["class_id"] for c in row] for row in top_k_batch(more, 8, activation=activation)] == [
            [2, 5, 4, 1, 6, 0, 3, 7]] * 3
    assert top_k_batch(nan, 0) == [[]] and top_k_batch(nan, -1, activation="none") == [[]]


@pytest.mark.parametrize("activation", ["softmax", "sigmoid", "none"])
def test_top_k_lists_the_best_classes_with_the_activations_own_scores(activation):
    """Each score is apply_activation's float32 rounded to 6 places, and no class left out scores higher than
    one listed, on many rows of real-looking logits (several scales, float16 and float64 outputs, k up to all)."""
    rng = np.random.default_rng(3)
    # A few classes and many, up to all of them.
    for dtype, k, classes in ((np.float32, 5, 12), (np.float16, 1, 12), (np.float64, 7, 12), (np.float32, 12, 12),
                              (np.float16, 20, 24), (np.float32, 40, 30)):
        logits = (rng.standard_normal((300, classes)) * rng.uniform(0.1, 25, (300, 1))).astype(dtype)
        # Rows of neighbouring float32 logits, where exp and the sigmoid are not monotonic.
        near = np.nextafter(np.float32(rng.uniform(-1.7, 0)), np.float32(1), dtype=np.float32)
        logits[:100] = (near + np.float32(2e-7) * rng.integers(-50, 50, (100, classes))).astype(dtype)
        probs = apply_activation(logits, activation)
        for i, row in enumerate(top_k_batch(logits, k, activation=activation)):
            ids = [c["class_id"] for c in row]
            assert len(ids) == min(k, classes) and len(set(ids)) == len(ids)
            assert [c["score"] for c in row] == [round(float(probs[i, c]), 6) for c in ids]
            # Best first; equal scores by the logit, then by class id.
            keys = [(-probs[i, c], -np.float32(logits[i, c]), c) for c in ids]
            assert keys == sorted(keys)
            left_out = np.setdiff1d(np.arange(classes), ids)
            assert not left_out.size or probs[i, left_out].max() <= probs[i, ids[-1]]
    assert top_k_batch(np.zeros((0, 12), np.float32), 5, activation=activation) == []
    assert len(top_k_batch(np.zeros((2, 3, 4), np.float32), 5, activation=activation)[0]) == 5  # flattened


def test_a_threshold_keeps_every_class_at_or_above_it_best_first():
    rows = above_threshold_batch(LOGITS, 0.5, LABELS, "sigmoid")
    assert [[c["label"] for c in row] for row in rows] == [["dog", "ant", "bee"], ["bee", "dog", "cat"]]
    assert above_threshold_batch(LOGITS, 0.99, LABELS, "sigmoid") == [[], []]
    saturated = np.array([[30.0, 40.0, 20.0, 35.0, -5.0, 40.0]], np.float32)  # sigmoid 1.0 for all but one
    assert [c["class_id"] for c in above_threshold_batch(saturated, 0.5)[0]] == [1, 5, 3, 0, 2]


def test_raw_values_are_one_flat_list_per_image():
    assert raw_values(np.arange(12, dtype=np.float16).reshape(2, 2, 3)) == [[0, 1, 2, 3, 4, 5], [6, 7, 8, 9, 10, 11]]


def test_a_layout_holds_one_ranked_output_and_a_threshold_only_in_threshold_mode():
    with pytest.raises(ValueError, match="reads one output"):
        RowLayout("topk", (("a", "float32", 4), ("b", "float32", 4)))
    with pytest.raises(ValueError, match="threshold goes with mode 'threshold'"):
        RowLayout("topk", threshold=0.5)
    with pytest.raises(ValueError, match="mode must be one of"):
        RowLayout("logits")


def _rows(layout, scored):
    with TestPipeline() as p:
        out = p | beam.Create([scored]) | beam.ParDo(PredictionRows(layout, LABELS)).with_outputs(
            DEAD_LETTER, main="rows")
        assert_that(out.rows, equal_to([scored_rows(layout, scored)]), label="Rows")
        assert_that(out[DEAD_LETTER], equal_to([{"uri": "/p/b.jpg", "error": "corrupt", "stage": "decode",
                                                 "id": "2"}]), label="Dead")


def scored_rows(layout, scored):
    refs = scored.scored_refs()
    if layout.mode == "raw":
        return [{"uri": r.uri, "model": "m@1", "emb": v} for r, v in zip(refs, raw_values(scored.outputs["emb"]))]
    field = "classes" if layout.mode == "threshold" else "top_k"
    values = (above_threshold_batch(scored.outputs["logits"], layout.threshold, LABELS, layout.activation)
              if layout.mode == "threshold" else top_k_batch(scored.outputs["logits"], layout.k, LABELS,
                                                             layout.activation))
    rows = []
    for ref, value in zip(refs, values):
        row = {"uri": ref.uri, **({"id": ref.id} if ref.id else {}), "model": "m@1", field: value}
        rows.append(row)
    return rows


@pytest.mark.parametrize("layout", [
    RowLayout("topk", (("logits", "float32", 4),), k=2, model="m@1"),
    RowLayout("threshold", (("logits", "float32", 4),), activation="sigmoid", threshold=0.5, model="m@1"),
])
def test_each_scored_image_gets_its_own_row_and_the_failed_one_a_dead_letter(layout):
    refs = (ImageRef("/p/a.jpg", "1"), ImageRef("/p/b.jpg", "2"), ImageRef("/p/c.jpg"))
    _rows(layout, ScoredBatch(refs, {"logits": LOGITS}, {1: "corrupt"}))


def test_raw_rows_carry_each_output_named_after_it():
    layout = RowLayout("raw", (("emb", "float16", 3),), model="m@1")
    refs = (ImageRef("/p/a.jpg"), ImageRef("/p/b.jpg", "2"), ImageRef("/p/c.jpg"))
    emb = np.array([[0.5, 1.0, 2.0], [4.0, 8.0, 16.0]], np.float16)
    _rows(layout, ScoredBatch(refs, {"emb": emb}, {1: "corrupt"}))
