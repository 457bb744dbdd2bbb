"""Post-processing: logits -> top-k classes with softmax scores and labels; failed batches -> dead letters."""

from __future__ import annotations

import logging
import time
from typing import Any, Dict, Iterator, List, Optional, Sequence

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics

from transforms.images import DEAD_LETTER, ImageRef, ref_dead_letter, ref_fields
from transforms.timing import NAMESPACE, Progress, stage_distribution

_LOG = logging.getLogger(__name__)


def top_k_batch(logits: np.ndarray, k: int, labels: Optional[Sequence[str]] = None):
    """Softmax over each row of a (n, classes) batch and its k best classes, best first (vectorized).

    Args:
        logits: Scores, one row per image.
        k: How many classes to keep (capped at the number of classes).
        labels: Class names by id, or None.

    Returns:
        One ``[{"class_id", "label", "score"}, ...]`` list per row, best first; ``label`` is
        ``"class_<id>"`` when no labels are known.
    """
    logits = np.asarray(logits, dtype=np.float32)
    if logits.ndim != 2:
        logits = logits.reshape(len(logits), -1)
    n, classes = logits.shape
    if n == 0:
        return []
    k = min(k, classes)
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs = shifted / shifted.sum(axis=1, keepdims=True)
    best = np.argpartition(-probs, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(probs, best, axis=1), axis=1, kind="stable")
    best = np.take_along_axis(best, order, axis=1)
    scores = np.round(np.take_along_axis(probs, best, axis=1).astype(np.float64), 6)
    names = labels if labels else None
    return [[{"class_id": int(c), "label": names[c] if names and c < len(names) else f"class_{int(c)}",
              "score": float(p)} for c, p in zip(row_ids, row_scores)]
            for row_ids, row_scores in zip(best.tolist(), scores.tolist())]


class TopKBatches(beam.DoFn):
    """``ScoredBatch`` -> one block (list) of prediction rows ``{"uri", ["id"], [columns], "top_k"}``, and a
    ``dead_letter`` row for each image the GPU decoder could not decode.

    Blocks keep Beam's per-element cost off each image; the sink writes a block at once.

    Args:
        k: Classes kept per image.
        labels: Class names by id, or None.
        progress_dir: Local directory for live progress counts, or None.
    """

    def __init__(self, k: int, labels: Optional[Sequence[str]], progress_dir: Optional[str] = None):
        if k < 1:
            raise ValueError(f"top_k must be >= 1, got {k}")
        self._k = k
        self._labels = list(labels) if labels else None
        self._progress_dir = progress_dir

    def setup(self):
        self._us = stage_distribution("postprocess")
        self._count = Metrics.counter(NAMESPACE, "predictions")
        self._progress = Progress(self._progress_dir)

    # The main output's type, stated: Beam's inference reads a list built by append() as List[Union[]],
    # which the typed BigQuery step (transforms/bigquery.py to_table_rows) refuses when the job is built.
    def process(self, scored) -> Iterator[List[Dict[str, Any]]]:
        start = time.perf_counter()
        for index, reason in sorted(scored.failed.items()):
            ref = scored.refs[index]
            yield ref_dead_letter(ref, reason, "decode")
        refs = scored.scored_refs()
        if refs:
            rows = []
            for ref, classes in zip(refs, top_k_batch(scored.logits, self._k, self._labels)):
                rows.append({**ref_fields(ref), "top_k": classes})
            self._count.inc(len(rows))
            self._progress.add("predictions", len(rows))
            self._us.update(int((time.perf_counter() - start) * 1e6))
            yield rows

    def finish_bundle(self):
        self._progress.flush("predictions")


MAX_REASON_CHARS = 600


def _is_beam_error_tuple(error) -> bool:
    return isinstance(error, tuple) and len(error) == 3 and isinstance(error[0], type)


def describe_failure(exception) -> str:
    """``TypeName: message`` for an exception, or for the ``(type, repr, traceback lines)`` tuple
    that Beam's ``with_exception_handling`` emits in place of the exception object."""
    if isinstance(exception, BaseException):
        text = f"{type(exception).__name__}: {exception}"
    elif _is_beam_error_tuple(exception):
        exc_type, exc_repr, lines = exception
        # The traceback's last line is "module.Type: message", the message exactly as raised.
        last = "".join(lines).rstrip().splitlines()[-1] if lines else ""
        message = last.split(": ", 1)[1] if ": " in last else exc_repr
        text = f"{exc_type.__name__}: {message}"
    else:
        text = str(exception)
    return text if len(text) <= MAX_REASON_CHARS else text[:MAX_REASON_CHARS - 3] + "..."


class FailedBatchToDeadLetters(beam.DoFn):
    """RunInference's failed ``(batch, error)`` -> one dead-letter row per example in the batch.

    ``error`` is what Beam's exception handling emits: ``(type, repr, traceback lines)``
    (or an exception object); the row keeps the type and message, not the whole traceback,
    which goes to the worker log.
    """

    def process(self, failure):
        batch, exception = failure
        reason = f"inference failed for the batch holding this image ({describe_failure(exception)})"
        if "alloc" in reason.lower() or "MemoryError" in reason:
            reason += f"; the batch of {len(batch)} did not fit in memory: lower --batch_size"
        if _is_beam_error_tuple(exception) and exception[2]:
            _LOG.warning("a batch of %d failed in RunInference:\n%s", len(batch), "".join(exception[2]))
        for element in batch:
            refs = element.refs if hasattr(element, "refs") else [element[0]]  # an ImageBatch, or (key, example)
            for key in refs:
                ref = key if isinstance(key, ImageRef) else ImageRef(str(key))
                yield ref_dead_letter(ref, reason, "inference").value


__all__ = ["top_k_batch", "TopKBatches", "FailedBatchToDeadLetters", "describe_failure", "DEAD_LETTER"]
